"""Training data held to the clinic's facts: ``lora-med data check FILE --facts configs/clinic.yaml``.

Every assistant turn of a conversation file goes through the reply checker with what the conversation had said
before it (the patient's words, the booking so far), as a served reply would, but only for facts: a doctor under
the wrong specialty or on a day they do not work, an hour the clinic is closed, a wrong price, an insurer the
clinic does not take, a number that is not the clinic's. Training data has no date, so "hoy" and "mañana" are
not checked. A model learns what its data says: this keeps the data from teaching it a wrong fact.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path

from ..data import load_conversations
from .booking import read_booking
from .checker import FACT_REASONS, Checker, Context
from .facts import Facts

# Training data has no date of its own: weekdays are read against a fixed Monday, and the booking's date is not
# used (a "mañana" would otherwise land on a weekday the data never meant).
_REFERENCE = datetime(2024, 1, 1, 0, 0)


def audit(path: str | Path, facts: Facts) -> list[str]:
    """One line per problem of an assistant turn of ``path`` with ``facts``: where (file, row, turn) and why.

    Raises:
        DatasetError: the file is malformed (as ``lora-med data check`` reports it).
    """
    checker = Checker(facts, set())
    out = []
    for conv in load_conversations(path).conversations:
        exchanges: list[tuple[str, str | None]] = []
        before, turn = None, 0
        for m in conv.messages:
            if m.role == "user":
                exchanges.append((m.content, before))
                continue
            if m.role != "assistant":
                continue
            before, turn = m.content, turn + 1
            booking = read_booking(facts, exchanges, _REFERENCE)
            booking = dataclasses.replace(booking, date=None, time=None, problem=None)
            ctx = Context(
                message=exchanges[-1][0] if exchanges else "",
                user_text=" ".join(x for x, _ in exchanges),
                booking=booking,
                action="schedule_appointment" if booking.specialty else "chat",
                status="confirmed",
                today=None,
            )
            for finding in checker.check(m.content, ctx, style=False):
                if finding.reason in FACT_REASONS:
                    out.append(f"{conv.where} assistant turn {turn}: {finding.reason}: {finding.detail}: {m.content!r}")
    return out
