"""The memory levers of ``lora-med train`` (``plan.LEVERS``): which ones the settings allow or force, the
micro-batch and levers for a ``--vram-gb`` budget (``choose``), and the train-side code of the one that
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
from itertools import combinations

from ..errors import ConfigError
from ..settings import describe, name
from . import plan
from .plan import CE_CHUNK_TOKENS, GB, LEVERS, Estimate, Shape, compute_factor, estimate

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
        p.append(
            f"{describe(cfg, 'optim')} applies to {name(cfg, 'method')} full only (LoRA's optimizer state is "
            "a few MB); drop it"
        )
    if cfg.optim == "adamw_8bit" and not plan_only:
        try:
            import bitsandbytes  # noqa: F401  (imported to check it loads)
        except Exception as e:  # a broken native library raises more than ImportError
            p.append(f"{describe(cfg, 'optim')} needs bitsandbytes ({type(e).__name__}: {e}); pip install bitsandbytes")
    if meta_model is None:
        return p
    kind = meta_model.config.model_type
    if cfg.attention == "sdpa" and not getattr(type(meta_model), "_supports_sdpa", False):
        p.append(f"{describe(cfg, 'attention')}: transformers has no SDPA attention for {kind}; use eager or auto")
    if cfg.chunked_ce:
        if not supports_chunked_ce(meta_model):
            p.append(
                f"{name(cfg, 'chunked_ce')}: not available for {kind} (its logits are not lm_head's output, "
                "or it cannot skip computing them); drop it"
            )
        if engine := sharded():
            p.append(
                f"{name(cfg, 'chunked_ce')}: not with {engine} (the loss runs outside the sharded forward); drop it"
            )
    return p


def allowed_and_required(cfg, meta_model) -> tuple[tuple, tuple]:
    """(levers ``plan.choose`` may switch on, levers the settings force on)."""
    can_sdpa = getattr(type(meta_model), "_supports_sdpa", False)
    chunkable = supports_chunked_ce(meta_model) and not sharded()
    states = {  # lever -> True (forced), False (ruled out), None (the planner's choice)
        "sdpa": {"sdpa": True, "eager": False}.get(cfg.attention, bool(can_sdpa)),
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
    choice: Choice | None = None  # with --vram-gb: what plan.choose picked and why

    @property
    def attention(self) -> str:
        return "sdpa" if "sdpa" in self.levers else "eager"

    @property
    def optim(self) -> str:
        return "adamw_8bit" if "adamw_8bit" in self.levers else "adamw"

    def as_dict(self, cfg, setup, world_size: int = 1) -> dict:
        choice = self.choice
        return {
            "method": cfg.method,
            "device": setup.device,
            "precision": setup.precision,
            "effective_batch": self.batch_size * self.grad_accum * world_size,
            "grad_accum": self.grad_accum,
            "world_size": world_size,
            "budget_gb": cfg.vram_gb,
            "params": setup.shape.params,
            "trainable": self.trainable,
            "levers": list(self.levers),
            "attention": self.attention,
            "optim": self.optim,
            "loss_chunk": cfg.loss_chunk if "chunked_ce" in self.levers else None,
            **self.estimate.as_dict(),
            "choice": None
            if choice is None
            else {
                "fits": choice.fits,
                "needed_gb": round(choice.needed_gb, 3),
                "relative_speed": round(choice.relative_speed, 3),
                "reason": choice.reason,
            },
        }


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
    common = dict(
        method=cfg.method,
        seq_len=seq,
        precision=setup.precision,
        device=setup.device,
        trainable=trainable,
        quant_bits=cfg.quant_bits,
        lora_width=width,
        lora_dropout_width=width if cfg.dropout > 0 else 0.0,
        ce_chunk=cfg.loss_chunk,
    )
    allowed, required = allowed_and_required(cfg, setup.meta)
    if cfg.vram_gb:
        # On the CPU the budget is the estimate alone: no CUDA context, no caching allocator's reserve.
        cpu = setup.device == "cpu"
        choice = choose(
            setup.shape,
            budget_gb=cfg.vram_gb,
            effective_batch=cfg.batch_size * cfg.grad_accum,
            allowed=allowed,
            required=required,
            **common,
            context_gb=0.0 if cpu else CUDA_CONTEXT_GB,
            fragmentation=0.0 if cpu else FRAGMENTATION,
        )
        if not choice.fits:
            raise ConfigError(f"{describe(cfg, 'vram_gb')}: {cfg.method} does not fit even at batch 1: {choice.reason}")
        return MemoryPlan(choice.micro_batch, choice.grad_accum, choice.estimate, trainable, choice.levers, choice)
    levers = required + (("sdpa",) if "sdpa" in allowed and "sdpa" not in required else ())
    levers = tuple(x for x in plan.LEVERS if x in levers)
    est = plan.estimate(
        setup.shape,
        batch_size=cfg.batch_size,
        gradient_checkpointing="gradient_checkpointing" in levers,
        attention="sdpa" if "sdpa" in levers else "eager",
        chunked_ce="chunked_ce" in levers,
        optimizer="adamw_8bit" if "adamw_8bit" in levers else "adamw",
        **common,
    )
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
    parts = []
    for i in range(0, h.shape[0], chunk):
        args = (h[i : i + chunk], y[i : i + chunk])
        parts.append(checkpoint(piece, *args, use_reentrant=False) if recompute else piece(*args))
    total = sum(parts[1:], parts[0])
    if num_items_in_batch is None:
        return total / (y != IGNORE).sum()
    return total / num_items_in_batch


# --------------------------------------------------------------------------- choosing levers for a budget

# Memory on the card outside torch's caching allocator: the CUDA context and the kernels loaded into it
# (0.3-0.5 GB with CUDA 12's lazy module loading; more if a display runs on the same card). An estimate, not
# measured here: run.py records what the card reports (torch.cuda.mem_get_info) beside each run.
CUDA_CONTEXT_GB = 0.5
# Reserve beyond max_memory_allocated that the caching allocator cannot hand back under pressure (free space
# inside segments that still hold live blocks): 0.4-6.5% over the 27 settings replayed at DialoGPT-medium's
# shape with its rules (benchmarks/train_memory/replay-dialogpt-medium.json, "segments in use"), so 7%.
FRAGMENTATION = 0.07
# Fixed cost of a training step (kernel launches, Python, the optimizer's per-tensor loop) in tokens of
# compute: rate ~ tokens / (overhead + tokens). The H200 figures (benchmarks/results/h200-dialogpt-medium-shape/)
# give ~1,300 (LoRA) to ~3,400 (full) tokens; an RTX 4060 Ti, ~40x slower at bf16 matmuls with a similar host,
# ~250-400. Only the ranking of micro-batches depends on it.
OVERHEAD_TOKENS = 256


@dataclass(frozen=True)
class Choice:
    """What ``choose`` picked: the settings, the estimate behind them and why."""

    fits: bool
    micro_batch: int
    grad_accum: int
    levers: tuple  # names from LEVERS the trainer must switch on
    estimate: Estimate
    needed_gb: float  # estimate + FRAGMENTATION + CUDA context: what is compared with the budget
    budget_gb: float
    relative_speed: float  # tokens/s relative to the same settings at an unbounded micro-batch without levers
    reason: str
    considered: tuple = ()  # (levers, micro-batch, needed GB, relative speed, fits) of every candidate

    def as_dict(self) -> dict:
        return {
            "fits": self.fits,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "levers": list(self.levers),
            "needed_gb": round(self.needed_gb, 3),
            "budget_gb": self.budget_gb,
            "relative_speed": round(self.relative_speed, 3),
            "reason": self.reason,
            "estimate": self.estimate.as_dict(),
        }


def relative_speed(
    shape: Shape, levers, micro_batch: int, seq_len: int, overhead_tokens: float = OVERHEAD_TOKENS
) -> float:
    """Throughput model behind ``choose``: per-step overhead amortised over the micro-batch's tokens, divided
    by the levers' extra compute (``compute_factor``). 1.0 = no overhead, no lever."""
    t = micro_batch * seq_len
    return t / (t + overhead_tokens) / compute_factor(shape, levers)


def choose(
    shape: Shape,
    *,
    budget_gb: float,
    effective_batch: int,
    method: str,
    seq_len: int,
    trainable: int,
    precision: str = "bf16",
    device: str = "cuda",
    quant_bits: int = 4,
    lora_dropout_width: float = 0.0,
    lora_width: float | None = None,
    allowed=LEVERS,
    required=(),
    ce_chunk: int = CE_CHUNK_TOKENS,
    context_gb: float = CUDA_CONTEXT_GB,
    fragmentation: float = FRAGMENTATION,
    overhead_tokens: float = OVERHEAD_TOKENS,
) -> Choice:
    """The fastest micro-batch and levers whose estimate fits ``budget_gb`` (a card's memory).

    Every micro-batch dividing ``effective_batch`` (grad-accum keeps the effective batch) is tried with
    every combination of the allowed levers that includes the ``required`` ones ("sdpa" is always on when
    allowed: it saves memory and time; "adamw_8bit" only for a full fine-tune); a candidate fits when estimate x (1 + fragmentation) +
    context_gb <= budget_gb; the fastest by ``relative_speed`` wins, ties to fewer levers.

    Returns:
        Choice. When nothing fits, ``fits`` is False and the Choice is the smallest candidate (micro-batch
        1, every lever), with a reason that says how much memory it needs and what else to try.
    """
    unknown = [x for x in (*allowed, *required) if x not in LEVERS]
    if unknown:
        raise ValueError(f"unknown lever(s) {unknown}; known: {', '.join(LEVERS)}")
    optional = [
        x
        for x in ("gradient_checkpointing", "chunked_ce", "adamw_8bit")
        if x in allowed and (x != "adamw_8bit" or method == "full")
    ]
    base = ("sdpa",) if "sdpa" in allowed or "sdpa" in required else ()
    optional += [x for x in required if x not in optional and x not in base]
    candidates = []
    for k in range(len(optional) + 1):
        for combo in combinations(optional, k):
            levers = base + combo
            if not set(required) <= set(levers):
                continue
            for b in (d for d in range(effective_batch, 0, -1) if effective_batch % d == 0):
                est = estimate(
                    shape,
                    method=method,
                    batch_size=b,
                    seq_len=seq_len,
                    precision=precision,
                    device=device,
                    trainable=trainable,
                    quant_bits=quant_bits,
                    gradient_checkpointing="gradient_checkpointing" in levers,
                    lora_dropout_width=lora_dropout_width,
                    lora_width=lora_width,
                    attention="sdpa" if "sdpa" in levers else "eager",
                    chunked_ce="chunked_ce" in levers,
                    optimizer="adamw_8bit" if "adamw_8bit" in levers else "adamw",
                    ce_chunk=ce_chunk,
                )
                needed = est.total / GB * (1 + fragmentation) + context_gb
                speed = relative_speed(shape, levers, b, seq_len, overhead_tokens)
                candidates.append((levers, b, est, needed, speed))
    fitting = [c for c in candidates if c[3] <= budget_gb]
    considered = tuple((c[0], c[1], round(c[3], 3), round(c[4], 3), c[3] <= budget_gb) for c in candidates)
    overheads = f"{fragmentation:.0%} allocator reserve and {context_gb:g} GB CUDA context"
    if not fitting:
        levers, b, est, needed, speed = min(candidates, key=lambda c: (round(c[3], 6), c[1]))
        left_out = [x for x in LEVERS if x not in (*allowed, *required) and (x != "adamw_8bit" or method == "full")]
        hint = (
            (f"the levers left out ({', '.join(left_out)}), " if left_out else "")
            + ("--method qlora, " if method != "qlora" else "")
            + "a shorter --max-length or a larger card"
        )
        return Choice(
            False,
            b,
            effective_batch // b,
            levers,
            est,
            needed,
            budget_gb,
            speed,
            f"nothing fits {budget_gb:g} GB: the smallest setting (micro-batch {b}, "
            f"{' + '.join(levers) or 'no lever'}) needs {needed:.2f} GB ({est.total / GB:.2f} GB "
            f"estimated peak at {est.peak_at}, plus {overheads}); try {hint}",
            considered,
        )
    levers, b, est, needed, speed = max(fitting, key=lambda c: (round(c[4], 6), -len(c[0]), c[1]))
    faster = [c for c in candidates if c[4] > speed + 1e-9]
    why = (
        f"micro-batch {b} x grad-accum {effective_batch // b} with {' + '.join(levers) or 'no lever'}: "
        f"{est.total / GB:.2f} GB estimated peak at {est.peak_at}, {needed:.2f} GB with {overheads}, "
        f"within {budget_gb:g} GB"
    )
    if faster:
        best = max(faster, key=lambda c: c[4])
        why += (
            f"; the fastest setting (micro-batch {best[1]}, {' + '.join(best[0]) or 'no lever'}) needs {best[3]:.2f} GB"
        )
    return Choice(True, b, effective_batch // b, levers, est, needed, budget_gb, speed, why, considered)
