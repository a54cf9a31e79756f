"""``lora-med bench``: held-out perplexity and reply latency of every backend, side by side, behind a gate.

Perplexity is paired: the base, the LoRA run, the full fine-tune and each ONNX export score the same
held-out conversations, formatted and cut exactly as in training (``evaluate.perplexity``).

Latency runs every backend available on the machine in one process, one after the other (each is
loaded, warmed up, timed and freed before the next; ``latency.py``): lora-med's engine on each export's
decode graph (``engine-cpu-fp32``, ``engine-cpu-int8``, with a GPU ``engine-cuda-fp16``: what ``serve``
runs), and the peers through transformers' ``generate()``: PyTorch eager with the unmerged adapter, PyTorch
merged, with a GPU PyTorch fp16 (plain and with a static cache + CUDA graphs), ONNX Runtime through Optimum
on the CPU (fp32, int8) and CUDA (fp32, fp16, IO binding). Every backend generates exactly ``new_tokens``
tokens greedily. The report sets each engine row beside its peer (``engine_vs_peers``: engine-cpu-fp32 /
ort-cpu-fp32, ...), gives the engine's batch 1/4/16 throughput and, for GPU rows, the bandwidth floor.

``--shape dialogpt-medium`` measures speed with randomly initialised weights of DialoGPT-medium's exact
config (``shapes.py``; nothing is downloaded), with the graphs merge-export would ship (the same recipes);
it refuses perplexity, which random weights cannot give.

``bench()`` runs in stages: ``validate`` (every input checked, the report folder writable, before anything
loads), ``--paired`` training, ``_inputs`` (prompts and held-out examples, or the random-weight shape),
``_perplexities``, ``_latency``, then the report (``report.py``) and the gate.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import data, models, runs, settings
from ..config import BenchConfig
from ..engine.ort_backend import load_ort, ort_logits_fn
from ..errors import GateError, LoraMedError, first_line
from ..fileio import write_json, write_text
from ..perplexity import perplexity, torch_logits_fn
from ..settings import describe
from . import genai
from .latency import (
    SCALING_BACKENDS,
    SCALING_CONTEXTS,
    SCALING_NEW_TOKENS,
    SPEED_ONLY,
    Timing,
    available_backends,
    held_out_prompts,
    load_adapter,
    thread_count,
    time_backend,
)
from .paired import paired_runs
from .report import concurrent_vs_genai, engine_vs_peers, gate_line, markdown, plots, replies, training
from .shapes import build_shape, shape_facts
from .validate import Found, out_dir, report_name, validate

# "auto": the first present. The engine first: it is what serve runs.
GATE_ORDER = (
    "engine-cuda-fp16",
    "engine-cpu-int8",
    "engine-cpu-fp32",
    "ort-cuda-fp16",
    "ort-cpu-int8",
    "ort-cpu-fp32",
    "torch-merged",
    "torch-eager",
)
DEFAULT_MAX_PPL_RATIO = 1.10
DEFAULT_MIN_PPL_GAIN = 1.0
REPORT_FILES = ("report.json", "report.md", "latency.png", "perplexity.png", "scaling.png")


@dataclass
class BenchResult:
    report: dict  # report.json's content
    out_dir: Path


# --------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """What every backend is measured on: prompts (token ids), the EOS id, and, for trained runs, the
    tokenizer and the encoded held-out conversations for perplexity."""

    prompts: list[list[int]]
    eos: int
    n_positions: int
    stream: list[int]  # tokens the scaling contexts are cut from
    prompt_source: str
    tokenizer: object = None
    examples: list | None = None
    model_dir: Path | None = None  # --shape: the random-weight model
    shape_exports: list[dict] = dataclasses.field(default_factory=list)
    shape_engines: list[dict] = dataclasses.field(default_factory=list)
    shape_info: dict | None = None


def _inputs(cfg: BenchConfig, found: Found, device: str, scratch: Path) -> Inputs:
    if cfg.shape:
        print(f"Building a randomly initialised {cfg.shape} model and the graphs merge-export ships ({SPEED_ONLY})")
        model_dir, shape_exports, shape_engines, info = build_shape(
            cfg.shape, scratch, device, seed=cfg.seed, backends=cfg.backends
        )
        shape = shape_facts(cfg.shape)
        gen = torch.Generator().manual_seed(cfg.seed)
        # Random token prompts of chat-like lengths (no tokenizer or data belongs to random weights).
        lengths = [(16, 24, 32, 48, 64)[i % 5] for i in range(cfg.prompts)]
        prompts = [torch.randint(0, shape["vocab_size"] - 1, (n,), generator=gen).tolist() for n in lengths]
        stream = torch.randint(0, shape["vocab_size"] - 1, (max(SCALING_CONTEXTS),), generator=gen).tolist()
        return Inputs(
            prompts,
            shape["eos_token_id"],
            shape["n_positions"],
            stream,
            f"{cfg.prompts} random-token prompts, lengths {lengths}",
            model_dir=model_dir,
            shape_exports=shape_exports,
            shape_engines=shape_engines,
            shape_info=info,
        )
    run_dir, card = found.runs.get("--run") or found.runs["--full-run"]
    tokenizer = models.load_tokenizer(run_dir)
    convs = card.held_out()
    fmt, max_len = card.format, card.max_length
    examples, _ = data.encode_all(convs, tokenizer, max_length=max_len, fmt=fmt)
    from transformers import AutoConfig

    n_positions = models.max_positions(AutoConfig.from_pretrained(card.base)) or 1024
    prompts = held_out_prompts(convs, tokenizer, fmt, cfg.prompts, n_positions - max(64, cfg.new_tokens))
    stream = [t for e in examples for t in e.input_ids]
    while len(stream) < max(SCALING_CONTEXTS):
        stream = stream + stream
    return Inputs(
        prompts,
        tokenizer.eos_token_id,
        n_positions,
        stream,
        f"{len(prompts)} held-out conversations ({card.eval.path}), history up to the last user turn, format {fmt}",
        tokenizer=tokenizer,
        examples=examples,
    )


# --------------------------------------------------------------------------- onnxruntime-genai's graphs


def _genai_graphs(cfg: BenchConfig, inp: Inputs, found: Found, scratch: Path, device: str) -> tuple[list, list]:
    """onnxruntime-genai's builder graphs of the measured model (the --shape model, or each export's merged/) for
    the genai-* rows wanted, and each row left out with why. Returns (graphs, skipped)."""
    wanted = [b for b in genai.BACKENDS if not cfg.backends or b in cfg.backends]
    if not wanted:
        return [], []
    if device != "cuda" and "genai-cuda-fp16" in wanted:
        wanted.remove("genai-cuda-fp16")
        skipped = [{"backend": "genai-cuda-fp16", "reason": "no CUDA GPU (onnxruntime-genai-cuda on a GPU)"}]
    else:
        skipped = []
    sources = [(inp.model_dir, f"{cfg.shape} shape ({SPEED_ONLY})", inp.model_dir)] if inp.model_dir else []
    sources += [(Path(ex["path"]) / "merged", ex["path"], Path(ex["path"])) for ex in found.exports]
    if not sources:
        return [], skipped + [{"backend": "genai-*", "reason": "needs --shape or an --export (its merged/ model)"}]
    python = genai.builder_python(cfg.genai_python)
    if why := genai.missing(python):
        return [], skipped + [{"backend": b, "reason": why} for b in wanted]
    graphs: list[dict] = []
    for model_dir, label, path in sources:
        model_type = models.load_model_config(str(model_dir)).model_type
        for b in wanted:
            if model_type == "gpt2":
                skipped.append({"backend": b, "reason": "onnxruntime-genai's model builder writes no GPT-2 graph"})
                continue
            out = scratch / f"genai-{len(graphs)}-{b}"
            print(f"Building onnxruntime-genai's {b} graph of {model_dir} with {python} ...", flush=True)
            try:
                built = genai.build(model_dir, out, b, python, thread_count(cfg.threads))
            except LoraMedError as e:
                skipped.append({"backend": b, "reason": str(e)})
                continue
            graphs.append(
                {
                    "backend": b,
                    "dir": str(out),
                    "path": str(path),
                    "label": f"onnxruntime-genai generator on its builder's graph of {label}",
                    "pad_token_id": built["pad_token_id"],
                    "build": built,
                }
            )
    return graphs, skipped


# --------------------------------------------------------------------------- perplexity


def _perplexities(cfg: BenchConfig, found: Found, tokenizer, examples, device: str) -> dict:
    """Paired perplexity of base, LoRA, full and every export on the same encoded examples."""
    pad = tokenizer.pad_token_id
    first = next(iter(found.cards.values()))  # --run, else --full-run: perplexity needs one (validated)
    base = models.resolve_base(cfg.base) if cfg.base else first.base
    todo: list[tuple[str, str, Callable[[], object]]] = [("base", base, lambda: models.load_model(base).to(device))]
    if (lora := found.runs.get("--run")) is not None:
        lora_dir, lora_card = lora
        if lora_card.artifact == "adapter":
            todo.append(("lora", lora_dir, functools.partial(load_adapter, lora_card.base, lora_dir, device)))
        else:
            todo.append(("lora", lora_dir, lambda: models.load_model(lora_dir).to(device)))
    if (full := found.runs.get("--full-run")) is not None:
        full_dir = full[0]
        todo.append(("full", full_dir, lambda: models.load_model(full_dir).to(device)))
    threads = thread_count(cfg.threads)
    for ex in found.exports:
        if ex["precision"] == "fp16" and device != "cuda":
            continue
        dev = "cuda" if ex["precision"] == "fp16" else "cpu"
        todo.append(
            (
                f"onnx:{Path(ex['path']).name}:{ex['precision']}",
                ex["path"],
                functools.partial(load_ort, ex["onnx_dir"], dev, threads),
            )
        )
    out = {}
    for label, source, load in todo:
        t0 = time.perf_counter()
        model = load()
        fn = torch_logits_fn(model) if isinstance(model, torch.nn.Module) else ort_logits_fn(model)
        ppl = perplexity(fn, examples, pad, cfg.ppl_batch_size)
        out[label] = {
            "source": source,
            "assistant_ppl": ppl["assistant"]["ppl"],
            "all_ppl": ppl["all"]["ppl"],
            "assistant_tokens": ppl["assistant"]["tokens"],
            "all_tokens": ppl["all"]["tokens"],
            "seconds": round(time.perf_counter() - t0, 2),
        }
        print(
            f"  perplexity {label:<28} assistant {out[label]['assistant_ppl']:10.3f}   all {out[label]['all_ppl']:10.3f}"
        )
        del model
        gc.collect()
    return out


# --------------------------------------------------------------------------- latency


def _latency(cfg: BenchConfig, backends, inp: Inputs, notes: list[str], skipped: list[dict]) -> list[dict]:
    # Contexts that fit with the largest new-token count: n_positions bounds the cache.
    room = inp.n_positions - max(max(SCALING_NEW_TOKENS), cfg.new_tokens)
    scaling_prompts = {"base": inp.stream[:32], "contexts": {c: inp.stream[:c] for c in SCALING_CONTEXTS if c <= room}}
    too_long = [c for c in SCALING_CONTEXTS if c > room]
    if too_long:
        notes.append(
            f"scaling contexts {too_long} left out: they do not fit n_positions {inp.n_positions} with "
            f"{max(SCALING_NEW_TOKENS)} new tokens"
        )
    timing = Timing(
        cfg.new_tokens,
        cfg.repeats,
        cfg.warmup,
        cfg.scaling_repeats,
        thread_count(cfg.threads),
        throughput=cfg.throughput,
        concurrent=cfg.concurrent,
        system_tokens=cfg.system_tokens,
    )
    print(
        f"Latency: {len(inp.prompts)} prompts x {cfg.repeats} repeats, {cfg.new_tokens} new tokens, "
        f"warm-up {cfg.warmup}, {timing.threads} threads"
    )
    rows = []
    for b in backends:
        try:
            row = time_backend(
                b, timing, inp.prompts, inp.eos, scaling_prompts if cfg.scaling and b.name in SCALING_BACKENDS else None
            )
        except Exception as e:
            if not b.may_fail:
                raise
            reason = f"could not run here: {first_line(e)}"
            skipped.append({"backend": b.name, "reason": reason})
            print(f"  {b.name:<22} {reason}")
            models.release_memory()
            continue
        rows.append(row)
        print(
            f"  {b.name:<22} p50 {row['reply_s']['p50'] * 1000:9.1f} ms  p95 {row['reply_s']['p95'] * 1000:9.1f} ms"
            f"  ttft {row['ttft_s']['p50'] * 1000:8.1f} ms  {row['tokens_per_s']:8.1f} tok/s"
        )
    ref = next((r for r in rows if r["backend"] == "torch-eager"), None)
    for r in rows:
        r["speedup_vs_torch_eager"] = ref["reply_s"]["p50"] / r["reply_s"]["p50"] if ref else None
    return rows


# --------------------------------------------------------------------------- gate


def _gate(cfg: BenchConfig, latency: list[dict], ppl: dict | None, gate_backend: str | None) -> list[dict]:
    checks = []
    if cfg.max_latency_s > 0 and gate_backend:
        row = next(r for r in latency if r["backend"] == gate_backend)
        v = row["reply_s"][cfg.gate_stat]
        checks.append(
            {
                "gate": "latency",
                "what": f"{gate_backend} {cfg.gate_stat} reply time ({cfg.new_tokens} new tokens)",
                "value": v,
                "limit": cfg.max_latency_s,
                "op": "<=",
                "passed": v <= cfg.max_latency_s,
                "by": v - cfg.max_latency_s,
                "unit": "s",
            }
        )
    if ppl:
        ratio_limit = cfg.max_ppl_ratio if cfg.max_ppl_ratio is not None else DEFAULT_MAX_PPL_RATIO
        if "lora" in ppl and "full" in ppl and ratio_limit > 0:
            v = ppl["lora"]["assistant_ppl"] / ppl["full"]["assistant_ppl"]
            checks.append(
                {
                    "gate": "ppl-ratio",
                    "what": "LoRA / full fine-tune assistant perplexity",
                    "value": v,
                    "limit": ratio_limit,
                    "op": "<=",
                    "passed": v <= ratio_limit,
                    "by": v - ratio_limit,
                    "unit": "x",
                }
            )
        gain_limit = cfg.min_ppl_gain if cfg.min_ppl_gain is not None else DEFAULT_MIN_PPL_GAIN
        for tuned in ("lora", "full"):
            if tuned in ppl and gain_limit > 0:
                v = ppl["base"]["assistant_ppl"] / ppl[tuned]["assistant_ppl"]
                checks.append(
                    {
                        "gate": "ppl-gain",
                        "what": f"base / {tuned} assistant perplexity",
                        "value": v,
                        "limit": gain_limit,
                        "op": ">=",
                        "passed": v >= gain_limit,
                        "by": gain_limit - v,
                        "unit": "x",
                    }
                )
    return checks


# --------------------------------------------------------------------------- the command


def bench(cfg: BenchConfig) -> BenchResult:
    """Measure perplexity and latency, write report.json/report.md/plots, then apply the gate.

    Returns:
        BenchResult with the report (also written to ``out_dir/report.json``).
    Raises:
        ConfigError: settings or inputs are invalid (every problem listed, before any weights load).
        LoraMedError: a run or export folder is unusable.
        GateError: a gate failed (the report is written first; the message names each failed gate and by how much).
    """
    t_start, load_start = time.perf_counter(), _loadavg()
    problems, found = validate(cfg)
    if problems:
        raise runs.problems_error("with the bench settings; nothing was loaded", problems)
    device = models.resolve_device(cfg.device)
    out = out_dir(cfg, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    # One bench at a time per report folder: a second one would clear the first's report under it.
    with runs.Lock(out.parent / f".{out.name}.lock", f"the bench report {out}") as lock:
        if lock.note:
            print(lock.note)
        return _bench(cfg, found, device, t_start, load_start)


def _bench(cfg: BenchConfig, found: Found, device: str, t_start: float, load_start: float | None) -> BenchResult:
    torch.set_num_threads(thread_count(cfg.threads))
    name_, out = report_name(cfg, device), out_dir(cfg, device)
    notes: list[str] = [cfg.note] if cfg.note else []
    paired_info = None
    if cfg.paired:
        run, full_run, exports, paired_info = paired_runs(cfg, name_, device)
        cfg = settings.replace(cfg, run=run, full_run=full_run, export=exports, paired=False)
        problems, found = validate(cfg)
        if problems:
            raise runs.problems_error("in the paired runs; they cannot be benchmarked", problems, LoraMedError)
        notes += [f"export {r}" for r in paired_info["refused_exports"]]

    for ex in found.exports:
        print(f"Verified {ex['path']}: {ex['verified']}")
    for flag, card in found.cards.items():
        if note := card.overlap_note():
            print(f"note: {flag} {found.runs[flag][0]}: {note}")
            notes.append(f"{flag}: {note}")

    with tempfile.TemporaryDirectory(prefix="lora-med-bench-") as scratch:
        inp = _inputs(cfg, found, device, Path(scratch))
        engines = [*inp.shape_engines, *(ex["engine"] for ex in found.exports if "engine" in ex)]
        genai_graphs, genai_skipped = _genai_graphs(cfg, inp, found, Path(scratch), device)
        backends, skipped = available_backends(
            found.runs,
            [*inp.shape_exports, *found.exports],
            device,
            threads=thread_count(cfg.threads),
            wanted=cfg.backends,
            model_dir=inp.model_dir,
            shape=cfg.shape,
            engines=engines,
            genai_graphs=genai_graphs,
        )
        skipped += genai_skipped
        names = [b.name for b in backends]
        gate_backend = None
        if cfg.max_latency_s > 0:
            gate_backend = (
                next((n for n in GATE_ORDER if n in names), None) if cfg.gate_backend == "auto" else cfg.gate_backend
            )
            if gate_backend not in names:
                raise LoraMedError(
                    f"{describe(cfg, 'gate_backend')}: not among the backends measured here "
                    f"({', '.join(names) or 'none'})"
                )
        ppl = None
        if inp.examples is not None:
            card = found.cards.get("--run") or found.cards["--full-run"]
            held = "evaluation (NOT held-out, see the note)" if card.overlap_note() else "held-out"
            print(
                f"Perplexity on {len(inp.examples)} {held} conversations "
                f"({sum(e.tokens_cut > 0 for e in inp.examples)} cut at max length {card.max_length}):"
            )
            ppl = _perplexities(cfg, found, inp.tokenizer, inp.examples, device)
        latency = _latency(cfg, backends, inp, notes, skipped)

    checks = _gate(cfg, latency, ppl, gate_backend)
    report = {
        "kind": "lora-med.bench",
        "format_version": 3,
        "name": name_,
        "label": SPEED_ONLY if cfg.shape else None,
        "settings": settings.as_dict(cfg),
        "machine": {
            **models.device_info(device),
            "load_average_1m_start": load_start,
            "load_average_1m_end": _loadavg(),
        },
        "versions": models.library_versions(),
        "inputs": {
            "runs": {k: v.method for k, v in found.cards.items()},
            "run_dirs": {k: str(Path(f).resolve()) for k, (f, _) in found.runs.items()},
            "exports": found.exports,
            "shape": inp.shape_info,
            "paired": paired_info,
            "prompts": inp.prompt_source,
            "threads": thread_count(cfg.threads),
            "genai_graphs": [{k: g[k] for k in ("backend", "path", "build")} for g in genai_graphs],
        },
        "perplexity": ppl,
        "latency": latency,
        "engine_vs_peers": engine_vs_peers(latency),
        "concurrent_vs_genai": concurrent_vs_genai(latency),
        "skipped_backends": skipped,
        "training": training(found.cards),
        "replies": replies(found.cards),
        "gate": {"backend": gate_backend, "checks": checks, "passed": all(c["passed"] for c in checks)},
        "notes": notes,
        "total_s": round(time.perf_counter() - t_start, 2),
    }
    _write_report(out, report)
    failed = [c for c in checks if not c["passed"]]
    if failed:
        raise GateError(f"{len(failed)} gate(s) failed (report in {out}):", [gate_line(c) for c in failed])
    for c in checks:
        print(gate_line(c))
    if not checks:
        print("no gate applied (all thresholds off or not applicable)")
    return BenchResult(report, out)


def _write_report(out: Path, report: dict) -> None:
    """report.json, report.md and the plots into ``out`` (a folder bench owns: its previous report is replaced)."""
    if runs.marker(out):
        runs.clear(out)
    runs.claim(out, "bench", *REPORT_FILES)
    write_json(out / "report.json", report)
    write_text(out / "report.md", markdown(report))
    plots(report, out)
    print(f"Report: {out}/report.md")


def _loadavg() -> float | None:
    """1-minute load average: how busy the machine was (other jobs slow a shared CPU down)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
