"""ONNX Runtime sessions for the standard (Optimum) graph of an export: ``ORTModelForCausalLM`` on the CPU or
CUDA provider, session options, and teacher-forced logits for perplexity and the parity gate.

The engine (``engine.py``) runs its own decode graph; this module serves the Optimum graph that the
design keeps for compatibility (loadable by stock ``ORTModelForCausalLM``) and that bench measures as a peer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import LoraMedError

ONNX_FILE = "model.onnx"  # the name ORTModelForCausalLM.from_pretrained(dir) finds without help


def onnx_dir_of(export_dir: str | Path) -> Path:
    """An export's onnx/ folder (or the folder itself when it holds the graph)."""
    d = Path(export_dir)
    return d / "onnx" if (d / "onnx").is_dir() else d


def ort_model(export_dir: str | Path, provider: str | None = None, use_io_binding: bool | None = None,
              session_options=None):
    """Open an export's ONNX graph as ``ORTModelForCausalLM`` (KV cache on).

    Args:
        export_dir: a merge-export output folder (its ``onnx/`` is used) or an ``onnx/`` folder itself.
        provider: ONNX Runtime execution provider; None: CPUExecutionProvider.
        use_io_binding: None lets Optimum decide (on for CUDA).
    Raises:
        LoraMedError: no graph there, a graph ONNX Runtime cannot parse, or the provider is not available.
    """
    import onnxruntime
    from optimum.onnxruntime import ORTModelForCausalLM

    onnx_dir = onnx_dir_of(export_dir)
    if not (onnx_dir / ONNX_FILE).is_file():
        raise LoraMedError(f"{onnx_dir / ONNX_FILE}: missing; give a `lora-med merge-export` output folder")
    provider = provider or "CPUExecutionProvider"
    if provider not in onnxruntime.get_available_providers():
        raise LoraMedError(f"provider {provider} is not available (have: "
                           f"{', '.join(onnxruntime.get_available_providers())}); install onnxruntime-gpu for CUDA")
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph, InvalidProtobuf, NoSuchFile

    try:
        return ORTModelForCausalLM.from_pretrained(onnx_dir, provider=provider, use_io_binding=use_io_binding,
                                                   use_cache=True, session_options=session_options)
    except (InvalidProtobuf, InvalidGraph, NoSuchFile) as e:  # a damaged graph: onnxruntime's own error types
        raise LoraMedError(f"{onnx_dir / ONNX_FILE}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]}); "
                           "the graph is damaged: export again with `lora-med merge-export`") from None


def session_options(threads: int | None = None, *, spin: bool = True):
    """SessionOptions: ``threads`` intra-op threads; ``spin=False`` keeps idle threads from spinning (the gate
    alternates ORT and PyTorch calls, and spinning ORT threads would starve PyTorch's: 10x slower on 2 cores).
    Timings keep spinning on, as a server would."""
    import onnxruntime

    so = onnxruntime.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


def quiet_session_options():
    return session_options(spin=False)


def load_ort(onnx_dir: str | Path, device: str, threads: int):
    """An ORTModelForCausalLM of an export, on the CPU or on CUDA with IO binding.

    IO binding keeps inputs, outputs and the KV cache on the GPU between steps (without it ORT on CUDA copies
    them every token and can be slower than PyTorch: onnxruntime#13105).
    """
    cuda = device == "cuda"
    return ort_model(onnx_dir, "CUDAExecutionProvider" if cuda else "CPUExecutionProvider", use_io_binding=cuda,
                     session_options=session_options(threads))


def ort_logits_fn(model):
    """(input_ids, attention_mask) -> logits for an ORTModelForCausalLM (never token_type_ids)."""

    @torch.no_grad()
    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                    use_cache=False)
        return out.logits.float().cpu()

    return fn
