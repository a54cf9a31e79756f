"""Useful tokens per second with several prompts arriving together, each wanting a reply of its own length: the
server's case (``--concurrent``, engine and genai rows).

Replies of different lengths are what separates the generators: the engine's stream retires a finished row at
once (continuous batching: the rows still in flight are moved down into its place, so the decode batch narrows),
while onnxruntime-genai on the CPU batches statically: its generator left-pads a batch to its longest prompt and
decodes until its longest reply is done, and its ``Engine`` (whose continuous batching needs a PagedAttention
graph, built for CUDA and WebGPU fp16 only) releases a row only with its batch. genai is also timed one request
at a time (a server without batching), and its best mode is its figure.

With ``--system-tokens S`` every prompt starts with the same S tokens, as a server's prompts start with its
system prompt. The engine keeps them in its prefix cache (``Engine.keep_prefix``, what ``serve`` does at start:
untimed here), so each prompt prefills only what follows; genai's best way to keep them is one generator holding
them and rewinding to them per request (one at a time); its batches prefill them for every row.

Every reply is exactly its length (EOS cannot end one early: random weights have no say in it).
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable
from typing import Any

from ..config import ServeConfig
from ..engine import Engine, GenerationSettings
from . import genai

PREFIX_CACHE_BYTES = int(ServeConfig().prefix_cache_mb * 2**20)  # the server's default prefix cache


def reply_lengths(n: int, new_tokens: int) -> list[int]:
    """``n`` reply lengths spread evenly from a quarter of ``new_tokens`` to twice it (8..64 for 32)."""
    lo, hi = max(1, new_tokens // 4), 2 * new_tokens
    return [round(lo + (hi - lo) * i / max(n - 1, 1)) for i in range(n)]


def system_prompt(prompts: list[list[int]], n: int) -> list[int]:
    """``n`` token ids shared by every prompt of the workload (the prompts' own ids, cycled: any ids time alike)."""
    return list(itertools.islice(itertools.cycle(t for p in prompts for t in p), n))


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


def measure(
    kind: str,
    model,
    timer,
    prompts: list[list[int]],
    n: int,
    new_tokens: int,
    repeats: int,
    pad=None,
    system_tokens: int = 0,
) -> dict[str, Any]:
    """The concurrent workload for one engine or genai row: ``n`` prompts (``prompts`` cycled, after
    ``system_tokens`` shared ones) with replies of ``reply_lengths(n, new_tokens)``; per mode the median seconds of
    ``repeats`` timed runs after one warm-up run."""
    system = system_prompt(prompts, system_tokens)
    rest = [prompts[i % len(prompts)] for i in range(n)]
    batch = [system + p for p in rest]
    lengths = reply_lengths(n, new_tokens)
    useful = sum(lengths)

    def med(prepare: Callable[[], Callable[[], object]]) -> float:
        """``prepare()`` does the untimed setup (a server's state after its start) and returns the timed work."""
        timer(prepare())  # warm-up: buffers for this batch size
        return statistics.median(timer(prepare()) for _ in range(repeats))

    out: dict[str, Any] = {
        "prompts": n,
        "system_tokens": len(system),
        "prompt_tokens": [len(p) for p in batch],
        "reply_tokens": lengths,
        "useful_tokens": useful,
    }
    modes: dict[str, float] = {}
    if kind == "engine":
        with model.keeping_prefixes(PREFIX_CACHE_BYTES if system else 0) as cache:

            def engine_prepared():
                if cache is not None:  # the same start for every run: the system prompt and nothing else
                    cache.clear()
                    model.keep_prefix(system)
                return lambda: _engine_run(model, batch, lengths)

            mode = "continuous batching" + (", system prompt kept" if cache is not None else "")
            modes[mode] = med(engine_prepared)
            if cache is not None:
                out["reused_prompt_tokens"] = cache.reused_tokens
    else:
        modes["static batch"] = med(lambda: lambda: genai.decode_batch(model, batch, max(lengths), pad))
        engine = genai.engine(model) if n <= genai.ENGINE_ROWS else None
        if engine is not None:
            modes["Engine, static batch"] = med(lambda: lambda: genai.engine_batch(engine, batch, lengths))
        modes["one at a time"] = med(lambda: lambda: [genai.decode(model, p, k) for p, k in zip(batch, lengths)])
        if system:
            longest = max(len(p) + k for p, k in zip(rest, lengths))

            def kept_prepared():
                kept = genai.KeptPrefix(model, system, longest)  # its start, untimed like the engine's

                def one_at_a_time() -> None:
                    for p, k in zip(rest, lengths):
                        kept.reply(p, k)

                return one_at_a_time

            modes["one at a time, system prompt kept"] = med(kept_prepared)
    out["modes"] = {m: {"s": s, "tokens_per_s": useful / s} for m, s in modes.items()}
    best = max(out["modes"], key=lambda m: out["modes"][m]["tokens_per_s"])
    out["best_mode"], out["tokens_per_s"] = best, out["modes"][best]["tokens_per_s"]
    return out
