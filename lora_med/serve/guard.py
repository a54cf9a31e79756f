"""The emergency guard: messages with emergency signs never reach the model.

A message that matches any rule of the guard's YAML (``configs/emergency.yaml``) is answered with the
clinic's emergency instruction (call 118 now or go to the nearest emergency room; never a booking
question) and ``action: "emergency"``. The rules favour recall: a false alarm costs one reply, a miss
may cost a life. ``python -m lora_med.serve.guard CASES.yaml`` prints recall and false alarms on a case
list (tests/data/guard_cases.yaml).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .config import read_yaml
from .config import resolve_path
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
        advice = spec.get("advice") or {}
        if not isinstance(advice, dict):
            problems.append(f"{where}: 'advice' must map rule names to one line each")
            advice = {}
        if problems:
            raise ConfigError(f"{where}: invalid emergency rules", problems)
        self.rules = RuleSet.from_spec(spec.get("rules"), spec.get("concepts"), where)
        missing = sorted({r.name for r in self.rules.rules} - set(advice))
        if missing:
            raise ConfigError(f"{where}: 'advice' has no line for rule(s) {', '.join(missing)}")
        self._replies = {name: " ".join(reply.format(advice=line).split()) for name, line in advice.items()}

    def check(self, message: str) -> GuardHit | None:
        """The emergency reply for ``message``, or None when it shows no emergency sign."""
        rule = self.rules.first(message)
        return GuardHit(rule.name, self._replies[rule.name]) if rule else None


def evaluate(guard: Guard, cases: dict[str, list[str]]) -> dict:
    """Recall on the ``*emergency`` lists and false alarms on the ``*ordinary`` lists of ``cases``.

    Returns one entry per list: counts, the rate, and the messages the guard got wrong.
    """
    out = {}
    for name, messages in cases.items():
        want = name.endswith("emergency")
        wrong = [m for m in messages if (guard.check(m) is not None) != want]
        hits = len(messages) - len(wrong) if want else len(wrong)
        out[name] = {"messages": len(messages), "flagged": hits, "rate": hits / len(messages) if messages else 0.0,
                     "measures": "recall" if want else "false alarms", "wrong": wrong}
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
