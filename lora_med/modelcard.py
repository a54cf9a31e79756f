"""Hugging Face model cards (README.md with YAML metadata) for what lora-med writes: the adapter or fine-tuned
model of a run, and an export's merged/ and onnx/ folders. Built with ``huggingface_hub.ModelCard``, so the
hub and its tools read them as any other card.
"""

from __future__ import annotations

from pathlib import Path

from .cards import TrainCard
from .models import is_local

LIBRARY = {"adapter": "peft", "model": "transformers", "merged": "transformers", "onnx": "transformers"}
USAGE = {
    "adapter": 'from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained("{dir}")',
    "model": 'from transformers import pipeline\nchat = pipeline("text-generation", model="{dir}")\n'
    'print(chat([{{"role": "user", "content": "Hola, necesito una cita"}}], max_new_tokens=40))',
    "merged": 'from transformers import pipeline\nchat = pipeline("text-generation", model="{dir}")\n'
    'print(chat([{{"role": "user", "content": "Hola, necesito una cita"}}], max_new_tokens=40))',
    "onnx": 'from optimum.onnxruntime import ORTModelForCausalLM\nmodel = ORTModelForCausalLM.from_pretrained("{dir}")',
}


def _base_id(base: str) -> str:
    """A hub id as is; a local folder by its name (the hub's base_model field takes ids, not paths)."""
    return Path(base).name if is_local(base) or base.startswith(("/", ".")) else base


def write(folder: Path, what: str, run: TrainCard, *, extra: dict | None = None) -> Path:
    """Write ``folder/README.md`` for ``what`` ("adapter", "model", "merged" or "onnx") from a run card.

    Returns the path written.
    """
    from huggingface_hub import ModelCard, ModelCardData

    method, m = run.method, run.metrics
    train_data = run.raw["data"].get("train") or {}  # its figures, as the run recorded them
    card_data = ModelCardData(
        base_model=_base_id(run.base),
        library_name=LIBRARY[what],
        pipeline_tag="text-generation",
        language=["es"],
        tags=["lora-med", method, "conversational"] + (["onnx"] if what == "onnx" else []),
    )
    held = "eval-set (NOT held-out, see below)" if run.eval.overlap else "held-out"
    rows = [
        ("method", method),
        (f"{held} perplexity (assistant tokens)", m.get("eval_ppl")),
        (f"base model's {held} perplexity", m.get("base_eval_ppl")),
        ("train loss", m.get("train_loss")),
        ("steps", m.get("steps")),
        ("training data sha256", run.train_sha256),
        ("held-out data sha256", run.eval.sha256),
        ("seed", run.config.seed),
        (
            "evaluation overlap",
            f"{run.eval.overlap} of {run.eval.overlap_of} evaluation conversations are also training "
            "conversations (--allow-eval-overlap): the eval figures are not held-out"
            if run.eval.overlap
            else None,
        ),
    ]
    rows += list((extra or {}).items())
    table = "\n".join(f"| {k} | {f'{v:.4g}' if isinstance(v, float) else v} |" for k, v in rows if v is not None)
    body = (
        f"---\n{card_data.to_yaml()}\n---\n\n"
        f"# {folder.name}\n\n"
        f"{'LoRA adapter' if what == 'adapter' else 'Fine-tuned model'} made with lora-med "
        f"({method} on {run.base}, {train_data.get('conversations')} conversations). "
        "Prompts use DialoGPT's format: every turn followed by the EOS token (the tokenizer's chat template "
        "reproduces it).\n\n"
        f"| | |\n|---|---|\n{table}\n\n"
        f"```python\n{USAGE[what].format(dir=folder)}\n```\n"
    )
    path = folder / "README.md"
    ModelCard(body).save(path)
    return path
