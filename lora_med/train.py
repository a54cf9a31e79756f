"""``lora-med train``: LoRA, QLoRA or a full fine-tune of a causal LM on conversations.

The transformers ``Trainer`` does the training loop (``trainer.py`` drives it); PEFT does LoRA;
bitsandbytes does the 4/8-bit base. ``train()`` runs in named stages, each returning a small object
the next one takes:

1. ``resolve``: every setting, the base's config (not its weights), the output folder or the run
   being resumed; every problem is reported together before anything loads or is written;
2. ``load_data``: the tokenizer and the conversations, encoded exactly as the model will see them;
3. ``plan_memory``: the peak-memory estimate and, for a ``--vram-gb`` budget, the micro-batch
   (``--plan`` returns this and stops);
4. ``_run``: load the model, train under a lock, then evaluate, compare, save and write the card.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import chat, data, models, plan, runs, settings
from .config import DEFAULT_DATA, DEFAULT_EVAL, DEFAULT_EVAL_FRACTION, TrainConfig, shipped
from .errors import ConfigError, LoraMedError
from .fileio import sha256_file, write_json
from .settings import describe, name
from .trainer import (NonFiniteLoss, is_main_process, load_checkpoint_weights, load_for_training, make_trainer,
                      peak_memory, plot_loss, reset_peak_memory, world_size)

# Settings that may differ between an interrupted run and its resume; all others must match.
RESUME_FREE = {"output", "resume", "overwrite", "log_every", "compare", "compare_max_new_tokens", "vram_gb",
               "run_name", "report_to"}


@dataclass
class TrainResult:
    output: Path
    run: dict  # the run card (run.json)


@dataclass
class Setup:
    """What ``resolve`` found: the run's device, precision, base, shape, targets and folder."""

    base: str
    device: str
    precision: str
    out: Path
    model_config: object
    shape: plan.Shape
    meta: object  # the base on the meta device: module names and shapes, no weights
    targets: list[str] | None
    checkpoint: Path | None = None
    notes: tuple[str, ...] = ()


@dataclass
class Data:
    tokenizer: object
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


# --------------------------------------------------------------------------- 1. resolve


def with_run_settings(cfg: TrainConfig) -> TrainConfig:
    """For ``--resume``: the run's own settings, except those the user gave again (flags, YAML, or Python
    values other than the defaults), which ``resolve`` then compares with the run's."""
    if not cfg.resume:
        return cfg
    folder = cfg.output_dir()
    try:
        saved = runs.load_card(folder, "train", complete=False)["config"]
    except LoraMedError:
        return cfg  # resolve() reports it with the other problems
    given = settings.origins(cfg)
    changes = {}
    for f in dataclasses.fields(cfg):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
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
            p.append(f"{describe(cfg, 'eval_fraction')} and {describe(cfg, 'eval_data')}: give one (a held-out file, "
                     f"or a share of {name(cfg, 'data')} to hold out)")
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
        p.append(f"{describe(cfg, 'train_tokens')} applies to LoRA/QLoRA only (a full fine-tune trains every "
                 f"embedding row); drop it for {describe(cfg, 'method')}")
    tied = [t for t in cfg.target_modules or [] if t in ("lm_head", "wte", "embed_tokens", "wpe")]
    if tied:
        p.append(f"{describe(cfg, 'target_modules')}: {', '.join(tied)} cannot be a LoRA target (the output layer "
                 f"is tied to the embeddings); use {name(cfg, 'train_tokens')} data to train the clinic's tokens")
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

    out, checkpoint, notes = cfg.output_dir(), None, []
    if not plan_only:
        if cfg.resume:
            checkpoint, notes = _check_resume(cfg, out, p)
        else:
            inputs = [("training data", train_path)] + ([("held-out data", eval_path)] if eval_path else [])
            inputs += [("base model", Path(base))] if base and models.is_local(base) else []
            found, state = runs.output_problems(out, "train", flag=name(cfg, "output") if cfg.output else "--output",
                                                inputs=inputs, overwrite=cfg.overwrite)
            p += found
            if state == "owned" and not cfg.overwrite and not found and (out / "run.json").exists():
                try:
                    done = runs.load_card(out, "train", complete=False)["status"] == "complete"
                except LoraMedError:
                    done = False
                what = "a finished run" if done else "an unfinished run (add --resume to continue it)"
                p.append(f"--output {out}: already holds {what}; choose another --output or add --overwrite")

    if base and models.is_local(base) and not plan_only:  # planning reads the shape only: weights may be absent
        p += runs.weights_problems(Path(base), "model", "base model")
    if cfg.run_name is not None and (Path(cfg.run_name).name != cfg.run_name or cfg.run_name in ("", ".", "..")):
        p.append(f"{describe(cfg, 'run_name')}: a name, not a path (the run goes to adapters/<name>); to choose the "
                 f"folder, use {name(cfg, 'output')}")

    model_config = shape = meta = targets = None
    if base is not None:
        try:
            model_config = models.load_config(base, trust_remote_code=cfg.trust_remote_code)
            shape, meta = plan.shape_from_config(model_config)
        except LoraMedError as e:
            if not p:
                raise
            p.append(str(e))
        except Exception as e:  # values of the wrong type in config.json fail only when a model is built from them
            p.append(f"{name(cfg, 'base')} {base}: its config.json does not describe a model it can build "
                     f"({type(e).__name__}: {e}); copy the base folder again")
    if meta is not None:
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
                p.append(f"{name(cfg, 'target_modules')}: {', '.join(unknown)} not in this {model_config.model_type} "
                         f"model (its layers: {', '.join(layers[:24])})")
            # B @ A has rank <= min(in, out): a larger r only adds zeros to learn (and a huge one, memory to fail).
            widths = [min(m.weight.shape) for n, m in meta.named_modules()
                      if n.split(".")[-1] in (targets or []) and getattr(getattr(m, "weight", None), "ndim", 0) == 2]
            if widths and cfg.r > min(widths):
                p.append(f"{describe(cfg, 'r')}: above the width of the adapted layers ({min(widths)}), where a rank "
                         f"adds nothing; use <= {min(widths)}")
    if p:
        raise runs.problems_error("with the settings; nothing was loaded", p)
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
        card = runs.load_card(out, "train", complete=False)
    except LoraMedError as e:
        p.append(f"{flag}: {e}")
        return None, []
    if card["status"] == "complete":
        p.append(f"{flag} {out}: that run is finished; nothing to resume (train a new run with another --output, "
                 "or replace it with --overwrite)")
        return None, []
    saved, mine = card["config"], settings.as_dict(cfg)
    diff = [f"{k} (run: {saved.get(k)!r}, now: {mine[k]!r})" for k in mine
            if k not in RESUME_FREE and k in saved and saved[k] != mine[k]]
    if diff:
        p.append(f"{flag} {out}: that folder holds another run; these settings differ: " + "; ".join(diff))
    # Same settings, other bytes: the checkpoint was trained on what the card hashed, so resuming on an edited
    # file would make a run that no data produced.
    train_path, eval_path = _data_paths(cfg, [])
    for part, path in (("train", train_path), ("eval", eval_path)):
        record = card["data"].get(part)
        known = record.get("sha256") if isinstance(record, dict) else None
        if path is not None and path.is_file() and known and sha256_file(path) != known:
            what = "training data" if part == "train" else "held-out data"
            p.append(f"{flag} {out}: the {what} {path} changed since the run started (sha256 differs); restore "
                     "it, or train a new run")
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
        train_convs, eval_convs, eval_idx, eval_sha = train_ds.conversations, eval_ds.conversations, None, eval_ds.sha256
    else:
        fraction = cfg.eval_fraction if cfg.eval_fraction is not None else DEFAULT_EVAL_FRACTION
        train_convs, eval_convs, eval_idx = data.split(train_ds.conversations, fraction, cfg.seed)
        eval_path, eval_sha = train_path, train_ds.sha256
    enc = dict(max_length=cfg.max_length, fmt=fmt, train_on=cfg.train_on)
    train_ex, train_cut = data.encode_all(train_convs, tokenizer, **enc)
    eval_ex, eval_cut = data.encode_all(eval_convs, tokenizer, **{**enc, "train_on": "assistant"})
    return Data(tokenizer, fmt, train_path, eval_path, "file" if eval_idx is None else "split", train_ds.sha256,
                eval_sha, train_convs, eval_convs, eval_idx, train_ex, eval_ex, train_cut, eval_cut)


# --------------------------------------------------------------------------- 3. plan


@dataclass
class MemoryPlan:
    batch_size: int
    grad_accum: int
    estimate: plan.Estimate
    trainable: int

    def as_dict(self, cfg: TrainConfig, setup: Setup) -> dict:
        return {"method": cfg.method, "device": setup.device, "precision": setup.precision,
                "effective_batch": self.batch_size * self.grad_accum * world_size(), "grad_accum": self.grad_accum,
                "budget_gb": cfg.vram_gb, "params": setup.shape.params, "trainable": self.trainable,
                **self.estimate.as_dict()}


def plan_memory(cfg: TrainConfig, setup: Setup, d: Data) -> MemoryPlan:
    """Peak-memory estimate for the settings; with ``--vram-gb``, the largest micro-batch that fits."""
    trainable = plan.lora_params(setup.meta, setup.targets, cfg.r) if setup.targets else setup.shape.params
    dropout_width = plan.lora_input_width(setup.meta, setup.targets, setup.shape.n_layer) \
        if setup.targets and cfg.dropout > 0 else 0.0
    seq = min(cfg.max_length, max(len(e.input_ids) for e in d.train_ex))

    def est(b: int) -> plan.Estimate:
        return plan.estimate(setup.shape, method=cfg.method, batch_size=b, seq_len=seq, precision=setup.precision,
                             device=setup.device, trainable=trainable, gradient_checkpointing=cfg.gradient_checkpointing,
                             quant_bits=cfg.quant_bits, lora_dropout_width=dropout_width)

    batch, accum = cfg.batch_size, cfg.grad_accum
    if cfg.vram_gb:
        chosen = plan.choose_batch(batch * accum, lambda b: est(b).total <= cfg.vram_gb * plan.GB)
        if chosen is None:
            raise ConfigError(f"{describe(cfg, 'vram_gb')}: {cfg.method} does not fit even at batch 1 (estimated "
                              f"{est(1).total / plan.GB:.2f} GB); try --method qlora, --gradient-checkpointing or a "
                              "smaller --max-length")
        batch, accum = chosen
    return MemoryPlan(batch, accum, est(batch), trainable)


# --------------------------------------------------------------------------- the command


def train(cfg: TrainConfig, *, plan_only: bool = False, callbacks=()) -> TrainResult | dict:
    """Fine-tune ``cfg.base`` on ``cfg.data`` and write the run folder (see README "Output folder").

    Args:
        plan_only: return the memory plan (a dict) without training or writing anything.
        callbacks: extra ``transformers.TrainerCallback`` objects.
    Returns:
        TrainResult, or with ``plan_only`` the memory plan.
    Raises:
        ConfigError: settings are invalid (all problems listed, before any weights load).
        DatasetError: a data file is malformed.
        LoraMedError: the base cannot be loaded, the folder is in use, or the loss became non-finite.
    """
    t_start = time.perf_counter()
    cfg = with_run_settings(cfg)
    setup = resolve(cfg, plan_only=plan_only)
    d = load_data(cfg, setup)
    if cfg.batch_size > len(d.train_ex) and not plan_only:  # the card would record a batch no step ever saw
        raise ConfigError(f"{describe(cfg, 'batch_size')}: more than the {len(d.train_ex)} training conversations; "
                          f"use <= {len(d.train_ex)}")
    mem = plan_memory(cfg, setup, d)
    if plan_only:
        return mem.as_dict(cfg, setup)
    for note in setup.notes:
        print(note)
    if not is_main_process():  # DDP: rank 0 owns the folder; the others only train
        return _run(cfg, setup, d, mem, callbacks, t_start)
    setup.out.mkdir(parents=True, exist_ok=True)
    with runs.Lock(setup.out / runs.LOCK, f"the run folder {setup.out}") as lock:
        if lock.note:
            print(lock.note)
        return _run(cfg, setup, d, mem, callbacks, t_start)


def _start_card(cfg: TrainConfig, setup: Setup, d: Data, mem: MemoryPlan, total: int, trainable: int) -> dict:
    out = setup.out
    return {
        "kind": "lora-med.train", "format_version": 2, "status": "running",
        "config": settings.as_dict(cfg),
        "resolved": {"base": setup.base, "learning_rate": cfg.resolved_lr(), "batch_size": mem.batch_size,
                     "grad_accum": mem.grad_accum, "world_size": world_size(), "precision": setup.precision,
                     "format": d.fmt, "target_modules": setup.targets},
        "base": {"name_or_path": setup.base, "model_type": setup.model_config.model_type, "parameters": total,
                 "sha256": models.fingerprint(setup.base)},
        "artifact": "adapter" if setup.targets else "model",
        "data": {
            "train": {**runs.data_record(d.train_path, out), "sha256": d.train_sha,
                      "conversations": len(d.train_convs), "cut": d.train_cut},
            "eval": {**runs.data_record(d.eval_path, out), "sha256": d.eval_sha, "conversations": len(d.eval_convs),
                     "cut": d.eval_cut, "source": d.eval_source,
                     "split_seed": cfg.seed if d.eval_source == "split" else None, "indices": d.eval_idx},
            "format": d.fmt, "max_length": cfg.max_length, "train_on": cfg.train_on,
        },
        "seed": cfg.seed, "device": models.device_info(setup.device), "versions": models.library_versions(),
        "parameters": {"total": total, "trainable": trainable, "percent": round(100 * trainable / total, 4)},
        "plan": mem.estimate.as_dict(),
    }


def _run(cfg: TrainConfig, setup: Setup, d: Data, mem: MemoryPlan, callbacks, t_start: float) -> TrainResult:
    main, out = is_main_process(), setup.out
    models.set_seed(cfg.seed)
    info = models.device_info(setup.device)
    if main:
        print(f"Device: {setup.device}" + (f" | GPU: {info['gpu']} | VRAM: {info['vram_gb']} GB"
                                           if setup.device == "cuda" else f" | CPU: {info['cpu']} ({info['cores']} cores)"))
        print(f"Data: {len(d.train_convs)} train / {len(d.eval_convs)} eval conversations ("
              + (f"file {d.eval_path}" if d.eval_source == "file" else f"seeded split, seed {cfg.seed}")
              + f"); cut at max-length {cfg.max_length}: {d.train_cut} train, {d.eval_cut} eval; format {d.fmt}")
    # PEFT's trainable tokens keep the embedding/lm_head tie (modules_to_save would untie and copy both).
    token_ids = sorted({t for e in d.train_ex for t in e.input_ids}) \
        if setup.targets and cfg.train_tokens == "data" else None
    reset_peak_memory(setup.device)
    model = load_for_training(cfg, setup.base, setup.device, setup.precision, setup.targets, token_ids)
    total, trainable = models.count_parameters(model)
    card = _start_card(cfg, setup, d, mem, total, trainable)
    if main:
        print(f"Base: {setup.base} ({setup.model_config.model_type}) | parameters {total:,} | trainable {trainable:,} "
              f"({100 * trainable / total:.3f}%) | method {cfg.method}"
              + (f" r={cfg.r} alpha={cfg.alpha}" if setup.targets else ""))
        print(f"Config: lr {cfg.resolved_lr():g} | batch {mem.batch_size} x accum {mem.grad_accum} x "
              f"{world_size()} process(es) | epochs {cfg.epochs:g} | precision {setup.precision} | scheduler "
              f"{cfg.scheduler} | seed {cfg.seed} | planned peak {mem.estimate.total / plan.GB:.2f} GB"
              + (f" (budget {cfg.vram_gb} GB)" if cfg.vram_gb else ""))
        # The card goes down first (status running) so that --resume can check it is the same run.
        if cfg.resume:
            card = {**runs.load_card(out, "train", complete=False), "status": "running"}
        else:
            if cfg.overwrite and runs.marker(out):
                runs.clear(out)
            runs.claim(out, "train", "run.json", "metrics.jsonl", "tensorboard", "checkpoints")
            (out / "metrics.jsonl").unlink(missing_ok=True)
        write_json(out / "run.json", card)

    # The Trainer's own token counter copies a tensor the way torch warns about, once per step.
    warnings.filterwarnings("ignore", message="To copy construct from a tensor", module="transformers.trainer")
    trainer = make_trainer(cfg, model, d.tokenizer, d.train_ex, d.eval_ex, out, mem.batch_size, mem.grad_accum,
                           setup.precision, setup.device, callbacks)
    ckpt = setup.checkpoint
    done = ckpt is not None and _finished_checkpoint(ckpt)
    if ckpt is not None:
        trainer.continue_from(ckpt)
    t_train = time.perf_counter()
    try:
        if done:  # killed after its last checkpoint (e.g. during the final evaluation): only finish
            print(f"Resuming from {ckpt}: training had finished; running the final evaluation")
            load_checkpoint_weights(model, ckpt)
            trainer.state = trainer.state.load_from_json(str(ckpt / "trainer_state.json"))
        else:
            if ckpt:
                print(f"Resuming from {ckpt}")
            trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    except NonFiniteLoss as e:
        last, _ = runs.latest_checkpoint(out)
        msg = (f"non-finite loss at step {e.step}; training stopped. The last good checkpoint is "
               f"{last or '(none yet)'}. Lower --learning-rate, or use --precision fp32.")
        _fail(out, card, msg)
        raise LoraMedError(msg) from None
    except BaseException as e:
        _fail(out, card, f"{type(e).__name__}: {str(e)[:300]}" if str(e) else type(e).__name__)
        raise
    train_s = time.perf_counter() - t_train
    if not main:
        return TrainResult(out, {})
    return _finish(cfg, setup, d, model, trainer, card, ckpt, train_s, t_start)


def _finished_checkpoint(ckpt: Path) -> bool:
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    return state.get("max_steps", 0) > 0 and state.get("global_step", 0) >= state["max_steps"]


def _fail(out: Path, card: dict, reason: str) -> None:
    """Mark the run failed with its reason (a kill -9 cannot be caught: its lock tells, see runs.load_card)."""
    if is_main_process() and (out / "run.json").is_file():
        write_json(out / "run.json", {**card, "status": "failed", "failure": {"reason": reason}})


def _finish(cfg, setup: Setup, d: Data, model, trainer, card: dict, ckpt, train_s: float, t_start: float):
    """Held-out perplexity (fine-tuned and base), the comparison replies, the saved model, the card."""
    from .evaluate import perplexity, torch_logits_fn

    out = setup.out
    peak = peak_memory(setup.device)  # before the final evals (a full run loads the base again for its figure)
    shutil.rmtree(out / "checkpoints" / ".partial", ignore_errors=True)
    model.eval()
    pad = d.tokenizer.pad_token_id
    ppl = perplexity(torch_logits_fn(model), d.eval_ex, pad)
    base_model = None
    if setup.targets:
        with model.disable_adapter():
            base_ppl = perplexity(torch_logits_fn(model), d.eval_ex, pad)
    else:
        base_model = models.load_model(setup.base, trust_remote_code=cfg.trust_remote_code).to(setup.device)
        base_ppl = perplexity(torch_logits_fn(base_model), d.eval_ex, pad)
    state = trainer.state
    metrics = {
        "train_loss": trainer.run_loss, "steps": state.global_step,
        "eval_loss": ppl["assistant"]["nll"], "eval_ppl": ppl["assistant"]["ppl"], "eval_ppl_all": ppl["all"]["ppl"],
        "base_eval_ppl": base_ppl["assistant"]["ppl"], "base_eval_ppl_all": base_ppl["all"]["ppl"],
        "eval_tokens": ppl["assistant"]["tokens"], "tokens_seen": state.num_input_tokens_seen,
        "tokens_per_s": state.num_input_tokens_seen / train_s if train_s and not ckpt else None,
        "effective_batch": card["resolved"]["batch_size"] * card["resolved"]["grad_accum"] * world_size(), **peak,
    }
    comparison = _compare(cfg, model, base_model, d.tokenizer, d.fmt, bool(setup.targets)) if cfg.compare else []
    card = {**card, "status": "complete", "metrics": metrics, "comparison": comparison,
            "resumed_from": str(ckpt) if ckpt else card.get("resumed_from"),
            "timings": {"train_s": round(train_s, 2), "total_s": round(time.perf_counter() - t_start, 2)}}
    card.pop("failure", None)
    _save_artifacts(model, d.tokenizer, d.fmt, out, card)
    plot_loss(state.log_history, out / "loss.png")
    runs.record(out, "loss.png")
    write_json(out / "run.json", card)

    print("=" * 70)
    print(f"Done: train loss {metrics['train_loss']:.4f} | eval loss {metrics['eval_loss']:.4f} | "
          f"perplexity {metrics['eval_ppl']:.2f} (base {metrics['base_eval_ppl']:.2f}) | "
          f"{train_s:.1f}s | peak {metrics['peak_memory_gb']:.2f} GB ({metrics['peak_memory_kind']})"
          + (f" | {metrics['tokens_per_s']:,.0f} tok/s" if metrics["tokens_per_s"] else ""))
    for row in comparison:
        print(f"\nUSUARIO: {row['prompt']}\n  BASE:       {row['base']}\n  FINE-TUNED: {row['fine_tuned']}")
    print(f"\nSaved to {out}\nNext: lora-med merge-export {out}")
    return TrainResult(out, card)


def _compare(cfg, model, base_model, tokenizer, fmt: str, is_adapter: bool) -> list[dict]:
    rows = []
    for prompt in chat.COMPARISON_PROMPTS:
        tuned = chat.reply(model, tokenizer, prompt, fmt=fmt, max_new_tokens=cfg.compare_max_new_tokens)
        if is_adapter:
            with model.disable_adapter():
                base = chat.reply(model, tokenizer, prompt, fmt=fmt, max_new_tokens=cfg.compare_max_new_tokens)
        else:
            base = chat.reply(base_model, tokenizer, prompt, fmt=fmt, max_new_tokens=cfg.compare_max_new_tokens)
        rows.append({"prompt": prompt, "base": base, "fine_tuned": tuned})
    return rows


def _save_artifacts(model, tokenizer, fmt: str, out: Path, card: dict) -> None:
    """Adapter (or model), tokenizer (with a chat template reproducing the training format) and a Hugging Face
    model card, written beside and then renamed into place file by file."""
    from . import modelcard

    staging = out / ".saving"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    models.with_chat_template(tokenizer, fmt).save_pretrained(staging)
    modelcard.write(staging, card["artifact"], card)  # replaces PEFT's empty template
    names = [f.name for f in staging.iterdir()]
    runs.record(out, *names)
    for f in staging.iterdir():
        os.replace(f, out / f.name)
    staging.rmdir()
