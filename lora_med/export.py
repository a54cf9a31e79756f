"""``lora-med merge-export``: a training run -> merged model + ONNX Runtime graph, behind a parity gate.

Steps (each printed with its timing):

1. merge: the adapter is loaded onto the base in fp32 (a QLoRA adapter too: never merged into
   4/8-bit weights) and merged with PEFT's ``merge_and_unload(safe_merge=True)``; merged logits must
   equal the unmerged adapter's logits on the run's held-out conversations. A full fine-tune is
   already a merged model.
2. save: ``merged/`` (transformers format, safetensors, tokenizer).
3. export: Optimum's ``text-generation-with-past`` export, one graph (``onnx/model.onnx``) that
   serves the first step (empty past) and the cached steps.
4. optimise / quantise: ``ORTOptimizer`` (O1..O4) and ``ORTQuantizer`` (dynamic int8, CPU only).
5. parity: our own gate, because Optimum only warns on a mismatch (FACTS.md). ONNX vs PyTorch on
   real held-out conversations: teacher-forced logits, greedy replies with the KV cache and
   batched with left padding, held-out perplexity.

Everything is built in ``<output>.partial-<pid>`` and renamed to the output name only once the
gate has passed, so the output name never holds an unverified export. ``manifest.json`` records
the source run, options, versions, every file's SHA-256 and size, the parity figures and timings.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import click
import torch

from . import chat, data, models
from .errors import ConfigError, GateError, LoraMedError
from .evaluate import batches, perplexity, torch_logits_fn
from .options import config_options, overrides_from
from .runcard import config_dict, load_config, read_json, sha256_file, write_json

DEVICES = ("cpu", "cuda")
DTYPES = ("fp32", "fp16")
OPTIMIZE = ("none", "O1", "O2", "O3", "O4")
QUANTIZE = ("none", "int8")
ONNX_FILE = "model.onnx"  # the name ORTModelForCausalLM.from_pretrained(dir) finds without help
PROTOBUF_LIMIT = 2 * 1024**3 - 1  # larger graphs keep their weights in an external data file
TOKENIZER_FILES = ("tokenizer_config.json",)


@dataclass
class ExportConfig:
    """Settings of ``lora-med merge-export`` (also the keys of its ``--config`` YAML)."""

    run_dir: str = ""  # a `lora-med train` output folder (adapter or full model); the positional RUN_DIR
    output: str | None = None  # None: exports/<run folder name>-<device>-<dtype>[-int8]
    device: str = "cpu"  # cpu | cuda (CUDAExecutionProvider with IO binding)
    dtype: str = "fp32"  # fp32 | fp16 (fp16 needs --device cuda)
    optimize: str = "none"  # none | O1 | O2 | O3 | O4 (ONNX Runtime graph optimisation; O4 = O3 + fp16, CUDA only)
    quantize: str = "none"  # none | int8 (dynamic int8 for the CPU provider)
    atol: float = 1e-4  # fp32 gate: max abs difference of teacher-forced logits, ONNX vs PyTorch
    ppl_rtol: float = 0.005  # fp32 gate: relative difference of held-out perplexity
    min_top1: float = 0.99  # fp16/int8 gate: top-1 token agreement with PyTorch fp32
    lossy_rtol: float = 0.1  # fp16/int8 gate: max abs logits difference as a share of the logits' spread
    max_new_tokens: int = 32  # greedy reply length compared with PyTorch
    n_parity: int = 8  # held-out conversations used by the merge check and the gate (fewer if the set is smaller)
    batch_size: int = 8  # conversations per forward pass in the checks
    trust_remote_code: bool = False
    overwrite: bool = False  # replace an existing export at --output

    def precision(self) -> str:
        """What the ONNX graph computes in: fp32, fp16 or int8."""
        if self.quantize == "int8":
            return "int8"
        return "fp16" if self.dtype == "fp16" or self.optimize == "O4" else "fp32"

    def output_dir(self) -> Path:
        if self.output:
            return Path(self.output)
        name = f"{Path(self.run_dir.rstrip('/')).name}-{self.device}-{self.dtype}"
        return Path("exports") / (name + ("-int8" if self.quantize == "int8" else ""))


@dataclass
class ExportResult:
    output: Path
    manifest: dict  # manifest.json


# --------------------------------------------------------------------------- validation


def _safetensors_problem(path: Path) -> str | None:
    """None if ``path`` is a whole safetensors file; else what is wrong with it and the fix."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        return (f"{path}: not a complete safetensors file ({str(e).splitlines()[0]}); the file is truncated or "
                "corrupt: copy it again from where it was trained, or retrain")
    return None


def _weights_problems(folder: Path, stem: str, what: str) -> list[str]:
    """Problems with ``folder/<stem>.safetensors`` (or its shards); pickle files are refused."""
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        p = _safetensors_problem(single)
        return [p] if p else []
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError):
            return [f"{index}: unreadable shard index; copy the {what} again"]
        out = []
        for s in shards:
            if not (folder / s).is_file():
                out.append(f"{folder / s}: missing (listed in {index.name}); copy the {what} again")
            elif p := _safetensors_problem(folder / s):
                out.append(p)
        return out
    pickled = [f for f in (f"{stem}.bin", "pytorch_model.bin") if (folder / f).is_file()]
    if pickled:
        return [f"{folder / pickled[0]}: pickle files are not loaded (they can run code); re-save as safetensors "
                f"(`model.save_pretrained(dir, safe_serialization=True)`) and remove the .bin file"]
    return [f"{single}: missing; the {what} weights are not in {folder}: copy them there, or retrain"]


def _check(cfg: ExportConfig) -> tuple[dict, str]:
    """Every problem with the settings and the run folder, raised together before any weights load.

    Returns:
        (run card, device)
    """
    from .train import load_run

    problems = []
    for name, allowed in (("device", DEVICES), ("dtype", DTYPES), ("optimize", OPTIMIZE), ("quantize", QUANTIZE)):
        if getattr(cfg, name) not in allowed:
            problems.append(f"--{name} {getattr(cfg, name)}: use one of {', '.join(allowed)}")
    if cfg.device == "cuda" and cfg.quantize == "int8":
        problems.append("--quantize int8 with --device cuda: dynamic int8 graphs (MatMulInteger / "
                        "DynamicQuantizeLinear) do not run on the CUDA execution provider; use --dtype fp16 on "
                        "CUDA, or --device cpu for int8")
    if cfg.dtype == "fp16" and cfg.device == "cpu":
        problems.append("--dtype fp16 on --device cpu: ONNX Runtime's CPU provider has few fp16 kernels; "
                        "use --dtype fp32 (or --quantize int8) on the CPU, fp16 with --device cuda")
    if cfg.optimize == "O4" and cfg.device != "cuda":
        problems.append("--optimize O4 is fp16 mixed precision for CUDA; use O1-O3 with --device cpu")
    if cfg.quantize == "int8" and cfg.dtype == "fp16":
        problems.append("--quantize int8 quantises an fp32 graph; drop --dtype fp16")
    for name in ("atol", "ppl_rtol", "lossy_rtol"):
        if not getattr(cfg, name) > 0:
            problems.append(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be > 0")
    if not 0 < cfg.min_top1 <= 1:
        problems.append(f"--min-top1 {cfg.min_top1}: must be in (0, 1]")
    for name in ("max_new_tokens", "n_parity", "batch_size"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be >= 1")
    device = "cpu"
    if cfg.device == "cuda":
        try:
            device = models.resolve_device("cuda")
        except ConfigError as e:
            problems.append(str(e))
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            problems.append("--device cuda: this onnxruntime has no CUDAExecutionProvider; install onnxruntime-gpu "
                            "(and not the plain onnxruntime package beside it)")

    if not cfg.run_dir:
        problems.append("RUN_DIR: give the folder of a `lora-med train` run (e.g. adapters/lora-gpt2-es-tiny)")
        raise ConfigError(f"{len(problems)} problem(s); nothing was loaded:", problems)
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_dir():
        problems.append(f"{run_dir}: no such folder; give the --output folder of `lora-med train`")
        raise ConfigError(f"{len(problems)} problem(s); nothing was loaded:", problems)
    try:
        card = load_run(run_dir)
    except LoraMedError as e:
        raise ConfigError(f"{len(problems) + 1} problem(s); nothing was loaded:", [*problems, str(e)]) from None

    if card.get("artifact") == "adapter":
        cfg_file = run_dir / "adapter_config.json"
        problems += _weights_problems(run_dir, "adapter_model", "adapter")
        if not cfg_file.is_file():
            problems.append(f"{cfg_file}: missing; copy the whole run folder, or retrain")
        else:
            try:
                adapter_base = json.loads(cfg_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
            except ValueError:
                problems.append(f"{cfg_file}: not valid JSON; copy it again from the run, or retrain")
                adapter_base = None
            base = card["base"]["name_or_path"]
            if adapter_base and adapter_base != base and Path(adapter_base).resolve() != Path(base).resolve():
                problems.append(f"{cfg_file}: the adapter was made for base {adapter_base!r}, but run.json names "
                                f"{base!r}; this is another run's adapter: copy the matching run folder")
        base = card["base"]["name_or_path"]
        if models.is_local(base):
            problems += _weights_problems(Path(base), "model", "base model")
        elif base.startswith(("/", ".", "~")):
            problems.append(f"{run_dir / 'run.json'}: its base {base} no longer exists; restore that folder "
                            "(the adapter is merged onto it)")
    elif card.get("artifact") == "model":
        problems += _weights_problems(run_dir, "model", "fine-tuned model")
        if not (run_dir / "config.json").is_file():
            problems.append(f"{run_dir / 'config.json'}: missing; copy the whole run folder, or retrain")
    else:
        problems.append(f"{run_dir / 'run.json'}: unknown artifact {card.get('artifact')!r}; retrain with lora-med")
    for name in TOKENIZER_FILES:
        if not (run_dir / name).is_file():
            problems.append(f"{run_dir / name}: missing; the tokenizer is saved with every run: copy the whole "
                            "run folder, or retrain")

    out = cfg.output_dir()
    if out.exists() and not cfg.overwrite:
        problems.append(f"--output {out}: already exists; choose another --output or add --overwrite")
    if problems:
        raise ConfigError(f"{len(problems)} problem(s); nothing was loaded:", problems)
    return card, device


# --------------------------------------------------------------------------- merge


def _masked_logits(logits_fn, examples, pad_id: int, batch_size: int) -> list[torch.Tensor]:
    """Logits at every real (non-padding) position of each batch."""
    return [logits_fn(ids, mask)[mask.bool()] for ids, mask, _ in batches(examples, batch_size, pad_id)]


def _tied(model) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight.data_ptr() == inp.weight.data_ptr()


def merge(card: dict, run_dir: Path, examples: list[data.Example], pad_id: int, *, device: str = "cpu",
          batch_size: int = 8, trust_remote_code: bool = False):
    """The run's merged fp32 model, and the merge check's figures.

    Raises:
        LoraMedError: the adapter does not fit the base, merging produced NaN/inf, or merged logits
            differ from the unmerged adapter's (atol = rtol = 1e-4).
    """
    if card["artifact"] == "model":
        model = models.load_model(str(run_dir), trust_remote_code=trust_remote_code).to(device)
        return model, {"kind": "full fine-tune: the run's model is the merged model (nothing to merge)",
                       "tied_embeddings": _tied(model)}

    from peft import PeftModel

    base_name = card["base"]["name_or_path"]
    method = card["config"]["method"]
    note = None
    if method == "qlora":
        bits = card["config"].get("quant_bits", 4)
        note = (f"QLoRA: the adapter was trained on a {bits}-bit base; it is merged onto {base_name} reloaded in "
                "full precision (fp32), never into quantised weights")
        print(f"      {note}")
    base = models.load_model(base_name, dtype=torch.float32, trust_remote_code=trust_remote_code).to(device)
    tie = bool(getattr(base.config, "tie_word_embeddings", False))
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    adapter_file = run_dir / "adapter_model.safetensors"
    try:
        peft_model = PeftModel.from_pretrained(base, str(run_dir), is_trainable=False).eval()
    except (RuntimeError, ValueError, KeyError) as e:
        msg = str(e).replace("\n", " ")[:400]
        raise LoraMedError(f"{adapter_file}: does not fit the base {base_name} ({msg}); it belongs to a run on "
                           "another base: use that run's folder, or retrain on this base") from None
    ref = _masked_logits(torch_logits_fn(peft_model), examples, pad_id, batch_size)
    try:
        model = peft_model.merge_and_unload(safe_merge=True)
    except ValueError as e:  # safe_merge refuses NaN/inf
        raise LoraMedError(f"{adapter_file}: merging it gives non-finite weights ({e}); the adapter is broken: "
                           "retrain (lower --learning-rate)") from None
    model.eval()
    got = _masked_logits(torch_logits_fn(model), examples, pad_id, batch_size)
    diff = max(float((a - b).abs().max()) for a, b in zip(got, ref))
    close = all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(got, ref))
    after = model.state_dict()
    delta = max(float((after[k].float() - v.float()).abs().max()) for k, v in before.items() if k in after)
    figures = {"kind": f"{method} adapter merged with PEFT merge_and_unload(safe_merge=True)",
               "base": base_name, "base_precision": "fp32", "note": note,
               "max_abs_diff_vs_adapter": diff, "atol": 1e-4, "rtol": 1e-4,
               "tokens": sum(len(e.input_ids) for e in examples), "max_weight_delta_vs_base": delta,
               "tied_embeddings": _tied(model)}
    if not close:
        raise GateError(f"merge check failed: merged logits differ from the adapter's by {diff:.3g} "
                        f"(allowed atol = rtol = 1e-4) on {len(examples)} held-out conversations; nothing was saved")
    if tie and not figures["tied_embeddings"]:
        raise GateError("merge check failed: lm_head is no longer tied to the input embeddings after merging; "
                        "the adapter must not train lm_head or the embeddings (modules_to_save)")
    return model, figures


# --------------------------------------------------------------------------- export


def _export_onnx(merged_dir: Path, onnx_dir: Path, work: Path, cfg: ExportConfig, tokenizer, step) -> dict:
    """Optimum export (+ optimisation / quantisation) of ``merged_dir`` into ``onnx_dir/model.onnx``."""
    from optimum.exporters.onnx import main_export

    raw = work / "raw"
    with step("export", "Optimum text-generation-with-past (one graph: first step and cached steps)"):
        main_export(model_name_or_path=str(merged_dir), output=raw, task="text-generation-with-past",
                    device=cfg.device, dtype="fp16" if cfg.dtype == "fp16" else None, do_validation=False,
                    trust_remote_code=cfg.trust_remote_code, library_name="transformers")
    current = raw
    info: dict = {"task": "text-generation-with-past", "file": ONNX_FILE, "export_dtype": cfg.dtype}
    if cfg.optimize != "none" or cfg.quantize != "none":
        what = " + ".join(x for x in (cfg.optimize if cfg.optimize != "none" else "",
                                      "dynamic int8" if cfg.quantize == "int8" else "") if x)
        with step("optimise/quantise", what):
            if cfg.optimize != "none":
                from optimum.onnxruntime import ORTOptimizer
                from optimum.onnxruntime.configuration import AutoOptimizationConfig

                ocfg = AutoOptimizationConfig.with_optimization_level(cfg.optimize, for_gpu=cfg.device == "cuda")
                ORTOptimizer.from_pretrained(current).optimize(ocfg, save_dir=work / "optimized")
                current = work / "optimized"
                info["optimization"] = {"level": cfg.optimize, "for_gpu": cfg.device == "cuda"}
            if cfg.quantize == "int8":
                from optimum.onnxruntime import ORTQuantizer
                from optimum.onnxruntime.configuration import AutoQuantizationConfig

                # Dynamic: weights int8 ahead of time, activations quantised per batch at run time.
                qcfg = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)
                (onnx_file,) = list(current.glob("*.onnx"))
                ORTQuantizer.from_pretrained(current, file_name=onnx_file.name).quantize(qcfg, save_dir=work / "quantized")
                current = work / "quantized"
                info["quantization"] = {"mode": "dynamic", "weights": "int8", "per_channel": True,
                                        "config": "AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True)"}
    _place(current, onnx_dir)
    tokenizer.save_pretrained(onnx_dir)
    return info


def _place(src: Path, onnx_dir: Path) -> None:
    """Move the final graph to ``onnx_dir/model.onnx`` with its configs, so that
    ``ORTModelForCausalLM.from_pretrained(onnx_dir)`` needs no file_name."""
    onnx_dir.mkdir(parents=True)
    (graph,) = list(src.glob("*.onnx"))
    for f in src.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt", ".model"):
            shutil.copy2(f, onnx_dir / f.name)
    if graph.name == ONNX_FILE:
        for f in src.iterdir():  # the graph and any external data file it names
            if f.is_file() and f.suffix not in (".json", ".txt", ".model"):
                shutil.copy2(f, onnx_dir / f.name)
        return
    import onnx

    # Renaming by hand would break a reference to external weights; onnx re-saves it whole.
    model = onnx.load(str(graph))
    big = model.ByteSize() > PROTOBUF_LIMIT
    onnx.save_model(model, str(onnx_dir / ONNX_FILE), save_as_external_data=big,
                    location=ONNX_FILE + "_data" if big else None)


def ort_model(export_dir: str | Path, provider: str | None = None, use_io_binding: bool | None = None,
              session_options=None):
    """Open an export's ONNX graph as ``ORTModelForCausalLM`` (KV cache on).

    Args:
        export_dir: a merge-export output folder (its ``onnx/`` is used) or an ``onnx/`` folder itself.
        provider: ONNX Runtime execution provider; None: CPUExecutionProvider.
        use_io_binding: None lets Optimum decide (on for CUDA).
    Raises:
        LoraMedError: no graph there, or the provider is not available in this onnxruntime.
    """
    import onnxruntime
    from optimum.onnxruntime import ORTModelForCausalLM

    d = Path(export_dir)
    onnx_dir = d / "onnx" if (d / "onnx").is_dir() else d
    if not (onnx_dir / ONNX_FILE).is_file():
        raise LoraMedError(f"{onnx_dir / ONNX_FILE}: missing; give a `lora-med merge-export` output folder")
    provider = provider or "CPUExecutionProvider"
    if provider not in onnxruntime.get_available_providers():
        raise LoraMedError(f"provider {provider} is not available (have: {', '.join(onnxruntime.get_available_providers())}); "
                           "install onnxruntime-gpu for CUDA")
    return ORTModelForCausalLM.from_pretrained(onnx_dir, provider=provider, use_io_binding=use_io_binding,
                                               use_cache=True, session_options=session_options)


def quiet_session_options():
    """SessionOptions whose idle threads do not spin: the gate alternates ORT and PyTorch calls, and
    spinning ORT threads would starve PyTorch's (10x slower on 2 cores). Timings should not use it."""
    import onnxruntime

    so = onnxruntime.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def ort_logits_fn(model):
    """(input_ids, attention_mask) -> logits for an ORTModelForCausalLM (never token_type_ids)."""

    @torch.no_grad()
    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                    use_cache=False)
        return out.logits.float().cpu()

    return fn


# --------------------------------------------------------------------------- parity gate


def _prompts(conversations: list[data.Conversation], tokenizer, fmt: str, limit: int) -> list[list[int]]:
    """Each conversation up to its last user turn, formatted as in training (the app's prompt)."""
    out = []
    for conv in conversations:
        last_user = max(i for i, m in enumerate(conv.messages) if m.role == "user")
        out.append(chat.prompt_ids(list(conv.messages[: last_user + 1]), tokenizer, fmt)[-limit:])
    return out


@torch.no_grad()
def _greedy(model, prompts: list[list[int]], tokenizer, max_new_tokens: int, device) -> tuple[list, list]:
    """Greedy continuations: one prompt at a time (KV cache), then all together left-padded."""
    from transformers.utils import logging as hf_logging

    # Prompts end with EOS, which is also the pad token: generate() would warn of "right-padding".
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return _greedy_runs(model, prompts, tokenizer, max_new_tokens, device)
    finally:
        hf_logging.set_verbosity(verbosity)


def _greedy_runs(model, prompts: list[list[int]], tokenizer, max_new_tokens: int, device) -> tuple[list, list]:
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    single = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        single.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)[0, len(p):].tolist())
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as a batched chat server pads
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kw)[:, width:]
    return single, out.tolist()


def check_parity(onnx_model, reference, tokenizer, conversations: list[data.Conversation], *, fmt: str,
                 max_length: int, cfg: ExportConfig) -> dict:
    """The parity gate: ONNX vs the merged PyTorch model (fp32) on held-out conversations.

    fp32: teacher-forced logits max abs diff <= cfg.atol, greedy replies identical (cached and
    batched with left padding), perplexity within cfg.ppl_rtol. fp16/int8: top-1 agreement >=
    cfg.min_top1 and max diff <= cfg.lossy_rtol x the logits' spread; replies and perplexity recorded.
    Always: no NaN/inf.

    Args:
        onnx_model: an ORTModelForCausalLM (e.g. from ``ort_model``), or an export / onnx folder.
    Returns:
        The figures (``passed`` True).
    Raises:
        GateError: a check failed; the message lists every failure with its figures.
    """
    if isinstance(onnx_model, (str, Path)):
        onnx_model = ort_model(onnx_model, "CUDAExecutionProvider" if cfg.device == "cuda" else None,
                               session_options=quiet_session_options())
    reference.eval()
    precision = cfg.precision()
    lossy = precision != "fp32"
    examples, _ = data.encode_all(conversations, tokenizer, max_length=max_length, fmt=fmt)
    pad = tokenizer.pad_token_id
    ref_fn, ort_fn = torch_logits_fn(reference), ort_logits_fn(onnx_model)

    max_diff, sum_diff, n_vals, nonfinite, agree, n_tok = 0.0, 0.0, 0, 0, 0, 0
    lo, hi = float("inf"), float("-inf")
    for ids, mask, _ in batches(examples, cfg.batch_size, pad):
        keep = mask.bool()
        ref, got = ref_fn(ids, mask)[keep], ort_fn(ids, mask)[keep]
        finite = torch.isfinite(got)
        nonfinite += int((~finite).sum())
        d = (got - ref).abs().where(finite, torch.tensor(float("inf")))
        max_diff = max(max_diff, float(d.max()))
        sum_diff += float(d[finite].sum())
        n_vals += int(finite.sum())
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        n_tok += int(keep.sum())
        lo, hi = min(lo, float(ref.min())), max(hi, float(ref.max()))
    top1 = agree / max(n_tok, 1)
    spread = hi - lo
    bound = cfg.lossy_rtol * spread if lossy else cfg.atol

    ppl_ref = perplexity(ref_fn, examples, pad, cfg.batch_size)["assistant"]["ppl"]
    ppl_ort = perplexity(ort_fn, examples, pad, cfg.batch_size)["assistant"]["ppl"]
    ppl_rel = abs(ppl_ort - ppl_ref) / ppl_ref

    prompts = _prompts(conversations, tokenizer, fmt, max_length)
    ref_single, ref_batch = _greedy(reference, prompts, tokenizer, cfg.max_new_tokens,
                                    next(reference.parameters()).device)
    ort_single, ort_batch = _greedy(onnx_model, prompts, tokenizer, cfg.max_new_tokens, onnx_model.device)
    same_single = sum(a == b for a, b in zip(ref_single, ort_single))
    same_batch = sum(a == b for a, b in zip(ref_batch, ort_batch))

    figures = {
        "precision": precision, "reference": "merged PyTorch model, fp32", "conversations": len(conversations),
        "tokens": n_tok, "max_abs_diff": max_diff, "mean_abs_diff": sum_diff / max(n_vals, 1),
        "bound": bound, "bound_kind": f"lossy_rtol {cfg.lossy_rtol} x logits spread" if lossy else "atol",
        "logits_spread": spread, "nonfinite": nonfinite, "top1_agreement": top1,
        "greedy": {"prompts": len(prompts), "max_new_tokens": cfg.max_new_tokens,
                   "identical_cached": same_single, "identical_batched_left_padded": same_batch},
        "perplexity": {"pytorch": ppl_ref, "onnx": ppl_ort, "rel_diff": ppl_rel},
    }
    failures = []
    if nonfinite:
        failures.append(f"{nonfinite} NaN/inf logits")
    if max_diff > bound:
        failures.append(f"teacher-forced logits max abs diff {max_diff:.3g} > {bound:.3g} ({figures['bound_kind']})")
    if lossy and top1 < cfg.min_top1:
        failures.append(f"top-1 agreement {top1:.2%} < {cfg.min_top1:.0%} ({n_tok} tokens)")
    if not lossy:
        if same_single < len(prompts):
            failures.append(f"greedy replies with the KV cache: {same_single}/{len(prompts)} identical to PyTorch")
        if same_batch < len(prompts):
            failures.append(f"greedy replies batched with left padding: {same_batch}/{len(prompts)} identical")
        if ppl_rel > cfg.ppl_rtol:
            failures.append(f"held-out perplexity {ppl_ort:.4f} vs PyTorch {ppl_ref:.4f}: {ppl_rel:.3%} apart "
                            f"(allowed {cfg.ppl_rtol:.1%})")
    figures["passed"], figures["failures"] = not failures, failures
    if failures:
        err = GateError("parity gate failed (ONNX vs PyTorch, "
                        f"{len(conversations)} held-out conversations, {precision}):", failures)
        err.figures = figures  # travel with the error to the manifest of the failed export
        raise err
    return figures


# --------------------------------------------------------------------------- manifest


def _files(root: Path, *subdirs: str) -> dict:
    out = {}
    for sub in subdirs:
        for f in sorted((root / sub).rglob("*")):
            if f.is_file():
                out[f.relative_to(root).as_posix()] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return out


def load_export(export_dir: str | Path) -> dict:
    """A finished export's manifest. Raises LoraMedError unless the folder holds a complete export."""
    d = Path(export_dir)
    manifest = read_json(d / "manifest.json", f"{d} is not a lora-med export (run `lora-med merge-export` first)")
    if manifest.get("kind") != "lora-med.export":
        raise LoraMedError(f"{d / 'manifest.json'}: not a lora-med export manifest")
    if manifest.get("status") != "complete":
        raise LoraMedError(f"{d}: the export is not complete (status {manifest.get('status')!r}); run "
                           "`lora-med merge-export` again")
    return manifest


def verify_export(export_dir: str | Path, provider: str | None = None) -> dict:
    """Run the parity gate again on an existing export (e.g. after copying it to another machine).

    Returns the figures; raises GateError as ``check_parity`` does, LoraMedError if the folder is not
    a complete export or its run folder is gone.
    """
    from .train import held_out, load_run

    d = Path(export_dir)
    manifest = load_export(d)
    cfg = ExportConfig(**{k: v for k, v in manifest["options"].items() if k in ExportConfig.__dataclass_fields__})
    card = load_run(manifest["source"]["run_dir"])
    device = models.resolve_device(cfg.device)
    reference = models.load_model(str(d / "merged"), trust_remote_code=cfg.trust_remote_code).to(device)
    tokenizer = models.load_tokenizer(str(d / "merged"), trust_remote_code=cfg.trust_remote_code)
    onnx_model = ort_model(d, provider or ("CUDAExecutionProvider" if device == "cuda" else None),
                           session_options=quiet_session_options())
    return check_parity(onnx_model, reference, tokenizer, held_out(card)[: cfg.n_parity],
                        fmt=card["data"]["format"], max_length=card["data"]["max_length"], cfg=cfg)


# --------------------------------------------------------------------------- the command


def merge_export(cfg: ExportConfig) -> ExportResult:
    """Merge ``cfg.run_dir``, export it to ONNX Runtime, prove parity, and write the output folder.

    Returns:
        ExportResult(output folder, manifest).
    Raises:
        ConfigError: settings or run folder invalid (all problems listed; nothing loaded or written).
        LoraMedError: the adapter does not fit its base, or a weight file cannot be loaded.
        GateError: the merge check or the parity gate failed (the output name is not created; a gate
            failure leaves the unverified export in ``<output>.failed`` for inspection).
    """
    from .train import held_out

    t0 = time.perf_counter()
    card, device = _check(cfg)
    run_dir, out = Path(cfg.run_dir), cfg.output_dir()
    timings: dict[str, float] = {}
    n_steps = 5 if cfg.optimize != "none" or cfg.quantize != "none" else 4
    counter = iter(range(1, n_steps + 1))

    @contextlib.contextmanager
    def step(name: str, detail: str = ""):
        print(f"[{next(counter)}/{n_steps}] {name}" + (f": {detail}" if detail else "") + " ...", flush=True)
        t = time.perf_counter()
        yield
        timings[f"{name}_s"] = round(time.perf_counter() - t, 3)
        print(f"      {name} done in {timings[f'{name}_s']:.1f}s", flush=True)

    tokenizer = models.load_tokenizer(str(run_dir), trust_remote_code=cfg.trust_remote_code)
    fmt, max_length = card["data"]["format"], card["data"]["max_length"]
    convs = held_out(card)[: cfg.n_parity]
    examples, _ = data.encode_all(convs, tokenizer, max_length=max_length, fmt=fmt)
    print(f"Run: {run_dir} ({card['config']['method']}, base {card['base']['name_or_path']}) -> {out} | "
          f"device {device} | {cfg.precision()} | optimise {cfg.optimize} | {len(convs)} held-out conversations")

    with step("merge", "fp32 base + adapter, merged logits must equal the adapter's" if card["artifact"] == "adapter"
              else "full fine-tune: nothing to merge"):
        model, merge_figures = merge(card, run_dir, examples, tokenizer.pad_token_id, device=device,
                                     batch_size=cfg.batch_size, trust_remote_code=cfg.trust_remote_code)
    if merge_figures.get("max_abs_diff_vs_adapter") is not None:
        print(f"      merged vs adapter logits: max abs diff {merge_figures['max_abs_diff_vs_adapter']:.2e} "
              f"(weights moved up to {merge_figures['max_weight_delta_vs_base']:.2e} from the base)")

    work = out.parent / f"{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        with step("save", "merged/ (safetensors + tokenizer)"):
            model.config.use_cache = True  # training turned it off; the app decodes with the cache
            model.save_pretrained(work / "merged", safe_serialization=True)
            tokenizer.save_pretrained(work / "merged")
        export_info = _export_onnx(work / "merged", work / "onnx", work / "tmp", cfg, tokenizer, step)
        shutil.rmtree(work / "tmp")
        provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
        export_info["provider"] = provider
        manifest = {
            "kind": "lora-med.export", "format_version": 1, "status": "running",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": {"run_dir": str(run_dir.resolve()), "run_json_sha256": sha256_file(run_dir / "run.json"),
                       "method": card["config"]["method"], "artifact": card["artifact"],
                       "base": card["base"]["name_or_path"], "format": fmt, "max_length": max_length},
            "options": config_dict(cfg), "output": str(out), "device": models.device_info(device),
            "versions": models.library_versions(), "merge": merge_figures, "export": export_info,
        }
        failed = None
        with step("parity", f"ONNX ({provider}) vs merged PyTorch on {len(convs)} held-out conversations"):
            onnx_model = ort_model(work / "onnx", provider, use_io_binding=True if device == "cuda" else None,
                                   session_options=quiet_session_options())
            try:
                parity = check_parity(onnx_model, model, tokenizer, convs, fmt=fmt, max_length=max_length, cfg=cfg)
            except GateError as e:
                parity, failed = getattr(e, "figures", {}), e
        manifest["parity"] = parity
        _print_parity(parity)
        if failed is not None:
            manifest["status"] = "failed"
            write_json(work / "manifest.json", manifest)
            dead = out.parent / f"{out.name}.failed"
            shutil.rmtree(dead, ignore_errors=True)
            os.replace(work, dead)
            raise GateError(f"{failed}\nNothing was written to {out}; the unverified export is kept in {dead} "
                            "for inspection") from None
        manifest["files"] = _files(work, "merged", "onnx")
        manifest["sizes"] = {sub: sum(v["bytes"] for k, v in manifest["files"].items() if k.startswith(sub + "/"))
                             for sub in ("merged", "onnx")}
        timings["total_s"] = round(time.perf_counter() - t0, 3)
        manifest["timings"] = timings
        manifest["status"] = "complete"
        write_json(work / "manifest.json", manifest)
        # Only now does the output name appear (or change): a rename, so it is never half there.
        old = None
        if out.exists():
            old = out.parent / f"{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(work, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    print(f"Saved to {out} (merged {manifest['sizes']['merged'] / 1e6:.1f} MB, onnx "
          f"{manifest['sizes']['onnx'] / 1e6:.1f} MB) in {timings['total_s']:.1f}s\n"
          f"Next: lora-med bench {out}")
    return ExportResult(out, manifest)


def _print_parity(p: dict) -> None:
    if not p:
        return
    g, ppl = p["greedy"], p["perplexity"]
    print(f"      logits: max abs diff {p['max_abs_diff']:.2e} (bound {p['bound']:.2e}) | top-1 "
          f"{p['top1_agreement']:.2%} of {p['tokens']} tokens | NaN/inf {p['nonfinite']}")
    print(f"      greedy {g['max_new_tokens']} tokens identical: cached {g['identical_cached']}/{g['prompts']}, "
          f"batched left-padded {g['identical_batched_left_padded']}/{g['prompts']}")
    print(f"      perplexity: ONNX {ppl['onnx']:.4f} vs PyTorch {ppl['pytorch']:.4f} ({ppl['rel_diff']:.4%})"
          f" -> {'PASS' if p['passed'] else 'FAIL'}")


@click.command("merge-export")
@click.argument("run_dir_arg", metavar="RUN_DIR", required=False)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of settings; flags override it.")
@config_options(ExportConfig, extra={"run_dir": dict(hidden=True)})
def merge_export_command(run_dir_arg: str | None, config_file: str | None, **kwargs) -> None:
    """Merge training run RUN_DIR and export it to ONNX Runtime with the KV cache, behind a parity gate."""
    overrides = overrides_from(kwargs, ExportConfig)
    if run_dir_arg:
        overrides["run_dir"] = run_dir_arg
    merge_export(load_config(ExportConfig, config_file, overrides))
