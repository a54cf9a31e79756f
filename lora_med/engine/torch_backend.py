"""The engine's PyTorch backend: a Hugging Face causal LM with its KV cache (``past_key_values``), driven by the
engine's token loop (not transformers' ``generate()``).

Two uses: a PyTorch model (a run served before it is exported, the base vs fine-tuned comparison replies during
training, a LoRA run's adapter merged in memory), and an export's standard Optimum graph as
``ORTModelForCausalLM`` (the parity gate's greedy check of that graph). Its cache is one left-padded batch, so it
takes new prompts only between whole batches (``joins = False``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from .loop import Engine, Reuse


class _TorchBackend:
    """A Hugging Face causal LM with its KV cache: prompts left-padded with an attention mask and
    per-row positions, then one token per row per step (``past_key_values``). The model is a PyTorch
    module, or an ``ORTModelForCausalLM`` (same call, tensors in and out; no parameters, no train mode)."""

    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.capacity = int(getattr(cfg, "n_positions", None) or cfg.max_position_embeddings)
        self.is_module = isinstance(model, torch.nn.Module)
        if self.is_module:
            param = next(model.parameters())
            self.device, self.dtype = param.device, param.dtype
        else:
            self.device, self.dtype = torch.device(model.device), None
        # transformers' models compute the head for the last position only; Optimum's graph has no such input.
        self.keep = {"logits_to_keep": 1} if self.is_module else {}
        self.cache = None

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        # Replies are made in eval mode (dropout off) and without autograd; the caller's mode is restored,
        # so a comparison reply in the middle of training does not leave the model in eval mode.
        was_training = self.is_module and self.model.training
        if self.is_module:
            self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            self.cache = None
            if was_training:
                self.model.train()

    def cache_bytes(self, rows: int) -> int:
        """Memory a cache of ``rows`` rows takes at most: keys and values of every layer at full capacity, and the
        logits (the cache grows with the reply; this is its bound)."""
        cfg = self.model.config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        itemsize = torch.finfo(self.dtype).bits // 8 if self.dtype is not None else 4
        return rows * (2 * cfg.num_hidden_layers * kv_heads * head_dim * self.capacity * itemsize + 4 * cfg.vocab_size)

    joins = False  # the HF cache is one left-padded batch: new prompts wait for the batch to finish
    restores_prefixes = False  # rows' caches are not copied out: the engine gives this backend no prefix cache

    def open(self, rows: int) -> None:
        self.cache = None  # the batch is sized by its prompts at prefill

    def prefill(
        self, at: list[int], rows: list[list[int]], max_new_tokens: int, reuse: list[Reuse | None] | None = None
    ) -> np.ndarray:
        assert at == list(range(len(rows))), "the PyTorch backend takes a whole batch at once"
        assert not any(reuse or ()), "the PyTorch backend restores no prefixes"
        batch, width = len(rows), max(len(r) for r in rows)
        ids = torch.zeros((batch, width), dtype=torch.long)
        # The mask covers the whole reply up front; each step exposes one more column of it (a view).
        mask = torch.zeros((batch, width + max_new_tokens), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[b, width - len(r) : width + max_new_tokens] = 1
        self.mask = mask.to(self.device)
        pos = (self.mask[:, :width].cumsum(-1) - 1).clamp(min=0)
        self.pos = pos[:, -1:].clone()
        self.length = width
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=self.mask[:, :width],
            position_ids=pos,
            use_cache=True,
            **self.keep,
        )
        self.cache = out.past_key_values
        return self._logits(out.logits)

    def step(self, tokens: np.ndarray, active: np.ndarray) -> np.ndarray:
        # Every row of the batch advances (a finished one is fed EOS and its logits ignored): one left-padded cache.
        self.pos += 1
        self.length += 1
        ids = torch.from_numpy(tokens).view(-1, 1).to(self.device)
        out = self.model(
            input_ids=ids,
            attention_mask=self.mask[:, : self.length],
            position_ids=self.pos,
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        return self._logits(out.logits)

    def snapshot(self, row: int, n: int) -> list[np.ndarray]:
        raise NotImplementedError("the PyTorch backend restores no prefixes (restores_prefixes is False)")

    def _logits(self, logits) -> np.ndarray:
        # [batch, 1, vocab] -> float32 numpy (a view on the CPU in fp32; one copy from a GPU)
        return logits[:, -1, :].float().cpu().numpy()

    def close(self) -> None:
        self.cache = None
        self.model = None


def _precision_of(dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def torch_engine(model, *, eos_token_id: int | list[int], name: str | None = None) -> Engine:
    """The engine's loop over an in-memory Hugging Face causal LM (a PEFT model with its adapter works too).

    Used for the base vs fine-tuned comparison replies during training, before any export exists, and as
    the PyTorch side of comparisons. The model is put in eval mode for each ``generate`` call and its
    previous mode restored afterwards.
    """
    backend = _TorchBackend(model)
    device = backend.device.type
    precision = _precision_of(backend.dtype)
    vocab = int(model.config.vocab_size)
    return Engine(
        backend,
        name=name or f"engine-torch-{device}-{precision}",
        device=device,
        precision=precision,
        eos_token_id=eos_token_id,
        vocab_size=vocab,
        info={"backend": "torch", "model_type": getattr(model.config, "model_type", None)},
    )


def optimum_engine(model, *, eos_token_id: int | list[int], name: str | None = None, precision: str = "fp32") -> Engine:
    """The engine's loop over an export's standard Optimum graph (``ORTModelForCausalLM``, KV cache on).

    The parity gate checks that graph's cached path with it: the same loop, token choice and stopping as
    every other reply, with Optimum's graph computing the logits.
    """
    backend = _TorchBackend(model)
    device = backend.device.type
    return Engine(
        backend,
        name=name or f"engine-optimum-{device}-{precision}",
        device=device,
        precision=precision,
        eos_token_id=eos_token_id,
        vocab_size=int(model.config.vocab_size),
        info={"backend": "onnxruntime (Optimum ORTModelForCausalLM)", "provider": getattr(model, "provider", None)},
    )
