"""``lora-med train``: LoRA, QLoRA or a full fine-tune of a causal LM on conversations.

The transformers ``Trainer`` does the training loop (``trainer.py`` drives it); PEFT does LoRA;
bitsandbytes does the 4/8-bit base. ``train()`` runs in named stages, each returning a small object
the next one takes:

1. ``resolve`` (setup.py): every setting, the base's config (not its weights), the output folder or the
   run being resumed; every problem is reported together before anything loads or is written;
2. ``load_data`` (setup.py): the tokenizer and the conversations, encoded exactly as the model will see them;
3. ``plan_memory`` (levers.py): the peak-memory estimate and, for a ``--vram-gb`` budget, the fastest
   micro-batch and memory levers that fit (``--plan`` returns this and stops);
4. ``_run``: load the model, train under a lock, then evaluate, compare, save and write the card.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

from .. import modelcard, models, runs, settings
from ..cards import TrainCard
from ..config import TrainConfig
from ..errors import ConfigError, LoraMedError
from ..fileio import write_json
from ..perplexity import perplexity, torch_logits_fn
from ..settings import describe
from . import compare, plan
from .levers import MemoryPlan, plan_memory
from .resume import rewind_metrics
from .setup import Data, Setup, load_data, resolve, with_run_settings
from .trainer import (
    NonFiniteLoss,
    finished_checkpoint,
    is_main_process,
    leave_process_group,
    load_checkpoint_weights,
    load_for_training,
    local_device,
    make_trainer,
    peak_memory,
    plot_loss,
    reset_peak_memory,
    world_size,
)


@dataclass
class TrainResult:
    output: Path
    run: dict  # the run card (run.json)


# --------------------------------------------------------------------------- the command


@overload
def train(cfg: TrainConfig, *, plan_only: Literal[False] = False, callbacks=()) -> TrainResult: ...
@overload
def train(cfg: TrainConfig, *, plan_only: Literal[True], callbacks=()) -> dict: ...


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
        raise ConfigError(
            f"{describe(cfg, 'batch_size')}: more than the {len(d.train_ex)} training conversations; "
            f"use <= {len(d.train_ex)}"
        )
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
        "kind": "lora-med.train",
        "format_version": 2,
        "status": "running",
        "config": settings.as_dict(cfg),
        "resolved": {
            "base": setup.base,
            "learning_rate": cfg.resolved_lr(),
            "batch_size": mem.batch_size,
            "grad_accum": mem.grad_accum,
            "world_size": world_size(),
            "precision": setup.precision,
            "levers": list(mem.levers),
            "attention": mem.attention,
            "optim": mem.optim,
            "format": d.fmt,
            "target_modules": setup.targets,
        },
        "base": {
            "name_or_path": setup.base,
            "model_type": setup.model_config.model_type,
            "parameters": total,
            "sha256": models.fingerprint(setup.base),
        },
        "artifact": "adapter" if setup.targets else "model",
        "data": {
            "train": {
                **runs.data_record(d.train_path, out),
                "sha256": d.train_sha,
                "conversations": len(d.train_convs),
                "cut": d.train_cut,
            },
            "eval": {
                **runs.data_record(d.eval_path, out),
                "sha256": d.eval_sha,
                "conversations": len(d.eval_convs),
                "cut": d.eval_cut,
                "source": d.eval_source,
                "split_seed": cfg.seed if d.eval_source == "split" else None,
                "indices": d.eval_idx,
                # evaluation conversations also trained on: 0, or allowed by --allow-eval-overlap (TrainCard.overlap_note)
                "overlap": {"conversations": d.overlap, "of": len(d.eval_convs), "allowed": cfg.allow_eval_overlap},
            },
            "format": d.fmt,
            "max_length": cfg.max_length,
            "train_on": cfg.train_on,
        },
        "seed": cfg.seed,
        "device": models.device_info(setup.device),
        "versions": models.library_versions(),
        "parameters": {"total": total, "trainable": trainable, "percent": round(100 * trainable / total, 4)},
        "plan": mem.as_dict(cfg, setup, world_size()),
    }


def _run(cfg: TrainConfig, setup: Setup, d: Data, mem: MemoryPlan, callbacks, t_start: float) -> TrainResult:
    main, out = is_main_process(), setup.out
    local_device(setup.device)  # distributed on GPUs: this process's own
    models.set_seed(cfg.seed)
    info = models.device_info(setup.device)
    if main:
        print(
            f"Device: {setup.device}"
            + (
                f" | GPU: {info['gpu']} | VRAM: {info['vram_gb']} GB"
                if setup.device == "cuda"
                else f" | CPU: {info['cpu']} ({info['cores']} cores)"
            )
        )
        print(
            f"Data: {len(d.train_convs)} train / {len(d.eval_convs)} eval conversations ("
            + (f"file {d.eval_path}" if d.eval_source == "file" else f"seeded split, seed {cfg.seed}")
            + f"); cut at max-length {cfg.max_length}: {d.train_cut} train, {d.eval_cut} eval; format {d.fmt}"
        )
        if d.overlap:
            print(
                f"note: {d.overlap} of the {len(d.eval_convs)} evaluation conversations are also training ones "
                "(--allow-eval-overlap): the eval figures of this run are NOT held-out"
            )
    # PEFT's trainable tokens keep the embedding/lm_head tie (modules_to_save would untie and copy both).
    token_ids = (
        sorted({t for e in d.train_ex for t in e.input_ids}) if setup.targets and cfg.train_tokens == "data" else None
    )
    reset_peak_memory(setup.device)
    model = load_for_training(cfg, setup.base, setup.device, setup.precision, setup.targets, token_ids, mem.levers)
    total, trainable = models.count_parameters(model)
    card = _start_card(cfg, setup, d, mem, total, trainable) if main else {}  # (it hashes the base's weights)
    if main:
        print(
            f"Base: {setup.base} ({setup.model_config.model_type}) | parameters {total:,} | trainable {trainable:,} "
            f"({100 * trainable / total:.3f}%) | method {cfg.method}"
            + (f" r={cfg.r} alpha={cfg.alpha}" if setup.targets else "")
        )
        print(
            f"Config: lr {cfg.resolved_lr():g} | batch {mem.batch_size} x accum {mem.grad_accum} x "
            f"{world_size()} process(es) | epochs {cfg.epochs:g} | precision {setup.precision} | scheduler "
            f"{cfg.scheduler} | seed {cfg.seed} | planned peak {mem.estimate.total / plan.GB:.2f} GB"
            + (f" (budget {cfg.vram_gb} GB)" if cfg.vram_gb else "")
        )
        print(
            f"Memory levers: {', '.join(mem.levers) or 'none'}"
            + (f" (--vram-gb: {mem.choice.reason})" if mem.choice else "")
        )
        # The card goes down first (status running) so that --resume can check it is the same run.
        if cfg.resume:
            card = {**TrainCard.read(out, complete=False).raw, "status": "running"}
        else:
            if cfg.overwrite and runs.marker(out):
                runs.clear(out)
            runs.claim(out, "train", "run.json", "metrics.jsonl", "tensorboard", "checkpoints")
            (out / "metrics.jsonl").unlink(missing_ok=True)
        write_json(out / "run.json", card)

    # The Trainer's own token counter copies a tensor the way torch warns about, once per step.
    warnings.filterwarnings("ignore", message="To copy construct from a tensor", module="transformers.trainer")
    try:  # from here on, whatever stops the run (Ctrl-C included) marks its card failed, with the reason
        trainer = make_trainer(
            cfg,
            model,
            d.tokenizer,
            d.train_ex,
            d.eval_ex,
            out,
            mem.batch_size,
            mem.grad_accum,
            setup.precision,
            setup.device,
            callbacks,
            mem.levers,
        )
        ckpt = setup.checkpoint
        done = ckpt is not None and finished_checkpoint(ckpt)
        if ckpt is not None:
            trainer.continue_from(ckpt)
        if cfg.resume and main and not done:  # what the dead process logged after its checkpoint is written again
            rewind_metrics(out / "metrics.jsonl", ckpt)
        t_train = time.perf_counter()
        if done and ckpt is not None:  # killed after its last checkpoint (e.g. during the final evaluation): finish
            if main:
                print(f"Resuming from {ckpt}: training had finished; running the final evaluation")
            load_checkpoint_weights(model, ckpt)
            trainer.state = trainer.state.load_from_json(str(ckpt / "trainer_state.json"))
        else:
            if ckpt and main:
                print(f"Resuming from {ckpt}")
            trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        train_s = time.perf_counter() - t_train
        leave_process_group()
        if not main:
            return TrainResult(out, {})
        return _finish(cfg, setup, d, model, trainer, card, ckpt, train_s, t_start)
    except NonFiniteLoss as e:
        last, _ = runs.latest_checkpoint(out)
        msg = (
            f"non-finite loss at step {e.step}; training stopped. The last good checkpoint is "
            f"{last or '(none yet)'}. Lower --learning-rate, or use --precision fp32."
        )
        _fail(out, card, msg)
        raise LoraMedError(msg) from None
    except BaseException as e:
        _fail(out, card, f"{type(e).__name__}: {str(e)[:300]}" if str(e) else type(e).__name__)
        raise


def _fail(out: Path, card: dict, reason: str) -> None:
    """Mark the run failed with its reason (a kill -9 cannot be caught: its lock tells, see runs.load_card); a card
    already marked complete (the run was stopped while printing its summary) stays complete."""
    if is_main_process() and (out / "run.json").is_file():
        try:
            if json.loads((out / "run.json").read_text(encoding="utf-8")).get("status") == "complete":
                return
        except (OSError, ValueError, AttributeError):
            pass
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
        "train_loss": trainer.run_loss,
        "steps": state.global_step,
        "eval_loss": ppl["assistant"]["nll"],
        "eval_ppl": ppl["assistant"]["ppl"],
        "eval_ppl_all": ppl["all"]["ppl"],
        "base_eval_ppl": base_ppl["assistant"]["ppl"],
        "base_eval_ppl_all": base_ppl["all"]["ppl"],
        "eval_tokens": ppl["assistant"]["tokens"],
        "tokens_seen": state.num_input_tokens_seen,
        "tokens_per_s": state.num_input_tokens_seen / train_s if train_s and not ckpt else None,
        "effective_batch": card["resolved"]["batch_size"] * card["resolved"]["grad_accum"] * world_size(),
        **peak,
    }
    comparison = _compare(cfg, model, base_model, d.tokenizer, d.fmt, bool(setup.targets)) if cfg.compare else []
    card = {
        **card,
        "status": "complete",
        "metrics": metrics,
        "comparison": comparison,
        "resumed_from": str(ckpt) if ckpt else card.get("resumed_from"),
        "timings": {"train_s": round(train_s, 2), "total_s": round(time.perf_counter() - t_start, 2)},
    }
    card.pop("failure", None)
    save_artifacts(model, models.with_chat_template(d.tokenizer, d.fmt), out, card)
    plot_loss(state.log_history, out / "loss.png")
    runs.record(out, "loss.png")
    write_json(out / "run.json", card)

    print("=" * 70)
    print(
        f"Done: train loss {metrics['train_loss']:.4f} | eval loss {metrics['eval_loss']:.4f} | "
        f"perplexity {metrics['eval_ppl']:.2f} (base {metrics['base_eval_ppl']:.2f}) | "
        f"{train_s:.1f}s | peak {metrics['peak_memory_gb']:.2f} GB ({metrics['peak_memory_kind']})"
        + (f", reserved {metrics['peak_memory_reserved_gb']:.2f} GB" if "peak_memory_reserved_gb" in metrics else "")
        + (f" | {metrics['tokens_per_s']:,.0f} tok/s" if metrics["tokens_per_s"] else "")
    )
    if note := TrainCard.from_json(card, out).overlap_note():
        print(f"note: {note}")
    for row in comparison:
        print(f"\nUSUARIO: {row['prompt']}\n  BASE:       {row['base']}\n  FINE-TUNED: {row['fine_tuned']}")
    print(f"\nSaved to {out}\nNext: lora-med merge-export {shlex.quote(str(out))}")
    return TrainResult(out, card)


def _compare(cfg, model, base_model, tokenizer, fmt: str, is_adapter: bool) -> list[dict]:
    """Base vs fine-tuned replies to the fixed prompts, through the engine (an adapter run: the same PEFT model
    with its adapter on, then disabled)."""
    tuned_engine = compare.engine_for(model, tokenizer, fmt)
    base_engine = tuned_engine if is_adapter else compare.engine_for(base_model, tokenizer, fmt)
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
    run = TrainCard.from_json(card, out)
    modelcard.write(staging, run.artifact, run)  # replaces PEFT's empty template
    runs.record(out, *[f.name for f in staging.iterdir()])
    for f in staging.iterdir():
        os.replace(f, out / f.name)
    staging.rmdir()
