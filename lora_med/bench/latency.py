"""Reply latency of one backend at a time: load it, warm up, time greedy replies, free it (``lora-med bench``).

bench.py decides what to measure and assembles the report; this module does the measuring. Every reply is
exactly ``new_tokens`` long (min = max new tokens, so an early EOS cannot make one backend look faster),
the GPU is synchronised around every timed call, and each backend is freed (down to glibc's free lists)
before the next loads, so its peak memory is its own. The backend loaders live here too; the perplexity
pass in bench.py loads its models through them.

Two kinds of backend:

- ``engine-*``: lora-med's engine (``engine.generate``) on an export's decode graph: what ``lora-med serve``
  runs, so the figure is the speed users get;
- the peers, measured on purpose with transformers' ``generate()``: PyTorch eager (fp32 with the unmerged
  adapter, merged, fp16 on CUDA as the seed's app runs it, fp16 with a static cache compiled with CUDA
  graphs) and ONNX Runtime through Optimum's ``ORTModelForCausalLM`` (``ort-*``);
- ``genai-*``: onnxruntime-genai's own generator on its model builder's graph of the same model (``genai.py``).
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import models
from ..cards import TrainCard
from ..data import prompt_ids
from ..engine import Engine, GenerationSettings, load_engine
from ..engine.ort_backend import load_ort
from ..errors import LoraMedError
from ..export.optimum import NO_CUDA_FP32
from . import concurrent, genai

# Scaling table: reply time against new tokens (32-token prompt) and against context length, for one backend
# of each kind (PyTorch, ORT through Optimum, the engine on the CPU and on CUDA).
SCALING_NEW_TOKENS = (8, 16, 32, 64)
SCALING_CONTEXTS = (32, 64, 128, 256, 512)
SCALING_BACKENDS = ("torch-eager", "ort-cpu-fp32", "ort-cuda-fp16", "engine-cpu-fp32", "engine-cuda-fp16")
THROUGHPUT_BATCHES = (1, 4, 16)  # engine backends: the same prompt this many times in one generate call
# The label on everything measured with --shape's random weights: latency and memory are real, quality is not.
SPEED_ONLY = "random weights, speed only"
# Memory bandwidth of known cards (bytes/s, vendors' figures) for the bandwidth floor of GPU rows: each decoded
# token reads every weight once, so weight bytes / bandwidth is the least a token can take. Longest name first.
CARD_BANDWIDTH = {
    "H100 PCIe": 2.0e12,
    "H100 NVL": 3.9e12,
    "H100": 3.35e12,
    "H200": 4.8e12,
    "GH200": 4.0e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB PCIe": 1.935e12,
    "A100": 1.555e12,
    "A10G": 600e9,
    "A10": 600e9,
    "L40S": 864e9,
    "L4": 300e9,
    "T4": 320e9,
    "V100": 900e9,
    "RTX 4090": 1008e9,
    "RTX 4080": 717e9,
    "RTX 4070": 504e9,
    "RTX 4060 Ti": 288e9,
    "RTX 4060": 272e9,
    "RTX 3090": 936e9,
    "RTX 3060": 360e9,
}


@dataclass(frozen=True)
class Timing:
    """How each backend is timed (from ``lora-med bench``'s settings)."""

    new_tokens: int = 32  # every reply is exactly this long
    repeats: int = 3  # timed replies per prompt
    warmup: int = 2  # untimed replies first
    scaling_repeats: int = 3  # timed replies per scaling / throughput point (median reported)
    threads: int = 1  # intra-op threads for PyTorch and ONNX Runtime
    throughput: bool = False  # engine backends: batches of THROUGHPUT_BATCHES
    concurrent: int = 0  # engine and genai backends: prompts arriving together (concurrent.py); 0: off
    system_tokens: int = 0  # the concurrent prompts' shared start (a system prompt)


@dataclass
class Backend:
    """One way of serving a model: how to load it and what it is."""

    name: str
    device: str  # where the tokens are computed: cpu | cuda
    precision: str  # fp32 | fp16 | int8
    source: str  # what is loaded (for the report)
    load: Callable[[], object]
    kind: str = "generate"  # engine: Engine.generate | generate: transformers' generate() | static-cache: + CUDA graphs
    # | genai: onnxruntime-genai's generator
    weight_bytes: int | None = None  # ONNX graphs: the weight files; PyTorch: counted from the parameters at load
    may_fail: bool = False  # a peer that may not run here (torch.compile): a failure is reported, not raised
    pad_token_id: int | None = None  # genai: what its static batches are padded with


# --------------------------------------------------------------------------- loading


def thread_count(threads: int | None) -> int:
    """Intra-op threads for PyTorch and ORT: --threads, else one per core."""
    return threads or os.cpu_count() or 1


def load_adapter(base: str, run_dir: str, device: str):
    """The base with the run's LoRA adapter on top, unmerged (PyTorch eager)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(models.load_model(base), run_dir).eval()
    return model.to(device)


def _load_merged(base: str, run_dir: str, device: str):
    # merge_and_unload on a fresh copy, as merge-export does (safe_merge refuses NaN/inf).
    return load_adapter(base, run_dir, "cpu").merge_and_unload(safe_merge=True).eval().to(device)


def _graph_bytes(folder: str | Path) -> int:
    """Bytes of an ONNX folder's graph and external weights (what a decode step streams, near enough)."""
    return sum(f.stat().st_size for f in Path(folder).glob("model.onnx*"))


def _torch_peers(
    runs: dict[str, tuple[str, TrainCard]], model_dir: Path | None, shape: str | None, device: str
) -> tuple[list[Backend], list[dict]]:
    """PyTorch peers: eager fp32 (adapter unmerged where there is one), merged, and on CUDA fp16 (generate() as the
    seed's app runs it; and with a static cache compiled with CUDA graphs). Returns (backends, skipped)."""
    out: list[Backend] = []
    skipped: list[dict] = []
    if model_dir is not None:  # --shape
        src, what = str(model_dir), f"{shape} shape ({SPEED_ONLY})"
        out.append(Backend("torch-eager", device, "fp32", what, lambda: models.load_model(src).to(device)))
        fp32 = lambda: models.load_model(src)
    elif "--run" in runs and runs["--run"][1].artifact == "adapter":
        run, card = runs["--run"]
        base = card.base
        what = f"{run} (merged in memory)"
        out.append(
            Backend(
                "torch-eager",
                device,
                "fp32",
                f"{run} (adapter unmerged, PyTorch eager)",
                lambda: load_adapter(base, run, device),
            )
        )
        out.append(
            Backend(
                "torch-merged",
                device,
                "fp32",
                f"{run} (merged in memory, PyTorch)",
                lambda: _load_merged(base, run, device),
            )
        )
        fp32 = lambda: _load_merged(base, run, "cpu")
    else:
        given = runs.get("--run") or runs.get("--full-run")
        if given is None:
            return out, skipped
        run = given[0]
        what = f"{run} (PyTorch)"
        out.append(
            Backend("torch-eager", device, "fp32", f"{run} (PyTorch eager)", lambda: models.load_model(run).to(device))
        )
        skipped.append({"backend": "torch-merged", "reason": "the run is a full fine-tune (nothing to merge)"})
        fp32 = lambda: models.load_model(run)
    if device != "cuda":
        skipped += [
            {"backend": n, "reason": "CUDA only (PyTorch fp16 on a GPU); no CUDA GPU here"}
            for n in ("torch-eager-fp16", "torch-cudagraph-fp16")
        ]
    else:
        half = lambda: fp32().half().to("cuda").eval()
        out.append(Backend("torch-eager-fp16", "cuda", "fp16", f"{what}, fp16, transformers generate()", half))
        out.append(
            Backend(
                "torch-cudagraph-fp16",
                "cuda",
                "fp16",
                f"{what}, fp16, generate() with a static cache and torch.compile(mode='reduce-overhead')",
                half,
                kind="static-cache",
                may_fail=True,
            )
        )
    return out, skipped


def available_backends(
    runs: dict[str, tuple[str, TrainCard]],
    exports: list[dict],
    device: str,
    *,
    threads: int,
    wanted: Sequence[str] | None,
    model_dir: Path | None = None,
    shape: str | None = None,
    engines: list[dict] | None = None,
    genai_graphs: list[dict] | None = None,
) -> tuple[list[Backend], list[dict]]:
    """Every backend this machine and these inputs allow, and each one left out with the reason.

    Args:
        runs: "--run" / "--full-run" -> (run folder, run card).
        exports: Optimum graphs (path, onnx_dir, precision, label), from merge-export folders or ``--shape``.
        engines: decode graphs (dir, precision, label, path of the export or shape folder they belong to).
        genai_graphs: onnxruntime-genai builder graphs (backend, dir, label, path, pad_token_id), built by bench.
        model_dir / shape: a random-weight model of a named shape (``--shape``) instead of runs.
    Returns:
        (backends, skipped): skipped entries are ``{"backend": name, "reason": why}``.
    """
    out, skipped = _torch_peers(runs, model_dir, shape, device)

    def add(b: Backend, label_path: str) -> None:
        if any(x.name == b.name for x in out):
            b.name = f"{b.name}:{Path(label_path).name}"
        out.append(b)

    for ex in exports:
        targets = {"int8": ["cpu"], "fp16": ["cuda"], "fp32": ["cpu", "cuda"]}.get(ex["precision"], ["cpu"])
        for dev in targets:
            name = f"ort-{dev}-{ex['precision']}"
            if dev == "cuda" and device != "cuda":
                skipped.append({"backend": name, "reason": f"no CUDA GPU ({ex.get('label', ex['path'])})"})
                continue
            add(
                Backend(
                    name,
                    dev,
                    ex["precision"],
                    ex.get("label", ex["path"]),
                    functools.partial(load_ort, ex["onnx_dir"], dev, threads),
                    weight_bytes=_graph_bytes(ex["onnx_dir"]),
                ),
                ex["path"],
            )
    for eng in engines or []:
        dev = "cuda" if eng["precision"] == "fp16" else "cpu"
        name = f"engine-{dev}-{eng['precision']}"
        if dev == "cuda" and device != "cuda":
            skipped.append({"backend": name, "reason": f"no CUDA GPU ({eng['label']})"})
            continue
        add(
            Backend(
                name,
                dev,
                eng["precision"],
                eng["label"],
                functools.partial(load_engine, eng["dir"], device=dev, threads=threads),
                kind="engine",
                weight_bytes=_graph_bytes(eng["dir"]),
            ),
            eng["path"],
        )
    for g in genai_graphs or []:
        add(
            Backend(
                g["backend"],
                "cuda" if "cuda" in g["backend"] else "cpu",
                g["backend"].rsplit("-", 1)[1],
                g["label"],
                functools.partial(genai.load, Path(g["dir"])),
                kind="genai",
                weight_bytes=_graph_bytes(g["dir"]),
                pad_token_id=g.get("pad_token_id"),
            ),
            g["path"],
        )
    skipped.append({"backend": "engine-cuda-fp32", "reason": f"not built: {NO_CUDA_FP32}"})
    if not exports:
        skipped.append(
            {"backend": "ort-*", "reason": "no export given (add --export DIR from `lora-med merge-export`)"}
        )
    if exports and not engines:
        skipped.append(
            {
                "backend": "engine-*",
                "reason": "the exports hold no decode graph (engine/): export them "
                "again with this lora-med (non-GPT-2 bases get none; see their manifest.json)",
            }
        )
    first: dict[str, dict] = {}
    for s in skipped:  # one line per backend name (several exports give the same reason)
        first.setdefault(s["backend"], s)
    skipped = list(first.values())
    if wanted:
        # Timed in the order asked: --backends engine-cpu-fp32,genai-cpu-fp32,... alternates the rows compared.
        out = sorted(
            (b for b in out if b.name.split(":")[0] in wanted), key=lambda b: wanted.index(b.name.split(":")[0])
        )
        skipped = [
            s
            for s in skipped
            if s["backend"] in wanted
            or s["backend"].endswith("*")
            and any(w.startswith(s["backend"][:-1]) for w in wanted)
        ]
    return out, skipped


# --------------------------------------------------------------------------- measuring


class _Timer:
    """Wall time of a call, synchronising the GPU before and after (kernels run asynchronously)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __call__(self, fn) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def _generate(model, ids: list[int], n: int, eos: int, device: str, static: bool = False) -> int:
    """A peer's greedy reply of exactly ``n`` new tokens through transformers' ``generate()`` (EOS cannot stop
    it); ``static``: with a static KV cache, whose decode step transformers compiles with
    ``torch.compile(mode="reduce-overhead")`` (CUDA graphs). Returns how many tokens were generated."""
    x = torch.tensor([ids], device=device)
    extra = {}
    if static:
        from transformers import CompileConfig

        extra = dict(
            cache_implementation="static", compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead")
        )
    out = model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        eos_token_id=eos,
        pad_token_id=eos,
        **extra,
    )
    return out.shape[1] - len(ids)


def _replier(b: Backend, model, eos: int) -> Callable[[list[int], int], int]:
    """(prompt, n) -> tokens generated, for whatever ``b`` loaded."""
    if b.kind == "engine":
        return lambda ids, n: len(model.generate([ids], GenerationSettings(max_new_tokens=n, min_new_tokens=n))[0])
    if b.kind == "genai":
        return lambda ids, n: genai.decode(model, ids, n)
    return lambda ids, n: _generate(model, ids, n, eos, b.device, static=b.kind == "static-cache")


def _stats(values: list[float]) -> dict:
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]
    return {
        "p50": statistics.median(s),
        "p95": pick(95),
        "p99": pick(99),
        "mean": statistics.fmean(s),
        "min": s[0],
        "max": s[-1],
        "n": len(s),
    }


def _weight_bytes(b: Backend, model) -> int | None:
    if b.weight_bytes is not None:
        return b.weight_bytes
    if isinstance(model, torch.nn.Module):  # tied weights are one parameter, counted once
        return sum(p.numel() * p.element_size() for p in model.parameters())
    return None


def bandwidth_floor(weight_bytes: int | None, new_tokens: int, p50_s: float) -> dict:
    """The least a reply can take on this GPU: every decoded token reads all weights once (``new_tokens`` forward
    passes: the prompt's gives the first token). ``unknown card`` when its bandwidth is not on record."""
    card = torch.cuda.get_device_name(0)
    bw = next((v for k, v in sorted(CARD_BANDWIDTH.items(), key=lambda kv: -len(kv[0])) if k in card), None)
    if bw is None or not weight_bytes:
        return {"card": card, "note": "unknown card: no bandwidth on record" if bw is None else "weight bytes unknown"}
    per_token = weight_bytes / bw
    return {
        "card": card,
        "bandwidth_gb_s": bw / 1e9,
        "weight_gb": weight_bytes / 1e9,
        "ms_per_token": 1e3 * per_token,
        "reply_ms": 1e3 * per_token * new_tokens,
        "x_floor": p50_s / (per_token * new_tokens),
    }


def time_backend(b: Backend, cfg: Timing, prompts: list[list[int]], eos: int, scaling_prompts: dict | None) -> dict:
    """Load one backend, warm it up, time its replies (and the scaling points, and for the engine the batch
    throughput), free it: one latency row."""
    mem_kind = models.reset_peak_rss()
    rss0 = models.rss_kib("VmRSS")
    cuda = b.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = b.load()
    load_s = time.perf_counter() - t0
    timer = _Timer(cuda)
    try:
        with torch.inference_mode():
            replies, ttft, scaling, throughput = _measure(b, model, timer, cfg, prompts, eos, scaling_prompts)
            together = None
            if cfg.concurrent and b.kind in ("engine", "genai"):
                together = concurrent.measure(
                    b.kind,
                    model,
                    timer,
                    prompts,
                    cfg.concurrent,
                    cfg.new_tokens,
                    cfg.scaling_repeats,
                    b.pad_token_id,
                    cfg.system_tokens,
                )
        weights = _weight_bytes(b, model)
        if cuda:
            peak = {
                "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
                "peak_memory_kind": "torch.cuda.max_memory_allocated (ORT's own CUDA arena is not counted)",
            }
        else:
            peak = {"peak_memory_gb": max(0, models.rss_kib("VmHWM") - rss0) * 1024 / 1e9, "peak_memory_kind": mem_kind}
    finally:
        if isinstance(model, Engine):
            model.close()
        del model  # the last reference goes before the memory is released
        models.release_memory()
    rep, first = _stats(replies), _stats(ttft)
    decode = (rep["p50"] - first["p50"]) / max(cfg.new_tokens - 1, 1)
    return {
        "backend": b.name,
        "kind": b.kind,
        "device": b.device,
        "precision": b.precision,
        "source": b.source,
        "load_s": round(load_s, 3),
        "reply_s": rep,
        "ttft_s": first,
        "tokens_per_s": cfg.new_tokens / rep["p50"],
        "decode_ms_per_token": 1000 * decode,
        **peak,
        "weight_bytes": weights,
        "bandwidth_floor": bandwidth_floor(weights, cfg.new_tokens, rep["p50"]) if cuda else None,
        "scaling": scaling,
        "throughput": throughput,
        "concurrent": together,
    }


def _measure(
    b: Backend,
    model: object,
    timer: _Timer,
    cfg: Timing,
    prompts: list[list[int]],
    eos: int,
    scaling_prompts: dict | None,
) -> tuple[list[float], list[float], dict | None, dict | None]:
    """Warm-up, then the timed replies, times to first token, scaling points and (engine) batch throughput."""
    gen = _replier(b, model, eos)
    for i in range(cfg.warmup):
        gen(prompts[i % len(prompts)], cfg.new_tokens)
    replies, ttft = [], []
    for ids in prompts:
        for _ in range(cfg.repeats):
            n = [0]
            replies.append(timer(lambda n=n, ids=ids: n.__setitem__(0, gen(ids, cfg.new_tokens))))
            if n[0] != cfg.new_tokens:
                raise LoraMedError(f"{b.name} generated {n[0]} tokens instead of {cfg.new_tokens}")
            # Time to first token: a 1-token reply (prompt prefill + the first greedy step).
            ttft.append(timer(lambda ids=ids: gen(ids, 1)))
    scaling = _scaling(gen, timer, cfg, scaling_prompts) if scaling_prompts else None
    throughput = _throughput(model, timer, cfg, prompts[0]) if cfg.throughput and isinstance(model, Engine) else None
    return replies, ttft, scaling, throughput


def _throughput(engine: Engine, timer, cfg: Timing, prompt: list[int]) -> dict:
    """Tokens/s of the engine with batches of 1, 4 and 16 copies of one prompt (every row forced to
    ``new_tokens``): what the server's batching gains."""
    s = GenerationSettings(max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens)
    out = {}
    for batch in THROUGHPUT_BATCHES:
        engine.generate([prompt] * batch, s)  # warm-up: buffers for this batch size (and a CUDA graph capture)
        t = statistics.median(
            timer(lambda batch=batch: engine.generate([prompt] * batch, s)) for _ in range(cfg.scaling_repeats)
        )
        out[batch] = {"reply_s": t, "tokens_per_s": batch * cfg.new_tokens / t}
    return out


def _scaling(gen, timer, cfg: Timing, sp: dict) -> dict:
    med = lambda f: statistics.median(timer(f) for _ in range(cfg.scaling_repeats))
    by_new = {n: med(lambda n=n: gen(sp["base"], n)) for n in SCALING_NEW_TOKENS}
    by_ctx = {c: med(lambda ids=ids: gen(ids, cfg.new_tokens)) for c, ids in sp["contexts"].items()}
    # Least-squares line through reply time vs new tokens: with a KV cache it is straight (R^2 near 1).
    xs, ys = list(by_new), list(by_new.values())
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    ss_res = sum((y - (my + slope * (x - mx))) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys) or 1e-30
    return {
        "prompt_tokens": len(sp["base"]),
        "new_tokens_s": by_new,
        "context_new_tokens": cfg.new_tokens,
        "context_s": by_ctx,
        "ms_per_new_token": 1000 * slope,
        "linear_r2": 1 - ss_res / ss_tot,
    }


def held_out_prompts(convs, tokenizer, fmt: str, n: int, max_tokens: int) -> list[list[int]]:
    """The history before each conversation's last assistant turn, as the chat app would send it."""
    out = []
    for conv in convs[:n]:
        last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
        out.append(prompt_ids(list(conv.messages[:last]), tokenizer, fmt)[-max_tokens:])
    return out
