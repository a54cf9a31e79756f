"""Prefix cache: the KV cache of finished replies, kept so that a conversation's next prompt prefills only
what is new.

A chat prompt is the whole conversation so far, so turn n+1 starts with turn n's prompt and reply. After a
reply the engine keeps a copy of the row's cache (every position whose token it fed: the prompt, the reply
and the EOS that ended it), keyed by those tokens. The next prompt that starts with the same tokens gets
them copied back into its row, and the graph runs only on the rest (the decode graph attends to a past of
any length, so a multi-token "prompt" after a past is one call). The match is on token ids, not on
conversation ids: a prompt cut differently (its oldest turns dropped to fit), a reply re-tokenized another
way, or another model's cache simply does not match, and the prompt is prefilled whole. Positions before
the first difference depend only on the tokens before them (causal attention), so a partial match is
reused up to there. fp32 replies are the ones a full prefill gives; an int8 graph quantises activations per
call, so its logits move by rounding, as they do between batch sizes.

Entries are evicted least recently used when their bytes exceed the budget; an entry that a longer one
extends is dropped when that one is stored. One engine, one cache, used under the engine's lock.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np

MIN_REUSE_TOKENS = 8  # below this a copy costs about what the prefill it saves does


@dataclass(eq=False)
class Entry:
    tokens: np.ndarray  # int64 [n]: the tokens whose keys and values ``kv`` holds, in order
    kv: list[np.ndarray]  # per layer key, value: [heads, n, head_dim]
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = int(self.tokens.nbytes + sum(a.nbytes for a in self.kv))


class PrefixCache:
    """Finished rows' KV caches, least recently used first out, within ``max_bytes``."""

    def __init__(self, max_bytes: int, *, min_tokens: int = MIN_REUSE_TOKENS):
        self.max_bytes = int(max_bytes)
        self.min_tokens = int(min_tokens)
        self._entries: collections.OrderedDict[int, Entry] = collections.OrderedDict()
        self.nbytes = 0
        # What /metrics and reports read: prompt tokens seen and those taken from the cache.
        self.prompt_tokens = 0
        self.reused_tokens = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every entry and the counters (a benchmark's runs each start from the same state)."""
        self._entries.clear()
        self.nbytes = self.prompt_tokens = self.reused_tokens = self.hits = 0

    def lookup(self, row: list[int]) -> tuple[Entry, int] | None:
        """The entry sharing the longest prefix with ``row`` and that prefix's length, or None.

        At least one token of ``row`` is always left to run (the graph must compute the next token's logits).
        """
        self.prompt_tokens += len(row)
        ids = np.asarray(row, np.int64)
        best, best_n = None, 0
        for entry in self._entries.values():
            n = min(len(entry.tokens), len(ids) - 1)
            if n <= best_n:
                continue
            diff = np.flatnonzero(entry.tokens[:n] != ids[:n])
            n = int(diff[0]) if diff.size else n
            if n > best_n:
                best, best_n = entry, n
        if best is None or best_n < self.min_tokens:
            return None
        self._entries.move_to_end(id(best))
        self.hits += 1
        self.reused_tokens += best_n
        return best, best_n

    def store(self, tokens: list[int], kv: list[np.ndarray], *, extends: Entry | None = None) -> None:
        """Keep ``kv`` (per layer key, value ``[heads, len(tokens), head_dim]``) for ``tokens``; ``extends``: the
        entry this row reused, dropped when ``tokens`` start with all of its tokens (the new entry covers it)."""
        entry = Entry(np.asarray(tokens, np.int64), kv)
        if (
            extends is not None
            and id(extends) in self._entries
            and len(extends.tokens) <= len(entry.tokens)
            and np.array_equal(extends.tokens, entry.tokens[: len(extends.tokens)])
        ):
            self._drop(extends)
        if entry.nbytes > self.max_bytes:
            return
        self._entries[id(entry)] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries.values())))

    def _drop(self, entry: Entry) -> None:
        del self._entries[id(entry)]
        self.nbytes -= entry.nbytes
