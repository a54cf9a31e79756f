"""Useful tokens per second with several prompts arriving together, each wanting a reply of its own length: the
server's case (``--concurrent``, engine and genai rows).

Replies of different lengths are what separates the two generators: the engine's stream retires a finished
row at once (continuous batching: the rows still in flight are moved down into its place, so the decode batch
narrows), while onnxruntime-genai's generator runs a static batch, left-padded to its longest prompt, until its
longest reply is done. genai is
also timed one request at a time (what a server without batching does), and its better mode is its figure.
Every reply is exactly its length (EOS cannot end one early: random weights have no say in it).
"""

from __future__ import annotations

import statistics
from typing import Any

from ..engine import Engine, GenerationSettings
from . import genai


def reply_lengths(n: int, new_tokens: int) -> list[int]:
    """``n`` reply lengths spread evenly from a quarter of ``new_tokens`` to twice it (8..64 for 32)."""
    lo, hi = max(1, new_tokens // 4), 2 * new_tokens
    return [round(lo + (hi - lo) * i / max(n - 1, 1)) for i in range(n)]


def _engine_run(engine: Engine, prompts: list[list[int]], lengths: list[int]) -> None:
    """All prompts into one stream; each row is dropped the step its reply reaches its length."""
    longest = max(lengths)
    with engine.stream(GenerationSettings(max_new_tokens=longest, min_new_tokens=longest), rows=len(prompts)) as s:
        handles = s.add(prompts)  # each row has its first token
        want = dict(zip(handles, lengths))
        have = dict.fromkeys(handles, 1)
        for h in handles:
            if have[h] >= want[h]:
                s.drop(h)
                del have[h]
        while s.busy:
            s.step()  # one token for every live row
            for h in list(have):
                have[h] += 1
                if have[h] >= want[h]:
                    s.drop(h)
                    del have[h]


def measure(kind: str, model, timer, prompts: list[list[int]], n: int, new_tokens: int, repeats: int, pad=None):
    """The concurrent workload for one engine or genai row: ``n`` prompts (``prompts`` cycled) with replies of
    ``reply_lengths(n, new_tokens)``; median seconds of ``repeats`` timed runs after one warm-up."""
    batch = [prompts[i % len(prompts)] for i in range(n)]
    lengths = reply_lengths(n, new_tokens)
    useful = sum(lengths)

    def med(fn) -> float:
        fn()  # warm-up: buffers for this batch size
        return statistics.median(timer(fn) for _ in range(repeats))

    out: dict[str, Any] = {
        "prompts": n,
        "prompt_tokens": [len(p) for p in batch],
        "reply_tokens": lengths,
        "useful_tokens": useful,
    }
    if kind == "engine":
        t = med(lambda: _engine_run(model, batch, lengths))
        out["modes"] = {"continuous batching": {"s": t, "tokens_per_s": useful / t}}
    else:
        static = med(lambda: genai.decode_batch(model, batch, max(lengths), pad))
        single = med(lambda: [genai.decode(model, p, n) for p, n in zip(batch, lengths)])
        out["modes"] = {
            "static batch": {"s": static, "tokens_per_s": useful / static},
            "one at a time": {"s": single, "tokens_per_s": useful / single},
        }
    best = max(out["modes"], key=lambda m: out["modes"][m]["tokens_per_s"])
    out["best_mode"], out["tokens_per_s"] = best, out["modes"][best]["tokens_per_s"]
    return out
