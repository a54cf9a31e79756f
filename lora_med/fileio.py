"""Reading and writing files safely: bounded reads of regular files only, atomic JSON writes, hashes.

A FIFO, a device such as /dev/zero or a 40 GB file given where a small text file belongs must end in
a clear error, not a hang or an out-of-memory; a JSON file is replaced in one rename, so a reader
sees the old one or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from .errors import LoraMedError

MAX_TEXT_BYTES = 1 << 30  # 1 GiB: far above any conversation file or card; a bound, not a budget


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_beside(path: Path) -> tuple[int, str]:
    """A temporary file next to ``path`` with the permissions a plain open() would give (mkstemp's are 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_regular(path: str | Path, what: str, *, limit: int = MAX_TEXT_BYTES, error=LoraMedError) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes.

    Raises:
        ``error`` (a LoraMedError class): missing, a folder, not a regular file (FIFO, device), too large,
        or unreadable; the message starts with the path and says what was expected (``what``).
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise error(f"{path}: file not found; {what}") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror}); {what}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path}: is a directory; {what}")
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a device or special file"
        raise error(f"{path}: is {kind}, not a regular file; {what}")
    if st.st_size > limit:
        raise error(f"{path}: {st.st_size:,} bytes, more than the {limit:,} allowed; {what}")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror}); {what}") from None
    if len(data) > limit:  # grew while being read
        raise error(f"{path}: more than {limit:,} bytes; {what}")
    return data


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write text atomically: written beside the file, then renamed over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: str | Path, what: str) -> dict:
    """A JSON object from a regular file; LoraMedError naming the file (and ``what`` to do) otherwise."""
    path = Path(path)
    raw = read_regular(path, what, limit=256 << 20)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoraMedError(f"{path}: not valid JSON ({e}); {what}") from None
    if not isinstance(data, dict):
        raise LoraMedError(f"{path}: expected a JSON object; {what}")
    return data
