"""One patient message's turn: what is said, whatever route the message came by.

The app owns the transport (HTTP, validation, limits, the queue, the store calls, timeouts); this module
owns the words. A turn goes in three steps, so that every route (``/chat/``, ``/v1/chat/completions``) gives
the same answer to the same message:

1. ``first_look(message)``: the triage of the message alone (lora_med/serve/triage). It runs before any
   limit, so an emergency is never rate limited, queued or made to wait behind the patient's earlier message.
2. ``plan(message, history, urgent)``: with the conversation so far, ``action`` and ``params`` and either a
   reply decided without the model (an emergency, one carried over from an earlier turn, the reply to
   "ya nos atendieron", or an answer built from the clinic's facts) or the prompt the model continues.
   ``params.intent`` keeps the message's intent and ``params.triage`` its tier, whatever the tier.
3. ``finish(plan, text)``: what is done with the model's text: held against the clinic's facts (a wrong
   reply is replaced by the flow's reply from the facts); an empty reply gets the fallback; a reply that
   speaks of emergencies, 118 or ambulances on a message the triage did not mark is replaced by the flow's own
   reply (the triage decides, never the model); a caution adds its safety-net line to whatever is sent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..data import Message
from .intents import EMERGENCY_STATUS, FLOWS, Action, Intents
from .metrics import Metrics
from .referee import Referee, View
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

    action: Action
    status: str
    reply: str | None = None
    # who wrote the reply: model | facts | guard (the triage) | fallback | flow (the model overridden)
    source: str = "model"
    prompt: list[int] | None = None  # token ids for the engine when the model writes the reply
    rule: str | None = None  # the emergency's triage category, when the triage answered
    extra: dict = field(default_factory=dict)  # more params the response carries beside status
    note: str | None = None  # the triage's safety-net line, added to whatever reply is sent (caution)
    view: View | None = None  # the facts' side of the turn (what the model's reply is checked against)
    reasons: tuple[str, ...] = ()  # why the model's reply was replaced (the checker's findings)

    def params(self) -> dict:
        """The response's ``params``: the seed's ``status``, who wrote the reply, the triage and the booking."""
        return {"status": self.status, "source": self.source, **self.extra}


class Dialog:
    """The turn logic of one server: triage, intents, the clinic's facts and the model's prompts."""

    def __init__(
        self,
        triage: Triage,
        intents: Intents,
        replier: Replier | None,
        metrics: Metrics,
        referee: Referee | None = None,
    ):
        self.triage = triage
        self.intents = intents
        self.replier = replier  # None: decide() only (benchmarks measure the triage without a model)
        self.metrics = metrics
        self.referee = referee

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
            if self.replier is None:
                raise RuntimeError("Dialog without a replier can only decide(), not plan()")
            turns = [Message(t.role, t.content) for t in history]
            plan = dataclasses.replace(plan, prompt=self.replier.prompt([*turns, Message("user", message)]))
        return plan

    def decide(self, message: str, history: list[Turn], urgent: Urgent | None = None) -> Plan:
        """``plan`` without the prompt: the triage's verdict, the intent and the facts (``reply`` None: the model
        writes it)."""
        verdict: Verdict = self.triage.verdict(message, history, urgent.assessment if urgent else None)
        decision = self.intents.decide(message, history)
        extra = {**verdict.params(), "intent": decision.action}
        self.metrics.triage.inc(verdict.tier)
        if verdict.tier == "emergency":
            rule = verdict.category or ""
            self.metrics.guard_hits.inc(rule or "unclear")
            return Plan("emergency", EMERGENCY_STATUS, reply=verdict.reply, source="guard", rule=rule, extra=extra)
        if verdict.released and decision.action not in FLOWS:  # "ya nos atendieron": acknowledged
            assert verdict.reply is not None  # a released verdict carries the attended reply
            reply = _with(verdict.reply, verdict.note)
            return Plan(decision.action, decision.status, reply=reply, source="guard", extra=extra)
        view = self.referee.plan(message, history, decision) if self.referee is not None else None
        if view is None:
            return Plan(decision.action, decision.status, extra=extra, note=verdict.note)
        extra = {**view.params, **extra}
        if view.reply is not None:
            self.metrics.fact_answers.inc(view.why)
            return Plan(view.action, view.status, reply=_with(view.reply, verdict.note), source="facts", extra=extra)
        return Plan(view.action, view.status, extra=extra, note=verdict.note, view=view)

    def finish(self, plan: Plan, text: str) -> Plan:
        """The plan with the model's ``text`` as its reply, after the checks (see the module's docstring)."""
        reasons: tuple[str, ...] = ()
        if plan.view is not None and self.referee is not None:
            text, source, findings = self.referee.finish(plan.view, text)
            reasons = tuple(f.reason for f in findings)
            if findings:
                self.metrics.replaced.inc(findings[0].reason)
        elif not text:
            self.metrics.empty_replies.inc()
            text, source = self.intents.fallback_reply, "fallback"
        else:
            source = "model"
        if source == "model" and self.triage.speaks_of_emergency(text):
            self.metrics.overridden.inc()
            text, source = self.triage.flow_reply(plan.action), "flow"
        return dataclasses.replace(plan, reply=_with(text, plan.note), source=source, reasons=reasons)


def _with(text: str, note: str | None) -> str:
    return f"{text} {note}" if note else text
