"""The Llama family end to end, on tiny random models built offline (conftest's ``build_tiny_family``: Qwen2 with
q/k/v biases and a tied head, Qwen3 with per-head q/k norms, Llama and Mistral with untied heads, each with its
family's chat template):

train LoRA with ``--format chat-template`` -> merge-export -> ``engine/`` decode graph of that ``model_type`` ->
the parity gate (fp32 exact; int8 and int4 by their gates) -> the server's reply equals PyTorch greedy. Also the
pieces: the int4 recipe (GPT-2 included), the stop tokens of a chat template, what the graph refuses.

The tiny random models' logits are near-ties that quantisation flips, so their int8/int4 gates are given looser
thresholds here (as conftest's ``exported`` does for int8); the defaults are for real models (config.GATE_INT4).
"""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch

from lora_med.config import ExportConfig
from lora_med.engine import GenerationSettings, load_engine
from lora_med.errors import LoraMedError

from .conftest import train_tiny
from .test_serve import Server

KINDS = ("qwen2", "qwen3", "llama", "mistral")
END_OF_TURN = {"qwen2": "<|im_end|>", "qwen3": "<|im_end|>", "llama": "<|eot_id|>", "mistral": "</s>"}
TINY_GATE = {"n_parity": 3, "max_new_tokens": 8, "min_top1": 0.6, "min_same_replies": 0.0, "lossy_rtol": 0.2}


@pytest.fixture(scope="module")
def family_runs(tiny_family, conversations_file, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("family-runs")
    return {
        k: train_tiny(base, conversations_file, root / k, "lora", format="chat-template")
        for k, base in tiny_family.items()
    }


@pytest.fixture(scope="module")
def family_exports(family_runs, tmp_path_factory) -> dict:
    from lora_med.export.main import merge_export

    root = tmp_path_factory.mktemp("family-exports")
    return {k: merge_export(ExportConfig(run_dir=str(run), output=str(root / k))) for k, run in family_runs.items()}


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_export_ships_the_decode_graph_and_passes_parity(family_exports, kind):
    from transformers import AutoTokenizer, GenerationConfig

    result = family_exports[kind]
    m, out = result.manifest, result.output
    assert m["engine"]["status"] == "built" and m["engine"]["model_type"] == kind
    info = json.loads((out / "engine" / "engine.json").read_text())
    assert (info["n_head"], info["n_kv_head"]) == (4, 2)  # grouped-query attention: a half-size KV cache
    p = m["parity"]
    assert p["passed"] and p["engine"]["max_abs_diff"] <= 1e-4
    g = p["engine"]["greedy"]
    assert g["identical_single"] == g["identical_batched"] == g["prompts"] == 8
    tok = AutoTokenizer.from_pretrained(out / "merged")
    assert tok.chat_template  # the merged model keeps its template
    stop = GenerationConfig.from_pretrained(out / "merged").eos_token_id
    stop = stop if isinstance(stop, list) else [stop]
    assert tok.convert_tokens_to_ids(END_OF_TURN[kind]) in stop and tok.eos_token_id in stop
    assert info["eos_token_ids"] == stop


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("kind", KINDS)
def test_quantised_exports_pass_their_gates(family_runs, family_exports, kind, precision, tmp_path):
    from lora_med.export.main import merge_export

    r = merge_export(
        ExportConfig(run_dir=str(family_runs[kind]), output=str(tmp_path / "q"), quantize=precision, **TINY_GATE)
    )
    e = r.manifest["parity"]["engine"]
    assert r.manifest["parity"]["passed"] and e["precision"] == precision and e["nonfinite"] == 0
    assert e["max_abs_diff"] <= e["bound"]
    fp32 = (family_exports[kind].output / "engine" / "model.onnx").stat().st_size
    size = (r.output / "engine" / "model.onnx").stat().st_size
    q = r.manifest["engine"]["recipe"]["quantization"]
    if precision == "int4":
        assert q["block_size"] == 32 and q["matmulnbits_nodes"] == 2 * 5 + 1  # qkv, o, gate, up, down per layer + head
        # Qwen's tied heads: the int4 weight serves the embedding too; the untied ones keep a float embedding.
        assert q["embeddings"].startswith("int4") == kind.startswith("qwen")
        assert size < 0.5 * fp32
    else:
        assert size < 0.6 * fp32


@pytest.mark.slow
def test_gpt2_int4_export(trained, tmp_path):
    from lora_med.export.main import merge_export

    r = merge_export(
        ExportConfig(run_dir=str(trained["lora"]), output=str(tmp_path / "int4"), quantize="int4", **TINY_GATE)
    )
    assert r.manifest["parity"]["passed"] and r.manifest["engine"]["precision"] == "int4"
    assert r.manifest["engine"]["recipe"]["quantization"]["embeddings"].startswith("int4, shared")
    with load_engine(r.output / "engine", device="cpu") as engine:
        assert engine.name == "engine-cpu-int4"


@pytest.mark.slow
def test_the_servers_reply_equals_pytorch_greedy(family_exports, tmp_path):
    """A real uvicorn per family, serving the export's decode graph with a system prompt from its settings: the
    reply is transformers' greedy reply to the same conversation rendered by the merged model's template.

    The message is one the model answers (a greeting: no facts reply, no flow), and the fact checker is off: a
    tiny random model's words would be replaced by the flow's reply, which is not what is compared here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    system, message = "Eres el asistente de la clínica.", "Hola"
    servers = {
        k: Server(
            r.output,
            tmp_path / f"{k}.db",
            tmp_path / f"{k}.log",
            system_prompt=system,
            no_repeat_ngram_size=0,
            max_new_tokens=16,
            check_replies=False,
        )
        for k, r in family_exports.items()
    }
    try:
        for kind, server in servers.items():
            server.wait_ready()
            # The system prompt's KV cache was kept at start: the first conversation takes it from the cache.
            (kept,) = [e["tokens"] for e in server.events() if e["event"] == "prefix_kept"]
            got = server.chat("+59170000001", message).json()["response"]
            assert server.metric("lora_med_prompt_tokens_reused_total") >= kept > 8
            merged = family_exports[kind].output / "merged"
            tok = AutoTokenizer.from_pretrained(merged)
            model = AutoModelForCausalLM.from_pretrained(merged).eval()
            msgs = [{"role": "system", "content": system}, {"role": "user", "content": message}]
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
            want = tok.decode(new[0, ids.shape[1] :], skip_special_tokens=True).strip()
            assert got == want or (not want and got), (kind, got, want)
            assert server.events()  # the server logged its turn
    finally:
        for s in servers.values():
            s.stop(signal.SIGKILL)


# --------------------------------------------------------------------------- the pieces


@pytest.fixture(scope="module")
def qwen2_graph(tiny_family, tmp_path_factory):
    from lora_med.export.decode_graph import build_decode_graph

    out = tmp_path_factory.mktemp("qwen2-graph")
    build_decode_graph(tiny_family["qwen2"], out, capacity=96)
    return out


def test_qwen3_graph_matches_pytorch(tiny_family, tmp_path):
    """Qwen3's per-head q/k RMSNorm (split, normalised per head, three GQA inputs): fp32 logits and greedy replies."""
    from transformers import AutoModelForCausalLM

    from lora_med.export.decode_graph import build_decode_graph

    model = AutoModelForCausalLM.from_pretrained(tiny_family["qwen3"]).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_norm.weight.uniform_(0.5, 1.5)  # away from init: the norm counts
    model.save_pretrained(tmp_path / "model")
    build_decode_graph(tmp_path / "model", tmp_path / "g", capacity=64)
    ids = torch.randint(5, model.config.vocab_size, (24,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0, :-1].numpy()
        reply = model.generate(torch.tensor([ids[:9]]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with load_engine(tmp_path / "g", device="cpu") as engine:
        assert np.abs(engine.teacher_forced_logits(ids) - want).max() < 1e-4
        s = GenerationSettings(max_new_tokens=8, min_new_tokens=8)
        assert engine.generate([ids[:9]], s)[0] == reply[0, 9:].tolist()


def test_the_graph_matches_pytorch_with_its_cache_and_prefix_cache(tiny_family, qwen2_graph):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_family["qwen2"]).eval()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, model.config.vocab_size, (n,), generator=gen).tolist() for n in (5, 17, 30)]
    with torch.no_grad():
        want = [
            model.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, min_new_tokens=10)[
                0, len(p) :
            ].tolist()
            for p in prompts
        ]
        logits = model(torch.tensor([prompts[2]])).logits[0, :-1].numpy()
    s = GenerationSettings(max_new_tokens=10, min_new_tokens=10)
    with load_engine(qwen2_graph, device="cpu", prefix_cache_mb=8) as engine:
        assert np.abs(engine.teacher_forced_logits(prompts[2]) - logits).max() < 1e-4
        assert engine.generate(prompts, s) == want  # batched, right-padded rows
        first = engine.generate([prompts[0]], s)[0]
        follow = prompts[0] + first + prompts[1]  # the next turn: its start is in the prefix cache
        assert engine.prefix_cache.lookup(follow) is not None
        with torch.no_grad():
            ref = model.generate(torch.tensor([follow]), max_new_tokens=10, do_sample=False, min_new_tokens=10)
        assert engine.generate([follow], s)[0] == ref[0, len(follow) :].tolist()


def test_a_reply_stops_at_any_of_the_models_end_ids(qwen2_graph, tmp_path):
    import shutil

    prompt = [7, 8, 9, 10]
    s = GenerationSettings(max_new_tokens=8)
    with load_engine(qwen2_graph, device="cpu") as engine:
        free = engine.generate([prompt], GenerationSettings(max_new_tokens=8, min_new_tokens=8))[0]
    shutil.copytree(qwen2_graph, tmp_path / "g")
    info = json.loads((tmp_path / "g" / "engine.json").read_text())
    info["eos_token_ids"] = [*info["eos_token_ids"], free[3]]  # the 4th token now ends a turn
    (tmp_path / "g" / "engine.json").write_text(json.dumps(info))
    with load_engine(tmp_path / "g", device="cpu") as engine:
        assert engine.generate([prompt], s)[0] == free[: free.index(free[3])]
        assert engine.generate([prompt], GenerationSettings(max_new_tokens=8, min_new_tokens=8))[0] != free[:3]


def test_turn_end_ids_follow_the_template(tiny_family, tiny_tokenizer):
    from lora_med.data import turn_end_ids
    from lora_med.models import load_tokenizer

    for kind, base in tiny_family.items():
        tok = load_tokenizer(str(base))
        ids = turn_end_ids(tok, "chat-template")
        end = tok.convert_tokens_to_ids(END_OF_TURN[kind])
        assert ids == list(dict.fromkeys([tok.eos_token_id, end]))
        assert turn_end_ids(tok, "dialogpt") == [tok.eos_token_id]
    assert turn_end_ids(tiny_tokenizer, "dialogpt") == [tiny_tokenizer.eos_token_id]


def _llama(tmp_path, name: str, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    LlamaForCausalLM(LlamaConfig(**{**cfg, **extra})).save_pretrained(tmp_path / name)
    return tmp_path / name


def test_what_the_graph_cannot_express_is_refused_with_the_reason(tmp_path):
    from lora_med.export.decode_graph import build_decode_graph
    from lora_med.export.optimum import engine_graph

    cases = {
        "MLP biases": _llama(tmp_path, "mlp-bias", mlp_bias=True),
        "multiple of 16": _llama(tmp_path, "head8", num_attention_heads=8),
        "rope type 'dynamic'": _llama(tmp_path, "dyn", rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    }
    for why, folder in cases.items():
        with pytest.raises(LoraMedError, match=why):
            build_decode_graph(folder, tmp_path / "out")
        section = engine_graph(folder, tmp_path / "out", "fp32")
        assert section["status"] == "not built" and why in section["reason"]
        assert not (tmp_path / "out").exists()
    with pytest.raises(LoraMedError, match="capacity=9999"):
        build_decode_graph(_llama(tmp_path, "ok"), tmp_path / "out", capacity=9999)


def test_rebuilding_into_the_same_folder_does_not_grow_external_data(tiny_family, tmp_path, monkeypatch):
    """onnx appends to an existing external-data file: a rebuild must start from a clean one."""
    from lora_med.export import precision
    from lora_med.export.decode_graph import build_decode_graph

    monkeypatch.setattr(precision, "EXTERNAL_DATA_BYTES", 0)  # every graph's weights go to model.onnx.data
    for p in ("fp32", "int8"):
        sizes = []
        for _ in range(2):
            build_decode_graph(tiny_family["llama"], tmp_path / p, precision=p, capacity=32)
            sizes.append((tmp_path / p / "model.onnx.data").stat().st_size)
        assert sizes[0] == sizes[1] > 0
        with load_engine(tmp_path / p, device="cpu") as engine:
            assert len(engine.generate([[5, 6, 7]], GenerationSettings(max_new_tokens=3))[0]) <= 3


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_fp16_graph_types_and_agrees_on_the_cpu_provider(tiny_family, kind, tmp_path):
    """fp16 is for CUDA (no GPU here): ONNX Runtime's CPU provider has fp16 kernels for every node of the graph,
    so its types (fp32 residual stream and RMSNorm, Casts at each boundary) and numerics are checked here."""
    from transformers import AutoModelForCausalLM

    from lora_med.export.decode_graph import build_decode_graph

    info = build_decode_graph(tiny_family[kind], tmp_path, precision="fp16", capacity=64)
    assert info["kv_dtype"] == "float16" and info["devices"] == ["cuda"]
    model = AutoModelForCausalLM.from_pretrained(tiny_family[kind]).eval()
    ids = torch.randint(5, model.config.vocab_size, (24,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0, :-1].numpy()
    with load_engine(tmp_path, device="cpu") as engine:
        got = engine.teacher_forced_logits(ids)
    assert got.dtype == np.float32 and np.abs(got - want).max() < 5e-3
    assert (got.argmax(1) == want.argmax(1)).mean() >= 0.95
