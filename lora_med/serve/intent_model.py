"""The learned half of the intent layer: which request a new message opens, from its character n-grams.

The rules of ``configs/intents.yaml`` name the words of each request, and patients ask without them: "me pueden
ver el jueves?" books, "ya está lo de mi sangre?" asks for results, "no llego el martes, mejor el jueves?"
reschedules. Measured on the blind triage rounds' ordinary messages (each labelled with the one request it
makes: 1,235 in rounds 5-21), the rules alone found 66.7% of the requests; a linear model over the same hashed
features as the triage's learned layer (``ngrams.Featurizer``), trained on the other rounds, found 91.3% of
each round in turn (and 61 of round 21's 66 before that round was written into its training; the rules 38).
So the model names the request that OPENS a conversation's flow; inside a flow under way the rules still decide
("el martes a las 10" continues a rescheduling, it does not book), as they do for restarts and confirmations.

One binary logistic regression per action (one-vs-rest, scikit-learn's liblinear, balanced classes); the
action is the one whose score is highest ("chat": a greeting or anything else). Sources, all labelled by the
people who wrote them blind: the ordinary messages of every triage round (``benchmarks/triage/rounds/``:
book, cancel, reschedule, results, info; greeting and other are "chat"), and the facts rounds
(``tests/data/facts_round_*.yaml``: every question is clinic information, every booking's first message books).

The file is safetensors like the triage's (``indices`` int32, ``weights`` float32 [features x actions], one
JSON metadata entry with the feature settings, the actions, their intercepts and the held-out figures); it is
loaded without unpickling anything and its SHA-256 must match the one ``configs/intents.yaml`` pins.
Rebuild it (deterministic) with ``scripts/build_intent_model.py --pin``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ..errors import ConfigError
from .matcher import normalize
from .ngrams import Featurizer, matrix, read_model, write_model

FORMAT = "lora-med-intent-ngram/1"
# The actions a new message may open; "chat" is none of them (a greeting, thanks, anything else).
ACTIONS = ("schedule_appointment", "reschedule_appointment", "cancel_appointment", "lab_results", "clinic_info", "chat")
REQUESTS = {
    "book": "schedule_appointment",
    "cancel": "cancel_appointment",
    "reschedule": "reschedule_appointment",
    "results": "lab_results",
    "info": "clinic_info",
    "greeting": "chat",
    "other": "chat",
}
# Inverse regularisation: of 1, 4 and 16, the best held out (88.2, 90.0 and 91.1% of 1,206 requests, in a trial
# made before duplicates were dropped).
C = 16.0
FIX = "rebuild it with `python scripts/build_intent_model.py --pin`"


class IntentModel:
    """A loaded model: ``predict(message)`` is the action a new message opens."""

    def __init__(self, featurizer: Featurizer, weights: dict[int, np.ndarray], intercepts: np.ndarray, meta: dict):
        self.featurizer = featurizer
        self.weights = weights
        self.intercepts = intercepts
        self.actions = tuple(meta["actions"])
        self.meta = meta
        self.version = f"ngram-ovr@{str(meta.get('sha256', ''))[:12]}"

    def scores(self, message: str) -> np.ndarray:
        z = self.intercepts.copy()
        for i, v in self.featurizer(normalize(message)).items():
            w = self.weights.get(i)
            if w is not None:
                z += w * v
        return z

    def predict(self, message: str) -> str:
        return self.actions[int(np.argmax(self.scores(message)))]

    @classmethod
    def load(cls, path: Path, sha256: str | None) -> IntentModel:
        """Read ``path``; ``sha256`` (the intent file's pin) must match its bytes.

        Raises:
            ConfigError: a missing, damaged or foreign file, or one whose hash is not the pinned one.
        """
        tensors, meta, feat = read_model(path, sha256, "intents", FORMAT, "intent model", "configs/intents.yaml", FIX)
        try:
            idx, wts = tensors["indices"], tensors["weights"]
            actions = meta["actions"]
            if idx.ndim != 1 or wts.shape != (len(idx), len(actions)) or len(meta["intercepts"]) != len(actions):
                raise ValueError("indices, weights and actions differ in shape")
            if any(a not in ACTIONS for a in actions):
                raise ValueError(f"unknown actions {sorted(set(actions) - set(ACTIONS))}")
            weights = dict(zip(idx.tolist(), wts.astype(np.float64)))
            return cls(feat, weights, np.asarray(meta["intercepts"], dtype=np.float64), meta)
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"{path}: not a lora-med intent model ({e}); {FIX}") from None


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Example:
    text: str
    action: str
    group: str  # "round-N" (a triage round, held out in turn) or "facts" (trained on, never held out)


def examples(repo: Path) -> list[Example]:
    """Every labelled message (module docstring), first occurrence kept."""
    out: list[Example] = []
    for path in sorted((repo / "benchmarks/triage/rounds").glob("round-*.yaml")):
        r = yaml.safe_load(path.read_text(encoding="utf-8"))
        group = f"round-{int(r['round'])}"
        out += [Example(o["text"], REQUESTS[o["request"]], group) for o in r.get("ordinary") or [] if "request" in o]
    for path in sorted((repo / "tests/data").glob("facts_round_*.yaml")):
        r = yaml.safe_load(path.read_text(encoding="utf-8"))
        out += [Example(i["text"], "clinic_info", "facts") for i in r.get("info") or []]
        out += [Example(b["turns"][0], "schedule_appointment", "facts") for b in r.get("booking") or []]
    seen: set[str] = set()
    return [e for e in out if not (e.text in seen or seen.add(e.text))]  # type: ignore[func-returns-value]


def fit(train: list[Example], featurizer: Featurizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Feature indices used by any action, their weights [features x actions] and the intercepts."""
    from sklearn.linear_model import LogisticRegression

    x = matrix([e.text for e in train], featurizer, normalize)
    y = np.array([ACTIONS.index(e.action) for e in train])
    coefs, intercepts = [], []
    for k in range(len(ACTIONS)):
        m = LogisticRegression(C=C, solver="liblinear", class_weight="balanced", random_state=0, max_iter=1000)
        m.fit(x, (y == k).astype(int))
        coefs.append(m.coef_[0])
        intercepts.append(float(m.intercept_[0]))
    w = np.stack(coefs, axis=1)
    used = np.flatnonzero(np.any(w != 0, axis=1))
    return used, w[used], np.array(intercepts)


def held_out(data: list[Example], featurizer: Featurizer, rules: Callable[[str], str | None]) -> dict:
    """Each triage round scored by a model trained on everything else: the share of requests found, beside
    the share ``rules`` (the intent rules' first match, None for none) finds."""
    rounds = sorted({e.group for e in data if e.group.startswith("round-")}, key=lambda g: int(g.split("-")[1]))
    found = {"model": 0, "rules": 0}
    confusion: dict[str, dict[str, int]] = {a: {} for a in ACTIONS}
    for g in rounds:
        idx, w, b = fit([e for e in data if e.group != g], featurizer)
        model = IntentModel(featurizer, dict(zip(idx.tolist(), w)), b, {"actions": ACTIONS})
        for e in (e for e in data if e.group == g):
            got = model.predict(e.text)
            found["model"] += got == e.action
            found["rules"] += (rules(e.text) or "chat") == e.action
            confusion[e.action][got] = confusion[e.action].get(got, 0) + 1
    n = sum(e.group.startswith("round-") for e in data)
    return {"rounds": rounds, "messages": n, **{k: round(v / n, 4) for k, v in found.items()}, "confusion": confusion}


def build(repo: Path, out: Path, rules: Callable[[str], str | None]) -> tuple[str, dict]:
    """Train on every example, write ``out``; returns its sha256 and metadata (with the held-out figures, the
    model's and ``rules``')."""
    featurizer = Featurizer()
    data = examples(repo)
    idx, w, b = fit(data, featurizer)
    counts = {a: sum(e.action == a for e in data) for a in ACTIONS}
    meta = {
        "format": FORMAT,
        "n_min": featurizer.n_min,
        "n_max": featurizer.n_max,
        "n_features": featurizer.n_features,
        "actions": list(ACTIONS),
        "intercepts": [round(float(v), 8) for v in b],
        "C": C,
        "trained_on": counts,
        "held_out": held_out(data, featurizer, rules),
    }
    return write_model(out, idx, w, "intents", meta), meta
