"""Hashed character n-gram features of a message, shared by the learned layers (the triage's, the intents').

For every word of the text, its character n-grams (``n_min``..``n_max``, the word padded with a space on each
side), the word itself and each pair of neighbouring words; CRC-32 of the feature's UTF-8 bytes, modulo
``n_features``, is its index. Counts are dampened (1 + log) and the vector scaled to unit length. Hashing needs
no vocabulary, so a model file is its weights and a few settings: ``write_model`` and ``read_model`` hold what
the two model files share (safetensors, one JSON metadata entry, the SHA-256 pin).
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import ConfigError


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


def matrix(texts: list[str], featurizer: Featurizer, read: Callable[[str], str]):
    """The sparse feature matrix of ``texts``, each read by ``read`` first (for training)."""
    from scipy.sparse import csr_matrix

    rows, cols, vals = [], [], []
    for r, t in enumerate(texts):
        for c, v in featurizer(read(t)).items():
            rows.append(r)
            cols.append(c)
            vals.append(v)
    return csr_matrix((vals, (rows, cols)), shape=(len(texts), featurizer.n_features), dtype=np.float64)


def write_model(path: Path, indices: np.ndarray, weights: np.ndarray, key: str, meta: dict) -> str:
    """Write a model file: ``indices`` (int32, sorted) and their ``weights`` (float32, one row per index) and
    ``meta`` as sorted JSON under ``key``, so identical inputs give identical bytes. Returns its sha256."""
    from safetensors.numpy import save

    order = np.argsort(indices, kind="stable")
    tensors = {
        "indices": np.ascontiguousarray(indices[order].astype(np.int32)),
        "weights": np.ascontiguousarray(weights[order].astype(np.float32)),
    }
    data = save(tensors, metadata={key: json.dumps(meta, sort_keys=True)})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return hashlib.sha256(data).hexdigest()


def read_model(path: Path, sha256: str | None, key: str, fmt: str, what: str, pinned_by: str, fix: str):
    """The tensors, the JSON metadata under ``key`` (with its ``sha256``) and the featurizer of a model file.

    Nothing is unpickled; the file's SHA-256 must be ``sha256`` (the pin ``pinned_by`` holds) when one is given.

    Raises:
        ConfigError: naming ``path`` and ``fix``: an unreadable file, a hash that is not the pinned one, or a
        file that is not a lora-med ``what`` (another format, a damaged header or tensors).
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what} ({e.strerror or e}); {fix}") from None
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise ConfigError(
            f"{path}: sha256 {digest[:12]}... is not the {str(sha256)[:12]}... {pinned_by} pins "
            f"(a different or damaged model); {fix}"
        )
    try:
        tensors = load(data)
        meta = json.loads(metadata(data)[key])
        if meta.get("format") != fmt:
            raise ValueError(f"format {meta.get('format')!r}, expected {fmt!r}")
        feat = Featurizer(int(meta["n_min"]), int(meta["n_max"]), int(meta["n_features"]))
    except KeyError as e:
        raise ConfigError(f"{path}: not a lora-med {what} (no {e} in it); {fix}") from None
    except (SafetensorError, ValueError, TypeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a lora-med {what} ({e}); {fix}") from None
    return tensors, {**meta, "sha256": digest}, feat
