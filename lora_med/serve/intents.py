"""The intent layer: ``action`` and ``params.status`` of a reply, from the message and the conversation so far
(the language model only writes text). The request a new message opens comes from the learned layer
(``intent_model.py``) when the intent file pins one, else from the rules; inside a flow under way the rules
decide. Rules and the status flow are documented in ``configs/intents.yaml``; the emergency action is decided
by the triage (lora_med/serve/triage).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from ..errors import ConfigError
from .config import read_yaml
from .intent_model import IntentModel
from .matcher import RuleSet, normalize
from .store import Turn

Action = Literal[
    "schedule_appointment",
    "reschedule_appointment",
    "cancel_appointment",
    "lab_results",
    "clinic_info",
    "emergency",
    "chat",
]
ACTIONS: tuple[Action, ...] = get_args(Action)
FLOWS: tuple[Action, ...] = ("schedule_appointment", "reschedule_appointment", "cancel_appointment", "lab_results")
NEEDS_IDENTITY: tuple[Action, ...] = ("reschedule_appointment", "cancel_appointment", "lab_results")


def as_action(value: object) -> Action | None:
    """``value`` as one of the actions (from YAML or the store, where it is plain text), or None."""
    return next((a for a in ACTIONS if a == value), None)


EMERGENCY_STATUS = "emergency_referred"

# Identity as the fact sheet's verification asks: a CI-like number and a date of birth.
_CI = re.compile(r"\b\d{5,8}\b")
_MONTHS = "enero|febrero|marzo|abril|mayo|junio|julio|agosto|septiembre|setiembre|octubre|noviembre|diciembre"
_DATE = re.compile(
    rf"\b\d{{1,2}} \d{{1,2}} (19|20)?\d{{2}}\b|\b\d{{1,2}} (de )?({_MONTHS})( de| del)? (19|20)\d{{2}}\b"
)


@dataclass(frozen=True)
class Decision:
    action: Action
    status: str


class Intents:
    """Rules loaded from ``configs/intents.yaml``."""

    def __init__(self, path: str | Path, learned: bool = True):
        """``learned=False``: the rules alone, even where the file pins a learned layer (for measuring them)."""
        spec = read_yaml(path, "--intents")
        where = str(path)
        concepts = spec.get("concepts")
        protected = spec.get("protected")  # words never read as a typo of a rule's word (matcher.py)
        problems = []
        self.intents: list[tuple[Action, RuleSet]] = []
        for i, item in enumerate(spec.get("intents") or []):
            action = as_action(item.get("action") if isinstance(item, dict) else None)
            if action is None or action in ("emergency", "chat"):
                problems.append(
                    f"{where} intents[{i}]: action must be one of "
                    f"{', '.join(a for a in ACTIONS if a not in ('emergency', 'chat'))}"
                )
                continue
            self.intents.append(
                (action, RuleSet.from_spec(item.get("rules"), concepts, f"{where} {action}", protected))
            )
        if not self.intents:
            problems.append(f"{where}: 'intents' must list at least one action with its rules")
        fallback = spec.get("fallback_reply")
        if not isinstance(fallback, str) or not fallback.strip():
            problems.append(f"{where}: 'fallback_reply' must be the text sent when the model's reply is empty")
            fallback = ""  # refused below, with the other problems
        pin = spec.get("learned")
        if pin is not None and not (isinstance(pin, dict) and isinstance(pin.get("file"), str)):
            problems.append(f"{where}: 'learned' must name the model 'file' and its 'sha256'")
        if problems:
            raise ConfigError(f"{where}: invalid intent rules", problems)
        self.model = IntentModel.load(Path(path).parent / pin["file"], pin.get("sha256")) if pin and learned else None
        self.version = self.model.version if self.model else "rules only"  # for /health and the ready line
        self.restart = RuleSet.from_spec(spec.get("restart"), concepts, f"{where} restart")
        self.confirm = RuleSet.from_spec(spec.get("confirm"), concepts, f"{where} confirm")
        self.asks_confirmation = RuleSet.from_spec(
            spec.get("asks_confirmation"), concepts, f"{where} asks_confirmation"
        )
        self.fallback_reply = " ".join(fallback.split())

    def wants_restart(self, message: str) -> bool:
        """True when the patient asks to start the conversation over."""
        return self.restart.first(message) is not None

    def intent(self, message: str) -> Action | None:
        """The first action whose rules match ``message``, or None."""
        return next((action for action, rules in self.intents if rules.first(message)), None)

    def opens(self, message: str) -> Action | None:
        """The request ``message`` opens when no flow is under way: the learned layer's, else the rules'."""
        if self.model is None:
            return self.intent(message)
        action = as_action(self.model.predict(message))
        return None if action == "chat" else action

    def decide(self, message: str, history: list[Turn]) -> Decision:
        """``action`` and ``params.status`` for ``message`` after ``history`` (this conversation's earlier turns)."""
        flow, flow_start = _active_flow(history)
        detected = self.intent(message) if flow is not None else self.opens(message)
        action: Action
        if detected is not None and detected in FLOWS:
            action = detected
        elif detected is None and flow is not None:
            action = flow  # "el martes a las 10" continues the booking
        else:
            return Decision(detected or "chat", "answered")
        if action == flow:
            last = next((t for t in reversed(history) if t.role == "assistant"), None)
            if last is not None and self.asks_confirmation.first(last.content) and self.confirm.first(message):
                return Decision(action, "confirmed")
        if action in NEEDS_IDENTITY:
            said = [t.content for t in history[flow_start if action == flow else len(history) :] if t.role == "user"]
            if not identity_given([*said, message]):
                return Decision(action, "verifying_identity")
            return Decision(action, "identity_verified" if action == "lab_results" else "collecting_info")
        return Decision(action, "collecting_info")


def _active_flow(history: list[Turn]) -> tuple[Action | None, int]:
    """The booking flow the conversation is in (the latest flow action not yet confirmed) and the index of
    its first turn. Information questions in between do not end it; a confirmation or an emergency does."""
    flow: Action | None = None
    start = 0
    for i in range(len(history) - 1, -1, -1):
        t = history[i]
        if t.role != "assistant" or t.action in (None, "clinic_info", "chat"):
            continue
        action = as_action(t.action)
        if action is None or action not in FLOWS or t.status == "confirmed":
            break
        if flow is None:
            flow = action
        elif action != flow:
            break
        start = max(0, i - 1)  # the user turn that opened this reply
    return flow, start


def identity_given(messages: list[str]) -> bool:
    """True when the messages hold a CI-like number and a date of birth between them."""
    text = " ".join(normalize(m) for m in messages)
    # a date's own digits ("12 08 1990") are not a CI
    return bool(_DATE.search(text)) and bool(_CI.search(_DATE.sub(" ", text)))
