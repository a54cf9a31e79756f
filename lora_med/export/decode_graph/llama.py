"""The decode graph of the Llama family (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM, TinyLlama ...), with the
same inputs and outputs as the GPT-2 graph (``common.IO``), so the engine runs both alike.

Written node by node from the merged weights, as onnxruntime-genai's model builder writes these models. Per
layer 11 nodes (+1 Add for Qwen2's q/k/v biases; fp16 adds 4 Casts):

    SkipSimplifiedLayerNormalization(input_layernorm; adds the residual) -> MatMul(q|k|v packed) [-> Add(bias)]
    -> GroupQueryAttention(kv_num_heads <= num_heads, rotary inside) -> MatMul(o_proj)
    -> SkipSimplifiedLayerNormalization(post_attention_layernorm) -> MatMul(gate), MatMul(up)
    -> Sigmoid -> Mul (SiLU) -> Mul(up) -> MatMul(down) -> (the next SkipSimplifiedLayerNormalization)

- RMSNorm is ``SimplifiedLayerNormalization`` (on the embeddings) and ``com.microsoft.SkipSimplified-
  LayerNormalization`` (residual add + RMSNorm in one node); an o_proj bias goes in as its ``bias`` input.
- Qwen3 normalises each head's query and key before the rotary (q_norm, k_norm): the packed projection is
  split, q and k go through ``SimplifiedLayerNormalization`` over the head size (reshaped per head), and
  GroupQueryAttention takes q, k and v as three inputs (GQA's own q/k-norm inputs are CUDA-only).
- Rotary positions are applied inside GroupQueryAttention (``do_rotary=1``, ``rotary_interleaved=0``:
  transformers' rotate_half), from cos/sin tables ``[capacity, head_dim / 2]`` computed by the model's own
  rotary module, so the rope type (default, linear, llama3, yarn) and its attention scaling are the model's.
  GQA takes each row's positions from ``seqlens_k`` (0.. for a first prompt, the cached length onward for a
  step or a continued prompt): the numbers the engine writes into ``position_ids``, which stays an input of
  the common contract, unused here (some CUDA builds of the kernel refuse a position_ids input).
- KV cache BNSH ``[batch, kv_heads, capacity, head_dim]``: grouped-query attention keeps ``kv_heads`` (2 for
  Qwen2.5-0.5B's 14 query heads) per layer, past and present one buffer, as in the GPT-2 graph.
- Only the last real position of each row reaches the head; a tied head multiplies by the transposed
  embedding (folded at load: one copy in the file), an untied one by ``lm_head.weight`` transposed.

Refused with a message (the export then ships the Optimum graph only): head sizes that are not a multiple
of 16 (GQA's fused rotary), MLP biases, partial rotary, rope types whose tables depend on the length
(dynamic, longrope), and a capacity beyond a sliding window.
Measured against transformers (fp32, random weights, Qwen2.5-0.5B's shape): max |logit difference| 5.1e-6;
onnxruntime-genai's builder graph of the same model reads the same 5.1e-6, and decodes at the same speed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ...errors import ConfigError, LoraMedError
from ...models import load_model, stop_ids
from .common import IO, check_precision, io_values, model_opsets, write_graph, write_info

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # fixed tables; dynamic/longrope depend on the length
# Tokens per row the KV cache holds unless asked: a row costs 2 x layers x kv_heads x head_dim x 4 bytes per
# token in fp32 (Qwen2.5-0.5B: 24.6 KB, so 50 MB a row at 2048, 805 MB at its full 32768).
DEFAULT_CAPACITY = 2048


def build(model_dir, out_dir, *, precision: str = "fp32", capacity: int | None = None) -> dict:
    """Write the Llama-family decode graph of ``model_dir`` into ``out_dir`` (see
    ``decode_graph.build_decode_graph``); capacity defaults to min(max_position_embeddings, 2048).

    Raises:
        LoraMedError: a model the graph cannot express (named, with why), a bad precision or capacity.
    """
    check_precision(precision)
    t0 = time.perf_counter()
    model_dir, out = Path(model_dir), Path(out_dir)
    cfg, weights = llama_weights(model_dir, capacity)
    out.mkdir(parents=True, exist_ok=True)
    model = _graph(cfg, weights, "fp16" if precision == "fp16" else "fp32")
    del weights
    recipe: dict = {
        "builder": "lora_med.export.decode_graph.llama",
        "attention": "com.microsoft.GroupQueryAttention (rotary inside, positions from seqlens_k, "
        f"{cfg['n_kv_head']} KV heads for {cfg['n_head']} query heads, shared past/present buffer)",
        "norm": "SimplifiedLayerNormalization + com.microsoft.SkipSimplifiedLayerNormalization",
        "mlp": "SwiGLU: MatMul(gate), MatMul(up), Sigmoid, Mul, Mul",
        "lm_head": ("MatMul by the tied embedding transposed (folded at load)" if cfg["tied"] else "MatMul by lm_head")
        + ", last position per row only",
    }
    write_graph(model, out, precision, recipe)
    del model
    shape = {k: cfg[k] for k in ("model_type", "capacity", "n_layer", "n_head", "n_kv_head", "head_dim")}
    shape.update(hidden_size=cfg["hidden"], vocab_size=cfg["vocab_size"], eos_token_ids=cfg["eos_token_ids"])
    return write_info(out, model_dir=model_dir, precision=precision, shape=shape, recipe=recipe, t0=t0)


# --------------------------------------------------------------------------- weights


def _refuse(model_dir: Path, why: str) -> LoraMedError:
    return LoraMedError(f"{model_dir}: {why}; the export ships the Optimum graph (onnx/) for this model")


def llama_weights(model_dir: Path, capacity: int | None) -> tuple[dict, dict[str, np.ndarray]]:
    """The model's shape and float32 weights (numpy, laid out ``[in, out]`` for MatMul, q|k|v packed)."""
    import torch

    raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    if raw.get("model_type") not in MODEL_TYPES:
        raise _refuse(model_dir, f"model_type {raw.get('model_type')!r} is not one of {', '.join(MODEL_TYPES)}")
    model = load_model(str(model_dir))
    c = model.config
    if getattr(c, "hidden_act", "silu") != "silu":
        raise _refuse(model_dir, f"hidden_act {c.hidden_act!r}: the graph's MLP is SwiGLU (silu)")
    nh = c.num_attention_heads
    nkv = getattr(c, "num_key_value_heads", None) or nh
    hd = getattr(c, "head_dim", None) or c.hidden_size // nh
    if nh % nkv:
        raise _refuse(model_dir, f"{nh} attention heads are not a multiple of {nkv} KV heads")
    if hd % 16:
        raise _refuse(model_dir, f"head size {hd} is not a multiple of 16, which GroupQueryAttention's rotary needs")
    rope = dict(getattr(c, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise _refuse(model_dir, f"rope type {rope_type!r} is not one the graph expresses ({', '.join(ROPE_TYPES)})")
    if getattr(c, "partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(model_dir, "partial rotary embeddings are not expressed by the graph")
    if getattr(c, "mlp_bias", False):
        raise _refuse(model_dir, "MLP biases (mlp_bias=True) are not expressed by the graph")
    max_pos = int(c.max_position_embeddings)
    cap = int(capacity or min(max_pos, DEFAULT_CAPACITY))
    if not 2 <= cap <= max_pos:
        raise ConfigError(f"capacity={capacity}: must be between 2 and the model's max_position_embeddings ({max_pos})")
    window = getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None
    if window and cap > window:  # within the window the attention is plain causal
        raise ConfigError(
            f"capacity={cap}: beyond the model's sliding window ({window}), which the graph does not express; "
            f"build it with a capacity of at most {window}"
        )
    eos = stop_ids(model)
    if not eos:
        raise LoraMedError(f"{model_dir}/config.json has no eos_token_id; the engine needs one to end replies")
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tied = "lm_head.weight" not in sd or np.array_equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    w: dict[str, np.ndarray] = {"embed": sd["model.embed_tokens.weight"], "norm": sd["model.norm.weight"]}
    if not tied:
        w["lm_head"] = sd["lm_head.weight"].T
    for i in range(c.num_hidden_layers):
        p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        w[f"{i}.ln1"] = sd[p + "input_layernorm.weight"]
        w[f"{i}.ln2"] = sd[p + "post_attention_layernorm.weight"]
        w[f"{i}.qkv"] = np.concatenate([sd[a + f"{x}_proj.weight"].T for x in "qkv"], axis=1)
        if a + "q_proj.bias" in sd:  # Qwen2
            w[f"{i}.qkv_bias"] = np.concatenate([sd[a + f"{x}_proj.bias"] for x in "qkv"])
        if a + "q_norm.weight" in sd:  # Qwen3
            w[f"{i}.q_norm"], w[f"{i}.k_norm"] = sd[a + "q_norm.weight"], sd[a + "k_norm.weight"]
        w[f"{i}.o"] = sd[a + "o_proj.weight"].T
        if a + "o_proj.bias" in sd:
            w[f"{i}.o_bias"] = sd[a + "o_proj.bias"]
        for x in ("gate", "up", "down"):
            w[f"{i}.{x}"] = sd[m + f"{x}_proj.weight"].T
    # The model's own rotary module gives the tables (rope type and attention scaling included).
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(torch.zeros(1, dtype=torch.float32), torch.arange(cap)[None])
    w["cos_cache"] = cos[0, :, : hd // 2].float().numpy()
    w["sin_cache"] = sin[0, :, : hd // 2].float().numpy()
    cfg = {
        "model_type": c.model_type,
        "n_layer": c.num_hidden_layers,
        "n_head": nh,
        "n_kv_head": nkv,
        "head_dim": hd,
        "hidden": c.hidden_size,
        "vocab_size": c.vocab_size,
        "capacity": cap,
        "eps": float(c.rms_norm_eps),
        "tied": tied,
        "scale": float(hd) ** -0.5,
        "eos_token_ids": eos,
    }
    return cfg, w


# --------------------------------------------------------------------------- graph


def _graph(cfg: dict, w: dict[str, np.ndarray], dtype: str):
    from onnx import TensorProto, helper, numpy_helper

    half = dtype == "fp16"
    np_t = np.float16 if half else np.float32
    F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT
    nodes, inits = [], []

    def init(name: str, arr: np.ndarray, as_dtype=np_t) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr.astype(as_dtype)), name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str], name: str, domain: str = "", **attrs) -> None:
        nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))

    def cast(x: str, to: int) -> str:
        """fp16 only: the residual stream and the RMSNorms stay fp32 (as in the GPT-2 graph), the rest is fp16."""
        if not half:
            return x
        out = f"{x}_{'f16' if to == F16 else 'f32'}"
        node("Cast", [x], [out], out + "/Cast", to=to)
        return out

    L, nh, nkv, hd, V, eps = (cfg[k] for k in ("n_layer", "n_head", "n_kv_head", "head_dim", "vocab_size", "eps"))
    embed = init("model.embed_tokens.weight", w["embed"])
    cos, sin = init("cos_cache", w["cos_cache"]), init("sin_cache", w["sin_cache"])
    node("Gather", [embed, IO["input_ids"]], ["/embed"], "/embed/Gather")
    residual = cast("/embed", F32)
    node(
        "SimplifiedLayerNormalization",
        [residual, init("model.layers.0.input_layernorm.weight", w["0.ln1"], np.float32)],
        ["/layers.0/ln1"],
        "/layers.0/ln1/SimplifiedLayerNorm",
        epsilon=eps,
        axis=-1,
        stash_type=1,
    )
    for i in range(L):
        p, q = f"model.layers.{i}.", f"/layers.{i}"
        ln1 = f"{q}/ln1"
        if i > 0:  # the previous MLP's output joins the residual, then input_layernorm
            node(
                "SkipSimplifiedLayerNormalization",
                [
                    cast(f"/layers.{i - 1}/mlp/down", F32),
                    residual,
                    init(p + "input_layernorm.weight", w[f"{i}.ln1"], np.float32),
                ],
                [ln1, "", "", f"{q}/residual_1"],
                ln1 + "/SkipSimplifiedLayerNorm",
                "com.microsoft",
                epsilon=eps,
            )
            residual = f"{q}/residual_1"
        qkv = f"{q}/attn/qkv"
        node(
            "MatMul",
            [cast(ln1, F16), init(p + "self_attn.qkv_proj.weight", w[f"{i}.qkv"])],
            [qkv + "_mm"],
            qkv + "/MatMul",
        )
        if f"{i}.qkv_bias" in w:
            node("Add", [qkv + "_mm", init(p + "self_attn.qkv_proj.bias", w[f"{i}.qkv_bias"])], [qkv], qkv + "/Add")
        else:
            qkv += "_mm"
        qkv_in = [qkv, "", ""]
        if f"{i}.q_norm" in w:  # Qwen3: RMSNorm over each head of q and k, before the rotary
            split = init(f"{p}self_attn.qkv_split", np.array([nh * hd, nkv * hd, nkv * hd], np.int64), np.int64)
            parts = [f"{q}/attn/{x}" for x in "qkv"]
            node("Split", [qkv, split], parts, f"{q}/attn/Split", axis=-1)
            per_head = init(f"{p}self_attn.per_head", np.array([0, 0, -1, hd], np.int64), np.int64)
            flat = init(f"{p}self_attn.flat", np.array([0, 0, -1], np.int64), np.int64)
            for x, part in zip("qk", parts):
                name = f"{q}/attn/{x}_norm"
                node("Reshape", [part, per_head], [name + "/heads"], name + "/Reshape")
                node(
                    "SimplifiedLayerNormalization",
                    [name + "/heads", init(f"{p}self_attn.{x}_norm.weight", w[f"{i}.{x}_norm"])],
                    [name + "/normed"],
                    name + "/SimplifiedLayerNorm",
                    epsilon=eps,
                    axis=-1,
                    stash_type=1,
                )
                node("Reshape", [name + "/normed", flat], [name], name + "/Reshape_back")
            qkv_in = [f"{q}/attn/q_norm", f"{q}/attn/k_norm", parts[2]]
        attn = f"{q}/attn/out"
        node(
            "GroupQueryAttention",
            [
                *qkv_in,
                IO["past_key"].format(i),
                IO["past_value"].format(i),
                IO["seqlens_k"],
                IO["total_sequence_length"],
                cos,
                sin,
            ],
            [attn, IO["present_key"].format(i), IO["present_value"].format(i)],
            f"{q}/attn/GroupQueryAttention",
            "com.microsoft",
            num_heads=nh,
            kv_num_heads=nkv,
            scale=cfg["scale"],
            do_rotary=1,
            rotary_interleaved=0,
        )
        o = f"{q}/attn/o"
        node("MatMul", [attn, init(p + "self_attn.o_proj.weight", w[f"{i}.o"])], [o], o + "/MatMul")
        ln2 = f"{q}/ln2"
        o_bias = [init(p + "self_attn.o_proj.bias", w[f"{i}.o_bias"], np.float32)] if f"{i}.o_bias" in w else []
        node(
            "SkipSimplifiedLayerNormalization",
            [cast(o, F32), residual, init(p + "post_attention_layernorm.weight", w[f"{i}.ln2"], np.float32), *o_bias],
            [ln2, "", "", f"{q}/residual_2"],
            ln2 + "/SkipSimplifiedLayerNorm",
            "com.microsoft",
            epsilon=eps,
        )
        residual = f"{q}/residual_2"
        h = cast(ln2, F16)
        gate, up, mlp = f"{q}/mlp/gate", f"{q}/mlp/up", f"{q}/mlp"
        node("MatMul", [h, init(p + "mlp.gate_proj.weight", w[f"{i}.gate"])], [gate], gate + "/MatMul")
        node("MatMul", [h, init(p + "mlp.up_proj.weight", w[f"{i}.up"])], [up], up + "/MatMul")
        node("Sigmoid", [gate], [gate + "_sig"], gate + "/Sigmoid")
        node("Mul", [gate, gate + "_sig"], [gate + "_silu"], gate + "/Mul")
        node("Mul", [gate + "_silu", up], [mlp + "/act"], mlp + "/Mul")
        node(
            "MatMul",
            [mlp + "/act", init(p + "mlp.down_proj.weight", w[f"{i}.down"])],
            [mlp + "/down"],
            mlp + "/down/MatMul",
        )
    node(
        "SkipSimplifiedLayerNormalization",
        [cast(f"/layers.{L - 1}/mlp/down", F32), residual, init("model.norm.weight", w["norm"], np.float32)],
        ["/norm"],
        "/norm/SkipSimplifiedLayerNorm",
        "com.microsoft",
        epsilon=eps,
    )
    node("GatherND", ["/norm", IO["last_index"]], ["/last"], "/last/GatherND", batch_dims=1)
    logits_t = "/lm_head/logits_f16" if half else IO["logits"]
    if cfg["tied"]:
        # As in the GPT-2 graph: the Transpose of an initializer is folded once at load, one copy in the file.
        node("Transpose", [embed], ["/lm_head/weight_t"], "/lm_head/Transpose", perm=[1, 0])
        head = "/lm_head/weight_t"
    else:
        head = init("lm_head.weight", w["lm_head"])
    node("MatMul", [cast("/last", F16), head], [logits_t], "/lm_head/MatMul")
    if half:
        node("Cast", [logits_t], [IO["logits"]], "/lm_head/Cast", to=F32)

    inputs, outputs = io_values(L, ["batch", nkv, cfg["capacity"], hd], F16 if half else F32, V)
    graph = helper.make_graph(nodes, f"lora_med_{cfg['model_type']}_decode", inputs, outputs, inits)
    opsets, ir_version = model_opsets()
    model = helper.make_model(graph, opset_imports=opsets, producer_name="lora-med")
    model.ir_version = ir_version
    return model
