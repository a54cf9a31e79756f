"""The decode graph of GPT-2 models (DialoGPT, the shipped gpt2-es-tiny).

The graph is built from the merged model's weights with the ``onnx`` package, node by node, as
onnxruntime-genai's model builder does, instead of tracing PyTorch: tracing gives thousands of small
nodes (shape arithmetic, masks, transposes) whose launch and host overhead, not the weights, set the
reply time (benchmarks/results/h200-dialogpt-medium-shape/: 5-9 ms of host work per token on an H200). Per layer
it has 9 nodes (fp16 adds 4 Casts):

    MatMul(c_attn) -> Add(bias) -> GroupQueryAttention -> MatMul(c_proj)
    -> SkipLayerNormalization(ln_2; adds the residual and c_proj's bias) -> MatMul(c_fc)
    -> FastGelu(c_fc bias; GPT-2's tanh GELU) -> MatMul(mlp c_proj) -> (the next SkipLayerNormalization)

- Attention is ONNX Runtime's contrib ``com.microsoft.GroupQueryAttention`` with ``kv_num_heads ==
  num_heads`` (plain multi-head attention), packed q|k|v as GPT-2's c_attn writes it, causal, KV cache in
  BNSH ``[batch, heads, capacity, head_dim]``. Past and present are the *same* buffer (the engine binds one
  OrtValue to both), allocated once at the capacity; each row's current length is the ``seqlens_k`` input
  (length - 1, GQA's convention) and ``total_sequence_length`` is the batch maximum. Prompts of a batch are
  right-padded: each row's keys are written from position 0, and the next token of a row goes to its own
  length, overwriting the padding (GQA ignores the cache beyond ``seqlens_k``).
- Positions are an input (GPT-2's learned absolute positions, one per row and token).
- Only the last real position of each row reaches the LM head (``last_index``, GatherND), so a prompt
  never materialises ``[seq, vocab]`` logits; logits are float32 ``[batch, vocab]`` in every precision.
- The LM head multiplies by the transposed embedding matrix (GPT-2 ties them): the fp32/fp16 file holds one
  copy of the largest weight (ORT folds the Transpose once at load); the int8 graph adds an int8 copy for
  the head and keeps the float embedding for the Gather.

Precisions: ``fp32`` (CPU; the CUDA provider has no fp32 GroupQueryAttention kernel), ``fp16`` (CUDA:
weights, matmuls, attention and GELU in fp16; the residual stream and LayerNorm in fp32, with a Cast at each
boundary, because ORT's CUDA SkipLayerNormalization sums mean and variance in its input type; flash attention
keeps its softmax in fp32), ``int8`` (CPU: the fp32 graph through
:func:`lora_med.export.precision.quantize_int8`, the project's one int8 recipe), ``int4`` (CPU:
:func:`lora_med.export.precision.quantize_int4`; the head's int4 weight also serves the embedding rows).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ...errors import ConfigError, LoraMedError
from ...models import load_model, stop_ids
from .common import IO, check_precision, io_values, model_opsets, write_graph, write_info

# GPT-2 activations the graph can express: the tanh approximation (FastGelu) and the exact erf GELU (BiasGelu).
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
ERF_GELU = ("gelu",)


def build(model_dir, out_dir, *, precision: str = "fp32", capacity: int | None = None) -> dict:
    """Write the GPT-2 decode graph of ``model_dir`` into ``out_dir`` (see ``decode_graph.build_decode_graph``).

    Raises:
        LoraMedError: not a GPT-2 model, an activation the graph cannot express, a bad precision or capacity.
    """
    check_precision(precision)
    t0 = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out_dir)
    cfg, weights = _gpt2_weights(model_dir)
    cap = int(capacity or cfg["n_positions"])
    if not 2 <= cap <= cfg["n_positions"]:
        raise ConfigError(
            f"capacity={capacity}: must be between 2 and the model's n_positions "
            f"({cfg['n_positions']}; GPT-2 has no positions beyond it)"
        )
    out.mkdir(parents=True, exist_ok=True)
    model = _graph(cfg, weights, cap, "fp16" if precision == "fp16" else "fp32")
    del weights
    recipe: dict = {
        "builder": "lora_med.export.decode_graph.gpt2",
        "attention": "com.microsoft.GroupQueryAttention (shared past/present buffer, right-padded rows)",
        "layernorm": "com.microsoft.SkipLayerNormalization",
        "gelu": "com.microsoft.FastGelu" if cfg["activation"] in TANH_GELU else "com.microsoft.BiasGelu",
        "lm_head": "MatMul by the tied embedding transposed (folded at load), last position per row only",
    }
    write_graph(model, out, precision, recipe)
    del model
    shape = {
        "model_type": "gpt2",
        "capacity": cap,
        "n_layer": cfg["n_layer"],
        "n_head": cfg["n_head"],
        "n_kv_head": cfg["n_head"],
        "head_dim": cfg["head_dim"],
        "hidden_size": cfg["n_embd"],
        "vocab_size": cfg["vocab_size"],
        "eos_token_ids": cfg["eos_token_ids"],
    }
    return write_info(out, model_dir=model_dir, precision=precision, shape=shape, recipe=recipe, t0=t0)


# --------------------------------------------------------------------------- weights


def _gpt2_weights(model_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The merged model's config and float32 weights (numpy), through transformers (safetensors only)."""
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise LoraMedError(f"{model_dir}: no config.json; give the merged model folder (merge-export's merged/)")
    raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    if raw.get("model_type") != "gpt2":
        raise LoraMedError(
            f"{model_dir}: model_type {raw.get('model_type')!r}; the decode graph is built for GPT-2 models here"
        )
    act = raw.get("activation_function", "gelu_new")
    if act not in TANH_GELU + ERF_GELU:
        raise LoraMedError(
            f"{model_dir}: activation_function {act!r} is not one the decode graph expresses "
            f"({', '.join(TANH_GELU + ERF_GELU)}); use the PyTorch engine for this model"
        )
    model = load_model(str(model_dir))
    c = model.config
    if c.n_embd % c.n_head or (c.n_embd // c.n_head) % 8:
        raise LoraMedError(
            f"{model_dir}: head size {c.n_embd}/{c.n_head} is not a multiple of 8, which ONNX "
            f"Runtime's GroupQueryAttention needs; use the PyTorch engine for this model"
        )
    if c.eos_token_id is None:
        raise LoraMedError(f"{model_dir}/config.json has no eos_token_id; the engine needs one to end replies")
    if getattr(c, "add_cross_attention", False):
        raise LoraMedError(f"{model_dir}: GPT-2 with cross-attention is not a causal chat model")
    head_dim = c.n_embd // c.n_head
    scale = 1.0 / np.sqrt(head_dim) if c.scale_attn_weights else 1.0
    cfg = {
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_embd": c.n_embd,
        "head_dim": head_dim,
        "vocab_size": c.vocab_size,
        "n_positions": c.n_positions,
        "eps": float(c.layer_norm_epsilon),
        "eos_token_ids": stop_ids(model),
        "activation": act,
        "scales": [float(scale / (i + 1) if c.scale_attn_by_inverse_layer_idx else scale) for i in range(c.n_layer)],
    }
    sd = model.state_dict()
    weights = {
        k.removeprefix("transformer."): v.detach().float().numpy()
        for k, v in sd.items()
        if not k.endswith((".attn.bias", ".attn.masked_bias"))
    }
    if "lm_head.weight" in weights and not np.array_equal(weights["lm_head.weight"], weights["wte.weight"]):
        # An untied head (rare for GPT-2) keeps its own matrix.
        cfg["untied_head"] = True
    return cfg, weights


# --------------------------------------------------------------------------- graph


def _graph(cfg: dict, w: dict[str, np.ndarray], capacity: int, dtype: str):
    from onnx import TensorProto, helper, numpy_helper

    half = dtype == "fp16"
    np_t = np.float16 if half else np.float32
    onnx_t = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    nodes, inits = [], []

    def init(name: str, arr: np.ndarray, as_dtype=np_t) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr.astype(as_dtype)), name))
        return name

    def f32(name: str) -> str:  # LayerNorm parameters and the biases SkipLayerNormalization adds: always fp32
        return init(name, w[name], np.float32)

    def node(op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> None:
        nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))

    def cast(x: str, to: int) -> str:
        """fp16 graphs only: x cast to ``to`` (the residual stream and LayerNorm stay fp32, see below)."""
        if not half:
            return x
        out = f"{x}_{'f16' if to == TensorProto.FLOAT16 else 'f32'}"
        node("Cast", [x], [out], out + "/Cast", to=to)
        return out

    # In fp16 the weights, matmuls, attention and GELU are fp16, while the residual stream and the LayerNorm
    # statistics stay fp32: ORT's CUDA SkipLayerNormalization accumulates mean and variance in its input type,
    # which in half precision would sum the squares of GPT-2's large residual activations. Flash attention
    # accumulates its softmax in fp32 by itself.
    L, nh, hd, V = cfg["n_layer"], cfg["n_head"], cfg["head_dim"], cfg["vocab_size"]
    eps = cfg["eps"]
    gelu_op = "FastGelu" if cfg["activation"] in TANH_GELU else "BiasGelu"
    wte = init("wte.weight", w["wte.weight"])
    wpe = init("wpe.weight", w["wpe.weight"][:capacity], np.float32)
    node("Gather", [wte, IO["input_ids"]], ["/embed/tokens"], "/embed/tokens/Gather")
    node("Gather", [wpe, IO["position_ids"]], ["/embed/positions"], "/embed/positions/Gather")
    # The first SkipLayerNormalization adds token and position embeddings and applies h.0.ln_1.
    x, skip, bias = cast("/embed/tokens", TensorProto.FLOAT), "/embed/positions", ""
    for i in range(L):
        p = f"h.{i}."
        ln1 = f"/h.{i}/ln_1"
        node(
            "SkipLayerNormalization",
            [x, skip, f32(p + "ln_1.weight"), f32(p + "ln_1.bias"), bias],
            [ln1, "", "", f"/h.{i}/residual_1"],
            ln1 + "/SkipLayerNorm",
            "com.microsoft",
            epsilon=eps,
        )
        residual = f"/h.{i}/residual_1"
        qkv = f"/h.{i}/attn/qkv"
        node(
            "MatMul",
            [cast(ln1, TensorProto.FLOAT16), init(p + "attn.c_attn.weight", w[p + "attn.c_attn.weight"])],
            [qkv + "_mm"],
            qkv + "/MatMul",
        )
        node("Add", [qkv + "_mm", init(p + "attn.c_attn.bias", w[p + "attn.c_attn.bias"])], [qkv], qkv + "/Add")
        attn = f"/h.{i}/attn/out"
        node(
            "GroupQueryAttention",
            [
                qkv,
                "",
                "",
                IO["past_key"].format(i),
                IO["past_value"].format(i),
                IO["seqlens_k"],
                IO["total_sequence_length"],
            ],
            [attn, IO["present_key"].format(i), IO["present_value"].format(i)],
            f"/h.{i}/attn/GroupQueryAttention",
            "com.microsoft",
            num_heads=nh,
            kv_num_heads=nh,
            scale=cfg["scales"][i],
        )
        proj = f"/h.{i}/attn/proj"
        node("MatMul", [attn, init(p + "attn.c_proj.weight", w[p + "attn.c_proj.weight"])], [proj], proj + "/MatMul")
        ln2 = f"/h.{i}/ln_2"
        node(
            "SkipLayerNormalization",
            [
                cast(proj, TensorProto.FLOAT),
                residual,
                f32(p + "ln_2.weight"),
                f32(p + "ln_2.bias"),
                f32(p + "attn.c_proj.bias"),
            ],
            [ln2, "", "", f"/h.{i}/residual_2"],
            ln2 + "/SkipLayerNorm",
            "com.microsoft",
            epsilon=eps,
        )
        fc = f"/h.{i}/mlp/fc"
        node(
            "MatMul",
            [cast(ln2, TensorProto.FLOAT16), init(p + "mlp.c_fc.weight", w[p + "mlp.c_fc.weight"])],
            [fc],
            fc + "/MatMul",
        )
        act = f"/h.{i}/mlp/act"
        node(
            gelu_op,
            [fc, init(p + "mlp.c_fc.bias", w[p + "mlp.c_fc.bias"])],
            [act],
            act + "/" + gelu_op,
            "com.microsoft",
        )
        mlp = f"/h.{i}/mlp/proj"
        node("MatMul", [act, init(p + "mlp.c_proj.weight", w[p + "mlp.c_proj.weight"])], [mlp], mlp + "/MatMul")
        x, skip, bias = cast(mlp, TensorProto.FLOAT), f"/h.{i}/residual_2", f32(p + "mlp.c_proj.bias")
    node(
        "SkipLayerNormalization",
        [x, skip, f32("ln_f.weight"), f32("ln_f.bias"), bias],
        ["/ln_f"],
        "/ln_f/SkipLayerNorm",
        "com.microsoft",
        epsilon=eps,
    )
    node("GatherND", ["/ln_f", IO["last_index"]], ["/last"], "/last/GatherND", batch_dims=1)
    head = init("lm_head.weight", w["lm_head.weight"]) if cfg.get("untied_head") else wte
    logits_t = "/lm_head/logits_f16" if half else IO["logits"]
    # Transpose of an initializer is folded once when the session loads (ORT constant folding), so the file
    # keeps one copy of the embedding. A Gemm(transB=1) on the shared matrix would avoid even that, but
    # onnxruntime's dynamic quantiser rewrites every Gemm into a MatMul by transposing its B initializer in
    # place, which would corrupt the embedding Gather that shares it.
    node("Transpose", [head], ["/lm_head/weight_t"], "/lm_head/Transpose", perm=[1, 0])
    node("MatMul", [cast("/last", TensorProto.FLOAT16), "/lm_head/weight_t"], [logits_t], "/lm_head/MatMul")
    if half:
        node("Cast", [logits_t], [IO["logits"]], "/lm_head/Cast", to=TensorProto.FLOAT)

    inputs, outputs = io_values(L, ["batch", nh, capacity, hd], onnx_t, V)
    graph = helper.make_graph(nodes, "lora_med_gpt2_decode", inputs, outputs, inits)
    opsets, ir_version = model_opsets()
    model = helper.make_model(graph, opset_imports=opsets, producer_name="lora-med")
    model.ir_version = ir_version
    return model
