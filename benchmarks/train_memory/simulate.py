"""Peak CUDA training memory of one `lora-med train` step, replayed on the CPU: no GPU, no weights.

The real model code (transformers' GPT-2, PEFT's LoRA layers, torch's AdamW) runs on the ``meta`` device,
where every tensor has a shape, a dtype and a storage size but no data, so three steps of DialoGPT-medium
replay in seconds. What CUDA does differently from the CPU is put back:

* **autocast**: the Trainer's bf16 mixed precision is accelerate wrapping ``model.forward`` in
  ``torch.autocast("cuda", bfloat16)`` (accelerate/accelerator.py ``prepare_model``) and converting the
  outputs to fp32 (``convert_outputs_to_fp32``: the logits get an fp32 copy). ``CudaAutocast`` replays CUDA's
  policy from torch's own op lists (``torch/include/ATen/autocast_mode.h``: ``AT_FORALL_LOWER_PRECISION_FP``
  (addmm, linear, matmul, bmm, SDPA... in bf16), ``AT_FORALL_FP32`` (layer_norm, pow, nll_loss... upcast to
  fp32), ``AT_FORALL_FP32_SET_OPT_DTYPE`` (softmax, log_softmax, sum)), including the cast cache of fp32 leaf
  weights (``cached_cast`` in ATen/autocast_mode.cpp) that lives until the autocast region ends;
* **dropout**: CUDA's fused ``native_dropout`` keeps a 1-byte mask (``_dropout_cuda``);
* **attention**: SDPA on CUDA in bf16 runs FlashAttention, which saves q, k, v, the output and an fp32
  log-sum-exp (b x heads x s) for the backward and never materialises the score matrix; ``_flash`` stands in
  for it, with the fp32 ``dq`` accumulator its backward allocates;
* **bitsandbytes 4-bit** (QLoRA): ``Meta4bit`` is bnb's ``Linear4bit`` on packed nf4 storage (0.5 B/param +
  absmax), with ``MatMul4Bit``'s behaviour (bitsandbytes/autograd/_functions.py: it saves only the packed
  weight; forward above 1,536 rows and every backward dequantise the weight to a temporary);
* **the Trainer's step** (transformers 4.57 ``training_step`` + ``_inner_training_loop``): forward, loss,
  backward, ``clip_grad_norm_``, ``AdamW(foreach=True)`` (the CUDA default; ``_multi_tensor_adam`` allocates
  one ``exp_avg_sq_sqrt`` the size of a parameter group), ``zero_grad(set_to_none=True)``; three steps, so that
  the optimizer state exists;
* **the levers** lora_med.train.plan models: ``chunked_loss`` (the "chunked_ce" reference), ``_AdamW8bit``
  (bitsandbytes' 8-bit AdamW as the Trainer sets it up), eager attention, gradient checkpointing.

``LiveBytes`` (a dispatch mode) sees every storage from the op that creates it until the last reference
dies (a weakref finaliser) and passes it through ``CachingAllocator``, the bookkeeping of torch's CUDA
caching allocator (512-byte rounding, 2 MiB / 20 MiB segments, best fit, splitting only when over 1 MiB would
be left): its peak "allocated" is the analogue of ``torch.cuda.max_memory_allocated``, its "segments in use"
what the allocator cannot hand back under memory pressure. Added as a constant: the two cuBLAS workspaces
(``cublas_workspaces``). Not replayed: kernel-internal scratch other than flash's ``dq`` accumulator and the
4-bit dequantisation buffers.

This is a derivation from the libraries' code, not a GPU measurement. At the five H200 points of
benchmarks/results/h200-dialogpt-medium-shape/ it reads 2.424 / 6.917 / 7.192 / 10.641 / 7.035 GB where the H200
read 2.42 / 6.92 / 7.19 / 10.64 / 7.04 (LoRA r16 b4, b16; full b4, b16; QLoRA r8 b16). Its output at DialoGPT-medium's shape is
replay-dialogpt-medium.json (``--grid``), which tests/test_plan.py holds the planner to.

Usage:
  .venv/bin/python benchmarks/train_memory/simulate.py --method lora --batch 16 [--gc] [--chunked-ce 256]
  .venv/bin/python benchmarks/train_memory/simulate.py --grid --out benchmarks/train_memory/replay-dialogpt-medium.json
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import math
import sys
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

DIALOGPT_MEDIUM = dict(n_layer=24, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257)
TARGETS = ["c_attn", "c_proj", "c_fc"]
BLOCK = 512  # CUDACachingAllocator rounds every block up to a multiple of 512 bytes (kMinBlockSize)


def cublas_workspaces(hopper: bool = True) -> int:
    """cuBLAS workspaces, allocated from the caching allocator (so inside max_memory_allocated), one per
    (handle, stream) and handles are per thread: the forward runs on the Python thread, the backward on
    autograd's device thread, so two. Size per aten/src/ATen/cuda/CublasHandlePool.cpp: 32 MiB on sm90
    (H100/H200), 4096 KiB x 2 + 16 KiB x 8 before; plus a 1 MiB cuBLASLt workspace per handle."""
    return 2 * ((4096 * 8 * 1024 if hopper else 4096 * 1024 * 2 + 16 * 1024 * 8) + 1024 * 1024)


# --------------------------------------------------------------------------- counting live storages


class CachingAllocator:
    """The bookkeeping of torch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp, default settings,
    one stream), to read ``max_memory_allocated`` and the segments it needs from a replayed sequence.

    Requests are rounded up to 512 bytes; those up to 1 MiB come from 2 MiB segments (small pool), larger
    ones from the smallest cached free block that fits (best fit), else from a new segment of 20 MiB (requests
    under 10 MiB) or the request rounded up to 2 MiB. A block is split only if the remainder is >= 512 bytes
    (small pool) or > 1 MiB (large pool), so a large request can hold up to 1 MiB more than it asked for, and
    ``allocated`` counts the whole block. Freed blocks merge with free neighbours in their segment."""

    SMALL, SMALL_SEGMENT, LARGE_SEGMENT, MIN_LARGE_ALLOC, ROUND_LARGE = 1 << 20, 2 << 20, 20 << 20, 10 << 20, 2 << 20

    def __init__(self):
        self.free_blocks = {True: [], False: []}  # small pool? -> sorted [(size, segment, offset)]
        self.segments: list[dict] = []  # {"small", "size", "blocks": {offset: [size, in_use]}, "in_use"}
        self.allocated = self.reserved = self.in_use_segments = 0
        self.peak_allocated = self.peak_in_use_segments = 0

    @staticmethod
    def round_size(n: int) -> int:
        return BLOCK if n < BLOCK else BLOCK * math.ceil(n / BLOCK)

    def malloc(self, nbytes: int) -> tuple[int, int]:
        size = self.round_size(nbytes)
        small = size <= self.SMALL
        pool = self.free_blocks[small]
        i = bisect.bisect_left(pool, (size, -1, -1))
        if i < len(pool):
            block_size, seg, off = pool.pop(i)
        else:
            block_size = (
                self.SMALL_SEGMENT
                if small
                else self.LARGE_SEGMENT
                if size < self.MIN_LARGE_ALLOC
                else self.ROUND_LARGE * math.ceil(size / self.ROUND_LARGE)
            )
            seg, off = len(self.segments), 0
            self.segments.append({"small": small, "size": block_size, "blocks": {0: [block_size, False]}, "in_use": 0})
            self.reserved += block_size
        segment = self.segments[seg]
        remaining = block_size - size
        if (remaining >= BLOCK) if segment["small"] else (remaining > self.SMALL):
            segment["blocks"][off + size] = [remaining, False]
            bisect.insort(self.free_blocks[segment["small"]], (remaining, seg, off + size))
            block_size = size
        segment["blocks"][off] = [block_size, True]
        if segment["in_use"] == 0:
            self.in_use_segments += segment["size"]
        segment["in_use"] += 1
        self.allocated += block_size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_in_use_segments = max(self.peak_in_use_segments, self.in_use_segments)
        return seg, off

    def free(self, handle: tuple[int, int]) -> None:
        seg, off = handle
        segment = self.segments[seg]
        blocks, pool = segment["blocks"], self.free_blocks[segment["small"]]
        size = blocks[off][0]
        self.allocated -= size
        segment["in_use"] -= 1
        if segment["in_use"] == 0:
            self.in_use_segments -= segment["size"]
        prev = next((o for o, (n, used) in blocks.items() if o + n == off and not used), None)
        if prev is not None:  # merge with the free block before
            pool.remove((blocks[prev][0], seg, prev))
            del blocks[off]
            off, size = prev, blocks[prev][0] + size
        nxt = off + size
        if nxt in blocks and not blocks[nxt][1]:  # and with the free block after
            pool.remove((blocks[nxt][0], seg, nxt))
            size += blocks.pop(nxt)[0]
        blocks[off] = [size, False]
        bisect.insort(pool, (size, seg, off))


class LiveBytes(TorchDispatchMode):
    """Bytes of distinct live storages, their peak, and where in the step the peak fell; each storage also
    goes through ``CachingAllocator``."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self.phase, self.peak_phase = "setup", "setup"
        self._live: dict[int, int] = {}
        self._what: dict[int, str] = {}  # storage -> "dtype shape" of the tensor that created it
        self.at_peak: dict[str, int] | None = None  # what was live at the peak, by "dtype shape" (snapshot=True)
        self.snapshot = False
        self.allocator = CachingAllocator()
        self._blocks: dict[int, tuple[int, int]] = {}

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)  # storages keep their Python object while alive (PyObject preservation)
        if key in self._live or not st.nbytes():
            return
        n = CachingAllocator.round_size(st.nbytes())
        self._live[key] = n
        self._blocks[key] = self.allocator.malloc(st.nbytes())
        self.current += n
        if self.snapshot:
            self._what[key] = f"{str(t.dtype).replace('torch.', '')} {tuple(t.shape)}"
        if self.current > self.peak:
            self.peak, self.peak_phase = self.current, self.phase
            if self.snapshot:
                self.at_peak = {}
                for k, size in self._live.items():
                    w = self._what.get(k, "?")
                    self.at_peak[w] = self.at_peak.get(w, 0) + size
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)
        self._what.pop(key, None)
        if key in self._blocks:
            self.allocator.free(self._blocks.pop(key))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                self.track(t)
        return out


# --------------------------------------------------------------------------- CUDA's bf16 autocast policy


def _names(*fs):
    return set(fs)


# The Python entry points GPT-2, PEFT and the loss reach, by autocast list (ATen/autocast_mode.h).
LOWER = _names(
    torch.addmm,
    torch.Tensor.addmm,
    torch.mm,
    torch.Tensor.mm,
    torch.matmul,
    torch.Tensor.matmul,
    torch.Tensor.__matmul__,
    torch.bmm,
    torch.Tensor.bmm,
    torch.baddbmm,
    F.linear,
    torch.einsum,
    F.scaled_dot_product_attention,
)
FP32 = _names(
    F.layer_norm,
    torch.layer_norm,
    torch.pow,
    torch.Tensor.pow,
    torch.Tensor.__pow__,
    F.nll_loss,
    torch.exp,
    torch.Tensor.exp,
    torch.rsqrt,
    torch.log,
    torch.Tensor.log,
    F.softplus,
    F.mse_loss,
)
FP32_OPT_DTYPE = _names(
    F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax
)


class CudaAutocast(TorchFunctionMode):
    """``torch.autocast("cuda", torch.bfloat16)`` as CUDA applies it, for tensors on any device.

    ``enabled`` is switched by ``region()`` (accelerate's wrapper around forward) and by the checkpoint
    recompute (torch.utils.checkpoint re-enters the autocast state of the forward)."""

    def __init__(self, dtype=torch.bfloat16):
        super().__init__()
        self.dtype, self.enabled, self._cache = dtype, False, {}

    @contextlib.contextmanager
    def region(self, enabled: bool = True):
        before = self.enabled
        self.enabled = enabled
        try:
            yield
        finally:
            self.enabled = before
            if not before:  # leaving the outermost region clears the weight-cast cache, as torch does
                self._cache.clear()

    def _lower(self, x):
        if not (
            isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != self.dtype and x.dtype != torch.float64
        ):
            return x
        # cached_cast: an fp32 leaf that requires grad (a trained weight) is cast once per region.
        cacheable = x.dtype == torch.float32 and x.is_leaf and x.requires_grad
        if cacheable and id(x) in self._cache:
            return self._cache[id(x)]
        y = x.to(self.dtype)
        if cacheable:
            self._cache[id(x)] = y
        return y

    @staticmethod
    def _fp32(x):
        return x.float() if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16) else x

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout and args[0].device.type == "meta":
            return _dropout_cuda(*args, **kwargs)
        if self.enabled:
            if func in LOWER:
                args, kwargs = torch.utils._pytree.tree_map(self._lower, (args, kwargs))
                if func is F.scaled_dot_product_attention and args[0].device.type == "meta":
                    return _sdpa_cuda(*args, **kwargs)
            elif func in FP32:
                args, kwargs = torch.utils._pytree.tree_map(self._fp32, (args, kwargs))
            elif (
                func in FP32_OPT_DTYPE
                and kwargs.get("dtype") is None
                and len(args) < 3
                and isinstance(args[0], torch.Tensor)
                and args[0].dtype in (torch.float16, torch.bfloat16)
            ):
                kwargs = {**kwargs, "dtype": torch.float32}
        elif func is F.scaled_dot_product_attention and args[0].device.type == "meta":
            return _sdpa_cuda(*args, **kwargs)
        return func(*args, **kwargs)


class _Flash(torch.autograd.Function):
    """FlashAttention's memory behaviour (aten _scaled_dot_product_flash_attention and its backward):
    the output is laid out (b, s, heads, d); saved: q, k, v, output, fp32 logsumexp (b, heads, s)."""

    @staticmethod
    def forward(ctx, q, k, v):
        b, a, s, d = q.shape
        out = torch.empty(b, s, a, d, dtype=q.dtype, device=q.device).transpose(1, 2)
        lse = torch.empty(b, a, s, dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        b, a, s, d = q.shape
        dq_accum = torch.empty(b, s, a, d, dtype=torch.float32, device=q.device)  # fp32 accumulator
        softmax_d = torch.empty(b, a, s, dtype=torch.float32, device=q.device)
        dq, dk, dv = (torch.empty(b, s, a, d, dtype=q.dtype, device=q.device).transpose(1, 2) for _ in range(3))
        del dq_accum, softmax_d
        return dq, dk, dv


def _dropout_cuda(x, p=0.5, training=True, inplace=False):
    """CUDA's dropout is the fused ``native_dropout`` (aten/native/Dropout.cpp ``is_fused_kernel_acceptable``):
    it saves a bool mask (1 byte per element). On other devices ``_dropout_impl`` saves a mask in the input's
    dtype (4 bytes for fp32), so the replay calls the fused op explicitly."""
    if not training or p == 0:
        return x
    return torch.native_dropout(x, p, True)[0]


def _sdpa_cuda(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """GPT-2 passes no mask when the batch has no padding (is_causal); with one, CUDA runs the
    memory-efficient kernel, which also keeps the mask (not replayed: the benchmark's batches are unpadded)."""
    return _Flash.apply(q, k, v)


# --------------------------------------------------------------------------- bitsandbytes 4-bit on meta


class _MatMul4Bit(torch.autograd.Function):
    """bnb.matmul_4bit in training (MatMul4Bit): saves only the packed weight; above 1,536 rows the CUDA
    gemm_4bit dequantises the weight to the compute dtype first (backends/cuda/ops.py
    ``_dequant_linear_fallback``); the backward dequantises (to the quant-state dtype) and casts again."""

    @staticmethod
    def forward(ctx, a, packed, n_out, n_in, quant_dtype):
        ctx.shape, ctx.quant_dtype = (n_out, n_in), quant_dtype
        ctx.save_for_backward(packed)
        m = a.numel() // a.shape[-1]
        if m > 1536:
            w = torch.empty(n_out, n_in, dtype=a.dtype, device=a.device)
            return F.linear(a, w)
        return torch.empty(*a.shape[:-1], n_out, dtype=a.dtype, device=a.device)

    @staticmethod
    def backward(ctx, grad):
        w = torch.empty(*ctx.shape, dtype=ctx.quant_dtype, device=grad.device).to(grad.dtype)
        return torch.matmul(grad, w), None, None, None, None


def make_meta4bit_class():
    """A bnb ``Linear4bit`` subclass whose packed weight is a meta tensor (so PEFT dispatches its 4-bit LoRA
    layer to it) and whose forward is ``Linear4bit.forward`` with ``_MatMul4Bit``."""
    import bitsandbytes as bnb

    class Meta4bit(bnb.nn.Linear4bit):
        def __init__(self, n_in: int, n_out: int, bias: bool, compute_dtype, quant_dtype=torch.float16):
            super().__init__(
                n_in,
                n_out,
                bias=bias,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            n = n_in * n_out
            self.weight.data = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device="meta")
            # double quantisation: one 8-bit absmax per 64 weights, one fp32 absmax per 256 of those
            self.register_buffer("absmax8", torch.empty(math.ceil(n / 64), dtype=torch.uint8, device="meta"))
            self.register_buffer("absmax32", torch.empty(math.ceil(n / 64 / 256), dtype=torch.float32, device="meta"))
            self.quant_dtype = quant_dtype

        def forward(self, x):  # bnb.nn.Linear4bit.forward (bitsandbytes/nn/modules.py)
            inp_dtype = x.dtype
            x = x.to(self.compute_dtype)
            bias = self.bias
            if bias is not None:
                if bias.dtype != x.dtype:
                    bias.data = bias.data.to(x.dtype)
                bias = bias.to(self.compute_dtype)
            out = _MatMul4Bit.apply(x, self.weight, self.out_features, self.in_features, self.quant_dtype)
            if bias is not None:
                out = out + bias
            return out.to(inp_dtype)

    return Meta4bit


# --------------------------------------------------------------------------- building the model


def build(
    method: str,
    *,
    r: int = 16,
    lora_dropout: float = 0.05,
    gradient_checkpointing: bool = False,
    attn: str = "sdpa",
    config: dict | None = None,
    quant_bits: int = 4,
):
    """The model as ``lora_med.train._load_for_training`` builds it for CUDA bf16, on the meta device.

    ``config``: GPT-2 settings (DialoGPT-medium's by default), or a Llama-family config with its ``model_type``
    (llama, qwen2, mistral): nn.Linear layers, LoRA on q/k/v/o/gate/up/down (lora_med.models.TARGET_MODULES)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config
    from transformers.pytorch_utils import Conv1D

    config = dict(config or DIALOGPT_MEDIUM)
    model_type = config.pop("model_type", "gpt2")
    if model_type == "gpt2":
        cfg, targets = GPT2Config(**config, use_cache=False), TARGETS
    else:
        from lora_med.models import TARGET_MODULES

        cfg, targets = AutoConfig.for_model(model_type, **config, use_cache=False), TARGET_MODULES[model_type]
    cfg._attn_implementation = attn
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    if method == "lora":  # the frozen base in the compute dtype
        model = model.to(torch.bfloat16)
    elif method == "qlora":
        if quant_bits != 4:
            raise SystemExit("the replay covers 4-bit QLoRA only")
        Meta4bit = make_meta4bit_class()
        # transformers' bnb quantizer: the blocks' Conv1D / Linear -> Linear4bit (in, out), never lm_head; the
        # rest loads in fp16 (quantizer_bnb_4bit.update_dtype) and prepare_model_for_kbit_training casts it to fp32.
        for module in list(model.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, Conv1D):
                    n_in, n_out = child.weight.shape
                elif isinstance(child, torch.nn.Linear) and child_name != "lm_head":
                    n_out, n_in = child.weight.shape
                else:
                    continue
                setattr(module, child_name, Meta4bit(n_in, n_out, child.bias is not None, torch.bfloat16))
        for p in model.parameters():
            p.requires_grad_(False)
            if p.dtype != torch.uint8:
                p.data = torch.empty(p.shape, dtype=torch.float32, device="meta")
        model.is_loaded_in_4bit = True
    if method in ("lora", "qlora"):
        lora = LoraConfig(
            r=r,
            lora_alpha=2 * r,
            lora_dropout=lora_dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
            fan_in_fan_out=method == "lora" and model_type == "gpt2",
        )
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(model, lora)
        if gradient_checkpointing:
            model.enable_input_require_grads()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _checkpoint_fn(autocast: CudaAutocast):
    """torch.utils.checkpoint (non-reentrant) whose recompute re-enters the forward's autocast state, as
    torch.utils.checkpoint does (RNG states are CPU tensors on CUDA too, so not preserving them costs no
    device memory)."""
    from torch.utils.checkpoint import checkpoint

    def ckpt(fn, *args, **kwargs):
        state = autocast.enabled

        def run(*a, **k):
            # The recompute runs inside backward, where the mode stack of the forward is not in effect.
            from torch.overrides import _get_current_function_mode_stack

            active = any(m is autocast for m in _get_current_function_mode_stack())
            with contextlib.nullcontext() if active else autocast, autocast.region(state):
                return fn(*a, **k)

        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

    return ckpt


def _checkpointing(model, autocast: CudaAutocast) -> None:
    """Each block checkpoints with ``_checkpoint_fn`` (what gradient_checkpointing_enable installs)."""
    ckpt = _checkpoint_fn(autocast)
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False):
            m._gradient_checkpointing_func = ckpt


def chunked_loss(model, ids, labels, n_items, chunk: int, ckpt):
    """The "chunked_ce" lever as lora_med.train.plan describes it: the blocks give hidden states, then lm_head +
    cross-entropy run over ``chunk`` tokens at a time, each chunk checkpointed (its logits are recomputed in
    the backward), so the whole batch's fp32 logits never exist."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = core.transformer(input_ids=ids).last_hidden_state
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:]  # ForCausalLMLoss's shift
    h2, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)

    def piece(h, t):
        return F.cross_entropy(core.lm_head(h).float(), t, ignore_index=-100, reduction="sum")

    total = None
    for i in range(0, h2.shape[0], chunk):
        part = ckpt(piece, h2[i : i + chunk], y[i : i + chunk])
        total = part if total is None else total + part
    return total / n_items


def _param_groups(model):
    """Trainer.create_optimizer's two groups (decay / no decay: biases and LayerNorm)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if ("bias" in name or "ln_" in name or "LayerNorm" in name) else decay).append(p)
    return [
        g for g in ({"params": decay, "weight_decay": 0.0}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]
    ]


def _optimizer(model, name: str = "adamw"):
    """torch AdamW, foreach as on CUDA (torch.optim's default there); or bitsandbytes' 8-bit AdamW."""
    if name == "adamw_8bit":
        return _AdamW8bit(model)
    return torch.optim.AdamW(_param_groups(model), lr=1e-5, foreach=True)


class _AdamW8bit:
    """bitsandbytes' AdamW(optim_bits=8) as the Trainer sets it up ("adamw_bnb_8bit"): per parameter, two
    uint8 states and an fp32 absmax per 256 values (bitsandbytes/optim/optimizer.py ``init_state``), fp32
    states for tensors under 4,096 values and for nn.Embedding weights (the Trainer registers a 32-bit
    override for them); the update is one fused in-place kernel per parameter (no temporaries)."""

    def __init__(self, model):
        self.params = [p for g in _param_groups(model) for p in g["params"]]
        emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        self.fp32 = {id(p) for p in self.params if p.numel() < 4096 or id(p) in emb}
        self.state: dict[int, list] = {}

    def step(self):
        for p in self.params:
            if id(p) in self.state or p.grad is None:
                continue
            if id(p) in self.fp32:
                self.state[id(p)] = [torch.zeros_like(p, dtype=torch.float32) for _ in range(2)]
            else:
                blocks = math.ceil(p.numel() / 256)
                self.state[id(p)] = [torch.zeros_like(p, dtype=torch.uint8) for _ in range(2)] + [
                    torch.zeros(blocks, dtype=torch.float32, device=p.device) for _ in range(2)
                ]


# --------------------------------------------------------------------------- one Trainer step


def simulate(
    method: str,
    batch: int,
    *,
    seq: int = 128,
    r: int = 16,
    gradient_checkpointing: bool = False,
    attn: str = "sdpa",
    lora_dropout: float = 0.05,
    steps: int = 3,
    config: dict | None = None,
    chunked_ce: int = 0,
    optimizer: str = "adamw",
) -> dict:
    """Replays ``steps`` training steps; returns the peak of live tensors (bytes, 512-rounded) and its phase,
    and the caching allocator's peaks (allocated, segments in use, reserved), cuBLAS workspaces added.

    ``chunked_ce``: chunk size in tokens for the "chunked_ce" lever (0: the model's own loss);
    ``optimizer``: "adamw" or "adamw_8bit"."""
    autocast = CudaAutocast()
    real_is_enabled = torch.is_autocast_enabled

    def is_autocast_enabled(device_type=None):  # PEFT's 4-bit LoRA asks torch.is_autocast_enabled()
        return autocast.enabled if device_type in (None, "cuda") else real_is_enabled(device_type)

    real_autocast = torch.autocast

    def meta_autocast(device_type, dtype=None, enabled=True, cache_enabled=None):
        # Llama's rotary module switches autocast off around its fp32 tables, naming the tensors' device: on
        # meta tensors that is the replayed CUDA autocast's switch.
        if device_type == "meta":
            return autocast.region(enabled)
        return real_autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

    model = build(
        method, r=r, lora_dropout=lora_dropout, gradient_checkpointing=gradient_checkpointing, attn=attn, config=config
    )
    if gradient_checkpointing:
        _checkpointing(model, autocast)
    opt = _optimizer(model, optimizer)
    vocab = model.config.vocab_size
    tracker = LiveBytes()
    for t in list(model.parameters()) + list(model.buffers()):
        tracker.track(t)
    weights = tracker.current
    torch.is_autocast_enabled = is_autocast_enabled
    torch.autocast = meta_autocast
    try:
        with autocast, tracker:
            for _step in range(steps):
                ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
                labels = torch.zeros(batch, seq, dtype=torch.long, device="meta")
                n_items = torch.zeros((), dtype=torch.long, device="meta")
                tracker.phase = "forward"
                if chunked_ce:
                    with autocast.region(True):
                        loss = chunked_loss(model, ids, labels, n_items, chunked_ce, _checkpoint_fn(autocast))
                else:
                    with autocast.region(True):
                        out = model(input_ids=ids, labels=labels, num_items_in_batch=n_items)
                    # accelerate's convert_outputs_to_fp32: every bf16 output (the logits) gets an fp32 copy
                    out = {
                        k: (v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 else v)
                        for k, v in out.items()
                    }
                    loss = out["loss"]
                    del out  # Trainer.compute_loss returns the loss only
                tracker.phase = "backward"
                loss.backward()
                del loss
                tracker.phase = "optimizer"
                params = [p for p in model.parameters() if p.requires_grad]
                torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=False)  # norms are scalars; the scaling is in place
                opt.step()
                model.zero_grad(set_to_none=True)
                tracker.phase = "between steps"
    finally:
        torch.is_autocast_enabled = real_is_enabled
        torch.autocast = real_autocast
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "method": method,
        "batch_size": batch,
        "seq_len": seq,
        "r": r if method != "full" else None,
        "gradient_checkpointing": gradient_checkpointing,
        "attn": attn,
        "chunked_ce": chunked_ce,
        "optimizer": optimizer,
        "vocab": vocab,
        "trainable": trainable,
        "weights_bytes": weights,
        "peak_bytes": tracker.peak,
        "peak_gb": round(tracker.peak / 1e9, 3),
        "peak_phase": tracker.peak_phase,
        # what torch.cuda.max_memory_allocated would read on an H100/H200: the replay + cuBLAS workspaces
        "peak_with_workspaces_gb": round((tracker.peak + cublas_workspaces(True)) / 1e9, 3),
        # the same through the caching allocator's block rules (whole blocks counted)
        "allocator_peak_allocated_gb": round((tracker.allocator.peak_allocated + cublas_workspaces(True)) / 1e9, 3),
        # segments holding at least one live block at once: what the allocator cannot give back under
        # memory pressure (it frees wholly free cached segments and retries before failing)
        "allocator_peak_segments_gb": round(
            (tracker.allocator.peak_in_use_segments + cublas_workspaces(True)) / 1e9, 3
        ),
        "allocator_reserved_gb": round((tracker.allocator.reserved + cublas_workspaces(True)) / 1e9, 3),
    }


GRID = [(m, b, gc) for m in ("lora", "qlora", "full") for b in (4, 16, 32) for gc in (False, True)]
LEVER_CASES = [
    ("lora", 16, dict(chunked_ce=256)),
    ("lora", 32, dict(chunked_ce=256, gradient_checkpointing=True)),
    ("full", 4, dict(optimizer="adamw_8bit")),
    ("full", 16, dict(optimizer="adamw_8bit")),
    ("full", 16, dict(optimizer="adamw_8bit", chunked_ce=256)),
    ("full", 32, dict(optimizer="adamw_8bit", chunked_ce=256, gradient_checkpointing=True)),
    ("qlora", 16, dict(chunked_ce=256, r=8)),
    ("lora", 16, dict(attn="eager")),
    ("full", 4, dict(attn="eager")),
]


def planner_for(row: dict, config: dict | None = None) -> float:
    """lora_med.train.plan's estimate (bytes) for a replayed row, at the same settings."""
    from transformers import GPT2Config

    from lora_med.train import plan

    shape, meta = plan.shape_from_config(GPT2Config(**(config or DIALOGPT_MEDIUM)))
    lora = row["method"] != "full"
    return plan.estimate(
        shape,
        method=row["method"],
        batch_size=row["batch_size"],
        seq_len=row["seq_len"],
        precision="bf16",
        device="cuda",
        trainable=plan.lora_params(meta, TARGETS, row["r"]) if lora else shape.params,
        gradient_checkpointing=row["gradient_checkpointing"],
        lora_dropout_width=plan.lora_input_width(meta, TARGETS, shape.n_layer) if lora else 0.0,
        attention=row["attn"],
        chunked_ce=bool(row["chunked_ce"]),
        optimizer=row["optimizer"],
    ).total


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Replayed CUDA training memory, DialoGPT-medium shape (bf16, seq 128, AdamW)",
        "",
        "benchmarks/train_memory/simulate.py: the real step on the meta device under CUDA's autocast policy "
        "and the caching allocator's rules, cuBLAS workspaces (sm90) added. Derived, not measured; the H200 "
        "measured 2.42 / 6.92 / 7.19 / 10.64 / 7.04 GB for LoRA r16 b4, b16, full b4, b16, QLoRA r8 b16 "
        "(benchmarks/results/h200-dialogpt-medium-shape/).",
        "",
        "| method | r | batch | levers | max allocated GB | peak at | segments in use GB | reserved GB | "
        "planner GB | planner / replay |",
        "|---|---:|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        levers = (
            ", ".join(
                x
                for x in (
                    "gradient checkpointing" if r["gradient_checkpointing"] else "",
                    f"chunked CE {r['chunked_ce']}" if r["chunked_ce"] else "",
                    "8-bit AdamW" if r["optimizer"] == "adamw_8bit" else "",
                    "eager attention" if r["attn"] == "eager" else "",
                )
                if x
            )
            or "-"
        )
        planned = planner_for(r) / 1e9
        lines.append(
            f"| {r['method']} | {r['r'] or '-'} | {r['batch_size']} | {levers} | "
            f"{r['allocator_peak_allocated_gb']:.3f} | {r['peak_phase']} | {r['allocator_peak_segments_gb']:.3f} | "
            f"{r['allocator_reserved_gb']:.3f} | {planned:.3f} | {planned / r['allocator_peak_allocated_gb']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="lora", choices=["lora", "qlora", "full"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--chunked-ce", type=int, default=0, help="chunk (tokens) for the chunked_ce lever; 0: off")
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw_8bit"])
    ap.add_argument(
        "--grid",
        action="store_true",
        help="every method x batch 4/16/32 x gradient checkpointing (QLoRA at r 8, as on the H200), then the levers",
    )
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args()
    if a.grid:
        cases = [(m, b, {"gradient_checkpointing": gc, "r": 8 if m == "qlora" else a.r}) for m, b, gc in GRID]
        cases += [(m, b, {"r": a.r, **kw}) for m, b, kw in LEVER_CASES]
    else:
        cases = [
            (
                a.method,
                a.batch,
                dict(gradient_checkpointing=a.gc, r=a.r, attn=a.attn, chunked_ce=a.chunked_ce, optimizer=a.optimizer),
            )
        ]
    rows = []
    for method, b, kw in cases:
        row = simulate(method, b, seq=a.seq, **kw)
        rows.append(row)
        levers = ", ".join(f"{k}={v}" for k, v in kw.items() if k != "r" and v)
        print(
            f"{method:5s} b{b:<3d} {levers or 'plain':45s} allocated {row['allocator_peak_allocated_gb']:7.3f} GB "
            f"at {row['peak_phase']:9s} (tensors {row['peak_with_workspaces_gb']:.3f}; segments in use "
            f"{row['allocator_peak_segments_gb']:.3f}; reserved {row['allocator_reserved_gb']:.3f})",
            flush=True,
        )
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        if a.grid and a.seq == 128:  # the table with the planner beside, next to the JSON
            Path(a.out).with_suffix(".md").write_text(markdown(rows), encoding="utf-8")


if __name__ == "__main__":
    main()
