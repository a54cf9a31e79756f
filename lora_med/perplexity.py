"""Held-out perplexity, the same for every backend (PyTorch with or without adapter, ONNX Runtime).

Perplexity is token-weighted over the whole set: exp(sum of NLL / number of scored tokens), not a
mean of per-batch means, so batch size and padding do not change it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .data import Example

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, attention_mask) -> logits


def torch_logits_fn(model) -> LogitsFn:
    device = next(model.parameters()).device

    @torch.no_grad()
    def fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
        return out.logits.float().cpu()

    return fn


def batches(examples: list[Example], batch_size: int, pad_id: int):
    """Right-padded batches: (input_ids, attention_mask, labels) tensors."""
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for j, e in enumerate(chunk):
            n = len(e.input_ids)
            ids[j, :n] = torch.tensor(e.input_ids)
            mask[j, :n] = 1
            labels[j, :n] = torch.tensor(e.labels)
        yield ids, mask, labels


def perplexity(logits_fn: LogitsFn, examples: list[Example], pad_id: int, batch_size: int = 8) -> dict:
    """Assistant-token and all-token perplexity of ``examples``.

    Returns:
        {"assistant": {"nll": float, "tokens": int, "ppl": float}, "all": {...}}; "assistant" scores the
        labelled tokens (the assistant turns and their EOS), "all" every non-padding token but the first.
    """
    sums = {"assistant": [0.0, 0], "all": [0.0, 0]}
    for ids, mask, labels in batches(examples, batch_size, pad_id):
        logits = logits_fn(ids, mask)[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        target = ids[:, 1:]
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        for name, keep in (("assistant", labels[:, 1:] != -100), ("all", mask[:, 1:] == 1)):
            sums[name][0] += nll[keep].double().sum().item()
            sums[name][1] += int(keep.sum())
    out = {}
    for name, (total, n) in sums.items():
        mean = total / max(n, 1)
        # exp() overflows past ~709: a model that is that wrong has an infinite perplexity, not an OverflowError
        ppl = (math.exp(mean) if mean < 709 else math.inf) if n else math.nan
        out[name] = {"nll": mean, "tokens": n, "ppl": ppl}
    return out
