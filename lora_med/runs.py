"""Run artefacts: the folders lora-med writes, their cards, their locks, and what the next stage reads back.

* **Cards.** Every output folder holds a small JSON card (``run.json`` for train, ``manifest.json`` for
  merge-export, ``report.json`` for bench): what produced it, with which settings, data and versions,
  and what was measured. ``load_card`` reads one and checks its folder, kind and status, saying what to do
  when one is off; ``cards.py`` gives it to the readers typed, every field checked.
* **Ownership.** Every folder lora-med creates holds a marker (``.lora-med``) naming its kind and the
  entries lora-med wrote there. ``--overwrite`` removes exactly those entries and only from a folder of
  the right kind; it refuses the working directory, an input (the data, the base, the run being exported),
  a parent of an input and a folder holding anything else, naming what is in the way.
* **Locks.** One process at a time per output (``.lock`` with the holder's pid and start time); a lock
  left by a process that is gone (kill -9) is noticed and taken over.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import zipfile
from pathlib import Path

from .errors import ConfigError, LoraMedError
from .fileio import read_json, write_json
from .integrity import size_problems
from .weights import safetensors_problem

MARKER = ".lora-med"
LOCK = ".lock"
CARDS = {"train": "run.json", "export": "manifest.json", "bench": "report.json"}
WORDS = {"train": "training run", "export": "export", "bench": "bench report"}
MAKERS = {"train": "lora-med train", "export": "lora-med merge-export", "bench": "lora-med bench"}
_TMP = re.compile(r"^\..+\.tmp$")  # write_json's temporary files


def problems_error(what: str, problems: list[str], cls=ConfigError) -> LoraMedError:
    """One error listing every problem: "N problem(s) <what>:" then one line each."""
    return cls(f"{len(problems)} problem(s) {what}:", problems)


# --------------------------------------------------------------------------- cards


def load_card(folder: str | Path, kind: str, *, complete: bool = True) -> dict:
    """The JSON card of a ``kind`` folder ("train", "export" or "bench"), its folder checked; readers take it
    typed and its fields checked through ``cards.py`` (``TrainCard.read``, ...).

    Raises:
        LoraMedError: the folder or card is missing, unreadable, of another kind, (``complete``) the run/export
            did not finish, or an export's files changed since; the message says what to do.
    """
    folder = Path(folder)
    word, maker = WORDS[kind], MAKERS[kind]
    if not folder.is_dir():
        raise LoraMedError(f"{folder}: no such folder; give the output folder of `{maker}`")
    path = folder / CARDS[kind]
    if not path.exists():
        other = [k for k, f in CARDS.items() if k != kind and (folder / f).is_file()]
        hint = f" (it holds a lora-med {WORDS[other[0]]})" if other else ""
        raise LoraMedError(
            f"{folder}: not a lora-med {word}{hint}: {CARDS[kind]} is missing; give the output folder of `{maker}`"
        )
    card = read_json(path, f"the {word}'s card is damaged: restore it from where it came from, or run `{maker}` again")
    if card.get("kind") != f"lora-med.{kind}":
        raise LoraMedError(
            f"{path}: not a lora-med {word} card (kind {card.get('kind')!r}); give the output folder of `{maker}`"
        )
    if (
        complete
        and kind in ("train", "export")
        and card.get("status") != "complete"
        and isinstance(card.get("status"), str)
    ):
        raise LoraMedError(_unfinished(folder, kind, card))
    if kind == "export" and complete and (changed := size_problems(folder, card.get("files"))):
        raise LoraMedError(
            f"{folder}: the export's files differ from its manifest ({'; '.join(changed[:3])}): it "
            f"was cut or changed after it was made; run `{maker}` again"
        )
    return card


def _unfinished(folder: Path, kind: str, card: dict) -> str:
    status = card["status"]
    if kind == "export":
        return f"{folder}: the export is not complete (status {status!r}); run `lora-med merge-export` again"
    holder = lock_holder(folder / LOCK)
    if status == "running" and holder:
        return f"{folder}: still training (in use by pid {holder}); wait for it to finish"
    why = (
        f"it failed: {card.get('failure', {}).get('reason', 'unknown reason')}"
        if status == "failed"
        else "it was interrupted before finishing"
    )
    return f"{folder}: the run did not finish ({why}); continue it with `lora-med train --resume {shlex.quote(str(folder))}`"


# --------------------------------------------------------------------------- data files, as a card records them


def data_record(path: str | Path, run_dir: Path) -> dict:
    """Where a data file is, for a card: absolute, and relative to the run (so both moves are survivable)."""
    p = Path(path).resolve()
    return {"path": str(p), "relative_to_run": os.path.relpath(p, run_dir.resolve())}


# --------------------------------------------------------------------------- checkpoints


def checkpoint_problem(ckpt: Path) -> str | None:
    """None if a Trainer checkpoint folder is whole, else which file is broken."""
    state = ckpt / "trainer_state.json"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{state}: missing or not valid JSON"
    weights = [f for f in ("adapter_model.safetensors", "model.safetensors") if (ckpt / f).is_file()]
    if not weights and not (ckpt / "model.safetensors.index.json").is_file():
        return f"{ckpt}: no weights (adapter_model.safetensors / model.safetensors)"
    for f in weights:
        if problem := safetensors_problem(ckpt / f):
            return problem
    for f in ("optimizer.pt", "scheduler.pt"):
        if (ckpt / f).exists():
            try:  # torch.save writes a zip archive: a cut file has no central directory
                zipfile.ZipFile(ckpt / f).close()
            except (zipfile.BadZipFile, OSError):
                return f"{ckpt / f}: truncated or corrupt"
    return None


def latest_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[str]]:
    """The newest whole checkpoint of a run, and one line per newer checkpoint skipped as broken.

    Checkpoints are written under checkpoints/.partial and renamed into checkpoints/ once complete, so a
    broken one comes from outside (a cut copy, a full disk): fall back to the previous whole one.
    """
    found = []
    for d in (Path(run_dir) / "checkpoints").glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and d.is_dir():
            found.append((int(m.group(1)), d))
    skipped: list[str] = []
    for _, d in sorted(found, reverse=True):
        problem = checkpoint_problem(d)
        if problem is None:
            return d, skipped
        skipped.append(problem)
    return None, skipped


# --------------------------------------------------------------------------- folders lora-med owns


def marker(folder: Path) -> dict | None:
    try:
        m = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = isinstance(m, dict) and isinstance(m.get("entries"), list) and all(isinstance(e, str) for e in m["entries"])
    return m if ok else None  # a damaged marker: the folder counts as not lora-med's


def claim(folder: Path, kind: str, *entries: str) -> None:
    """Create ``folder`` (if needed) as a lora-med ``kind`` folder that holds ``entries``."""
    folder.mkdir(parents=True, exist_ok=True)
    old = marker(folder) or {}
    names = sorted(set(old.get("entries", [])) | set(entries))
    write_json(folder / MARKER, {"kind": f"lora-med.{kind}", "entries": names})


def record(folder: Path, *entries: str) -> None:
    """Add entries lora-med wrote into ``folder`` to its marker (they may be removed by --overwrite)."""
    m = marker(folder)
    if m is None:
        raise LoraMedError(
            f"{folder}: the .lora-med marker is gone; lora-med will not write into a folder it does not own"
        )
    write_json(folder / MARKER, {**m, "entries": sorted(set(m["entries"]) | set(entries))})


def foreign_entries(folder: Path) -> list[str]:
    """Entries of an owned folder that lora-med did not write."""
    m = marker(folder) or {"entries": []}
    mine = set(m["entries"]) | {MARKER, LOCK}
    return sorted(p.name for p in folder.iterdir() if p.name not in mine and not _TMP.match(p.name))


def clear(folder: Path) -> None:
    """Remove the entries lora-med wrote into ``folder`` (never anything else; the marker stays)."""
    m = marker(folder)
    if m is None:
        raise LoraMedError(f"{folder}: no .lora-med marker; refusing to remove anything there")
    for name in m["entries"]:
        if Path(name).name != name or name in ("", ".", "..", MARKER, LOCK):
            continue  # a damaged or hand-edited marker: never follow it out of the folder (../x, /abs)
        p = folder / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    write_json(folder / MARKER, {**m, "entries": []})


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def real(path: str | Path) -> Path:
    """``path`` with ~ and every link resolved; a link loop resolves to itself (Path.resolve raises on one)."""
    return Path(os.path.realpath(os.path.expanduser(path)))


def output_problems(
    out: Path, kind: str, *, flag: str, inputs: list[tuple[str, Path]], overwrite: bool
) -> tuple[list[str], str]:
    """What stops ``kind`` from writing to ``out``, and the folder's state ("absent" | "empty" | "owned").

    An existing folder of this kind that lora-med wrote is "owned"; whether to replace it (``overwrite``) or
    to say it is taken is the caller's choice. Everything else that is in the way is a problem here.
    """
    p, state = [], "absent"
    target = real(out)
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if _is_within(cwd, target):
        p.append(
            f"{flag} {out}: {'is' if target == cwd else 'contains'} the working directory; give a new folder "
            "for the output"
        )
    elif target in (home, Path(target.anchor)):
        p.append(
            f"{flag} {out}: is {'your home folder' if target == home else 'the filesystem root'}; give a new "
            "folder for the output"
        )
    for label, path in inputs:
        src = real(path)
        if _is_within(src, target):
            p.append(
                f"{flag} {out}: {'is' if src == target else 'contains'} the {label} {path}; an output may not "
                f"be an input: choose another {flag}"
            )
        elif src.is_dir() and _is_within(target, src):
            p.append(
                f"{flag} {out}: is inside the {label} {path}; an output may not be written into an input: "
                f"choose another {flag}"
            )
    if p:
        return p, state
    holder = lock_holder(out / LOCK)
    if holder:
        return [f"{flag} {out}: in use by pid {holder}; wait for it to finish or choose another {flag}"], state
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            return [f"{flag} {out}: exists and is not a folder; choose another {flag}"], state
        try:
            entries = [e for e in out.iterdir() if e.name != LOCK]
        except OSError as e:
            return [f"{flag} {out}: cannot be read ({e.strerror}); fix its permissions or choose another {flag}"], state
        if not entries:
            state = "empty"
        else:
            m = marker(out)
            if m is None:
                verb = "lora-med only replaces folders it wrote" if overwrite else "it is not empty"
                p.append(
                    f"{flag} {out}: already exists and lora-med did not write it (no {MARKER} marker); {verb}: "
                    f"choose another {flag}"
                )
            elif m.get("kind") != f"lora-med.{kind}":
                p.append(
                    f"{flag} {out}: holds a lora-med {WORDS.get(str(m.get('kind'))[9:], m.get('kind'))}, not a "
                    f"{WORDS[kind]}; choose another {flag}"
                )
            else:
                foreign = foreign_entries(out)
                if foreign:
                    shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
                    p.append(
                        f"{flag} {out}: holds files lora-med did not write ({shown}); move them out or choose "
                        f"another {flag}"
                    )
                state = "owned"
    anchor = target
    while not anchor.exists():
        anchor = anchor.parent
    if problem := unwritable(anchor):
        p.append(f"{flag} {out}: {anchor} is not writable ({problem}); choose another {flag}")
    return p, state


def unwritable(folder: Path) -> str | None:
    """Why nothing can be created in ``folder``, or None. A real probe (a file made and removed at once):
    os.access says yes to root on a read-only filesystem."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".lora-med-probe-")
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.unlink(probe)
    return None


# --------------------------------------------------------------------------- locks


def _start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot): with the pid, it tells a live holder from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    return _alive(pid, None)


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _start_time(pid)
    return started is None or now is None or now == started


def lock_holder(path: Path) -> int | None:
    """The pid holding lock ``path``, or None if it is free or its holder is gone."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if pid != os.getpid() and _alive(pid, info.get("started")) else None


class Lock:
    """One process at a time on ``path`` (``with Lock(folder / ".lock", "the run folder X"):``)."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = Path(path), what
        self.note: str | None = None  # set when a stale lock was taken over

    def __enter__(self) -> Lock:
        me = json.dumps({"pid": os.getpid(), "started": _start_time(os.getpid())})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = lock_holder(self.path)
                if holder is not None:
                    raise LoraMedError(
                        f"{self.what} is in use by pid {holder} (lock {self.path}); wait for it to "
                        "finish or stop that process"
                    ) from None
                try:
                    old = json.loads(self.path.read_text(encoding="utf-8")).get("pid", "?")
                except (OSError, ValueError, AttributeError):
                    old = "?"
                self.note = f"note: took over a stale lock of pid {old} (that process is gone)"
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(me)
            return self
        raise LoraMedError(f"{self.what}: could not take the lock {self.path}; another process keeps taking it")

    def __exit__(self, *exc) -> None:
        try:
            if json.loads(self.path.read_text(encoding="utf-8")).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass
