"""One patient message's turn: what is said, whatever route the message came by.

The app owns the transport (HTTP, validation, limits, the queue, the store calls, timeouts); this module
owns the words. A turn goes in three steps, so that every route (``/chat/`` and any API beside it) gives the
same answer to the same message:

1. ``first_look(message)``: the safety check that needs nothing but the message. It runs before any limit,
   so an emergency is never rate limited, queued or made to wait behind the patient's earlier message.
2. ``plan(message, history, urgent)``: with the conversation so far, ``action`` and ``params`` and either a
   reply decided without the model (an emergency) or the prompt the model continues.
3. ``finish(plan, text)``: what is done with the model's text (an empty reply gets the fallback).

With the clinic's facts (a ``Referee``, :mod:`lora_med.serve.referee`), ``plan`` also reads the booking and may
answer from the facts at once, and ``finish`` checks the model's reply and replaces a wrong one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..data import Message
from .guard import Guard
from .intents import EMERGENCY_STATUS, Action, Intents
from .metrics import Metrics
from .referee import Referee, View
from .replier import Replier
from .store import Turn


@dataclass(frozen=True)
class Urgent:
    """What the first look found: an emergency, answered at once."""

    rule: str  # the sign's name, for logs and metrics
    reply: str


@dataclass(frozen=True)
class Plan:
    """A turn's answer, before or after the model. ``reply`` is None while the model still has to write it."""

    action: Action
    status: str
    reply: str | None = None
    source: str = "model"  # who wrote the reply: model | facts | guard | fallback
    prompt: list[int] | None = None  # token ids for the engine when the model writes the reply
    rule: str | None = None  # the emergency sign, when the first look found one
    extra: dict = field(default_factory=dict)  # more params the response carries beside status
    view: View | None = None  # the facts' side of the turn (what the model's reply is checked against)
    reasons: tuple[str, ...] = ()  # why the model's reply was replaced (the checker's findings)

    def params(self) -> dict:
        """The response's ``params``: the seed's ``status``, who wrote the reply, and the booking so far."""
        return {"status": self.status, "source": self.source, **self.extra}


class Dialog:
    """The turn logic of one server: rules, intents and the model's prompts."""

    def __init__(
        self, guard: Guard, intents: Intents, replier: Replier, metrics: Metrics, referee: Referee | None = None
    ):
        self.guard = guard
        self.intents = intents
        self.replier = replier
        self.metrics = metrics
        self.referee = referee

    def first_look(self, message: str) -> Urgent | None:
        hit = self.guard.check(message)
        return Urgent(hit.rule, hit.reply) if hit is not None else None

    def wants_restart(self, message: str, urgent: Urgent | None) -> bool:
        """True when the patient asks to start over (never on an emergency)."""
        return urgent is None and self.intents.wants_restart(message)

    def plan(self, message: str, history: list[Turn], urgent: Urgent | None) -> Plan:
        if urgent is not None:
            self.metrics.guard_hits.inc(urgent.rule)
            return Plan("emergency", EMERGENCY_STATUS, reply=urgent.reply, source="guard", rule=urgent.rule)
        decision = self.intents.decide(message, history)
        view = self.referee.plan(message, history, decision) if self.referee is not None else None
        if view is not None and view.reply is not None:
            self.metrics.fact_answers.inc(view.why)
            return Plan(view.action, view.status, reply=view.reply, source="facts", extra=view.params)
        turns = [Message(t.role, t.content) for t in history]
        prompt = self.replier.prompt([*turns, Message("user", message)])
        if view is not None:
            return Plan(view.action, view.status, prompt=prompt, extra=view.params, view=view)
        return Plan(decision.action, decision.status, prompt=prompt)

    def finish(self, plan: Plan, text: str) -> Plan:
        """The plan with the model's ``text`` as its reply: checked against the facts when there are facts (a
        rejected reply is replaced by the flow's reply from the facts), else the fallback when it is empty."""
        if plan.view is not None and self.referee is not None:
            reply, source, findings = self.referee.finish(plan.view, text)
            if findings:
                self.metrics.replaced.inc(findings[0].reason)
            return dataclasses.replace(plan, reply=reply, source=source, reasons=tuple(f.reason for f in findings))
        if not text:
            self.metrics.empty_replies.inc()
            return dataclasses.replace(plan, reply=self.intents.fallback_reply, source="fallback")
        return dataclasses.replace(plan, reply=text, source="model")
