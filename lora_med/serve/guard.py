"""The emergency guard: messages with emergency signs never reach the model.

A message that matches any rule of the guard's YAML (``configs/emergency.yaml``) is answered with the
clinic's emergency instruction (call 118 now or go to the nearest emergency room; never a booking
question) and ``action: "emergency"``. The rules favour recall: a false alarm costs one reply, a miss
may cost a life. One exception, the file's ``history`` section: a sign patients carry as history, told to
book a check-up ("el año pasado tuve un infarto, necesito mi control") with no word of now, reaches the model
(a cardiology clinic gets these every day). ``python -m lora_med.serve.guard CASES.yaml`` prints recall and
false alarms on a case list (tests/data/guard_cases.yaml).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .config import read_yaml, resolve_path
from .matcher import RuleSet


@dataclass(frozen=True)
class GuardHit:
    rule: str  # the sign's name (chest_pain, breathing, ...), for logs and metrics
    reply: str  # the emergency instruction sent to the patient


class Guard:
    """Emergency rules loaded from YAML (``reply`` with ``{advice}``, ``concepts``, ``rules``, ``advice``)."""

    def __init__(self, path: str | Path):
        spec = read_yaml(path, "--emergency")
        where = str(path)
        problems = []
        reply = spec.get("reply")
        if not isinstance(reply, str) or "118" not in reply:
            problems.append(f"{where}: 'reply' must be the emergency instruction text and name 118")
            reply = ""  # refused below, with the other problems
        advice = spec.get("advice") or {}
        if not isinstance(advice, dict):
            problems.append(f"{where}: 'advice' must map rule names to one line each")
            advice = {}
        if problems:
            raise ConfigError(f"{where}: invalid emergency rules", problems)
        self.rules = RuleSet.from_spec(spec.get("rules"), spec.get("concepts"), where)
        self.history = _History.from_spec(spec.get("history"), spec.get("concepts"), where)
        if self.history is not None and self.history.signs - {r.name for r in self.rules.rules}:
            raise ConfigError(
                f"{where}: 'history.signs' names no rule: "
                f"{', '.join(sorted(self.history.signs - {r.name for r in self.rules.rules}))}"
            )
        missing = sorted({r.name for r in self.rules.rules} - set(advice))
        if missing:
            raise ConfigError(f"{where}: 'advice' has no line for rule(s) {', '.join(missing)}")
        self._replies = {name: " ".join(reply.format(advice=line).split()) for name, line in advice.items()}

    def check(self, message: str) -> GuardHit | None:
        """The emergency reply for ``message``, or None when it shows no emergency sign (or tells one as past
        history, to book a check-up: see ``history`` in the rules file)."""
        matched = self.rules.matching(message)
        if not matched or (self.history is not None and self.history.told_as_past(message, matched)):
            return None
        return GuardHit(matched[0].name, self._replies[matched[0].name])


@dataclass(frozen=True)
class _History:
    """A sign told as history ("el año pasado tuve un infarto, necesito mi control"): every rule the message
    matched is one of ``signs``, and it has a past marker, a routine-care request, and nothing that says now."""

    signs: frozenset[str]
    past: RuleSet
    routine: RuleSet
    now: RuleSet

    @classmethod
    def from_spec(cls, spec: object, concepts: object, where: str) -> _History | None:
        if spec is None:
            return None
        keys = ("past", "routine", "now")
        if not isinstance(spec, dict) or set(spec) != {"signs", *keys}:
            raise ConfigError(
                f"{where}: 'history' must have 'signs' (rule names) and the rule lists 'past', 'routine' and 'now'"
            )
        signs = spec["signs"]
        if not isinstance(signs, list) or not all(isinstance(x, str) for x in signs):
            raise ConfigError(f"{where}: 'history.signs' must be a list of rule names")
        return cls(frozenset(signs), *(RuleSet.from_spec(spec[k], concepts, f"{where} history.{k}") for k in keys))

    def told_as_past(self, message: str, matched: list) -> bool:
        return (
            all(r.name in self.signs for r in matched)
            and self.past.first(message) is not None
            and self.routine.first(message) is not None
            and self.now.first(message) is None
        )


def evaluate(guard: Guard, cases: dict[str, list[str]]) -> dict:
    """Recall on the ``*emergency`` lists and false alarms on the ``*ordinary`` lists of ``cases``.

    Returns one entry per list: counts, the rate, and the messages the guard got wrong.
    """
    out = {}
    for name, messages in cases.items():
        want = name.endswith("emergency")
        wrong = [m for m in messages if (guard.check(m) is not None) != want]
        hits = len(messages) - len(wrong) if want else len(wrong)
        out[name] = {
            "messages": len(messages),
            "flagged": hits,
            "rate": hits / len(messages) if messages else 0.0,
            "measures": "recall" if want else "false alarms",
            "wrong": wrong,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    """Print recall and false alarms of the guard on a case file (and the misses)."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m lora_med.serve.guard CASES.yaml [EMERGENCY_RULES.yaml]", file=sys.stderr)
        return 2
    guard = Guard(resolve_path(args[1] if len(args) > 1 else "configs/emergency.yaml"))
    for name, r in evaluate(guard, read_yaml(args[0], "cases")).items():
        print(f"{name:20s} {r['measures']:12s} {r['flagged']}/{r['messages']} = {100 * r['rate']:.1f}%")
        for m in r["wrong"]:
            print(f"    {'missed' if r['measures'] == 'recall' else 'false alarm'}: {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
