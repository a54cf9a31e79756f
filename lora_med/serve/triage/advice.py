"""One line per triage category on what to do while help comes, from ``configs/triage-advice.yaml``.

The file names the first-aid reference the lines were written from; its ``never`` table lists phrases a
category's line must not contain (a seated position for someone unconscious, "nothing to eat or drink" for low
sugar or dehydration, "press the wound" for bleeding in pregnancy). The table is the mechanism, not a note:

- when the file loads, no category's line may contain a phrase forbidden for itself or for a category it
  ``covers`` (configs/triage.yaml: the rules say its line fits them too), and the generic lines none at all;
- for each message (``fitting``), a category's line goes out only when it is safe for every category the message
  may be about (its ``readings``: signs, caution signs, mentions); otherwise the generic instruction does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import ConfigError
from ..config import read_yaml
from .normalize import fold

GENERIC = "generic"


@dataclass(frozen=True)
class Lines:
    advice: str  # for the emergency reply
    caution: str  # the safety-net line of a caution


class Advice:
    """The advice lines of every category, the generic ones, and the ``never`` table."""

    def __init__(
        self,
        path: Path,
        categories: set[str],
        covers: dict[str, frozenset[str]] | None = None,
        parents: dict[str, str | None] | None = None,
    ):
        spec = read_yaml(path, "--emergency (advice)")
        where = str(path)
        problems: list[str] = []
        self.generic = _line(spec.get("generic"), f"{where}: 'generic'", problems)
        self.generic_caution = _line(spec.get("generic_caution"), f"{where}: 'generic_caution'", problems)
        lines = spec.get("categories") or {}
        self.lines: dict[str, Lines] = {}
        for name in sorted(categories):
            # a category without lines of its own speaks with its parent's (farewell -> suicidal)
            item = lines.get(name, lines.get((parents or {}).get(name) or ""))
            if not isinstance(item, dict):
                problems.append(f"{where}: category {name!r} has no 'advice' and 'caution' lines (nor has its parent)")
                continue
            advice = _line(item.get("advice"), f"{where}: {name}.advice", problems)
            caution = _line(item.get("caution"), f"{where}: {name}.caution", problems)
            self.lines[name] = Lines(self.generic if advice == GENERIC else advice, caution)
        extra = sorted(set(lines) - categories)
        if extra:
            problems.append(f"{where}: advice for unknown categories {extra} (not in the triage rules)")
        self.never: list[tuple[frozenset[str], tuple[str, ...]]] = []
        for i, row in enumerate(spec.get("never") or []):
            cats, phrases = (row.get("categories"), row.get("phrases")) if isinstance(row, dict) else (None, None)
            if not isinstance(cats, list) or not isinstance(phrases, list) or set(cats) - categories:
                problems.append(f"{where}: never[{i}] needs 'categories' (known names) and 'phrases' (a list)")
                continue
            self.never.append((frozenset(cats), tuple(fold(p) for p in phrases)))
        for name, line in self.lines.items():
            for other in sorted({name} | set((covers or {}).get(name, ()))):
                bad = self.forbidden(other, line.advice)
                if bad and other == name:
                    problems.append(f"{where}: {name}.advice says {bad!r}, which the 'never' table forbids for it")
                elif bad:
                    problems.append(
                        f"{where}: {name}.advice says {bad!r}, which the 'never' table forbids for {other}, a "
                        f"category {name} covers in the rules; change the line or drop {other} from its covers"
                    )
        for key, text in (("generic", self.generic), ("generic_caution", self.generic_caution)):
            bad = next((b for c in categories if (b := self.forbidden(c, text))), None)
            if bad:
                problems.append(f"{where}: '{key}' says {bad!r}, which the 'never' table forbids (it must fit all)")
        if problems:
            raise ConfigError(f"{where}: invalid advice file", problems)

    def forbidden(self, category: str, text: str) -> str | None:
        """The first ``never`` phrase of ``category`` found in ``text`` (accents ignored), or None."""
        folded = fold(text)
        for cats, phrases in self.never:
            if category in cats:
                for p in phrases:
                    if p in folded:
                        return p
        return None

    def fitting(self, category: str | None, readings: frozenset[str] | set[str]) -> str | None:
        """``category`` when its line is safe for every one of ``readings`` (the categories the message may be
        about), else None: the generic instruction, never a line the ``never`` table forbids for any of them."""
        if category not in self.lines:
            return None
        line = self.lines[category].advice
        return None if any(self.forbidden(r, line) for r in readings if r != category) else category

    def advice(self, category: str | None) -> str:
        """The line for ``category``; the generic instruction when the category is unclear (None)."""
        return self.lines[category].advice if category in self.lines else self.generic

    def caution(self, category: str | None) -> str:
        return self.lines[category].caution if category in self.lines else self.generic_caution


def _line(value: object, where: str, problems: list[str]) -> str:
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{where} must be one line of text")
        return ""
    return " ".join(value.split())
