"""Graph precision recipes: the project's one int8 recipe, its int4 recipe and the fp16 conversion of an fp32 graph.

Each takes an ONNX file and writes another, for the decode graph (lora_med.export.decode_graph) and for
Optimum's standard ``text-generation-with-past`` export alike, so that merge-export and ``bench --shape``
produce their int8 and fp16 graphs the same way.

- :func:`quantize_int8`: dynamic int8 (weights int8 ahead of time, activations quantised per call) through
  ``onnxruntime.quantization.quantize_dynamic``, MatMul weights only (the LM head included), per output
  channel; the embeddings (Gather) stay float. Measured on the fine-tuned shipped model (LoRA, 64 held-out
  conversations, 7,450 teacher-forced tokens, top-1 agreement with PyTorch fp32): Optimum's
  ``AutoQuantizationConfig.avx512_vnni`` preset, which also quantises Gather and Transpose (the embeddings),
  98.83% (per-channel) / 98.66% (per-tensor), below the gate's 99%; this recipe 99.37% on the same Optimum
  graph and 99.56% on the decode graph. Keeping the head float (``keep_head_float=True``) adds at most 0.08
  points but reads the vocabulary matrix in fp32 every token: 18% more CPU per token at the DialoGPT-medium
  shape, where the head is 51M of the 354M weights.
- :func:`quantize_int4`: weight-only 4-bit (``com.microsoft.MatMulNBits``) through onnxruntime's own
  ``MatMulNBitsQuantizer``: every MatMul with a constant weight (the head included), blocks of 32 along the
  input dimension, symmetric round-to-nearest, ``accuracy_level`` 4 (activations quantised to int8 inside the
  kernel, the CPU's fastest path). A tied head's int4 weight also serves the embedding rows
  (``com.microsoft.GatherBlockQuantized``), so the largest matrix is stored once, in 4 bits, as
  onnxruntime-genai's model builder does. Decoding on the CPU reads every weight per token, so int4 is the
  fastest precision per token; prompts are slower than int8's (MatMulNBits is tuned for one row at a time).
  Needs the ``onnx-ir`` package (the quantiser imports it; onnxruntime does not declare it).
- :func:`fp16_from_fp32`: ``onnxruntime.transformers.float16.convert_float_to_float16`` on an fp32 export.
  Optimum's own fp16 export (tracing the model in half precision) leaves LayerNormalization with fp16 data
  and an fp32 scale, which onnxruntime 1.31 refuses to load; converting the fp32 graph instead types every
  node consistently (checked with ONNX's strict type inference), with graph inputs/outputs in fp16 as
  ``ORTModelForCausalLM`` expects of an fp16 export.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..engine.graph_format import EXTERNAL_DATA_BYTES, EXTERNAL_DATA_SUFFIX
from ..errors import LoraMedError, first_line

LOGITS = "logits"


def _load(path: Path):
    import onnx

    if not path.is_file():
        raise LoraMedError(f"{path}: no such ONNX file")
    return onnx.load(str(path))


def _head_nodes(model) -> list[str]:
    """Nodes that produce the logits: the MatMul/Gemm feeding the ``logits`` output (through a Cast at most)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    out, name = [], LOGITS
    for _ in range(3):  # logits <- Cast <- Gemm/MatMul, or logits <- MatMul
        n = producers.get(name)
        if n is None:
            break
        if n.op_type in ("MatMul", "Gemm"):
            out.append(n.name)
            break
        name = n.input[0]
    return out


def _fold_weight_transposes(model) -> dict[str, str]:
    """Replace ``Transpose(initializer)`` by a transposed initializer, so that a MatMul fed by it (the decode
    graph's LM head on the tied embedding) has a constant weight the quantiser can see. The original
    initializer stays for its other users (the embedding Gather). Returns {transposed name: original name}."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    folded = {}
    for node in list(model.graph.node):
        if node.op_type != "Transpose" or node.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        arr = numpy_helper.to_array(inits[node.input[0]])
        model.graph.initializer.append(numpy_helper.from_array(arr.transpose(perm).copy(), node.output[0]))
        model.graph.node.remove(node)
        folded[node.output[0]] = node.input[0]
    return folded


def quantize_int8(src_onnx, dst_onnx, *, per_channel: bool = True, keep_head_float: bool = False) -> dict:
    """Dynamic int8 of an fp32 ONNX graph for ONNX Runtime's CPU provider; returns the recipe (for manifests).

    Args:
        src_onnx: an fp32 graph (the decode graph or an Optimum export's ``model.onnx``).
        dst_onnx: where the int8 graph goes (its folder must exist).
        per_channel: one scale per output column of each weight (default) instead of one per matrix.
        keep_head_float: leave the LM head (the MatMul/Gemm writing ``logits``) in float (slower, see above).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src_onnx), Path(dst_onnx)
    model = _load(src)
    if any(init.data_type == 10 for init in model.graph.initializer):  # TensorProto.FLOAT16
        raise LoraMedError(f"{src}: an fp16 graph; int8 quantisation starts from the fp32 graph")
    if not keep_head_float:
        # The decode graph's head multiplies by Transpose(tied embedding); fold it so the quantiser sees a
        # constant weight (an int8 copy of the head; the float embedding stays for the Gather).
        _fold_weight_transposes(model)
    exclude = _head_nodes(model) if keep_head_float else []
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    Path(str(dst) + EXTERNAL_DATA_SUFFIX).unlink(missing_ok=True)  # onnx appends to an existing data file
    # The quantiser logs a hint to run its pre-processing (shape inference and fusions meant for static
    # quantisation) on every call; dynamic MatMul weights do not need it, and users cannot act on it.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(
            model,
            dst,
            op_types_to_quantize=["MatMul"],
            per_channel=per_channel,
            reduce_range=False,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            use_external_data_format=size > EXTERNAL_DATA_BYTES,
            # Contrib nodes (GroupQueryAttention, SkipLayerNormalization) stop ONNX's type inference;
            # every float tensor of an fp32 graph is FLOAT.
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        logging.disable(previous)
    return {
        "tool": "onnxruntime.quantization.quantize_dynamic",
        "mode": "dynamic",
        "weights": "int8 (QInt8)",
        "activations": "uint8, per call",
        "ops": ["MatMul"],
        "per_channel": per_channel,
        "reduce_range": False,
        "float_nodes": exclude,
        "embeddings": "float",
    }


INT4_BLOCK = 32  # weights per scale: the block onnxruntime-genai's builder uses for the CPU
INT4_ACCURACY_LEVEL = 4  # MatMulNBits computes with int8 activations (the CPU's fastest kernel)


def quantize_int4(src_onnx, dst_onnx, *, block_size: int = INT4_BLOCK, share_embedding: bool = True) -> dict:
    """Weight-only int4 of an fp32 ONNX graph for ONNX Runtime's CPU provider; returns the recipe.

    Args:
        src_onnx: an fp32 graph (a decode graph or an Optimum export's ``model.onnx``).
        dst_onnx: where the int4 graph goes (its folder must exist).
        block_size: weights sharing one scale, along each MatMul's input dimension.
        share_embedding: a tied head's int4 weight also serves the embedding Gather (one copy of the
            vocabulary matrix, in 4 bits); False keeps the float embedding.
    Raises:
        LoraMedError: an fp16 graph, or the quantiser is missing its ``onnx-ir`` dependency.
    """
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:  # onnxruntime imports onnx_ir there without declaring it
        raise LoraMedError(
            f"int4 needs onnxruntime's MatMulNBitsQuantizer, which failed to import ({first_line(e)}); "
            "pip install onnx-ir"
        ) from None

    src, dst = Path(src_onnx), Path(dst_onnx)
    model = _load(src)
    if any(init.data_type == 10 for init in model.graph.initializer):  # TensorProto.FLOAT16
        raise LoraMedError(f"{src}: an fp16 graph; int4 quantisation starts from the fp32 graph")
    folded = _fold_weight_transposes(model)
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        q = MatMulNBitsQuantizer(
            model,
            bits=4,
            block_size=block_size,
            is_symmetric=True,
            accuracy_level=INT4_ACCURACY_LEVEL,
            op_types_to_quantize=("MatMul",),
        )
        q.process()
    finally:
        logging.disable(previous)
    out = q.model.model
    shared = _share_int4_embedding(out, folded, block_size) if share_embedding else None
    save_onnx(out, dst)
    return {
        "tool": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
        "weights": "int4 (MatMulNBits), symmetric round-to-nearest",
        "block_size": block_size,
        "accuracy_level": INT4_ACCURACY_LEVEL,
        "ops": ["MatMul"],
        "matmulnbits_nodes": sum(n.op_type == "MatMulNBits" for n in out.graph.node),
        "embeddings": f"int4, shared with the tied head ({shared})" if shared else "float",
    }


def _share_int4_embedding(model, folded: dict[str, str], block_size: int) -> str | None:
    """Tied models: read the embedding rows from the head's int4 weight instead of a float copy.

    The head's MatMulNBits weight ``[vocab, hidden / block, block / 2]`` (two 4-bit values a byte, symmetric:
    zero point 8) is the embedding matrix quantised along ``hidden``: reshaped to ``[vocab, hidden / 2]`` it
    is what ``GatherBlockQuantized(gather_axis=0, quantize_axis=1)`` reads, with the same scales. Returns the
    replaced Gather's name, or None where the graph has no such pair (an untied head, a float head).
    """
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    for head in (n for n in model.graph.node if n.op_type == "MatMulNBits"):
        source = next((orig for t, orig in folded.items() if head.input[1].startswith(t)), None)
        if source is None or source not in inits:
            continue
        users = [n for n in model.graph.node if source in n.input]
        embed = inits[source]
        vocab, hidden = embed.dims
        if len(users) != 1 or users[0].op_type != "Gather" or users[0].input[0] != source or hidden % block_size:
            continue
        gather = users[0]
        shape = numpy_helper.from_array(np.array([vocab, hidden // 2], np.int64), f"{source}/int4_shape")
        model.graph.initializer.append(shape)
        model.graph.initializer.remove(embed)
        at = list(model.graph.node).index(gather)
        model.graph.node.remove(gather)
        packed = f"{source}/int4"
        model.graph.node.insert(
            at, helper.make_node("Reshape", [head.input[1], shape.name], [packed], name=f"{gather.name}/Reshape")
        )
        model.graph.node.insert(
            at + 1,
            helper.make_node(
                "GatherBlockQuantized",
                [packed, gather.input[1], head.input[2]],
                list(gather.output),
                name=f"{gather.name}/GatherBlockQuantized",
                domain="com.microsoft",
                bits=4,
                block_size=block_size,
                gather_axis=0,
                quantize_axis=1,
            ),
        )
        return gather.name
    return None


def fp16_from_fp32(src_onnx, dst_onnx, *, keep_io_types: bool = False) -> dict:
    """An fp16 copy of an fp32 ONNX graph that ONNX Runtime loads; returns what was done.

    Args:
        src_onnx: an fp32 graph (Optimum's export or the decode graph's fp32 build).
        dst_onnx: where the fp16 graph goes.
        keep_io_types: keep graph inputs/outputs fp32 (Casts at the edges). Default False: the KV cache and
            logits are fp16 too, as ``ORTModelForCausalLM`` expects of an fp16 export.

    Raises:
        LoraMedError: the converted graph fails ONNX's strict type inference (a bug to report, not to ship).
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, dst = Path(src_onnx), Path(dst_onnx)
    model = _load(src)
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    # Ops whose fp16 kernels are missing or unsafe stay fp32 with Casts around them; the converter's default
    # list covers the ML ops, and softmax/LayerNorm accumulate in fp32 inside ORT's CUDA kernels.
    half = convert_float_to_float16(model, keep_io_types=keep_io_types, disable_shape_infer=size > EXTERNAL_DATA_BYTES)
    check_types(half, where=str(dst))
    save_onnx(half, dst)
    return {
        "tool": "onnxruntime.transformers.float16.convert_float_to_float16",
        "keep_io_types": keep_io_types,
        "checked": "onnx.shape_inference strict_mode + check_type",
    }


def check_types(model, *, where: str = "graph") -> None:
    """ONNX's strict type inference over standard-domain nodes (contrib ``com.microsoft`` nodes have no
    ONNX schema and are skipped by it); a type clash like the one onnxruntime refuses raises LoraMedError."""
    import onnx

    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=False)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as e:
        raise LoraMedError(f"{where}: the graph fails ONNX type checking: {first_line(e, 400)}") from None


def save_onnx(model, path: Path) -> None:
    """Write ``model`` to ``path``; weights go to ``path`` + EXTERNAL_DATA_SUFFIX when they would come near
    protobuf's 2 GiB limit (the one place graphs are saved, so every graph folder has the same layout)."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = Path(str(path) + EXTERNAL_DATA_SUFFIX)
    data.unlink(missing_ok=True)
    if sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_BYTES:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
