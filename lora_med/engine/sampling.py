"""How the engine picks a row's next token: n-gram bans and sampling (greedy is one argmax in engine.py).

Both keep their state per row, so that rows can join and leave a running batch (continuous batching) without
touching the other rows' state.
"""

from __future__ import annotations

import numpy as np


class NGramBans:
    """transformers' NoRepeatNGramLogitsProcessor for one row, kept incrementally: the (n-1)-token prefixes
    seen so far (prompt included) map to the tokens that followed them."""

    def __init__(self, prompt: list[int], n: int):
        self.n = n
        self.seq = list(prompt)
        self.seen: dict[tuple, set[int]] = {}
        for i in range(len(self.seq) - n + 1):
            self.seen.setdefault(tuple(self.seq[i : i + n - 1]), set()).add(self.seq[i + n - 1])

    def add(self, tok: int) -> None:
        seq = self.seq
        seq.append(tok)
        if len(seq) >= self.n:
            self.seen.setdefault(tuple(seq[len(seq) - self.n : -1]), set()).add(tok)

    def apply(self, row: np.ndarray) -> None:
        """Set the banned tokens' logits in ``row`` (one row's ``[vocab]``) to -inf."""
        if len(self.seq) + 1 < self.n:
            return
        banned = self.seen.get(tuple(self.seq[len(self.seq) - self.n + 1 :]))
        if banned:
            row[list(banned)] = -np.inf


class Sampler:
    """Temperature, then top-p (nucleus), then one draw per row, as transformers' warpers in that order."""

    CANDIDATES = 1024  # top-p looks at this many top tokens first and sorts the whole vocabulary only if needed

    def __init__(self, temperature: float, top_p: float, seed: int | None):
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.rng = np.random.default_rng(seed)

    def choose(self, logits: np.ndarray) -> np.ndarray:
        out = np.empty(logits.shape[0], dtype=np.int64)
        for b in range(logits.shape[0]):
            out[b] = self._one(logits[b])
        return out

    def _one(self, row: np.ndarray) -> int:
        x = row.astype(np.float64) / self.temperature
        x -= x.max()
        p = np.exp(x)
        p /= p.sum()
        if self.top_p < 1.0:
            ids = self._nucleus(p)
            p = p[ids] / p[ids].sum()
        else:
            ids = None
        pick = int(np.searchsorted(np.cumsum(p), self.rng.random() * p.sum(), side="right"))
        pick = min(pick, p.shape[0] - 1)
        return int(ids[pick]) if ids is not None else pick

    def _nucleus(self, p: np.ndarray) -> np.ndarray:
        """Ids of the smallest top set whose mass reaches top_p (a token is kept while the mass above it is
        below top_p, the rule of transformers' TopPLogitsWarper), most probable first."""
        k = min(self.CANDIDATES, p.shape[0])
        cand = np.argpartition(-p, k - 1)[:k] if k < p.shape[0] else np.arange(p.shape[0])
        if p[cand].sum() < self.top_p and k < p.shape[0]:
            cand = np.arange(p.shape[0])
        order = cand[np.argsort(-p[cand], kind="stable")]
        above = np.cumsum(p[order]) - p[order]
        return order[above < self.top_p]
