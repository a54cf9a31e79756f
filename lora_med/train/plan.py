"""Peak training memory, estimated from the model's shape before any weights are loaded.

Pure arithmetic on a ``Shape`` (read from a config on the meta device), so a CPU-only machine can plan a
run for any GPU. The figure is what ``torch.cuda.max_memory_allocated`` reads on CUDA (tensors and the
caching allocator's blocks; not the CUDA context) and the tensors' bytes on the CPU.

## CUDA (bf16/fp16 autocast, as the Trainer runs it)

Every term below was derived from the libraries' code and checked by replaying the real step on the meta
device under CUDA's autocast policy and the caching allocator's rules (``benchmarks/train_memory/simulate.py``,
"the replay"): the replay reads within 0.1% of the five peaks measured on an NVIDIA H200
(benchmarks/results/h200-dialogpt-medium-shape/results.json), and this
arithmetic is within -0.5% / +1.1% of the replay for LoRA, QLoRA and full at batch 4, 16 and 32 with and
without gradient checkpointing, -0.5% / +4.6% with the levers (benchmarks/train_memory/replay-*.json,
tests/test_plan.py). b = micro-batch, s = sequence,
t = b*s tokens, h = hidden, f = MLP width (4h), a = heads, n = layers, V = vocabulary, P = parameters,
L = block linear-layer weights, T = trainable parameters. DialoGPT-medium figures at seq 128 in brackets.

Alive for the whole step:

* ``weights``: full fine-tune 4P (fp32 master weights; autocast computes in bf16) [1.42 GB]; LoRA 2P (the
  frozen base in bf16) + 4T (PEFT keeps adapters in fp32: ``autocast_adapter_dtype``) [0.71 GB]; QLoRA
  4-bit: L x (0.5 + 1/64 + 4/16384) (nf4 codes, 8-bit absmax per 64, fp32 absmax per 256 blocks: double
  quantisation) + 4(P - L) (``prepare_model_for_kbit_training`` casts every non-quantised parameter to fp32:
  embeddings, LayerNorms, biases) + 4T [0.37 GB]; 8-bit: L x (1 + 4/h) (not replayed); plus registered
  buffers (GPT-2's causal masks: n x 1024^2 bools [25 MB]);
* ``optimizer``: AdamW's two fp32 moments, 8T [2.84 GB full; 0.05 GB LoRA r16]; 8-bit AdamW (bitsandbytes,
  two uint8 states + an fp32 absmax per 256 values each) 2.03 bytes per parameter, but the Trainer keeps
  nn.Embedding weights in 32-bit state (8 bytes) [1.03 GB full];
* ``cublas_workspace``: cuBLAS workspaces come from the caching allocator, one per (handle, stream), and
  handles are per thread: the forward (Python thread) and the backward (autograd's device thread) each get
  32 MiB + 1 MiB cuBLASLt on Hopper (aten/src/ATen/cuda/CublasHandlePool.cpp; 8.1 MiB + 1 MiB on other
  GPUs: this module counts Hopper's, 48 MB more than an RTX 4060 Ti needs) [69 MB].

At the start of the backward pass (the peak unless the optimizer step is larger):

* ``activations`` (what autograd saves), per layer per token, GPT-2 eager code under autocast with fused SDPA
  (FlashAttention saves q, k, v, its output and an fp32 log-sum-exp, no score matrix): qkv 6h + attention
  output 2h + log-sum-exp 4a + two residual dropout masks 2h (CUDA's fused dropout keeps 1-byte masks) +
  two LayerNorm inputs in fp32 8h (layer_norm is on autocast's fp32 list) + GELU: transformers' ``gelu_new``
  is op by op and ``pow`` is on the fp32 list, so it keeps pow's fp32 input 4f, tanh's fp32 output 4f and
  the product's factors 2f (bf16) + 4f (fp32) = 14f (16f when its input is fp32, QLoRA); then per method:
  full: the bf16 inputs of c_attn, c_fc, mlp.c_proj 2h + 2h + 2f (attn.c_proj's is the flash output);
  LoRA/QLoRA: the frozen base layers keep nothing (autograd saves a matmul's input only for a weight that
  needs a gradient), each adapted layer of input width w keeps dropout's mask w + lora_A's bf16 input 2w
  (2w without dropout) [full 86.1h, LoRA 95.1h, QLoRA 103.1h per token per layer; LoRA b16: 4.79 GB];
  outside the layers ln_f's input, lm_head's input and the embedding dropout mask, 7h per token;
  eager attention instead of SDPA adds the scores: fp32 softmax 4as + dropout mask as + dropout output 2as;
* ``autocast_copies``: autocast caches a bf16 copy of each fp32 weight that needs a gradient and the
  matmuls save them for the backward (ATen/autocast_mode.cpp ``cached_cast``): full fine-tune
  2(L + Vh) [0.71 GB]; QLoRA's fp32 lm_head (tied embedding) is cast for every forward and saved 2Vh [0.10 GB];
* ``logits``: ``ForCausalLMLoss`` upcasts the logits to fp32 (``logits.float()``) and cross-entropy keeps its
  log-softmax output (fp32, 4tV); the backward then allocates nll_loss's gradient and log_softmax's gradient
  (4tV each) before the first is freed: 12tV [LoRA b16 1.24 GB]. For a trained lm_head (full) the moments
  after it: 2tV (bf16 logits gradient) + 2Vh (the tied weight's bf16 gradient), then 6Vh - 2Vh (its fp32
  cast beside it, the weight copy released). The forward's end holds 10tV (bf16 logits + fp32 upcast +
  log-softmax output, again when accelerate converts the outputs to fp32).

Deeper in the backward a layer being back-propagated also holds the gradients of its activations
(``LAYER_IN_FLIGHT`` x its saved bytes), and a full fine-tune's weight gradients arrive as activations go.

With gradient checkpointing each layer keeps only its input (2h per token for LoRA's bf16 residual stream,
4h for full and QLoRA, whose residual stream is fp32) and one layer at a time is recomputed in the backward
(the moments at the top layer, every input kept, and at the bottom one, every gradient there); the full
fine-tune's autocast cache still holds every bf16 weight copy until the forward (which computes the loss)
ends.

At the optimizer step: weights + gradients (4T fp32) + moments + foreach AdamW's ``exp_avg_sq_sqrt``, one
fp32 copy of the largest parameter group (torch/optim/adam.py ``_multi_tensor_adam``; bitsandbytes' 8-bit
AdamW updates in place): a full fine-tune's peak at small batches, 20P [7.10 GB].

The estimate is the largest of these moments plus ``allocator_rounding`` (1%: the caching allocator hands
out a cached block whole when under 1 MiB would be left, and max_memory_allocated counts whole blocks; the
replay of its rules shows 0-1% over the tensors); ``Estimate.parts`` are the parts alive at the peak,
``Estimate.peak_at`` its name and ``Estimate.moments`` the total of each moment. Not counted: the CUDA
context (outside the allocator) and the allocator's reserve beyond what it has allocated (fragmentation);
``choose`` adds both, as named margins (``CUDA_CONTEXT_GB``, ``FRAGMENTATION``), before comparing with a
card's memory.

## CPU (fp32 by default)

Korthikanti et al. 2022 ("Reducing Activation Recomputation"): s*b*h*(34 + 5*a*s/h) bytes per layer in
16-bit, twice in fp32, the score term kept because the CPU's SDPA with dropout runs the math path; GPT-2's
op-by-op GELU adds 28 and LoRA's dropout copies of each adapted layer's input 2 per unit of width (both
measured with saved-tensor hooks: tests/test_plan.py, benchmarks/train_memory/saved_activations.py);
logits 3 x 4tV. No autocast copies, workspaces or foreach step copy are counted there. CUDA in fp32 uses
this arithmetic too (without the score term under SDPA): not replayed nor measured.

## The Llama family (Llama, Mistral, Qwen2)

RMSNorm, rotary positions, grouped KV heads and SwiGLU keep other tensors than GPT-2's: ``Shape`` carries the
KV heads and whether the head is tied (an untied head is a second V x h matrix: in the parameters, the
optimizer state and a full fine-tune's autocast copies), and the per-layer terms are the family's own
(``_cuda_llama_layer_bytes``; ``LLAMA_CPU_VALUES`` on the CPU, measured with saved-tensor hooks). Checked
against the replay (which runs transformers' Llama under CUDA's autocast rules) at a small shape: -3% / +15%
(tests/test_plan.py). Their vocabularies (Qwen2.5's 151,936, Llama 3's 128,256) make the logits term the
largest at ordinary batches, which is where ``chunked_ce`` pays.

## Levers

``LEVERS`` names what the trainer can switch to save memory; ``estimate`` models each (keyword arguments)
and ``choose`` picks the fastest combination that fits a budget, returning a ``Choice`` whose ``levers``
are these strings. They are the interface with lora_med.train, which acts on each so:

* ``"gradient_checkpointing"``: ``TrainingArguments(gradient_checkpointing=True,
  gradient_checkpointing_kwargs={"use_reentrant": False})`` (+ ``enable_input_require_grads`` for adapters);
  costs one more forward of the blocks (``compute_factor``: +28% at DialoGPT-medium's shape);
* ``"sdpa"``: load the model with ``attn_implementation="sdpa"`` (transformers' default for GPT-2 when torch
  has it; without it, ``"eager"`` keeps the score matrices);
* ``"chunked_ce"``: do not let the model compute the loss (no ``labels`` to ``model()``, or
  ``logits_to_keep`` so no full-batch logits exist): take the last hidden states, then lm_head +
  cross-entropy (sum, ``ignore_index=-100``, labels shifted as ``ForCausalLMLoss`` does, divided by the
  Trainer's ``num_items_in_batch``) over at most ``CE_CHUNK_TOKENS`` tokens at a time, each chunk under
  ``torch.utils.checkpoint(use_reentrant=False)`` and inside the accelerator's autocast, so its logits are
  freed and recomputed in the backward (``chunked_loss`` in benchmarks/train_memory/simulate.py is the
  reference the planner was checked against; liger-kernel's fused linear cross-entropy is a CUDA
  alternative that computes the gradient in the forward); costs one more lm_head matmul (~5%);
* ``"adamw_8bit"`` (full fine-tune only): ``TrainingArguments(optim="adamw_bnb_8bit")`` (bitsandbytes'
  blockwise 8-bit AdamW; the Trainer keeps embeddings in 32-bit state itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: --plan and --help must not wait for torch
    import torch

GB = 1e9
MIB = 1024**2

# cuBLAS + cuBLASLt workspace per thread that runs matmuls, Hopper's (CublasHandlePool.cpp), x2 threads.
CUBLAS_WORKSPACES = 2 * (32 + 1) * MIB
# Chunk of tokens whose logits exist at once with the "chunked_ce" lever.
CE_CHUNK_TOKENS = 256
# Bytes per quantised weight: nf4 codes + 8-bit absmax per 64 + fp32 absmax per 256 blocks (double quant).
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# int8 weights + an fp32 scale per output row (counted per weight at the hidden size in ``estimate``).
INT8_BYTES = 1.0
# Gradients of a layer's activations alive while it is back-propagated, as a share of what it saved: the
# replay shows 0.3-0.5 (1.3x a layer at DialoGPT-medium b32 with checkpointing); 0.3 undercounts small
# shapes by up to 6%, 0.5 never (tests/test_plan.py replays them).
LAYER_IN_FLIGHT = 0.5
# max_memory_allocated over the tensors' own bytes: the caching allocator's whole-block handouts (see
# ``_estimate_cuda``).
ALLOCATOR_ROUNDING = 0.01

LEVERS = ("sdpa", "chunked_ce", "adamw_8bit", "gradient_checkpointing")
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class Shape:
    n_layer: int
    hidden: int
    heads: int
    vocab: int
    params: int  # all parameters, tied embeddings once
    linear_params: int  # parameters in the transformer blocks' linear layers (quantisable)
    model_type: str = ""
    ffn: int = 0  # MLP width (0: 4 x hidden, GPT-2's default)
    buffer_bytes: int = 0  # registered buffers (GPT-2: a bool causal mask per layer)
    embedding_params: int = 0  # nn.Embedding weights (tied lm_head once): 8-bit AdamW keeps them in fp32
    kv_heads: int = 0  # grouped-query attention's key/value heads (0: as many as the query heads)
    tied: bool = True  # lm_head shares the embedding matrix (an untied head is a second V x h matrix)

    @property
    def mlp(self) -> int:
        return self.ffn or 4 * self.hidden

    @property
    def kv_dim(self) -> int:
        """Width of the keys (and of the values): hidden x kv_heads / heads."""
        return self.hidden * (self.kv_heads or self.heads) // self.heads

    @property
    def llama_family(self) -> bool:
        """RMSNorm, rotary positions, grouped KV heads and a SwiGLU MLP (Llama, Mistral, Qwen2)."""
        return self.model_type in LLAMA_FAMILY


@dataclass(frozen=True)
class Estimate:
    parts: dict  # name -> bytes alive at the peak moment
    batch_size: int
    seq_len: int
    peak_at: str = ""  # which moment of the step is the peak
    moments: dict = field(default_factory=dict)  # moment -> total bytes

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def as_dict(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "total_gb": round(self.total / GB, 3),
            **{f"{k}_gb": round(v / GB, 3) for k, v in self.parts.items()},
            "peak_at": self.peak_at,
            "moments": {k: round(v / GB, 3) for k, v in self.moments.items()},
        }  # GB


def shape_from_config(config) -> tuple[Shape, torch.nn.Module]:
    """Shape of a model from its config alone, via a weightless (meta device) instance.

    Returns the shape and the meta model (whose module names let callers check LoRA targets).
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    seen, params = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
    linear = sum(
        m.weight.numel() for name, m in model.named_modules() if _is_linear(m) and not name.endswith("lm_head")
    )
    n_layer = getattr(config, "n_layer", None) or config.num_hidden_layers
    hidden = getattr(config, "n_embd", None) or config.hidden_size
    heads = getattr(config, "n_head", None) or config.num_attention_heads
    ffn = getattr(config, "n_inner", None) or getattr(config, "intermediate_size", None) or 4 * hidden
    # Registered buffers the step keeps on the card (GPT-2's causal masks); rotary tables are not persistent.
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    embeddings = sum(
        {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)}.values()
    )
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head = model.get_output_embeddings()
    tied = head is None or head.weight is model.get_input_embeddings().weight
    return Shape(
        n_layer,
        hidden,
        heads,
        config.vocab_size,
        params,
        linear,
        config.model_type,
        ffn,
        buffers,
        embeddings,
        kv_heads,
        tied,
    ), model


def _is_linear(module) -> bool:
    return type(module).__name__ in ("Linear", "Conv1D")


def lora_params(meta_model, target_modules: list[str], r: int) -> int:
    """Parameters LoRA adds: r * (in + out) for every targeted linear layer."""
    total = 0
    for name, m in meta_model.named_modules():
        if _is_linear(m) and name.split(".")[-1] in target_modules:
            w = m.weight.shape
            total += r * (w[0] + w[1])
    return total


# Activation bytes per layer (16-bit units of s*b*h) beyond Korthikanti's 34, where an architecture's
# implementation keeps more (measured on the CPU; see the module docstring).
UNFUSED_EXTRA = {"gpt2": 28}


def lora_input_width(meta_model, target_modules: list[str], n_layer: int) -> float:
    """Summed input width of the targeted layers, per transformer layer, in units of the hidden size:
    what LoRA's dropout copies (GPT-2 c_attn + attn c_proj + c_fc + mlp c_proj: h + h + h + 4h = 7)."""
    widths = [
        (m.weight.shape[0] if type(m).__name__ == "Conv1D" else m.weight.shape[1])
        for name, m in meta_model.named_modules()
        if _is_linear(m) and name.split(".")[-1] in target_modules
    ]
    hidden = getattr(meta_model.config, "n_embd", None) or meta_model.config.hidden_size
    return sum(widths) / hidden / n_layer


def compute_factor(shape: Shape, levers) -> float:
    """Compute of a step relative to a plain one: gradient checkpointing runs the blocks' forward again
    (2L of the 6P FLOPs per token: +28% at DialoGPT-medium's shape, "about 1/3" for bigger models); chunked
    cross-entropy with recompute runs lm_head again (2Vh of 6P: +5%)."""
    extra = 0.0
    if "gradient_checkpointing" in levers:
        extra += 2 * shape.linear_params / (6 * shape.params)
    if "chunked_ce" in levers:
        extra += 2 * shape.vocab * shape.hidden / (6 * shape.params)
    return 1.0 + extra


def _cuda_layer_bytes(
    shape: Shape, method: str, seq_len: int, lora_width: float, lora_dropout: bool, attention: str
) -> float:
    """Bytes autograd keeps per token per layer on CUDA under bf16 autocast (see the module docstring)."""
    h, f, a = shape.hidden, shape.mlp, shape.heads
    qlora = method == "qlora"
    if shape.llama_family:
        return _cuda_llama_layer_bytes(shape, method, seq_len, lora_width, lora_dropout, attention)
    common = 6 * h + 2 * h + 4 * a + 2 * h + 8 * h + (16 if qlora else 14) * f
    own: float
    if method == "full":
        own = 2 * h + 2 * h + 2 * f
    else:
        own = (3 if lora_dropout else 2) * lora_width * h
    if attention == "eager":  # the score matrices, and no flash output kept by frozen attn.c_proj's side
        common += 7 * a * seq_len - 4 * a - (0 if method == "full" else 2 * h)
    return common + own


def _cuda_llama_layer_bytes(
    shape: Shape, method: str, seq_len: int, lora_width: float, lora_dropout: bool, attention: str
) -> float:
    """The Llama family's layer under bf16 autocast (transformers' LlamaDecoderLayer; the replay's figures in
    tests/test_plan.py): RMSNorm upcasts its input to fp32 and keeps it (4h; a full fine-tune's trained norm
    weight also keeps the fp32 normalised input, 4h more); FlashAttention keeps q, the grouped keys and values
    (2h + 2 x 2kv) and its output (2h) and log-sum-exp (4a); SwiGLU keeps SiLU's input and both factors of
    the product (6f in bf16, 12f in fp32 for QLoRA, whose dequantised layers return fp32); a full fine-tune
    keeps the bf16 casts of the inputs of q, k, v (one each: 6h), gate and up (4h) and down (2f); adapters
    keep dropout's mask and lora_A's bf16 input (3 bytes per unit of input width, 2 without dropout)."""
    h, f, a, kv = shape.hidden, shape.mlp, shape.heads, shape.kv_dim
    attn = 2 * h + 4 * kv + 2 * h + 4 * a
    if method == "full":
        layer: float = 8 * h + 8 * h + 6 * h + 4 * h + 2 * f + 6 * f + attn
    else:
        layer = 4 * h + 4 * h + (12 if method == "qlora" else 6) * f + attn
        layer += (3 if lora_dropout else 2) * lora_width * h
    if attention == "eager":  # the score matrices: fp32 softmax + its bf16 copy (no dropout in these models)
        layer += 6 * a * seq_len - 4 * a
    return layer


# Activation values (fp32) per token per layer the Llama family keeps on the CPU (saved-tensor hooks on
# transformers' Llama and Qwen2, tests/test_plan.py): 10h + 4f + heads + 66 for a full fine-tune; LoRA adds
# its dropout copies of the adapted layers' inputs (``lora_input_width``: 6h + f) and 2h.
LLAMA_CPU_VALUES = (10, 4, 1, 66)  # x hidden, x MLP width, x heads, constant


def estimate(
    shape: Shape,
    *,
    method: str,
    batch_size: int,
    seq_len: int,
    precision: str,
    device: str,
    trainable: int,
    gradient_checkpointing: bool = False,
    quant_bits: int = 4,
    lora_dropout_width: float = 0.0,
    lora_width: float | None = None,
    attention: str = "sdpa",
    chunked_ce: bool = False,
    optimizer: str = "adamw",
    ce_chunk: int = CE_CHUNK_TOKENS,
) -> Estimate:
    """Estimated peak training memory in bytes, by part (see the module docstring).

    Args:
        shape: from ``shape_from_config``.
        method: "full", "lora" or "qlora".
        precision: "bf16"/"fp16" (autocast on CUDA) or "fp32".
        device: "cuda" (any "cuda:N") or "cpu"; pure arithmetic, no device is touched.
        trainable: trainable parameters (``lora_params`` or ``shape.params``).
        lora_dropout_width: ``lora_input_width`` when LoRA dropout is on (it keeps a copy), else 0.
        lora_width: ``lora_input_width`` whether or not dropout is on (CUDA: adapters without dropout
            still keep lora_A's bf16 input); defaults to ``lora_dropout_width``, or when that is 0 to every
            linear layer adapted (an upper bound).
        attention: "sdpa" or "eager" (CUDA only; the CPU figure keeps the scores either way).
        chunked_ce: the "chunked_ce" lever (logits of at most ``ce_chunk`` tokens at once).
        optimizer: "adamw" (torch, foreach) or "adamw_8bit" (bitsandbytes).
    """
    if device.startswith("cuda") and precision in ("bf16", "fp16"):
        if lora_width is None:
            # Without dropout the callers pass no width (lora_dropout_width 0), yet lora_A still keeps its
            # bf16 input: count every linear layer adapted (3h + f wide), the most it can be.
            lora_width = lora_dropout_width or (3 + shape.mlp / shape.hidden)
        return _estimate_cuda(
            shape,
            method=method,
            b=batch_size,
            s=seq_len,
            trainable=trainable,
            gc=gradient_checkpointing,
            quant_bits=quant_bits,
            lora_dropout=lora_dropout_width > 0,
            lora_width=lora_width,
            attention=attention,
            chunked_ce=chunked_ce,
            optimizer=optimizer,
            ce_chunk=ce_chunk,
        )
    half = precision in ("bf16", "fp16")
    weights: float  # bytes (a 4-bit weight is half a byte)
    if method == "full":
        weights = shape.params * 4
    elif method == "lora":
        weights = shape.params * (2 if half else 4)
    else:  # qlora
        quant = shape.linear_params * (0.5 if quant_bits == 4 else 1.0)
        weights = quant + (shape.params - shape.linear_params) * (2 if half else 4)
    if method != "full":
        weights += trainable * 4  # LoRA A/B kept in fp32
    act_bytes = 1 if half else 2  # multiplier on the 16-bit formula
    s, b, h, a = seq_len, batch_size, shape.hidden, shape.heads
    # The CPU's SDPA with dropout runs the math path; fp32 on CUDA runs the memory-efficient kernel.
    scores = 0 if device.startswith("cuda") and attention == "sdpa" else 5 * a * s / h
    per_layer = s * b * h * (34 + UNFUSED_EXTRA.get(shape.model_type, 0) + scores + 2 * lora_dropout_width) * act_bytes
    if shape.llama_family:  # no attention dropout: the CPU's SDPA keeps no score matrix
        ch, cf, ca, c0 = LLAMA_CPU_VALUES
        values = ch * h + cf * shape.mlp + ca * a + c0 + ((lora_dropout_width + 2) * h if lora_dropout_width else 0)
        per_layer = s * b * values * 2 * act_bytes
    if gradient_checkpointing:
        activations = shape.n_layer * 2 * s * b * h * act_bytes + per_layer
    else:
        activations = shape.n_layer * per_layer
    tokens = min(b * s, ce_chunk) if chunked_ce else b * s
    state = trainable * (2 + 1 / 32 if optimizer == "adamw_8bit" else 8)
    return Estimate(
        {
            "weights": weights,
            "gradients": trainable * 4,
            "optimizer": state,
            "activations": activations,
            "logits": 3 * tokens * shape.vocab * 4,
        },
        batch_size,
        seq_len,
        peak_at="backward",
    )


def _estimate_cuda(
    shape: Shape,
    *,
    method: str,
    b: int,
    s: int,
    trainable: int,
    gc: bool,
    quant_bits: int,
    lora_dropout: bool,
    lora_width: float,
    attention: str,
    chunked_ce: bool,
    optimizer: str,
    ce_chunk: int = CE_CHUNK_TOKENS,
) -> Estimate:
    P, L, V, h, n, T = shape.params, shape.linear_params, shape.vocab, shape.hidden, shape.n_layer, trainable
    t = b * s
    weights: float  # bytes
    if method == "full":
        weights = 4 * P
    elif method == "lora":
        weights = 2 * P + 4 * T
    elif method == "qlora":
        per_weight = NF4_BYTES if quant_bits == 4 else INT8_BYTES + 4 / h
        weights = L * per_weight + 4 * (P - L) + 4 * T
    else:
        raise ValueError(f"method {method!r}: use full, lora or qlora")
    weights += shape.buffer_bytes
    if optimizer == "adamw_8bit":
        # uint8 moments + an fp32 absmax per 256 values each; the Trainer keeps nn.Embedding weights in
        # 32-bit state (a GlobalOptimManager override), bitsandbytes any tensor under 4,096 values
        emb = shape.embedding_params if method == "full" else 0
        state = 8 * emb + (2 + 8 / 256) * (T - emb)
    else:
        state = 8 * T
    static = {"weights": weights, "optimizer": state, "cublas_workspace": CUBLAS_WORKSPACES}

    layer = _cuda_layer_bytes(shape, method, s, lora_width, lora_dropout, attention)
    outside = 7 * h * t
    layer_input = (2 if method == "lora" else 4) * h  # the residual stream: bf16 for LoRA, fp32 otherwise
    lm_copy = 2 * V * h if method in ("full", "qlora") else 0  # bf16 lm_head weight saved by its matmul
    all_copies = 2 * (L + V * h) if method == "full" else lm_copy  # full: autocast's cache of every weight
    kept = n * (layer_input if gc else layer) * t + outside

    moments: dict[str, dict] = {}
    if chunked_ce:
        # Chunks of c tokens, each checkpointed: a chunk's logits exist in its forward and again in its
        # backward (12cV, as below). The hidden state's gradient collects every chunk's slice
        # (slice_backward: a full-size fp32 buffer + one slice result). A trained lm_head gets a bf16
        # weight gradient per chunk, cast to fp32 and summed across chunks (the replay shows one chunk's bf16
        # gradient still pending while the next chunk's loss is back-propagated): counted as 6Vh beside the
        # loss and 8Vh (sum + fp32 cast + bf16, the chunk's weight copy freed) at the cast, an upper bound
        # that the replay undercuts by 3-4%.
        c = min(t, ce_chunk)
        hidden_grad = 8 * h * t
        full = method == "full"
        bwd_copies = lm_copy if gc else all_copies
        moments["forward (loss)"] = {"activations": kept, "autocast_copies": all_copies, "logits": 10 * c * V}
        moments["backward (loss)"] = {
            "activations": kept,
            "autocast_copies": bwd_copies,
            "logits": 12 * c * V + hidden_grad,
            "gradients": 6 * V * h if full else 0,
        }
        if full:
            moments["backward (lm_head)"] = {
                "activations": kept,
                "autocast_copies": bwd_copies - 2 * V * h,
                "logits": hidden_grad,
                "gradients": 10 * V * h,
            }
    else:
        copies = lm_copy if gc else all_copies
        moments["forward (loss)"] = {"activations": kept, "autocast_copies": all_copies, "logits": 10 * t * V}
        moments["backward (loss)"] = {"activations": kept, "autocast_copies": copies, "logits": 12 * t * V}
        if method == "full":
            # lm_head's backward: the bf16 logits gradient and the tied weight's bf16 gradient; then its
            # weight copy is released and the gradient cast to fp32 (bf16 + fp32 alive at the cast)
            moments["backward (lm_head)"] = {
                "activations": kept,
                "autocast_copies": copies,
                "logits": 2 * t * V,
                "gradients": 2 * V * h,
            }
            moments["backward (lm_head cast)"] = {
                "activations": kept,
                "autocast_copies": copies - 2 * V * h,
                "gradients": 6 * V * h,
            }
    # Back-propagating a layer holds, besides what it saved, gradients of its activations (LAYER_IN_FLIGHT).
    in_flight = LAYER_IN_FLIGHT * layer * t
    if gc:
        # One layer recomputed and back-propagated, with its weight copies for a full fine-tune. Going down
        # the layers, checkpointed inputs are freed as gradients arrive, so the extremes are the top layer
        # (every input, the tied weight's gradient for a full fine-tune) and the bottom one (one input,
        # every gradient).
        layer_moment = {"autocast_copies": 2 * L / n if method == "full" else 0}
        moments["backward (recompute, top layer)"] = {
            **layer_moment,
            "activations": kept + layer * t + in_flight,
            "gradients": 4 * V * h if method == "full" else 4 * T,
        }
        moments["backward (recompute, bottom layer)"] = {
            **layer_moment,
            "activations": layer_input * t + outside + layer * t + in_flight,
            "gradients": 4 * T,
        }
    else:
        # the top layer's backward: everything saved, its gradients in flight, its weight gradients (and the
        # tied weight's from lm_head) for a full fine-tune
        moments["backward (top layer)"] = {
            "activations": kept + in_flight,
            "autocast_copies": all_copies,
            "gradients": 4 * (L / n + V * h) if method == "full" else 4 * T,
        }
    # the end of the backward: every gradient, plus the embedding's dense fp32 gradient if it is trained
    moments["backward (end)"] = {"gradients": 4 * T + (4 * V * h if method == "full" else 0)}
    # foreach AdamW: one fp32 copy of the largest parameter group (exp_avg_sq_sqrt); 8-bit AdamW: none
    moments["optimizer step"] = {"gradients": 4 * T, "optimizer_step": 4 * T if optimizer == "adamw" else 0}

    def tensors(m):
        return sum(static.values()) + sum(m.values())

    peak_at = max(moments, key=lambda k: tensors(moments[k]))
    parts = {
        k: 0.0
        for k in (
            "weights",
            "gradients",
            "optimizer",
            "optimizer_step",
            "activations",
            "logits",
            "autocast_copies",
            "cublas_workspace",
        )
    }
    parts.update(static)
    parts.update(moments[peak_at])
    # The caching allocator hands out a cached block whole when less than 1 MiB would be left over
    # (CUDACachingAllocator.cpp should_split), and max_memory_allocated counts whole blocks: 0-1% more than
    # the tensors in the replay of its rules (benchmarks/train_memory/simulate.py) at the five H200 points.
    parts["allocator_rounding"] = ALLOCATOR_ROUNDING * sum(parts.values())
    return Estimate(
        parts, b, s, peak_at=peak_at, moments={k: tensors(v) * (1 + ALLOCATOR_ROUNDING) for k, v in moments.items()}
    )


def saved_activation_bytes(model, run=None, **inputs) -> int:
    """Bytes autograd keeps for the backward pass in one forward of ``model(**inputs)`` (or of ``run()``, e.g. a
    loss computed another way): the distinct storages saved by any op, parameters left out. The measurement the
    activation term is checked against."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run() if run is not None else model(**inputs)
    return sum(n for ptr, n in seen.items() if ptr not in params)


def choose_batch(effective: int, fits) -> tuple[int, int] | None:
    """Largest micro-batch dividing ``effective`` for which ``fits(batch)`` holds, and the grad-accum
    that keeps the effective batch. None if not even batch 1 fits."""
    for b in range(effective, 0, -1):
        if effective % b == 0 and fits(b):
            return b, effective // b
    return None
