"""Merging a run into one model: PEFT's ``merge_and_unload(safe_merge=True)`` on the base in fp32, proven.

The merged model's logits must equal the unmerged adapter's on the run's held-out conversations
(atol = rtol = 1e-4), and the output layer must still be the input embedding (tied), before anything
is saved. A QLoRA adapter is merged onto the base reloaded in full precision, never into 4/8-bit weights
(merging into quantised weights changes outputs: peft#1043, #2321). A full fine-tune is already merged.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import data, models
from ..cards import TrainCard
from ..errors import GateError, LoraMedError
from ..perplexity import batches, torch_logits_fn


def _masked_logits(logits_fn, examples, pad_id: int, batch_size: int) -> list[torch.Tensor]:
    """Logits at every real (non-padding) position of each batch."""
    return [logits_fn(ids, mask)[mask.bool()] for ids, mask, _ in batches(examples, batch_size, pad_id)]


def _tied(model) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight.data_ptr() == inp.weight.data_ptr()


def merge(
    card: TrainCard,
    run_dir: Path,
    examples: list[data.Example],
    pad_id: int,
    *,
    device: str = "cpu",
    batch_size: int = 8,
    trust_remote_code: bool = False,
):
    """The run's merged fp32 model, and the merge check's figures.

    Raises:
        LoraMedError: the adapter does not fit the base, merging produced NaN/inf, or merged logits
            differ from the unmerged adapter's (atol = rtol = 1e-4).
    """
    if card.artifact == "model":
        model = models.load_model(str(run_dir), trust_remote_code=trust_remote_code).to(device)
        return model, {
            "kind": "full fine-tune: the run's model is the merged model (nothing to merge)",
            "tied_embeddings": _tied(model),
        }

    from peft import PeftModel

    base_name = card.base
    note = None
    if card.method == "qlora":
        bits = card.config.quant_bits
        note = (
            f"QLoRA: the adapter was trained on a {bits}-bit base; it is merged onto {base_name} reloaded in "
            "full precision (fp32), never into quantised weights"
        )
        print(f"      {note}")
    base = models.load_model(base_name, dtype=torch.float32, trust_remote_code=trust_remote_code).to(device)
    tie = bool(getattr(base.config, "tie_word_embeddings", False))
    before = {k: v.detach().clone() for k, v in base.state_dict().items()}
    adapter_file = run_dir / "adapter_model.safetensors"
    try:
        peft_model = PeftModel.from_pretrained(base, str(run_dir), is_trainable=False).eval()
    except (RuntimeError, ValueError, KeyError) as e:
        msg = str(e).replace("\n", " ")[:400]
        raise LoraMedError(
            f"{adapter_file}: does not fit the base {base_name} ({msg}); it belongs to a run on "
            "another base: use that run's folder, or retrain on this base"
        ) from None
    ref = _masked_logits(torch_logits_fn(peft_model), examples, pad_id, batch_size)
    try:
        model = peft_model.merge_and_unload(safe_merge=True)
    except ValueError as e:  # safe_merge refuses NaN/inf
        raise LoraMedError(
            f"{adapter_file}: merging it gives non-finite weights ({e}); the adapter is broken: "
            "retrain (lower --learning-rate)"
        ) from None
    model.eval()
    got = _masked_logits(torch_logits_fn(model), examples, pad_id, batch_size)
    diff = max(float((a - b).abs().max()) for a, b in zip(got, ref))
    close = all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(got, ref))
    after = model.state_dict()
    delta = max(float((after[k].float() - v.float()).abs().max()) for k, v in before.items() if k in after)
    figures = {
        "kind": f"{card.method} adapter merged with PEFT merge_and_unload(safe_merge=True)",
        "base": base_name,
        "base_precision": "fp32",
        "note": note,
        "max_abs_diff_vs_adapter": diff,
        "atol": 1e-4,
        "rtol": 1e-4,
        "tokens": sum(len(e.input_ids) for e in examples),
        "max_weight_delta_vs_base": delta,
        "tied_embeddings": _tied(model),
    }
    if not close:
        raise GateError(
            f"merge check failed: merged logits differ from the adapter's by {diff:.3g} "
            f"(allowed atol = rtol = 1e-4) on {len(examples)} held-out conversations; nothing was saved"
        )
    if tie and not figures["tied_embeddings"]:
        raise GateError(
            "merge check failed: lm_head is no longer tied to the input embeddings after merging; "
            "the adapter must not train lm_head or the embeddings (modules_to_save)"
        )
    return model, figures
