"""The engine's decode graph: a merged model written directly as one ONNX graph for token-by-token decoding.

One builder module per architecture, all with the same inputs and outputs (``common.IO``) and the same
``engine.json``, so the engine runs every one of them alike:

- :mod:`.gpt2`: GPT-2 (DialoGPT, the shipped gpt2-es-tiny);
- :mod:`.llama`: the Llama family (``llama``, ``mistral``, ``qwen2``, ``qwen3``), grouped-query attention with rotary
  positions, RMSNorm, SwiGLU, Qwen2's q/k/v biases, tied and untied heads.

Graphs are built from the weights with the ``onnx`` package, node by node (as onnxruntime-genai's model builder
does), not traced: tracing gives thousands of small nodes whose launch and host overhead, not the weights, set
the reply time. Precisions: ``fp32``, ``int8`` (the one int8 recipe) and ``int4`` (MatMulNBits) for the CPU,
``fp16`` for CUDA (see :mod:`lora_med.export.precision`).
"""

from __future__ import annotations

import json
from pathlib import Path

from ...errors import LoraMedError
from . import gpt2, llama
from .common import FORMAT, FORMAT_VERSION, IO, PRECISIONS, graph_files

__all__ = ["FORMAT", "FORMAT_VERSION", "IO", "MODEL_TYPES", "PRECISIONS", "build_decode_graph", "graph_files"]

BUILDERS = {"gpt2": gpt2.build, **dict.fromkeys(llama.MODEL_TYPES, llama.build)}
MODEL_TYPES = tuple(BUILDERS)


def build_decode_graph(model_dir, out_dir, *, precision: str = "fp32", capacity: int | None = None) -> dict:
    """Write ``out_dir/model.onnx`` (+ ``model.onnx.data`` when over ~1.8 GB) and ``out_dir/engine.json``.

    Args:
        model_dir: a merged Hugging Face model folder (config.json + model.safetensors) of a type in
            ``MODEL_TYPES``.
        out_dir: where the graph goes (created).
        precision: ``fp32``, ``int8`` or ``int4`` (CPU), ``fp16`` (CUDA).
        capacity: tokens per row the KV cache holds (prompt + reply); default GPT-2's ``n_positions``, the
            Llama family's ``max_position_embeddings`` up to 2048.

    Returns:
        The info dict also written to engine.json (shape, capacity, io names, precision, recipe, files).

    Raises:
        LoraMedError: a model type or variant the graph cannot express, a bad precision or capacity.
    """
    cfg_file = Path(model_dir) / "config.json"
    if not cfg_file.is_file():
        raise LoraMedError(f"{model_dir}: no config.json; give the merged model folder (merge-export's merged/)")
    model_type = json.loads(cfg_file.read_text(encoding="utf-8")).get("model_type")
    if model_type not in BUILDERS:
        raise LoraMedError(
            f"{model_dir}: model_type {model_type!r}; the decode graph is built for {', '.join(MODEL_TYPES)} "
            "models. Use the PyTorch engine (lora_med.engine.load_engine on the folder) or the Optimum export"
        )
    return BUILDERS[model_type](model_dir, out_dir, precision=precision, capacity=capacity)
