"""The triage of ``lora-med serve``: every message gets a tier (emergency, caution, none) before the model.

Modules: normalize (how text is read), rules (categories of signs and modifiers, configs/triage.yaml),
learned (the character n-gram model beside the rules), advice (one line per category,
configs/triage-advice.yaml), core (``Triage``: tiers, carry-over, replies), training (rebuilding the model).
"""

from .core import TIERS, Assessment, Triage, Verdict

__all__ = ["TIERS", "Assessment", "Triage", "Verdict"]
