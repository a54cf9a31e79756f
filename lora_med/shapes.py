"""``lora-med bench --shape``: a randomly initialised model of a real model's exact shape, exported to ONNX.

Speed only: with random weights, latency and memory are real and no quality figure is. Nothing is
downloaded: the GPT-2 config is written out here (SHAPES), the model is built locally and exported with
Optimum (fp32; dynamic int8 for the CPU; fp16 with a GPU), without the parity check that random weights
have no use for.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
import torch

from .config import BACKENDS
from .latency import SPEED_ONLY

# Model shapes for --shape: GPT-2 configs built locally with random weights (speed only).
SHAPES = {
    # microsoft/DialoGPT-medium's public config (FACTS.md): 354,823,168 parameters, tied lm_head.
    "dialogpt-medium": dict(n_layer=24, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257,
                            bos_token_id=50256, eos_token_id=50256),
    # A few-second stand-in for tests and smoke runs.
    "tiny": dict(n_layer=2, n_embd=32, n_head=2, n_positions=256, vocab_size=400, bos_token_id=0, eos_token_id=0),
}


def build_shape(name: str, work: Path, device: str, *, seed: int, backends: list[str] | None
                ) -> tuple[Path, list[dict], dict]:
    """A randomly initialised GPT-2 of shape ``name``, saved, and exported to ONNX (fp32, int8; fp16 on CUDA)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    shape = SHAPES[name]
    model_dir = work / "model"
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = GPT2LMHeadModel(GPT2Config(**shape, tie_word_embeddings=True)).eval()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir, safe_serialization=True)
    del model
    info = {"shape": name, "config": shape, "parameters": params, "build_s": round(time.perf_counter() - t0, 2)}
    wanted = set(backends or BACKENDS)
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
    """Optimum's dynamic int8 config (no calibration data, per-tensor) for this CPU's preset."""
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
