"""The cards of lora-med's folders as typed structures, read and checked once.

``train``, ``merge-export`` and ``bench`` write a JSON card into their folder (``run.json``, ``manifest.json``,
``report.json``; see ``runs.py``). The next stage reads one through ``TrainCard.read``, ``ExportCard.read`` or
``BenchCard.read``: ``runs.load_card`` checks the folder (kind, status, files), then ``from_json`` checks every
field a reader uses and builds the card, settings included as the command's own config object. A field that is
missing or of the wrong type is named with the fix; readers use attributes, never nested keys. Figures kept as
they were measured (metrics, timings, the memory plan) stay in ``raw``, the card's JSON as written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from . import data, runs, settings
from .config import METHODS, BenchConfig, ExportConfig, Method, TrainConfig
from .errors import LoraMedError
from .weights import adapter_problems, weights_problems

Status = Literal["running", "complete", "failed"]
Artifact = Literal["adapter", "model"]
STATUSES: tuple[Status, ...] = ("running", "complete", "failed")
ARTIFACTS: tuple[Artifact, ...] = ("adapter", "model")

C = TypeVar("C")


class _Fields:
    """One card's JSON, read field by field; a problem names the card file, the field and the fix."""

    def __init__(self, raw: dict, path: Path, kind: str):
        self.raw, self.path, self.maker = raw, path, runs.MAKERS[kind]

    def damaged(self, dotted: str, what: str) -> LoraMedError:
        return LoraMedError(
            f"{self.path}: field {dotted!r} {what}; the card is damaged: restore it, or run `{self.maker}` again"
        )

    def get(self, dotted: str, tp: type | tuple[type, ...], *, optional: bool = False, choices: tuple = ()) -> Any:
        cur: Any = self.raw
        for part in dotted.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if cur is None:
            if optional:
                return None
            raise self.damaged(dotted, "is missing")
        if not isinstance(cur, tp) or (isinstance(cur, bool) and tp is not bool):
            raise self.damaged(dotted, "is of the wrong type")
        if choices and cur not in choices:
            raise self.damaged(dotted, f"is {settings.short(cur)}, not one of {', '.join(map(str, choices))}")
        return cur

    def config(self, dotted: str, cls: type[C]) -> C:
        """The command's settings recorded under ``dotted``, as its config object, checked as flags are."""
        saved = self.get(dotted, dict)
        known = {f.name for f in dataclasses.fields(cast(Any, cls))}
        cfg = cls(**{k: v for k, v in saved.items() if k in known})  # a setting this version lacks is ignored
        if problems := settings.check(cfg):
            raise self.damaged(dotted, f"holds settings lora-med refuses ({'; '.join(problems)})")
        return cfg


# --------------------------------------------------------------------------- train: run.json


@dataclass(frozen=True)
class HeldOut:
    """A run's held-out conversations: the file (absolute, and relative to the run) and which of its rows."""

    path: str
    relative_to_run: str | None
    sha256: str
    source: Literal["file", "split"]
    indices: list[int] | None  # source "split": the rows of ``path`` held out
    overlap: int = 0  # of these conversations, how many the run also trained on (only with --allow-eval-overlap)
    overlap_of: int | None = None  # out of how many evaluation conversations


@dataclass(frozen=True)
class TrainCard:
    """What the next stages read of a training run."""

    folder: Path
    status: Status
    config: TrainConfig  # the run's settings, as given to ``lora-med train``
    base: str  # the base model: a hub id or a folder
    base_sha256: str | None  # the base's fingerprint (``models.fingerprint``)
    artifact: Artifact  # "adapter" (LoRA/QLoRA) or "model" (full fine-tune)
    format: str  # how conversations were encoded: "dialogpt" or "chat-template"
    max_length: int  # tokens per conversation in training
    eval: HeldOut
    train_sha256: str | None
    train_path: str | None  # the training data file, absolute, as the run recorded it
    failure: str | None  # why a failed run stopped
    raw: dict = field(repr=False, compare=False)  # run.json as written (metrics, timings, plan, comparison)

    @property
    def method(self) -> Method:
        return self.config.method

    @property
    def metrics(self) -> dict[str, Any]:
        m = self.raw.get("metrics")
        return m if isinstance(m, dict) else {}

    @classmethod
    def read(cls, folder: str | Path, *, complete: bool = True) -> TrainCard:
        """The card of run folder ``folder``; ``complete``: refuse a run that did not finish.

        Raises:
            LoraMedError: not a run folder, an unfinished run, or a damaged card; the message says what to do.
        """
        return cls.from_json(runs.load_card(folder, "train", complete=complete), folder)

    @classmethod
    def from_json(cls, raw: dict, folder: str | Path) -> TrainCard:
        folder = Path(folder)
        f = _Fields(raw, folder / runs.CARDS["train"], "train")
        status = f.get("status", str, choices=STATUSES)
        f.get("config.method", str, choices=METHODS)
        config = f.config("config", TrainConfig)
        base = f.get("base.name_or_path", str)
        artifact = f.get("artifact", str, choices=ARTIFACTS)
        fmt, max_length = f.get("data.format", str), f.get("data.max_length", int)
        path, sha256 = f.get("data.eval.path", str), f.get("data.eval.sha256", str)
        source = f.get("data.eval.source", str, choices=("file", "split"))
        indices = f.get("data.eval.indices", list, optional=source == "file")
        if indices is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
            raise f.damaged("data.eval.indices", "does not list held-out rows (whole numbers)")
        return cls(
            folder=folder,
            status=status,
            config=config,
            base=base,
            base_sha256=f.get("base.sha256", str, optional=True),
            artifact=artifact,
            format=fmt,
            max_length=max_length,
            eval=HeldOut(
                path=path,
                relative_to_run=f.get("data.eval.relative_to_run", str, optional=True),
                sha256=sha256,
                source=source,
                indices=indices,
                overlap=f.get("data.eval.overlap.conversations", int, optional=True) or 0,
                overlap_of=f.get("data.eval.overlap.of", int, optional=True),
            ),
            train_sha256=f.get("data.train.sha256", str, optional=True),
            train_path=f.get("data.train.path", str, optional=True),
            failure=f.get("failure.reason", str, optional=True),
            raw=raw,
        )

    def overlap_note(self) -> str | None:
        """None when the run's evaluation set is held out; else the line every card and report carries: how many
        of its conversations the run also trained on (allowed only by ``--allow-eval-overlap``)."""
        if not self.eval.overlap:
            return None
        return (
            f"NOT held out: {self.eval.overlap} of the {self.eval.overlap_of or '?'} evaluation conversations are "
            "also training conversations (trained with --allow-eval-overlap); perplexity on them flatters the model"
        )

    def held_out_path(self) -> Path:
        """The held-out data file: its absolute path, else its path relative to the run folder.

        Raises:
            LoraMedError: neither exists; names both.
        """
        tried = []
        rel = self.eval.relative_to_run
        for p in (self.eval.path, rel and self.folder / rel):
            if p:
                tried.append(str(p))
                if Path(p).is_file():
                    return Path(p)
        raise LoraMedError(
            f"{self.folder / 'run.json'}: the held-out data is gone (looked for {' and '.join(tried)}); restore the "
            "file, or retrain"
        )

    def held_out(self) -> list[data.Conversation]:
        """The run's held-out conversations: its eval file, or its seeded split of the training file.

        Raises:
            LoraMedError: the file is gone, changed since training, or the card's rows are not in it.
        """
        path = self.held_out_path()
        ds = data.load_conversations(path)
        if ds.sha256 != self.eval.sha256:
            raise LoraMedError(
                f"{path} changed since training (sha256 differs); held-out figures would not be "
                "comparable. Restore the file or retrain."
            )
        if self.eval.source == "split":
            idx, n = self.eval.indices or [], len(ds.conversations)
            if not idx or not all(0 <= i < n for i in idx):
                raise LoraMedError(
                    f"{self.folder / 'run.json'}: field 'data.eval.indices' does not list held-out rows "
                    f"of {path} ({n} conversations); the card is damaged: restore it, or retrain"
                )
            return [ds.conversations[i] for i in idx]
        return ds.conversations

    def problems(self) -> list[str]:
        """What stops this finished run from loading: its weights (whole), its adapter, its tokenizer, its base."""
        folder, p = self.folder, []
        if self.artifact == "adapter":
            p += weights_problems(folder, "adapter_model", "adapter")
            p += (
                adapter_problems(folder)
                if (folder / "adapter_config.json").is_file()
                else [f"{folder / 'adapter_config.json'}: missing; copy the whole run folder, or retrain"]
            )
            if Path(self.base).is_dir():
                p += weights_problems(Path(self.base), "model", "base model")
            elif self.base.startswith(("/", ".", "~")):
                p.append(
                    f"{folder / 'run.json'}: its base {self.base} no longer exists; restore that folder (the adapter "
                    "is applied to it)"
                )
        else:
            p += weights_problems(folder, "model", "fine-tuned model")
        needed = ["tokenizer_config.json"] + (["config.json"] if self.artifact == "model" else [])
        for name in needed:
            if not (folder / name).is_file():
                p.append(f"{folder / name}: missing; copy the whole run folder, or retrain")
        return p


# --------------------------------------------------------------------------- merge-export: manifest.json


@dataclass(frozen=True)
class ExportSource:
    """The run an export was made from, and how its conversations are encoded."""

    run_dir: str
    run_json_sha256: str | None
    format: str
    max_length: int


@dataclass(frozen=True)
class EngineGraph:
    """The export's engine/ decode graph: built (for ``device``, in ``precision``), or why not (``reason``)."""

    device: str | None  # None: not built
    precision: str | None
    reason: str | None

    @property
    def built(self) -> bool:
        return self.device is not None


@dataclass(frozen=True)
class ExportCard:
    """What bench, serve and the parity check read of an export."""

    folder: Path
    status: Status
    options: ExportConfig  # the settings given to ``lora-med merge-export``
    source: ExportSource
    engine: EngineGraph
    raw: dict = field(repr=False, compare=False)  # manifest.json as written (figures, files, versions)

    @classmethod
    def read(cls, folder: str | Path, *, complete: bool = True) -> ExportCard:
        """The manifest of export ``folder``; ``complete``: refuse an export that failed or did not finish.

        Raises:
            LoraMedError: not an export, an unfinished one, files changed since, or a damaged manifest.
        """
        return cls.from_json(runs.load_card(folder, "export", complete=complete), folder)

    @classmethod
    def from_json(cls, raw: dict, folder: str | Path) -> ExportCard:
        folder = Path(folder)
        f = _Fields(raw, folder / runs.CARDS["export"], "export")
        built = f.get("engine.status", str, optional=True) == "built"
        return cls(
            folder=folder,
            status=f.get("status", str, choices=STATUSES),
            options=f.config("options", ExportConfig),
            source=ExportSource(
                run_dir=f.get("source.run_dir", str),
                run_json_sha256=f.get("source.run_json_sha256", str, optional=True),
                format=f.get("source.format", str),
                max_length=f.get("source.max_length", int),
            ),
            engine=EngineGraph(
                device=f.get("engine.device", str) if built else None,
                precision=f.get("engine.precision", str) if built else None,
                reason=f.get("engine.reason", str, optional=True)
                or (None if built or "engine" in raw else "exported before lora-med wrote engine/"),
            ),
            raw=raw,
        )


# --------------------------------------------------------------------------- bench: report.json


@dataclass(frozen=True)
class BenchCard:
    """A bench report: its name, its settings and whether its gate passed."""

    folder: Path
    name: str
    settings: BenchConfig
    passed: bool
    raw: dict = field(repr=False, compare=False)  # report.json as written (latency, perplexity, machine, ...)

    @classmethod
    def read(cls, folder: str | Path) -> BenchCard:
        """The report in ``folder``.

        Raises:
            LoraMedError: not a bench report folder, or a damaged report.
        """
        return cls.from_json(runs.load_card(folder, "bench"), folder)

    @classmethod
    def from_json(cls, raw: dict, folder: str | Path) -> BenchCard:
        folder = Path(folder)
        f = _Fields(raw, folder / runs.CARDS["bench"], "bench")
        return cls(
            folder=folder,
            name=f.get("name", str),
            settings=f.config("settings", BenchConfig),
            passed=f.get("gate.passed", bool),
            raw=raw,
        )
