"""What every decode graph shares, whichever architecture wrote it: the input/output names the engine binds,
the precisions and how a built graph is written in each, and ``engine.json``, the description the engine reads.

The engine (lora_med.engine.ort_backend) knows a graph only through ``engine.json``: the KV cache's shape
(``n_layer`` x ``n_kv_head`` x ``capacity`` x ``head_dim``), the IO names below, the stop tokens and the
precision. A new architecture is a new builder module beside ``gpt2.py`` and ``llama.py`` with the same IO.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ...engine.graph_format import ENGINE_FILE, EXTERNAL_DATA_SUFFIX, GRAPH_FILE
from ...errors import ConfigError
from ...fileio import sha256_file
from ..precision import quantize_int4, quantize_int8, save_onnx

FORMAT = "lora-med-decode-graph"
FORMAT_VERSION = 1
# fp32, int8 and int4 run on the CPU; fp16 on CUDA (ONNX Runtime's CUDA GroupQueryAttention is fp16/bf16 only).
PRECISIONS = ("fp32", "fp16", "int8", "int4")

IO = {
    "input_ids": "input_ids",  # int64 [batch, seq]
    "position_ids": "position_ids",  # int64 [batch, seq]
    "seqlens_k": "seqlens_k",  # int32 [batch]: total length after this step - 1, per row
    "total_sequence_length": "total_sequence_length",  # int32 scalar: batch max of seqlens_k + 1
    "last_index": "last_index",  # int64 [batch, 1]: position in seq of each row's last real token
    "past_key": "past_key_values.{}.key",  # T [batch, kv_heads, capacity, head_dim]
    "past_value": "past_key_values.{}.value",
    "logits": "logits",  # float32 [batch, vocab]
    "present_key": "present.{}.key",  # same buffer as past_key
    "present_value": "present.{}.value",
}


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(
            f"precision={precision!r}: use one of {', '.join(PRECISIONS)} "
            "(fp32, int8 and int4 for the CPU, fp16 for CUDA)"
        )


def write_graph(model, out: Path, precision: str, recipe: dict) -> None:
    """Save ``model`` (an fp32 or fp16 ONNX graph) as ``out/model.onnx``; int8 and int4 quantise the fp32 graph
    through a scratch file first. Any graph files already in ``out`` are replaced (onnx appends external data
    to an existing file, so a stale one would double)."""
    for f in (out / GRAPH_FILE, out / (GRAPH_FILE + EXTERNAL_DATA_SUFFIX)):
        f.unlink(missing_ok=True)
    if precision not in ("int8", "int4"):
        save_onnx(model, out / GRAPH_FILE)
        return
    fp32_path = out / "model.fp32.onnx"
    save_onnx(model, fp32_path)
    try:
        quantize = quantize_int8 if precision == "int8" else quantize_int4
        recipe["quantization"] = quantize(fp32_path, out / GRAPH_FILE)
    finally:
        for f in (fp32_path, Path(str(fp32_path) + EXTERNAL_DATA_SUFFIX)):
            f.unlink(missing_ok=True)


def write_info(out: Path, *, model_dir: Path, precision: str, shape: dict, recipe: dict, t0: float) -> dict:
    """Write ``out/engine.json`` and return it: format, precision, the cache's shape, IO names, stop tokens,
    the recipe and every graph file's size and SHA-256.

    ``shape`` holds model_type, capacity, n_layer, n_head, n_kv_head, head_dim, hidden_size, vocab_size and
    eos_token_ids.
    """
    info = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "model_type": shape["model_type"],
        "precision": precision,
        "kv_dtype": "float16" if precision == "fp16" else "float32",
        "devices": ["cuda"] if precision == "fp16" else ["cpu"],
        **{
            k: shape[k] for k in ("capacity", "n_layer", "n_head", "n_kv_head", "head_dim", "hidden_size", "vocab_size")
        },
        "eos_token_id": shape["eos_token_ids"][0],
        "eos_token_ids": shape["eos_token_ids"],
        "io": IO,
        "recipe": recipe,
        "source": str(Path(model_dir).resolve()),
        "files": {
            f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for f in graph_files(out)
            if f.name != ENGINE_FILE
        },
        "build_s": round(time.perf_counter() - t0, 2),
    }
    (out / ENGINE_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return info


def graph_files(out_dir) -> list[Path]:
    """The files a decode-graph folder consists of (for manifests and copies)."""
    out = Path(out_dir)
    return [p for p in (out / GRAPH_FILE, out / (GRAPH_FILE + EXTERNAL_DATA_SUFFIX), out / ENGINE_FILE) if p.exists()]


def model_opsets():
    """The opsets every decode graph declares (ONNX 17 and the contrib domain), and the IR version onnxruntime
    >= 1.16 reads."""
    from onnx import helper

    return [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], 9


def io_values(n_layer: int, kv_shape: list, kv_type: int, vocab: int):
    """The graph's inputs and outputs (value infos), the same for every architecture."""
    from onnx import TensorProto, helper

    inputs = [
        helper.make_tensor_value_info(IO["input_ids"], TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info(IO["position_ids"], TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info(IO["seqlens_k"], TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info(IO["total_sequence_length"], TensorProto.INT32, []),
        helper.make_tensor_value_info(IO["last_index"], TensorProto.INT64, ["batch", 1]),
    ]
    outputs = [helper.make_tensor_value_info(IO["logits"], TensorProto.FLOAT, ["batch", vocab])]
    for i in range(n_layer):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(IO["past_" + kind].format(i), kv_type, kv_shape))
            outputs.append(helper.make_tensor_value_info(IO["present_" + kind].format(i), kv_type, kv_shape))
    return inputs, outputs
