"""Nothing lost, second round: files proven before use, conflicts and overlaps refused, a server that refuses what it
cannot hold. Each test runs the real CLI (in this process, or as `python -m lora_med` where a server would start) on
the tiny models of conftest.py, and checks the exit code, the message and the bytes on disk.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lora_med.errors import LoraMedError

from .conftest import CONVERSATIONS, REPO, run_cli
from .test_reliability import snapshot

ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def lora_med(*args, cwd: Path = REPO, timeout: float = 120) -> tuple[int | None, str]:
    """`python -m lora_med ARGS` in a process of its own: (exit code, output); None when it was still running after
    ``timeout`` seconds (a server that started instead of refusing), then stopped."""
    import os

    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_med", *map(str, args)],
        cwd=cwd,
        env={**os.environ, **ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return None, out


def overwrite_inside(path: Path, n: int = 4096, byte: bytes = b"\x7f") -> None:
    """Overwrite ``n`` bytes in the middle of ``path``: the size stays, the content does not."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2 - n // 2)
        f.write(byte * n)
    assert path.stat().st_size == size


def damaged_copy(src: Path, dst: Path, rel: str) -> Path:
    shutil.copytree(src, dst)
    overwrite_inside(dst / rel)
    return dst


# --------------------------------------------------------------------------- an export's files, proven


@pytest.mark.slow
def test_serve_refuses_an_export_whose_graph_was_damaged_in_place(exported, tmp_path):
    export = damaged_copy(exported["fp32"], tmp_path / "exp", "engine/model.onnx")
    code, out = lora_med("serve", export, "--port", "0", "--db", tmp_path / "chat.db", timeout=90)
    assert code == 2, f"served a damaged graph: {out[-2000:]}"
    assert f"{export / 'engine' / 'model.onnx'}: its bytes differ from the SHA-256 the manifest records" in out
    assert "Traceback" not in out and not (tmp_path / "chat.db").exists(), "refused before the database was opened"


@pytest.mark.slow
def test_serve_states_what_the_verification_cost(exported, tmp_path):
    log = tmp_path / "serve.log"
    import os

    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_med", "serve", str(exported["fp32"]), "--port", "0"]
        + ["--db", str(tmp_path / "c.db"), "--log-file", str(log)],
        cwd=REPO,
        env={**os.environ, **ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        events: list[dict] = []
        while time.monotonic() < deadline and not any(e["event"] == "ready" for e in events):
            time.sleep(0.2)
            events = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
            assert proc.poll() is None, "the server exited"
        verified = next(e for e in events if e["event"] == "verified")
        files = json.loads((exported["fp32"] / "manifest.json").read_text())["files"]
        served = [k for k in files if k.startswith(("engine/", "merged/"))]
        assert verified["files"] == len(served) and verified["seconds"] >= 0 and verified["read"] == len(served)
        assert "checked against the manifest's SHA-256 in" in verified["detail"]
    finally:
        proc.kill()
        proc.wait()


def test_bench_on_a_damaged_onnx_names_the_file(trained, exported, tmp_path, monkeypatch, capsys):
    export = damaged_copy(exported["fp32"], tmp_path / "exp", "onnx/model.onnx")
    code, out = run_cli(
        monkeypatch,
        capsys,
        "bench",
        "--run",
        str(trained["lora"]),
        "--export",
        str(export / "onnx"),
        "--out",
        str(tmp_path / "r"),
        "--backends",
        "ort-cpu-fp32",
        "--max-latency-s",
        "0",
    )
    assert code == 2 and "Traceback" not in out
    assert f"{export / 'onnx' / 'model.onnx'}: its bytes differ from the SHA-256 the manifest records" in out
    assert "perplexity" not in out.lower(), "refused before anything was measured"


def test_load_engine_proves_an_export_once_and_states_the_cost(exported, tmp_path):
    from lora_med import integrity
    from lora_med.engine import load_engine

    export = tmp_path / "exp"
    shutil.copytree(exported["fp32"], export)
    with load_engine(export / "engine", device="cpu") as engine:
        first = engine.info["verified"]
    manifest = json.loads((export / "manifest.json").read_text())
    n = sum(k.startswith("engine/") for k in manifest["files"])
    assert first["files"] == first["read"] == n and first["seconds"] >= 0
    again = integrity.verify_export(export, manifest, ("engine",))
    assert again.read == 0 and again.files == n, "a file proven in this process is not read again"
    overwrite_inside(export / "engine" / "model.onnx")  # changed since: proven again, and refused
    with pytest.raises(LoraMedError, match=r"engine/model.onnx: its bytes differ from the SHA-256"):
        load_engine(export / "engine", device="cpu")


def test_an_export_whose_manifest_lists_no_hashes_cannot_be_proven(exported, tmp_path):
    from lora_med.engine import load_engine

    export = tmp_path / "exp"
    shutil.copytree(exported["fp32"], export)
    m = json.loads((export / "manifest.json").read_text())
    (export / "manifest.json").write_text(json.dumps({k: v for k, v in m.items() if k != "files"}))
    with pytest.raises(LoraMedError, match="lists no files with their SHA-256"):
        load_engine(export / "engine", device="cpu")


# --------------------------------------------------------------------------- pickle adapters


@pytest.mark.slow
def test_serve_refuses_a_pickle_adapter_before_loading_anything(trained, tmp_path):
    import torch

    run = tmp_path / "run"
    shutil.copytree(trained["lora"], run)
    from safetensors.torch import load_file

    torch.save(load_file(str(run / "adapter_model.safetensors")), run / "adapter_model.bin")
    (run / "adapter_model.safetensors").unlink()
    before = snapshot(run)
    code, out = lora_med("serve", run, "--port", "0", "--db", tmp_path / "chat.db", timeout=90)
    assert code == 2 and "Traceback" not in out, out[-3000:]
    assert f"{run / 'adapter_model.bin'}: pickle files are not loaded (they can run code)" in out
    assert snapshot(run) == before and not (tmp_path / "chat.db").exists()


# --------------------------------------------------------------------------- one setting, two spellings


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--num_train_epochs", "2", "--epochs", "3"], "--num_train_epochs 2 and --epochs 3"),
        (["--lora_r", "8", "--r", "16"], "--lora_r 8 and --r 16"),
        (["--compare", "--no-compare"], "--compare and --no-compare"),
        (["--eval_steps=5", "--eval-every", "6"], "--eval_steps 5 and --eval-every 6"),
    ],
)
def test_two_spellings_of_one_setting_with_different_values_is_an_error(
    tiny_base, conversations_file, monkeypatch, capsys, flags, named
):
    common = ["--data", str(conversations_file), "--eval-data", "split", "--base", str(tiny_base), "--plan"]
    code, out = run_cli(monkeypatch, capsys, "train", *common, *flags)
    assert code == 2 and "Traceback" not in out
    assert f"{named}: one setting" in out and "given different values" in out


def test_two_spellings_with_the_same_value_are_one_setting(tiny_base, conversations_file, monkeypatch, capsys):
    common = ["--data", str(conversations_file), "--eval-data", "split", "--base", str(tiny_base), "--plan"]
    code, out = run_cli(monkeypatch, capsys, "train", *common, "--lora_r", "8", "--r", "8.0", "--json")
    assert code == 0, out


# --------------------------------------------------------------------------- held-out data that is not held out


def _write(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("shared", [8, 2])
def test_eval_data_that_overlaps_the_training_data_is_refused(
    tiny_base, conversations_file, tmp_path, monkeypatch, capsys, shared
):
    other = {"user": "¿Atienden los domingos?", "assistant": "No, de lunes a sábado."}
    ev = conversations_file if shared == 8 else _write(tmp_path / "ev.json", [*CONVERSATIONS[:2], other])
    out_dir = tmp_path / "run"
    code, out = run_cli(
        monkeypatch,
        capsys,
        "train",
        *["--data", str(conversations_file), "--eval-data", str(ev), "--base", str(tiny_base)],
        *["--output", str(out_dir), "--max-steps", "1", "--no-compare"],
    )
    assert code == 2 and "Traceback" not in out
    total = 8 if shared == 8 else 3
    assert f"--eval-data {ev}: {shared} of its {total} conversations are also in --data {conversations_file}" in out
    assert "--allow-eval-overlap" in out and not out_dir.exists()


def test_a_split_that_holds_duplicates_of_training_rows_is_refused(tiny_base, tmp_path, monkeypatch, capsys):
    data = _write(tmp_path / "d.json", CONVERSATIONS * 2)  # every conversation twice: a split shares them
    code, out = run_cli(
        monkeypatch,
        capsys,
        "train",
        *["--data", str(data), "--base", str(tiny_base), "--output", str(tmp_path / "run"), "--max-steps", "1"],
    )
    assert code == 2 and "the seeded split of --data" in out and "duplicate training ones" in out


def test_an_allowed_overlap_is_stated_by_the_card_the_model_card_and_bench(trained, tmp_path, monkeypatch, capsys):
    run = trained["lora"]  # conftest trains with allow_eval_overlap: its eval set is its training set
    card = json.loads((run / "run.json").read_text())
    assert card["data"]["eval"]["overlap"] == {"conversations": 8, "of": 8, "allowed": True}
    assert "NOT held-out" in (run / "README.md").read_text()
    code, out = run_cli(
        monkeypatch,
        capsys,
        "bench",
        *["--run", str(run), "--out", str(tmp_path / "r"), "--backends", "torch-eager", "--prompts", "1"],
        *["--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--no-scaling", "--threads", "1"],
        *["--max-latency-s", "0", "--min-ppl-gain", "0", "--no-throughput"],
    )
    assert code == 0, out
    assert "NOT held out: 8 of the 8 evaluation conversations are also training conversations" in out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert any("NOT held out" in n for n in report["notes"])
    assert "NOT held out" in (tmp_path / "r" / "report.md").read_text()


# --------------------------------------------------------------------------- serve: memory, a failing engine, --db


@pytest.mark.slow
@pytest.mark.parametrize("what", ["export", "model folder"])
def test_serve_refuses_a_max_batch_whose_cache_does_not_fit(exported, tiny_base, tmp_path, what):
    model = exported["fp32"] if what == "export" else tiny_base
    code, out = lora_med("serve", model, "--port", "0", "--db", tmp_path / "c.db", "--max-batch", "10000000")
    assert code == 2, f"started anyway: {out[-2000:]}"
    assert "--max-batch 10000000: the KV cache of 10,000,000 rows of 256 tokens needs" in out
    assert "GiB is available" in out and "use --max-batch" in out and "Traceback" not in out


def test_the_cache_check_names_the_largest_batch_that_fits(exported):
    from lora_med.config import ServeConfig
    from lora_med.engine import load_engine
    from lora_med.errors import ConfigError
    from lora_med.serve.replier import check_cache_memory

    with load_engine(exported["fp32"] / "engine", device="cpu") as engine:
        row = engine.cache_bytes(1)
        assert engine.cache_bytes(64) == 64 * row
        cfg = ServeConfig(model="x", max_batch=64, prefix_cache_mb=0)
        check_cache_memory(engine, cfg, free=int(64 * row / 0.9) + 10)  # fits, barely
        with pytest.raises(ConfigError, match=r"use --max-batch 31 or less"):
            check_cache_memory(engine, cfg, free=int(32 * row / 0.9) - 10)


@pytest.mark.slow
def test_an_engine_that_keeps_failing_with_nothing_in_flight_is_given_up(exported, tmp_path):
    """The real engine, closed before the server starts: every attempt to open its stream fails. The server stops
    trying after a few attempts, says so once, reports not ready (503), and still answers emergencies."""
    import logging

    from lora_med.engine import load_engine
    from lora_med.serve import ServeConfig, create_app
    from lora_med.serve.logs import LOGGER
    from tests.serving import running

    events: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: events.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    old_level, logger.level = logger.level, logging.INFO
    engine = load_engine(exported["fp32"] / "engine", device="cpu")
    engine.close()
    app = create_app(ServeConfig(model=str(exported["fp32"]), db=str(tmp_path / "b.db")), engine=engine)
    try:
        with running(app) as url:
            _given_up(url, exported, events)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _given_up(url: str, exported, events: list[str]) -> None:
    from lora_med.serve.batcher import IDLE_RETRIES

    deadline = time.monotonic() + 60
    health = None
    while time.monotonic() < deadline:
        time.sleep(0.2)
        health = httpx.get(f"{url}/health", timeout=10)
        if health.status_code == 503:
            break
    assert health is not None and health.status_code == 503, health and health.text
    body = health.json()
    assert body["status"] == "not ready" and f"failed {IDLE_RETRIES} times in a row" in body["error"]
    time.sleep(1.0)  # no more attempts after giving up
    assert events.count("engine_error") == IDLE_RETRIES and events.count("engine_stopped") == 1
    ready = httpx.get(f"{url}/health/ready", timeout=10)
    assert ready.status_code == 503 and ready.json()["reason"] == "engine", ready.text
    r = httpx.post(f"{url}/chat/", json={"user_id": "+59177000001", "message": "quiero una cita"}, timeout=30)
    assert r.status_code == 503 and r.json()["detail"].startswith("not ready: the engine failed")
    ask = {"model": exported["fp32"].name, "messages": [{"role": "user", "content": "quiero una cita"}]}
    r = httpx.post(f"{url}/v1/chat/completions", json=ask, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped", r.text
    r = httpx.post(f"{url}/chat/", json={"user_id": "+59177000001", "message": "me quiero morir"}, timeout=30)
    assert r.status_code == 200 and r.json()["action"] == "emergency"


@pytest.mark.slow
def test_serve_refuses_another_applications_database_and_leaves_it_as_it_was(exported, tmp_path):
    db = tmp_path / "agenda.sqlite"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE patients (id INTEGER PRIMARY KEY, name TEXT)")
    con.execute("INSERT INTO patients (name) VALUES ('Ana')")
    con.commit()
    con.close()
    before = snapshot(db)
    code, out = lora_med("serve", exported["fp32"], "--port", "0", "--db", db, timeout=90)
    assert code == 2, f"started on another application's database: {out[-2000:]}"
    assert f"--db {db}: holds table patients, which lora-med did not create" in out
    assert snapshot(db) == before and not Path(f"{db}-wal").exists()
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_lora_meds_own_database_opens_again(tmp_path):
    from lora_med.serve.store import SQLiteStore

    SQLiteStore(tmp_path / "c.db").close()
    store = SQLiteStore(tmp_path / "c.db")  # its own tables (and SQLite's sqlite_sequence) are not foreign
    store.begin("+59170000001", "hola", now=1.0, idle_s=60, restart=False)
    store.close()
    store = SQLiteStore(tmp_path / "c.db")
    store.close()


# --------------------------------------------------------------------------- data check


def test_data_check_reports_an_over_long_message_without_tokenizing_it(tiny_base, tmp_path, monkeypatch, capsys):
    from lora_med.data import MAX_MESSAGE_CHARS

    long = "hola " * (MAX_MESSAGE_CHARS // 5 + 1)
    rows = [
        CONVERSATIONS[0],
        {
            "messages": [
                {"role": "user", "content": long},  # an old turn: training would cut it, so no token problem shows
                {"role": "assistant", "content": "Entiendo."},
                {"role": "user", "content": "¿Y el horario?"},
                {"role": "assistant", "content": "De 7:30 a 19:00."},
            ]
        },
    ]
    f = _write(tmp_path / "big.json", rows)
    t0 = time.perf_counter()
    code, out = run_cli(monkeypatch, capsys, "data", "check", str(f), "--tokenizer", str(tiny_base))
    assert code == 2 and "Traceback" not in out
    assert f"{f} row 2 (index 1) messages[0]: field 'content' is too long: {len(long):,} characters" in out
    assert time.perf_counter() - t0 < 60


def test_a_user_turn_of_nul_characters_is_not_text(tmp_path, monkeypatch, capsys):
    f = _write(tmp_path / "nul.json", [CONVERSATIONS[0], {"user": "\x00\x00\x00", "assistant": "¿Perdón?"}])
    code, out = run_cli(monkeypatch, capsys, "data", "check", str(f))
    assert code == 2 and "row 2 (index 1): field 'user' holds only control characters" in out


def test_a_broken_jsonl_line_is_broken_not_truncated(tmp_path, monkeypatch, capsys):
    row = json.dumps(CONVERSATIONS[0], ensure_ascii=False)
    f = tmp_path / "f.jsonl"
    f.write_text('{"user": "hola", "assistant": \n' + row + "\n", encoding="utf-8")
    code, out = run_cli(monkeypatch, capsys, "data", "check", str(f))
    assert code == 2 and f"{f}:1:" in out and "truncated" not in out and "cut short or malformed" in out
    f.write_text(row + "\n" + row[:20], encoding="utf-8")  # the last line, cut by a copy
    code, out = run_cli(monkeypatch, capsys, "data", "check", str(f))
    assert code == 2 and f"{f}:2:" in out and "the file looks truncated" in out


# --------------------------------------------------------------------------- smaller


def _interrupted(trained, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained["lora"], run)
    card = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**card, "status": "running"}))
    return run


def test_yaml_resume_true_continues_the_run(trained, tmp_path, monkeypatch, capsys):
    run = _interrupted(trained, tmp_path)
    (tmp_path / "c.yaml").write_text(f"resume: true\noutput: {run}\n")
    code, out = run_cli(monkeypatch, capsys, "train", "--config", str(tmp_path / "c.yaml"))
    assert code == 0 and "Traceback" not in out and "training had finished" in out, out[-2000:]
    assert json.loads((run / "run.json").read_text())["status"] == "complete"


def test_a_damaged_run_card_is_named_not_called_unfinished(
    trained, tiny_base, conversations_file, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    shutil.copytree(trained["lora"], run)
    (run / "run.json").write_text('{"kind": "lora-med.tr')
    before = snapshot(run)
    code, out = run_cli(
        monkeypatch,
        capsys,
        "train",
        *["--data", str(conversations_file), "--eval-data", "split", "--base", str(tiny_base)],
        *["--output", str(run), "--max-steps", "1"],
    )
    assert code == 2 and "unfinished run" not in out and "add --resume" not in out
    assert f"--output {run}: already holds a run whose card cannot be read ({run / 'run.json'}: not valid JSON" in out
    assert snapshot(run) == before


def test_resume_with_another_data_file_says_so(trained, tmp_path, monkeypatch, capsys):
    run = _interrupted(trained, tmp_path)
    other = _write(tmp_path / "other.json", CONVERSATIONS[:5])
    before = snapshot(run)
    code, out = run_cli(monkeypatch, capsys, "train", "--resume", str(run), "--data", str(other))
    assert code == 2 and "changed since" not in out
    assert f"--data {other}: not the training data the run in {run} was trained with" in out
    assert snapshot(run) == before


@pytest.mark.slow
def test_next_commands_are_shell_quoted(trained, tiny_base, conversations_file, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "my run"
    code, out = run_cli(
        monkeypatch,
        capsys,
        "train",
        *["--data", str(conversations_file), "--eval-data", str(conversations_file), "--allow-eval-overlap"],
        *["--base", str(tiny_base), "--output", str(out_dir), "--max-steps", "1", "--no-compare", "--r", "4"],
    )
    assert code == 0, out
    line = next(x for x in out.splitlines() if x.startswith("Next: "))
    assert shlex.split(line[6:]) == ["lora-med", "merge-export", str(out_dir)]
    exp = tmp_path / "my export"
    code, out = run_cli(monkeypatch, capsys, "merge-export", str(out_dir), "--output", str(exp), "--n-parity", "1")
    assert code == 0, out
    line = next(x for x in out.splitlines() if x.startswith("Next: "))[6:]
    bench_cmd, serve_cmd = (shlex.split(c) for c in line.split("   or   "))
    assert bench_cmd == ["lora-med", "bench", "--run", str(out_dir), "--export", str(exp)]
    assert serve_cmd == ["lora-med", "serve", str(exp)]


def test_a_host_that_is_not_an_address_is_named_as_the_host(exported, tmp_path, monkeypatch, capsys):
    # --insecure-no-auth: past the API-key check (a host beyond loopback needs a key), so the address is tried
    code, out = run_cli(
        monkeypatch,
        capsys,
        *["serve", str(exported["fp32"]), "--host", "999.1.1.1", "--db", str(tmp_path / "c.db"), "--insecure-no-auth"],
    )
    assert code == 2 and "--host 999.1.1.1: not an address or a name this machine can resolve" in out
    assert "--port" not in out and "another server" not in out


@pytest.mark.parametrize(
    "value,hint",
    [
        ("1e9", "looks like bytes: that is 1 GB; give 1"),
        ("24576", "looks like MiB (nvidia-smi's unit): that is 24 GB; give 24"),
        ("300", ""),
    ],
)
def test_vram_gb_is_bounded_by_the_largest_gpu(tiny_base, conversations_file, monkeypatch, capsys, value, hint):
    code, out = run_cli(
        monkeypatch,
        capsys,
        "train",
        *["--data", str(conversations_file), "--eval-data", "split", "--base", str(tiny_base)],
        *["--device", "cuda", "--plan", "--vram-gb", value],
    )
    assert code == 2 and f"--vram-gb {value}: must be in (0, 288]" in out and hint in out


def test_the_overlap_note_is_silent_without_overlap(trained):
    import copy

    from lora_med.cards import TrainCard

    card = TrainCard.read(trained["lora"])
    assert card.overlap_note() and "8 of the 8 evaluation conversations" in card.overlap_note()
    for overlap in ({"conversations": 0, "of": 8}, None):
        raw = copy.deepcopy(card.raw)
        raw["data"]["eval"].pop("overlap")
        if overlap is not None:
            raw["data"]["eval"]["overlap"] = overlap
        assert TrainCard.from_json(raw, card.folder).overlap_note() is None
