"""``lora-med bench --shape``: a randomly initialised model of a real model's exact shape, with the graphs an
export ships.

Speed only: with random weights, latency and memory are real and no quality figure is. Nothing is
downloaded: the GPT-2 config is written out here (SHAPES), the model is built locally, and its graphs are
made by the same functions merge-export calls (``graphs.py``): Optimum's graph (fp32; int8 by the one
int8 recipe; fp16 converted from fp32, with a GPU) and the engine's decode graph (fp32 and int8 for the CPU,
fp16 with a GPU), without the parity check that random weights have no use for.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..config import BACKENDS
from ..export import optimum
from .latency import SPEED_ONLY

# Model shapes for --shape: GPT-2 configs built locally with random weights (speed only).
SHAPES = {
    # microsoft/DialoGPT-medium's public config: 354,823,168 parameters, tied lm_head.
    "dialogpt-medium": dict(
        n_layer=24, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257, bos_token_id=50256, eos_token_id=50256
    ),
    # A few-second stand-in for tests and smoke runs.
    "tiny": dict(n_layer=2, n_embd=32, n_head=2, n_positions=256, vocab_size=400, bos_token_id=0, eos_token_id=0),
}


def build_shape(
    name: str, work: Path, device: str, *, seed: int, backends: Sequence[str] | None
) -> tuple[Path, list[dict], list[dict], dict]:
    """A randomly initialised GPT-2 of shape ``name``, saved, with the graphs the wanted backends need.

    Returns:
        (model folder, Optimum graphs as bench reads exports, decode graphs as bench reads engines, info)
    """
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
    cuda = device == "cuda"

    def timed(key: str, fn):
        t = time.perf_counter()
        out = fn()
        info[f"{key}_s"] = round(time.perf_counter() - t, 2)
        return out

    exports = []
    by_precision = {
        "fp32": {"ort-cpu-fp32", "ort-cuda-fp32"},
        "int8": {"ort-cpu-int8"},
        "fp16": {"ort-cuda-fp16"} if cuda else set(),
    }
    if wanted & set().union(*by_precision.values()):
        fp32 = work / "onnx-fp32"
        timed("export_fp32", lambda: optimum.export_fp32(model_dir, fp32))
        if wanted & by_precision["fp32"]:
            exports.append(_optimum(fp32, "fp32", "Optimum export"))
        if wanted & by_precision["int8"]:
            recipe = timed("quantize_int8", lambda: optimum.to_int8(fp32, work / "onnx-int8"))
            exports.append(_optimum(work / "onnx-int8", "int8", f"the int8 recipe ({recipe['tool']})"))
        if wanted & by_precision["fp16"]:
            timed("convert_fp16", lambda: optimum.to_fp16(fp32, work / "onnx-fp16"))
            exports.append(_optimum(work / "onnx-fp16", "fp16", "fp16 converted from the fp32 export"))
    engines = []
    for precision, backend in (("fp32", "engine-cpu-fp32"), ("int8", "engine-cpu-int8"), ("fp16", "engine-cuda-fp16")):
        if backend in wanted and (precision != "fp16" or cuda):
            out = work / f"engine-{precision}"
            section = timed(f"engine_{precision}", lambda out=out, p=precision: optimum.engine_graph(model_dir, out, p))
            if section["status"] != "built":
                raise RuntimeError(f"{name} shape: decode graph not built: {section['reason']}")  # a GPT-2: a bug
            engines.append(
                {
                    "dir": str(out),
                    "path": str(out),
                    "precision": precision,
                    "label": f"decode graph ({precision}, {SPEED_ONLY})",
                    "recipe": section.get("recipe"),
                }
            )
    return model_dir, exports, engines, info


def _optimum(folder: Path, precision: str, how: str) -> dict:
    return {
        "path": str(folder),
        "onnx_dir": str(folder),
        "precision": precision,
        "device": "cuda" if precision == "fp16" else "cpu",
        "label": f"scratch {how} ({precision}, {SPEED_ONLY})",
    }
