"""The engine's prefix cache over a conversation at microsoft/DialoGPT-medium's shape (random weights, speed only).

    .venv/bin/python benchmarks/engine/prefix_cache.py [--precision int8|fp32] [--turns 6] [--threads 2]

Each turn adds a 25-token patient message (+ EOS) to the conversation and generates a 30-token reply (forced,
greedy); the same decode graph is timed without the cache and with it (``prefix_cache_mb``), one engine each,
turns interleaved, which goes first alternating. ``--rounds`` conversations (different random tokens, so one
round's cache entries never match another's); the table gives each turn's median. Writes results.md / results.json to
benchmarks/results/prefix-cache-dialogpt-medium-shape-cpu/ (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", choices=("int8", "fp32"), default="int8")
    ap.add_argument("--turns", type=int, default=6, choices=range(2, 13), metavar="2..12")
    ap.add_argument("--threads", type=int, default=2, choices=range(1, 65), metavar="1..64")
    ap.add_argument("--rounds", type=int, default=3, choices=range(1, 11), metavar="1..10")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "prefix-cache-dialogpt-medium-shape-cpu"))
    a = ap.parse_args(argv)

    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lora_med.bench.shapes import SHAPES
    from lora_med.engine import GenerationSettings, load_engine
    from lora_med.export.decode_graph import build_decode_graph
    from lora_med.models import device_info

    work = Path(tempfile.mkdtemp(prefix="prefix-cache-"))
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**SHAPES["dialogpt-medium"])).save_pretrained(work / "m", safe_serialization=True)
    build_decode_graph(work / "m", work / "g", precision=a.precision)
    plain = load_engine(work / "g", device="cpu", threads=a.threads)
    cached = load_engine(work / "g", device="cpu", threads=a.threads, prefix_cache_mb=1024)
    eos = plain.eos_token_id
    g = np.random.default_rng(0)
    for eng in (plain, cached):  # warm-up (allocations, first-run kernels); not a conversation
        eng.generate([g.integers(1, eos, 20).tolist()], GenerationSettings(max_new_tokens=4))
    cached.prefix_cache.prompt_tokens = cached.prefix_cache.reused_tokens = 0
    s = GenerationSettings(max_new_tokens=30, min_new_tokens=30)
    times: dict[tuple[int, str], list[float]] = {}
    lengths: dict[int, int] = {}
    for r in range(a.rounds):
        conv: list[int] = []
        for turn in range(a.turns):
            conv = conv + g.integers(1, eos, 25).tolist() + [eos]
            lengths[turn] = len(conv)
            order = (("without", plain), ("with", cached))
            for name, eng in order if (r + turn) % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                out = eng.generate([conv], s)[0]
                times.setdefault((turn, name), []).append(1000 * (time.perf_counter() - t0))
            conv = conv + out + [eos]
    rows = [
        {
            "turn": t + 1,
            "prompt_tokens": lengths[t],
            "without_ms": round(statistics.median(times[t, "without"]), 1),
            "with_ms": round(statistics.median(times[t, "with"]), 1),
        }
        for t in range(a.turns)
    ]
    for row in rows:
        print(row, flush=True)
    m = device_info("cpu")
    report = {
        "shape": "dialogpt-medium (random weights, speed only)",
        "precision": a.precision,
        "threads": a.threads,
        "reply_tokens": 30,
        "message_tokens": 25,
        "rounds": a.rounds,
        "turns": rows,
        "machine": m,
        "reused_tokens": cached.prefix_cache.reused_tokens,
        "prompt_tokens": cached.prefix_cache.prompt_tokens,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    lines = [
        f"# Prefix cache over a conversation: DialoGPT-medium shape ({a.precision}, random weights, speed only)",
        "",
        f"`benchmarks/engine/prefix_cache.py --precision {a.precision}`. {m.get('cpu')}, {m.get('cores')} "
        f"cores, {a.threads} threads, {report['when']}. Each turn: a 25-token message + EOS, then a 30-token "
        "reply (forced); the same decode graph without and with the engine's prefix cache; median of "
        f"{a.rounds} conversations.",
        "",
        "| turn | prompt tokens | reply without the cache (ms) | with the cache (ms) | with / without |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['turn']} | {r['prompt_tokens']} | {r['without_ms']} | {r['with_ms']} | "
        f"{r['with_ms'] / r['without_ms']:.2f}x |"
        for r in rows
    ]
    lines += ["", f"Prompt tokens taken from the cache: {report['reused_tokens']} of {report['prompt_tokens']}.", ""]
    (out / "results.md").write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
