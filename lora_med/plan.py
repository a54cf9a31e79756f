"""Peak training memory, estimated from the model's shape before any weights are loaded.

The estimate adds up what training holds at its peak (the backward pass):

* weights: fp32 for a full fine-tune (mixed precision keeps fp32 master weights); the frozen base
  in the compute dtype for LoRA (fp32 on the CPU, 16-bit on a GPU), 4-bit (0.5 B) or 8-bit (1 B)
  linear weights for QLoRA; LoRA's own A/B matrices in fp32;
* gradients (fp32, trainable parameters only) and AdamW's two fp32 moments;
* activations per layer, after Korthikanti et al. 2022 ("Reducing Activation Recomputation"):
  s*b*h*(34 + 5*a*s/h) bytes in 16-bit, twice that in fp32; the 5*a*s/h term (attention score
  matrices) is dropped for fused SDPA attention on CUDA. Their 34 assumes a fused GELU; transformers'
  GPT-2 computes its tanh GELU op by op and autograd keeps each intermediate: measured with saved-tensor
  hooks (benchmarks/train_memory/saved_activations.py) it saves 144 bytes*s*b*h per layer in fp32 at
  s=128 where the formula says 88, so GPT-2 gets 28 more (16-bit units). LoRA's dropout keeps a copy of
  each targeted layer's input (measured: +28 for GPT-2's c_attn/c_proj/c_fc, whose inputs are 7h wide).
  With gradient checkpointing only each layer's input (2 bytes*s*b*h in 16-bit) is kept, plus one
  layer recomputed;
* logits: the LM head output, its fp32 copy for the loss and its gradient: 3 x b*s*V x 4 bytes.

It does not count the CUDA context (~0.3-0.5 GB outside ``torch.cuda.max_memory_allocated``) nor
allocator fragmentation; benchmarks/train_memory compares it with measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Shape:
    n_layer: int
    hidden: int
    heads: int
    vocab: int
    params: int  # all parameters, tied embeddings once
    linear_params: int  # parameters in the transformer blocks' linear layers (quantisable)
    model_type: str = ""


@dataclass(frozen=True)
class Estimate:
    parts: dict  # name -> bytes
    batch_size: int
    seq_len: int

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def as_dict(self) -> dict:
        return {"batch_size": self.batch_size, "seq_len": self.seq_len, "total_gb": round(self.total / GB, 3),
                **{f"{k}_gb": round(v / GB, 3) for k, v in self.parts.items()}}


def shape_from_config(config) -> tuple[Shape, "object"]:
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
    linear = sum(m.weight.numel() for name, m in model.named_modules()
                 if _is_linear(m) and not name.endswith("lm_head"))
    n_layer = getattr(config, "n_layer", None) or config.num_hidden_layers
    hidden = getattr(config, "n_embd", None) or config.hidden_size
    heads = getattr(config, "n_head", None) or config.num_attention_heads
    return Shape(n_layer, hidden, heads, config.vocab_size, params, linear, config.model_type), model


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
# implementation keeps more (measured; see the module docstring).
UNFUSED_EXTRA = {"gpt2": 28}


def lora_input_width(meta_model, target_modules: list[str], n_layer: int) -> float:
    """Summed input width of the targeted layers, per transformer layer, in units of the hidden size:
    what LoRA's dropout copies (GPT-2 c_attn + attn c_proj + c_fc + mlp c_proj: h + h + h + 4h = 7)."""
    widths = [(m.weight.shape[0] if type(m).__name__ == "Conv1D" else m.weight.shape[1])
              for name, m in meta_model.named_modules() if _is_linear(m) and name.split(".")[-1] in target_modules]
    hidden = getattr(meta_model.config, "n_embd", None) or meta_model.config.hidden_size
    return sum(widths) / hidden / n_layer


def estimate(shape: Shape, *, method: str, batch_size: int, seq_len: int, precision: str, device: str,
             trainable: int, gradient_checkpointing: bool = False, quant_bits: int = 4,
             lora_dropout_width: float = 0.0) -> Estimate:
    """Estimated peak training memory in bytes, by part (see the module docstring).

    ``lora_dropout_width``: ``lora_input_width`` when LoRA dropout is on (it keeps a copy), else 0.
    """
    half = precision in ("bf16", "fp16")
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
    scores = 0 if (device == "cuda") else 5 * a * s / h  # fused SDPA on CUDA keeps no score matrices
    per_layer = s * b * h * (34 + UNFUSED_EXTRA.get(shape.model_type, 0) + scores + 2 * lora_dropout_width) * act_bytes
    if gradient_checkpointing:
        activations = shape.n_layer * 2 * s * b * h * act_bytes + per_layer
    else:
        activations = shape.n_layer * per_layer
    return Estimate({
        "weights": weights,
        "gradients": trainable * 4,
        "optimizer": trainable * 8,
        "activations": activations,
        "logits": 3 * b * s * shape.vocab * 4,
    }, batch_size, seq_len)


def saved_activation_bytes(model, **inputs) -> int:
    """Bytes autograd keeps for the backward pass in one forward of ``model(**inputs)``: the distinct
    storages saved by any op, parameters left out. The measurement the activation term is checked against."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**inputs)
    return sum(n for ptr, n in seen.items() if ptr not in params)


def choose_batch(effective: int, fits) -> tuple[int, int] | None:
    """Largest micro-batch dividing ``effective`` for which ``fits(batch)`` holds, and the grad-accum
    that keeps the effective batch. None if not even batch 1 fits."""
    for b in range(effective, 0, -1):
        if effective % b == 0 and fits(b):
            return b, effective // b
    return None
