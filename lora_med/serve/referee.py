"""What the clinic's facts do to a turn: the booking in ``params``, the replies built from the facts, and the
check of every model reply.

``Referee.plan`` runs after the intent layer: it reads the booking from the conversation, and answers from the
facts without the model when the facts alone give the answer (an information question; a date or hour that
cannot be booked, told with the next real slots; the booking's summary and confirmation). Otherwise the model
writes, and ``Referee.finish`` checks its reply (:mod:`lora_med.serve.checker`): a rejected reply is replaced by
the flow's reply for the current step, built from the facts. ``source`` says which: ``model`` or ``facts``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from ..errors import ConfigError, DatasetError
from .answers import Answers
from .booking import Booking, read_booking
from .checker import Checker, Context, Finding, known_words
from .dates import find_dates, find_times, fold, now_in
from .facts import Facts, load_facts
from .intents import FLOWS, Action, Decision
from .lexicon import tokens
from .store import Turn

_QUESTION = re.compile(
    r"\?|^\W*(?:(?:hola|buenas?|buenos dias|oiga|disculpe?)\W+)*(?:y\s+)?(?:que|q|como|hasta|desde|atienden|atiende"
    r"|tienen|tiene|hay|aceptan|puedo|se puede|trabajan|hacen)\b"
    r"|\b(?:cuanto|cuanta|cuantos|cuantas|donde|cuando|cual|cuales|quien|a (?:que|q) hora|(?:que|q) dias?)\b"
)
_BOOKING_WORDS = re.compile(
    r"\b(?:cita|ficha|turno|consulta|agendar|reservar|primer[oa]? disponible|cualquiera|ir|voy)\b"
)


# A request for a booking: "kiero pal miércoles 27", "quisiera para el lunes", "agéndame el jueves".
_REQUEST = re.compile(
    r"\b(?:quiero|kiero|quisiera|queria|necesito|nesecito|dame|deme|agenda\w*|reserva\w*|anota\w*|separa\w*)\b"
)


def _asks_then_books(f: str) -> bool:
    """A question followed by a booking request with a day or an hour: "la dermatóloga atiende miércoles no?
    kiero pal miércoles 27 en la tarde tipo 5". What follows the last "?" is not a question, asks for a booking
    and says when: the booking is under way (the question is answered by the booking's own reply)."""
    tail = f[f.rfind("?") + 1 :] if "?" in f else ""
    if not tail.strip() or _QUESTION.search(tail) or not _REQUEST.search(tail):
        return False
    return bool(find_dates(tail) or find_times(tail) or re.search(r"\b(?:manana|hoy|pasado)\b", tail))


@dataclass
class View:
    """The facts' side of one turn: the plan's action and status, the booking, and the reply if the facts
    decided it (``why``: info | unavailable | summary), else what the model's reply is checked against."""

    action: Action
    status: str
    booking: Booking | None
    context: Context
    now: datetime
    reply: str | None = None
    why: str | None = None
    params: dict = field(default_factory=dict)


class Referee:
    def __init__(
        self, facts: Facts, answers: Answers, checker: Checker, clock: Callable[[], datetime], check: bool = True
    ):
        self.facts, self.answers, self.checker, self.clock, self.check = facts, answers, checker, clock, check

    def plan(self, message: str, history: list[Turn], decision: Decision) -> View:
        now = self.clock()
        action, status = decision.action, decision.status
        exchanges = _exchanges(history, message)
        booking = read_booking(self.facts, exchanges, now)
        f = fold(message)
        question = bool(_QUESTION.search(f)) and not _asks_then_books(f)
        info = self.answers.info(message, now) if action not in ("schedule_appointment",) else None
        if action in ("chat", "clinic_info") and not question and self._gives_booking(message, f, booking):
            action, status, info = "schedule_appointment", "collecting_info", None
        elif action == "chat" and info:
            action = "clinic_info"
        if action == "schedule_appointment" and status == "confirmed" and booking.step(self.facts) != "confirm":
            status = "collecting_info"  # a "sí" is a confirmation only of a booking with every detail
        user_text = " ".join(m for m, _ in exchanges)
        ctx = Context(message, user_text, booking if action in FLOWS else None, action, status, now.date())
        view = View(action, status, booking if action in FLOWS else None, ctx, now)
        view.params = booking.params() if action in FLOWS else {}
        if action == "clinic_info":
            view.reply, view.why = info or self.answers.unknown(), "info"
        elif action == "chat" and info:
            view.reply, view.why = info, "info"
        elif action == "schedule_appointment" and (booking.problem or booking.step(self.facts) == "confirm"):
            view.reply = self.answers.booking(booking, status, now)
            view.why = "unavailable" if booking.problem else "summary"
        elif action in FLOWS and action != "schedule_appointment" and question and info:
            view.reply, view.why = info, "info"
        return view

    def _gives_booking(self, message: str, f: str, booking: Booking) -> bool:
        """A message that is not a question and carries booking details, in a conversation about a specialty or
        a doctor: "el martes a las 10", "el primero disponible", "ficha con traumatología para mañana"."""
        if not (booking.specialty or booking.doctor):
            return False
        toks = tokens(message)
        named = bool(self.facts.find("specialty", toks) or self.facts.find_doctors(toks))
        when = bool(find_dates(message) or find_times(message)) or bool(re.search(r"\b(?:manana|hoy|pasado)\b", f))
        return when or bool(_BOOKING_WORDS.search(f)) or (named and bool(re.search(r"\b(?:para|con)\b", f)))

    def finish(self, view: View, text: str) -> tuple[str, str, list[Finding]]:
        """(reply, source, findings) for the model's ``text``: kept when the checker finds nothing."""
        if not self.check:  # the model's words as written (an empty reply still gets the flow's)
            if text:
                return text, "model", []
            findings = [Finding("empty", "the reply is empty")]
        else:
            findings = self.checker.check(text, view.context)
            if not findings:
                return text, "model", []
        reply = self.answers.flow(view.booking or Booking(), view.action, view.status, view.context.message, view.now)
        return reply, "facts", findings


def _exchanges(history: list[Turn], message: str) -> list[tuple[str, str | None]]:
    """(patient message, the reply before it) since the last booked or emergency turn, ending with ``message``."""
    start = 0
    for i, t in enumerate(history):
        if t.role == "assistant" and (t.action == "emergency" or t.status == "confirmed"):
            start = i + 1
    out: list[tuple[str, str | None]] = []
    before: str | None = None
    for t in history[start:]:
        if t.role == "user":
            out.append((t.content, before))
        else:
            before = t.content
    return out + [(message, before)]


def load_referee(
    facts_path: str | Path, replies_path: str | Path, words: list[str], fixed_now: str | None, check: bool = True
) -> Referee:
    """The referee of ``lora-med serve``: facts, templates, the checker's known words (from conversation files).

    Raises:
        ConfigError: a file is missing or malformed (named, with the fix).
    """
    from .config import resolve_path

    facts = load_facts(facts_path)
    answers = Answers(facts, resolve_path(replies_path))
    texts = list(_template_texts(answers))
    for w in words:
        texts += conversation_texts(resolve_path(w), flag="--words")
    clock = lambda: now_in(facts.timezone, fixed_now)
    return Referee(facts, answers, Checker(facts, known_words(texts)), clock, check)


def _template_texts(answers: Answers):
    for section in answers.t.values():
        yield from section.values()


def conversation_texts(path: Path, flag: str) -> list[str]:
    """Every message of a conversation file (its words are the checker's known words)."""
    from ..data import load_conversations

    try:
        ds = load_conversations(path)
    except DatasetError as e:
        raise ConfigError(f"{flag} {path}: {e}") from None
    return [m.content for c in ds.conversations for m in c.messages]
