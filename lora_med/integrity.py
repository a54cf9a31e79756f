"""An export's files proven against its manifest before they are used.

``manifest.json`` records every file's size and SHA-256. Sizes are compared at every read of the card (a stat per
file: a cut copy is named at once); hashes when an export is opened to be used (``lora-med serve``, ``bench``,
``load_engine``): a graph with a few KB overwritten keeps its size, loads, and answers nonsense, so only its bytes
tell. Each file is read once per process: one proven earlier and unchanged since (same size, modification and
change time, inode) is not read again, so serve's resolution and its engine load hash the graph once.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import LoraMedError
from .fileio import sha256_file

# (real path, size, mtime_ns, ctime_ns, inode) -> True: files proven in this process. ctime cannot be set back by a
# user (touch -r sets mtime only), so an edit after the proof always shows.
_PROVEN: dict[tuple, bool] = {}


@dataclass(frozen=True)
class Verified:
    """What a verification did: files and bytes proven, how many were read now (the rest were proven earlier in
    this process), and the seconds it took."""

    files: int
    bytes: int
    read: int
    seconds: float

    def line(self) -> str:
        """One line for a log or a report: what was proven and what it cost."""
        again = f" ({self.files - self.read} proven earlier in this process)" if self.read < self.files else ""
        return (
            f"{self.files} file(s), {self.bytes / 1e6:.1f} MB, checked against the manifest's SHA-256 in "
            f"{self.seconds:.2f}s{again}"
        )

    def as_dict(self) -> dict:
        return {"files": self.files, "mb": round(self.bytes / 1e6, 2), "read": self.read, "seconds": self.seconds}


def size_problems(folder: Path, files) -> list[str]:
    """Files of an export whose size is not the one its manifest records (a cut copy, an edit), or gone."""
    if not isinstance(files, dict):
        return []
    out = []
    for rel, info in files.items():
        want = info.get("bytes") if isinstance(info, dict) else None
        if not isinstance(want, int):
            continue
        p = folder / rel
        if not p.is_file():
            out.append(f"{p} is missing")
        elif (size := p.stat().st_size) != want:
            out.append(f"{p} has {size:,} bytes, the manifest says {want:,}")
    return out


def _key(p: Path) -> tuple:
    st = p.stat()
    return (os.path.realpath(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def verify_export(folder: str | Path, manifest: dict, subdirs: tuple[str, ...] | None = None) -> Verified:
    """Prove the files of export ``folder`` under ``subdirs`` (every file when None) against ``manifest``'s SHA-256.

    Raises:
        LoraMedError: a file is missing, or its bytes differ from what the manifest records (each named, with the
            fix); a manifest that records no files is refused too (nothing could be proven).
    """
    folder = Path(folder)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise LoraMedError(
            f"{folder / 'manifest.json'}: lists no files with their SHA-256, so nothing can be proven; export "
            "again with `lora-med merge-export`"
        )
    chosen = {
        rel: info
        for rel, info in files.items()
        if subdirs is None or any(rel.startswith(sub.rstrip("/") + "/") for sub in subdirs)
    }
    t0 = time.perf_counter()
    bad, total, read = [], 0, 0
    for rel, info in sorted(chosen.items()):
        p = folder / rel
        want = info.get("sha256") if isinstance(info, dict) else None
        if not isinstance(want, str):
            bad.append(f"{folder / 'manifest.json'}: no SHA-256 recorded for {rel}; export again")
            continue
        if not p.is_file():
            bad.append(f"{p}: missing (listed in the manifest); copy the whole export again, or export again")
            continue
        key = _key(p)
        total += key[1]
        if key in _PROVEN:
            continue
        read += 1
        if sha256_file(p) != want:
            bad.append(
                f"{p}: its bytes differ from the SHA-256 the manifest records (damaged or edited after the "
                "export); copy the export again, or run `lora-med merge-export` again"
            )
        elif _key(p) == key:  # unchanged while it was read
            _PROVEN[key] = True
    if bad:
        raise LoraMedError(f"{folder}: {len(bad)} file(s) of the export cannot be trusted:", bad)
    return Verified(len(chosen), total, read, round(time.perf_counter() - t0, 3))


def export_root(folder: str | Path) -> tuple[Path, str] | None:
    """(the export, the subfolder) when ``folder`` is a subfolder of a lora-med export (its ``engine/``,
    ``merged/`` or ``onnx/``), else None."""
    real = Path(os.path.realpath(folder))
    if real.name in ("engine", "merged", "onnx") and (real.parent / "manifest.json").is_file():
        return real.parent, real.name
    return None
