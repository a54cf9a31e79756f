"""One patient message's turn: what is said, whatever route the message came by.

The app owns the transport (HTTP, validation, limits, the queue, the store calls, timeouts); this module
owns the words. A turn goes in three steps, so that every route (``/chat/`` and any API beside it) gives the
same answer to the same message:

1. ``first_look(message)``: the safety check that needs nothing but the message. It runs before any limit,
   so an emergency is never rate limited, queued or made to wait behind the patient's earlier message.
2. ``plan(message, history, urgent)``: with the conversation so far, ``action`` and ``params`` and either a
   reply decided without the model (an emergency) or the prompt the model continues.
3. ``finish(plan, text)``: what is done with the model's text (an empty reply gets the fallback).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..data import Message
from .guard import Guard
from .intents import EMERGENCY_STATUS, Action, Intents
from .metrics import Metrics
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
    source: str = "model"  # who wrote the reply: model | guard | fallback
    prompt: list[int] | None = None  # token ids for the engine when the model writes the reply
    rule: str | None = None  # the emergency sign, when the first look found one
    extra: dict = field(default_factory=dict)  # more params the response carries beside status

    def params(self) -> dict:
        """The response's ``params``: the seed's ``status`` and whatever else this turn knows."""
        return {"status": self.status, **self.extra}


class Dialog:
    """The turn logic of one server: rules, intents and the model's prompts."""

    def __init__(self, guard: Guard, intents: Intents, replier: Replier, metrics: Metrics):
        self.guard = guard
        self.intents = intents
        self.replier = replier
        self.metrics = metrics

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
        turns = [Message(t.role, t.content) for t in history]
        prompt = self.replier.prompt([*turns, Message("user", message)])
        return Plan(decision.action, decision.status, prompt=prompt)

    def finish(self, plan: Plan, text: str) -> Plan:
        """The plan with the model's ``text`` as its reply (or the fallback when the model said nothing)."""
        if not text:
            self.metrics.empty_replies.inc()
            return dataclasses.replace(plan, reply=self.intents.fallback_reply, source="fallback")
        return dataclasses.replace(plan, reply=text, source="model")
