"""Word rules over Spanish chat messages that survive missing accents and WhatsApp spelling.

Patients write "kiero una sita", "me duele el pexo", "se desmallo", "combulsiones". Rules are written
once in their plain spelling (in YAML under configs/) and matched on a phonetic key of every word:

1. ``normalize``: Unicode format characters (category Cf: zero-width spaces, soft hyphens) removed, lower case,
   accents and tildes dropped, anything but letters and digits is a space;
2. ``key``: the spellings Spanish speakers swap sound alike, so they get one key: ch -> x (pecho = pexo),
   qu/c(a,o,u)/k -> k, c(e,i)/z/s -> s, v -> b, ll -> y, a silent h dropped, doubled letters single
   (kiero = quiero, sita = cita, desmallo = desmayo, rrespirar = respirar);
3. words whose key has 5 or more letters also match at one typo (Damerau-Levenshtein distance 1:
   one letter added, dropped, changed or two swapped); shorter words must match exactly, or "cara"
   would match "para". Prefixes of 6+ letters allow the same typo; 5-letter prefixes only a changed letter.
   A ``protected`` word (a common word one typo away from a rule's word: "mamar" from "matar", "contar"
   from "cortar") is never read as a typo: it matches only itself and prefixes it starts with.

A rule is a list of slots; a slot is ``alt|alt|...`` where an alternative is a word, a prefix ending in
``*`` (``respir*``), or ``@name`` for a list of alternatives declared once under ``concepts``.
``#N`` matches a number >= N (``#5``: "me tome 20 pastillas"). ``near`` rules need every slot within ``window`` words of the first slot's match (any order); ``seq``
rules need the slots in order, each at most ``gap`` words after the previous one. A rule with one
slot is a keyword.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from ..errors import ConfigError

FUZZY_MIN = 5  # keys this long or longer match at one typo
DEFAULT_WINDOW = 6
DEFAULT_GAP = 2


def normalize(text: str) -> str:
    """No format characters, lower case, no accents (ñ -> n), letters and digits only, single spaces."""
    # A format character (zero-width space, soft hyphen) inside a word would split it: drop it, never space it.
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")
    text = unicodedata.normalize("NFKD", text.casefold())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def key(word: str) -> str:
    """Phonetic key of a normalized word (see the module docstring)."""
    w = word.replace("ch", "X").replace("qu", "k").replace("ll", "y")
    w = re.sub(r"c(?=[eiy])", "s", w)
    w = w.replace("c", "k").replace("z", "s").replace("v", "b").replace("h", "").replace("X", "x")
    return re.sub(r"(.)\1+", r"\1", w)


def words(text: str) -> list[str]:
    """Phonetic keys of the words of ``text``, in order."""
    return [key(w) for w in normalize(text).split()]


def within_one(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` differ by at most one edit (add, drop, change, or swap two neighbours)."""
    if a == b:
        return True
    la, lb = len(a), len(b)
    if abs(la - lb) > 1:
        return False
    i = 0
    while i < min(la, lb) and a[i] == b[i]:
        i += 1
    if la == lb:
        # one change, or a swap of neighbours
        return a[i + 1 :] == b[i + 1 :] or (a[i : i + 2] == b[i : i + 2][::-1] and a[i + 2 :] == b[i + 2 :])
    return (a[i + 1 :] == b[i:]) if la > lb else (a[i:] == b[i + 1 :])


@dataclass(frozen=True)
class _Alt:
    key: str
    prefix: bool
    at_least: int | None = None  # ``#N``: any number >= N

    def matches(self, w: str, fuzzy: bool = True) -> bool:
        if self.at_least is not None:
            return w.isdigit() and int(w) >= self.at_least
        k = self.key
        if not fuzzy:
            return w.startswith(k) if self.prefix else w == k
        if not self.prefix:
            return w == k or (len(k) >= FUZZY_MIN and within_one(w, k))
        if w.startswith(k):
            return True
        if len(k) < FUZZY_MIN:
            return False
        # A typo inside the prefix may shift it by one letter; for 5-letter prefixes that is too loose
        # ("labo" would match "labio*" and so "laboratorio"), so they only allow a changed letter.
        lengths = (len(k),) if len(k) == FUZZY_MIN else (len(k) - 1, len(k), len(k) + 1)
        return any(within_one(w[:n], k) for n in lengths if n <= len(w))


@dataclass(frozen=True)
class Rule:
    """One rule: its name, its slots (sets of alternative ids), and how the slots must sit."""

    name: str
    slots: tuple[frozenset[int], ...]
    mode: str  # near | seq
    span: int  # window (near) or gap (seq), in words

    def match(self, hits: list[frozenset[int]]) -> bool:
        """``hits[i]``: the ids of the alternatives word i matches."""
        pos = [[i for i, h in enumerate(hits) if h & slot] for slot in self.slots]
        if not all(pos):
            return False
        if self.mode == "near":
            return any(all(any(abs(j - i) <= self.span for j in p) for p in pos[1:]) for i in pos[0])
        return any(self._seq(pos, 1, i) for i in pos[0])

    def _seq(self, pos: list[list[int]], k: int, prev: int) -> bool:
        if k == len(pos):
            return True
        return any(self._seq(pos, k + 1, j) for j in pos[k] if prev < j <= prev + self.span + 1)


class RuleSet:
    """Named rules checked in order; built from YAML by ``from_spec``.

    Every alternative is indexed once: exact keys in a dict; the keys of fuzzy words and of prefixes with each
    one-letter deletion (a word one typo away from a key shares one of these strings with it), so a new word is
    checked against a handful of candidates, not every alternative. Each distinct word's matches are cached.
    ``protected``: phonetic keys of words never read as a typo of another (see the module docstring).
    """

    def __init__(self, rules: list[tuple[str, str, int, list[list[_Alt]]]], protected: frozenset[str] = frozenset()):
        ids: dict[_Alt, int] = {}
        self.rules = [
            Rule(name, tuple(frozenset(ids.setdefault(a, len(ids)) for a in slot) for slot in slots), mode, span)
            for name, mode, span, slots in rules
        ]
        self._exact: dict[str, list[int]] = {}
        self._numbers: list[tuple[int, _Alt]] = []
        self._words: dict[str, set[int]] = {}  # fuzzy word keys and their one-deletion variants -> ids
        self._prefixes: dict[str, set[int]] = {}  # prefix keys (and, 5+ letters, their deletion variants) -> ids
        self._prefix_lengths: set[int] = set()
        for alt, i in ids.items():
            if alt.at_least is not None:
                self._numbers.append((i, alt))
            elif alt.prefix:
                for v in _variants(alt.key) if len(alt.key) >= FUZZY_MIN else (alt.key,):
                    self._prefixes.setdefault(v, set()).add(i)
                self._prefix_lengths.update(range(max(1, len(alt.key) - 1), len(alt.key) + 2))
            elif len(alt.key) >= FUZZY_MIN:
                for v in _variants(alt.key):
                    self._words.setdefault(v, set()).add(i)
            else:
                self._exact.setdefault(alt.key, []).append(i)
        self._alts = {i: alt for alt, i in ids.items()}
        self.protected = protected
        self.hits = lru_cache(maxsize=20_000)(self._hits)

    def _hits(self, w: str) -> frozenset[int]:
        found = set(self._exact.get(w, ()))
        if w.isdigit():
            found.update(i for i, alt in self._numbers if alt.matches(w))
        fuzzy = w not in self.protected
        candidates: set[int] = set()
        for v in _variants(w) if fuzzy else (w,):
            candidates |= self._words.get(v, set())
        for n in self._prefix_lengths:
            if n <= len(w):
                for v in _variants(w[:n]) if fuzzy else (w[:n],):
                    candidates |= self._prefixes.get(v, set())
        found.update(i for i in candidates if self._alts[i].matches(w, fuzzy))
        return frozenset(found)

    @classmethod
    def from_spec(cls, rules: object, concepts: object, where: str, protected: object = None) -> RuleSet:
        """Build rules from their YAML form (see the module docstring); ``protected``: a list of words.

        Raises:
            ConfigError: a rule or concept is malformed (every problem listed, naming ``where``).
        """
        problems: list[str] = []
        concepts = concepts or {}
        if not isinstance(concepts, dict) or not all(
            isinstance(v, list) and all(isinstance(x, str) and x.strip() for x in v) for v in concepts.values()
        ):
            problems.append(f"{where}: 'concepts' must map names to lists of words")
            concepts = {}
        if not isinstance(rules, list) or not rules:
            raise ConfigError(f"{where}: no rules (give a list)", problems)
        built = []
        for i, spec in enumerate(rules):
            name = f"{where} rule {i + 1}" + (f" ({spec['name']})" if isinstance(spec, dict) and "name" in spec else "")
            if not isinstance(spec, dict) or len({"near", "seq"} & set(spec)) != 1:
                problems.append(f"{name}: give exactly one of 'near' or 'seq' (a list of slots)")
                continue
            mode = "near" if "near" in spec else "seq"
            slots_spec = [spec[mode]] if isinstance(spec[mode], str) else spec[mode]
            if not isinstance(slots_spec, list) or not slots_spec or not all(isinstance(s, str) for s in slots_spec):
                problems.append(f"{name}: '{mode}' must be a list of slot strings")
                continue
            span = spec.get("window" if mode == "near" else "gap", DEFAULT_WINDOW if mode == "near" else DEFAULT_GAP)
            if not isinstance(span, int) or isinstance(span, bool) or span < 0:
                problems.append(f"{name}: window/gap must be a whole number >= 0")
                continue
            slots = []
            for s in slots_spec:
                alts, bad = _slot(s, concepts)
                if bad:
                    problems.append(f"{name}: {bad}")
                slots.append(alts)
            built.append((str(spec.get("name", name)), mode, span, slots))
        if protected is not None and (
            not isinstance(protected, list) or not all(isinstance(x, str) and x.strip() for x in protected)
        ):
            problems.append(f"{where}: 'protected' must be a list of words")
        if problems:
            raise ConfigError(f"{where}: {len(problems)} problem(s) in the rules", problems)
        kept = protected if isinstance(protected, list) else ()  # checked above: None or a list of words
        return cls(built, frozenset(key(normalize(w)) for w in kept))

    def first(self, text: str) -> Rule | None:
        """The first rule that matches ``text``, or None."""
        return next(iter(self._candidates(text)), None)

    def matching(self, text: str) -> list[Rule]:
        """Every rule that matches ``text``, in file order."""
        return list(self._candidates(text))

    def _candidates(self, text: str):
        hits = [self.hits(w) for w in words(text)]
        present = frozenset().union(*hits)
        # Most rules have a slot no word of the message can fill: skip them before looking at positions.
        return (r for r in self.rules if all(not slot.isdisjoint(present) for slot in r.slots) and r.match(hits))


def _variants(k: str) -> tuple[str, ...]:
    """``k`` and every string one deletion away from it."""
    return (k, *{k[:i] + k[i + 1 :] for i in range(len(k))})


def _slot(spec: str, concepts: dict) -> tuple[list[_Alt], str | None]:
    alts: list[_Alt] = []
    for raw in spec.split("|"):
        raw = raw.strip()
        entries = concepts.get(raw[1:]) if raw.startswith("@") else [raw]
        if entries is None:
            return [], f"unknown concept {raw!r} (declare it under 'concepts')"
        for word in entries:
            if re.fullmatch(r"#\d+", word):
                alts.append(_Alt(word, False, int(word[1:])))
                continue
            prefix = word.endswith("*")
            norm = normalize(word.rstrip("*"))
            if not norm or " " in norm:
                return [], f"{word!r}: one word per alternative (use a 'seq' rule for a phrase)"
            alts.append(_Alt(key(norm), prefix))
    if not alts:
        return [], f"empty slot {spec!r}"
    return list(dict.fromkeys(alts)), None
