"""The first two stages of ``lora-med train``, before any weights load.

1. ``resolve``: every setting, the base's config (not its weights), the output folder or the run being
   resumed; every problem is reported together before anything loads or is written;
2. ``load_data``: the tokenizer and the conversations, encoded exactly as the model will see them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import data, models, runs, settings, weights
from ..cards import TrainCard
from ..config import DEFAULT_DATA, DEFAULT_EVAL, DEFAULT_EVAL_FRACTION, TrainConfig, shipped
from ..errors import ConfigError, LoraMedError
from ..fileio import sha256_file
from ..settings import describe, flag_name, name
from . import levers, plan
from .trainer import is_main_process

if TYPE_CHECKING:  # annotations only: the CLI's --help and --plan must not wait for torch
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

# Settings that may differ between an interrupted run and its resume; all others must match.
# (--vram-gb is not: it picks the micro-batch and the optimizer, which the checkpoint's state depends on.)
RESUME_FREE = {
    "output",
    "resume",
    "overwrite",
    "log_every",
    "compare",
    "compare_max_new_tokens",
    "run_name",
    "report_to",
}


@dataclass
class Setup:
    """What ``resolve`` found: the run's device, precision, base, shape, targets and folder."""

    base: str
    device: str
    precision: str
    out: Path
    model_config: PretrainedConfig
    shape: plan.Shape
    meta: torch.nn.Module  # the base on the meta device: module names and shapes, no weights
    targets: list[str] | None
    checkpoint: Path | None = None
    notes: tuple[str, ...] = ()


@dataclass
class Data:
    tokenizer: PreTrainedTokenizerBase
    fmt: str
    train_path: Path
    eval_path: Path
    eval_source: str  # "file" | "split"
    train_sha: str
    eval_sha: str
    train_convs: list
    eval_convs: list
    eval_idx: list[int] | None
    train_ex: list
    eval_ex: list
    train_cut: int
    eval_cut: int
    overlap: int = 0  # evaluation conversations that are also training conversations (--allow-eval-overlap)


# --------------------------------------------------------------------------- 1. resolve


def flag_or_key(cfg: TrainConfig, field: str) -> str:
    """How the user would give ``field``: as they named it already, else its flag."""
    return name(cfg, field) if field in settings.origins(cfg) else flag_name(field)


def with_run_settings(cfg: TrainConfig) -> TrainConfig:
    """For ``--resume``: the run's own settings, except those the user gave again (flags, YAML, or Python
    values other than the defaults), which ``resolve`` then compares with the run's."""
    if not cfg.resume:
        return cfg
    folder = cfg.output_dir()
    try:
        saved = settings.as_dict(TrainCard.read(folder, complete=False).config)
    except LoraMedError:
        return cfg  # resolve() reports it with the other problems
    given = settings.origins(cfg)
    changes = {}
    defaults = TrainConfig()
    for f in dataclasses.fields(cfg):
        default = getattr(defaults, f.name)
        # The folder is the one being resumed, wherever the run was when it started (copied, moved).
        if f.name in saved and f.name not in given and f.name != "output" and getattr(cfg, f.name) == default:
            changes[f.name] = saved[f.name]
    merged = dataclasses.replace(cfg, **changes)
    object.__setattr__(merged, "_origins", given)
    return merged


def _data_paths(cfg: TrainConfig, p: list[str]) -> tuple[Path, Path | None]:
    """The training file and the eval file (None: a seeded split of the training file)."""
    train_path = shipped(cfg.data)
    eval_path = None
    fraction_given = cfg.eval_fraction is not None
    if cfg.eval_data not in (None, "auto", "split"):
        eval_path = shipped(cfg.eval_data)
        if fraction_given:
            p.append(
                f"{describe(cfg, 'eval_fraction')} and {describe(cfg, 'eval_data')}: give one (a held-out file, "
                f"or a share of {name(cfg, 'data')} to hold out)"
            )
    elif cfg.eval_data == "auto" and runs.real(train_path) == runs.real(shipped(DEFAULT_DATA)) and not fraction_given:
        eval_path = shipped(DEFAULT_EVAL)  # the shipped held-out set goes with the shipped data
    for field, path in (("data", train_path), ("eval_data", eval_path)):
        if path is not None and not path.is_file():
            what = "file not found" if not path.exists() else "not a regular file"
            p.append(f"{describe(cfg, field)}: {what}")
    return train_path, eval_path


def resolve(cfg: TrainConfig, *, plan_only: bool = False) -> Setup:
    """Check every setting and the output folder, read the base's config; nothing heavy loads, nothing is written.

    Raises:
        ConfigError: every problem found, together.
    """
    problems = settings.check(cfg)
    if problems:  # later checks need well-typed values
        raise runs.problems_error("with the settings; nothing was loaded", problems)
    p: list[str] = []
    if cfg.method == "full" and cfg.target_modules:
        p.append(f"{name(cfg, 'target_modules')} applies to LoRA/QLoRA only; drop it for {describe(cfg, 'method')}")
    if cfg.method == "full" and cfg.train_tokens != "none":
        p.append(
            f"{describe(cfg, 'train_tokens')} applies to LoRA/QLoRA only (a full fine-tune trains every "
            f"embedding row); drop it for {describe(cfg, 'method')}"
        )
    tied = [t for t in cfg.target_modules or [] if t in ("lm_head", "wte", "embed_tokens", "wpe")]
    if tied:
        p.append(
            f"{describe(cfg, 'target_modules')}: {', '.join(tied)} cannot be a LoRA target (the output layer "
            f"is tied to the embeddings); use {name(cfg, 'train_tokens')} data to train the clinic's tokens"
        )
    if "none" in cfg.report_to and len(cfg.report_to) > 1:
        p.append(f"{describe(cfg, 'report_to')}: none cannot be combined with others")
    for tool in set(cfg.report_to) & {"wandb", "mlflow"}:
        try:
            __import__(tool)
        except ImportError:
            p.append(f"{describe(cfg, 'report_to')}: {tool} is not installed (pip install {tool})")
    if cfg.resume and cfg.resume != "auto" and cfg.output and runs.real(cfg.output) != runs.real(cfg.resume):
        p.append(f"{describe(cfg, 'resume')} and {describe(cfg, 'output')} name different folders; give one")
    if cfg.resume and cfg.overwrite:
        p.append(f"{name(cfg, 'resume')} continues a run, {name(cfg, 'overwrite')} replaces it: give one")
    train_path, eval_path = _data_paths(cfg, p)

    base, device = None, "cpu"
    try:
        base = models.resolve_base(cfg.base)
    except ConfigError as e:
        p.append(str(e).replace("--base", name(cfg, "base"), 1))
    if base and (problem := models.tokenizer_problem(base, name(cfg, "base"))):
        p.append(problem)
    try:
        device = models.resolve_device(cfg.device)
    except ConfigError as e:
        if not (plan_only and cfg.device == "cuda"):  # planning for a GPU needs none
            p.append(str(e))
        device = "cuda"
    precision = cfg.precision
    if precision == "auto":
        precision = "fp32" if device == "cpu" else ("bf16" if models.bf16_supported() else "fp16")
    if precision == "fp16" and device == "cpu":
        p.append(f"{describe(cfg, 'precision')} needs a CUDA GPU; use fp32 or bf16 on the CPU")
    if cfg.method == "qlora":
        p += _check_bitsandbytes(cfg)

    out, checkpoint = cfg.output_dir(), None
    notes: list[str] = []
    if not plan_only and not is_main_process():
        # Distributed: rank 0 checks the folder and holds its lock while the others start; they only train.
        checkpoint = runs.latest_checkpoint(out)[0] if cfg.resume else None
    elif not plan_only:
        if cfg.resume:
            checkpoint, notes = _check_resume(cfg, out, p)
        else:
            inputs = [("training data", train_path)] + ([("held-out data", eval_path)] if eval_path else [])
            inputs += [("base model", Path(base))] if base and models.is_local(base) else []
            found, state = runs.output_problems(
                out,
                "train",
                flag=name(cfg, "output") if cfg.output else "--output",
                inputs=inputs,
                overwrite=cfg.overwrite,
            )
            p += found
            if state == "owned" and not cfg.overwrite and not found and (out / "run.json").exists():
                try:
                    done = TrainCard.read(out, complete=False).status == "complete"
                    what = "a finished run" if done else "an unfinished run (add --resume to continue it)"
                except LoraMedError as e:  # a damaged card cannot be resumed: say what is wrong with it
                    what = f"a run whose card cannot be read ({str(e).splitlines()[0]})"
                p.append(f"--output {out}: already holds {what}; choose another --output or add --overwrite")

    if base and models.is_local(base) and not plan_only:  # planning reads the shape only: weights may be absent
        p += weights.weights_problems(Path(base), "model", "base model")
    if cfg.run_name is not None and (Path(cfg.run_name).name != cfg.run_name or cfg.run_name in ("", ".", "..")):
        p.append(
            f"{describe(cfg, 'run_name')}: a name, not a path (the run goes to adapters/<name>); to choose the "
            f"folder, use {name(cfg, 'output')}"
        )

    model_config: PretrainedConfig | None = None
    shape: plan.Shape | None = None
    meta: torch.nn.Module | None = None
    targets: list[str] | None = None
    if base is not None:
        try:
            model_config = models.load_model_config(base, trust_remote_code=cfg.trust_remote_code)
            shape, meta = plan.shape_from_config(model_config)
        except LoraMedError as e:
            if not p:
                raise
            p.append(str(e))
        except Exception as e:  # values of the wrong type in config.json fail only when a model is built from them
            p.append(
                f"{name(cfg, 'base')} {base}: its config.json does not describe a model it can build "
                f"({type(e).__name__}: {e}); copy the base folder again"
            )
    if meta is not None and model_config is not None:
        positions = models.max_positions(model_config)
        if positions and cfg.max_length > positions:
            p.append(f"{describe(cfg, 'max_length')}: the base reads at most {positions} positions; use <= {positions}")
        if positions and cfg.compare and cfg.compare_max_new_tokens >= positions:
            p.append(f"{describe(cfg, 'compare_max_new_tokens')}: the base reads at most {positions} positions")
        if cfg.method in ("lora", "qlora"):
            try:
                targets = cfg.target_modules or models.target_modules_for(model_config.model_type)
            except ConfigError as e:
                p.append(str(e))
            layer_names = {n.split(".")[-1] for n, _ in meta.named_modules()}
            unknown = [t for t in targets or [] if t not in layer_names]
            if unknown:
                layers = sorted(n for n in layer_names if n and not n.isdigit())
                p.append(
                    f"{name(cfg, 'target_modules')}: {', '.join(unknown)} not in this {model_config.model_type} "
                    f"model (its layers: {', '.join(layers[:24])})"
                )
            # B @ A has rank <= min(in, out): a larger r only adds zeros to learn (and a huge one, memory to fail).
            widths = [
                min(m.weight.shape)
                for n, m in meta.named_modules()
                if n.split(".")[-1] in (targets or []) and getattr(getattr(m, "weight", None), "ndim", 0) == 2
            ]
            if widths and cfg.r > min(widths):
                p.append(
                    f"{describe(cfg, 'r')}: above the width of the adapted layers ({min(widths)}), where a rank "
                    f"adds nothing; use <= {min(widths)}"
                )
    p += levers.problems(cfg, meta, plan_only=plan_only)
    if p:
        raise runs.problems_error("with the settings; nothing was loaded", p)
    # Each way of not reading the base's shape above adds a problem: none means all of it is here.
    assert base is not None and model_config is not None and shape is not None and meta is not None
    return Setup(base, device, precision, out, model_config, shape, meta, targets, checkpoint, tuple(notes))


def _check_bitsandbytes(cfg: TrainConfig) -> list[str]:
    try:
        import bitsandbytes  # noqa: F401  (imported to check it loads)
    except Exception as e:  # a broken native library raises more than ImportError
        return [f"{describe(cfg, 'method')} needs bitsandbytes ({type(e).__name__}: {e}); pip install bitsandbytes"]
    return []


def _check_resume(cfg: TrainConfig, out: Path, p: list[str]) -> tuple[Path | None, list[str]]:
    """Problems with the run to resume (added to ``p``); its newest whole checkpoint and notes."""
    flag = name(cfg, "resume")
    holder = runs.lock_holder(out / runs.LOCK)
    if holder:
        p.append(f"{flag} {out}: in use by pid {holder}; wait for it to finish")
        return None, []
    try:
        card = TrainCard.read(out, complete=False)
    except LoraMedError as e:
        p.append(f"{flag}: {e}")
        return None, []
    if card.status == "complete":
        p.append(
            f"{flag} {out}: that run is finished; nothing to resume (train a new run with another --output, "
            "or replace it with --overwrite)"
        )
        return None, []
    saved, mine = settings.as_dict(card.config), settings.as_dict(cfg)
    data_fields = {"data", "eval_data"}  # compared by content below: a moved copy of the same file is the same data
    diff = [
        f"{k} (run: {saved.get(k)!r}, now: {mine[k]!r})"
        for k in mine
        if k not in RESUME_FREE | data_fields and k in saved and saved[k] != mine[k]
    ]
    if diff:
        p.append(f"{flag} {out}: that folder holds another run; these settings differ: " + "; ".join(diff))
    # The checkpoint was trained on what the card hashed: resuming on other bytes would make a run no data produced.
    train_path, eval_path = _data_paths(cfg, [])
    for part, field, path in (("train", "data", train_path), ("eval", "eval_data", eval_path)):
        known = card.train_sha256 if part == "train" else card.eval.sha256
        if path is None or not path.is_file() or not known or sha256_file(path) == known:
            continue
        what = "training data" if part == "train" else "held-out data"
        recorded = card.train_path if part == "train" else card.eval.path
        theirs = {runs.real(x) for x in (recorded, saved.get(field)) if isinstance(x, str) and x}
        if field in settings.origins(cfg) and runs.real(path) not in theirs:  # another file named, not an edit
            p.append(
                f"{describe(cfg, field)}: not the {what} the run in {out} was trained with ({recorded}); resume "
                f"with that file (drop {name(cfg, field)}), or train a new run"
            )
        else:
            p.append(
                f"{flag} {out}: the {what} {path} changed since the run started (sha256 differs); restore "
                "it, or train a new run"
            )
    checkpoint, skipped = runs.latest_checkpoint(out)
    notes = [f"note: skipped a broken checkpoint: {s}" for s in skipped]
    if checkpoint is None:
        notes.append("note: the run has no whole checkpoint yet; training starts again from step 0")
    return checkpoint, notes


# --------------------------------------------------------------------------- 2. data


def load_data(cfg: TrainConfig, setup: Setup) -> Data:
    """Tokenizer and conversations, validated in full and encoded as the model will see them."""
    tokenizer = models.load_tokenizer(setup.base, trust_remote_code=cfg.trust_remote_code)
    fmt = data.resolve_format(cfg.format, tokenizer, flag=name(cfg, "format"))
    train_path, eval_path = _data_paths(cfg, [])
    train_ds = data.load_conversations(train_path)
    if eval_path is not None:
        eval_ds = data.load_conversations(eval_path)
        train_convs, eval_convs, eval_idx, eval_sha = (
            train_ds.conversations,
            eval_ds.conversations,
            None,
            eval_ds.sha256,
        )
    else:
        fraction = cfg.eval_fraction if cfg.eval_fraction is not None else DEFAULT_EVAL_FRACTION
        train_convs, eval_convs, eval_idx = data.split(train_ds.conversations, fraction, cfg.seed)
        eval_path, eval_sha = train_path, train_ds.sha256
    overlap = _overlap(cfg, train_convs, eval_convs, eval_idx is None)
    train_ex, train_cut = data.encode_all(
        train_convs, tokenizer, max_length=cfg.max_length, fmt=fmt, train_on=cfg.train_on
    )
    eval_ex, eval_cut = data.encode_all(eval_convs, tokenizer, max_length=cfg.max_length, fmt=fmt, train_on="assistant")
    return Data(
        tokenizer,
        fmt,
        train_path,
        eval_path,
        "file" if eval_idx is None else "split",
        train_ds.sha256,
        eval_sha,
        train_convs,
        eval_convs,
        eval_idx,
        train_ex,
        eval_ex,
        train_cut,
        eval_cut,
        overlap,
    )


def _overlap(cfg: TrainConfig, train_convs: list, eval_convs: list, from_file: bool) -> int:
    """How many evaluation conversations are also training conversations (same turns, ignoring case and spacing).

    Raises:
        ConfigError: some are, and ``--allow-eval-overlap`` was not given: their figures would not be held-out.
    """
    seen = {c.key() for c in train_convs}
    shared = sum(c.key() in seen for c in eval_convs)
    if shared and not cfg.allow_eval_overlap:
        where = (
            f"{describe(cfg, 'eval_data')}: {shared} of its {len(eval_convs)} conversations are also in "
            f"{describe(cfg, 'data')}"
            if from_file
            else f"the seeded split of {describe(cfg, 'data')}: {shared} of its {len(eval_convs)} held-out "
            "conversations duplicate training ones (`lora-med data check` lists the duplicates)"
        )
        raise ConfigError(
            f"{where}: perplexity on them would not be held-out. Give held-out conversations the run does not "
            f"train on, or add {flag_or_key(cfg, 'allow_eval_overlap')} to evaluate on them anyway (the card and "
            "every report then say so)"
        )
    return shared
