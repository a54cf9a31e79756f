"""Logs as JSON lines, without message text, with phone and CI numbers masked.

The server logs what happened to each request (status, action, guard sign, timings, token counts) and
never what the patient wrote or what was replied. Every string that reaches a log line, uvicorn's own
included, passes through ``mask``: any run of 6+ digits (a phone number, a CI) keeps only its last two.
"""

from __future__ import annotations

import json
import logging
import re
import time

LOGGER = "lora_med.serve"
# 6+ digits, maybe split by spaces or dashes (+591 7012-3456); dots and slashes are left alone (IPs, dates), and
# so are digits inside a hex token (the triage's "triage.yaml@350909e685ce", a SHA-256), which are no person's
_NUMBER = re.compile(r"(?<![0-9a-fA-F])\+?\d(?:[ -]?\d){5,}(?![0-9A-Za-z])")


def mask(text: str) -> str:
    """``+59170123456`` -> ``+*********56``; ``6543210 SC`` -> ``*****10 SC``."""

    def hide(m: re.Match) -> str:
        s = m.group()
        digits = [i for i, c in enumerate(s) if c.isdigit()]
        keep = set(digits[-2:])
        return "".join("*" if c.isdigit() and i not in keep else c for i, c in enumerate(s))

    return _NUMBER.sub(hide, text)


def _masked(value):
    if isinstance(value, str):
        return mask(value)
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_masked(v) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, and the record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        ts = out.pop("ts")
        return json.dumps({"ts": ts, **_masked(out)}, ensure_ascii=False, default=str)


def log(event: str, level: int = logging.INFO, exc_info: BaseException | None = None, **fields) -> None:
    """Log ``event`` with ``fields`` (never message text) through the server's logger."""
    logging.getLogger(LOGGER).log(level, event, exc_info=exc_info, extra={"fields": fields})


def logging_config(log_file: str | None) -> dict:
    """A ``logging.config.dictConfig`` for uvicorn and the server: JSON lines to ``log_file`` or stderr.
    uvicorn's access log is off: the server logs each request itself, with its masked fields."""
    handler = (
        {"class": "logging.FileHandler", "filename": log_file, "encoding": "utf-8"}
        if log_file
        else {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}
    )
    handler["formatter"] = "json"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": f"{__name__}.JsonFormatter"}},
        "handlers": {"json": handler},
        "loggers": {
            "uvicorn": {"handlers": ["json"], "level": "INFO", "propagate": False},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
            LOGGER: {"handlers": ["json"], "level": "INFO", "propagate": False},
            # the PostgreSQL pool's reconnect failures (--store), in the same JSON lines
            "psycopg": {"handlers": ["json"], "level": "WARNING", "propagate": False},
        },
    }
