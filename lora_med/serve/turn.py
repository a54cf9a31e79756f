"""One patient message's turn: what is said, whatever route the message came by.

The app owns the transport (HTTP, validation, limits, the queue, the store calls, timeouts); this module
owns the words. A turn goes in three steps, so that every route (``/chat/`` and any API beside it) gives the
same answer to the same message:

1. ``first_look(message)``: the triage of the message alone (lora_med/serve/triage). It runs before any
   limit, so an emergency is never rate limited, queued or made to wait behind the patient's earlier message.
2. ``plan(message, history, urgent)``: with the conversation so far, ``action`` and ``params`` and either a
   reply decided without the model (an emergency, one carried over from an earlier turn, or the reply to
   "ya nos atendieron") or the prompt the model continues. ``params.intent`` keeps the message's intent and
   ``params.triage`` its tier, whatever the tier.
3. ``finish(plan, text)``: what is done with the model's text: an empty reply gets the fallback; a reply that
   speaks of emergencies, 118 or ambulances on a message the triage did not mark is replaced by the flow's own
   reply (the triage decides, never the model); a caution adds its safety-net line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..data import Message
from .intents import EMERGENCY_STATUS, FLOWS, Intents
from .metrics import Metrics
from .replier import Replier
from .store import Turn
from .triage import Assessment, Triage, Verdict


@dataclass(frozen=True)
class Urgent:
    """What the first look found: an emergency, answered at once."""

    rule: str  # the triage category ("" when unclear), for logs and metrics
    reply: str
    assessment: Assessment | None = None


@dataclass(frozen=True)
class Plan:
    """A turn's answer, before or after the model. ``reply`` is None while the model still has to write it."""

    action: str
    status: str
    reply: str | None = None
    source: str = "model"  # who wrote the reply: model | guard (the triage) | fallback | flow (model overridden)
    prompt: list[int] | None = None  # token ids for the engine when the model writes the reply
    rule: str | None = None  # the emergency's triage category, when the triage answered
    extra: dict = field(default_factory=dict)  # more params the response carries beside status
    note: str | None = None  # the triage's safety-net line, added to whatever reply is sent (caution)

    def params(self) -> dict:
        """The response's ``params``: the seed's ``status`` and whatever else this turn knows."""
        return {"status": self.status, **self.extra}


class Dialog:
    """The turn logic of one server: rules, intents and the model's prompts."""

    def __init__(self, triage: Triage, intents: Intents, replier: Replier | None, metrics: Metrics):
        self.triage = triage
        self.intents = intents
        self.replier = replier  # None: decide() only (benchmarks measure the triage without a model)
        self.metrics = metrics

    def first_look(self, message: str) -> Urgent | None:
        a = self.triage.assess(message)
        if a.tier != "emergency":
            return None
        return Urgent(a.category or "", self.triage.emergency_reply(a.category), a)

    def wants_restart(self, message: str, urgent: Urgent | None) -> bool:
        """True when the patient asks to start over (never on an emergency)."""
        return urgent is None and self.intents.wants_restart(message)

    def plan(self, message: str, history: list[Turn], urgent: Urgent | None) -> Plan:
        plan = self.decide(message, history, urgent)
        if plan.reply is None:
            turns = [Message(t.role, t.content) for t in history]
            plan = dataclasses.replace(plan, prompt=self.replier.prompt([*turns, Message("user", message)]))
        return plan

    def decide(self, message: str, history: list[Turn], urgent: Urgent | None = None) -> Plan:
        """``plan`` without the prompt: the triage's verdict and the intent (``reply`` None: the model writes)."""
        verdict: Verdict = self.triage.verdict(message, history, urgent.assessment if urgent else None)
        decision = self.intents.decide(message, history)
        extra = {**verdict.params(), "intent": decision.action}
        self.metrics.triage.inc(verdict.tier)
        if verdict.tier == "emergency":
            rule = verdict.category or ""
            self.metrics.guard_hits.inc(rule or "unclear")
            return Plan("emergency", EMERGENCY_STATUS, reply=verdict.reply, source="guard", rule=rule, extra=extra)
        if verdict.released and decision.action not in FLOWS:  # "ya nos atendieron": acknowledged
            reply = _with(verdict.reply, verdict.note)
            return Plan(decision.action, decision.status, reply=reply, source="guard", extra=extra)
        return Plan(decision.action, decision.status, extra=extra, note=verdict.note)

    def finish(self, plan: Plan, text: str) -> Plan:
        """The plan with the model's ``text`` as its reply: the fallback when the model said nothing, the flow's
        own reply when it spoke of an emergency the triage did not find; a caution's line added."""
        source = "model"
        if not text:
            self.metrics.empty_replies.inc()
            text, source = self.intents.fallback_reply, "fallback"
        elif self.triage.speaks_of_emergency(text):
            self.metrics.overridden.inc()
            text, source = self.triage.flow_reply(plan.action), "flow"
        return dataclasses.replace(plan, reply=_with(text, plan.note), source=source)


def _with(text: str, note: str | None) -> str:
    return f"{text} {note}" if note else text
