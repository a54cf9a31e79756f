"""What of a reply in progress may leave the server: streamed text passes the same checks as ``/chat/``.

The turn's ``finish(plan, text)`` (:mod:`lora_med.serve.turn`) decides what is said with the model's text: it
may keep it, add to it (a safety-net line), or replace it (a reply that breaks a rule). A streamed reply must
not show the client text that ``finish`` would not have let through, so text leaves in whole sentences:

* ``sentence`` (the default): as tokens arrive, each time a sentence is complete (``.``, ``!``, ``?``, ``…``
  or a line break, followed by the start of a next sentence; not after "Dr."/"Dra."/"Sr."/...) the reply so far,
  up to that sentence, is checked with ``finish``. If ``finish`` keeps it word for word (it may add after it),
  the new sentence is sent. If ``finish`` changes it, generation stops there: when nothing has been sent yet,
  the client gets ``finish``'s reply whole (the replacement), as ``/chat/`` would send it; when earlier
  sentences were already sent (each had passed), the reply ends with them, plus what ``finish`` adds after
  them. At the end, the whole reply is checked once more the same way.
* ``reply``: nothing is sent until the whole reply has passed ``finish``: exactly ``/chat/``'s text, and no
  earlier first token than a non-streamed reply.

Stop strings (the OpenAI ``stop`` parameter) cut the text before they are checked; text that could still be
the start of a stop string is held back.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# A sentence ends at . ! ? … (and closing quotes or brackets), followed by space and the start of a new
# sentence (a capital, a digit, an opening ¿ ¡ quote or bracket), or at a line break.
_END = re.compile(r"[.!?…]+[\"'»”)\]]*(?=\s+[¿¡\"'«“(]*[A-ZÁÉÍÓÚÑÜ0-9])|\n")
# "La Dra. Elena": a title's period is not a sentence's end.
_TITLES = {"dr", "dra", "drs", "sr", "sra", "srta", "lic", "ing", "prof", "av", "nro", "núm", "tel", "st"}


def sentence_end(text: str, start: int = 0) -> int:
    """The end (exclusive) of the last complete sentence in ``text``, at or after ``start``; 0 when none."""
    last = 0
    for m in _END.finditer(text, start):
        word = re.search(r"(\w+)\W*$", text[: m.start() + 1])
        if m.group() != "\n" and word and word.group(1).lower() in _TITLES:
            continue
        last = m.end() if m.group() != "\n" else m.start()
    return last


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """``text`` before the first stop string, and whether one was found."""
    hits = [i for s in stop if (i := text.find(s)) >= 0]
    return (text[: min(hits)].rstrip(), True) if hits else (text, False)


class Gate:
    """One streamed reply's release. ``check(text)`` is the reply ``finish`` gives for ``text`` (its trial run,
    counting nothing); ``feed`` takes the reply so far and returns (new text to send, stop generating)."""

    def __init__(self, check: Callable[[str], str], mode: str = "sentence", stop: list[str] | None = None):
        self.check = check
        self.mode = mode
        self.stop = list(stop or [])
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # characters a stop string may still need
        self.sent = ""  # what the client has got
        self.changed = False  # a check changed the reply: generation stopped

    def feed(self, text: str) -> tuple[str, bool]:
        if self.mode != "sentence" or self.changed:
            return "", self.changed
        end = sentence_end(text[: max(0, len(text) - self.hold)], len(self.sent))
        if end <= len(self.sent):
            return "", False
        candidate = text[:end]
        if not self.check(candidate).startswith(candidate):
            self.changed = True  # finish would change this sentence: nothing more of the model's text goes out
            return "", True
        new, self.sent = candidate[len(self.sent) :], candidate
        return new, False

    def end(self, text: str, final: str) -> tuple[str, str]:
        """``text``: the model's whole reply; ``final``: ``finish``'s reply for it. Returns (the rest to send,
        outcome): ``kept`` (the model's text, and what ``finish`` adds), ``replaced`` (the client gets exactly
        ``final``, nothing of the model's text having gone out before it), ``cut`` (sentences already sent that
        ``final`` does not start with: they end the reply, with what ``finish`` adds after them alone)."""
        if final.startswith(self.sent):
            return final[len(self.sent) :], "kept" if text and final.startswith(text) else "replaced"
        after = self.check(self.sent)
        return (after[len(self.sent) :] if after.startswith(self.sent) else ""), "cut"
