"""More careless acts, in the same form as ``cases.py``: artefacts damaged so that only their bytes tell (the size
kept), pickle weights where safetensors belong, serve's flags (memory, addresses, databases of other applications),
one setting typed twice, evaluation data that is training data, commands run at the same time on the same folders,
and Ctrl-C at stages the first table did not reach (resume, an epoch's evaluation, bench's proof of an export, a
server starting and a server serving).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

from cases import (
    FAST,
    KILLED,
    LONG_BENCH,
    ROW,
    SMALL_BENCH,
    SMALL_EXPORT,
    B,
    Bg,
    Case,
    D,
    T,
    bench,
    card_status,
    check,
    copy,
    edit,
    export,
    nothing_at,
    rows,
    serve,
    status,
    train,
    write,
)

# --------------------------------------------------------------------------- setup steps


def overwrite_inside(rel: str, n: int = 4096) -> Callable[[Path, dict], None]:
    """Overwrite ``n`` bytes in the middle of a file with 0x7f: its size stays, its content does not (a bad sector,
    a careless hex edit, a copy that went wrong in place)."""

    def step(d: Path, F: dict) -> None:
        p = d / rel
        with open(p, "r+b") as f:
            f.seek(max(p.stat().st_size // 2 - n // 2, 0))
            f.write(b"\x7f" * min(n, p.stat().st_size))

    return step


def foreign_sqlite(rel: str, *ddl: str) -> Callable[[Path, dict], None]:
    """Another application's SQLite database (rollback journal, one row)."""

    def step(d: Path, F: dict) -> None:
        con = sqlite3.connect(d / rel)
        for statement in ddl or ("CREATE TABLE patients (id INTEGER PRIMARY KEY, name TEXT)",):
            con.execute(statement)
        con.execute("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT)")
        con.execute("INSERT INTO notes (body) VALUES ('cita de Ana el lunes')")
        con.commit()
        con.close()

    return step


def pickled(rel: str, stem: str) -> Callable[[Path, dict], None]:
    """Replace ``rel/<stem>.safetensors`` by the same tensors saved with torch.save (a pickle, ``.bin``)."""

    def step(d: Path, F: dict) -> None:
        import torch
        from safetensors.torch import load_file

        src = d / rel / f"{stem}.safetensors"
        torch.save(load_file(str(src)), d / rel / ("pytorch_model.bin" if stem == "model" else f"{stem}.bin"))
        src.unlink()

    return step


def manifest_hash(rel: str, file: str) -> Callable[[Path, dict], None]:
    """Change the SHA-256 the manifest records for one file (a hand-edited manifest)."""

    def change(m: dict) -> dict:
        m["files"][file]["sha256"] = "0" * 64
        return m

    return edit(f"{rel}/manifest.json", change)


def big_message(rel: str, chars: int) -> Callable[[Path, dict], None]:
    """A conversation file whose first message holds ``chars`` characters (an old turn, so training would cut it)."""

    def step(d: Path, F: dict) -> None:
        row = {
            "messages": [
                {"role": "user", "content": "a" * chars},
                {"role": "assistant", "content": "Entiendo."},
                {"role": "user", "content": "¿Y el horario?"},
                {"role": "assistant", "content": "De 7:30 a 19:00."},
            ]
        }
        (d / rel).write_text(json.dumps([ROW, row]), encoding="utf-8")

    return step


# --------------------------------------------------------------------------- checks afterwards


def journal_mode(rel: str, want: str) -> Callable[[Path], str | None]:
    def check_(d: Path) -> str | None:
        got = sqlite3.connect(d / rel).execute("PRAGMA journal_mode").fetchone()[0]
        return None if got == want else f"{rel}: journal mode {got}, not {want}"

    return check_


def each_step_logged_once(rel: str) -> Callable[[Path], str | None]:
    """metrics.jsonl is the record of one run: every (step, loss or eval) line once, steps in order."""

    def check_(d: Path) -> str | None:
        seen = []
        for line in (d / rel).read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            seen += [(row["step"], k) for k in ("loss", "eval_loss") if k in row]
        if len(seen) != len(set(seen)) or [s for s, _ in seen] != sorted(s for s, _ in seen):
            return f"{rel}: lines repeated or out of order: {seen}"
        return None

    return check_


# --------------------------------------------------------------------------- shorthands

EXP_SERVE = ["e", "--port", "0", "--db", "chat.db"]  # serve a copy of the export, on a free port
LONG_TRAIN = [*T, "--output", "out", "--max-steps", "100000", "--no-compare", "--r", "4", "--report-to", "none"]
# A run kill -9'ed near an epoch boundary: 8 conversations in batches of 4 (2 steps an epoch, 6 epochs), a checkpoint
# every step, an evaluation every epoch; killed once checkpoint-2 (the end of the first epoch) is down.
KILLED_AT_EPOCH = Bg(
    [*T, "--output", "out", "--epochs", "6", "--batch-size", "4", "--save-every", "1", "--log-every", "1"]
    + ["--no-compare", "--r", "4", "--report-to", "none"],
    "out/checkpoints/checkpoint-2",
    "killed",
)
OTHER = {"user": "¿Atienden los domingos?", "assistant": "No, de lunes a sábado."}


KEY = "adversarial-key-0123456789abcdef\n"  # one API key, as --api-key-file reads it


def serve_flag(name: str, flags: list[str], says: tuple[str, ...]) -> Case:
    return serve(name, ["{exp}", "--port", "0", "--db", "chat.db", *flags], says)


def plan(name: str, flags: list[str], says: tuple[str, ...] = (), expect: int = 2) -> Case:
    """train --plan (nothing trained) with ``flags`` on top of a valid command line."""
    return train(name, [*T, "--plan", *flags], says=says, expect=expect)


MORE: list[Case] = [
    # ---------------------------------------------------------------- exports damaged in place (size kept)
    serve(
        "export: engine/model.onnx overwritten in place",
        EXP_SERVE,
        ("e/engine/model.onnx", "SHA-256"),
        (copy("exp", "e"), overwrite_inside("e/engine/model.onnx")),
    ),
    serve(
        "export: merged/model.safetensors overwritten in place",
        EXP_SERVE,
        ("e/merged/model.safetensors", "SHA-256"),
        (copy("exp", "e"), overwrite_inside("e/merged/model.safetensors")),
    ),
    serve(
        "export: merged/tokenizer.json overwritten in place",
        EXP_SERVE,
        ("e/merged/tokenizer.json", "SHA-256"),
        (copy("exp", "e"), overwrite_inside("e/merged/tokenizer.json", 64)),
    ),
    serve(
        "export: engine/engine.json edited",
        EXP_SERVE,
        ("e/engine/engine.json",),
        (copy("exp", "e"), edit("e/engine/engine.json", lambda c: {**c, "capacity": 100000})),
    ),
    serve(
        "export: the manifest's hash of the graph edited",
        EXP_SERVE,
        ("e/engine/model.onnx", "SHA-256"),
        (copy("exp", "e"), manifest_hash("e", "engine/model.onnx")),
    ),
    serve(
        "export: the manifest lists no files",
        EXP_SERVE,
        ("manifest.json", "no files"),
        (copy("exp", "e"), edit("e/manifest.json", lambda m: {k: v for k, v in m.items() if k != "files"})),
    ),
    serve(
        "export's merged/ served directly, its weights overwritten in place",
        ["e/merged", "--port", "0", "--db", "chat.db"],
        ("e/merged/model.safetensors", "SHA-256"),
        (copy("exp", "e"), overwrite_inside("e/merged/model.safetensors")),
    ),
    bench(
        "--export: onnx/model.onnx overwritten in place",
        ["--run", "{run}", "--export", "e", "--out", "rep", *SMALL_BENCH],
        ("e/onnx/model.onnx", "SHA-256"),
        setup=(copy("exp", "e"), overwrite_inside("e/onnx/model.onnx")),
        after=nothing_at("rep"),
    ),
    bench(
        "--export e/onnx: its graph overwritten in place",
        ["--run", "{run}", "--export", "e/onnx", "--out", "rep", *SMALL_BENCH],
        ("e/onnx/model.onnx", "SHA-256"),
        setup=(copy("exp", "e"), overwrite_inside("e/onnx/model.onnx")),
    ),
    bench(
        "--export: engine/model.onnx overwritten in place",
        ["--run", "{run}", "--export", "e", "--out", "rep", *SMALL_BENCH],
        ("e/engine/model.onnx", "SHA-256"),
        setup=(copy("exp", "e"), overwrite_inside("e/engine/model.onnx")),
    ),
    # ---------------------------------------------------------------- pickle weights
    serve(
        "a run whose adapter is a pickle (adapter_model.bin)",
        ["r", "--port", "0", "--db", "chat.db"],
        ("r/adapter_model.bin", "pickle"),
        (copy("run", "r"), pickled("r", "adapter_model")),
    ),
    serve(
        "a model folder with pickle weights only",
        ["b", "--port", "0", "--db", "chat.db"],
        ("b/pytorch_model.bin", "pickle"),
        (copy("base", "b"), pickled("b", "model")),
    ),
    export(
        "adapter is a pickle (adapter_model.bin)", (pickled("r", "adapter_model"),), ("adapter_model.bin", "pickle")
    ),
    # ---------------------------------------------------------------- serve's flags
    serve_flag(
        "--max-batch 100000 (a KV cache beyond memory)", ["--max-batch", "100000"], ("--max-batch 100000", "KV cache")
    ),
    serve(
        "--max-batch 10000000 on a PyTorch model folder",
        ["{base}", "--port", "0", "--db", "chat.db", "--max-batch", "10000000"],
        ("--max-batch 10000000", "KV cache", "GiB"),
    ),
    # With a key, so the address itself is what is refused (without one, an open bind is refused first).
    serve(
        "--host 999.1.1.1",
        ["{exp}", "--port", "0", "--db", "chat.db", "--api-key-file", "keys.txt", "--host", "999.1.1.1"],
        ("--host 999.1.1.1", "resolve"),
        (write("keys.txt", KEY),),
    ),
    serve(
        "--host not on this machine",
        ["{exp}", "--port", "0", "--db", "chat.db", "--api-key-file", "keys.txt", "--host", "10.254.254.1"],
        ("--host 10.254.254.1", "not an address"),
        (write("keys.txt", KEY),),
    ),
    serve_flag("--host without a key", ["--host", "10.254.254.1"], ("--host 10.254.254.1", "API key")),
    serve_flag("--host with a space", ["--host", "exa mple"], ("--host exa mple",)),
    serve_flag("--port -1", ["--port", "-1"], ("--port -1",)),
    serve_flag("--max-new-tokens beyond the window", ["--max-new-tokens", "100000"], ("--max-new-tokens 100000",)),
    serve_flag("--top-p 0", ["--top-p", "0"], ("--top-p 0",)),
    serve_flag("--top-p 1.5", ["--top-p", "1.5"], ("--top-p 1.5",)),
    serve_flag("--temperature nan", ["--temperature", "nan"], ("--temperature nan", "finite")),
    serve_flag("--queue-size 0 (a setting that is gone)", ["--queue-size", "0"], ("--queue-size",)),
    serve_flag("--request-timeout-s 0", ["--request-timeout-s", "0"], ("--request-timeout-s 0",)),
    serve_flag("--batch-wait-ms 5000", ["--batch-wait-ms", "5000"], ("--batch-wait-ms 5000",)),
    serve_flag("--idle-minutes 0", ["--idle-minutes", "0"], ("--idle-minutes 0",)),
    serve_flag("--rate-limit -1", ["--rate-limit", "-1"], ("--rate-limit -1",)),
    serve_flag("--rate-window-s nan", ["--rate-window-s", "nan"], ("--rate-window-s nan",)),
    serve_flag("--threads 0", ["--threads", "0"], ("--threads 0",)),
    serve_flag("--cut-block -1", ["--cut-block", "-1"], ("--cut-block -1",)),
    serve_flag("--prefix-cache-mb -5", ["--prefix-cache-mb", "-5"], ("--prefix-cache-mb -5",)),
    serve_flag("--max-message-chars 0", ["--max-message-chars", "0"], ("--max-message-chars 0",)),
    serve_flag("--no-repeat-ngram-size -1", ["--no-repeat-ngram-size", "-1"], ("--no-repeat-ngram-size -1",)),
    serve_flag("--device cuda without a GPU", ["--device", "cuda"], ("CUDA",)),
    serve_flag("--log-file in a missing folder", ["--log-file", "nope/serve.log"], ("--log-file nope/serve.log",)),
    serve_flag("--emergency missing", ["--emergency", "nope.yaml"], ("--emergency nope.yaml",)),
    serve_flag("--intents /dev/zero", ["--intents", "/dev/zero"], ("/dev/zero",)),
    Case(
        "serve",
        "--db another application's SQLite file",
        ["{exp}", "--port", "0", "--db", "agenda.sqlite"],
        2,
        ("--db agenda.sqlite", "table notes", "table patients", "did not create"),
        (foreign_sqlite("agenda.sqlite"),),
        timeout=60,
        after=journal_mode("agenda.sqlite", "delete"),
    ),
    Case(
        "serve",
        "--db a SQLite file holding only a view and a trigger",
        ["{exp}", "--port", "0", "--db", "v.sqlite"],
        2,
        ("--db v.sqlite", "view recent"),
        (
            foreign_sqlite(
                "v.sqlite",
                "CREATE VIEW recent AS SELECT 1 AS x",
                "CREATE TABLE turns (id INTEGER PRIMARY KEY)",
            ),
        ),
        timeout=60,
    ),
    Case(
        "serve",
        "--db a text file",
        ["{exp}", "--port", "0", "--db", "notes.txt"],
        2,
        ("--db notes.txt",),
        (write("notes.txt", "mis notas, no una base de datos\n" * 100),),
        timeout=60,
    ),
    # ---------------------------------------------------------------- one setting, two spellings
    plan(
        "--num_train_epochs 2 --epochs 3",
        ["--num_train_epochs", "2", "--epochs", "3"],
        ("--num_train_epochs 2", "--epochs 3"),
    ),
    plan("--lora_r 8 --r 16", ["--lora_r", "8", "--r", "16"], ("--lora_r 8", "--r 16")),
    plan(
        "--learning-rate and --learning_rate",
        ["--learning-rate", "1e-3", "--learning_rate", "2e-3"],
        ("--learning-rate 1e-3", "--learning_rate 2e-3"),
    ),
    plan("--compare --no-compare", ["--compare", "--no-compare"], ("--compare", "--no-compare")),
    plan(
        "--eval_steps=5 --eval-every 6", ["--eval_steps=5", "--eval-every", "6"], ("--eval_steps 5", "--eval-every 6")
    ),
    plan("--r 8 --lora_r 8.0 (one value)", ["--r", "8", "--lora_r", "8.0"], expect=0),
    plan("--vram-gb 1e9 (bytes?)", ["--device", "cuda", "--vram-gb", "1e9"], ("--vram-gb 1e9", "288", "bytes")),
    plan("--vram-gb 24576 (MiB?)", ["--device", "cuda", "--vram-gb", "24576"], ("--vram-gb 24576", "MiB", "give 24")),
    # ---------------------------------------------------------------- evaluation data that is training data
    train(
        "--eval-data is --data",
        ["--data", D, "--eval-data", D, "--base", B, "--output", "out", *FAST],
        says=("--eval-data", "8 of its 8 conversations are also in --data", "--allow-eval-overlap"),
        after=nothing_at("out"),
    ),
    train(
        "--eval-data sharing 2 conversations with --data",
        ["--data", D, "--eval-data", "ev.json", "--base", B, "--output", "out", *FAST],
        says=("--eval-data ev.json", "2 of its 3 conversations"),
        setup=(
            write(
                "ev.json",
                rows(
                    {
                        "user": "Hola, necesito una cita",
                        "assistant": "¡Claro! Con gusto te ayudo. ¿Para qué especialidad?",
                    },
                    {"user": "¿Cuál es el horario?", "assistant": "Atendemos de lunes a viernes de 7:30 a 19:00."},
                    OTHER,
                ),
            ),
        ),
    ),
    train(
        "--data with every row twice, seeded split",
        ["--data", "d.json", "--base", B, "--output", "out", *FAST],
        says=("seeded split", "duplicate"),
        setup=(write("d.json", rows(ROW, OTHER, ROW, OTHER, ROW, OTHER, ROW, OTHER)),),
    ),
    train(
        "--allow-eval-overlap: trains, the card says so",
        [*T, "--output", "out", *FAST],
        expect=0,
        says=("NOT held out",),
    ),
    # ---------------------------------------------------------------- resume and cards
    Case(
        "train",
        "YAML resume: true",
        ["--config", "c.yaml"],
        0,
        ("training had finished",),
        (copy("run", "r"), edit("r/run.json", status("running")), write("c.yaml", "resume: true\noutput: r\n")),
        may_change=("r/*",),
    ),
    Case(
        "train",
        "YAML resume: false",
        ["--config", "c.yaml", *T, "--output", "out", *FAST],
        0,
        setup=(write("c.yaml", "resume: false\n"),),
    ),
    train(
        "--output holds a run with a damaged run.json",
        [*T, "--output", "r", *FAST],
        says=("--output r", "card cannot be read", "run.json"),
        setup=(copy("run", "r"), write("r/run.json", '{"kind": "lora-med.tr')),
    ),
    train(
        "--resume with another --data",
        ["--resume", "r", "--data", "other.json"],
        says=("--data other.json", "not the training data"),
        setup=(copy("run", "r"), edit("r/run.json", status("running")), write("other.json", rows(ROW, OTHER))),
    ),
    train(
        "--output with a space: the Next: command is quoted",
        [*T, "--output", "my run", *FAST],
        expect=0,
        says=("Next: lora-med merge-export 'my run'",),
    ),
    Case(
        "merge-export",
        "a run and an output with spaces: Next: quoted",
        ["my run", "--output", "my exp", *SMALL_EXPORT],
        0,
        ("--run 'my run' --export 'my exp'", "lora-med serve 'my exp'"),
        (copy("run", "my run"),),
    ),
    train(
        "--resume after kill -9 at an epoch boundary",
        ["--resume", "out"],
        expect=0,
        says=("Resuming from",),
        bg=KILLED_AT_EPOCH,
        after=each_step_logged_once("out/metrics.jsonl"),
    ),
    # ---------------------------------------------------------------- data check
    Case(
        "data check",
        "a 20 MB message",
        ["big.json"],
        2,
        ("big.json", "too long", "20,000,000 characters"),
        (big_message("big.json", 20_000_000),),
    ),
    check(
        "a user turn of NUL characters",
        rows(ROW, {"user": "\x00\x00\x00", "assistant": "¿Perdón?"}),
        ("row 2", "control characters"),
    ),
    check(
        "JSONL whose first line is broken",
        '{"user": "hola", "assistant": \n' + json.dumps(ROW, ensure_ascii=False) + "\n",
        ("f.jsonl:1", "cut short or malformed"),
        file="f.jsonl",
    ),
    train(
        "--data holding a 200,000-character message",
        ["--data", "big.json", "--eval-data", "split", "--base", B, "--output", "out", *FAST],
        says=("big.json", "too long"),
        setup=(big_message("big.json", 200_000),),
    ),
    # ---------------------------------------------------------------- commands at the same time
    Case(
        "merge-export",
        "a run that is still training",
        ["out", "--output", "e", *SMALL_EXPORT],
        2,
        ("out", "still training"),
        bg=Bg(LONG_TRAIN, "out/run.json", cmd="train"),
    ),
    bench(
        "--run that is still training",
        ["--run", "out", "--out", "rep", *SMALL_BENCH],
        ("out", "still training"),
        bg=Bg(LONG_TRAIN, "out/run.json", cmd="train"),
    ),
    train(
        "--resume a run another process is training",
        ["--resume", "out"],
        says=("in use by pid",),
        bg=Bg(LONG_TRAIN, "out/run.json"),
    ),
    bench(
        "a second bench on the same --out",
        ["--run", "{run}", "--out", "rep", *SMALL_BENCH[:-2], "--backends", "torch-eager"],
        ("rep", "in use by pid"),
        bg=Bg(LONG_BENCH, "stdout:Perplexity on"),
    ),
    Case(
        "data check",
        "while a train reads the same file",
        ["{data}"],
        0,
        bg=Bg(LONG_TRAIN, "out/run.json", cmd="train"),
    ),
    # ---------------------------------------------------------------- Ctrl-C at more stages
    train(
        "Ctrl-C while resuming after kill -9",
        ["--resume", "out"],
        expect=130,
        interrupt="stdout:Resuming from",
        bg=KILLED,
        after=card_status("out/run.json", "failed"),
    ),
    train(
        "Ctrl-C after an epoch's evaluation",
        [
            *T,
            "--output",
            "out",
            "--epochs",
            "200",
            "--batch-size",
            "4",
            "--no-compare",
            "--r",
            "4",
            "--report-to",
            "none",
        ],
        expect=130,
        interrupt="stdout:eval @ step",
        after=card_status("out/run.json", "failed"),
    ),
    bench(
        "Ctrl-C once the exports are proven",
        LONG_BENCH,
        expect=130,
        interrupt="stdout:Verified",
        after=nothing_at("rep", ".rep.lock"),
    ),
    Case(
        "serve",
        "Ctrl-C while the server loads the model",
        EXP_SERVE,
        130,
        interrupt='stdout:"event": "verified"',
        setup=(copy("exp", "e"),),
        timeout=150,
    ),
    Case(  # uvicorn stops gracefully, then lets the SIGINT end the process as Ctrl-C does: exit 130
        "serve",
        "Ctrl-C on a ready server: a clean stop",
        EXP_SERVE,
        130,
        ('"event": "stopped"', "Application shutdown complete"),
        interrupt='stdout:"event": "ready"',
        setup=(copy("exp", "e"),),
        timeout=150,
    ),
    Case(
        "serve",
        "a valid export, started and stopped",
        ["{exp}", "--port", "0", "--db", "chat.db"],
        130,
        ('"event": "verified"', "checked against the manifest's SHA-256", '"event": "stopped"'),
        interrupt='stdout:"event": "ready"',
        timeout=150,
    ),
]
