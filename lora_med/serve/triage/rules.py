"""The readable half of the triage: categories of danger signs and the words that say how a sign is told.

Loaded from ``configs/triage.yaml`` (its header documents the file). Every rule of every category, modifier and
the attended/not-attended lists go into ONE :class:`RuleSet`, so each word of a message is looked up once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...errors import ConfigError
from ..matcher import RuleSet

LOWER = ("caution", "none")  # what a modifier can lower an emergency sign to; `now` keeps it
_ATTENDED = ("attended", "not_attended")
_OPTIONAL = ("company",)  # someone stays with them: releases only categories with `company_releases: true`


@dataclass(frozen=True)
class Category:
    name: str
    soften: frozenset[str]  # modifiers that lower this category's emergency (to the modifier's `lowers_to`)
    covers: frozenset[str]  # categories whose advice this one's line also fits, when both match
    parent: str | None  # the broader category a round may label it with (choking -> breathing)
    company_releases: bool = False  # someone staying with them ends it when carried (suicidal: not left alone)


@dataclass(frozen=True)
class Findings:
    """What the rules saw in one message."""

    signs: frozenset[str]  # categories with an emergency sign
    cautions: frozenset[str]  # categories with a sign that only calls for caution
    modifiers: frozenset[str]  # modifier names found (`now` and those of the file's `modifiers`)
    attended: bool  # the message says they are being attended or are safe
    mentions: frozenset[str] = frozenset()  # categories only mentioned (never a tier; see `readings`)
    company: bool = False  # someone is with them now ("mi hermana está aquí conmigo"), and no word against it

    @property
    def readings(self) -> frozenset[str]:
        """Every category the message may be about: a sign, a caution sign or a mention. An advice line must
        be safe for all of them (configs/triage-advice.yaml, `never`)."""
        return self.signs | self.cautions | self.mentions


class TriageRules:
    """Categories, modifiers, rewrites and the attended lists of a triage file (``spec``: its parsed YAML)."""

    def __init__(self, spec: dict, where: str):
        problems: list[str] = []
        cats = spec.get("categories")
        if not isinstance(cats, dict) or not cats:
            raise ConfigError(f"{where}: 'categories' must map category names to their rules")
        default_soften = spec.get("default_soften", [])
        mods = spec.get("modifiers") or {}
        self.lowers_to: dict[str, str] = {}  # modifier -> caution | none
        self.timeless: set[str] = set()  # modifiers a word of now does not undo (a lab test, a figure of speech)
        if not isinstance(mods, dict) or not isinstance(mods.get("now"), list):
            problems.append(
                f"{where}: 'modifiers' must map `now` (a rule list) and each other modifier to "
                "{lowers_to: caution|none, rules: [...]}"
            )
            mods = {}
        rules_of: dict[str, list] = {}
        for name, m in mods.items():
            if name == "now":
                rules_of[name] = m
            elif isinstance(m, dict) and m.get("lowers_to") in LOWER and isinstance(m.get("rules"), list):
                self.lowers_to[name] = m["lowers_to"]
                rules_of[name] = m["rules"]
                if m.get("despite_now"):
                    self.timeless.add(name)
            else:
                problems.append(f"{where}: modifier {name!r} must be {{lowers_to: caution|none, rules: [...]}}")
        specs: list[tuple[str, list]] = []  # (rule-name prefix, rule list) in file order
        self.categories: dict[str, Category] = {}
        for name, c in cats.items():
            if not isinstance(c, dict) or not isinstance(c.get("rules"), list):
                problems.append(f"{where}: category {name!r} must have 'rules' (a list)")
                continue
            unknown = set(c) - {"rules", "caution_rules", "mentions", "soften", "covers", "parent", "company_releases"}
            if unknown:
                problems.append(f"{where}: category {name!r}: unknown key(s) {', '.join(sorted(unknown))}")
            if not isinstance(c.get("company_releases", False), bool):
                problems.append(f"{where}: category {name!r}: 'company_releases' must be true or false")
            soften = c.get("soften", default_soften)
            if not isinstance(soften, list) or set(soften) - set(self.lowers_to):
                problems.append(f"{where}: category {name!r}: 'soften' must list some of {', '.join(self.lowers_to)}")
                soften = []
            self.categories[name] = Category(
                name,
                frozenset(soften),
                frozenset(c.get("covers") or ()),
                c.get("parent"),
                c.get("company_releases") is True,
            )
            specs.append((f"sign:{name}", c["rules"]))
            if c.get("caution_rules"):
                specs.append((f"caution:{name}", c["caution_rules"]))
            if c.get("mentions"):
                specs.append((f"mention:{name}", c["mentions"]))
        for name, cat in self.categories.items():
            wrong = sorted((cat.covers | ({cat.parent} if cat.parent else set())) - set(self.categories))
            if wrong:
                problems.append(f"{where}: category {name!r} names unknown categories in covers/parent: {wrong}")
        for name, items in rules_of.items():
            specs.append((f"mod:{name}", items))
        for name in _ATTENDED:
            if not isinstance(spec.get(name), list):
                problems.append(f"{where}: '{name}' must be a list of rules")
                continue
            specs.append((f"{name}:", spec[name]))
        for name in _OPTIONAL:
            if not isinstance(spec.get(name, []), list):
                problems.append(f"{where}: '{name}' must be a list of rules")
                continue
            specs.append((f"{name}:", spec.get(name, [])))
        self.rewrites: list[tuple[re.Pattern, str]] = []
        for i, pair in enumerate(spec.get("rewrites") or []):
            try:
                pattern, repl = pair
                self.rewrites.append((re.compile(pattern), repl))
            except (ValueError, TypeError, re.error) as e:
                problems.append(f"{where}: rewrites[{i}] must be [regular expression, replacement] ({e})")
        if problems:
            raise ConfigError(f"{where}: invalid triage rules", problems)
        rules: list[dict] = []
        for prefix, items in specs:
            for r in items:
                rules.append({**r, "name": f"{prefix}:{len(rules)}"} if isinstance(r, dict) else r)
        self.rules = RuleSet.from_spec(rules, spec.get("concepts"), where, spec.get("protected"))

    def rewrite(self, text: str) -> str:
        """``text`` (already read: lower case, no accents) with the file's phrase rewrites applied."""
        for pattern, repl in self.rewrites:
            text = pattern.sub(repl, text)
        return text

    def find(self, text: str) -> Findings:
        """The categories, modifiers and attended words in ``text`` (read and rewritten)."""
        found: dict[str, set[str]] = {"sign": set(), "caution": set(), "mention": set(), "mod": set()}
        seen = set()
        for rule in self.rules.matching(text):
            kind, name, _ = rule.name.split(":")
            if kind in found:
                found[kind].add(name)
            else:
                seen.add(kind)
        return Findings(
            frozenset(found["sign"]),
            frozenset(found["caution"]),
            frozenset(found["mod"]),
            "attended" in seen and "not_attended" not in seen,
            frozenset(found["mention"]),
            "company" in seen and "not_attended" not in seen,
        )

    def resolve(self, names: set[str] | frozenset[str]) -> str | None:
        """The one category whose advice fits all of ``names`` (one that covers the others), or None."""
        left = {n for n in names if not any(n in self.categories[o].covers for o in names if o != n)}
        return next(iter(left)) if len(left) == 1 else None
