"""``lora-med bench``: held-out perplexity and reply latency of every backend, side by side, behind a gate.

Perplexity is paired: the base, the LoRA run, the full fine-tune and each ONNX export score the same
held-out conversations, formatted and cut exactly as in training (``evaluate.perplexity``).

Latency runs every backend available on the machine in one process, one after the other (each is
loaded, warmed up, timed and freed before the next): PyTorch eager with the unmerged adapter,
PyTorch merged, ONNX Runtime on the CPU (fp32, int8) and, with a GPU, ONNX Runtime CUDA (fp32, fp16)
with IO binding. Every backend generates exactly ``new_tokens`` tokens greedily (min = max new
tokens, so an early EOS cannot make one backend look faster). Reported: p50/p95/p99 reply time,
time to first token, tokens/s, peak memory and the speedup over PyTorch eager, plus a scaling table
(reply time against new tokens and against context length).

``--shape dialogpt-medium`` measures speed with randomly initialised weights of DialoGPT-medium's
exact config (nothing is downloaded); it refuses perplexity, which random weights cannot give.

This module validates the settings, runs ``--paired``, scores perplexity, applies the gate and assembles
the report; the timing lives in ``latency.py``, the random-weight shapes in ``shapes.py`` and the report
files in ``report.py``.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click
import torch

from . import data, models
from .errors import ConfigError, GateError, LoraMedError
from .latency import (BACKENDS, SCALING_BACKENDS, SCALING_CONTEXTS, SCALING_NEW_TOKENS, SPEED_ONLY, available_backends,
                      held_out_prompts, load_adapter, load_ort, thread_count, time_backend)
from .options import config_options, overrides_from
from .report import gate_line, markdown, plots, replies, training
from .runcard import config_dict, load_config, read_json, write_json
from .shapes import SHAPES, build_shape

# SHAPES, BACKENDS, SCALING_* and SPEED_ONLY live with the code that uses them (shapes.py, latency.py) and
# stay importable from here, where the tests and benchmarks/train_memory read them.
GATE_ORDER = ("ort-cuda-fp16", "ort-cpu-int8", "ort-cpu-fp32", "torch-merged", "torch-eager")  # "auto" picks the first present
DEFAULT_MAX_PPL_RATIO = 1.10
DEFAULT_MIN_PPL_GAIN = 1.0


@dataclass
class BenchConfig:
    """Settings of ``lora-med bench`` (also the keys of its ``--config`` YAML)."""

    # what to measure
    run: str | None = None  # LoRA/QLoRA run folder (lora-med train output); its held-out set is the eval data
    full_run: str | None = None  # full fine-tune run folder, compared with --run on the same held-out set
    export: list[str] | None = None  # merge-export folders (comma-separated); each gives ORT backends
    base: str | None = None  # base model for the base perplexity; None: the run card's base
    shape: str | None = None  # dialogpt-medium | tiny: random weights of that shape, latency only
    paired: bool = False  # train LoRA and full on the same split/seed/budget, merge-export both, then bench
    # --paired training: each method's own settings (lr, r, ...) from its train YAML; data, seed, epochs
    # and batch from here, the same for both, so the token budget is equal
    lora_config: str | None = None  # --paired: train YAML for the LoRA run (e.g. configs/default.yaml)
    full_config: str | None = None  # --paired: train YAML for the full fine-tune (e.g. configs/full.yaml)
    data: str = "data/medical_conversations.json"  # --paired: training conversations
    eval_data: str | None = "data/medical_conversations_eval.json"  # --paired: held-out set; None: split data
    epochs: float = 3.0  # --paired: epochs for both runs
    max_steps: int = -1  # --paired: > 0 overrides epochs
    train_batch_size: int = 4  # --paired: batch size for both runs
    seed: int = 42  # --paired: seed for both runs; also seeds --shape weights and prompts
    paired_dir: str | None = None  # --paired: where runs and exports go; None: adapters/paired-<name>
    min_top1: float = 0.99  # --paired: int8/fp16 export gate, top-1 agreement with PyTorch (merge-export --min-top1)
    # latency
    backends: list[str] | None = None  # subset of torch-eager,torch-merged,ort-cpu-fp32,ort-cpu-int8,ort-cuda-fp32,ort-cuda-fp16; None: all available
    device: str = "auto"  # auto | cpu | cuda: where the PyTorch backends run (CUDA ORT backends need cuda)
    new_tokens: int = 32  # tokens every backend generates per reply (EOS cannot stop it early)
    prompts: int = 8  # held-out prompts timed per backend
    repeats: int = 3  # timed replies per prompt
    warmup: int = 2  # untimed replies before timing
    scaling: bool = True  # reply time vs new tokens (8..64) and context (32..512)
    scaling_repeats: int = 3  # timed replies per scaling point (the median is reported)
    threads: int | None = None  # intra-op threads for PyTorch and ORT; None: one per core
    ppl_batch_size: int = 8  # perplexity batch (does not change the figure: token-weighted)
    # gate
    gate_backend: str = "auto"  # backend the latency gate reads; auto: ort-cuda-fp16, ort-cpu-int8, ort-cpu-fp32, torch-merged, torch-eager
    gate_stat: str = "p50"  # p50 | p95 | p99 reply time for the latency gate
    max_latency_s: float = 0.2  # reply-time limit in seconds for the gate backend; <= 0: no latency gate
    max_ppl_ratio: float | None = None  # LoRA ppl / full ppl must be <= this; None: 1.10 when both runs are given
    min_ppl_gain: float | None = None  # base ppl / fine-tuned ppl must be >= this; None: 1.0 when a run is given
    # output
    name: str | None = None  # report name; None: from the run, the shape or "paired"
    out: str | None = None  # report folder; None: benchmarks/results/<name>
    note: str | None = None  # free text recorded in the report's notes (e.g. what else shared the machine)


@dataclass
class BenchResult:
    report: dict  # report.json's content
    out_dir: Path


# --------------------------------------------------------------------------- validation


def _check(cfg: BenchConfig) -> tuple[list[str], dict]:
    """Every problem with the settings, and what was read while checking (run cards, manifests)."""
    p: list[str] = []
    found: dict = {"cards": {}, "exports": []}
    if cfg.shape is not None:
        if cfg.shape not in SHAPES:
            p.append(f"--shape {cfg.shape}: use one of {', '.join(SHAPES)}")
        asked = [flag for flag, v in (("--run", cfg.run), ("--full-run", cfg.full_run), ("--export", cfg.export),
                                      ("--paired", cfg.paired), ("--max-ppl-ratio", cfg.max_ppl_ratio),
                                      ("--min-ppl-gain", cfg.min_ppl_gain), ("--base", cfg.base)) if v]
        if asked:
            p.append(f"--shape {cfg.shape} measures speed only ({SPEED_ONLY}): perplexity and the perplexity gates "
                     f"are refused, and it cannot be combined with {', '.join(asked)}. Bench a trained run "
                     "(--run/--full-run/--export) for perplexity")
    elif not (cfg.run or cfg.full_run or cfg.export or cfg.paired):
        p.append("nothing to measure: give --run and/or --full-run (training runs), --export (merge-export "
                 "folders), --paired, or --shape dialogpt-medium")
    if cfg.export and not (cfg.run or cfg.full_run or cfg.paired or cfg.shape):
        p.append("--export alone gives no held-out set: add the --run (or --full-run) the export came from")
    if cfg.paired and (cfg.run or cfg.full_run or cfg.export):
        p.append("--paired trains and exports its own runs; drop --run/--full-run/--export")
    for name, low in (("new_tokens", 1), ("prompts", 1), ("repeats", 1), ("warmup", 0), ("scaling_repeats", 1),
                      ("ppl_batch_size", 1), ("train_batch_size", 1)):
        if getattr(cfg, name) < low:
            p.append(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be >= {low}")
    if cfg.threads is not None and cfg.threads < 1:
        p.append(f"--threads {cfg.threads}: must be >= 1")
    if cfg.gate_stat not in ("p50", "p95", "p99"):
        p.append(f"--gate-stat {cfg.gate_stat}: use p50, p95 or p99")
    unknown = [b for b in cfg.backends or [] if b not in BACKENDS]
    if unknown:
        p.append(f"--backends: unknown {', '.join(unknown)}; known: {', '.join(BACKENDS)}")
    if cfg.gate_backend != "auto" and cfg.gate_backend not in BACKENDS and ":" not in cfg.gate_backend:
        p.append(f"--gate-backend {cfg.gate_backend}: use auto or one of {', '.join(BACKENDS)}")
    try:
        models.resolve_device(cfg.device)
    except ConfigError as e:
        p.append(str(e))
    if cfg.paired:
        for flag, path in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
            if path is not None and not Path(path).is_file():
                p.append(f"{flag} {path}: file not found")
        from . import export

        if not hasattr(export, "merge_export"):
            p.append("--paired needs `lora-med merge-export`, which this installation does not have yet")
        from .train import TrainConfig

        for flag, path in (("--lora-config", cfg.lora_config), ("--full-config", cfg.full_config)):
            try:
                load_config(TrainConfig, path, {})
            except ConfigError as e:
                p.append(f"{flag}: {e}")

    from .train import load_run

    for flag, path in (("--run", cfg.run), ("--full-run", cfg.full_run)):
        if path:
            try:
                found["cards"][flag] = load_run(path)
            except LoraMedError as e:
                p.append(f"{flag}: {e}")
    cards = found["cards"]
    if "--run" in cards and "--full-run" in cards:
        a, b = cards["--run"], cards["--full-run"]
        same = lambda k: a["data"]["eval"].get(k) == b["data"]["eval"].get(k)  # noqa: E731
        if not (same("sha256") and same("indices")) or a["data"]["max_length"] != b["data"]["max_length"] \
                or a["data"]["format"] != b["data"]["format"]:
            p.append(f"--run {cfg.run} and --full-run {cfg.full_run} were not evaluated on the same held-out set "
                     "(eval file, split, max length or format differ): perplexity would not be paired. Train both "
                     "with the same data, seed and --max-length (or use --paired)")
        if Path(a["base"]["name_or_path"]).name != Path(b["base"]["name_or_path"]).name:
            p.append(f"--run and --full-run start from different bases ({a['base']['name_or_path']} vs "
                     f"{b['base']['name_or_path']})")
    if "--full-run" in cards and cards["--full-run"].get("artifact") != "model":
        p.append(f"--full-run {cfg.full_run}: that run is a {cards['--full-run']['config']['method']} adapter, "
                 "not a full fine-tune; pass it as --run")
    for d in cfg.export or []:
        try:
            found["exports"].append(_read_export(Path(d)))
        except LoraMedError as e:
            p.append(f"--export: {e}")
    return p, found


def _read_export(path: Path) -> dict:
    """An export folder's ONNX file, precision and manifest (merge-export output, or an ONNX folder)."""
    if not path.is_dir():
        raise LoraMedError(f"{path}: no such folder; give a `lora-med merge-export` output folder")
    manifest = {}
    if (path / "manifest.json").is_file():
        manifest = read_json(path / "manifest.json", "re-run lora-med merge-export")
        if manifest.get("status") != "complete":
            raise LoraMedError(f"{path}: the export is not complete (status {manifest.get('status')!r}): it did not "
                               "pass its parity gate. Re-run lora-med merge-export")
    onnx_dir = path / "onnx" if (path / "onnx").is_dir() else path
    if not (onnx_dir / "model.onnx").is_file():
        raise LoraMedError(f"{onnx_dir / 'model.onnx'}: missing; give a `lora-med merge-export` output folder")
    opts = manifest.get("options", {})
    quant = opts.get("quantize", "none")
    return {"path": str(path), "onnx_dir": str(onnx_dir), "precision": "int8" if quant == "int8" else opts.get("dtype", "fp32"),
            "device": opts.get("device", "cpu"), "source_run": manifest.get("source", {}).get("run_dir")}


# --------------------------------------------------------------------------- --paired


def _paired(cfg: BenchConfig, name: str, device: str) -> tuple[str, str, list[str], dict]:
    """Train LoRA and full on the same split, seed and token budget; merge-export both. Returns their folders.

    A quantised export that its own parity gate refuses is left out (and named in the report) rather than
    ending the run: the refusal is merge-export doing its job, and the fp32 exports still get measured.
    """
    from .export import ExportConfig, merge_export
    from .train import TrainConfig, train

    work = Path(cfg.paired_dir or Path("adapters") / f"paired-{name}")
    common = dict(data=cfg.data, eval_data=cfg.eval_data, epochs=cfg.epochs, max_steps=cfg.max_steps,
                  batch_size=cfg.train_batch_size, grad_accum=1, seed=cfg.seed, device=device, compare=True,
                  overwrite=True)
    if cfg.base:
        common["base"] = cfg.base
    runs, exports, timings, refused = {}, [], {}, []
    for method, config_file in (("lora", cfg.lora_config), ("full", cfg.full_config)):
        tcfg = load_config(TrainConfig, config_file, {**common, "method": method, "output": str(work / method)})
        t0 = time.perf_counter()
        runs[method] = str(train(tcfg).output)
        timings[f"train_{method}_s"] = round(time.perf_counter() - t0, 2)
        variants = [("cpu", "fp32", "none"), ("cpu", "fp32", "int8")]
        if device == "cuda":
            variants.append(("cuda", "fp16", "none"))
        for dev, dtype, quant in variants:
            out = work / f"export-{method}-{dev}-{'int8' if quant == 'int8' else dtype}"
            t0 = time.perf_counter()
            try:
                exports.append(str(merge_export(ExportConfig(
                    run_dir=runs[method], output=str(out), device=dev, dtype=dtype, quantize=quant,
                    min_top1=cfg.min_top1, overwrite=True)).output))
            except GateError as e:
                if quant == "none" and dtype == "fp32":
                    raise  # an fp32 export that fails parity is a real fault, not a precision trade-off
                why = [ln.strip()[2:] for ln in str(e).splitlines() if ln.strip().startswith("- ")] or [str(e)]
                refused.append(f"{out.name}: refused by its parity gate ({'; '.join(why)}); left out")
                print(f"note: {refused[-1]}")
            timings[f"export_{out.name}_s"] = round(time.perf_counter() - t0, 2)
    return runs["lora"], runs["full"], exports, {"dir": str(work), "timings": timings, "refused_exports": refused,
                                                 "lora_config": cfg.lora_config, "full_config": cfg.full_config}


# --------------------------------------------------------------------------- perplexity


def _perplexities(cfg, found, tokenizer, examples, device) -> dict:
    """Paired perplexity of base, LoRA, full and every export on the same encoded examples."""
    from .evaluate import perplexity, torch_logits_fn
    from .export import ort_logits_fn

    pad = tokenizer.pad_token_id
    cards = found["cards"]
    card = cards.get("--run") or cards.get("--full-run")
    base = models.resolve_base(cfg.base) if cfg.base else card["base"]["name_or_path"]
    todo: list[tuple[str, str, Callable[[], object]]] = [("base", base, lambda: models.load_model(base).to(device))]
    if "--run" in cards:
        if cards["--run"]["artifact"] == "adapter":
            todo.append(("lora", cfg.run, lambda: load_adapter(cards["--run"]["base"]["name_or_path"], cfg.run, device)))
        else:
            todo.append(("lora", cfg.run, lambda: models.load_model(cfg.run).to(device)))
    if "--full-run" in cards:
        todo.append(("full", cfg.full_run, lambda: models.load_model(cfg.full_run).to(device)))
    for ex in found["exports"]:
        if ex["precision"] == "fp16" and device != "cuda":
            continue
        dev = "cuda" if ex["precision"] == "fp16" else "cpu"
        todo.append((f"onnx:{Path(ex['path']).name}:{ex['precision']}", ex["path"],
                     lambda ex=ex, dev=dev: load_ort(ex["onnx_dir"], dev, thread_count(cfg))))
    out = {}
    for label, source, load in todo:
        t0 = time.perf_counter()
        model = load()
        fn = torch_logits_fn(model) if isinstance(model, torch.nn.Module) else ort_logits_fn(model)
        ppl = perplexity(fn, examples, pad, cfg.ppl_batch_size)
        out[label] = {"source": source, "assistant_ppl": ppl["assistant"]["ppl"], "all_ppl": ppl["all"]["ppl"],
                      "assistant_tokens": ppl["assistant"]["tokens"], "all_tokens": ppl["all"]["tokens"],
                      "seconds": round(time.perf_counter() - t0, 2)}
        print(f"  perplexity {label:<28} assistant {out[label]['assistant_ppl']:10.3f}   all {out[label]['all_ppl']:10.3f}")
        del model
        gc.collect()
    return out


# --------------------------------------------------------------------------- gate


def _gate(cfg: BenchConfig, latency: list[dict], ppl: dict | None, gate_backend: str | None) -> list[dict]:
    checks = []
    if cfg.max_latency_s > 0 and gate_backend:
        row = next(r for r in latency if r["backend"] == gate_backend)
        v = row["reply_s"][cfg.gate_stat]
        checks.append({"gate": "latency", "what": f"{gate_backend} {cfg.gate_stat} reply time ({cfg.new_tokens} new "
                       f"tokens)", "value": v, "limit": cfg.max_latency_s, "op": "<=", "passed": v <= cfg.max_latency_s,
                       "by": v - cfg.max_latency_s, "unit": "s"})
    if ppl:
        ratio_limit = cfg.max_ppl_ratio if cfg.max_ppl_ratio is not None else DEFAULT_MAX_PPL_RATIO
        if "lora" in ppl and "full" in ppl and ratio_limit > 0:
            v = ppl["lora"]["assistant_ppl"] / ppl["full"]["assistant_ppl"]
            checks.append({"gate": "ppl-ratio", "what": "LoRA / full fine-tune assistant perplexity", "value": v,
                           "limit": ratio_limit, "op": "<=", "passed": v <= ratio_limit, "by": v - ratio_limit, "unit": "x"})
        gain_limit = cfg.min_ppl_gain if cfg.min_ppl_gain is not None else DEFAULT_MIN_PPL_GAIN
        for tuned in ("lora", "full"):
            if tuned in ppl and gain_limit > 0:
                v = ppl["base"]["assistant_ppl"] / ppl[tuned]["assistant_ppl"]
                checks.append({"gate": "ppl-gain", "what": f"base / {tuned} assistant perplexity", "value": v,
                               "limit": gain_limit, "op": ">=", "passed": v >= gain_limit, "by": gain_limit - v, "unit": "x"})
    return checks


# --------------------------------------------------------------------------- the command


def bench(cfg: BenchConfig) -> BenchResult:
    """Measure perplexity and latency, write report.json/report.md/plots, then apply the gate.

    Returns:
        BenchResult with the report (also written to ``out_dir/report.json``).
    Raises:
        ConfigError: settings are invalid (every problem listed, before any weights load).
        LoraMedError: a run or export folder is unusable.
        GateError: a gate failed (the report is written first; the message names each failed gate and by how much).
    """
    t_start, load_start = time.perf_counter(), _loadavg()
    problems, found = _check(cfg)
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) with the bench settings; nothing was loaded:", problems)
    device = models.resolve_device(cfg.device)
    torch.set_num_threads(thread_count(cfg))
    name = cfg.name or (f"{cfg.shape}-shape-{device}" if cfg.shape else "paired" if cfg.paired
                        else Path(cfg.run or cfg.full_run or cfg.export[0]).name)
    out_dir = Path(cfg.out or models.REPO_ROOT / "benchmarks" / "results" / name)
    notes: list[str] = [cfg.note] if cfg.note else []
    paired_info = None
    if cfg.paired:
        run, full_run, exports, paired_info = _paired(cfg, name, device)
        cfg = dataclasses.replace(cfg, run=run, full_run=full_run, export=exports)
        problems, found = _check(dataclasses.replace(cfg, paired=False))
        if problems:
            raise LoraMedError("the paired runs cannot be benchmarked:", problems)
        notes += [f"export {r}" for r in paired_info["refused_exports"]]

    with tempfile.TemporaryDirectory(prefix="lora-med-bench-") as scratch:
        shape_info, model_dir, shape_exports = None, None, []
        if cfg.shape:
            print(f"Building a randomly initialised {cfg.shape} model and exporting it to ONNX ({SPEED_ONLY})")
            model_dir, shape_exports, shape_info = build_shape(cfg, Path(scratch), device)
            eos = SHAPES[cfg.shape]["eos_token_id"]
            n_positions = SHAPES[cfg.shape]["n_positions"]
            gen = torch.Generator().manual_seed(cfg.seed)
            vocab = SHAPES[cfg.shape]["vocab_size"]
            # Random token prompts of chat-like lengths (no tokenizer or data belongs to random weights).
            lengths = [(16, 24, 32, 48, 64)[i % 5] for i in range(cfg.prompts)]
            prompts = [torch.randint(0, vocab - 1, (n,), generator=gen).tolist() for n in lengths]
            stream = torch.randint(0, vocab - 1, (max(SCALING_CONTEXTS),), generator=gen).tolist()
            tokenizer, examples, prompt_source = None, None, f"{cfg.prompts} random-token prompts, lengths {lengths}"
        else:
            card = found["cards"].get("--run") or found["cards"].get("--full-run")
            from .train import held_out

            tok_dir = cfg.run or cfg.full_run
            tokenizer = models.load_tokenizer(tok_dir)
            convs = held_out(card)
            fmt, max_len = card["data"]["format"], card["data"]["max_length"]
            examples, _ = data.encode_all(convs, tokenizer, max_length=max_len, fmt=fmt)
            eos = tokenizer.eos_token_id
            from transformers import AutoConfig

            n_positions = getattr(AutoConfig.from_pretrained(card["base"]["name_or_path"]), "n_positions", 1024)
            prompts = held_out_prompts(convs, tokenizer, fmt, cfg.prompts, n_positions - max(64, cfg.new_tokens))
            stream = [t for e in examples for t in e.input_ids]
            while len(stream) < max(SCALING_CONTEXTS):
                stream = stream + stream
            prompt_source = (f"{len(prompts)} held-out conversations ({card['data']['eval']['path']}), history up to "
                             f"the last user turn, format {fmt}")

        # Contexts that fit with the largest new-token count: n_positions bounds the cache.
        room = n_positions - max(max(SCALING_NEW_TOKENS), cfg.new_tokens)
        scaling_prompts = {"base": stream[:32], "contexts": {c: stream[:c] for c in SCALING_CONTEXTS if c <= room}}
        skipped = [c for c in SCALING_CONTEXTS if c > room]
        if skipped:
            notes.append(f"scaling contexts {skipped} left out: they do not fit n_positions {n_positions} with "
                         f"{max(SCALING_NEW_TOKENS)} new tokens")

        backends, more_notes = available_backends(cfg, found, device, model_dir, shape_exports)
        notes += more_notes
        names = [b.name for b in backends]
        gate_backend = None
        if cfg.max_latency_s > 0:
            gate_backend = next((n for n in GATE_ORDER if n in names), None) if cfg.gate_backend == "auto" \
                else cfg.gate_backend
            if gate_backend not in names:
                raise ConfigError(f"--gate-backend {cfg.gate_backend}: not among the backends measured here "
                                  f"({', '.join(names) or 'none'})")
        ppl = None
        if not cfg.shape:
            print(f"Perplexity on {len(examples)} held-out conversations ({sum(e.tokens_cut > 0 for e in examples)} "
                  f"cut at max length {card['data']['max_length']}):")
            ppl = _perplexities(cfg, found, tokenizer, examples, device)

        latency = []
        print(f"Latency: {len(prompts)} prompts x {cfg.repeats} repeats, {cfg.new_tokens} new tokens, "
              f"warm-up {cfg.warmup}, {thread_count(cfg)} threads")
        for b in backends:
            row = time_backend(b, cfg, prompts, eos,
                               scaling_prompts if cfg.scaling and b.name in SCALING_BACKENDS else None)
            latency.append(row)
            print(f"  {b.name:<22} p50 {row['reply_s']['p50'] * 1000:9.1f} ms  p95 {row['reply_s']['p95'] * 1000:9.1f} ms"
                  f"  ttft {row['ttft_s']['p50'] * 1000:8.1f} ms  {row['tokens_per_s']:8.1f} tok/s")
    ref = next((r for r in latency if r["backend"] == "torch-eager"), None)
    for r in latency:
        r["speedup_vs_torch_eager"] = ref["reply_s"]["p50"] / r["reply_s"]["p50"] if ref else None

    checks = _gate(cfg, latency, ppl, gate_backend)
    report = {
        "kind": "lora-med.bench", "format_version": 1, "name": name,
        "label": SPEED_ONLY if cfg.shape else None,
        "settings": config_dict(cfg),
        "machine": {**models.device_info(device), "load_average_1m_start": load_start,
                    "load_average_1m_end": _loadavg()},
        "versions": models.library_versions(),
        "inputs": {"runs": {k: v["config"]["method"] for k, v in found["cards"].items()},
                   "exports": found["exports"], "shape": shape_info, "paired": paired_info,
                   "prompts": prompt_source, "threads": thread_count(cfg)},
        "perplexity": ppl, "latency": latency, "training": training(found["cards"]),
        "replies": replies(found["cards"]),
        "gate": {"backend": gate_backend, "checks": checks, "passed": all(c["passed"] for c in checks)},
        "notes": notes, "total_s": round(time.perf_counter() - t_start, 2),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "report.json", report)
    (out_dir / "report.md").write_text(markdown(report), encoding="utf-8")
    plots(report, out_dir)
    print(f"Report: {out_dir}/report.md")
    failed = [c for c in checks if not c["passed"]]
    if failed:
        raise GateError(f"{len(failed)} gate(s) failed (report in {out_dir}):", [gate_line(c) for c in failed])
    for c in checks:
        print(gate_line(c))
    if not checks:
        print("no gate applied (all thresholds off or not applicable)")
    return BenchResult(report, out_dir)


def _loadavg() -> float | None:
    """1-minute load average: how busy the machine was (other jobs slow a shared CPU down)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# --------------------------------------------------------------------------- CLI


@click.command("bench")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of settings; flags override it.")
@config_options(BenchConfig, aliases={"full_run": ["--full_run"], "new_tokens": ["--new_tokens"],
                                      "max_latency_s": ["--max_latency_s"], "max_ppl_ratio": ["--max_ppl_ratio"],
                                      "min_ppl_gain": ["--min_ppl_gain"], "gate_backend": ["--gate_backend"]})
def bench_command(config_file: str | None, **kwargs) -> None:
    """Held-out perplexity and reply latency of every backend, in one report, behind a gate."""
    cfg = load_config(BenchConfig, config_file, overrides_from(kwargs, BenchConfig))
    bench(cfg)
