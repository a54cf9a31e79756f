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
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click
import torch

from . import data, models
from .errors import ConfigError, GateError, LoraMedError
from .options import config_options, overrides_from
from .runcard import config_dict, load_config, read_json, write_json

# Model shapes for --shape: GPT-2 configs built locally with random weights (speed only).
SHAPES = {
    # microsoft/DialoGPT-medium's public config (FACTS.md): 354,823,168 parameters, tied lm_head.
    "dialogpt-medium": dict(n_layer=24, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257,
                            bos_token_id=50256, eos_token_id=50256),
    # A few-second stand-in for tests and smoke runs.
    "tiny": dict(n_layer=2, n_embd=32, n_head=2, n_positions=256, vocab_size=400, bos_token_id=0, eos_token_id=0),
}
BACKENDS = ("torch-eager", "torch-merged", "ort-cpu-fp32", "ort-cpu-int8", "ort-cuda-fp32", "ort-cuda-fp16")
GATE_ORDER = ("ort-cuda-fp16", "ort-cpu-int8", "ort-cpu-fp32", "torch-merged", "torch-eager")  # "auto" picks the first present
SCALING_NEW_TOKENS = (8, 16, 32, 64)
SCALING_CONTEXTS = (32, 64, 128, 256, 512)
SCALING_BACKENDS = ("torch-eager", "ort-cpu-fp32", "ort-cuda-fp16")
DEFAULT_MAX_PPL_RATIO = 1.10
DEFAULT_MIN_PPL_GAIN = 1.0
SPEED_ONLY = "random weights, speed only"


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


@dataclass
class _Backend:
    """One way of serving a model: how to load it and what it is."""

    name: str
    device: str  # where the tokens are computed: cpu | cuda
    precision: str  # fp32 | fp16 | int8
    source: str  # what is loaded (for the report)
    load: Callable[[], object]


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


# --------------------------------------------------------------------------- loading


def _threads(cfg: BenchConfig) -> int:
    return cfg.threads or os.cpu_count() or 1


def _load_ort(onnx_dir: str, device: str, threads: int):
    import onnxruntime as ort

    from .export import ort_model

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    cuda = device == "cuda"
    # IO binding keeps inputs, outputs and the KV cache on the GPU between steps (without it ORT on
    # CUDA copies them every token and can be slower than PyTorch: onnxruntime#13105).
    return ort_model(onnx_dir, "CUDAExecutionProvider" if cuda else "CPUExecutionProvider", use_io_binding=cuda,
                     session_options=so)


def _load_adapter(base: str, run_dir: str, device: str):
    from peft import PeftModel

    model = PeftModel.from_pretrained(models.load_model(base), run_dir).eval()
    return model.to(device)


def _load_merged(base: str, run_dir: str, device: str):
    # merge_and_unload on a fresh copy, as merge-export does (safe_merge refuses NaN/inf).
    return _load_adapter(base, run_dir, "cpu").merge_and_unload(safe_merge=True).eval().to(device)


def _backends(cfg: BenchConfig, found: dict, device: str, model_dir: Path | None,
              shape_exports: list[dict]) -> tuple[list[_Backend], list[str]]:
    """Every backend this machine and these inputs allow, and a note for each one left out."""
    out, notes = [], []
    cards = found["cards"]
    if model_dir is not None:  # --shape
        out.append(_Backend("torch-eager", device, "fp32", f"{cfg.shape} shape ({SPEED_ONLY})",
                            lambda: models.load_model(str(model_dir)).to(device)))
    elif "--run" in cards and cards["--run"]["artifact"] == "adapter":
        base, run = cards["--run"]["base"]["name_or_path"], cfg.run
        out.append(_Backend("torch-eager", device, "fp32", f"{run} (adapter unmerged, PyTorch eager)",
                            lambda: _load_adapter(base, run, device)))
        out.append(_Backend("torch-merged", device, "fp32", f"{run} (merged in memory, PyTorch)",
                            lambda: _load_merged(base, run, device)))
    else:
        run = cfg.run or cfg.full_run
        if run:
            out.append(_Backend("torch-eager", device, "fp32", f"{run} (PyTorch eager)",
                                lambda: models.load_model(run).to(device)))
            notes.append("torch-merged: the run is a full fine-tune (nothing to merge)")
    threads = _threads(cfg)
    for ex in [*shape_exports, *found["exports"]]:
        targets = {"int8": ["cpu"], "fp16": ["cuda"], "fp32": ["cpu", "cuda"]}.get(ex["precision"], ["cpu"])
        for dev in targets:
            name = f"ort-{dev}-{ex['precision']}"
            if dev == "cuda" and device != "cuda":
                notes.append(f"{name} ({ex.get('label', ex['path'])}): no CUDA GPU")
                continue
            if any(b.name == name for b in out):
                name = f"{name}:{Path(ex['path']).name}"
            out.append(_Backend(name, dev, ex["precision"], ex.get("label", ex["path"]),
                                lambda ex=ex, dev=dev: _load_ort(ex["onnx_dir"], dev, threads)))
    if not any(b.name.startswith("ort-") for b in out):
        notes.append("ONNX Runtime backends: no export given (add --export DIR from `lora-med merge-export`)")
    if cfg.backends:
        out = [b for b in out if b.name.split(":")[0] in cfg.backends]
    return out, notes


# --------------------------------------------------------------------------- --shape


def _build_shape(cfg: BenchConfig, work: Path, device: str) -> tuple[Path, list[dict], dict]:
    """A randomly initialised GPT-2 of the shape, saved, and exported to ONNX (fp32, int8; fp16 on CUDA)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    shape = SHAPES[cfg.shape]
    model_dir = work / "model"
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    model = GPT2LMHeadModel(GPT2Config(**shape, tie_word_embeddings=True)).eval()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir, safe_serialization=True)
    del model
    info = {"shape": cfg.shape, "config": shape, "parameters": params, "build_s": round(time.perf_counter() - t0, 2)}
    wanted = set(cfg.backends or BACKENDS)
    exports = []
    if wanted & {"ort-cpu-fp32", "ort-cpu-int8", "ort-cuda-fp32"}:
        t0 = time.perf_counter()
        fp32 = _scratch_export(model_dir, work / "onnx-fp32", "cpu", "fp32")
        info["export_fp32_s"] = round(time.perf_counter() - t0, 2)
        if wanted & {"ort-cpu-fp32", "ort-cuda-fp32"}:
            exports.append(fp32)
        if "ort-cpu-int8" in wanted:
            t0 = time.perf_counter()
            exports.append(_scratch_quantize(fp32, work / "onnx-int8"))
            info["quantize_int8_s"] = round(time.perf_counter() - t0, 2)
    if device == "cuda" and "ort-cuda-fp16" in wanted:
        exports.append(_scratch_export(model_dir, work / "onnx-fp16", "cuda", "fp16"))
    return model_dir, exports, info


def _scratch_export(model_dir: Path, out: Path, device: str, dtype: str) -> dict:
    from optimum.exporters.onnx import main_export

    main_export(str(model_dir), output=str(out), task="text-generation-with-past", device=device, dtype=dtype,
                do_validation=False)  # random weights: speed only, no parity to prove
    return {"path": str(out), "onnx_dir": str(out), "precision": dtype, "device": device,
            "label": f"scratch Optimum export ({dtype}, {SPEED_ONLY})"}


def int8_preset() -> str:
    """Optimum's dynamic-int8 preset for this CPU's widest integer instructions."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    for preset, flag in (("avx512_vnni", "avx512_vnni"), ("avx512", "avx512f"), ("avx2", "avx2")):
        if flag in flags:
            return preset
    return "arm64"


def int8_config():
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    return getattr(AutoQuantizationConfig, int8_preset())(is_static=False, per_channel=False)


def _scratch_quantize(fp32: dict, out: Path) -> dict:
    from optimum.onnxruntime import ORTQuantizer

    ORTQuantizer.from_pretrained(fp32["onnx_dir"], file_name="model.onnx").quantize(
        save_dir=str(out), quantization_config=int8_config())
    # The name ORTModelForCausalLM finds without help (no external data file below 2 GB, so a rename is safe).
    os.replace(out / "model_quantized.onnx", out / "model.onnx")
    return {"path": str(out), "onnx_dir": str(out), "precision": "int8", "device": "cpu",
            "label": f"scratch dynamic int8 of the fp32 export (AutoQuantizationConfig.{int8_preset()}, {SPEED_ONLY})"}


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


# --------------------------------------------------------------------------- measuring


def _release_memory() -> None:
    """Free what the previous backend left: Python objects, then glibc's free lists (malloc_trim), so
    that its pages do not stay resident and hide the next backend's own memory."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_reset() -> str:
    """Reset the process's peak-RSS mark (Linux /proc/self/clear_refs); returns what the peak will mean."""
    _release_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return ("peak RSS during load + timing minus RSS before load (VmHWM after a /proc/self/clear_refs reset; "
                "the previous backend freed and malloc_trim'd first)")
    except OSError:
        return "growth of the process peak RSS (ru_maxrss) during load + timing; 0 when an earlier backend peaked higher"


def _rss_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


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


def _time_backend(b: _Backend, cfg: BenchConfig, prompts: list[list[int]], eos: int,
                  scaling_prompts: dict | None) -> dict:
    mem_kind = _peak_reset()
    rss0 = _rss_kib("VmRSS")
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
        peak = {"peak_memory_gb": max(0, _rss_kib("VmHWM") - rss0) * 1024 / 1e9, "peak_memory_kind": mem_kind}
    del model
    _release_memory()
    rep, first = _stats(replies), _stats(ttft)
    decode = (rep["p50"] - first["p50"]) / max(cfg.new_tokens - 1, 1)
    return {"backend": b.name, "device": b.device, "precision": b.precision, "source": b.source,
            "load_s": round(load_s, 3), "reply_s": rep, "ttft_s": first,
            "tokens_per_s": cfg.new_tokens / rep["p50"], "decode_ms_per_token": 1000 * decode, **peak,
            "scaling": scaling}


def _scaling(gen, timer, cfg: BenchConfig, sp: dict) -> dict:
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
            todo.append(("lora", cfg.run, lambda: _load_adapter(cards["--run"]["base"]["name_or_path"], cfg.run, device)))
        else:
            todo.append(("lora", cfg.run, lambda: models.load_model(cfg.run).to(device)))
    if "--full-run" in cards:
        todo.append(("full", cfg.full_run, lambda: models.load_model(cfg.full_run).to(device)))
    for ex in found["exports"]:
        if ex["precision"] == "fp16" and device != "cuda":
            continue
        dev = "cuda" if ex["precision"] == "fp16" else "cpu"
        todo.append((f"onnx:{Path(ex['path']).name}:{ex['precision']}", ex["path"],
                     lambda ex=ex, dev=dev: _load_ort(ex["onnx_dir"], dev, _threads(cfg))))
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


def _gate_line(c: dict) -> str:
    fmt = lambda x: f"{x:.4g}"  # noqa: E731
    if c["passed"]:
        return f"passed {c['gate']}: {c['what']} {fmt(c['value'])}{c['unit']} {c['op']} {fmt(c['limit'])}{c['unit']}"
    return (f"FAILED {c['gate']}: {c['what']} {fmt(c['value'])}{c['unit']}, limit {c['op']} {fmt(c['limit'])}{c['unit']} "
            f"(off by {fmt(abs(c['by']))}{c['unit']})")


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
    torch.set_num_threads(_threads(cfg))
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
            model_dir, shape_exports, shape_info = _build_shape(cfg, Path(scratch), device)
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
            prompts = _held_out_prompts(convs, tokenizer, fmt, cfg.prompts, n_positions - max(64, cfg.new_tokens))
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

        backends, more_notes = _backends(cfg, found, device, model_dir, shape_exports)
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
              f"warm-up {cfg.warmup}, {_threads(cfg)} threads")
        for b in backends:
            row = _time_backend(b, cfg, prompts, eos,
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
                   "prompts": prompt_source, "threads": _threads(cfg)},
        "perplexity": ppl, "latency": latency, "training": _training(found["cards"]),
        "replies": _replies(found["cards"]),
        "gate": {"backend": gate_backend, "checks": checks, "passed": all(c["passed"] for c in checks)},
        "notes": notes, "total_s": round(time.perf_counter() - t_start, 2),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "report.json", report)
    (out_dir / "report.md").write_text(_markdown(report), encoding="utf-8")
    _plots(report, out_dir)
    print(f"Report: {out_dir}/report.md")
    failed = [c for c in checks if not c["passed"]]
    if failed:
        raise GateError(f"{len(failed)} gate(s) failed (report in {out_dir}):", [_gate_line(c) for c in failed])
    for c in checks:
        print(_gate_line(c))
    if not checks:
        print("no gate applied (all thresholds off or not applicable)")
    return BenchResult(report, out_dir)


def _loadavg() -> float | None:
    """1-minute load average: how busy the machine was (other jobs slow a shared CPU down)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _held_out_prompts(convs, tokenizer, fmt: str, n: int, max_tokens: int) -> list[list[int]]:
    """The history before each conversation's last assistant turn, as the chat app would send it."""
    from .chat import prompt_ids

    out = []
    for conv in convs[:n]:
        last = max(i for i, m in enumerate(conv.messages) if m.role == "assistant")
        out.append(prompt_ids(list(conv.messages[:last]), tokenizer, fmt)[-max_tokens:])
    return out


def _training(cards: dict) -> dict | None:
    """Training cost of each run, from its card (paired runs: same data, seed and budget)."""
    if not cards:
        return None
    out = {}
    for flag, c in cards.items():
        m = c.get("metrics", {})
        out[c["config"]["method"]] = {
            "run": flag, "steps": m.get("steps"), "tokens_seen": m.get("tokens_seen"),
            "tokens_per_s": m.get("tokens_per_s"), "peak_memory_gb": m.get("peak_memory_gb"),
            "peak_memory_kind": m.get("peak_memory_kind"), "train_s": c.get("timings", {}).get("train_s"),
            "trainable_params": c.get("parameters", {}).get("trainable"),
            "planned_peak_gb": (c.get("plan") or {}).get("total_gb"), "device": c.get("device", {}).get("device")}
    return out


def _replies(cards: dict) -> list[dict] | None:
    """The seed guide's base vs fine-tuned replies for the fixed Spanish prompts, from the run cards."""
    by_method = {c["config"]["method"]: c.get("comparison") or [] for c in cards.values()}
    rows = next((r for r in by_method.values() if r), None)
    if not rows:
        return None
    return [{"prompt": row["prompt"], "base": row["base"],
             **{m: (r[i]["fine_tuned"] if i < len(r) else None) for m, r in by_method.items()}}
            for i, row in enumerate(rows)]


# --------------------------------------------------------------------------- report files


def _markdown(r: dict) -> str:
    label = f" ({r['label']})" if r["label"] else ""
    m, s = r["machine"], r["settings"]
    lines = [f"# lora-med bench: {r['name']}{label}", ""]
    if r["label"]:
        lines += [f"**{r['label'].capitalize()}**: randomly initialised weights of the model's exact shape; "
                  "latency and memory are real, no quality figure is.", ""]
    lines += [f"- Machine: {m['cpu']} ({m['cores']} cores, {r['inputs']['threads']} threads used)"
              + (f"; GPU {m.get('gpu')} ({m.get('vram_gb')} GB), driver {m.get('driver')}, CUDA {m.get('cuda')}"
                 if m.get("gpu") else "; no GPU"),
              f"- Load average (1 min) at start / end: {m.get('load_average_1m_start')} / "
              f"{m.get('load_average_1m_end')} on {m['cores']} cores",
              f"- Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
              f"- Prompts: {r['inputs']['prompts']}",
              f"- Settings: {s['new_tokens']} new tokens (forced), {s['repeats']} repeats, warm-up {s['warmup']}, greedy",
              ""]
    if r["perplexity"]:
        lines += ["## Held-out perplexity (paired: same conversations, format and max length)", "",
                  "| model | assistant ppl | all-token ppl | assistant tokens |", "|---|---:|---:|---:|"]
        for k, v in r["perplexity"].items():
            lines.append(f"| {k} | {v['assistant_ppl']:.3f} | {v['all_ppl']:.3f} | {v['assistant_tokens']} |")
        lines.append("")
    lines += [f"## Reply latency{label}", "",
              "| backend | device | precision | p50 ms | p95 ms | p99 ms | TTFT p50 ms | decode ms/token | tokens/s | "
              "peak mem GB | speedup vs torch-eager |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["latency"]:
        rs, sp = x["reply_s"], x["speedup_vs_torch_eager"]
        lines.append(f"| {x['backend']} | {x['device']} | {x['precision']} | {rs['p50'] * 1e3:.1f} | {rs['p95'] * 1e3:.1f} | "
                     f"{rs['p99'] * 1e3:.1f} | {x['ttft_s']['p50'] * 1e3:.1f} | {x['decode_ms_per_token']:.2f} | "
                     f"{x['tokens_per_s']:.1f} | {x['peak_memory_gb']:.3f} | {f'{sp:.2f}x' if sp else '-'} |")
    if r["latency"]:
        lines += ["", f"Peak memory: {r['latency'][0]['peak_memory_kind']}."]
    scaled = [x for x in r["latency"] if x["scaling"]]
    if scaled:
        sc0 = scaled[0]["scaling"]
        lines += ["", f"## Scaling{label}", "",
                  f"Reply time (ms, median) vs new tokens, {sc0['prompt_tokens']}-token prompt:", "",
                  "| backend | " + " | ".join(str(n) for n in sc0["new_tokens_s"]) + " | ms/new token | linear R² |",
                  "|---|" + "---:|" * (len(sc0["new_tokens_s"]) + 2)]
        for x in scaled:
            sc = x["scaling"]
            lines.append(f"| {x['backend']} | " + " | ".join(f"{v * 1e3:.1f}" for v in sc["new_tokens_s"].values())
                         + f" | {sc['ms_per_new_token']:.2f} | {sc['linear_r2']:.4f} |")
        lines += ["", f"Reply time (ms, median) vs context tokens, {sc0['context_new_tokens']} new tokens:", "",
                  "| backend | " + " | ".join(str(c) for c in sc0["context_s"]) + " |",
                  "|---|" + "---:|" * len(sc0["context_s"])]
        for x in scaled:
            lines.append(f"| {x['backend']} | " + " | ".join(f"{v * 1e3:.1f}" for v in x["scaling"]["context_s"].values()) + " |")
    if r["training"]:
        lines += ["", "## Training (from the run cards)", "",
                  "| method | steps | tokens seen | tokens/s | peak memory GB | train s | trainable params |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for k, v in r["training"].items():
            f = lambda x, d=1: "-" if x is None else (f"{x:,.{d}f}" if isinstance(x, float) else f"{x:,}")  # noqa: E731
            lines.append(f"| {k} | {f(v['steps'])} | {f(v['tokens_seen'])} | {f(v['tokens_per_s'])} | "
                         f"{f(v['peak_memory_gb'], 3)} | {f(v['train_s'])} | {f(v['trainable_params'])} |")
    if r.get("replies"):
        methods = [k for k in r["replies"][0] if k not in ("prompt", "base")]
        lines += ["", "## Replies (greedy, the fixed Spanish prompts, from the run cards)", ""]
        for row in r["replies"]:
            lines += [f"**USUARIO:** {row['prompt']}", "", f"- base: {row['base']}"]
            lines += [f"- {m}: {row[m]}" for m in methods] + [""]
    lines += ["", "## Gate", ""]
    lines += [f"- {_gate_line(c)}" for c in r["gate"]["checks"]] or ["- no gate applied"]
    if r["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def _plots(r: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suffix = f"\n({r['label']})" if r["label"] else ""
    if r["latency"]:
        fig, ax = plt.subplots(figsize=(7, 3.8))
        names = [x["backend"] for x in r["latency"]]
        p50 = [x["reply_s"]["p50"] * 1e3 for x in r["latency"]]
        p95 = [x["reply_s"]["p95"] * 1e3 for x in r["latency"]]
        ax.bar(names, p50, label="p50")
        ax.errorbar(names, p50, yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p95)]], fmt="none", ecolor="k",
                    capsize=4, label="to p95")
        ax.set_ylabel(f"reply time, ms ({r['settings']['new_tokens']} new tokens)")
        ax.set_title(f"Reply latency per backend: {r['name']}{suffix}", fontsize=9)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "latency.png", dpi=100)
        plt.close(fig)
    if r["perplexity"]:
        fig, ax = plt.subplots(figsize=(7, 3.8))
        labels = list(r["perplexity"])
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], [v["assistant_ppl"] for v in r["perplexity"].values()], 0.4, label="assistant tokens")
        ax.bar([x + 0.2 for x in xs], [v["all_ppl"] for v in r["perplexity"].values()], 0.4, label="all tokens")
        ax.set_xticks(list(xs), labels, rotation=20, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(f"Held-out perplexity: {r['name']}", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "perplexity.png", dpi=100)
        plt.close(fig)
    scaled = [x for x in r["latency"] if x["scaling"]]
    if scaled:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.8))
        for x in scaled:
            sc = x["scaling"]
            a1.plot([int(k) for k in sc["new_tokens_s"]], [v * 1e3 for v in sc["new_tokens_s"].values()], "o-",
                    label=x["backend"])
            a2.plot([int(k) for k in sc["context_s"]], [v * 1e3 for v in sc["context_s"].values()], "o-",
                    label=x["backend"])
        a1.set_xlabel("new tokens")
        a2.set_xlabel(f"context tokens ({scaled[0]['scaling']['context_new_tokens']} new)")
        a2.set_xscale("log", base=2)
        for a in (a1, a2):
            a.set_ylabel("reply time, ms")
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        fig.suptitle(f"Scaling: {r['name']}{suffix}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=100)
        plt.close(fig)


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
