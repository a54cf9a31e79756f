"""The careless user's adversarial pass: every case in ``cases.py`` against the real CLI, with the bytes on disk
before and after.

Each case runs ``python -m lora_med CMD ARGS`` in a process of its own (see PRELOAD), in its own folder under a
scratch directory (a new temporary folder; the repository's files are never touched), with HOME pointing into it
too (so that ``--output ~`` is safe to try). Before and after it, every file that exists in the
scratch directory (the case's folder, the shared fixtures, the scratch HOME) is hashed: a pre-existing file
changed or deleted is data lost, unless the case says the user asked for it (``--overwrite`` of a folder
lora-med wrote, ``--resume``).

A case passes when: no Python traceback, the expected exit code (0 for valid input, 2 for a user error,
130 for Ctrl-C), for an error an ``error:`` line naming what the case says it must name, and no data lost.

Usage:
  python benchmarks/adversarial/run.py                    # all cases, results.md/results.json beside this file
  python benchmarks/adversarial/run.py -k resume -j 1     # the cases whose name or command holds "resume"
  python benchmarks/adversarial/run.py --results-dir /tmp/x --keep   # elsewhere; keep the scratch folder
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import hashlib
import json
import multiprocessing
import os
import platform
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

from cases import CASES, Case
from cases_more import MORE

CASES = CASES + MORE

TRACEBACK = "Traceback (most recent call last)"
FLOOD = 1 << 20  # more output than this from one command is a failure (an error quoting a YAML alias bomb)
BIG = 64 << 20  # files larger than this are compared by size and mtime, not hashed (the sparse 2 GiB one)


def env(scratch: Path) -> dict:
    """The environment of every command: offline, this checkout's lora_med, unbuffered output (so that a case
    can wait for a line), the scratch HOME. Threads are left at their defaults, as a user's are: with one
    thread per op, Ctrl-C never landed where CPython drops it."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO),
        "HOME": str(scratch / "home"),
        "MPLCONFIGDIR": str(scratch / "mpl"),
    }


# Each command is `python -m lora_med ARGS`. A fresh interpreter spends 4-8 s importing torch, transformers and
# PEFT on a busy 2-core machine, more than most refusals take; so by default a command runs in a process forked
# from a server that imported them once (multiprocessing's forkserver, single-threaded, nothing computed before
# the fork), which then runs lora_med's __main__ exactly as the interpreter would. --fresh starts a new
# interpreter per command instead (slower, for a check that the two agree).
PRELOAD = [
    "__main__",
    "torch",
    "transformers",
    "peft",
    "onnxruntime",
    "lora_med.cli",
    "lora_med.train",
    "lora_med.export",
    "lora_med.bench",
    "lora_med.serve.app",
]
FRESH = False
_mp_lock = threading.Lock()


def _child(args: list[str], cwd: str, environ: dict, log: str) -> None:
    """In the forked process: what `python -m lora_med ARGS` does, with its output in ``log``."""
    os.setsid()  # a session of its own, like the fresh process: a timeout kills its group
    signal.signal(signal.SIGINT, signal.default_int_handler)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environ)
    sys.argv = ["lora-med", *args]
    code = 0
    try:
        runpy.run_module("lora_med", run_name="__main__", alter_sys=True)
    except SystemExit as e:  # as the interpreter reads it: None is 0, a number is the code, anything else 1
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # an uncaught exception: the interpreter prints its traceback and exits 1
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Forked:
    """A forked command with the part of Popen's interface the cases use."""

    def __init__(self, args: list[str], cwd: Path, environ: dict, log: Path):
        ctx = multiprocessing.get_context("forkserver")
        self.proc = ctx.Process(target=_child, args=(args, str(cwd), environ, str(log)), daemon=False)
        with _mp_lock:
            self.proc.start()
        self.pid = self.proc.pid

    def poll(self):
        # Under the lock: multiprocessing reads a child's exit status from a pipe, and Process.start() polls every
        # child; two threads reading one pipe at once leave one of them with EOF, reported as exit 255.
        with _mp_lock:
            return self.proc.exitcode

    def wait(self, timeout=None):
        end = None if timeout is None else time.time() + timeout
        while (code := self.poll()) is None:
            if end is not None and time.time() > end:
                raise subprocess.TimeoutExpired("lora-med", timeout)
            time.sleep(0.05)
        self.returncode = code
        return code

    def send_signal(self, sig):
        os.kill(self.pid, sig)


def lora_med(args: list[str], cwd: Path, scratch: Path, log: Path | None = None, fresh: bool = False):
    """Start `lora-med ARGS` in ``cwd`` (output in ``log``); ``fresh``: in a new interpreter whatever FRESH says."""
    if log:
        log.touch()  # there before the command starts: a case may wait for a line in it
    if not (FRESH or fresh):
        return Forked(args, cwd, env(scratch), log or Path(os.devnull))
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 (the child process owns it)
    # A session of its own: a timeout or a SIGINT reaches the command, never this runner.
    return subprocess.Popen(
        [sys.executable, "-m", "lora_med", *args],
        cwd=cwd,
        env=env(scratch),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


# --------------------------------------------------------------------------- fixtures


def build_fixtures(scratch: Path) -> dict[str, str]:
    """A tiny GPT-2 base (tests/conftest.py's build_tiny_base: 2 layers, 64 wide, BPE trained here),
    conversations, a finished LoRA run (r 4, checkpoints 1 and 2), a LoRA run with r 8, a full run, an export and a
    bench report."""
    from tests.conftest import CONVERSATIONS, build_tiny_base

    fx = scratch / "fixtures"
    fx.mkdir()
    (scratch / "home").mkdir()
    (scratch / "home" / "diary.txt").write_text("mis cosas\n")
    build_tiny_base(fx / "base")
    (fx / "convs.json").write_text(json.dumps(CONVERSATIONS, ensure_ascii=False, indent=1), encoding="utf-8")
    F = {
        "base": str(fx / "base"),
        "data": str(fx / "convs.json"),
        "run": str(fx / "run"),
        "run8": str(fx / "run8"),
        "full": str(fx / "full"),
        "exp": str(fx / "exp"),
        "report": str(fx / "report"),
    }
    common = [
        "--data",
        F["data"],
        "--eval-data",
        F["data"],
        "--allow-eval-overlap",
        "--base",
        F["base"],
        "--no-compare",
        "--report-to",
        "none",
        "--learning-rate",
        "1e-2",
    ]
    steps = [
        [
            ["train", *common, "--output", F["run"], "--r", "4", "--max-steps", "2", "--save-every", "1"],
            [
                "train",
                *common,
                "--output",
                F["full"],
                "--method",
                "full",
                "--max-steps",
                "1",
                "--learning-rate",
                "1e-3",
            ],
        ],
        [
            ["train", *common, "--output", F["run8"], "--r", "8", "--max-steps", "1"],
            ["merge-export", F["run"], "--output", F["exp"], "--n-parity", "1", "--max-new-tokens", "2"],
        ],
        [
            [
                "bench",
                "--run",
                F["run"],
                "--export",
                F["exp"],
                "--out",
                F["report"],
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
        ],
    ]
    for i, group in enumerate(steps):  # each group in parallel; a group needs the one before
        procs = [(a, lora_med(a, fx, scratch, fx / f"log-{i}-{j}.txt")) for j, a in enumerate(group)]
        for j, (a, p) in enumerate(procs):
            if p.wait(timeout=600) != 0:
                sys.exit(f"fixture failed: lora-med {' '.join(a)}\n{(fx / f'log-{i}-{j}.txt').read_text()[-3000:]}")
    for f in fx.glob("log-*.txt"):
        f.unlink()
    F["r8_adapter"] = str(fx / "run8" / "adapter_model.safetensors")
    F["full_model"] = str(fx / "full" / "model.safetensors")
    return F


# --------------------------------------------------------------------------- the bytes on disk


def snapshot(scratch: Path, *roots: str) -> dict[str, tuple]:
    """Every entry under ``scratch/root`` for each root -> what it is: a file's SHA-256 (size and mtime for
    giants), a link's target, a FIFO, a folder. Links are not followed (a link to /dev/zero stays a link)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in (w for root in roots for w in os.walk(scratch / root)):
        if Path(dirpath) == scratch / "home":  # libraries' caches are theirs (onnxruntime keeps a db there)
            dirnames[:] = [d for d in dirnames if d != ".cache"]
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(scratch))
            st = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            elif not p.is_file():
                out[rel] = ("special", st.st_mode)
            elif st.st_size > BIG:
                out[rel] = ("big", st.st_size, st.st_mtime_ns)
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def lost(before: dict, after: dict, allowed: list[str]) -> list[str]:
    """Pre-existing entries changed or gone, except those the case allows (globs relative to the scratch dir).
    A folder whose files all survive may gain entries: only files, links and FIFOs are compared by content."""
    return [
        f"{rel} ({'deleted' if rel not in after else 'changed'})"
        for rel, what in before.items()
        if after.get(rel) != what and not any(fnmatch.fnmatch(rel, a) for a in allowed)
    ]


# --------------------------------------------------------------------------- one case


def _wait_for(what: str, cwd: Path, log: Path, proc, deadline: float) -> bool:
    """Until ``what`` (a glob in ``cwd``, or "stdout:TEXT") appears, or the process ends, or the deadline."""
    while time.time() < deadline and proc.poll() is None:
        if what.startswith("stdout:"):
            if what[7:].encode() in log.read_bytes():
                return True
        elif glob.glob(str(cwd / what)):
            return True
        time.sleep(0.05)
    return False


def _sleep_while(proc, seconds: float) -> None:
    end = time.time() + seconds
    while proc.poll() is None and time.time() < end:
        time.sleep(0.05)


def run_case(i: int, case: Case, F: dict, scratch: Path) -> dict:
    cwd = scratch / "cases" / f"{i:03d}"
    cwd.mkdir(parents=True)
    for step in case.setup:
        step(cwd, F)
    args = [_fill(a, F) for a in case.args]
    # What this case can reach: its folder, the shared fixtures, HOME (other cases' folders are theirs).
    roots = ("fixtures", "home", f"cases/{i:03d}")
    before = snapshot(scratch, *roots)
    log, t0, notes = cwd.parent / f"{i:03d}.log", time.time(), []
    bg = None
    if case.bg:  # the other process on the same folder: running (while), or kill -9'ed (killed)
        bg_cmd = (case.bg.cmd or case.cmd).split()
        bg = lora_med([*bg_cmd, *[_fill(a, F) for a in case.bg.args]], cwd, scratch, cwd.parent / f"{i:03d}.bg.log")
        if not _wait_for(case.bg.wait_for, cwd, cwd.parent / f"{i:03d}.bg.log", bg, time.time() + case.timeout):
            notes.append(f"the background command never reached {case.bg.wait_for}")
        if case.bg.mode == "killed":
            os.killpg(bg.pid, signal.SIGKILL)
            bg.wait()
    # Ctrl-C cases always get a fresh interpreter: where a signal lands depends on the process's whole state
    # (a forked process with everything imported never dropped one; a fresh one often did during a merge).
    proc = lora_med([*case.cmd.split(), *args], cwd, scratch, log, fresh=case.interrupt is not None)
    presses = 0
    if case.interrupt:
        if _wait_for(case.interrupt, cwd, log, proc, t0 + case.timeout):
            time.sleep(0.05)  # into the step that line announces (the tiny model's steps take a fraction of a second)
            # Ctrl-C, and again every 5 s while it goes on without saying "aborted", as a user would: CPython
            # swallows a KeyboardInterrupt that lands in an object's __del__ ("Exception ignored in ..."). Not
            # once it said "aborted": it is exiting, and a second SIGINT would kill the interpreter's teardown.
            while proc.poll() is None and time.time() < t0 + case.timeout and b"aborted" not in log.read_bytes():
                proc.send_signal(signal.SIGINT)
                presses += 1
                _sleep_while(proc, 5.0)
        else:
            notes.append(f"never reached {case.interrupt} (not interrupted)")
    try:
        code = proc.wait(timeout=max(1.0, t0 + case.timeout - time.time()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
        notes.append(f"timed out after {case.timeout:.0f}s (killed)")
    if bg is not None and bg.poll() is None:
        os.killpg(bg.pid, signal.SIGINT)
        if bg.wait(timeout=60) != 130:
            notes.append(f"the background command exited {bg.returncode} on SIGINT, not 130")
    seconds = time.time() - t0
    text = log.read_text(encoding="utf-8", errors="replace")
    gone = lost(before, snapshot(scratch, *roots), [f"cases/{i:03d}/{a}" for a in case.may_change])
    result = judge(i, case, args, code, text, gone, notes, seconds, cwd)
    if presses > 1:  # passed or not, say so: the first Ctrl-C did not stop it
        result["note"] = f"stopped by Ctrl-C number {presses} (the first was swallowed)"
    return result


def _fill(arg: str, F: dict) -> str:
    for k, v in F.items():
        arg = arg.replace("{" + k + "}", v)
    return arg


def judge(
    i: int,
    case: Case,
    args: list[str],
    code: int,
    text: str,
    gone: list[str],
    notes: list[str],
    seconds: float,
    cwd: Path,
) -> dict:
    """The verdict on one case: every reason it fails (empty: it passed)."""
    errors = [ln.strip() for ln in text.splitlines() if ln.strip().lower().startswith("error:")]
    why = list(notes)
    tb = TRACEBACK in text
    if tb:
        why.append("traceback")
    if code != case.expect:
        why.append(f"exit {code}, expected {case.expect}")
    if case.expect == 2 and not errors:
        why.append("no error: line")
    if case.expect == 130 and "aborted" not in text:
        why.append("no 'aborted'")
    missing = [s for s in case.says if s not in text]
    if missing:
        why.append(f"message lacks {missing}")
    if gone:
        why.append(f"data lost: {gone}")
    if case.after and (problem := case.after(cwd)):
        why.append(problem)
    if len(text) > FLOOD:
        why.append(f"{len(text):,} characters of output (a message must stay readable)")
    shown = " ".join(a if len(a) < 60 else a[:20] + "..." for a in case.args)
    first = errors[0] if errors else ""
    if first.endswith(":"):  # "error: N problem(s) ...:" then one "  - " line each: show the first of them
        first += " " + next((ln.strip() for ln in text.splitlines() if ln.startswith("  - ")), "")
    if tb:
        first = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
    return {
        "id": i,
        "command": case.cmd,
        "case": case.name,
        "argv": f"lora-med {case.cmd} {shown}".strip(),
        "expected": case.expect,
        "exit": code,
        "traceback": tb,
        "data_lost": gone,
        "message": first[:300],
        "seconds": round(seconds, 1),
        "passed": not why,
        "why": why,
        "output_tail": text[-2500:] if why else "",
    }


# --------------------------------------------------------------------------- report


def machine() -> dict:
    from lora_med.models import cpu_model

    cpu = cpu_model()
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit.strip(),
    }


def summary(results: list[dict]) -> dict:
    by = {}
    for r in results:
        c = by.setdefault(r["command"], {"cases": 0, "passed": 0, "tracebacks": 0, "data_lost": 0})
        c["cases"] += 1
        c["passed"] += r["passed"]
        c["tracebacks"] += r["traceback"]
        c["data_lost"] += bool(r["data_lost"])
    return {
        "cases": len(results),
        "passed": sum(r["passed"] for r in results),
        "tracebacks": sum(r["traceback"] for r in results),
        "data_lost": sum(bool(r["data_lost"]) for r in results),
        "by_command": by,
    }


def markdown(report: dict) -> str:
    s, m = report["summary"], report["machine"]
    lines = [
        "# Adversarial pass: the careless user against the real CLI",
        "",
        f"{report['date']} | {m['cpu']}, {m['cores']} cores (load {m['load_average_1m']} at the end) | Python "
        f"{m['python']}, torch {m['torch']} | commit {m['commit']} | {report['seconds']:.0f} s with "
        f"{report['jobs']} jobs, each command {report['launch']}"
        + (f" | cases matching {report['filter']!r}" if report["filter"] else ""),
        "",
        f"**{s['cases']} cases: {s['passed']} passed, {s['tracebacks']} tracebacks, {s['data_lost']} with data lost.**",
        "",
        "| command | cases | passed | tracebacks | data lost |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {k} | {v['cases']} | {v['passed']} | {v['tracebacks']} | {v['data_lost']} |"
        for k, v in s["by_command"].items()
    ]
    lines += [
        "",
        "Exit: 0 valid input, 2 user error, 130 Ctrl-C. Message: the first `error:` line (or the "
        "traceback's last line).",
        "",
        "| # | command | case | exit | ok | message |",
        "| ---: | --- | --- | ---: | --- | --- |",
    ]
    for r in report["results"]:
        msg = r["message"].replace("|", "\\|")[:140]
        ok = ("yes" if r["passed"] else "**no**: " + "; ".join(r["why"]).replace("|", "\\|")) + (
            f" ({r['note']})" if r.get("note") else ""
        )
        lines.append(f"| {r['id']} | {r['command']} | {r['case'].replace('|', '/')} | {r['exit']} | {ok} | {msg} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-k", default="", help="only cases whose command or name holds this text")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="cases run at once (default 2)")
    ap.add_argument("--results-dir", default=str(HERE), help="where results.md/results.json go")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (its path is printed)")
    ap.add_argument("--fresh", action="store_true", help="a new interpreter per command (slower; see PRELOAD)")
    a = ap.parse_args()
    global FRESH
    FRESH = a.fresh
    # Before the fork server starts: it imports lora_med from this checkout, offline.
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    chosen = [(i, c) for i, c in enumerate(CASES, 1) if a.k.lower() in f"{c.cmd} {c.name}".lower()]
    scratch = Path(tempfile.mkdtemp(prefix="lora-med-adversarial-"))
    t0 = time.time()
    try:
        print(f"scratch {scratch}; building fixtures ...", flush=True)
        F = build_fixtures(scratch)
        print(f"fixtures in {time.time() - t0:.0f}s; {len(chosen)} cases, {a.jobs} at a time", flush=True)
        # The slow ones first, so that the pool does not end on a long tail.
        slow = lambda c: c.bg is not None or c.interrupt is not None or c.expect == 0
        order = sorted(chosen, key=lambda ic: not slow(ic[1]))
        results = []
        with ThreadPoolExecutor(a.jobs) as pool:
            for r in pool.map(lambda ic: run_case(*ic, F, scratch), order):
                results.append(r)
                verdict = "ok" if r["passed"] else "FAIL: " + "; ".join(r["why"])[:200]
                print(
                    f"{r['id']:4d} {r['command']:<12} {r['case'][:52]:<52} exit {r['exit']:>3} {r['seconds']:6.1f}s "
                    f"{verdict} {r.get('note', '')}",
                    flush=True,
                )
    finally:
        if a.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    results.sort(key=lambda r: r["id"])
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "seconds": round(time.time() - t0, 1),
        "jobs": a.jobs,
        "filter": a.k,
        "launch": "a fresh interpreter per command"
        if FRESH
        else "forked from a preloaded server (Ctrl-C cases: a fresh interpreter)",
        "summary": summary(results),
        "results": results,
    }
    out = Path(a.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "results.md").write_text(markdown(report), encoding="utf-8")
    s = report["summary"]
    print(
        f"\n{s['cases']} cases: {s['passed']} passed, {s['tracebacks']} tracebacks, {s['data_lost']} with data lost "
        f"({report['seconds']:.0f}s); {out / 'results.md'}"
    )
    for k, v in s["by_command"].items():
        print(
            f"  {k:<13} {v['cases']:4d} cases  {v['passed']:4d} passed  {v['tracebacks']} tracebacks  "
            f"{v['data_lost']} data lost"
        )
    return 0 if s["passed"] == s["cases"] else 1


if __name__ == "__main__":
    sys.exit(main())
