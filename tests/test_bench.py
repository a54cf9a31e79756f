"""`lora-med bench` on tiny models: every CPU backend runs (the engine on each export's decode graph beside its
peers, with its batch throughput), perplexity is paired, the gate fails and passes (through the function and
the CLI exit code), the shape mode builds the graphs an export ships and refuses perplexity, files parse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_med.bench.main import bench
from lora_med.cards import BenchCard
from lora_med.config import BenchConfig
from lora_med.errors import ConfigError, GateError, LoraMedError

from .conftest import run_cli

CPU_BACKENDS = {"torch-eager", "torch-merged", "ort-cpu-fp32", "ort-cpu-int8", "engine-cpu-fp32", "engine-cpu-int8"}
# Small and bounded: 1 thread (the CI CPU is shared; 2 spinning torch threads on a busy 2-core machine
# are 10x slower than 1), 2 prompts x 2 repeats, 8 new tokens.
FAST = dict(threads=1, prompts=2, repeats=2, warmup=1, new_tokens=8, scaling=False, scaling_repeats=1)


@pytest.fixture(scope="module")
def runs(trained, exported):
    return {"lora": trained["lora"], "full": trained["full"], "exports": [exported["fp32"], exported["int8"]]}


def _cfg(runs, out: Path, **kw) -> BenchConfig:
    base = dict(
        run=str(runs["lora"]),
        full_run=str(runs["full"]),
        export=[str(e) for e in runs["exports"]],
        out=str(out),
        max_latency_s=60.0,
        max_ppl_ratio=100.0,
        min_ppl_gain=1e-3,
        **FAST,
    )
    return BenchConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    """One full run: every CPU backend, perplexity of all models, scaling on, gate met."""
    out = tmp_path_factory.mktemp("report")
    result = bench(_cfg(runs, out, scaling=True))
    return result


@pytest.mark.slow
def test_every_cpu_backend_runs_and_is_reported(report):
    r = report.report
    assert {x["backend"] for x in r["latency"]} == CPU_BACKENDS
    for x in r["latency"]:
        assert x["device"] == "cpu" and x["reply_s"]["n"] == 4  # 2 prompts x 2 repeats
        assert 0 < x["ttft_s"]["p50"] < x["reply_s"]["p50"] <= x["reply_s"]["p95"] <= x["reply_s"]["p99"]
        assert x["tokens_per_s"] == pytest.approx(8 / x["reply_s"]["p50"])
        assert x["peak_memory_gb"] >= 0 and x["speedup_vs_torch_eager"] > 0
    eager = next(x for x in r["latency"] if x["backend"] == "torch-eager")
    assert eager["speedup_vs_torch_eager"] == 1.0 and "adapter unmerged" in eager["source"]
    assert r["machine"]["cores"] and r["versions"]["onnxruntime-gpu"] and r["settings"]["new_tokens"] == 8
    # CUDA-only backends are named with the reason they were not measured.
    skipped = {s["backend"]: s["reason"] for s in r["skipped_backends"]}
    assert "fp16/bf16 kernels only" in skipped["engine-cuda-fp32"] and "no CUDA GPU" in skipped["ort-cuda-fp32"]
    assert "CUDA only" in skipped["torch-eager-fp16"] and "CUDA only" in skipped["torch-cudagraph-fp16"]


@pytest.mark.slow
def test_engine_rows_beside_their_peers_with_batch_throughput(report):
    r = report.report
    rows = {x["backend"]: x for x in r["latency"]}
    for name in ("engine-cpu-fp32", "engine-cpu-int8"):
        x = rows[name]
        assert x["kind"] == "engine" and x["weight_bytes"] > 0 and x["bandwidth_floor"] is None  # CPU row
        t = x["throughput"]
        assert list(t) == [1, 4, 16] and all(
            v["tokens_per_s"] == pytest.approx(b * 8 / v["reply_s"]) for b, v in t.items()
        )
    assert rows["ort-cpu-fp32"]["kind"] == "generate" and rows["ort-cpu-fp32"]["throughput"] is None
    pairs = {(c["engine"], c["peer"]): c for c in r["engine_vs_peers"]}
    c = pairs[("engine-cpu-fp32", "ort-cpu-fp32")]
    assert c["target"] == 0.5 and c["ratio"] == pytest.approx(
        rows["engine-cpu-fp32"]["reply_s"]["p50"] / rows["ort-cpu-fp32"]["reply_s"]["p50"]
    )
    assert ("engine-cpu-int8", "ort-cpu-int8") in pairs and ("engine-cpu-int8", "torch-eager") in pairs
    md = (report.out_dir / "report.md").read_text()
    assert "## The engine beside its peers" in md and "| engine-cpu-fp32 |" in md and "| ort-cpu-fp32 |" in md
    assert "## Engine throughput by batch" in md and "not measured: not built: ONNX Runtime's CUDA" in md


@pytest.mark.slow
def test_perplexity_is_paired_and_onnx_matches_the_adapter(report):
    ppl = report.report["perplexity"]
    assert list(ppl)[:3] == ["base", "lora", "full"] and len(ppl) == 5
    tokens = {v["assistant_tokens"] for v in ppl.values()}
    assert len(tokens) == 1 and tokens.pop() > 0, "every model scores the same held-out tokens"
    fp32 = next(v for k, v in ppl.items() if k.startswith("onnx:") and k.endswith(":fp32"))
    int8 = next(v for k, v in ppl.items() if k.endswith(":int8"))
    assert fp32["assistant_ppl"] == pytest.approx(ppl["lora"]["assistant_ppl"], rel=5e-3)  # merged ONNX == adapter
    assert int8["assistant_ppl"] == pytest.approx(ppl["lora"]["assistant_ppl"], rel=0.1)
    assert ppl["lora"]["assistant_ppl"] != ppl["base"]["assistant_ppl"]
    assert set(report.report["training"]) == {"lora", "full"}


@pytest.mark.slow
def test_report_files_are_written_and_parse(report):
    out = report.out_dir
    assert sorted(p.name for p in out.iterdir()) == [
        ".lora-med",
        "latency.png",
        "perplexity.png",
        "report.json",
        "report.md",
        "scaling.png",
    ]
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report.report, default=str))
    card = BenchCard.read(out)  # what a reader of the report gets: typed, its settings checked
    assert card.passed and card.settings.scaling and card.settings.backends is None and card.name == "lora"
    md = (out / "report.md").read_text()
    for heading in ("## Held-out perplexity", "## Reply latency", "## Scaling", "## Training", "## Gate"):
        assert heading in md
    assert md.count("| ort-cpu-int8 |") >= 1 and "passed latency" in md
    import matplotlib.image

    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(png).shape[0] > 100


@pytest.mark.slow
def test_scaling_is_measured_at_every_length_that_fits(report):
    # Structure only: how reply time grows is a benchmark's finding (one timed sample per length orders
    # nothing on a loaded machine), not a test's.
    scaled = [x for x in report.report["latency"] if x["scaling"]]
    assert {x["backend"] for x in scaled} == {"torch-eager", "ort-cpu-fp32", "engine-cpu-fp32"}
    for x in scaled:
        t = {int(k): v for k, v in x["scaling"]["new_tokens_s"].items()}
        assert sorted(t) == [8, 16, 32, 64] and all(v > 0 for v in t.values()), (x["backend"], t)
        assert x["scaling"]["ms_per_new_token"] > 0
        assert list(x["scaling"]["context_s"]) == [32, 64, 128]  # 256 + 64 new tokens > n_positions 256


@pytest.mark.slow
def test_gate_passes_when_met(report):
    gate = report.report["gate"]
    assert gate["passed"] and gate["backend"] == "engine-cpu-int8"  # auto: the engine first
    assert {c["gate"] for c in gate["checks"]} == {"latency", "ppl-ratio", "ppl-gain"}


@pytest.mark.slow
def test_gate_fails_when_out_of_reach_and_says_by_how_much(runs, tmp_path):
    with pytest.raises(GateError) as e:
        bench(
            _cfg(
                runs,
                tmp_path,
                max_latency_s=1e-9,
                max_ppl_ratio=0.01,
                min_ppl_gain=1e6,
                backends=["ort-cpu-fp32"],
                gate_backend="ort-cpu-fp32",
            )
        )
    msg = str(e.value)
    assert "FAILED latency: ort-cpu-fp32 p50" in msg and "FAILED ppl-ratio" in msg and "FAILED ppl-gain" in msg
    assert "off by" in msg
    r = json.loads((tmp_path / "report.json").read_text())  # the report is written before the gate stops
    assert r["gate"]["passed"] is False and [x["backend"] for x in r["latency"]] == ["ort-cpu-fp32"]


@pytest.mark.slow
def test_cli_exit_code_follows_the_gate(runs, tmp_path, monkeypatch, capsys):
    config = tmp_path / "bench.yaml"
    config.write_text(
        f"run: {runs['lora']}\nfull_run: {runs['full']}\nexport: [{runs['exports'][0]}]\n"
        "threads: 1\nprompts: 1\nrepeats: 1\nwarmup: 0\nnew_tokens: 4\nscaling: false\n"
        "backends: [ort-cpu-fp32]\ngate_backend: ort-cpu-fp32\n"
    )
    code, out = run_cli(
        monkeypatch,
        capsys,
        "bench",
        "--config",
        str(config),
        "--out",
        str(tmp_path / "a"),
        "--max-latency-s",
        "1e-9",
        "--max-ppl-ratio",
        "0.01",
    )
    assert code != 0 and "FAILED latency" in out and "FAILED ppl-ratio" in out and "Traceback" not in out
    code, out = run_cli(
        monkeypatch,
        capsys,
        "bench",
        "--config",
        str(config),
        "--out",
        str(tmp_path / "b"),
        "--max-latency-s",
        "60",
        "--max-ppl-ratio",
        "100",
        "--min-ppl-gain",
        "0.001",
    )
    assert code == 0 and "passed latency" in out and "passed ppl-ratio" in out
    assert (tmp_path / "b" / "report.json").is_file()


@pytest.mark.slow
def test_paired_trains_exports_and_benches_both_methods(tiny_base, conversations_file, tmp_path):
    # Each method keeps its own settings from its train YAML; data, seed, steps and batch are shared.
    (tmp_path / "lora.yaml").write_text("learning_rate: 2.0e-2\nr: 4\ntrain_tokens: data\nbatch_size: 1\n")
    (tmp_path / "full.yaml").write_text("learning_rate: 1.0e-3\nseed: 7\n")
    result = bench(
        BenchConfig(
            paired=True,
            data=str(conversations_file),
            eval_data=str(conversations_file),
            allow_eval_overlap=True,
            base=str(tiny_base),
            max_steps=2,
            train_batch_size=4,
            paired_dir=str(tmp_path / "w"),
            lora_config=str(tmp_path / "lora.yaml"),
            full_config=str(tmp_path / "full.yaml"),
            min_top1=0.9,
            min_same_replies=0.5,
            out=str(tmp_path / "r"),
            max_latency_s=60.0,
            max_ppl_ratio=100.0,
            min_ppl_gain=1e-3,
            backends=["torch-eager", "ort-cpu-int8"],
            **FAST,
        )
    )
    r = result.report
    assert set(r["training"]) == {"lora", "full"}
    assert r["training"]["lora"]["tokens_seen"] == r["training"]["full"]["tokens_seen"], "same token budget"
    cards = {m: json.loads((tmp_path / "w" / m / "run.json").read_text()) for m in ("lora", "full")}
    assert cards["lora"]["config"]["learning_rate"] == 2e-2 and cards["lora"]["config"]["train_tokens"] == "data"
    assert cards["full"]["config"]["learning_rate"] == 1e-3
    assert {c["config"]["seed"] for c in cards.values()} == {42} and cards["lora"]["resolved"]["batch_size"] == 4
    assert {k for k in r["perplexity"] if not k.startswith("onnx:")} == {"base", "lora", "full"}
    assert len([k for k in r["perplexity"] if k.startswith("onnx:")]) == 4  # fp32 + int8 of each run
    assert [x["backend"] for x in r["latency"]] == ["torch-eager", "ort-cpu-int8", "ort-cpu-int8:export-full-cpu-int8"]
    assert r["inputs"]["paired"]["dir"] == str(tmp_path / "w") and r["gate"]["passed"]
    # The seed guide's side-by-side replies land in the report, one row per fixed prompt.
    assert [x["prompt"] for x in r["replies"]] == [x["prompt"] for x in cards["lora"]["comparison"]]
    assert r["replies"][0]["full"] == cards["full"]["comparison"][0]["fine_tuned"]
    assert f"**USUARIO:** {r['replies'][0]['prompt']}" in (tmp_path / "r" / "report.md").read_text()


@pytest.mark.slow
def test_paired_leaves_out_a_refused_int8_export(tiny_base, conversations_file, tmp_path):
    result = bench(
        BenchConfig(
            paired=True,
            data=str(conversations_file),
            eval_data=str(conversations_file),
            allow_eval_overlap=True,
            base=str(tiny_base),
            max_steps=1,
            paired_dir=str(tmp_path / "w"),
            min_top1=1.0,
            out=str(tmp_path / "r"),
            max_latency_s=60.0,
            backends=["ort-cpu-fp32"],
            **FAST,
        )
    )
    r = result.report
    assert sorted(Path(e["path"]).name for e in r["inputs"]["exports"]) == [
        "export-full-cpu-fp32",
        "export-lora-cpu-fp32",
    ]
    refused = r["inputs"]["paired"]["refused_exports"]
    assert len(refused) == 2 and all("refused by its parity gate" in x and "top-1" in x for x in refused)
    assert not (tmp_path / "w" / "export-lora-cpu-int8").exists(), "a refused export leaves no folder"


def test_paired_bad_train_config_is_named_before_training(tmp_path):
    (tmp_path / "lora.yaml").write_text("learning_rat: 1\n")
    with pytest.raises(ConfigError, match="BenchConfig.lora_config.*unknown setting.*learning_rat"):
        bench(
            BenchConfig(
                paired=True,
                lora_config=str(tmp_path / "lora.yaml"),
                paired_dir=str(tmp_path / "w"),
                out=str(tmp_path / "r"),
            )
        )
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_shape_mode_measures_speed_only_with_the_graphs_an_export_ships(tmp_path):
    result = bench(BenchConfig(shape="tiny", out=str(tmp_path), max_latency_s=60.0, **{**FAST, "throughput": False}))
    r = result.report
    assert r["label"] == "random weights, speed only" and r["perplexity"] is None
    assert [x["backend"] for x in r["latency"]] == [
        "torch-eager",
        "ort-cpu-fp32",
        "ort-cpu-int8",
        "ort-cpu-int4",
        "engine-cpu-fp32",
        "engine-cpu-int8",
        "engine-cpu-int4",
    ]
    shape = r["inputs"]["shape"]
    assert shape["parameters"] > 0 and {"export_fp32_s", "quantize_int8_s", "engine_fp32_s", "engine_int8_s"} <= set(
        shape
    )
    assert r["gate"]["backend"] == "engine-cpu-int8"
    assert {c["peer"] for c in r["engine_vs_peers"]} == {"ort-cpu-fp32", "ort-cpu-int8", "torch-eager"}
    skipped = {s["backend"]: s["reason"] for s in r["skipped_backends"]}
    for g in ("genai-cpu-fp32", "genai-cpu-int4"):  # never a GPT-2 graph; or not installed here
        assert "GPT-2" in skipped[g] or "setup-genai.sh" in skipped[g]
    assert "random weights, speed only" in (tmp_path / "report.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lora-med", "latency.png", "report.json", "report.md"]


@pytest.mark.slow
def test_llama_family_shape_with_int4_concurrency_and_the_genai_peers(tmp_path):
    """A Qwen2-shaped model: the engine's int4 row, the concurrent workload, and onnxruntime-genai's rows beside
    them with their ratios where it is installed (scripts/setup-genai.sh), else each skipped with the reason."""
    from lora_med.bench import genai

    wanted = ["engine-cpu-fp32", "engine-cpu-int4", "genai-cpu-fp32", "genai-cpu-int4"]
    cfg = dict(FAST, throughput=False, concurrent=4, system_tokens=24)
    r = bench(BenchConfig(shape="tiny-qwen2", out=str(tmp_path), max_latency_s=60.0, backends=wanted, **cfg)).report
    rows = {x["backend"]: x for x in r["latency"]}
    assert r["inputs"]["shape"]["model_type"] == "qwen2"
    for name in ("engine-cpu-fp32", "engine-cpu-int4"):
        c = rows[name]["concurrent"]
        assert c["reply_tokens"] == [2, 7, 11, 16] and c["useful_tokens"] == 36  # 8 // 4 .. 2 x 8
        assert c["system_tokens"] == 24 and all(n > 24 for n in c["prompt_tokens"])
        assert c["best_mode"] == "continuous batching, system prompt kept" and c["tokens_per_s"] > 0
        assert c["reused_prompt_tokens"] == 4 * 24  # every prompt of a run took the shared start from the cache
    assert "each starting with the same 24 (a system prompt)" in (tmp_path / "report.md").read_text()
    why = genai.missing(genai.builder_python(None))
    if why:
        skipped = {s["backend"]: s["reason"] for s in r["skipped_backends"]}
        assert skipped["genai-cpu-fp32"] == skipped["genai-cpu-int4"] == why and "setup-genai.sh" in why
        return
    for name in ("genai-cpu-fp32", "genai-cpu-int4"):
        x = rows[name]
        assert x["kind"] == "genai" and x["reply_s"]["n"] == 4 and x["weight_bytes"] > 0
        modes = {"static batch", "Engine, static batch", "one at a time", "one at a time, system prompt kept"}
        assert set(x["concurrent"]["modes"]) == modes and x["concurrent"]["system_tokens"] == 24
    pairs = {(c["engine"], c["peer"]) for c in r["engine_vs_peers"]}
    assert {("engine-cpu-fp32", "genai-cpu-fp32"), ("engine-cpu-int4", "genai-cpu-int4")} <= pairs
    assert len(r["concurrent_vs_genai"]) == 2 and all(c["ratio"] > 0 for c in r["concurrent_vs_genai"])
    assert "prompts arriving together" in (tmp_path / "report.md").read_text()


def test_llama_family_shapes_are_the_public_configs():
    from transformers import AutoModelForCausalLM

    from lora_med.bench.shapes import shape_config

    for name, params in (("qwen2.5-0.5b", 494_032_768), ("llama-3.2-1b", 1_235_814_400)):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(shape_config(name))
        assert sum(p.numel() for p in model.parameters()) == params  # tied head counted once


@pytest.mark.parametrize("extra", [dict(max_ppl_ratio=1.1), dict(min_ppl_gain=2.0), dict(run="adapters/x")])
def test_shape_mode_refuses_perplexity(extra, tmp_path):
    with pytest.raises(ConfigError, match="speed only.*perplexity"):
        bench(BenchConfig(shape="dialogpt-medium", out=str(tmp_path), **extra))
    assert not list(tmp_path.iterdir()), "refused before anything was built"


def test_shape_refusal_through_the_cli(monkeypatch, capsys):
    code, out = run_cli(monkeypatch, capsys, "bench", "--shape", "dialogpt-medium", "--max-ppl-ratio", "1.05")
    assert code == 2 and "error:" in out and "perplexity" in out and "Traceback" not in out


def test_dialogpt_medium_shape_is_the_public_config():
    from transformers import GPT2Config, GPT2LMHeadModel

    from lora_med.bench.shapes import SHAPES

    with torch.device("meta"):
        model = GPT2LMHeadModel(GPT2Config(**SHAPES["dialogpt-medium"]))
    assert (
        sum(p.numel() for p in model.parameters()) == 354_823_168
    )  # microsoft/DialoGPT-medium's published count: tied lm_head counted once


def test_config_problems_are_reported_together(tmp_path):
    with pytest.raises(ConfigError) as e:
        bench(BenchConfig(out=str(tmp_path), backends=["ort-tpu"], new_tokens=0, gate_stat="p42"))
    msg = str(e.value)
    assert "nothing to measure" in msg and "ort-tpu" in msg and "BenchConfig.new_tokens=0" in msg and "p42" in msg
    with pytest.raises(ConfigError, match="BenchConfig.export alone gives no held-out set"):
        bench(BenchConfig(out=str(tmp_path), export=[str(tmp_path)]))
    assert not list(tmp_path.iterdir())


def test_unfinished_export_is_refused(runs, tmp_path):
    bad = tmp_path / "export"
    (bad / "onnx").mkdir(parents=True)
    (bad / "manifest.json").write_text(json.dumps({"kind": "lora-med.export", "status": "running"}))
    with pytest.raises(ConfigError, match="not complete"):
        bench(_cfg(runs, tmp_path / "out", export=[str(bad)]))


def test_unknown_gate_backend_is_named(runs, tmp_path):
    with pytest.raises(LoraMedError, match="BenchConfig.gate_backend='ort-cuda-fp16': not among"):
        bench(_cfg(runs, tmp_path, backends=["ort-cpu-fp32"], gate_backend="ort-cuda-fp16", prompts=1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_backends_with_io_binding(tmp_path):
    result = bench(BenchConfig(shape="tiny", device="cuda", out=str(tmp_path), max_latency_s=60.0, **FAST))
    r = result.report
    names = {x["backend"] for x in r["latency"]}
    assert {"ort-cuda-fp32", "ort-cuda-fp16", "engine-cuda-fp16", "torch-eager-fp16"} <= names
    assert r["gate"]["backend"] == "engine-cuda-fp16" and r["machine"]["gpu"]
    skipped = {s["backend"] for s in r["skipped_backends"]}
    assert "torch-cudagraph-fp16" in names | skipped  # measured, or named with why it could not run
    for x in r["latency"]:
        if x["device"] == "cuda":
            assert x["bandwidth_floor"]["card"] and x["decode_ms_per_token"] > 0
    assert ("engine-cuda-fp16", "torch-eager-fp16") in {(c["engine"], c["peer"]) for c in r["engine_vs_peers"]}
