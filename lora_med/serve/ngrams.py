"""Hashed character n-gram features of a message, shared by the learned layers (the triage's, the intents').

For every word of the text, its character n-grams (``n_min``..``n_max``, the word padded with a space on each
side), the word itself and each pair of neighbouring words; CRC-32 of the feature's UTF-8 bytes, modulo
``n_features``, is its index. Counts are dampened (1 + log) and the vector scaled to unit length. Hashing needs
no vocabulary, so a model file is its weights and a few settings.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Featurizer:
    n_min: int = 2
    n_max: int = 5
    n_features: int = 2**20

    def __post_init__(self) -> None:
        # Each distinct word's hashed features are computed once per process.
        object.__setattr__(self, "_word", lru_cache(maxsize=50_000)(self._word_features))

    def _word_features(self, word: str) -> tuple[int, ...]:
        padded = f" {word} "
        grams = [padded[i : i + n] for n in range(self.n_min, self.n_max + 1) for i in range(len(padded) - n + 1)]
        grams.append(f"w:{word}")
        return tuple(zlib.crc32(g.encode()) % self.n_features for g in grams)

    def __call__(self, text: str) -> dict[int, float]:
        """Feature index -> value (dampened counts, unit length) of a read text."""
        counts: dict[int, int] = {}
        words = text.split()
        for w in words:
            for i in self._word(w):  # type: ignore[attr-defined]
                counts[i] = counts.get(i, 0) + 1
        for a, b in zip(words, words[1:]):
            i = zlib.crc32(f"b:{a} {b}".encode()) % self.n_features
            counts[i] = counts.get(i, 0) + 1
        values = {i: 1.0 + math.log(c) for i, c in counts.items()}
        norm = math.sqrt(sum(v * v for v in values.values())) or 1.0
        return {i: v / norm for i, v in values.items()}


def metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file's header (JSON after an 8-byte little-endian length)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__") or {}
