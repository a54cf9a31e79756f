"""Finding the clinic's things in Spanish text: words with their places, and phrases matched on them.

Built on the rule matcher's spelling tolerance (:mod:`lora_med.serve.matcher`): a phrase word matches a text
word on its phonetic key, at one typo for keys of 5+ letters, or as a prefix (``cardiolog*``). Unlike the rule
matcher this one says *where* each phrase is, so the reply checker can tell which doctor a weekday or a time
sits beside, and in which sentence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .matcher import FUZZY_MIN, key, normalize, within_one

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_ABBREVIATIONS = frozenset({"dr", "dra", "sr", "sra", "srta", "av", "bs", "n", "lic", "ing", "nro", "no", "tel", "cel"})
NEGATIONS = frozenset({"no", "ni", "nunca", "tampoco", "cerrado", "cerrada", "cerrados", "cerradas", "cerramos", "sin"})


def _breaks(gap: str, prev: str, nxt: str) -> tuple[bool, bool]:
    """(sentence ends, clause ends) in the characters ``gap`` between words ``prev`` and ``nxt``."""
    if "\n" in gap or re.search(r"[!?¿¡]", gap):
        return True, True
    if "." in gap and not (prev.lower() in _ABBREVIATIONS or (gap.strip() == "." and nxt[:1].isdigit())):
        return True, True
    clause = bool(re.search(r"[;,()]", gap)) or (":" in gap and not (gap.strip() == ":" and nxt[:1].isdigit()))
    return False, clause or nxt.lower() == "pero"


@dataclass(frozen=True)
class Token:
    text: str  # as written
    norm: str  # normalized (lower case, no accents)
    key: str  # phonetic key
    start: int  # character offsets in the text
    end: int
    sentence: int
    clause: int


def tokens(text: str) -> list[Token]:
    """The words of ``text`` with their places (sentence and clause numbers count from 0)."""
    out: list[Token] = []
    sentence = clause = 0
    pos, prev = 0, ""
    for m in _WORD.finditer(text):
        if out:
            ends, cut = _breaks(text[pos : m.start()], prev, m.group())
            sentence += ends
            clause += ends or cut
        norm = normalize(m.group())
        for part in norm.split():
            out.append(Token(m.group(), part, key(part), m.start(), m.end(), sentence, clause))
        pos, prev = m.end(), m.group()
    return out


@dataclass(frozen=True)
class Hit:
    id: str  # what was found (a specialty id, a doctor's name, ...)
    first: int  # token index of its first word
    last: int  # token index of its last word


class _Word:
    __slots__ = ("key", "prefix")

    def __init__(self, word: str):
        self.prefix = word.endswith("*")
        self.key = key(normalize(word.rstrip("*")))

    def matches(self, w: str) -> bool:
        k = self.key
        if self.prefix:
            return w.startswith(k) or (len(k) >= FUZZY_MIN + 1 and len(w) >= len(k) and within_one(w[: len(k)], k))
        if w.isdigit() or k.isdigit():
            return w == k
        return w == k or (len(k) >= FUZZY_MIN and within_one(w, k))


class Lexicon:
    """Phrases by id; ``find`` gives every non-overlapping match, longest phrases first."""

    def __init__(self, entries: dict[str, list[str]] | None = None):
        self._phrases: list[tuple[str, list[_Word]]] = []
        for id_, phrases in (entries or {}).items():
            self.add(id_, phrases)

    def add(self, id_: str, phrases: list[str]) -> None:
        for p in phrases:
            words = [_Word(w) for w in re.split(r"\s+", p.strip()) if normalize(w.rstrip("*"))]
            if words:
                self._phrases.append((id_, words))
        self._phrases.sort(key=lambda x: -len(x[1]))

    def find(self, toks: list[Token]) -> list[Hit]:
        taken: set[int] = set()
        hits = []
        for id_, words in self._phrases:
            n = len(words)
            for i in range(len(toks) - n + 1):
                span = range(i, i + n)
                if taken.intersection(span):
                    continue
                if all(words[j].matches(toks[i + j].key) for j in range(n)):
                    hits.append(Hit(id_, i, i + n - 1))
                    taken.update(span)
        return sorted(hits, key=lambda h: h.first)

    def ids(self, text: str) -> list[str]:
        """The ids found in ``text``, in order, without repeats."""
        return list(dict.fromkeys(h.id for h in self.find(tokens(text))))


def negated(toks: list[Token], at: int) -> bool:
    """True when the clause holding token ``at`` says no (a negation anywhere in it: "el lunes no atiende",
    "no atiende los lunes", "domingos cerrado")."""
    clause = toks[at].clause
    return any(t.norm in NEGATIONS for t in toks if t.clause == clause)
