"""The learned half of the triage: a character n-gram linear model over the read text.

Features are the hashed character n-grams of the read text (``normalize.read``; ``..ngrams.Featurizer``, shared
with the intents' learned layer); the score is the logistic of their dot product with the weights plus the
intercept.

The model is stored as safetensors (``indices`` int32 and ``weights`` float32, non-zero weights only) with
one metadata entry, ``triage``, holding JSON: the feature settings, the intercept, the two thresholds and how
they were chosen. Loading reads tensors and JSON only (nothing is unpickled) and checks the file's format and
its SHA-256 against the one the triage file pins. Training (``fit``, with scikit-learn) lives in
``training.py`` and ``scripts/build_triage_model.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ...errors import ConfigError
from ..ngrams import Featurizer, read_model, write_model

FORMAT = "lora-med-triage-ngram/1"


class LearnedModel:
    """A loaded model: ``score(read_text)`` is the probability the message is an emergency."""

    def __init__(self, featurizer: Featurizer, weights: dict[int, float], intercept: float, meta: dict):
        self.featurizer = featurizer
        self.weights = weights
        self.intercept = intercept
        self.meta = meta
        self.emergency_at = float(meta["emergency_at"])
        self.caution_at = float(meta["caution_at"])
        self.version = f"ngram-lr@{str(meta.get('sha256', ''))[:12]}"  # the file's own hash names it

    def score(self, text: str) -> float:
        w = self.weights
        z = self.intercept + sum(w.get(i, 0.0) * v for i, v in self.featurizer(text).items())
        return 1.0 / (1.0 + math.exp(-z))

    @classmethod
    def load(cls, path: Path, sha256: str | None) -> LearnedModel:
        """Read ``path``; ``sha256`` (the triage file's pin) must match the file's bytes.

        Raises:
            ConfigError: missing file, another format, a hash that does not match, or a damaged file.
        """
        fix = "rebuild it with `python scripts/build_triage_model.py` and pin its sha256 in the triage file"
        tensors, meta, feat = read_model(path, sha256, "triage", FORMAT, "triage model", "the triage file", fix)
        try:
            idx, wts = tensors["indices"], tensors["weights"]
            if idx.shape != wts.shape or idx.ndim != 1:
                raise ValueError("indices and weights differ in shape")
            weights = dict(zip(idx.tolist(), wts.astype(np.float64).tolist()))
            return cls(feat, weights, float(meta["intercept"]), meta)
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"{path}: not a lora-med triage model ({e}); {fix}") from None


def save(path: Path, indices: np.ndarray, weights: np.ndarray, meta: dict) -> str:
    """Write the model file (byte-identical for identical inputs); returns its sha256."""
    return write_model(path, indices, weights, "triage", {"format": FORMAT, **meta})
