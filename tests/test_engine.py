"""The generation engine: one loop, PyTorch and ONNX decode-graph backends, against transformers' generate().

The references are transformers' own ``generate()`` on one prompt at a time (no padding), which is what a
user of the plain model gets; every engine path (single, batched with different lengths, cut from the left)
must reproduce it token for token in fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lora_med.engine import GenerationSettings, load_engine
from lora_med.engine.torch_backend import torch_engine
from lora_med.errors import LoraMedError

PROMPT_LENGTHS = (1, 5, 17, 40)
REPO_DATA = Path(__file__).resolve().parent.parent / "data"


def _prompts(vocab: int, lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    g = np.random.default_rng(seed)
    return [g.integers(1, vocab, size=n).tolist() for n in lengths]


def _hf_greedy(model, prompt: list[int], n: int, eos: int, **kw) -> list[int]:
    """transformers' generate() on one unpadded prompt; the EOS that stops it is dropped, as the engine does."""
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=eos,
            **kw,
        )[0, len(prompt) :].tolist()
    return out[: out.index(eos)] if eos in out else out


@pytest.fixture(scope="module")
def tiny_model(tiny_base):
    from lora_med.models import load_model

    return load_model(str(tiny_base))


@pytest.fixture(scope="module")
def tiny_torch(tiny_model):
    return torch_engine(tiny_model, eos_token_id=int(tiny_model.config.eos_token_id))


def _prefill(engine, prompts):
    """The backend's logits at each prompt's last position (a copy)."""
    engine._backend.open(len(prompts))
    return engine._backend.prefill(list(range(len(prompts))), prompts, 1).copy()


# --------------------------------------------------------------------------- the loop on PyTorch


def test_torch_engine_greedy_equals_generate_single_and_batched(tiny_model, tiny_torch):
    prompts = _prompts(tiny_model.config.vocab_size)
    s = GenerationSettings(max_new_tokens=24)
    refs = [_hf_greedy(tiny_model, p, 24, tiny_torch.eos_token_id) for p in prompts]
    assert [tiny_torch.generate([p], s)[0] for p in prompts] == refs
    assert tiny_torch.generate(prompts, s) == refs  # one batch, four lengths
    assert tiny_torch.name == "engine-torch-cpu-fp32" and tiny_torch.capacity == 256


def test_torch_engine_cuts_long_prompts_from_the_left(tiny_model, tiny_torch):
    long = _prompts(tiny_model.config.vocab_size, (300,), seed=1)[0]  # capacity 256
    s = GenerationSettings(max_new_tokens=16)
    keep = tiny_torch.capacity - 16
    ref = _hf_greedy(tiny_model, long[-keep:], 16, tiny_torch.eos_token_id)
    assert tiny_torch.generate([long, long[:3]], s)[0] == ref


def test_no_repeat_ngram_matches_transformers(tiny_model, tiny_torch):
    prompts = _prompts(tiny_model.config.vocab_size, (3, 12), seed=2)
    for n in (1, 3):
        s = GenerationSettings(max_new_tokens=24, no_repeat_ngram_size=n)
        refs = [_hf_greedy(tiny_model, p, 24, tiny_torch.eos_token_id, no_repeat_ngram_size=n) for p in prompts]
        assert tiny_torch.generate(prompts, s) == refs
        for r in refs:  # and the rule did bite: no n-gram repeats within the reply
            grams = [tuple(r[i : i + n]) for i in range(len(r) - n + 1)]
            assert len(grams) == len(set(grams))


def test_eos_stops_a_row_and_min_new_tokens_suppresses_it(tiny_model):
    prompts = _prompts(tiny_model.config.vocab_size, (4, 9), seed=3)
    # no_repeat_ngram_size=1: every reply token is new, so the 6th one can play the EOS without appearing earlier
    s = GenerationSettings(max_new_tokens=20, no_repeat_ngram_size=1)
    free = torch_engine(tiny_model, eos_token_id=tiny_model.config.eos_token_id).generate(prompts, s)
    k = 5
    eos = free[0][k]
    engine = torch_engine(tiny_model, eos_token_id=eos)
    got = engine.generate(prompts, s)
    assert got[0] == free[0][:k]  # stopped there, EOS not returned
    assert got[1] == (free[1][: free[1].index(eos)] if eos in free[1] else free[1])  # the other row goes on
    forced = engine.generate(
        prompts[:1], GenerationSettings(max_new_tokens=20, min_new_tokens=20, no_repeat_ngram_size=1)
    )[0]
    assert len(forced) == 20 and eos not in forced
    assert forced[:k] == free[0][:k] and forced[k] != eos


def test_sampling_is_reproducible_by_seed_and_differs_across_seeds(tiny_model, tiny_torch):
    prompts = _prompts(tiny_model.config.vocab_size, (6, 6), seed=4)
    s = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=1.3, top_p=0.95, seed=7)
    a, b = tiny_torch.generate(prompts, s), tiny_torch.generate(prompts, s)
    c = tiny_torch.generate(prompts, GenerationSettings(**{**s.__dict__, "seed": 8}))
    assert a == b and a != c
    greedy = tiny_torch.generate(prompts, GenerationSettings(max_new_tokens=12))
    assert a != greedy


def test_top_p_keeps_the_nucleus_only():
    from lora_med.engine.sampling import Sampler

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    sampler = Sampler(temperature=1.0, top_p=0.7, seed=0)
    assert sorted(sampler._nucleus(np.array([0.5, 0.3, 0.15, 0.05])).tolist()) == [0, 1]  # 0.5 < 0.7 <= 0.8
    draws = {int(sampler.choose(logits.copy())[0]) for _ in range(300)}
    assert draws == {0, 1}


def test_torch_engine_restores_training_mode(tiny_model):
    engine = torch_engine(tiny_model, eos_token_id=0)
    tiny_model.train()
    try:
        engine.generate([[1, 2, 3]], GenerationSettings(max_new_tokens=3))
        assert tiny_model.training
    finally:
        tiny_model.eval()


def test_bad_requests_are_named(tiny_torch):
    with pytest.raises(LoraMedError, match="prompt 0 is empty"):
        tiny_torch.generate([[]])
    with pytest.raises(LoraMedError, match="outside the vocabulary"):
        tiny_torch.generate([[10**6]])
    with pytest.raises(LoraMedError, match="leaves no room"):
        tiny_torch.generate([[1]], GenerationSettings(max_new_tokens=256))
    with pytest.raises(LoraMedError, match="temperature"):
        tiny_torch.generate([[1]], GenerationSettings(do_sample=True, temperature=0))


def test_load_engine_on_a_hf_folder_runs_pytorch(tiny_base, tiny_model):
    engine = load_engine(tiny_base, device="cpu")
    p = _prompts(tiny_model.config.vocab_size, (7,), seed=5)[0]
    assert engine.generate([p], GenerationSettings(max_new_tokens=10))[0] == _hf_greedy(
        tiny_model, p, 10, engine.eos_token_id
    )
    with pytest.raises(LoraMedError, match="neither a decode graph"):
        load_engine(tiny_base / "nothing-here")


# --------------------------------------------------------------------------- the decode graph on ONNX Runtime


@pytest.fixture(scope="module")
def tiny_graph(tiny_base, tmp_path_factory):
    from lora_med.export.decode_graph import build_decode_graph

    out = tmp_path_factory.mktemp("decode-fp32")
    info = build_decode_graph(tiny_base, out, capacity=64)  # small, so that the left cut is exercised
    return out, info


@pytest.fixture(scope="module")
def tiny_onnx(tiny_graph):
    engine = load_engine(tiny_graph[0], device="cpu", threads=1)
    yield engine
    engine.close()


def test_decode_graph_is_small_and_described(tiny_graph, tiny_model):
    import onnx

    out, info = tiny_graph
    model = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    # Fused ops only: per layer 4 MatMul, 1 Add, 1 GQA, 2 SkipLayerNorm, 1 FastGelu (one shared SkipLN per boundary)
    assert ops.count("GroupQueryAttention") == 2 and ops.count("FastGelu") == 2
    assert len(ops) <= 2 * 9 + 7, ops
    assert not {"Shape", "Concat", "Slice", "Unsqueeze", "Where", "Softmax"} & set(ops)
    assert info["capacity"] == 64 and info["precision"] == "fp32" and info["model_type"] == "gpt2"
    assert info["eos_token_id"] == tiny_model.config.eos_token_id
    assert set(info["files"]) == {"model.onnx"} and (out / "engine.json").is_file()
    logits = next(o for o in model.graph.output if o.name == "logits")
    assert [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim] == ["batch", 400]


def test_decode_graph_logits_match_pytorch(tiny_model, tiny_onnx):
    prompts = _prompts(tiny_model.config.vocab_size, (3, 20, 9), seed=6)
    got = _prefill(tiny_onnx, prompts)  # the last prompt position of each row
    with torch.no_grad():
        for row, p in zip(got, prompts):
            ref = tiny_model(torch.tensor([p])).logits[0, -1].numpy()
            np.testing.assert_allclose(row, ref, atol=1e-4, rtol=0)
    ids = prompts[1] + prompts[2]
    with torch.no_grad():
        ref = tiny_model(torch.tensor([ids])).logits[0, :-1].numpy()
    np.testing.assert_allclose(tiny_onnx.teacher_forced_logits(ids), ref, atol=1e-4, rtol=0)


def test_onnx_engine_greedy_equals_generate(tiny_model, tiny_onnx, tiny_torch):
    prompts = _prompts(tiny_model.config.vocab_size)
    s = GenerationSettings(max_new_tokens=20)
    keep = tiny_onnx.capacity - 20  # 44: the 17- and 40-token prompts fit, a 100-token one is cut
    long = _prompts(tiny_model.config.vocab_size, (100,), seed=7)[0]
    refs = [_hf_greedy(tiny_model, p[-keep:], 20, tiny_onnx.eos_token_id) for p in prompts + [long]]
    assert [tiny_onnx.generate([p], s)[0] for p in prompts] == refs[:-1]
    assert tiny_onnx.generate(prompts + [long], s) == refs  # batched: five lengths, one cut from the left
    assert tiny_onnx.generate([long], s)[0] == refs[-1]
    s3 = GenerationSettings(max_new_tokens=20, no_repeat_ngram_size=3)  # no cut: the 40-token prompt fits
    assert tiny_onnx.generate(prompts, s3) == tiny_torch.generate(prompts, s3)
    assert tiny_onnx.name == "engine-cpu-fp32" and tiny_onnx.precision == "fp32" and tiny_onnx.capacity == 64


def test_onnx_engine_sampling_and_eos(tiny_model, tiny_onnx):
    prompts = _prompts(tiny_model.config.vocab_size, (5, 11), seed=8)
    s = GenerationSettings(max_new_tokens=16, do_sample=True, top_p=0.9, seed=3)
    a = tiny_onnx.generate(prompts, s)
    assert a == tiny_onnx.generate(prompts, s) and a != tiny_onnx.generate(
        prompts, GenerationSettings(max_new_tokens=16, do_sample=True, top_p=0.9, seed=4)
    )
    free = tiny_onnx.generate(prompts, GenerationSettings(max_new_tokens=16, no_repeat_ngram_size=1))
    saved = tiny_onnx.eos_token_id
    tiny_onnx.eos_token_id = free[1][3]  # the 4th reply token of row 1 now ends that row
    try:
        got = tiny_onnx.generate(prompts, GenerationSettings(max_new_tokens=16, no_repeat_ngram_size=1))
    finally:
        tiny_onnx.eos_token_id = saved
    eos = free[1][3]
    assert got[1] == free[1][:3]
    assert got[0] == (free[0][: free[0].index(eos)] if eos in free[0] else free[0])


def test_tampered_decode_graph_gives_different_replies(tiny_graph, tiny_model, tmp_path):
    import onnx
    from onnx import numpy_helper

    src, _ = tiny_graph
    model = onnx.load(str(src / "model.onnx"))
    w = next(t for t in model.graph.initializer if t.name == "h.1.mlp.c_fc.weight")
    arr = numpy_helper.to_array(w).copy()
    arr += np.random.default_rng(0).normal(0, 0.05, arr.shape).astype(arr.dtype)
    w.CopyFrom(numpy_helper.from_array(arr, w.name))
    onnx.save_model(model, str(tmp_path / "model.onnx"))
    (tmp_path / "engine.json").write_text((src / "engine.json").read_text())
    prompts = _prompts(tiny_model.config.vocab_size, (4, 12, 30), seed=9)
    s = GenerationSettings(max_new_tokens=20)
    with load_engine(src, device="cpu") as good, load_engine(tmp_path, device="cpu") as bad:
        assert good.generate(prompts, s) != bad.generate(prompts, s)


def test_other_model_types_and_bad_options_are_refused(tmp_path, tiny_base):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from lora_med.export.decode_graph import build_decode_graph

    GPTNeoXForCausalLM(
        GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(tmp_path / "neox")
    with pytest.raises(LoraMedError, match="model_type 'gpt_neox'; the decode graph is built for gpt2, llama"):
        build_decode_graph(tmp_path / "neox", tmp_path / "out")
    with pytest.raises(LoraMedError, match="precision='bf16'"):
        build_decode_graph(tiny_base, tmp_path / "out", precision="bf16")
    with pytest.raises(LoraMedError, match="capacity=1000"):
        build_decode_graph(tiny_base, tmp_path / "out", capacity=1000)


def test_cuda_is_refused_for_cpu_precisions(tiny_graph):
    with pytest.raises(LoraMedError, match="runs on the CPU"):
        load_engine(tiny_graph[0], device="cuda")


# --------------------------------------------------------------------------- int8 and fp16 on the shipped base


SHIPPED = "models/gpt2-es-tiny"


@pytest.fixture(scope="module")
def shipped_sequences():
    """Token ids of held-out clinic conversations, formatted as in training (each turn ends with EOS)."""
    from lora_med.data import load_conversations, segments
    from lora_med.models import load_tokenizer, resolve_base

    base = resolve_base(SHIPPED)
    tok = load_tokenizer(base)
    convs = list(load_conversations(REPO_DATA / "medical_conversations_eval.json").conversations)[:12]
    return base, [[t for ids, _ in segments(c, tok, "dialogpt") for t in ids][:96] for c in convs]


def _top1(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


@pytest.fixture(scope="module")
def shipped_fp32(shipped_sequences, tmp_path_factory):
    from lora_med.export.decode_graph import build_decode_graph

    base, seqs = shipped_sequences
    out = tmp_path_factory.mktemp("shipped-fp32")
    build_decode_graph(base, out, capacity=128)
    with load_engine(out, device="cpu", threads=1) as engine:
        return out, [engine.teacher_forced_logits(s) for s in seqs]


@pytest.mark.slow
def test_int8_decode_graph_agrees_with_fp32(shipped_sequences, shipped_fp32, tmp_path):
    from lora_med.export.decode_graph import build_decode_graph

    base, seqs = shipped_sequences
    info = build_decode_graph(base, tmp_path, precision="int8", capacity=128)
    q = info["recipe"]["quantization"]
    assert q["per_channel"] and q["ops"] == ["MatMul"] and info["devices"] == ["cpu"]
    with load_engine(tmp_path, device="cpu", threads=1) as engine:
        assert engine.name == "engine-cpu-int8"
        got = [engine.teacher_forced_logits(s) for s in seqs]
    agree = _top1(np.concatenate(got), np.concatenate(shipped_fp32[1]))
    # Measured over all 64 held-out conversations: 99.3% on this base, 99.56% on the fine-tuned LoRA model.
    assert agree >= 0.99, agree
    # Layer and head weights int8; the float embedding for the Gather is 8.4 of the 27.5 MB here.
    assert (tmp_path / "model.onnx").stat().st_size < 0.6 * (shipped_fp32[0] / "model.onnx").stat().st_size


def test_fp16_decode_graph_builds_types_and_agrees_on_the_cpu(shipped_sequences, shipped_fp32, tmp_path):
    """fp16 is for CUDA; ONNX Runtime 1.31's CPU provider has fp16 kernels for every node of the graph, so
    its types and its numerics are checked here too (slowly)."""
    from lora_med.export.decode_graph import build_decode_graph

    base, seqs = shipped_sequences
    info = build_decode_graph(base, tmp_path, precision="fp16", capacity=128)
    assert info["kv_dtype"] == "float16" and info["devices"] == ["cuda"]
    with load_engine(tmp_path, device="cpu", threads=1) as engine:
        got = [engine.teacher_forced_logits(s) for s in seqs[:4]]
    assert got[0].dtype == np.float32  # logits leave the graph in fp32
    assert _top1(np.concatenate(got), np.concatenate(shipped_fp32[1][:4])) >= 0.99


# --------------------------------------------------------------------------- fp16 of Optimum's standard export


@pytest.fixture(scope="module")
def tiny_optimum(tiny_base, tmp_path_factory):
    """Optimum's standard fp32 export (text-generation-with-past) of the tiny base."""
    from optimum.exporters.onnx import main_export

    out = tmp_path_factory.mktemp("optimum") / "fp32"
    main_export(
        model_name_or_path=str(tiny_base),
        output=out,
        task="text-generation-with-past",
        device="cpu",
        do_validation=False,
        library_name="transformers",
    )
    return out


def _ort_model(src: Path, graph_dir: Path):
    """ORTModelForCausalLM over ``graph_dir/model.onnx`` with the configs of the export in ``src``."""
    import shutil

    from optimum.onnxruntime import ORTModelForCausalLM

    for f in src.iterdir():
        if f.suffix in (".json", ".txt") and not (graph_dir / f.name).exists():
            shutil.copy(f, graph_dir / f.name)
    return ORTModelForCausalLM.from_pretrained(graph_dir, provider="CPUExecutionProvider")


def test_int8_recipe_on_the_optimum_export_quantises_matmuls_only(tiny_optimum, tmp_path):
    """The one int8 recipe on Optimum's graph: every MatMul with a constant weight (the head included), never the
    embedding Gather that Optimum's preset also quantises (what took the shipped model below 99% top-1)."""
    import onnx

    from lora_med.export.precision import quantize_int8

    x = torch.tensor([_prompts(400, (9,), seed=11)[0]])
    fp32 = _ort_model(tiny_optimum, tiny_optimum)(input_ids=x, attention_mask=torch.ones_like(x)).logits
    for keep_head, int8_matmuls in ((False, 2 * 4 + 1), (True, 2 * 4)):
        out = tmp_path / f"head-float-{keep_head}"
        out.mkdir()
        info = quantize_int8(tiny_optimum / "model.onnx", out / "model.onnx", keep_head_float=keep_head)
        assert info["float_nodes"] == (["/lm_head/MatMul"] if keep_head else [])
        q = onnx.load(str(out / "model.onnx"))
        ops = [n.op_type for n in q.graph.node]
        assert ops.count("MatMulInteger") == int8_matmuls and "DynamicQuantizeLinear" in ops
        gathers = [n for n in q.graph.node if n.op_type == "Gather" and n.input[0] == "transformer.wte.weight"]
        assert gathers  # the embedding is still read in float
        int8 = _ort_model(tiny_optimum, out)(input_ids=x, attention_mask=torch.ones_like(x)).logits
        assert (fp32 - int8).abs().max() < 0.05


def test_fp16_from_fp32_gives_an_optimum_graph_that_type_checks_and_runs(tiny_optimum, tmp_path):
    """Optimum's own fp16 export leaves LayerNormalization with fp16 data and an fp32 scale, which onnxruntime
    1.31 refuses; converting the fp32 export types every node alike and runs through ORTModelForCausalLM."""
    import onnx

    from lora_med.export.precision import check_types, fp16_from_fp32

    info = fp16_from_fp32(tiny_optimum / "model.onnx", tmp_path / "fp16" / "model.onnx")
    assert "strict" in info["checked"]
    half = onnx.load(str(tmp_path / "fp16" / "model.onnx"))
    check_types(half)  # the strict check, again, on what was written
    assert any(n.op_type == "LayerNormalization" for n in half.graph.node)
    assert not [t.name for t in half.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]  # all fp16
    x = torch.tensor([_prompts(400, (9,), seed=10)[0]])
    logits = {
        k: m(input_ids=x, attention_mask=torch.ones_like(x)).logits.float()
        for k, m in (
            ("fp32", _ort_model(tiny_optimum, tiny_optimum)),
            ("fp16", _ort_model(tiny_optimum, tmp_path / "fp16")),
        )
    }
    assert half.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert (logits["fp32"].argmax(-1) == logits["fp16"].argmax(-1)).all()
    assert (logits["fp32"] - logits["fp16"]).abs().max() < 1e-2


def test_type_check_catches_the_layernorm_clash_onnxruntime_refuses():
    from onnx import TensorProto, helper, numpy_helper

    from lora_med.export.precision import check_types

    node = helper.make_node(
        "LayerNormalization", ["x", "scale", "bias"], ["y"], axis=-1, name="/transformer/h.0/ln_2/LayerNormalization"
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4])],
        [
            numpy_helper.from_array(np.ones(4, np.float32), "scale"),
            numpy_helper.from_array(np.zeros(4, np.float32), "bias"),
        ],
    )
    with pytest.raises(LoraMedError, match="LayerNormalization.*inconsistent type"):
        check_types(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


# --------------------------------------------------------------------------- CUDA (skipped without a GPU)


def _cuda_ready() -> bool:
    import onnxruntime

    return torch.cuda.is_available() and "CUDAExecutionProvider" in onnxruntime.get_available_providers()


@pytest.fixture(scope="module")
def shipped_fp16(shipped_sequences, tmp_path_factory):
    from lora_med.export.decode_graph import build_decode_graph

    out = tmp_path_factory.mktemp("shipped-fp16")
    build_decode_graph(shipped_sequences[0], out, precision="fp16", capacity=128)
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA GPU and onnxruntime's CUDA provider")
def test_cuda_fp16_engine_agrees_with_cpu_fp32(shipped_sequences, shipped_fp32, shipped_fp16):
    _, seqs = shipped_sequences
    # Loading already proves every node runs on the CUDA provider: the session refuses CPU fallback.
    with load_engine(shipped_fp16, device="cuda") as engine:
        assert engine.name == "engine-cuda-fp16" and engine.info["cuda_graph"]
        got = [engine.teacher_forced_logits(s) for s in seqs]
        assert _top1(np.concatenate(got), np.concatenate(shipped_fp32[1])) >= 0.99
        with load_engine(shipped_fp32[0], device="cpu") as ref:
            prompts = [s[:n] for s in seqs for n in (8, 24)]
            s = GenerationSettings(max_new_tokens=24, no_repeat_ngram_size=3)
            want = ref.generate(prompts, s)
            single = [engine.generate([p], s)[0] for p in prompts]
            batched = engine.generate(prompts, s)  # 24 rows: one padded bucket of 32 under CUDA graphs
        same = sum(a == b for a, b in zip(single, want)) / len(want)
        assert same >= 0.9, same  # the parity gate asks >= 95% over all held-out conversations; 24 prompts vary more
        assert sum(a == b for a, b in zip(batched, single)) >= 0.9 * len(single)
        forced = engine.generate(prompts[:3], GenerationSettings(max_new_tokens=32, min_new_tokens=32))
        assert [len(r) for r in forced] == [32, 32, 32]


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA GPU and onnxruntime's CUDA provider")
def test_cuda_graph_replay_matches_plain_cuda_runs(shipped_sequences, shipped_fp16):
    import json

    from lora_med.engine.ort_backend import ort_engine

    _, seqs = shipped_sequences
    info = json.loads((shipped_fp16 / "engine.json").read_text())
    prompts = [s[:16] for s in seqs[:6]]
    s = GenerationSettings(max_new_tokens=40, min_new_tokens=40)
    plain = ort_engine(shipped_fp16, info, device="cuda", cuda_graph=False)
    graph = ort_engine(shipped_fp16, info, device="cuda", cuda_graph=True)
    try:
        want = [plain.generate([p], s)[0] for p in prompts]
        for _ in range(2):  # the second pass replays graphs captured in the first
            got = [graph.generate([p], s)[0] for p in prompts]
            assert sum(a == b for a, b in zip(got, want)) >= len(want) - 1
        batched = graph.generate(prompts[:3], s)  # batch 3 -> a second captured graph (bucket 4, one pad row)
        assert sum(a == b for a, b in zip(batched, want[:3])) >= 2
        assert set(graph._backend.slots) == {1, 4}
    finally:
        plain.close()
        graph.close()


def test_cuda_graph_bookkeeping_runs_right_on_the_cpu_kernels(tiny_model, tiny_graph, tiny_onnx):
    """What CUDA graphs need of the loop (batches padded to a power of two, total_sequence_length pinned to the
    capacity in decode steps) leaves replies unchanged; checked here with the CPU kernels of the same graph."""
    engine = load_engine(tiny_graph[0], device="cpu", threads=1)
    engine._backend.bucket_batches = engine._backend.pin_total = True
    prompts = _prompts(tiny_model.config.vocab_size, (2, 9, 30), seed=12)  # 3 rows -> a bucket of 4
    s = GenerationSettings(max_new_tokens=20, no_repeat_ngram_size=3)
    with engine:
        assert engine.generate(prompts, s) == tiny_onnx.generate(prompts, s)
        assert set(engine._backend.slots) == {4}
        engine.joins = False  # as on CUDA: a server's stream runs whole batches, each in its own size's bucket
        done = {}
        with engine.stream(s, rows=8) as st:
            handles = st.add(prompts[:1])
            assert engine._backend.slot.batch == 1  # not the stream's 8 rows
            while st.busy:
                done.update((f.handle, f.ids) for f in st.step())
            handles += st.add(prompts[1:])
            assert engine._backend.slot.batch == 2
            while st.busy:
                done.update((f.handle, f.ids) for f in st.step())
        assert [done[h] for h in handles] == tiny_onnx.generate(prompts, s)


def test_int8_recipe_quantises_the_tied_head_of_the_decode_graph(tiny_graph, tiny_onnx, tiny_model, tmp_path):
    """The decode graph's head multiplies by Transpose(tied embedding): the recipe folds it into a constant the
    quantiser sees (an int8 head copy), and keep_head_float=True leaves the head reading the float embedding."""
    import json

    import onnx

    from lora_med.export.precision import quantize_int8

    src, _ = tiny_graph
    meta = json.loads((src / "engine.json").read_text())
    prompts = _prompts(tiny_model.config.vocab_size, (6, 13), seed=13)
    want = _prefill(tiny_onnx, prompts)
    for keep_head, matmuls in ((False, 0), (True, 1)):
        out = tmp_path / f"head-float-{keep_head}"
        out.mkdir()
        info = quantize_int8(src / "model.onnx", out / "model.onnx", keep_head_float=keep_head)
        ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
        assert ops.count("MatMul") == matmuls and ops.count("Transpose") == matmuls
        assert info["float_nodes"] == (["/lm_head/MatMul"] if keep_head else [])
        (out / "engine.json").write_text(json.dumps({**meta, "precision": "int8"}))
        with load_engine(out, device="cpu") as engine:
            got = _prefill(engine, prompts)
        assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_torch_engine_runs_a_peft_model_with_its_adapter(tiny_base):
    """The comparison replies during training come from the PEFT model itself, before any merge or export."""
    from peft import LoraConfig, get_peft_model

    from lora_med.models import load_model

    model = get_peft_model(
        load_model(str(tiny_base)), LoraConfig(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    )
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # non-zero B, so the adapter changes the replies
    model.eval()
    prompts = _prompts(model.config.vocab_size, (4, 15), seed=14)
    engine = torch_engine(model, eos_token_id=model.config.eos_token_id)
    refs = [_hf_greedy(model, p, 16, engine.eos_token_id) for p in prompts]
    assert engine.generate(prompts, GenerationSettings(max_new_tokens=16)) == refs
    with model.disable_adapter():
        base = [_hf_greedy(model, p, 16, engine.eos_token_id) for p in prompts]
    assert base != refs


def test_cpu_prefill_groups_similar_lengths_and_reuses_one_cache(tiny_model, tiny_onnx):
    """On the CPU a batch mixing short and long prompts is prefilled run by run (no compute on padding), and a
    smaller batch after a larger one binds the first rows of the same cache: replies stay the single ones."""
    from lora_med.engine.ort_backend import _runs_of_similar_length

    assert _runs_of_similar_length(np.array([20, 22, 250, 240, 21])) == [(0, 2), (2, 4), (4, 5)]
    assert _runs_of_similar_length(np.array([7])) == [(0, 1)]
    prompts = _prompts(tiny_model.config.vocab_size, (3, 40, 38, 5, 4), seed=11)
    s = GenerationSettings(max_new_tokens=12)
    single = [tiny_onnx.generate([p], s)[0] for p in prompts]
    assert tiny_onnx.generate(prompts, s) == single
    backend = tiny_onnx._backend
    big = backend.slots[5].kv_host[0]
    assert tiny_onnx.generate(prompts[1:4], s) == single[1:4]  # batch 3: views of the batch-5 cache
    assert np.shares_memory(backend.slots[3].kv_host[0], big)
