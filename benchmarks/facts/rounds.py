"""Play a round of blind questions and bookings against `lora-med serve` and score it.

A round (tests/data/facts_round_01.yaml) is written by someone who read only the fact sheet: info questions
with `must_include` / `must_not_include` substrings (case-insensitive), and booking conversations with the
booking fields expected after their last message, all relative to its `reference_date`. Each item runs
through a real server (`--now` set to the round's date); every reply is also held to the facts by the checker.

    python benchmarks/facts/rounds.py tests/data/facts_round_01.yaml --model exports/clinic-lora-cpu-fp32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[2]
FIELDS = ("specialty", "doctor", "date", "time", "patient_name", "phone", "ci", "birth_date")


def start_server(model: str | Path, workdir: Path, now: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """`lora-med serve MODEL` on a free port (the "ready" log line names it)."""
    log = workdir / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lora_med", "serve", str(model), "--port", "0", "--db", str(workdir / "serve.db")]
    cmd += ["--log-file", str(log), "--now", now, "--rate-limit", "0", *extra]
    with open(workdir / "stderr", "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if log.exists():
            for line in log.read_text(encoding="utf-8").splitlines():
                event = json.loads(line)
                if event.get("event") == "ready":
                    return proc, f"http://127.0.0.1:{event['port']}"
        if proc.poll() is not None:
            raise RuntimeError((workdir / "stderr").read_text()[-2000:])
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("server not ready")


def chat(url: str, user: str, message: str) -> dict:
    r = httpx.post(f"{url}/chat/", json={"user_id": user, "message": message}, timeout=60)
    r.raise_for_status()
    return r.json()


def info_problems(item: dict, reply: str) -> list[str]:
    low = reply.casefold()
    out = [f"lacks {s!r}" for s in item.get("must_include") or [] if s.casefold() not in low]
    out += [f"says {s!r}" for s in item.get("must_not_include") or [] if s.casefold() in low]
    return out


def field_problems(expect: dict, params: dict) -> list[str]:
    out = []
    for k in FIELDS:
        want, got = expect.get(k), params.get(k)
        want = None if want is None else str(want)
        if k == "doctor":
            ok = (want is None and got is None) or (
                want is not None and got is not None and want.casefold() in got.casefold()
            )
        else:
            ok = want == got
        if not ok:
            out.append(f"{k}: expected {want!r}, got {got!r}")
    return out


def play(url: str, spec: dict, checker=None) -> dict:
    """Every item of ``spec`` through the server at ``url``; ``checker(message, reply) -> [problems]`` holds each
    reply to the facts."""
    results: dict = {"info": [], "booking": []}
    for i, item in enumerate(spec.get("info") or []):
        body = chat(url, f"+5916{i:07d}", item["text"])
        problems = info_problems(item, body["response"])
        facts = checker(item["text"], body["response"]) if checker else []
        results["info"].append(
            {
                "id": item["id"],
                "reply": body["response"],
                "source": body["params"].get("source"),
                "problems": problems,
                "facts": facts,
            }
        )
    for i, conv in enumerate(spec.get("booking") or []):
        user = f"+5917{i:07d}"
        replies, facts = [], []
        for turn in conv["turns"]:
            body = chat(url, user, turn)
            replies.append(body["response"])
            facts += checker(turn, body["response"]) if checker else []
        problems = field_problems(conv["expect"], body["params"])
        results["booking"].append(
            {
                "id": conv["id"],
                "replies": replies,
                "params": body["params"],
                "problems": problems,
                "facts": facts,
                "impossible": conv.get("impossible"),
            }
        )
    return results


def summary(results: dict) -> dict:
    info, booking = results["info"], results["booking"]
    every = [r for r in info + booking]
    return {
        "info_passed": sum(not r["problems"] for r in info),
        "info": len(info),
        "booking_passed": sum(not r["problems"] for r in booking),
        "booking": len(booking),
        "impossible_passed": sum(not r["problems"] for r in booking if r["impossible"]),
        "impossible": sum(bool(r["impossible"]) for r in booking),
        "facts_agree": sum(not r["facts"] for r in every),
        "items": len(every),
    }


def fact_checker():
    """The server's own checker, held to facts only (no style), for the replies of a round."""
    from lora_med.serve.checker import Checker, Context
    from lora_med.serve.facts import load_facts

    facts = load_facts(REPO / "configs/clinic.yaml")
    checker = Checker(facts, set())
    return lambda message, reply: [
        f"{f.reason}: {f.detail}" for f in checker.check(reply, Context(message), style=False)
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("round", help="round YAML")
    ap.add_argument("--model", required=True, help="what `lora-med serve` serves")
    ap.add_argument("--out", help="write every reply and problem here (JSON)")
    args = ap.parse_args()
    spec = yaml.safe_load(Path(args.round).read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as d:
        proc, url = start_server(args.model, Path(d), str(spec["reference_date"]))
        try:
            results = play(url, spec, fact_checker())
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    s = summary(results)
    print(json.dumps(s, indent=2))
    for kind in ("info", "booking"):
        for r in results[kind]:
            if r["problems"] or r["facts"]:
                print(f"{r['id']}: {'; '.join(r['problems'] + r['facts'])}")
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": s, **results}, indent=1, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
