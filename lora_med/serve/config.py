"""Settings of ``lora-med serve``: one dataclass, validated before anything loads."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ServeConfig:
    """Settings of ``lora-med serve`` (also the keys of its ``--config`` YAML)."""

    # model
    model: str = ""  # a merge-export folder (its engine/ or merged/) or an HF model folder; the positional EXPORT_DIR
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # CPU threads for generation; None: the engine's default
    max_new_tokens: int = 40  # longest reply in tokens; a reply stops earlier at EOS
    no_repeat_ngram_size: int = 3  # never repeat an n-gram in a reply (0: off); small models loop without it
    do_sample: bool = False  # greedy (the default) or sampling
    temperature: float = 1.0  # sampling only
    top_p: float = 1.0  # sampling only
    # server
    host: str = "127.0.0.1"  # address to listen on (0.0.0.0 exposes it to the network)
    port: int = 8000  # TCP port; 0 picks a free one (logged in the "ready" line)
    # conversations
    db: str = "lora-med-serve.db"  # SQLite file (WAL mode) holding every turn; history survives restarts
    idle_minutes: float = 30.0  # a message after this much silence starts a new conversation
    intents: str = "configs/intents.yaml"  # rules deriving `action` and `params.status`
    emergency: str = "configs/emergency.yaml"  # the emergency guard's rules and reply
    # limits
    max_message_chars: int = 1000  # longer messages get 422
    rate_limit: int = 20  # messages per user per rate_window_s (0: no limit); emergencies are never limited
    rate_window_s: float = 60.0  # the rate limit's window in seconds
    max_batch: int = 8  # most prompts generated together
    batch_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    queue_size: int = 64  # requests waiting for the model beyond this get 503
    request_timeout_s: float = 30.0  # a reply not ready by then gets 504
    log_file: str | None = None  # JSON-lines log file; None: stderr

    def check(self) -> None:
        """Validate every setting; raise one ConfigError listing all problems.

        Raises:
            ConfigError: any setting is invalid (named as its flag).
        """
        p = _check_types(self)
        if p:
            raise ConfigError("invalid settings for lora-med serve", p)
        if not self.model:
            p.append("EXPORT_DIR: give the folder to serve (a merge-export output or an HF model folder)")
        elif not Path(self.model).is_dir():
            p.append(f"EXPORT_DIR {self.model}: no such folder; give a `lora-med merge-export` output (exports/...) "
                     "or a Hugging Face model folder")
        if self.device not in DEVICES:
            p.append(f"--device {self.device}: use one of {', '.join(DEVICES)}")
        for name, low in (("max_new_tokens", 1), ("no_repeat_ngram_size", 0), ("max_message_chars", 1),
                          ("rate_limit", 0), ("max_batch", 1), ("queue_size", 1), ("threads", 1)):
            v = getattr(self, name)
            if v is not None and v < low:
                p.append(f"{_flag(name)} {v}: must be >= {low}")
        for name in ("temperature", "idle_minutes", "rate_window_s", "request_timeout_s"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                p.append(f"{_flag(name)} {v}: must be a number > 0")
        if not (0 <= self.batch_wait_ms <= 1000):
            p.append(f"--batch-wait-ms {self.batch_wait_ms}: must be in [0, 1000]")
        if not 0 < self.top_p <= 1:
            p.append(f"--top-p {self.top_p}: must be in (0, 1]")
        if not 0 <= self.port <= 65535:
            p.append(f"--port {self.port}: must be in 0..65535")
        for name in ("intents", "emergency"):
            if not resolve_path(getattr(self, name)).is_file():
                p.append(f"{_flag(name)} {getattr(self, name)}: file not found")
        db = Path(self.db)
        if db.is_dir():
            p.append(f"--db {self.db}: is a directory; give a file path such as {db / 'serve.db'}")
        elif not db.parent.resolve().is_dir():
            p.append(f"--db {self.db}: folder {db.parent} does not exist; create it first")
        elif not os.access(db.parent.resolve(), os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            p.append(f"--db {self.db}: not writable")
        if self.log_file and not Path(self.log_file).resolve().parent.is_dir():
            p.append(f"--log-file {self.log_file}: folder {Path(self.log_file).parent} does not exist")
        if p:
            raise ConfigError("invalid settings for lora-med serve", p)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_types(cfg: ServeConfig) -> list[str]:
    """Type problems; numeric strings from YAML (``1e-3`` is a string to PyYAML) become numbers in place."""
    problems = []
    for f in dataclasses.fields(cfg):
        v, kind = getattr(cfg, f.name), str(f.type)
        if v is None and "None" in kind:
            continue
        base = kind.split("|")[0].strip()
        if base in ("int", "float"):
            if isinstance(v, str):
                try:
                    v = float(v)
                except ValueError:
                    pass
            if isinstance(v, float) and base == "int" and v.is_integer():
                v = int(v)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (base == "float" or isinstance(v, int))
            if ok:
                setattr(cfg, f.name, float(v) if base == "float" else v)
            else:
                problems.append(f"{_flag(f.name)} {v!r}: must be {'a whole number' if base == 'int' else 'a number'}")
        elif base == "bool" and not isinstance(v, bool):
            problems.append(f"{_flag(f.name)} {v!r}: must be true or false")
        elif base == "str" and not isinstance(v, str):
            problems.append(f"{_flag(f.name)} {v!r}: must be a string")
    return problems


def resolve_path(path: str | Path) -> Path:
    """``path`` from the working directory, else from the lora-med checkout (so configs/ is found anywhere)."""
    from ..models import REPO_ROOT  # here, not at the top: models imports torch, and --help should not wait

    p = Path(path)
    return p if p.exists() or p.is_absolute() or not (REPO_ROOT / p).exists() else REPO_ROOT / p


def read_yaml(path: str | Path, flag: str) -> dict[str, Any]:
    """A YAML mapping from ``path``; errors name ``flag`` and the file.

    Raises:
        ConfigError: the file is missing, unreadable, not YAML, or not a mapping.
    """
    p = resolve_path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot be read ({e.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag} {path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{flag} {path}: expected a mapping at the top level")
    return data
