"""``lora-med train``: LoRA, QLoRA or a full fine-tune of a causal LM on conversations.

The transformers ``Trainer`` does the training loop (``trainer.py`` drives it); PEFT does LoRA;
bitsandbytes does the 4/8-bit base. ``train()`` runs in named stages, each returning a small object
the next one takes:

1. ``resolve``: every setting, the base's config (not its weights), the output folder or the run
   being resumed; every problem is reported together before anything loads or is written;
2. ``load_data``: the tokenizer and the conversations, encoded exactly as the model will see them;
3. ``plan_memory`` (levers.py): the peak-memory estimate and, for a ``--vram-gb`` budget, the fastest
   micro-batch and memory levers that fit (``--plan`` returns this and stops);
4. ``_run``: load the model, train under a lock, then evaluate, compare, save and write the card.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from .. import data, modelcard, models, runs, settings, weights
from . import compare, levers, plan
from ..config import DEFAULT_DATA, DEFAULT_EVAL, DEFAULT_EVAL_FRACTION, TrainConfig, shipped
from ..errors import ConfigError, LoraMedError
from ..perplexity import perplexity, torch_logits_fn
from ..fileio import sha256_file, write_json
from .levers import MemoryPlan, plan_memory
from ..settings import describe, name
from .trainer import NonFiniteLoss, finished_checkpoint, is_main_process, leave_process_group, load_checkpoint_weights, load_for_training, local_device, make_trainer, peak_memory, plot_loss, reset_peak_memory, world_size

# Settings that may differ between an interrupted run and its resume; all others must match.
# (--vram-gb is not: it picks the micro-batch and the optimizer, which the checkpoint's state depends on.)
RESUME_FREE = {"output", "resume", "overwrite", "log_every", "compare", "compare_max_new_tokens", "run_name",
               "report_to"}


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
    if not plan_only and not is_main_process():
        # Distributed: rank 0 checks the folder and holds its lock while the others start; they only train.
        checkpoint = runs.latest_checkpoint(out)[0] if cfg.resume else None
    elif not plan_only:
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
        p += weights.weights_problems(Path(base), "model", "base model")
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
    p += levers.problems(cfg, meta, plan_only=plan_only)
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
        return mem.as_dict(cfg, setup, world_size())
    for note in setup.notes if is_main_process() else ():
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
                     "levers": list(mem.levers), "attention": mem.attention, "optim": mem.optim,
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
        "plan": mem.as_dict(cfg, setup, world_size()),
    }


def _run(cfg: TrainConfig, setup: Setup, d: Data, mem: MemoryPlan, callbacks, t_start: float) -> TrainResult:
    main, out = is_main_process(), setup.out
    local_device(setup.device)  # distributed on GPUs: this process's own
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
    model = load_for_training(cfg, setup.base, setup.device, setup.precision, setup.targets, token_ids, mem.levers)
    total, trainable = models.count_parameters(model)
    card = _start_card(cfg, setup, d, mem, total, trainable) if main else {}  # (it hashes the base's weights)
    if main:
        print(f"Base: {setup.base} ({setup.model_config.model_type}) | parameters {total:,} | trainable {trainable:,} "
              f"({100 * trainable / total:.3f}%) | method {cfg.method}"
              + (f" r={cfg.r} alpha={cfg.alpha}" if setup.targets else ""))
        print(f"Config: lr {cfg.resolved_lr():g} | batch {mem.batch_size} x accum {mem.grad_accum} x "
              f"{world_size()} process(es) | epochs {cfg.epochs:g} | precision {setup.precision} | scheduler "
              f"{cfg.scheduler} | seed {cfg.seed} | planned peak {mem.estimate.total / plan.GB:.2f} GB"
              + (f" (budget {cfg.vram_gb} GB)" if cfg.vram_gb else ""))
        print(f"Memory levers: {', '.join(mem.levers) or 'none'}" + (f" (--vram-gb: {mem.choice.reason})"
                                                                     if mem.choice else ""))
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
                           setup.precision, setup.device, callbacks, mem.levers)
    ckpt = setup.checkpoint
    done = ckpt is not None and finished_checkpoint(ckpt)
    if ckpt is not None:
        trainer.continue_from(ckpt)
    t_train = time.perf_counter()
    try:
        if done:  # killed after its last checkpoint (e.g. during the final evaluation): only finish
            if main:
                print(f"Resuming from {ckpt}: training had finished; running the final evaluation")
            load_checkpoint_weights(model, ckpt)
            trainer.state = trainer.state.load_from_json(str(ckpt / "trainer_state.json"))
        else:
            if ckpt and main:
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
    leave_process_group()
    if not main:
        return TrainResult(out, {})
    return _finish(cfg, setup, d, model, trainer, card, ckpt, train_s, t_start)


def _fail(out: Path, card: dict, reason: str) -> None:
    """Mark the run failed with its reason (a kill -9 cannot be caught: its lock tells, see runs.load_card)."""
    if is_main_process() and (out / "run.json").is_file():
        write_json(out / "run.json", {**card, "status": "failed", "failure": {"reason": reason}})


def _finish(cfg, setup: Setup, d: Data, model, trainer, card: dict, ckpt, train_s: float, t_start: float):
    """Held-out perplexity (fine-tuned and base), the comparison replies, the saved model, the card."""
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
    save_artifacts(model, models.with_chat_template(d.tokenizer, d.fmt), out, card)
    plot_loss(state.log_history, out / "loss.png")
    runs.record(out, "loss.png")
    write_json(out / "run.json", card)

    print("=" * 70)
    print(f"Done: train loss {metrics['train_loss']:.4f} | eval loss {metrics['eval_loss']:.4f} | "
          f"perplexity {metrics['eval_ppl']:.2f} (base {metrics['base_eval_ppl']:.2f}) | "
          f"{train_s:.1f}s | peak {metrics['peak_memory_gb']:.2f} GB ({metrics['peak_memory_kind']})"
          + (f", reserved {metrics['peak_memory_reserved_gb']:.2f} GB" if "peak_memory_reserved_gb" in metrics else "")
          + (f" | {metrics['tokens_per_s']:,.0f} tok/s" if metrics["tokens_per_s"] else ""))
    for row in comparison:
        print(f"\nUSUARIO: {row['prompt']}\n  BASE:       {row['base']}\n  FINE-TUNED: {row['fine_tuned']}")
    print(f"\nSaved to {out}\nNext: lora-med merge-export {out}")
    return TrainResult(out, card)


def _compare(cfg, model, base_model, tokenizer, fmt: str, is_adapter: bool) -> list[dict]:
    """Base vs fine-tuned replies to the fixed prompts, through the engine (an adapter run: the same PEFT model
    with its adapter on, then disabled)."""
    tuned_engine = compare.engine_for(model, tokenizer)
    base_engine = tuned_engine if is_adapter else compare.engine_for(base_model, tokenizer)
    n = cfg.compare_max_new_tokens
    rows = []
    for prompt in compare.COMPARISON_PROMPTS:
        tuned = compare.reply(tuned_engine, tokenizer, prompt, fmt=fmt, max_new_tokens=n)
        if is_adapter:
            with model.disable_adapter():
                base = compare.reply(base_engine, tokenizer, prompt, fmt=fmt, max_new_tokens=n)
        else:
            base = compare.reply(base_engine, tokenizer, prompt, fmt=fmt, max_new_tokens=n)
        rows.append({"prompt": prompt, "base": base, "fine_tuned": tuned})
    return rows


# --------------------------------------------------------------------------- a run's saved model


def save_artifacts(model, tokenizer, out: Path, card: dict) -> None:
    """Adapter (or model), tokenizer and a Hugging Face model card into run folder ``out``, written beside and
    then renamed into place file by file (a kill leaves .saving/, never a half-written file under its name)."""
    staging = out / ".saving"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    modelcard.write(staging, card["artifact"], card)  # replaces PEFT's empty template
    runs.record(out, *[f.name for f in staging.iterdir()])
    for f in staging.iterdir():
        os.replace(f, out / f.name)
    staging.rmdir()
