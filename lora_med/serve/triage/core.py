"""The triage: a tier for every message (``assess``), and for every turn with the conversation so far
(``verdict``: an emergency carries over until the patient says they are attended). See configs/triage.yaml.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ...errors import ConfigError
from ..config import read_yaml, resolve_path
from ..intents import ACTIONS
from ..matcher import RuleSet
from ..store import Turn
from .advice import Advice
from .learned import LearnedModel
from .normalize import read
from .rules import Findings, TriageRules

TIERS = ("emergency", "caution", "none")


@dataclass(frozen=True)
class Assessment:
    """One message's triage, without the conversation."""

    tier: str  # emergency | caution | none
    category: str | None  # the category whose advice fits; None: none, or unclear or unsafe (generic advice)
    by: str  # who raised the tier: rules | model | rules+model | "" (none)
    score: float  # the learned layer's probability
    findings: Findings


@dataclass(frozen=True)
class Verdict:
    """One turn's triage, with the conversation: what the reply must be or carry."""

    tier: str
    category: str | None
    reply: str | None = None  # the whole reply when the triage writes it (emergency, carry-over, attended)
    note: str | None = None  # the safety-net line a caution adds to the served reply
    carried: bool = False  # an earlier turn's emergency, kept
    released: bool = False  # this message ended a carried emergency

    def params(self) -> dict:
        """What the response's ``params`` say about the triage."""
        out: dict = {"triage": self.tier}
        if self.category and self.tier != "none":
            out["triage_category"] = self.category
        if self.carried:
            out["triage_carried"] = True
        if self.released:
            out["triage_released"] = True
        return out


class Triage:
    """The triage of one server, loaded from its YAML file (``--emergency``) and the files it names."""

    def __init__(self, path: str | Path):
        path = resolve_path(path)
        spec = read_yaml(path, "--emergency")
        where = str(path)
        self.rules = TriageRules(spec, where)
        problems = []
        texts = {}
        for key, needs in (("reply", "{advice}"), ("carry_reply", "{advice}"), ("attended_reply", "")):
            value = spec.get(key)
            if not isinstance(value, str) or (needs and needs not in value) or (needs and "118" not in value):
                problems.append(
                    f"{where}: '{key}' must be the reply text" + (" with {advice} and 118" if needs else "")
                )
                continue
            texts[key] = " ".join(value.split())
        flows = spec.get("flow_replies") or {}
        missing = [a for a in ACTIONS if a != "emergency" and not isinstance(flows.get(a), str)]
        if missing:
            problems.append(f"{where}: 'flow_replies' needs a reply for {', '.join(missing)}")
        learned = spec.get("learned")
        if not isinstance(learned, dict) or not isinstance(learned.get("file"), str):
            problems.append(f"{where}: 'learned' must name the model 'file' and its 'sha256'")
        if not isinstance(spec.get("advice"), str):
            problems.append(f"{where}: 'advice' must name the advice file")
        if problems:
            raise ConfigError(f"{where}: invalid triage file", problems)
        assert isinstance(learned, dict)  # checked above: a mapping naming the model file
        self.texts = texts
        self.flow_replies = {a: " ".join(v.split()) for a, v in flows.items()}
        self.must_not_say = RuleSet.from_spec(spec.get("model_must_not_say"), {}, f"{where} model_must_not_say")
        advice_path = path.parent / spec["advice"]
        cats = self.rules.categories
        covers = {n: c.covers for n, c in cats.items()}
        self.advice = Advice(advice_path, set(cats), covers, {n: c.parent for n, c in cats.items()})
        self.model = LearnedModel.load(path.parent / learned["file"], learned.get("sha256"))
        digest = hashlib.sha256(path.read_bytes() + advice_path.read_bytes()).hexdigest()
        self.rules_version = f"{path.name}@{digest[:12]}"
        self.assess = lru_cache(maxsize=4096)(self._assess)

    def versions(self) -> dict:
        """Which rules and model run (for /health, the server's ready line and benchmark results)."""
        return {
            "rules": self.rules_version,
            "model": self.model.version,
            "emergency_at": self.model.emergency_at,
            "caution_at": self.model.caution_at,
        }

    def _assess(self, message: str) -> Assessment:
        text = read(message)
        f = self.rules.find(self.rules.rewrite(text))
        score = self.model.score(text)
        lowers_to = self.rules.lowers_to
        now = "now" in f.modifiers
        lowering = {m for m in f.modifiers if m in lowers_to and (not now or m in self.rules.timeless)}

        def level(name: str) -> str:
            lows = {lowers_to[m] for m in lowering if m in self.rules.categories[name].soften}
            return "emergency" if not lows else "caution" if "caution" in lows else "none"

        emergency = {c for c in f.signs if level(c) == "emergency"}
        caution = {c for c in f.signs | f.cautions if level(c) != "none"} - emergency
        if emergency:
            by = "rules+model" if score >= self.model.emergency_at else "rules"
            return Assessment("emergency", self._clear(emergency, f), by, score, f)
        # The union decides: a modifier lowers the rules' signs, never the learned layer's emergency. Its
        # threshold is set where no held-out ordinary message reaches it, jokes and past events included, and a
        # laugh beside a sign ("jajaja ... no puede sonreir parejo") is how patients play an emergency down.
        if score >= self.model.emergency_at:
            return Assessment("emergency", self._clear(f.signs | f.cautions, f), "model", score, f)
        # a figure of speech or a lab test ("prueba de embarazo en sangre") is no sign, whatever the model says
        dismissed = any(lowers_to[m] == "none" for m in lowering) and not caution
        if caution or (score >= self.model.caution_at and not dismissed):
            by = "rules" if caution else "model"
            return Assessment("caution", self.rules.resolve(caution) if caution else None, by, score, f)
        return Assessment("none", None, "", score, f)

    def _clear(self, names: set[str] | frozenset[str], f: Findings) -> str | None:
        """The emergency's category when it is clear: one category covers the others (``resolve``) and its
        advice line is safe for every category the message may be about; else None (the generic instruction)."""
        return self.advice.fitting(self.rules.resolve(names), f.readings)

    def verdict(self, message: str, history: list[Turn], assessment: Assessment | None = None) -> Verdict:
        """The triage of ``message`` after ``history`` (this conversation's earlier answered turns)."""
        a = assessment or self.assess(message)
        carried = self._carried(history)
        # Someone staying with them is the safety step of a suicidal crisis, not care for a medical emergency.
        cat = self.rules.categories.get(carried or "")
        in_care = a.findings.attended or bool(cat and cat.company_releases and a.findings.company)
        # Signs told while saying they are being attended ("ya estoy internado, dicen que es apendicitis") are
        # the same emergency in care: released. A new message with signs and no care stays an emergency.
        if a.tier == "emergency" and not (carried is not None and in_care):
            return Verdict("emergency", a.category, reply=self.emergency_reply(a.category))
        if carried is not None:
            if not in_care:
                return Verdict("emergency", carried or None, reply=self.carry_reply(carried or None), carried=True)
            tier = "caution" if a.tier == "emergency" else a.tier  # signs in care: the safety-net line
            note = self.advice.caution(a.category) if tier == "caution" else None
            return Verdict(tier, a.category, reply=self.texts["attended_reply"], note=note, released=True)
        note = self.advice.caution(a.category) if a.tier == "caution" else None
        return Verdict(a.tier, a.category, note=note)

    def _carried(self, history: list[Turn]) -> str | None:
        """None when the conversation is not in an emergency; else the carried category ("" when unclear).

        The conversation is in an emergency while its latest assistant turn is one (the store keeps each
        reply's action); the category is that of the latest patient message of the run the rules call one.
        """
        last = next((t for t in reversed(history) if t.role == "assistant"), None)
        if last is None or last.action != "emergency":
            return None
        for t in reversed(history):
            if t.role == "assistant" and t.action != "emergency":
                break
            if t.role == "user":
                a = self.assess(t.content)
                if a.tier == "emergency":
                    return a.category or ""
        return ""

    def emergency_reply(self, category: str | None) -> str:
        return self.texts["reply"].format(advice=self.advice.advice(category))

    def carry_reply(self, category: str | None) -> str:
        return self.texts["carry_reply"].format(advice=self.advice.advice(category))

    def speaks_of_emergency(self, text: str) -> bool:
        """True when a model reply speaks of emergencies, 118 or ambulances (``model_must_not_say``)."""
        return self.must_not_say.first(text) is not None

    def flow_reply(self, action: str) -> str:
        """The flow's own reply for ``action`` (sent instead of a model reply that spoke of emergencies)."""
        return self.flow_replies.get(action, self.flow_replies["chat"])
