"""Run cards and config plumbing shared by every command.

A run card is a small JSON file next to a stage's outputs (``run.json`` for train,
``manifest.json`` for merge-export, ``report.json`` for bench): what produced the outputs, with
which versions, data, seed and device, and what was measured. The next stage reads it back
instead of asking the user again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, LoraMedError


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LoraMedError(f"{path}: missing; {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoraMedError(f"{path}: not valid JSON ({e}); {what}") from None
    if not isinstance(data, dict):
        raise LoraMedError(f"{path}: expected a JSON object; {what}")
    return data


def load_config(cls, config_file: str | Path | None, overrides: dict[str, Any], defaults: dict | None = None):
    """Build config dataclass ``cls``: ``defaults`` (e.g. a resumed run's settings), then a YAML file,
    then flags on top (flags left as None are unset).

    Raises:
        ConfigError: the YAML file is unreadable or names a key ``cls`` does not have.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {k: v for k, v in (defaults or {}).items() if k in names}
    if config_file:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as e:
            raise ConfigError(f"--config {path}: cannot be read ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: invalid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: expected a mapping of settings")
        unknown = [k for k in loaded if k.replace("-", "_") not in names]
        if unknown:
            raise ConfigError(f"--config {path}: unknown setting(s): {', '.join(map(str, unknown))}; "
                              f"known: {', '.join(sorted(names))}")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def config_dict(cfg) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
