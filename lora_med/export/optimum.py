"""The two graphs merge-export ships, and the one recipe for each precision of each.

- ``onnx/``: Optimum's standard ``text-generation-with-past`` graph, what stock ``ORTModelForCausalLM``
  loads. Always traced in fp32 on the CPU (the graph does not depend on the device it was traced on), then
  optionally optimised (``ORTOptimizer`` O1-O4), then for int8 the project's one int8 recipe
  (:func:`lora_med.export.precision.quantize_int8`), for int4 :func:`lora_med.export.precision.quantize_int4`
  and for fp16 :func:`lora_med.export.precision.fp16_from_fp32`.
  Optimum's own fp16 export (tracing the model in half precision) gives a graph onnxruntime 1.31 refuses to
  load (LayerNormalization bound to fp16 data and an fp32 scale); the conversion of the fp32 graph types
  every node alike and is checked with ONNX's strict type inference before it is written.
- ``engine/``: the engine's decode graph (:mod:`lora_med.export.decode_graph`), built from the merged weights;
  fp32, int8 and int4 (the same recipes) for the CPU, fp16 for CUDA. GPT-2 and the Llama family (llama,
  mistral, qwen2, qwen3); other bases get the Optimum graph alone and a note saying why (their replies run on
  ``merged/`` through the engine's PyTorch backend).

merge-export and ``bench --shape`` both call these functions, so a shape benchmark measures exactly the
graphs an export ships.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path

from ..engine.graph_format import GRAPH_FILE as ONNX_FILE
from ..errors import LoraMedError
from .decode_graph import MODEL_TYPES, build_decode_graph
from .precision import check_types, fp16_from_fp32, quantize_int4, quantize_int8, save_onnx

CONFIG_SUFFIXES = (".json", ".txt", ".model")  # what ORTModelForCausalLM reads beside the graph
# Why there is no CUDA fp32 decode graph (bench reports engine-cuda-fp32 as not built with this reason).
NO_CUDA_FP32 = (
    "ONNX Runtime's CUDA GroupQueryAttention has fp16/bf16 kernels only, so the decode graph runs fp32 "
    "on the CPU and fp16 on CUDA (engine-cuda-fp16 is the CUDA engine)"
)


# --------------------------------------------------------------------------- the Optimum graph


def export_fp32(merged_dir: Path, out: Path, *, trust_remote_code: bool = False) -> dict:
    """Optimum's ``text-generation-with-past`` export of ``merged_dir`` in fp32 (one graph serving the first
    step and the cached steps) into ``out``; Optimum's validation is off: lora-med's parity gate does it."""
    from optimum.exporters.onnx import main_export

    main_export(
        model_name_or_path=str(merged_dir),
        output=out,
        task="text-generation-with-past",
        device="cpu",
        do_validation=False,
        trust_remote_code=trust_remote_code,
        library_name="transformers",
    )
    return {"task": "text-generation-with-past", "file": ONNX_FILE, "traced": "fp32 on the CPU"}


def optimise(src: Path, out: Path, level: str, *, for_gpu: bool) -> dict:
    """``ORTOptimizer`` at ``level`` (O1-O4; O4 is O3 plus fp16 for CUDA) of the graph in ``src``."""
    from optimum.onnxruntime import ORTOptimizer
    from optimum.onnxruntime.configuration import AutoOptimizationConfig

    ocfg = AutoOptimizationConfig.with_optimization_level(level, for_gpu=for_gpu)
    ORTOptimizer.from_pretrained(src).optimize(ocfg, save_dir=out)
    return {"level": level, "for_gpu": for_gpu}


def _graph_of(folder: Path) -> Path:
    graphs = list(folder.glob("*.onnx"))
    if len(graphs) != 1:
        raise LoraMedError(f"{folder}: expected one ONNX graph, found {len(graphs)}")
    return graphs[0]


def _copy_configs(src: Path, out: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and f.suffix in CONFIG_SUFFIXES:
            shutil.copy2(f, out / f.name)


def to_int8(src: Path, out: Path) -> dict:
    """The one int8 recipe on the fp32 Optimum graph in ``src``: ``out/model.onnx`` plus its configs."""
    out.mkdir(parents=True, exist_ok=True)
    recipe = quantize_int8(_graph_of(src), out / ONNX_FILE)
    _copy_configs(src, out)
    return recipe


def to_int4(src: Path, out: Path) -> dict:
    """The int4 recipe on the fp32 Optimum graph in ``src``: ``out/model.onnx`` plus its configs."""
    out.mkdir(parents=True, exist_ok=True)
    recipe = quantize_int4(_graph_of(src), out / ONNX_FILE)
    _copy_configs(src, out)
    return recipe


def to_fp16(src: Path, out: Path) -> dict:
    """fp16 of the fp32 Optimum graph in ``src`` (inputs, KV cache and logits fp16, as ORTModelForCausalLM
    expects of an fp16 export), strictly type-checked: ``out/model.onnx`` plus its configs."""
    info = fp16_from_fp32(_graph_of(src), out / ONNX_FILE)
    _copy_configs(src, out)
    return info


def check_fp16(folder: Path) -> dict:
    """ONNX's strict type check on an fp16 graph made elsewhere (ORTOptimizer's O4), before anything loads it."""
    import onnx

    check_types(onnx.load(str(_graph_of(folder))), where=str(folder))
    return {"tool": "ORTOptimizer O4 (fp16 inside the optimiser)", "checked": "onnx.shape_inference strict_mode"}


def place(src: Path, onnx_dir: Path) -> None:
    """Move the final graph to ``onnx_dir/model.onnx`` with its configs, so that
    ``ORTModelForCausalLM.from_pretrained(onnx_dir)`` needs no file_name."""
    onnx_dir.mkdir(parents=True)
    graph = _graph_of(src)
    _copy_configs(src, onnx_dir)
    if graph.name == ONNX_FILE:
        for f in src.iterdir():  # the graph and any external data file it names
            if f.is_file() and f.suffix not in CONFIG_SUFFIXES:
                shutil.copy2(f, onnx_dir / f.name)
        return
    import onnx

    # Renaming by hand would break a reference to external weights; onnx re-saves it whole.
    save_onnx(onnx.load(str(graph)), onnx_dir / ONNX_FILE)


def optimum_graph(
    merged_dir: Path,
    onnx_dir: Path,
    work: Path,
    *,
    precision: str,
    optimize: str = "none",
    for_gpu: bool = False,
    trust_remote_code: bool = False,
    step=None,
) -> dict:
    """The standard graph of an export, as merge-export makes it: fp32 export, optimisation, int8 or fp16.

    Args:
        precision: fp32, int8, int4 or fp16 (fp16 comes from ``optimize="O4"`` or from the fp32 conversion).
        step: a context-manager factory ``step(name, detail)`` that prints and times each stage (optional).
    Returns:
        What was done (for the manifest's ``export`` section).
    """

    def stage(name: str, detail: str):
        return step(name, detail) if step else contextlib.nullcontext()

    with stage("export", "Optimum text-generation-with-past, traced in fp32 (one graph: first step and cached steps)"):
        info = export_fp32(merged_dir, work / "raw", trust_remote_code=trust_remote_code)
    current = work / "raw"
    half = precision == "fp16" and optimize != "O4"
    todo = [
        x
        for x in (
            optimize if optimize != "none" else "",
            f"{precision} recipe" if precision in ("int8", "int4") else "",
            "fp16 conversion" if half else "",
        )
        if x
    ]
    if todo:
        with stage("optimise/quantise", " + ".join(todo)):
            if optimize != "none":
                info["optimization"] = optimise(current, work / "optimized", optimize, for_gpu=for_gpu)
                current = work / "optimized"
                if optimize == "O4":
                    info["fp16"] = check_fp16(current)
            if precision in ("int8", "int4"):
                info["quantization"] = (to_int8 if precision == "int8" else to_int4)(current, work / precision)
                current = work / precision
            elif half:
                info["fp16"] = to_fp16(current, work / "fp16")
                current = work / "fp16"
    place(current, onnx_dir)
    info["precision"] = precision
    return info


# --------------------------------------------------------------------------- the decode graph


def engine_device(precision: str) -> str:
    """Where a decode graph of ``precision`` runs: fp16 on CUDA, fp32, int8 and int4 on the CPU."""
    return "cuda" if precision == "fp16" else "cpu"


def engine_graph(merged_dir: Path, out: Path, precision: str, *, capacity: int | None = None) -> dict:
    """The engine's decode graph of ``merged_dir`` in ``out``, or why it was not built (never an error for a
    model the graph cannot express: the export then ships the Optimum graph only).

    Returns:
        The manifest's ``engine`` section: ``status`` "built" (with precision, device, capacity, recipe, build
        time) or "not built" (with ``reason``).
    """
    model_type = json.loads((Path(merged_dir) / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type not in MODEL_TYPES:
        return {
            "status": "not built",
            "reason": f"the decode graph is written for {', '.join(MODEL_TYPES)} models; this is a "
            f"{model_type!r} model, so the export ships the Optimum graph (onnx/) and serve runs merged/ on "
            f"PyTorch through the engine",
        }
    t0 = time.perf_counter()
    try:
        info = build_decode_graph(merged_dir, out, precision=precision, capacity=capacity)
    except LoraMedError as e:  # a variant the graph cannot express (activation, head size, rope type, ...)
        shutil.rmtree(out, ignore_errors=True)
        return {"status": "not built", "reason": str(e)}
    return {
        "status": "built",
        "path": out.name,
        "precision": precision,
        "device": engine_device(precision),
        "capacity": info["capacity"],
        "model_type": info["model_type"],
        "format": f"{info['format']} v{info['version']}",
        "recipe": info["recipe"],
        "build_s": round(time.perf_counter() - t0, 2),
    }
