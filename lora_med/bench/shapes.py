"""``lora-med bench --shape``: a randomly initialised model of a real model's exact shape, with the graphs an
export ships.

Speed only: with random weights, latency and memory are real and no quality figure is. Nothing is
downloaded: the public configs are written out here (SHAPES), the model is built locally, and its graphs are
made by the same functions merge-export calls (``export/optimum.py``): Optimum's graph (fp32; int8 and int4
by their recipes; fp16 converted from fp32, with a GPU) and the engine's decode graph (fp32, int8 and int4 for
the CPU, fp16 with a GPU), without the parity check that random weights have no use for. onnxruntime-genai's
graphs (the ``genai-*`` peers) are built by its own model builder (``genai.py``), which reads a tokenizer: a
byte-level one is written beside the random weights for it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import BACKENDS
from ..export import optimum
from .latency import SPEED_ONLY

# Model shapes for --shape: public configs built locally with random weights (speed only); the model type is
# SHAPE_TYPES' (GPT-2 where not named).
SHAPES: dict[str, dict[str, Any]] = {
    # microsoft/DialoGPT-medium's public config: 354,823,168 parameters, tied lm_head.
    "dialogpt-medium": dict(
        n_layer=24, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257, bos_token_id=50256, eos_token_id=50256
    ),
    # A few-second stand-in for tests and smoke runs.
    "tiny": dict(n_layer=2, n_embd=32, n_head=2, n_positions=256, vocab_size=400, bos_token_id=0, eos_token_id=0),
    # Qwen/Qwen2.5-0.5B's public config: 494,032,768 parameters, tied head, q/k/v biases, 2 KV heads for 14.
    "qwen2.5-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=151643,
        eos_token_id=151643,
    ),
    # meta-llama/Llama-3.2-1B's public config: 1,235,814,400 parameters, tied head, llama3 rope scaling.
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    # A few-second Llama-family stand-in for tests and smoke runs (grouped KV heads, tied head, biases).
    "tiny-qwen2": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=400,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    ),
}
SHAPE_TYPES = {"qwen2.5-0.5b": "qwen2", "llama-3.2-1b": "llama", "tiny-qwen2": "qwen2"}


def shape_config(name: str):
    """The transformers config of shape ``name``."""
    from transformers import AutoConfig

    kw = dict(SHAPES[name])
    model_type = SHAPE_TYPES.get(name, "gpt2")
    if model_type == "gpt2":
        kw["tie_word_embeddings"] = True
    return AutoConfig.for_model(model_type, **kw)


def shape_facts(name: str) -> dict:
    """vocab_size, eos_token_id and positions of shape ``name``, whatever the model type calls them."""
    s = SHAPES[name]
    return {
        "vocab_size": s["vocab_size"],
        "eos_token_id": s["eos_token_id"],
        "n_positions": s.get("n_positions") or s["max_position_embeddings"],
    }


def build_shape(
    name: str, work: Path, device: str, *, seed: int, backends: Sequence[str] | None
) -> tuple[Path, list[dict], list[dict], dict]:
    """A randomly initialised model of shape ``name``, saved, with the graphs the wanted backends need.

    Returns:
        (model folder, Optimum graphs as bench reads exports, decode graphs as bench reads engines, info)
    """
    from transformers import AutoModelForCausalLM

    shape = SHAPES[name]
    model_dir = work / "model"
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_config(shape_config(name)).eval()
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir, safe_serialization=True)
    del model
    info = {
        "shape": name,
        "model_type": SHAPE_TYPES.get(name, "gpt2"),
        "config": shape,
        "parameters": params,
        "build_s": round(time.perf_counter() - t0, 2),
    }
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
        "int4": {"ort-cpu-int4"},
        "fp16": {"ort-cuda-fp16"} if cuda else set(),
    }
    if wanted & set().union(*by_precision.values()):
        fp32 = work / "onnx-fp32"
        timed("export_fp32", lambda: optimum.export_fp32(model_dir, fp32))
        if wanted & by_precision["fp32"]:
            exports.append(_optimum(fp32, "fp32", "Optimum export"))
        for q, to in (("int8", optimum.to_int8), ("int4", optimum.to_int4)):
            if wanted & by_precision[q]:
                recipe = timed(f"quantize_{q}", lambda to=to, q=q: to(fp32, work / f"onnx-{q}"))
                exports.append(_optimum(work / f"onnx-{q}", q, f"the {q} recipe ({recipe['tool']})"))
        if wanted & by_precision["fp16"]:
            timed("convert_fp16", lambda: optimum.to_fp16(fp32, work / "onnx-fp16"))
            exports.append(_optimum(work / "onnx-fp16", "fp16", "fp16 converted from the fp32 export"))
    engines = []
    engine_backends = (
        ("fp32", "engine-cpu-fp32"),
        ("int8", "engine-cpu-int8"),
        ("int4", "engine-cpu-int4"),
        ("fp16", "engine-cuda-fp16"),
    )
    for precision, backend in engine_backends:
        if backend in wanted and (precision != "fp16" or cuda):
            out = work / f"engine-{precision}"
            section = timed(f"engine_{precision}", lambda out=out, p=precision: optimum.engine_graph(model_dir, out, p))
            if section["status"] != "built":
                raise RuntimeError(f"{name} shape: decode graph not built: {section['reason']}")  # a bug here
            engines.append(
                {
                    "dir": str(out),
                    "path": str(out),
                    "precision": precision,
                    "label": f"decode graph ({precision}, {SPEED_ONLY})",
                    "recipe": section.get("recipe"),
                }
            )
    if any(b.startswith("genai-") for b in wanted):
        write_byte_tokenizer(model_dir)
    return model_dir, exports, engines, info


def write_byte_tokenizer(model_dir: Path) -> None:
    """A byte-level BPE tokenizer with no merges in ``model_dir``: onnxruntime-genai's builder reads a tokenizer
    from the model folder, and random weights have none (the genai rows are fed token ids, never text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(model_dir)


def _optimum(folder: Path, precision: str, how: str) -> dict:
    return {
        "path": str(folder),
        "onnx_dir": str(folder),
        "precision": precision,
        "device": "cuda" if precision == "fp16" else "cpu",
        "label": f"scratch {how} ({precision}, {SPEED_ONLY})",
    }
