"""Reply latency of one backend at a time: load it, warm up, time greedy replies, free it (``lora-med bench``).

bench.py decides what to measure and assembles the report; this module does the measuring. Every reply is
exactly ``new_tokens`` long (min = max new tokens, so an early EOS cannot make one backend look faster),
the GPU is synchronised around every timed call, and each backend is freed (down to glibc's free lists)
before the next loads, so its peak memory is its own. The backend loaders live here too; the perplexity
pass in bench.py loads its models through them.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import models
from .errors import LoraMedError
from .ort import load_ort
# Scaling table: reply time against new tokens (32-token prompt) and against context length, for one backend
# of each kind (PyTorch, ORT CPU, ORT CUDA).
SCALING_NEW_TOKENS = (8, 16, 32, 64)
SCALING_CONTEXTS = (32, 64, 128, 256, 512)
SCALING_BACKENDS = ("torch-eager", "ort-cpu-fp32", "ort-cuda-fp16")
# The label on everything measured with --shape's random weights: latency and memory are real, quality is not.
SPEED_ONLY = "random weights, speed only"


@dataclass(frozen=True)
class Timing:
    """How each backend is timed (from ``lora-med bench``'s settings)."""

    new_tokens: int = 32  # every reply is exactly this long
    repeats: int = 3  # timed replies per prompt
    warmup: int = 2  # untimed replies first
    scaling_repeats: int = 3  # timed replies per scaling point (median reported)
    threads: int = 1  # intra-op threads for PyTorch and ONNX Runtime


@dataclass
class Backend:
    """One way of serving a model: how to load it and what it is."""

    name: str
    device: str  # where the tokens are computed: cpu | cuda
    precision: str  # fp32 | fp16 | int8
    source: str  # what is loaded (for the report)
    load: Callable[[], object]


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


def available_backends(runs: dict[str, tuple[str, dict]], exports: list[dict], device: str, *,
                       threads: int, wanted: list[str] | None, model_dir: Path | None = None,
                       shape: str | None = None) -> tuple[list[Backend], list[str]]:
    """Every backend this machine and these inputs allow, and a note for each one left out.

    Args:
        runs: "--run" / "--full-run" -> (run folder, run card).
        exports: merge-export folders as read by bench (path, onnx_dir, precision, label).
        model_dir / shape: a random-weight model of a named shape (``--shape``) instead of runs.
    """
    out, notes = [], []
    if model_dir is not None:  # --shape
        out.append(Backend("torch-eager", device, "fp32", f"{shape} shape ({SPEED_ONLY})",
                           lambda: models.load_model(str(model_dir)).to(device)))
    elif "--run" in runs and runs["--run"][1]["artifact"] == "adapter":
        run, card = runs["--run"]
        base = card["base"]["name_or_path"]
        out.append(Backend("torch-eager", device, "fp32", f"{run} (adapter unmerged, PyTorch eager)",
                           lambda: load_adapter(base, run, device)))
        out.append(Backend("torch-merged", device, "fp32", f"{run} (merged in memory, PyTorch)",
                           lambda: _load_merged(base, run, device)))
    else:
        run = (runs.get("--run") or runs.get("--full-run") or (None,))[0]
        if run:
            out.append(Backend("torch-eager", device, "fp32", f"{run} (PyTorch eager)",
                               lambda: models.load_model(run).to(device)))
            notes.append("torch-merged: the run is a full fine-tune (nothing to merge)")
    for ex in exports:
        targets = {"int8": ["cpu"], "fp16": ["cuda"], "fp32": ["cpu", "cuda"]}.get(ex["precision"], ["cpu"])
        for dev in targets:
            name = f"ort-{dev}-{ex['precision']}"
            if dev == "cuda" and device != "cuda":
                notes.append(f"{name} ({ex.get('label', ex['path'])}): no CUDA GPU")
                continue
            if any(b.name == name for b in out):
                name = f"{name}:{Path(ex['path']).name}"
            out.append(Backend(name, dev, ex["precision"], ex.get("label", ex["path"]),
                               lambda ex=ex, dev=dev: load_ort(ex["onnx_dir"], dev, threads)))
    if not any(b.name.startswith("ort-") for b in out):
        notes.append("ONNX Runtime backends: no export given (add --export DIR from `lora-med merge-export`)")
    if wanted:
        out = [b for b in out if b.name.split(":")[0] in wanted]
    return out, notes


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


def _generate(model, ids: list[int], n: int, eos: int, device: str) -> int:
    """Greedy reply of exactly ``n`` new tokens (EOS cannot stop it). Returns how many were generated."""
    x = torch.tensor([ids], device=device)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, num_beams=1, use_cache=True, eos_token_id=eos, pad_token_id=eos)
    return out.shape[1] - len(ids)


def _stats(values: list[float]) -> dict:
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]  # noqa: E731  nearest rank
    return {"p50": statistics.median(s), "p95": pick(95), "p99": pick(99), "mean": statistics.fmean(s),
            "min": s[0], "max": s[-1], "n": len(s)}


def time_backend(b: Backend, cfg: Timing, prompts: list[list[int]], eos: int,
                 scaling_prompts: dict | None) -> dict:
    """Load one backend, warm it up, time its replies (and the scaling points), free it: one latency row."""
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
    gen = lambda ids, n: _generate(model, ids, n, eos, b.device)  # noqa: E731
    with torch.inference_mode():
        for i in range(cfg.warmup):
            gen(prompts[i % len(prompts)], cfg.new_tokens)
        replies, ttft = [], []
        for ids in prompts:
            for _ in range(cfg.repeats):
                n = [0]
                replies.append(timer(lambda: n.__setitem__(0, gen(ids, cfg.new_tokens))))
                if n[0] != cfg.new_tokens:
                    raise LoraMedError(f"{b.name} generated {n[0]} tokens instead of {cfg.new_tokens}")
                # Time to first token: a 1-token reply (prompt prefill + the first greedy step).
                ttft.append(timer(lambda: gen(ids, 1)))
        scaling = _scaling(gen, timer, cfg, scaling_prompts) if scaling_prompts else None
    if cuda:
        peak = {"peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
                "peak_memory_kind": "torch.cuda.max_memory_allocated (ORT's own CUDA arena is not counted)"}
    else:
        peak = {"peak_memory_gb": max(0, models.rss_kib("VmHWM") - rss0) * 1024 / 1e9, "peak_memory_kind": mem_kind}
    # Rebound rather than deleted: the `gen` closure above reads this name, and pyflakes takes a `del`
    # for a use before definition. Either way the last reference goes before the memory is released.
    model = None
    models.release_memory()
    rep, first = _stats(replies), _stats(ttft)
    decode = (rep["p50"] - first["p50"]) / max(cfg.new_tokens - 1, 1)
    return {"backend": b.name, "device": b.device, "precision": b.precision, "source": b.source,
            "load_s": round(load_s, 3), "reply_s": rep, "ttft_s": first,
            "tokens_per_s": cfg.new_tokens / rep["p50"], "decode_ms_per_token": 1000 * decode, **peak,
            "scaling": scaling}


def _scaling(gen, timer, cfg: Timing, sp: dict) -> dict:
    med = lambda f: statistics.median(timer(f) for _ in range(cfg.scaling_repeats))  # noqa: E731
    by_new = {n: med(lambda n=n: gen(sp["base"], n)) for n in SCALING_NEW_TOKENS}
    by_ctx = {c: med(lambda ids=ids: gen(ids, cfg.new_tokens)) for c, ids in sp["contexts"].items()}
    # Least-squares line through reply time vs new tokens: with a KV cache it is straight (R^2 near 1).
    xs, ys = list(by_new), list(by_new.values())
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    ss_res = sum((y - (my + slope * (x - mx))) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys) or 1e-30
    return {"prompt_tokens": len(sp["base"]), "new_tokens_s": by_new, "context_new_tokens": cfg.new_tokens,
            "context_s": by_ctx, "ms_per_new_token": 1000 * slope, "linear_r2": 1 - ss_res / ss_tot}


def held_out_prompts(convs, tokenizer, fmt: str, n: int, max_tokens: int) -> list[list[int]]:
    """The history before each conversation's last assistant turn, as the chat app would send it."""
    from .chat import prompt_ids

    out = []
    for conv in convs[:n]:
        last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
        out.append(prompt_ids(list(conv.messages[:last]), tokenizer, fmt)[-max_tokens:])
    return out
