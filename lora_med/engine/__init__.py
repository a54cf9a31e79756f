"""The generation engine: one token loop (:mod:`.loop`) for every reply lora-med produces, over a step backend.

Backends, one file each: ONNX Runtime on an export's decode graph (:mod:`.ort_backend`), PyTorch or
Optimum's ``ORTModelForCausalLM`` (:mod:`.torch_backend`). :func:`load_engine` is the one place that picks a
backend for a folder, so it is the only module importing every backend (they import the loop, never this).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..cards import ExportCard
from ..errors import LoraMedError
from ..integrity import export_root, verify_export
from ..models import load_model, resolve_device, stop_ids
from .graph_format import ENGINE_FILE, GRAPH_FILE
from .loop import Engine, GenerationSettings, RowSettings, StepBackend, Stream
from .ort_backend import ort_engine
from .torch_backend import torch_engine

__all__ = [
    "ENGINE_FILE",
    "GRAPH_FILE",
    "Engine",
    "GenerationSettings",
    "RowSettings",
    "StepBackend",
    "Stream",
    "load_engine",
]


def load_engine(
    path, *, device: str = "auto", threads: int | None = None, spin: bool = True, prefix_cache_mb: float = 0
) -> Engine:
    """An engine for a folder.

    Args:
        path: a decode-graph folder (``model.onnx`` + ``engine.json``, as written by
            :func:`lora_med.export.decode_graph.build_decode_graph`), run by ONNX Runtime; or a Hugging Face
            causal-LM folder (``config.json`` + ``model.safetensors``), run by PyTorch through the same loop.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        threads: intra-op threads (ONNX Runtime session, or torch for a PyTorch folder); None: library default.
        spin: ONNX Runtime only: False stops idle threads spinning (see ``engine_ort.session_options``).
        prefix_cache_mb: memory for finished replies' KV caches, so that a prompt starting with an earlier
            prompt and its reply (a conversation's next turn) prefills only the rest (``engine_prefix``); 0: off.
            The decode graph on the CPU only; elsewhere it is ignored.

    An export's ``engine/`` or ``merged/`` is first proven against the export's manifest (SHA-256 of every file,
    read once per process; ``engine.info["verified"]`` says what it cost).

    Raises:
        LoraMedError: the folder holds neither, a file differs from its export's manifest, or the device does not
            fit the graph's precision.
    """
    folder = Path(path)
    verified = None
    if root := export_root(folder):
        card = ExportCard.read(root[0], complete=False)
        if card.status == "complete":  # a failed export's graph still loads, for inspection
            verified = verify_export(root[0], card.raw, (root[1],)).as_dict()
    engine = _load(folder, device, threads, spin, prefix_cache_mb)
    if verified is not None:
        engine.info["verified"] = verified
    return engine


def _load(folder: Path, device: str, threads: int | None, spin: bool, prefix_cache_mb: float) -> Engine:
    if (folder / ENGINE_FILE).is_file():
        info = json.loads((folder / ENGINE_FILE).read_text(encoding="utf-8"))
        return ort_engine(folder, info, device=device, threads=threads, spin=spin, prefix_cache_mb=prefix_cache_mb)
    if (folder / "config.json").is_file():
        dev = _resolve(device, resolve_device)
        if threads:
            torch.set_num_threads(int(threads))
        model = load_model(str(folder)).to(dev)
        eos = stop_ids(model)
        if not eos:
            raise LoraMedError(f"{folder}/config.json has no eos_token_id; the engine needs one to end replies")
        return torch_engine(model, eos_token_id=eos)
    raise LoraMedError(
        f"{folder}: neither a decode graph ({ENGINE_FILE} + model.onnx; build one with "
        f"lora_med.export.decode_graph.build_decode_graph) nor a Hugging Face model folder (config.json + "
        f"model.safetensors)"
    )


def _resolve(device: str, resolve_device) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise LoraMedError(f"device={device!r}: use auto, cpu or cuda")
    return resolve_device(device)
