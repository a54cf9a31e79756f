"""User-facing errors.

Every mistake a user can make (a bad file, a bad flag, a missing model) is raised as a
``LoraMedError``. The CLI prints its message and exits non-zero without a traceback; anything
else that escapes is a bug in lora-med and keeps its traceback.
"""

from __future__ import annotations


def first_line(e: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (cut to ``limit``), safe on an empty message: how an error from a
    library is quoted inside a lora-med message."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:limit] if lines else '(no message)'}"


class LoraMedError(Exception):
    """A problem the user can fix. ``problems`` holds one line per problem found."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class DatasetError(LoraMedError):
    """A conversation file is malformed. The message names the file, the row and the field."""


class ConfigError(LoraMedError):
    """One or more settings are invalid. All of them are reported together."""


class GateError(LoraMedError):
    """A check (parity, quality or latency gate) failed. The message carries the figures; ``figures`` holds them
    as measured, for the record of what failed (a failed export's manifest)."""

    def __init__(self, message: str, problems: list[str] | None = None, *, figures: dict | None = None):
        super().__init__(message, problems)
        self.figures = dict(figures or {})
