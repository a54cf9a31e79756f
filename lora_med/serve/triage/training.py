"""Training the learned layer on the project's own messages, and choosing its thresholds on held-out rounds.

Messages (``examples``):
- ``tests/data/guard_cases.yaml``: the emergency and ordinary lists the rules were built on; its rounds 1-4
  (``fresh*``) are groups of their own;
- ``benchmarks/triage/rounds/round-*.yaml``: each blind round once measured (emergency, ordinary, and the
  carry-over conversations' first message, plus their attended/ordinary follow-ups as ordinary);
- ``benchmarks/triage/training.yaml``: phrasings written for training (never counted as a round);
- ``data/medical_conversations.json``: patient turns whose reply does not speak of emergencies (ordinary).

Thresholds: each round is held out in turn (the model trained on everything else scores it); ``emergency_at`` is
the highest threshold at which the held-out emergencies reach ``recall`` while the held-out ordinary messages
marked stay at most ``max_false``; ``caution_at`` the highest at which they reach ``caution_recall``.
Everything is deterministic (liblinear with a fixed seed, weights rounded), so a rebuild gives the same file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ..ngrams import Featurizer, matrix
from .learned import save
from .normalize import read

C = 4.0  # inverse regularisation strength of the logistic regression
MIN_DF = 2  # a feature seen in fewer training messages is dropped (smaller file, less memorising)
RECALL = 0.80  # held-out recall the emergency threshold must reach ...
MAX_FALSE = 0.03  # ... while marking at most this share of held-out ordinary messages
CAUTION_RECALL = 0.95  # held-out recall of the caution threshold
_ROUND_LIST = re.compile(r"fresh(\d?)_")
_EMERGENCY_REPLY = re.compile(r"118|emergencia|ambulancia", re.I)


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # 1 emergency, 0 ordinary
    group: str  # "round-N" for a blind round (held out in turn), else "base"


def examples(repo: Path) -> list[Example]:
    """Every training message, first occurrence kept (sources in the module docstring)."""
    out: list[Example] = []
    cases = yaml.safe_load((repo / "tests/data/guard_cases.yaml").read_text(encoding="utf-8"))
    for name, messages in cases.items():
        m = _ROUND_LIST.match(name)
        group = f"round-{m.group(1) or 1}" if m else "base"
        label = 1 if name.endswith("emergency") and name != "recall_first_emergency" else 0
        out += [Example(t, label, group) for t in messages]
    for path in sorted((repo / "benchmarks/triage/rounds").glob("round-*.yaml")):
        r = yaml.safe_load(path.read_text(encoding="utf-8"))
        group = f"round-{int(r['round'])}"
        out += [Example(c["text"], 1, group) for c in r.get("emergency", [])]
        out += [Example(c["text"], 0, group) for c in r.get("ordinary", [])]
        for conv in r.get("carry_over", []):
            turns = conv["turns"]
            out.append(Example(turns[0]["text"], 1, group))
            out += [Example(t["text"], 0, group) for t in turns[1:] if t["expect"] in ("attended", "ordinary")]
    extra = yaml.safe_load((repo / "benchmarks/triage/training.yaml").read_text(encoding="utf-8"))
    for label, key in ((1, "emergency"), (0, "ordinary")):
        for items in (extra.get(key) or {}).values():
            out += [Example(t, label, "base") for t in items]
    for row in json.loads((repo / "data/medical_conversations.json").read_text(encoding="utf-8")):
        turns = [(row["user"], row["assistant"])] if "user" in row else _pairs(row["messages"])
        out += [Example(u, 0, "base") for u, a in turns if not _EMERGENCY_REPLY.search(a)]
    seen: set[str] = set()
    unique = []
    for e in out:
        if e.text not in seen:
            seen.add(e.text)
            unique.append(e)
    return unique


def _pairs(messages: list[dict]) -> list[tuple[str, str]]:
    turns = [m for m in messages if m["role"] != "system"]
    return [(u["content"], a["content"]) for u, a in zip(turns[::2], turns[1::2])]


def fit(train: list[Example], featurizer: Featurizer) -> tuple[np.ndarray, np.ndarray, float]:
    """Hashed feature indices, their weights and the intercept of a model trained on ``train``."""
    from sklearn.linear_model import LogisticRegression

    x = matrix([e.text for e in train], featurizer, read)
    df = np.asarray((x > 0).sum(axis=0)).ravel()
    keep = np.flatnonzero(df >= MIN_DF)
    model = LogisticRegression(C=C, solver="liblinear", class_weight="balanced", random_state=0, max_iter=1000)
    model.fit(x[:, keep], np.array([e.label for e in train]))
    weights = np.round(model.coef_.ravel(), 6)
    nonzero = weights != 0
    return keep[nonzero], weights[nonzero], round(float(model.intercept_[0]), 6)


def _scores(indices: np.ndarray, weights: np.ndarray, intercept: float, texts: list[str], f: Featurizer):
    w = dict(zip(indices.tolist(), weights.tolist()))
    z = [intercept + sum(w.get(i, 0.0) * v for i, v in f(read(t)).items()) for t in texts]
    return 1.0 / (1.0 + np.exp(-np.array(z)))


def held_out(data: list[Example], featurizer: Featurizer) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Scores of every blind round's messages by a model trained without that round (labels, scores, groups)."""
    labels, scores, groups = [], [], []
    for g in sorted({e.group for e in data} - {"base"}):
        test = [e for e in data if e.group == g]
        idx, wts, b = fit([e for e in data if e.group != g], featurizer)
        scores += _scores(idx, wts, b, [e.text for e in test], featurizer).tolist()
        labels += [e.label for e in test]
        groups += [g] * len(test)
    return np.array(labels), np.array(scores), groups


def thresholds(labels: np.ndarray, scores: np.ndarray) -> dict:
    """The two thresholds (module docstring) and the held-out recall and false alarms at each."""
    pos, neg = scores[labels == 1], scores[labels == 0]

    def at(t: float) -> dict:
        return {"threshold": round(float(t), 4), "recall": float((pos >= t).mean()), "false": float((neg >= t).mean())}

    candidates = sorted(set(np.round(scores, 4).tolist()), reverse=True)
    emergency = next((at(t) for t in candidates if at(t)["recall"] >= RECALL), at(candidates[-1]))
    if emergency["false"] > MAX_FALSE:  # recall costs too many false alarms: the lowest threshold within budget
        emergency = min((at(t) for t in candidates if at(t)["false"] <= MAX_FALSE), key=lambda d: d["threshold"])
    caution = next((at(t) for t in candidates if at(t)["recall"] >= CAUTION_RECALL), at(candidates[-1]))
    caution = caution if caution["threshold"] < emergency["threshold"] else emergency
    return {"emergency": emergency, "caution": caution}


def build(repo: Path, out: Path) -> tuple[str, dict]:
    """Train on every example, set the thresholds on held-out rounds, write ``out``; (sha256, metadata)."""
    featurizer = Featurizer()
    data = examples(repo)
    labels, scores, groups = held_out(data, featurizer)
    chosen = thresholds(labels, scores)
    idx, wts, b = fit(data, featurizer)
    meta = {
        "n_min": featurizer.n_min,
        "n_max": featurizer.n_max,
        "n_features": featurizer.n_features,
        "intercept": b,
        "emergency_at": chosen["emergency"]["threshold"],
        "caution_at": chosen["caution"]["threshold"],
        "held_out": {
            "rounds": sorted(set(groups)),
            "emergency": int(labels.sum()),
            "ordinary": int((labels == 0).sum()),
            "at_emergency_threshold": chosen["emergency"],
            "at_caution_threshold": chosen["caution"],
        },
        "trained_on": {"emergency": sum(e.label for e in data), "ordinary": sum(1 - e.label for e in data)},
        "settings": {
            "C": C,
            "min_df": MIN_DF,
            "recall": RECALL,
            "max_false": MAX_FALSE,
            "caution_recall": CAUTION_RECALL,
        },
    }
    return save(out, idx, wts, meta), meta
