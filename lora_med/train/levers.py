"""The memory levers of ``lora-med train`` (``plan.LEVERS``): which ones the settings allow or force, the
micro-batch and levers for a ``--vram-gb`` budget (``plan.choose``), and the train-side code of the one that
no library provides here: chunked cross-entropy.

Each lever has a setting with three states (lora_med/config.py):

==========================  =====================  ======================  ===========================
lever                       forced                 ruled out               unset (the default)
==========================  =====================  ======================  ===========================
``gradient_checkpointing``  --gradient-checkpo...  --no-gradient-check...  off; on if --vram-gb needs it
``sdpa``                    --attention sdpa       --attention eager       on where the model has it
``chunked_ce``              --chunked-ce           --no-chunked-ce         off; on if --vram-gb needs it
``adamw_8bit`` (full only)  --optim adamw_8bit     --optim adamw           off; on if --vram-gb needs it
==========================  =====================  ======================  ===========================

What the trainer does for each (lora_med/trainer.py): gradient checkpointing through the Trainer
(non-reentrant, plus input grads for adapters); ``attn_implementation`` when the model loads; 8-bit AdamW
as the Trainer's ``optim="adamw_bnb_8bit"``; chunked cross-entropy in ``LoraMedTrainer.compute_loss`` with
``chunked_causal_lm_loss`` below.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

from . import plan
from ..errors import ConfigError
from ..settings import describe, name

IGNORE = -100  # label of a position without loss (DataCollatorForSeq2Seq's padding, masked prompts)


# --------------------------------------------------------------------------- settings -> levers


def sharded() -> str | None:
    """The sharding engine ``accelerate launch --config_file`` set up (FSDP, DeepSpeed), or None. Their
    parameters are gathered only inside the wrapped model's forward, so a loss computed outside it (chunked
    cross-entropy) would read shards."""
    for var, engine in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(var, "false").lower() in ("1", "true"):
            return engine
    return None


def supports_chunked_ce(meta_model) -> bool:
    """Whether lm_head(last hidden state) are the logits and the model can skip computing them itself
    (``logits_to_keep``): true of GPT-2, Llama, Qwen, Mistral; not of models that scale or soft-cap logits."""
    config = meta_model.config
    if "logits_to_keep" not in inspect.signature(meta_model.forward).parameters:
        return False
    return not (getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None))


def problems(cfg, meta_model, *, plan_only: bool) -> list[str]:
    """What is wrong with the lever settings for this model (each names its setting)."""
    p = []
    if cfg.optim == "adamw_8bit" and cfg.method != "full":
        p.append(f"{describe(cfg, 'optim')} applies to {name(cfg, 'method')} full only (LoRA's optimizer state is "
                 "a few MB); drop it")
    if cfg.optim == "adamw_8bit" and not plan_only:
        try:
            import bitsandbytes  # noqa: F401  (imported to check it loads)
        except Exception as e:  # a broken native library raises more than ImportError
            p.append(f"{describe(cfg, 'optim')} needs bitsandbytes ({type(e).__name__}: {e}); pip install "
                     "bitsandbytes")
    if meta_model is None:
        return p
    kind = meta_model.config.model_type
    if cfg.attention == "sdpa" and not getattr(type(meta_model), "_supports_sdpa", False):
        p.append(f"{describe(cfg, 'attention')}: transformers has no SDPA attention for {kind}; use eager or auto")
    if cfg.chunked_ce:
        if not supports_chunked_ce(meta_model):
            p.append(f"{name(cfg, 'chunked_ce')}: not available for {kind} (its logits are not lm_head's output, "
                     "or it cannot skip computing them); drop it")
        if engine := sharded():
            p.append(f"{name(cfg, 'chunked_ce')}: not with {engine} (the loss runs outside the sharded forward); "
                     "drop it")
    return p


def allowed_and_required(cfg, meta_model) -> tuple[tuple, tuple]:
    """(levers ``plan.choose`` may switch on, levers the settings force on)."""
    can_sdpa = getattr(type(meta_model), "_supports_sdpa", False)
    chunkable = supports_chunked_ce(meta_model) and not sharded()
    states = {  # lever -> True (forced), False (ruled out), None (the planner's choice)
        "sdpa": {"sdpa": True, "eager": False}.get(cfg.attention, True if can_sdpa else False),
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "chunked_ce": False if cfg.chunked_ce is None and not chunkable else cfg.chunked_ce,
        "adamw_8bit": {"adamw_8bit": True, "adamw": False}.get(cfg.optim, None if cfg.method == "full" else False),
    }
    required = tuple(k for k in plan.LEVERS if states[k])
    allowed = tuple(k for k in plan.LEVERS if states[k] is not False)
    return allowed, required


# --------------------------------------------------------------------------- 3. the memory plan


@dataclass
class MemoryPlan:
    batch_size: int
    grad_accum: int
    estimate: plan.Estimate
    trainable: int
    levers: tuple = ()  # from plan.LEVERS: what the trainer switches on
    choice: plan.Choice | None = None  # with --vram-gb: what plan.choose picked and why

    @property
    def attention(self) -> str:
        return "sdpa" if "sdpa" in self.levers else "eager"

    @property
    def optim(self) -> str:
        return "adamw_8bit" if "adamw_8bit" in self.levers else "adamw"

    def as_dict(self, cfg, setup, world_size: int = 1) -> dict:
        choice = self.choice
        return {"method": cfg.method, "device": setup.device, "precision": setup.precision,
                "effective_batch": self.batch_size * self.grad_accum * world_size, "grad_accum": self.grad_accum,
                "world_size": world_size, "budget_gb": cfg.vram_gb, "params": setup.shape.params,
                "trainable": self.trainable, "levers": list(self.levers), "attention": self.attention,
                "optim": self.optim, "loss_chunk": cfg.loss_chunk if "chunked_ce" in self.levers else None,
                **self.estimate.as_dict(),
                "choice": None if choice is None else {
                    "fits": choice.fits, "needed_gb": round(choice.needed_gb, 3),
                    "relative_speed": round(choice.relative_speed, 3), "reason": choice.reason}}


def plan_memory(cfg, setup, d) -> MemoryPlan:
    """Peak-memory estimate for the settings; with ``--vram-gb``, the fastest micro-batch and levers that fit.

    Raises:
        ConfigError: nothing fits the budget, not even micro-batch 1 with every lever allowed.
    """
    lora = bool(setup.targets)
    trainable = plan.lora_params(setup.meta, setup.targets, cfg.r) if lora else setup.shape.params
    # lora_A keeps its (bf16) input whether or not dropout is on; dropout adds its own copy and mask.
    width = plan.lora_input_width(setup.meta, setup.targets, setup.shape.n_layer) if lora else 0.0
    seq = min(cfg.max_length, max(len(e.input_ids) for e in d.train_ex))
    common = dict(method=cfg.method, seq_len=seq, precision=setup.precision, device=setup.device,
                  trainable=trainable, quant_bits=cfg.quant_bits, lora_width=width,
                  lora_dropout_width=width if cfg.dropout > 0 else 0.0, ce_chunk=cfg.loss_chunk)
    allowed, required = allowed_and_required(cfg, setup.meta)
    if cfg.vram_gb:
        # On the CPU the budget is the estimate alone: no CUDA context, no caching allocator's reserve.
        cpu = setup.device == "cpu"
        choice = plan.choose(setup.shape, budget_gb=cfg.vram_gb, effective_batch=cfg.batch_size * cfg.grad_accum,
                             allowed=allowed, required=required, **common,
                             **(dict(context_gb=0.0, fragmentation=0.0) if cpu else {}))
        if not choice.fits:
            raise ConfigError(f"{describe(cfg, 'vram_gb')}: {cfg.method} does not fit even at batch 1: "
                              f"{choice.reason}")
        return MemoryPlan(choice.micro_batch, choice.grad_accum, choice.estimate, trainable, choice.levers, choice)
    levers = required + (("sdpa",) if "sdpa" in allowed and "sdpa" not in required else ())
    levers = tuple(x for x in plan.LEVERS if x in levers)
    est = plan.estimate(setup.shape, batch_size=cfg.batch_size,
                        gradient_checkpointing="gradient_checkpointing" in levers, attention="sdpa" if "sdpa" in levers else "eager", chunked_ce="chunked_ce" in levers,
                        optimizer="adamw_8bit" if "adamw_8bit" in levers else "adamw", **common)
    return MemoryPlan(cfg.batch_size, cfg.grad_accum, est, trainable, levers)


# --------------------------------------------------------------------------- chunked cross-entropy


def causal_lm(model):
    """The transformers causal LM inside the DDP / accelerate / PEFT wrappers (for its lm_head and decoder)."""
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def chunked_causal_lm_loss(lm_head, hidden, labels, num_items_in_batch=None, *, chunk: int = plan.CE_CHUNK_TOKENS):
    """transformers' ``ForCausalLMLoss`` on ``lm_head(hidden)``, ``chunk`` tokens at a time.

    Labels are shifted as ``ForCausalLMLoss`` does (position i predicts label i + 1), each chunk's logits are
    upcast to fp32 for a summed cross-entropy, and the sum is divided by ``num_items_in_batch`` (the Trainer's
    count over the whole accumulated batch), or without it averaged over the predicted tokens, as the model's
    own loss is. With gradients on, each chunk runs under a non-reentrant checkpoint, so its logits are freed
    after its forward and recomputed in the backward: one chunk's logits exist at a time instead of the
    batch's (``plan.estimate(chunked_ce=True)`` models this; benchmarks/train_memory/simulate.py's
    ``chunked_loss`` is the reference it was checked against).
    """
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    targets = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]
    h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).to(hidden.device)

    def piece(h_part, y_part):
        return F.cross_entropy(lm_head(h_part).float(), y_part, ignore_index=IGNORE, reduction="sum")

    recompute = torch.is_grad_enabled()
    total = None
    for i in range(0, h.shape[0], chunk):
        args = (h[i:i + chunk], y[i:i + chunk])
        part = checkpoint(piece, *args, use_reentrant=False) if recompute else piece(*args)
        total = part if total is None else total + part
    if num_items_in_batch is None:
        return total / (y != IGNORE).sum()
    return total / num_items_in_batch
