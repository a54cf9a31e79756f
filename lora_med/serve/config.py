"""Settings of ``lora-med serve`` (declared in ``lora_med/config.py``), checked before anything loads."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from .. import runs, settings
from ..config import ServeConfig, shipped
from ..errors import ConfigError
from ..settings import describe, name

__all__ = ["ServeConfig", "check", "read_yaml", "resolve_path"]


def check(cfg: ServeConfig) -> None:
    """Validate every setting; raise one ConfigError listing all problems, each named as the user gave it.

    Raises:
        ConfigError: any setting is invalid.
    """
    p = settings.check(cfg)
    if p:
        raise runs.problems_error("with the serve settings; nothing was started", p)
    if not cfg.model:
        p.append("EXPORT_DIR: give the folder to serve (a merge-export output or an HF model folder)")
    elif not Path(cfg.model).is_dir():
        p.append(
            f"EXPORT_DIR {cfg.model}: no such folder; give a `lora-med merge-export` output (exports/...) "
            "or a Hugging Face model folder"
        )
    for field in ("intents", "emergency", "facts", "replies"):
        if not resolve_path(getattr(cfg, field)).is_file():
            p.append(f"{describe(cfg, field)}: file not found")
    missing = [w for w in cfg.words if not resolve_path(w).is_file()]
    if missing:
        p.append(f"{describe(cfg, 'words')}: file(s) not found: {', '.join(missing)}; give conversation files")
    if cfg.now is not None:
        try:
            datetime.fromisoformat(cfg.now)
        except ValueError:
            p.append(f"{describe(cfg, 'now')}: not a date; write YYYY-MM-DD or YYYY-MM-DDTHH:MM")
    db = Path(cfg.db)
    if cfg.store:
        if not cfg.store.startswith(("postgresql://", "postgres://")):
            p.append(
                f"{name(cfg, 'store')}: give a PostgreSQL URL, postgresql://user:password@host:5432/dbname "
                "(or leave it unset for the SQLite file --db)"
            )
    elif db.is_dir():
        p.append(f"{describe(cfg, 'db')}: is a directory; give a file path such as {db / 'serve.db'}")
    elif not db.parent.resolve().is_dir():
        p.append(f"{describe(cfg, 'db')}: folder {db.parent} does not exist; create it first")
    elif problem := runs.unwritable(db.parent.resolve()):
        p.append(f"{describe(cfg, 'db')}: its folder is not writable ({problem})")
    if cfg.log_file and not Path(cfg.log_file).resolve().parent.is_dir():
        p.append(f"{name(cfg, 'log_file')} {cfg.log_file}: folder {Path(cfg.log_file).parent} does not exist")
    if p:
        raise runs.problems_error("with the serve settings; nothing was started", p)


def resolve_path(path: str | Path) -> Path:
    """``path`` from the working directory; the shipped configs/ files also from the checkout (found anywhere)."""
    return shipped(str(path))


def read_yaml(path: str | Path, flag: str) -> dict[str, Any]:
    """A YAML mapping from ``path``; errors name ``flag`` and the file.

    Raises:
        ConfigError: the file is missing, unreadable, not YAML, or not a mapping.
    """
    try:
        data = settings.yaml_load(resolve_path(path))
    except ConfigError as e:
        raise ConfigError(f"{flag} {e}".replace("--config ", "", 1)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{flag} {path}: expected a mapping at the top level")
    return data
