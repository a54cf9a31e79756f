"""The benchmark scripts' own inputs: the training-memory benchmark must feed exactly 128-token examples."""

from __future__ import annotations

import importlib.util
import json

import pytest

from lora_med import data, models

from .conftest import REPO


def _load(path: str):
    spec = importlib.util.spec_from_file_location(path.replace("/", "_"), REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_memory_examples_are_exactly_the_sequence_length(tmp_path):
    run = _load("benchmarks/train_memory/run.py")
    base = REPO / models.DEFAULT_BASE
    train_file, eval_file = run.build_data(tmp_path, base)
    rows = json.loads(train_file.read_text(encoding="utf-8"))
    assert len(rows) >= 16, "enough rows for a batch of 16"
    examples, cut = data.encode_all(
        data.load_conversations(train_file).conversations,
        models.load_tokenizer(str(base)),
        max_length=run.SEQ,
        fmt="dialogpt",
    )
    assert {len(e.input_ids) for e in examples} == {run.SEQ} and cut == len(examples)
    assert all(any(label != -100 for label in e.labels) for e in examples), "every example has reply tokens"
    assert json.loads(eval_file.read_text(encoding="utf-8")) == rows[:2]


@pytest.mark.slow
def test_serve_load_runs_bounded_levels_against_a_live_server_and_checks_the_store(tiny_base, tmp_path):
    """The load generator end to end on the tiny model: it starts `lora-med serve`, runs its levels within their
    request bounds, every request answered and stored, and refuses bad bounds without starting anything."""
    import subprocess
    import sys

    script = str(REPO / "benchmarks" / "serve_load" / "run.py")
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"}
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            script,
            "--model",
            str(tiny_base),
            "--clients",
            "1,3",
            "--requests",
            "7",
            "--warmup",
            "2",
            "--set",
            "threads=1",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert [r["clients"] for r in report["levels"]] == [1, 3]
    assert all(r["requests"] == r["answered_200"] == 7 and not r["errors"] for r in report["levels"])
    assert report["targets"]["lost"] == 0 and report["targets"]["replies_stored_for_every_200"] is True
    assert report["store"]["replies"] == 7 + 7 + 2 and report["workload"]["name"] == "clinic"
    assert "| 3 | 7 | 7 |" in (out / "results.md").read_text(encoding="utf-8")
    run = _load("benchmarks/serve_load/run.py")
    long, clinic = run.conversations("long"), run.conversations("clinic")
    assert len(long) == 1 and sorted(long[0]) == sorted(dict.fromkeys(t for c in clinic for t in c))
    bad = subprocess.run(
        [sys.executable, script, "--clients", "0", "--requests", "0", "--url", "http://example.com"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--clients 0" in bad.stderr and "--requests 0" in bad.stderr
    assert "only targets 127.0.0.1" in bad.stderr


@pytest.mark.slow
def test_serve_load_openai_streaming_and_a_burst(tiny_base, tmp_path):
    """The OpenAI-streaming workload (time to first token) and a burst: every request accepted is answered,
    no emergency refused; the report says so."""
    import subprocess
    import sys

    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "serve_load" / "run.py"),
            "--model",
            str(tiny_base),
            "--workload",
            "openai-stream",
            "--clients",
            "2",
            "--requests",
            "6",
            "--warmup",
            "2",
            "--burst",
            "20",
            "--set",
            "threads=1",
            "--out",
            str(out),
        ],
        cwd=REPO,
        env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "results.json").read_text(encoding="utf-8"))
    (lv,) = report["levels"]
    assert lv["requests"] == lv["answered_200"] == 6 and lv["ttft_p50_ms"] <= lv["p50_ms"]
    b = report["burst"]
    assert b["clients"] == 20 and b["emergencies"] == 2 and b["emergencies_refused"] == 0 and b["ok"]
    assert b["accepted"] == b["accepted_answered_200"] == 20 - b["refused_503"]
    assert report["targets"]["replies_stored_for_every_200"] is True
    md = (out / "results.md").read_text(encoding="utf-8")
    assert "first token p50 ms" in md and "Burst: 20 clients" in md
