"""Replay held-out conversations through `lora-med serve` and count what the facts did to the model's replies.

Each conversation's patient messages are sent in order by a new patient (the server's own replies become the
history, as in production). Counted from the server's /metrics: replies by source (model kept, facts, guard),
the model replies the checker replaced by reason, and the replies built from the facts without the model.
Also counted: replies that talk of emergencies (118, emergencia, ambulancia) to a plain request, i.e. one whose
reference reply in the data does not.

    python benchmarks/facts/replay.py exports/clinic-lora-cpu-fp32 --now 2026-12-03T09:00
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rounds import REPO, chat, start_server

EMERGENCY = re.compile(r"\b(?:118|emergencias?|ambulancia)\b", re.IGNORECASE)


def metrics(url: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        m = re.match(r'(lora_med_(?:replies|replaced|fact_answers|actions)_total)\{\w+="([^"]+)"\} (\S+)', line)
        if m:
            out.setdefault(m.group(1), {})[m.group(2)] = float(m.group(3))
    return out


def replay(url: str, conversations: list[dict]) -> dict:
    plain = emergency_talk = 0
    examples, turns = [], []
    for i, row in enumerate(conversations):
        msgs = row.get("messages") or [
            {"role": "user", "content": row["user"]},
            {"role": "assistant", "content": row["assistant"]},
        ]
        msgs = [m for m in msgs if m["role"] != "system"]
        user = f"+5918{i:07d}"
        for k, m in enumerate(msgs):
            if m["role"] != "user":
                continue
            reference = msgs[k + 1]["content"] if k + 1 < len(msgs) else ""
            body = chat(url, user, m["content"])
            turns.append(
                {
                    "conversation": i,
                    "message": m["content"],
                    "reply": body["response"],
                    "action": body["action"],
                    "source": body["params"].get("source"),
                }
            )
            if not EMERGENCY.search(reference) and not EMERGENCY.search(m["content"]):
                plain += 1
                if EMERGENCY.search(body["response"]):
                    emergency_talk += 1
                    examples.append({"message": m["content"], "reply": body["response"]})
    return {"plain_requests": plain, "emergency_talk_on_plain": emergency_talk, "examples": examples, "turns": turns}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="what `lora-med serve` serves")
    ap.add_argument("--data", default=str(REPO / "data/medical_conversations_eval.json"))
    ap.add_argument("--now", default="2026-12-03T09:00", help="the server's --now (the replies' 'hoy')")
    ap.add_argument("--out", help="write the figures here (JSON)")
    args = ap.parse_args()
    conversations = json.loads(Path(args.data).read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        proc, url = start_server(args.model, Path(d), args.now)
        try:
            result = replay(url, conversations)
            result["metrics"] = metrics(url)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["settings"] = {"model": args.model, "data": args.data, "now": args.now}
    print(json.dumps({k: v for k, v in result.items() if k != "turns"}, indent=2, ensure_ascii=False))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
