"""The careless user's cases, one row each: what they typed, what was on disk, and what must come back.

A case runs ``lora-med CMD ARGS`` in its own fresh folder (the working directory). ``{base}``, ``{data}``,
``{run}``, ... in ARGS stand for the shared fixtures (``run.py`` builds them once: a tiny GPT-2 base, the
conversations, a finished LoRA run, a full run and an export); ``setup`` steps put the case's own files in
its folder first (copies of fixtures to damage, FIFOs, sparse giants, YAML files...).

``expect``: 0 (valid input), 2 (a user error: an ``error:`` line holding every ``says`` string, which name the
file, row, flag or field), 130 (SIGINT: "aborted"). ``may_change``: pre-existing paths the user asked to be
replaced (``--overwrite`` of a run lora-med wrote, ``--resume``); any other pre-existing byte that changes is
data lost. ``interrupt``: SIGINT the command once that path (a glob) exists, or once its output holds
"stdout:TEXT". ``bg``: a first command that runs in the
background on the same folder (``while``: the case runs while it holds the folder, then it is interrupted;
``killed``: it is kill -9'ed once ``wait_for`` exists, then the case runs).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

Step = Callable[[Path, dict], None]  # (case folder, fixture paths) -> None


@dataclass
class Bg:
    args: list[str]
    wait_for: str  # path (in the case folder) whose appearance means "it is running now"
    mode: str = "while"  # "while" | "killed"
    cmd: str | None = None  # the background command, when it is not the case's own (a train while a bench runs)


@dataclass
class Case:
    cmd: str
    name: str
    args: list[str]
    expect: int = 2
    says: tuple[str, ...] = ()
    setup: tuple[Step, ...] = ()
    may_change: tuple[str, ...] = ()
    interrupt: str | None = None
    bg: Bg | None = None
    timeout: float = 150.0
    after: Callable[[Path], str | None] | None = None  # what must hold on disk afterwards: None, or the problem


# --------------------------------------------------------------------------- setup steps


def write(rel: str, content: str | bytes) -> Step:
    def step(d: Path, F: dict) -> None:
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content.replace("{data}", F["data"]).replace("{base}", F["base"]), encoding="utf-8")

    return step


def copy(key: str, rel: str) -> Step:
    def step(d: Path, F: dict) -> None:
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if Path(F[key]).is_dir() else shutil.copy)(F[key], d / rel)

    return step


def fifo(rel: str) -> Step:
    return lambda d, F: os.mkfifo(d / rel)


def link(rel: str, target: str) -> Step:
    return lambda d, F: os.symlink(target, d / rel)


def sparse(rel: str, size: int) -> Step:
    """A file of ``size`` bytes that takes no disk (a hole): as large as a careless download, for free."""

    def step(d: Path, F: dict) -> None:
        with open(d / rel, "wb") as f:
            f.truncate(size)

    return step


def cut(rel: str, keep: int | float) -> Step:
    """Truncate a file to ``keep`` bytes (an int) or that share of it (a float): a copy that died half-way."""

    def step(d: Path, F: dict) -> None:
        p = d / rel
        n = keep if isinstance(keep, int) else int(p.stat().st_size * keep)
        with open(p, "r+b") as f:
            f.truncate(n)

    return step


def rm(rel: str) -> Step:
    def step(d: Path, F: dict) -> None:
        p = d / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    return step


def mkdir(rel: str) -> Step:
    return lambda d, F: (d / rel).mkdir(parents=True, exist_ok=True)


def edit(rel: str, fn: Callable) -> Step:
    """Rewrite a JSON file with ``fn(obj)``; a str result is written as is (a damaged card)."""

    def step(d: Path, F: dict) -> None:
        p = d / rel
        new = fn(json.loads(p.read_text(encoding="utf-8")))
        p.write_text(new if isinstance(new, str) else json.dumps(new), encoding="utf-8")

    return step


def lock_by_live_pid(rel: str) -> Step:
    """A lock held by a live process that is not lora-med (this runner's own pid)."""

    def step(d: Path, F: dict) -> None:
        from lora_med import runs

        (d / rel).write_text(json.dumps({"pid": os.getpid(), "started": runs._start_time(os.getpid())}))

    return step


def marker(rel: str, *extra: str) -> Step:
    """Add entries to a folder's .lora-med marker (a damaged or hand-edited one): ``--overwrite`` removes what the
    marker lists, so it must never follow one outside the folder. "abs" stands for an absolute path."""

    def step(d: Path, F: dict) -> None:
        m = json.loads((d / rel / ".lora-med").read_text())
        m["entries"] += [str(d / e) if e == "abs" else e for e in extra]
        (d / rel / ".lora-med").write_text(json.dumps(m))

    return step


def status(value):
    return lambda c: {**c, "status": value}


# --------------------------------------------------------------------------- checks afterwards


def nothing_at(*patterns: str) -> Callable[[Path], str | None]:
    """Nothing half-written: no path matching these globs in the case folder."""

    def check(d: Path) -> str | None:
        left = [str(p.relative_to(d)) for pat in patterns for p in d.glob(pat)]
        return f"left behind: {', '.join(left)}" if left else None

    return check


def card_status(rel: str, want: str) -> Callable[[Path], str | None]:
    def check(d: Path) -> str | None:
        try:
            got = json.loads((d / rel).read_text(encoding="utf-8")).get("status")
        except (OSError, ValueError) as e:
            return f"{rel}: {e}"
        return None if got == want else f"{rel}: status {got!r}, not {want!r}"

    return check


# --------------------------------------------------------------------------- shorthands

D, B = "{data}", "{base}"
FAST = ["--max-steps", "1", "--no-compare", "--r", "4", "--report-to", "none"]  # a tiny run: seconds
# A complete, valid train command line (with FAST). The eight tiny conversations are both the training and the
# evaluation set, which is refused unless allowed (see "eval data that is training data" in cases_more.py).
T = ["--data", D, "--eval-data", D, "--allow-eval-overlap", "--base", B]
SMALL_EXPORT = ["--n-parity", "1", "--max-new-tokens", "2"]
SMALL_BENCH = [
    "--prompts",
    "1",
    "--repeats",
    "1",
    "--warmup",
    "0",
    "--new-tokens",
    "2",
    "--no-scaling",
    "--threads",
    "1",
    "--max-latency-s",
    "0",
    "--min-ppl-gain",
    "0",
    "--backends",
    "ort-cpu-fp32",
]
MOJIBAKE = json.dumps([{"user": "Hola", "assistant": "Centro MÃ©dico CAÃ‘ADA"}], ensure_ascii=False)
ROW = {"user": "Hola, necesito una cita", "assistant": "Con gusto. ¿Para qué especialidad?"}
# a bench that runs long enough to be interrupted or overlapped: 8 prompts x 200 repeats of 64 tokens
LONG_BENCH = [
    "--run",
    "{run}",
    "--export",
    "{exp}",
    "--out",
    "rep",
    *SMALL_BENCH[:-2],
    "--prompts",
    "8",
    "--repeats",
    "200",
    "--new-tokens",
    "64",
]
LONG = "x" * 300  # a name longer than the filesystem allows (255 bytes)
# One setting whose value is 8 levels of 9 references to the level below: a few hundred bytes of YAML, 43M items
# if anything walks it in full (a message quoting it, for one).
ALIAS_BOMB = (
    "report_to: [&l0 [x,x,x,x,x,x,x,x,x], "
    + ", ".join(f"&l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 8))
    + "]\n"
)


# A run kill -9'ed once its second checkpoint is down (20 steps: the kill lands long before the end).
KILLED = Bg(
    [
        *T,
        "--output",
        "out",
        "--max-steps",
        "20",
        "--batch-size",
        "8",
        "--save-every",
        "1",
        "--no-compare",
        "--r",
        "4",
        "--report-to",
        "none",
    ],
    "out/checkpoints/checkpoint-2",
    "killed",
)


def rows(*r) -> str:
    return json.dumps(list(r), ensure_ascii=False)


def train(name, args, **kw) -> Case:
    return Case("train", name, args, **kw)


def yaml_train(name, text, says=(), expect=2, extra=()) -> Case:
    """train --config c.yaml holding ``text`` (on top of a valid command line: only the YAML is wrong)."""
    return Case(
        "train", name, ["--config", "c.yaml", *T, "--output", "out", *extra], expect, says, (write("c.yaml", text),)
    )


def check(name, content, says=(), expect=2, args=(), file="f.json") -> Case:
    setup = (write(file, content),) if content is not None else ()
    return Case("data check", name, [file, *args], expect, says, setup)


def export(name, setup, says=(), expect=2, args=(), run="r") -> Case:
    return Case(
        "merge-export",
        name,
        [run, "--output", "exp", *SMALL_EXPORT, *args],
        expect,
        says,
        (copy("run", "r"), *setup) if run == "r" else tuple(setup),
    )


def bench(name, args, says=(), expect=2, setup=(), **kw) -> Case:
    return Case("bench", name, args, expect, says, tuple(setup), **kw)


def serve(name, args, says=(), setup=()) -> Case:
    return Case("serve", name, args, 2, says, tuple(setup), timeout=60)


# --------------------------------------------------------------------------- the table

CASES: list[Case] = [
    # ---------------------------------------------------------------- data check
    check("valid file", rows(ROW, {"user": "¿Horario?", "assistant": "De 7:30 a 19:00."}), expect=0),
    check("valid file, --json", rows(ROW), expect=0, args=("--json",)),
    check("file missing", None, ("missing.json", "not found"), file="missing.json"),
    check("empty file", "", ("f.json", "empty")),
    check("whitespace only", "  \n\n ", ("f.json", "empty")),
    check("empty array", "[]", ("f.json", "empty")),
    check("binary bytes", bytes(range(256)) * 4, ("f.json", "UTF-8")),
    check("UTF-16 file", rows(ROW).encode("utf-16"), ("f.json", "UTF-8")),
    check("UTF-8 with a BOM", b"\xef\xbb\xbf" + rows(ROW).encode(), expect=0),
    check("mojibake (UTF-8 read as Latin-1)", MOJIBAKE, ("f.json", "row 1", "mojibake")),
    check("truncated JSON", rows(ROW, ROW)[:-20], ("f.json", "truncated")),
    check("top level is an object", json.dumps(ROW), ("f.json", "top level")),
    check("row is a string", rows("hola"), ("row 1", "expected an object")),
    check("assistant missing", rows({"user": "hola"}), ("row 1", "'assistant'")),
    check("assistant null", rows({"user": "hola", "assistant": None}), ("row 1", "'assistant' is null")),
    check("content is a number", rows({"user": 5, "assistant": "x"}), ("row 1", "'user' must be a string")),
    check("NaN literal as content", '[{"user": NaN, "assistant": "x"}]', ("row 1", "'user'")),
    check("unknown role", rows({"messages": [{"role": "doctor", "content": "x"}]}), ("messages[0]", "role")),
    check(
        "conversation ends with the user",
        rows({"messages": [{"role": "user", "content": "x"}]}),
        ("row 1", "end with an assistant turn"),
    ),
    check("nested 100k deep", "[" * 100_000 + "]" * 100_000, ("f.json", "invalid JSON")),
    check("integer with 5000 digits", '[{"user": ' + "9" * 5000 + ', "assistant": "x"}]', ("f.json", "invalid JSON")),
    check("JSONL with a bad line", json.dumps(ROW) + "\n{oops\n", ("f.jsonl:2", "invalid JSON"), file="f.jsonl"),
    check("JSONL, CRLF line ends, blank lines", (json.dumps(ROW) + "\r\n\r\n") * 2, expect=0, file="f.jsonl"),
    check(
        "JSONL with U+2028 and U+0085 in strings",
        json.dumps({"user": "a\u2028b", "assistant": "c\u0085d"}, ensure_ascii=False) + "\n",
        expect=0,
        file="f.jsonl",
    ),
    check("duplicates are warnings", rows(ROW, ROW), expect=0),
    check(
        "reply longer than --max-length",
        rows({"user": "hola", "assistant": "palabra " * 200}),
        ("row 1", "--max-length"),
        args=("--max-length", "16"),
    ),
    check("--max-length 0", rows(ROW), ("--max-length",), args=("--max-length", "0")),
    check("--max-length abc", rows(ROW), ("--max-length",), args=("--max-length", "abc")),
    check("--format bogus", rows(ROW), ("--format",), args=("--format", "bogus")),
    check(
        "--format chat-template, tokenizer has none",
        rows(ROW),
        ("--format",),
        args=("--format", "chat-template", "--tokenizer", B),
    ),
    check("--tokenizer missing folder", rows(ROW), ("--tokenizer", "nope"), args=("--tokenizer", "nope/tok")),
    check("--tokenizer is an empty folder", rows(ROW), ("--tokenizer",), args=("--tokenizer", ".")),
    check("--tokenizer is a file", rows(ROW), ("--tokenizer",), args=("--tokenizer", "f.json")),
    check("unknown flag", rows(ROW), ("--max-len",), args=("--max-len", "8")),
    Case("data check", "FIFO as the file", ["p.json"], 2, ("p.json", "FIFO"), (fifo("p.json"),)),
    Case("data check", "/dev/zero", ["/dev/zero"], 2, ("/dev/zero", "not a regular file")),
    Case(
        "data check",
        "symlink to /dev/zero",
        ["z.json"],
        2,
        ("z.json", "not a regular file"),
        (link("z.json", "/dev/zero"),),
    ),
    Case("data check", "a folder", ["sub"], 2, ("sub",), (mkdir("sub"),)),
    Case("data check", "2 GiB file (sparse)", ["big.json"], 2, ("big.json", "bytes"), (sparse("big.json", 2 << 30),)),
    Case("data check", "file name longer than the filesystem allows", [LONG + ".json"], 2, ("File name too long",)),
    Case("data check", "file inside a file", ["f.json/x.json"], 2, ("f.json/x.json",), (write("f.json", rows(ROW)),)),
    # ---------------------------------------------------------------- train: flags
    train("valid run", [*T, "--output", "out", *FAST], expect=0),
    train("--r 0", [*T, "--r", "0"], says=("--r 0", ">= 1")),
    train("--lora_r abc (seed spelling)", [*T, "--lora_r", "abc"], says=("--lora_r abc",)),
    train("--learning-rate nan", [*T, "--learning-rate", "nan"], says=("--learning-rate nan", "finite")),
    train("--learning_rate inf", [*T, "--learning_rate", "inf"], says=("--learning_rate inf", "finite")),
    train("--learning-rate -1", [*T, "--learning-rate", "-1"], says=("--learning-rate -1",)),
    train("--learning-rate 2e-4x", [*T, "--learning-rate", "2e-4x"], says=("--learning-rate 2e-4x",)),
    train("--epochs 0", [*T, "--epochs", "0"], says=("--epochs 0",)),
    train("--epochs ''", [*T, "--epochs", ""], says=("--epochs",)),
    train("--seed -1", [*T, "--seed", "-1"], says=("--seed -1", ">= 0")),
    train("--weight-decay -0.1", [*T, "--weight-decay", "-0.1"], says=("--weight-decay -0.1",)),
    train("--dropout 1", [*T, "--dropout", "1"], says=("--dropout 1",)),
    train("--max-steps -5", [*T, "--max-steps", "-5"], says=("--max-steps -5",)),
    train("--log-every 0", [*T, "--log-every", "0"], says=("--log-every 0",)),
    train("--max-length 4", [*T, "--max-length", "4"], says=("--max-length 4",)),
    train(
        "--max-length beyond the base's positions",
        [*T, "--max-length", "100000"],
        says=("--max-length 100000", "256 positions"),
    ),
    train(
        "--compare-max-new-tokens beyond positions",
        [*T, "--compare-max-new-tokens", "999"],
        says=("--compare-max-new-tokens 999",),
    ),
    train(
        "--r 1e30 (huge rank)",
        [*T, "--output", "out", *FAST, "--r", "1e30"],
        says=("--r 1000000000000000019884624838656", "width"),
    ),  # 1e30 is read as a float, then a whole number
    train("--r 65 (above the layers' width)", [*T, "--output", "out", *FAST, "--r", "65"], says=("--r 65", "<= 64")),
    train(
        "--batch-size 1e12 (huge)",
        [*T, "--output", "out", *FAST, "--batch-size", "1e12"],
        says=("--batch-size 1000000000000", "8 training conversations"),
    ),
    train(
        "--log/eval/save-every 1e30 (huge, valid)",
        [*T, "--output", "out", *FAST, "--log-every", "1e30", "--eval-every", "1e30", "--save-every", "1e30"],
        expect=0,
    ),
    train(
        "--epochs 1e-9 (still one step)",
        [*T, "--output", "out", "--no-compare", "--r", "4", "--epochs", "1e-9", "--report-to", "none"],
        expect=0,
    ),
    train("--method prefix", [*T, "--method", "prefix"], says=("--method prefix", "lora, qlora, full")),
    train("--method LoRA (case)", [*T, "--method", "LoRA"], says=("--method LoRA",)),
    train("--target-modules lm_head", [*T, "--target-modules", "lm_head"], says=("--target-modules lm_head",)),
    train("--target-modules not in the model", [*T, "--target-modules", "q_proj"], says=("--target-modules", "q_proj")),
    train(
        "--target-modules with --method full",
        [*T, "--method", "full", "--target-modules", "c_attn"],
        says=("--target-modules",),
    ),
    train("--report-to none,tensorboard", [*T, "--report-to", "none,tensorboard"], says=("--report-to",)),
    train("--report-to neptune", [*T, "--report-to", "neptune"], says=("--report-to neptune",)),
    train("--eval-fraction with --eval-data FILE", [*T, "--eval-fraction", "0.2"], says=("--eval-fraction 0.2",)),
    train("--eval-fraction 1.5", ["--data", D, "--base", B, "--eval-fraction", "1.5"], says=("--eval-fraction 1.5",)),
    train("--precision fp16 on the CPU", [*T, "--precision", "fp16"], says=("--precision fp16",)),
    train("--device cuda without a GPU", [*T, "--device", "cuda"], says=("--device",)),
    train("--quant-bits 3", [*T, "--method", "qlora", "--quant-bits", "3"], says=("--quant-bits 3",)),
    train("--vram-gb -1", [*T, "--vram-gb", "-1"], says=("--vram-gb -1",)),
    train("--vram-gb 1e-9 --plan", [*T, "--vram-gb", "1e-9", "--plan"], says=("--vram-gb",)),
    train("unknown flag --lr", [*T, "--lr", "1e-3"], says=("--lr",)),
    train("--run-name with a slash", [*T, "--run-name", "../escape", *FAST], says=("--run-name ../escape",)),
    train("--plan (valid, writes nothing)", [*T, "--plan"], expect=0),
    # ---------------------------------------------------------------- train: inputs
    train("--data missing", ["--data", "nope.json", "--base", B], says=("--data nope.json", "not found")),
    train("--data a folder", ["--data", ".", "--base", B], says=("--data .",)),
    train(
        "--data FIFO", ["--data", "p.json", "--base", B], says=("p.json", "not a regular file"), setup=(fifo("p.json"),)
    ),
    train("--data /dev/zero", ["--data", "/dev/zero", "--base", B], says=("/dev/zero", "not a regular file")),
    train(
        "--data binary",
        ["--data", "b.json", "--base", B, "--output", "out"],
        says=("b.json", "UTF-8"),
        setup=(write("b.json", bytes(range(256))),),
    ),
    train(
        "--data mojibake",
        ["--data", "m.json", "--base", B, "--output", "out"],
        says=("m.json", "mojibake"),
        setup=(write("m.json", MOJIBAKE),),
    ),
    train("--data name too long", ["--data", LONG + ".json", "--base", B], says=("File name too long",)),
    train(
        "--data a symlink loop",
        ["--data", "loop.json", "--base", B],
        says=("--data loop.json",),
        setup=(link("loop.json", "loop.json"),),
    ),
    train(
        "--data with a single conversation, split eval",
        ["--data", "one.json", "--base", B, "--output", "out", *FAST],
        says=("--eval-data",),
        setup=(write("one.json", rows(ROW)),),
    ),
    train(
        "--eval-data missing", ["--data", D, "--eval-data", "nope.json", "--base", B], says=("--eval-data nope.json",)
    ),
    train("--base missing folder", ["--data", D, "--base", "./nope"], says=("--base ./nope",)),
    train(
        "--base a hub id, offline",
        ["--data", D, "--base", "someone/some-model", "--output", "out"],
        says=("someone/some-model",),
    ),
    train(
        "--base a file",
        ["--data", D, "--base", "f.txt"],
        says=("--base f.txt", "is a file"),
        setup=(write("f.txt", "x"),),
    ),
    train(
        "--base without a tokenizer",
        [*T[:-1], "b", "--output", "out"],
        says=("--base", "b: no tokenizer"),
        setup=(copy("base", "b"), rm("b/tokenizer.json"), rm("b/vocab.json"), rm("b/tokenizer_config.json")),
    ),
    train(
        "--base with a corrupt tokenizer.json",
        [*T[:-1], "b", "--output", "out", *FAST],
        says=("b",),
        setup=(copy("base", "b"), write("b/tokenizer.json", "{not json")),
    ),
    train(
        "--base with a corrupt config.json",
        [*T[:-1], "b", "--output", "out", *FAST],
        says=("b",),
        setup=(copy("base", "b"), write("b/config.json", "{oops")),
    ),
    train(
        "--base config.json is a list",
        [*T[:-1], "b", "--output", "out", *FAST],
        says=("b",),
        setup=(copy("base", "b"), write("b/config.json", "[]")),
    ),
    train(
        "--base config.json with n_layer 'two'",
        [*T[:-1], "b", "--output", "out", *FAST],
        says=("b",),
        setup=(copy("base", "b"), edit("b/config.json", lambda c: {**c, "n_layer": "two"})),
    ),
    train(
        "--base with truncated weights",
        [*T[:-1], "b", "--output", "out", *FAST],
        says=("b", "model.safetensors"),
        setup=(copy("base", "b"), cut("b/model.safetensors", 0.5)),
    ),
    train(
        "--base with pickle weights only",
        [*T[:-1], "b", "--output", "out", *FAST],
        says=("b",),
        setup=(copy("base", "b"), rm("b/model.safetensors"), write("b/pytorch_model.bin", b"\x80\x04K\x01.")),
    ),
    # ---------------------------------------------------------------- train: outputs
    train(
        "--output . --overwrite (the working dir)",
        [*T, "--output", ".", "--overwrite", *FAST],
        says=("--output .", "working directory"),
        setup=(write("keep.txt", "mis notas"),),
    ),
    train(
        "--output .. --overwrite (a parent of the working dir)",
        [*T, "--output", "..", "--overwrite", *FAST],
        says=("--output ..", "working directory"),
    ),
    train("--output ~ --overwrite (home)", [*T, "--output", "~", "--overwrite", *FAST], says=("--output ~",)),
    train(
        "--output the data's folder --overwrite",
        ["--data", "proj/d.json", "--eval-data", "proj/d.json", "--base", B, "--output", "proj", "--overwrite", *FAST],
        says=("--output proj", "training data"),
        setup=(copy("data", "proj/d.json"), write("proj/notes.txt", "x")),
    ),
    train(
        "--output the base, --method full",
        [*T[:-1], "b", "--output", "b", "--method", "full", *FAST],
        says=("--output b", "base model"),
        setup=(copy("base", "b"),),
    ),
    train(
        "--output inside the base",
        [*T[:-1], "b", "--output", "b/run", *FAST],
        says=("--output b/run", "base"),
        setup=(copy("base", "b"),),
    ),
    train(
        "--output is a file",
        [*T, "--output", "f.txt", *FAST],
        says=("--output f.txt", "not a folder"),
        setup=(write("f.txt", "x"),),
    ),
    train(
        "--output under a file",
        [*T, "--output", "f.txt/run", *FAST],
        says=("--output f.txt/run",),
        setup=(write("f.txt", "x"),),
    ),
    train("--output read-only (/proc)", [*T, "--output", "/proc/lora-med-run", *FAST], says=("--output /proc",)),
    train(
        "--output a symlink loop",
        [*T, "--output", "loop", *FAST],
        says=("--output loop",),
        setup=(link("loop", "loop"),),
    ),
    train("--output name too long", [*T, "--output", LONG, *FAST], says=("File name too long",)),
    train(
        "--output a symlink to the data's folder --overwrite",
        ["--data", "proj/d.json", "--eval-data", "proj/d.json", "--base", B, "--output", "ln", "--overwrite", *FAST],
        says=("--output ln", "training data"),
        setup=(copy("data", "proj/d.json"), link("ln", "proj")),
    ),
    train(
        "--overwrite a run whose marker names ../ and absolute paths",
        [*T, "--output", "p/r", "--overwrite", *FAST],
        expect=0,
        may_change=("p/r/*",),
        setup=(
            copy("run", "p/r"),
            write("p/victim/a.txt", "x"),
            write("abs/b.txt", "y"),
            marker("p/r", "../victim", "abs"),
        ),
    ),
    train(
        "--output foreign folder --overwrite",
        [*T, "--output", "mine", "--overwrite", *FAST],
        says=("--output mine", "did not write"),
        setup=(write("mine/thesis.tex", "x"),),
    ),
    train(
        "--output foreign folder, no --overwrite",
        [*T, "--output", "mine", *FAST],
        says=("--output mine",),
        setup=(write("mine/thesis.tex", "x"),),
    ),
    train(
        "--output an export folder --overwrite",
        [*T, "--output", "e", "--overwrite", *FAST],
        says=("--output e", "export"),
        setup=(copy("exp", "e"),),
    ),
    train(
        "--output a finished run, no --overwrite",
        [*T, "--output", "r", *FAST],
        says=("--output r", "finished"),
        setup=(copy("run", "r"),),
    ),
    train(
        "--overwrite a run holding my notes",
        [*T, "--output", "r", "--overwrite", *FAST],
        says=("--output r", "notes.md"),
        setup=(copy("run", "r"), write("r/notes.md", "apuntes")),
    ),
    train(
        "--overwrite a run lora-med wrote",
        [*T, "--output", "r", "--overwrite", *FAST],
        expect=0,
        setup=(copy("run", "r"),),
        may_change=("r/*",),
    ),
    train(
        "--overwrite a run whose marker is damaged",
        [*T, "--output", "r", "--overwrite", *FAST],
        says=("--output r", "did not write"),
        setup=(copy("run", "r"), write("r/.lora-med", '{"entries": [{}]}')),
    ),
    train(
        "--output a folder locked by a live pid",
        [*T, "--output", "r", "--overwrite", *FAST],
        says=("in use by pid",),
        setup=(copy("run", "r"), lock_by_live_pid("r/.lock")),
    ),
    # ---------------------------------------------------------------- train: YAML
    yaml_train(
        "learning_rate: 2e-4 (a string to PyYAML)",
        "learning_rate: 2e-4\nmax_steps: 1\ncompare: false\nreport_to: none\n",
        expect=0,
    ),
    yaml_train(
        "target_modules: c_attn (one module)",
        "target_modules: c_attn\nmax_steps: 1\ncompare: false\n",
        expect=0,
        extra=("--plan",),
    ),
    yaml_train("r: null", "r: null\n", ("r: None", "c.yaml", "not null")),
    yaml_train("r: [1, 2]", "r: [1, 2]\n", ("r: 1,2", "c.yaml")),
    yaml_train("r: true", "r: true\n", ("r: True", "boolean")),
    yaml_train("r: {a: 1}", "r: {a: 1}\n", ("r:", "c.yaml")),
    yaml_train("learning_rate: .inf", "learning_rate: .inf\n", ("learning_rate: inf", "finite")),
    yaml_train("learning_rate: ''", "learning_rate: ''\n", ("learning_rate:", "c.yaml")),
    yaml_train("epochs: -3", "epochs: -3\n", ("epochs: -3",)),
    yaml_train("method: lóra (unicode)", "method: lóra\n", ("method: lóra",)),
    Case(
        "train",
        "base: 123",
        ["--config", "c.yaml", "--data", D, "--output", "out"],
        2,
        ("base: 123", "text"),
        (write("c.yaml", "base: 123\n"),),
    ),
    yaml_train("target_modules: [c_attn, 3]", "target_modules: [c_attn, 3]\n", ("target_modules",)),
    yaml_train("unknown key", "lr: 1e-3\n", ("c.yaml", "unknown setting", "lr")),
    yaml_train("key is a number", "1: 2\n", ("c.yaml", "unknown setting")),
    yaml_train("r and lora_r both", "r: 4\nlora_r: 8\n", ("c.yaml", "same setting")),
    yaml_train("a list at the top", "- r: 4\n", ("c.yaml", "mapping")),
    yaml_train("invalid YAML", "r: [4\n", ("c.yaml", "invalid YAML")),
    yaml_train("python tag (code)", "r: !!python/object/apply:os.system ['true']\n", ("c.yaml",)),
    yaml_train(
        "alias bomb",
        "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,"
        "*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,"
        "*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\nh: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\n",
        ("c.yaml", "unknown setting"),
    ),
    yaml_train("alias bomb in a setting (9^8 references)", ALIAS_BOMB, ("report_to", "c.yaml")),
    yaml_train("Latin-1 bytes", "method: l\xf3ra\n".encode("latin-1"), ("c.yaml", "UTF-8")),
    Case("train", "--config missing", ["--config", "nope.yaml", *T], 2, ("nope.yaml",)),
    Case("train", "--config a folder", ["--config", "sub", *T], 2, ("sub",), (mkdir("sub"),)),
    Case("train", "--config /dev/zero", ["--config", "/dev/zero", *T], 2, ("/dev/zero",)),
    Case("train", "--config FIFO", ["--config", "p.yaml", *T], 2, ("p.yaml", "FIFO"), (fifo("p.yaml"),)),
    Case("train", "--config empty file --plan", ["--config", "c.yaml", *T, "--plan"], 0, (), (write("c.yaml", ""),)),
    # ---------------------------------------------------------------- train: resume
    train("--resume a finished run", ["--resume", "r"], says=("--resume r", "finished"), setup=(copy("run", "r"),)),
    train("--resume a missing folder", ["--resume", "nope"], says=("--resume", "nope")),
    train(
        "--resume a foreign folder", ["--resume", "mine"], says=("--resume", "mine"), setup=(write("mine/a.txt", "x"),)
    ),
    train("--resume an export", ["--resume", "e"], says=("--resume", "export"), setup=(copy("exp", "e"),)),
    train(
        "--resume with --overwrite",
        ["--resume", "r", "--overwrite"],
        says=("--resume", "--overwrite"),
        setup=(copy("run", "r"), edit("r/run.json", status("running"))),
    ),
    train(
        "--resume X --output Y",
        ["--resume", "r", "--output", "other"],
        says=("--resume r", "--output other"),
        setup=(copy("run", "r"), edit("r/run.json", status("running"))),
    ),
    train(
        "--resume with another --r",
        ["--resume", "r", "--r", "16"],
        says=("--resume r", "r (run: 4"),
        setup=(copy("run", "r"), edit("r/run.json", status("running"))),
    ),
    train(
        "--resume with a corrupt run.json",
        ["--resume", "r"],
        says=("run.json", "not valid JSON"),
        setup=(copy("run", "r"), write("r/run.json", '{"kind": "lora-med.tr')),
    ),
    train(
        "--resume while another process holds it",
        ["--resume", "r"],
        says=("in use by pid",),
        setup=(copy("run", "r"), edit("r/run.json", status("running")), lock_by_live_pid("r/.lock")),
    ),
    train(
        "--resume, newest checkpoint truncated: falls back",
        ["--resume", "r"],
        expect=0,
        may_change=("r/*",),
        says=("skipped a broken checkpoint",),
        setup=(
            copy("run", "r"),
            edit("r/run.json", status("running")),
            cut("r/checkpoints/checkpoint-2/adapter_model.safetensors", 0.5),
        ),
    ),
    train(
        "--resume after the last checkpoint: only finishes",
        ["--resume", "r"],
        expect=0,
        may_change=("r/*",),
        setup=(copy("run", "r"), edit("r/run.json", status("running"))),
    ),
    train(
        "--resume with the training data changed",
        ["--resume", "r"],
        says=("d.json", "changed"),
        setup=(
            copy("run", "r"),
            copy("data", "d.json"),
            edit("r/run.json", lambda c: {**c, "status": "running", "config": {**c["config"], "data": "d.json"}}),
            write("d.json", rows(ROW)),
        ),
    ),
    train(
        "Ctrl-C during training",
        [*T, "--output", "out", "--max-steps", "100000", "--no-compare", "--r", "4", "--report-to", "none"],
        expect=130,
        interrupt="out/run.json",
        after=card_status("out/run.json", "failed"),
    ),
    train(
        "Ctrl-C while the model loads",
        [*T, "--output", "out", *FAST],
        expect=130,
        interrupt="stdout:Device:",
        after=nothing_at("out/run.json", "out/.lock"),
    ),
    train(
        "a second train on a folder in use",
        [*T, "--output", "out", "--overwrite", *FAST],
        says=("in use by pid",),
        bg=Bg(
            [*T, "--output", "out", "--max-steps", "100000", "--no-compare", "--r", "4", "--report-to", "none"],
            "out/run.json",
        ),
    ),
    train(
        "train after kill -9, without --resume",
        [*T, "--output", "out", *FAST],
        says=("--output out", "--resume"),
        bg=KILLED,
    ),
    train("--resume after kill -9 (stale lock taken over)", ["--resume", "out"], expect=0, bg=KILLED),
    train(
        "--resume after kill -9 with another --max-steps",
        ["--resume", "out", "--max-steps", "3"],
        says=("--resume out", "max_steps"),
        bg=KILLED,
    ),
    # ---------------------------------------------------------------- merge-export
    export("valid export", (), expect=0),
    export("valid export of the full run", (copy("full", "f"),), expect=0, run="f"),
    Case("merge-export", "no RUN_DIR", [], 2, ("RUN_DIR",)),
    export("RUN_DIR missing", (), ("nope", "no such folder"), run="nope"),
    export("RUN_DIR is a file", (write("f.txt", "x"),), ("f.txt",), run="f.txt"),
    export("RUN_DIR is a foreign folder", (write("mine/a.txt", "x"),), ("mine", "run.json"), run="mine"),
    export("RUN_DIR is the base model", (), ("run.json",), run=B),
    export("RUN_DIR is an export", (copy("exp", "e"),), ("e", "export"), run="e"),
    export("RUN_DIR name too long", (), ("File name too long",), run=LONG),
    export("run.json missing", (rm("r/run.json"),), ("run.json",)),
    export("run.json empty", (write("r/run.json", ""),), ("run.json", "not valid JSON")),
    export("run.json truncated", (cut("r/run.json", 0.5),), ("run.json", "not valid JSON")),
    export("run.json is a list", (write("r/run.json", "[1, 2]"),), ("run.json", "JSON object")),
    export("run.json of another kind", (edit("r/run.json", lambda c: {**c, "kind": "x"}),), ("run.json", "kind")),
    export(
        "run.json with base of the wrong type",
        (edit("r/run.json", lambda c: {**c, "base": [1]}),),
        ("run.json", "base.name_or_path"),
    ),
    export(
        "run.json with config of the wrong type",
        (edit("r/run.json", lambda c: {**c, "config": "lora"}),),
        ("run.json", "config"),
    ),
    export(
        "run.json with an unknown artifact",
        (edit("r/run.json", lambda c: {**c, "artifact": "zip"}),),
        ("run.json", "artifact"),
    ),
    export(
        "run.json with max_length 'long'",
        (edit("r/run.json", lambda c: {**c, "data": {**c["data"], "max_length": "long"}}),),
        ("run.json", "max_length"),
    ),
    export(
        "run.json with eval indices out of range",
        (
            edit(
                "r/run.json",
                lambda c: {
                    **c,
                    "data": {**c["data"], "eval": {**c["data"]["eval"], "source": "split", "indices": [999]}},
                },
            ),
        ),
        ("run.json",),
    ),
    export("run.json status running", (edit("r/run.json", status("running")),), ("r", "--resume")),
    export("run.json is /dev/zero", (rm("r/run.json"), link("r/run.json", "/dev/zero")), ("run.json",)),
    export("run.json is a FIFO", (rm("r/run.json"), fifo("r/run.json")), ("run.json", "FIFO")),
    export("adapter missing", (rm("r/adapter_model.safetensors"),), ("adapter_model.safetensors", "missing")),
    export("adapter empty", (cut("r/adapter_model.safetensors", 0),), ("adapter_model.safetensors",)),
    export("adapter truncated", (cut("r/adapter_model.safetensors", 0.6),), ("adapter_model.safetensors",)),
    export(
        "adapter of another run (r 8 into r 4)",
        (rm("r/adapter_model.safetensors"), copy("r8_adapter", "r/adapter_model.safetensors")),
        ("adapter",),
    ),
    export(
        "adapter is the full run's model",
        (rm("r/adapter_model.safetensors"), copy("full_model", "r/adapter_model.safetensors")),
        ("adapter",),
    ),
    export("adapter_config.json missing", (rm("r/adapter_config.json"),), ("adapter_config.json",)),
    export("adapter_config.json corrupt", (write("r/adapter_config.json", "{"),), ("adapter_config.json",)),
    export("adapter_config.json is a list", (write("r/adapter_config.json", "[]"),), ("adapter_config.json",)),
    export(
        "adapter_config.json with r 'four'",
        (edit("r/adapter_config.json", lambda c: {**c, "r": "four"}),),
        ("adapter_config.json",),
    ),
    export("tokenizer files missing", (rm("r/tokenizer_config.json"),), ("tokenizer_config.json",)),
    export(
        "held-out data moved away",
        (
            copy("data", "d.json"),
            edit(
                "r/run.json",
                lambda c: {
                    **c,
                    "data": {
                        **c["data"],
                        "eval": {**c["data"]["eval"], "path": "/nonexistent/d.json", "relative_to_run": "../d.json"},
                    },
                },
            ),
            rm("d.json"),
        ),
        ("held-out data is gone",),
    ),
    export(
        "held-out data changed",
        (
            copy("data", "d.json"),
            edit(
                "r/run.json",
                lambda c: {
                    **c,
                    "data": {
                        **c["data"],
                        "eval": {**c["data"]["eval"], "path": "/nonexistent/d.json", "relative_to_run": "../d.json"},
                    },
                },
            ),
            write("d.json", rows(ROW)),
        ),
        ("d.json", "changed since training"),
    ),
    export(
        "base folder gone",
        (edit("r/run.json", lambda c: {**c, "base": {**c["base"], "name_or_path": "/nonexistent/base"}}),),
        ("base",),
    ),
    export(
        "full run: model.safetensors truncated",
        (copy("full", "f"), cut("f/model.safetensors", 0.5)),
        ("model.safetensors",),
        run="f",
    ),
    export("full run: config.json missing", (copy("full", "f"), rm("f/config.json")), ("config.json",), run="f"),
    Case(
        "merge-export",
        "--output the run itself --overwrite",
        ["r", "--output", "r", "--overwrite"],
        2,
        ("--output r", "training run"),
        (copy("run", "r"),),
    ),
    Case(
        "merge-export",
        "--output the run's parent --overwrite",
        ["p/r", "--output", "p", "--overwrite"],
        2,
        ("--output p", "training run"),
        (copy("run", "p/r"), write("p/other.txt", "x")),
    ),
    Case(
        "merge-export",
        "--output . --overwrite",
        ["r", "--output", ".", "--overwrite"],
        2,
        ("--output .", "working directory"),
        (copy("run", "r"),),
    ),
    Case(
        "merge-export",
        "--output the base --overwrite",
        ["r", "--output", B, "--overwrite"],
        2,
        ("base model",),
        (copy("run", "r"),),
    ),
    Case(
        "merge-export",
        "--output inside the run",
        ["r", "--output", "r/exp"],
        2,
        ("--output r/exp", "inside"),
        (copy("run", "r"),),
    ),
    Case(
        "merge-export",
        "--output a symlink to the run --overwrite",
        ["r", "--output", "ln", "--overwrite"],
        2,
        ("--output ln", "training run"),
        (copy("run", "r"), link("ln", "r")),
    ),
    Case(
        "merge-export",
        "a second export to the same output",
        ["r", "--output", "e", *SMALL_EXPORT],
        2,
        ("in use by pid",),
        (copy("run", "r"),),
        bg=Bg(["r", "--output", "e"], "e.partial-*"),
    ),
    Case(
        "merge-export",
        "--output a foreign folder --overwrite",
        ["r", "--output", "mine", "--overwrite"],
        2,
        ("--output mine", "did not write"),
        (copy("run", "r"), write("mine/x.bin", b"\0")),
    ),
    Case(
        "merge-export",
        "--output an existing export, no --overwrite",
        ["r", "--output", "e"],
        2,
        ("--output e", "--overwrite"),
        (copy("run", "r"), copy("exp", "e")),
    ),
    Case(
        "merge-export",
        "--output a training run --overwrite",
        ["r", "--output", "r2", "--overwrite"],
        2,
        ("--output r2",),
        (copy("run", "r"), copy("run", "r2")),
    ),
    Case(
        "merge-export",
        "--output read-only (/proc)",
        ["r", "--output", "/proc/lora-med-exp"],
        2,
        ("--output /proc",),
        (copy("run", "r"),),
    ),
    Case(
        "merge-export",
        "--overwrite an export lora-med wrote",
        ["r", "--output", "e", "--overwrite", *SMALL_EXPORT],
        0,
        setup=(copy("run", "r"), copy("exp", "e")),
        may_change=("e/*",),
    ),
    Case(
        "merge-export",
        "stale .partial of a killed export",
        ["r", "--output", "e", *SMALL_EXPORT],
        0,
        setup=(
            copy("run", "r"),
            write("e.partial-999999999/.lora-med", '{"kind": "lora-med.export", "entries": ["merged"]}'),
            mkdir("e.partial-999999999/merged"),
        ),
        may_change=("e.partial-999999999*",),
    ),
    export("--quantize int8 --device cuda", (), ("--quantize int8",), args=("--quantize", "int8", "--device", "cuda")),
    export("--dtype fp16 on the CPU", (), ("--dtype fp16",), args=("--dtype", "fp16")),
    export("--optimize O4 on the CPU", (), ("--optimize O4",), args=("--optimize", "O4")),
    export("--atol -1", (), ("--atol -1",), args=("--atol", "-1")),
    export("--atol nan", (), ("--atol nan",), args=("--atol", "nan")),
    export("--n-parity 0", (), ("--n-parity 0",), args=("--n-parity", "0")),
    export("--min-top1 1.5", (), ("--min-top1 1.5",), args=("--min-top1", "1.5")),
    export("--n-parity 1e9 (more than held out)", (), expect=0, args=("--n-parity", "1e9")),
    export("unknown flag --quantise", (), ("--quantise",), args=("--quantise", "int8")),
    Case(
        "merge-export",
        "YAML with an unknown key",
        ["r", "--config", "c.yaml"],
        2,
        ("c.yaml", "quantise"),
        (copy("run", "r"), write("c.yaml", "quantise: int8\n")),
    ),
    # Ctrl-C at each step (torch's ONNX tracer turns a KeyboardInterrupt into a SystemError).
    *[
        Case(
            "merge-export",
            f"Ctrl-C at {step}",
            ["r", "--output", "e"],
            130,
            interrupt=f"stdout:{step}",
            setup=(copy("run", "r"),),
            after=nothing_at("e", "e.*", ".e.lock"),
        )
        for step in ("[1/5] merge", "[2/5] save", "[3/5] export", "[4/5] engine", "[5/5] parity")
    ],
    # ---------------------------------------------------------------- bench
    bench("valid bench", ["--run", "{run}", "--export", "{exp}", "--out", "rep", *SMALL_BENCH], expect=0),
    bench(
        "bench again onto its own report",
        ["--run", "{run}", "--export", "{exp}", "--out", "rep", *SMALL_BENCH],
        expect=0,
        setup=(copy("report", "rep"),),
        may_change=("rep/*",),
    ),
    bench("nothing to measure", [], ("nothing to measure",)),
    bench("--run missing", ["--run", "nope"], ("--run", "nope")),
    bench("--run is an export", ["--run", "{exp}"], ("--run", "export")),
    bench("--run is a file", ["--run", "f.txt"], ("--run", "f.txt"), setup=(write("f.txt", "x"),)),
    bench("--export alone", ["--export", "{exp}"], ("--export",)),
    bench("--export missing", ["--run", "{run}", "--export", "nope"], ("--export", "nope")),
    bench(
        "--export of another run",
        ["--run", "{run8}", "--export", "{exp}", "--out", "rep"],
        ("--export", "neither --run nor --full-run"),
    ),
    bench(
        "--export that failed its gate",
        ["--run", "{run}", "--export", "e", "--out", "rep"],
        ("e", "failed"),
        setup=(copy("exp", "e"), edit("e/manifest.json", status("failed"))),
    ),
    bench(
        "--export with a corrupt manifest",
        ["--run", "{run}", "--export", "e", "--out", "rep"],
        ("manifest.json",),
        setup=(copy("exp", "e"), write("e/manifest.json", "{")),
    ),
    bench(
        "--export without model.onnx",
        ["--run", "{run}", "--export", "e", "--out", "rep"],
        ("model.onnx",),
        setup=(copy("exp", "e"), rm("e/onnx/model.onnx")),
    ),
    bench(
        "--export with a truncated model.onnx",
        ["--run", "{run}", "--export", "e", "--out", "rep", *SMALL_BENCH],
        ("model.onnx",),
        setup=(copy("exp", "e"), cut("e/onnx/model.onnx", 0.5)),
    ),
    bench(
        "--run with a truncated adapter",
        ["--run", "r", "--out", "rep", *SMALL_BENCH[:-2], "--backends", "torch-eager"],
        ("adapter_model.safetensors",),
        setup=(copy("run", "r"), cut("r/adapter_model.safetensors", 0.5)),
    ),
    bench(
        "--run whose base is gone",
        ["--run", "r", "--out", "rep", *SMALL_BENCH],
        ("base",),
        setup=(
            copy("run", "r"),
            edit("r/run.json", lambda c: {**c, "base": {**c["base"], "name_or_path": "/nonexistent/b"}}),
        ),
    ),
    bench(
        "--run whose held-out data moved",
        ["--run", "r", "--out", "rep", *SMALL_BENCH],
        ("held-out data",),
        setup=(
            copy("run", "r"),
            edit(
                "r/run.json",
                lambda c: {
                    **c,
                    "data": {
                        **c["data"],
                        "eval": {**c["data"]["eval"], "path": "/nonexistent/d.json", "relative_to_run": "../d.json"},
                    },
                },
            ),
        ),
    ),
    bench("--full-run that is a LoRA run", ["--full-run", "{run}"], ("--full-run", "adapter")),
    bench(
        "--run and --full-run on different held-out sets",
        ["--run", "{run}", "--full-run", "f"],
        ("--run", "--full-run", "same held-out set"),
        setup=(copy("full", "f"), edit("f/run.json", lambda c: {**c, "data": {**c["data"], "max_length": 64}})),
    ),
    bench("--shape with --run", ["--shape", "dialogpt-medium", "--run", "{run}"], ("--shape", "--run")),
    bench("--shape bogus", ["--shape", "bogus"], ("--shape bogus",)),
    bench("--new-tokens 0", ["--run", "{run}", "--new-tokens", "0"], ("--new-tokens 0",)),
    bench(
        "--new-tokens 100000 (beyond positions)",
        ["--run", "{run}", "--out", "rep", *SMALL_BENCH, "--new-tokens", "100000"],
        ("--new-tokens",),
    ),
    bench("--prompts -1", ["--run", "{run}", "--prompts", "-1"], ("--prompts -1",)),
    bench("--threads 0", ["--run", "{run}", "--threads", "0"], ("--threads 0",)),
    bench("--max-latency-s nan", ["--run", "{run}", "--max-latency-s", "nan"], ("--max-latency-s nan",)),
    bench("--backends bogus", ["--run", "{run}", "--backends", "bogus"], ("--backends bogus",)),
    bench("--gate-backend bogus", ["--run", "{run}", "--gate-backend", "bogus"], ("--gate-backend bogus",)),
    bench(
        "--gate-backend not measured",
        [
            "--run",
            "{run}",
            "--export",
            "{exp}",
            "--out",
            "rep",
            *SMALL_BENCH,
            "--max-latency-s",
            "5",
            "--gate-backend",
            "ort-cuda-fp16",
        ],
        ("--gate-backend ort-cuda-fp16",),
    ),
    bench("--base missing", ["--run", "{run}", "--base", "./nope", "--out", "rep", *SMALL_BENCH], ("--base",)),
    bench(
        "--out . (the working dir)",
        ["--run", "{run}", "--out", "."],
        ("--out .", "working directory"),
        setup=(write("keep.txt", "x"),),
    ),
    bench("--out the run", ["--run", "r", "--out", "r"], ("--out r", "training run"), setup=(copy("run", "r"),)),
    bench(
        "--out a foreign folder",
        ["--run", "{run}", "--out", "mine"],
        ("--out mine", "did not write"),
        setup=(write("mine/draft.md", "x"),),
    ),
    bench(
        "--out the export",
        ["--run", "{run}", "--export", "e", "--out", "e"],
        ("--out e", "export"),
        setup=(copy("exp", "e"),),
    ),
    bench(
        "--out a symlink to a foreign folder",
        ["--run", "{run}", "--out", "ln"],
        ("--out ln", "did not write"),
        setup=(write("mine/draft.md", "x"), link("ln", "mine")),
    ),
    bench("--name with a slash", ["--run", "{run}", "--name", "../x"], ("--name ../x",)),
    bench(
        "a report folder whose marker names ../",
        ["--run", "{run}", "--export", "{exp}", "--out", "p/rep", *SMALL_BENCH],
        expect=0,
        may_change=("p/rep/*",),
        setup=(copy("report", "p/rep"), write("p/victim/a.txt", "x"), marker("p/rep", "../victim")),
    ),
    bench("--out a file", ["--run", "{run}", "--out", "f.txt"], ("--out f.txt",), setup=(write("f.txt", "x"),)),
    bench("--out read-only (/proc)", ["--run", "{run}", "--out", "/proc/lora-med-rep"], ("--out /proc",)),
    bench(
        "--paired with a broken --lora-config",
        ["--paired", "--lora-config", "c.yaml"],
        ("--lora-config", "c.yaml"),
        setup=(write("c.yaml", "r: zero\n"),),
    ),
    bench("YAML: export is a number", ["--config", "c.yaml"], ("export",), setup=(write("c.yaml", "export: 5\n"),)),
    bench("--config /dev/zero", ["--config", "/dev/zero"], ("/dev/zero",)),
    *[
        bench(
            f"Ctrl-C at {at}",
            LONG_BENCH,
            expect=130,
            interrupt=f"stdout:{at}",
            after=nothing_at("rep"),
        )
        for at in ("Perplexity on", "Latency:")
    ],
    # ---------------------------------------------------------------- serve (refusals only)
    serve("no EXPORT_DIR", [], ("EXPORT_DIR",)),
    serve("EXPORT_DIR missing", ["nope"], ("EXPORT_DIR nope",)),
    serve("EXPORT_DIR is a file", ["f.txt"], ("f.txt",), (write("f.txt", "x"),)),
    serve("EXPORT_DIR is an empty folder", ["empty", "--port", "0"], ("empty",), (mkdir("empty"),)),
    serve(
        "EXPORT_DIR with a corrupt manifest",
        ["e", "--port", "0"],
        ("manifest.json",),
        (copy("exp", "e"), write("e/manifest.json", "{")),
    ),
    serve(
        "EXPORT_DIR with a truncated graph",
        ["e", "--port", "0"],
        ("model.onnx",),
        (copy("exp", "e"), cut("e/onnx/model.onnx", 0.5)),
    ),
    # A LoRA training run is served (adapter merged in memory); one whose base is gone is refused.
    serve(
        "EXPORT_DIR is a training run whose base is gone",
        ["r", "--port", "0"],
        ("base", "is gone"),
        (copy("run", "r"), edit("r/run.json", lambda c: {**c, "base": {**c["base"], "name_or_path": "/gone/base"}})),
    ),
    serve("--port 70000", ["{exp}", "--port", "70000"], ("--port 70000",)),
    serve("--port abc", ["{exp}", "--port", "abc"], ("--port abc",)),
    serve("--temperature 0", ["{exp}", "--temperature", "0"], ("--temperature 0",)),
    serve("--max-batch 0", ["{exp}", "--max-batch", "0"], ("--max-batch 0",)),
    serve("--db is a folder", ["{exp}", "--db", "."], ("--db .",)),
    serve("--db in a missing folder", ["{exp}", "--db", "nope/x.db"], ("--db nope/x.db",)),
    serve("--intents missing", ["{exp}", "--intents", "nope.yaml"], ("--intents nope.yaml",)),
    serve(
        "--intents is a YAML list",
        ["{exp}", "--intents", "i.yaml", "--port", "0"],
        ("i.yaml",),
        (write("i.yaml", "- a\n- b\n"),),
    ),
    serve(
        "--config invalid YAML",
        ["{exp}", "--config", "c.yaml"],
        ("c.yaml", "invalid YAML"),
        (write("c.yaml", "port: [\n"),),
    ),
    serve(
        "--config unknown key",
        ["{exp}", "--config", "c.yaml"],
        ("c.yaml", "workers"),
        (write("c.yaml", "workers: 4\n"),),
    ),
    serve("unknown flag --reload", ["{exp}", "--reload"], ("--reload",)),
]
