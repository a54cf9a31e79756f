"""What ``lora-med bench`` is given, read and checked before anything is measured: the run cards and exports
named by flags, whether they pair up (same data, same base), and where the report goes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import models, runs, settings
from ..cards import ExportCard, TrainCard
from ..config import BACKENDS, BenchConfig, TrainConfig
from ..errors import LoraMedError
from ..fileio import sha256_file
from ..integrity import verify_export
from ..settings import describe, name
from .latency import SPEED_ONLY
from .shapes import shape_facts


@dataclass
class Found:
    """What validation read: the run cards (by flag) with their folders, and the exports."""

    runs: dict[str, tuple[str, TrainCard]]  # "--run" / "--full-run" -> (folder as given, card)
    exports: list[dict]

    @property
    def cards(self) -> dict[str, TrainCard]:
        return {k: card for k, (_, card) in self.runs.items()}


# --------------------------------------------------------------------------- validation


def report_name(cfg: BenchConfig, device: str) -> str:
    return cfg.name or (
        f"{cfg.shape}-shape-{device}"
        if cfg.shape
        else "paired"
        if cfg.paired
        else Path(cfg.run or cfg.full_run or (cfg.export[0] if cfg.export else "")).name
    )


def out_dir(cfg: BenchConfig, device: str) -> Path:
    """The report folder: --out, else reports/<name> under the working directory (never the checkout's
    tracked benchmarks/results/, which hold committed figures)."""
    return Path(cfg.out) if cfg.out else Path("reports") / report_name(cfg, device)


def validate(cfg: BenchConfig) -> tuple[list[str], Found]:
    """Every problem with the settings and inputs, and what was read while checking (run cards, manifests)."""
    p = settings.check(cfg)
    found = Found({}, [])
    if cfg.shape is not None:
        asked = [
            name(cfg, f)
            for f in ("run", "full_run", "export", "paired", "max_ppl_ratio", "min_ppl_gain", "base")
            if getattr(cfg, f)
        ]
        if asked:
            p.append(
                f"{describe(cfg, 'shape')} measures speed only ({SPEED_ONLY}): perplexity and the perplexity "
                f"gates are refused, and it cannot be combined with {', '.join(asked)}. Bench a trained run "
                "(--run/--full-run/--export) for perplexity"
            )
    elif not (cfg.run or cfg.full_run or cfg.export or cfg.paired):
        p.append(
            "nothing to measure: give --run and/or --full-run (training runs), --export (merge-export folders), "
            "--paired, or --shape dialogpt-medium"
        )
    if cfg.export and not (cfg.run or cfg.full_run or cfg.paired or cfg.shape):
        p.append(
            f"{name(cfg, 'export')} alone gives no held-out set: add the --run (or --full-run) the export came from"
        )
    if cfg.paired and (cfg.run or cfg.full_run or cfg.export):
        p.append(f"{name(cfg, 'paired')} trains and exports its own runs; drop --run/--full-run/--export")
    if p:  # the checks below need well-typed values
        return p, found
    if cfg.gate_backend != "auto" and cfg.gate_backend not in BACKENDS and ":" not in cfg.gate_backend:
        p.append(f"{describe(cfg, 'gate_backend')}: use auto or one of {', '.join(BACKENDS)}")
    try:
        models.resolve_device(cfg.device)
    except LoraMedError as e:
        p.append(str(e))
    if cfg.paired:
        for f in ("lora_config", "full_config"):
            try:
                train_cfg = settings.load_config(TrainConfig, getattr(cfg, f), argv=[])
                p += [f"{name(cfg, f)}: {x}" for x in settings.check(train_cfg)]
            except LoraMedError as e:
                p.append(f"{name(cfg, f)}: {e}")
    for f in ("run", "full_run"):
        if getattr(cfg, f):
            try:
                card = TrainCard.read(getattr(cfg, f))
                found.runs[f"--{f.replace('_', '-')}"] = (getattr(cfg, f), card)
                p += card.problems()  # weights whole, base present, before loading
            except LoraMedError as e:
                p.append(f"{name(cfg, f)}: {e}")
    p += _check_pair(cfg, found)
    for d in cfg.export or []:
        try:
            found.exports.append(_read_export(Path(d), found))
        except LoraMedError as e:
            p.append(f"{name(cfg, 'export')}: {e}")
    if (positions := _positions(cfg, found)) and cfg.new_tokens >= positions:
        p.append(f"{describe(cfg, 'new_tokens')}: the model reads at most {positions} positions; use fewer")
    elif positions and cfg.concurrent and cfg.system_tokens + 2 * cfg.new_tokens > positions // 2:
        # Half the window: the prompts after the shared start need the rest.
        most = max(positions // 2 - 2 * cfg.new_tokens, 0)
        p.append(
            f"{describe(cfg, 'system_tokens')}: with replies of up to {2 * cfg.new_tokens} tokens, a shared start of "
            f"{cfg.system_tokens} leaves too little of the model's {positions} positions for the prompts; use at most "
            f"{most}"
        )
    if cfg.name is not None and (Path(cfg.name).name != cfg.name or cfg.name in ("", ".", "..")):
        p.append(
            f"{describe(cfg, 'name')}: a name, not a path (the report goes to reports/<name>); to choose the "
            f"folder, use {name(cfg, 'out')}"
        )
    device = "cuda" if cfg.device == "cuda" else "cpu"
    out = out_dir(cfg, device if cfg.device != "auto" else models.resolve_device("auto"))
    inputs = [("training run", Path(f)) for f, _ in found.runs.values()] + [
        ("export", Path(e["path"])) for e in found.exports
    ]
    found_out, _ = runs.output_problems(
        out, "bench", flag=name(cfg, "out") if cfg.out else "--out", inputs=inputs, overwrite=True
    )  # a report folder bench wrote is rewritten
    p += found_out
    return p, found


def _positions(cfg: BenchConfig, found: Found) -> int | None:
    """How many positions the measured model reads (its config only), or None when that is not known yet."""
    if cfg.shape:
        return shape_facts(cfg.shape)["n_positions"]
    card = next(iter(found.cards.values()), None)
    try:
        return models.max_positions(models.load_model_config(card.base)) if card else None
    except LoraMedError:
        return None  # a base that is gone is named by TrainCard.problems


def _check_pair(cfg: BenchConfig, found: Found) -> list[str]:
    cards, p = found.cards, []
    if "--run" in cards and "--full-run" in cards:
        a, b = cards["--run"], cards["--full-run"]
        if (
            (a.eval.sha256, a.eval.indices) != (b.eval.sha256, b.eval.indices)
            or a.max_length != b.max_length
            or a.format != b.format
        ):
            p.append(
                f"--run {cfg.run} and --full-run {cfg.full_run} were not evaluated on the same held-out set "
                "(eval file, split, max length or format differ): perplexity would not be paired. Train both "
                "with the same data, seed and --max-length (or use --paired)"
            )
        fa, fb = (models.fingerprint(c.base, c.base_sha256) for c in (a, b))
        if fa != fb:
            p.append(
                f"--run and --full-run start from different bases ({a.base} vs {b.base}: their config and weights "
                "differ)"
            )
    if "--full-run" in cards and cards["--full-run"].artifact != "model":
        p.append(
            f"--full-run {cfg.full_run}: that run is a {cards['--full-run'].method} adapter, not a full fine-tune; "
            "pass it as --run"
        )
    return p


def _read_export(path: Path, found: Found) -> dict:
    """A complete export of one of the given runs: its ONNX folder, precision and manifest."""
    if not path.is_dir():
        raise LoraMedError(f"{path}: no such folder; give a `lora-med merge-export` output folder")
    folder = path
    if not (path / "manifest.json").is_file() and (path.parent / "manifest.json").is_file():
        folder = path.parent  # an onnx/ folder given: its export's manifest decides
    manifest = ExportCard.read(folder)  # refuses a failed or unfinished export
    onnx_dir = folder / "onnx"
    if not (onnx_dir / "model.onnx").is_file():
        raise LoraMedError(f"{onnx_dir / 'model.onnx'}: missing; export again with `lora-med merge-export`")
    src = manifest.source
    mine = {Path(f).resolve(): sha256_file(Path(f) / "run.json") for f, _ in found.runs.values()}
    if mine and Path(src.run_dir).resolve() not in mine and src.run_json_sha256 not in mine.values():
        raise LoraMedError(
            f"{folder}: exported from the run {src.run_dir}, which is neither --run nor --full-run; "
            "its perplexity would not be comparable. Give that run, or export these runs"
        )
    out: dict = {
        "path": str(folder),
        "onnx_dir": str(onnx_dir),
        "precision": manifest.options.precision(),
        "device": manifest.options.device,
        "source_run": src.run_dir,
    }
    built = manifest.engine.built and (folder / "engine" / "engine.json").is_file()
    # The graphs bench runs, proven byte for byte (a damaged graph of the right size loads and measures nonsense).
    out["verified"] = verify_export(folder, manifest.raw, ("onnx", "engine") if built else ("onnx",)).line()
    if built:
        out["engine"] = {
            "dir": str(folder / "engine"),
            "path": str(folder),
            "precision": manifest.engine.precision,
            "label": f"{folder} (engine/, decode graph)",
        }
    return out
