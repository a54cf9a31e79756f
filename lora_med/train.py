"""``lora-med train``: LoRA, QLoRA or a full fine-tune of a causal LM on conversations.

The transformers ``Trainer`` does the training loop, mixed precision, gradient accumulation,
checkpoint contents (weights/adapter, optimizer, scheduler, RNG states) and resume; PEFT does
LoRA; bitsandbytes does the 4/8-bit base. This module adds what they lack: validation of every
setting before weights load, a memory plan for a VRAM budget, atomic checkpoints, a stop on the
first non-finite loss, the run card, and the seed guide's base vs fine-tuned comparison.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import chat, data, models, plan
from .errors import ConfigError, LoraMedError
from .runcard import config_dict, read_json, write_json

METHODS = ("lora", "qlora", "full")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "full": 5e-5}  # full: the seed guide's 5e-5
CHECKPOINTS_KEPT = 2
# Settings that may differ between an interrupted run and its resume; all others must match.
RESUME_FREE = {"output", "resume", "overwrite", "log_every", "compare", "compare_max_new_tokens", "vram_gb",
               "run_name"}


@dataclass
class TrainConfig:
    """Settings of ``lora-med train`` (also the keys of its ``--config`` YAML)."""

    # data
    data: str = "data/medical_conversations.json"  # training conversations (.json array or .jsonl)
    eval_data: str | None = "data/medical_conversations_eval.json"  # held-out set; None: split `data`
    eval_fraction: float = 0.1  # share of `data` held out when eval_data is None
    max_length: int = 256  # tokens; longer conversations lose their oldest turns
    format: str = "auto"  # auto | dialogpt | chat-template
    train_on: str = "assistant"  # assistant (loss on replies + their EOS) | all
    # model
    base: str = models.DEFAULT_BASE  # hub id (e.g. microsoft/DialoGPT-medium) or local folder
    trust_remote_code: bool = False
    # method
    method: str = "lora"  # lora | qlora | full
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: per architecture (GPT-2: c_attn, c_proj, c_fc)
    quant_bits: int = 4  # qlora: 4 (nf4, double quant) or 8
    train_tokens: str = "none"  # none | data: also train the embedding rows (tied lm_head too) of the training data's tokens
    # optimisation
    epochs: float = 3.0
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float | None = None  # None: 2e-4 for LoRA/QLoRA, 5e-5 for full
    scheduler: str = "linear"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    seed: int = 42
    precision: str = "auto"  # auto: bf16 (or fp16) on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    device: str = "auto"  # auto | cpu | cuda
    # memory
    vram_gb: float | None = None  # plan the micro-batch for this budget (grad-accum keeps the effective batch)
    # logging and checkpoints
    log_every: int = 50  # steps, as in the seed guide
    eval_every: int | None = None  # steps; None: every epoch
    save_every: int | None = None  # steps; None: every epoch
    output: str | None = None  # None: adapters/<run_name>
    run_name: str | None = None  # None: <method>-<base name>
    resume: str | None = None  # "auto" (the output folder) or a run folder
    overwrite: bool = False
    compare: bool = True  # base vs fine-tuned replies for the fixed Spanish prompts
    compare_max_new_tokens: int = 40

    def resolved_lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR.get(self.method, 2e-4)

    def output_dir(self) -> Path:
        if self.resume and self.resume != "auto":
            return Path(self.resume)
        if self.output:
            return Path(self.output)
        name = self.run_name or f"{self.method}-{Path(self.base.rstrip('/')).name}"
        return Path("adapters") / name


@dataclass
class TrainResult:
    output: Path
    run: dict  # the run card (run.json)


class NonFiniteLoss(Exception):
    def __init__(self, step: int):
        self.step = step


# --------------------------------------------------------------------------- validation


def _check_values(cfg: TrainConfig) -> list[str]:
    p = []
    if cfg.method not in METHODS:
        p.append(f"--method {cfg.method}: use one of {', '.join(METHODS)}")
    if cfg.precision not in PRECISIONS:
        p.append(f"--precision {cfg.precision}: use one of {', '.join(PRECISIONS)}")
    if cfg.scheduler not in SCHEDULERS:
        p.append(f"--scheduler {cfg.scheduler}: use one of {', '.join(SCHEDULERS)}")
    if cfg.format not in data.FORMATS:
        p.append(f"--format {cfg.format}: use one of {', '.join(data.FORMATS)}")
    if cfg.train_tokens not in ("none", "data"):
        p.append(f"--train-tokens {cfg.train_tokens}: use none or data")
    if cfg.train_on not in ("assistant", "all"):
        p.append(f"--train-on {cfg.train_on}: use assistant or all")
    for name, low in (("r", 1), ("alpha", 1), ("batch_size", 1), ("grad_accum", 1), ("max_length", 8),
                      ("log_every", 1), ("compare_max_new_tokens", 1)):
        if getattr(cfg, name) < low:
            p.append(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be >= {low}")
    for name in ("eval_every", "save_every"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            p.append(f"--{name.replace('_', '-')} {v}: must be >= 1")
    if not 0 <= cfg.dropout < 1:
        p.append(f"--dropout {cfg.dropout}: must be in [0, 1)")
    if cfg.epochs <= 0 and cfg.max_steps <= 0:
        p.append(f"--epochs {cfg.epochs}: must be > 0 (or set --max-steps)")
    if cfg.learning_rate is not None and not cfg.learning_rate > 0:
        p.append(f"--learning-rate {cfg.learning_rate}: must be > 0")
    if not 0 < cfg.eval_fraction < 1:
        p.append(f"--eval-fraction {cfg.eval_fraction}: must be in (0, 1)")
    if not 0 <= cfg.warmup_ratio < 1:
        p.append(f"--warmup-ratio {cfg.warmup_ratio}: must be in [0, 1)")
    if cfg.quant_bits not in (4, 8):
        p.append(f"--quant-bits {cfg.quant_bits}: use 4 or 8")
    if cfg.vram_gb is not None and cfg.vram_gb <= 0:
        p.append(f"--vram-gb {cfg.vram_gb}: must be > 0")
    if cfg.method == "full" and cfg.target_modules:
        p.append("--target-modules applies to LoRA/QLoRA only; drop it for --method full")
    if cfg.method == "full" and cfg.train_tokens != "none":
        p.append(f"--train-tokens {cfg.train_tokens} applies to LoRA/QLoRA only (a full fine-tune trains every "
                 "embedding row); drop it for --method full")
    for flag, path in (("--data", cfg.data), ("--eval-data", cfg.eval_data)):
        if path is not None and not Path(path).is_file():
            p.append(f"{flag} {path}: file not found")
    return p


def _precision(cfg: TrainConfig, device: str) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _check_resume(cfg: TrainConfig, out: Path) -> tuple[list[str], Path | None]:
    """Problems with the output folder, and the checkpoint to resume from."""
    card = out / "run.json"
    if cfg.resume:
        if not card.is_file():
            return [f"--resume {out}: no run.json there; it is not a lora-med training run"], None
        try:
            saved = json.loads(card.read_text(encoding="utf-8"))["config"]
        except (ValueError, KeyError):
            return [f"--resume {out}: run.json is unreadable; start a new run with --overwrite"], None
        mine = config_dict(cfg)
        diff = [f"{k} (run: {saved.get(k)!r}, now: {mine[k]!r})" for k in mine
                if k not in RESUME_FREE and k in saved and saved[k] != mine[k]]
        if diff:
            return [f"--resume {out}: that folder holds another run; these settings differ: " + "; ".join(diff)], None
        return [], latest_checkpoint(out)
    if card.is_file() and not cfg.overwrite:
        status = json.loads(card.read_text(encoding="utf-8") or "{}").get("status", "?")
        what = "a finished run" if status == "complete" else "an interrupted run (add --resume to continue it)"
        return [f"--output {out}: already holds {what}; choose another --output or add --overwrite"], None
    return [], None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint. Checkpoints are written under checkpoints/.partial and only
    renamed into checkpoints/ once Trainer has finished writing them, so every checkpoint-N there is whole."""
    found = []
    for d in (run_dir / "checkpoints").glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and d.is_dir() and (d / "trainer_state.json").is_file():
            found.append((int(m.group(1)), d))
    return max(found)[1] if found else None


# --------------------------------------------------------------------------- callbacks

from transformers import Trainer, TrainerCallback  # noqa: E402  (kept beside the callbacks that use them)


class _Trainer(Trainer):
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():  # stop at once: a NaN would poison the next checkpoint
            raise NonFiniteLoss(self.state.global_step + 1)
        return loss


class _AtomicCheckpoints(TrainerCallback):
    """Trainer writes checkpoint-N under checkpoints/.partial; once complete it is renamed into
    checkpoints/ (an atomic rename), and older ones beyond CHECKPOINTS_KEPT are removed."""

    def __init__(self, staging: Path, final: Path):
        self.staging, self.final = staging, final

    def on_save(self, args, state, control, **kwargs):
        src = self.staging / f"checkpoint-{state.global_step}"
        if src.is_dir():
            # Trainer pickles its arguments there; nothing reads them back (run.json holds the config).
            (src / "training_args.bin").unlink(missing_ok=True)
            dst = self.final / src.name
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(src, dst)
        done = sorted((int(d.name.split("-")[1]), d) for d in self.final.glob("checkpoint-*") if d.is_dir())
        for _, d in done[:-CHECKPOINTS_KEPT]:
            shutil.rmtree(d, ignore_errors=True)


class _Reporter(TrainerCallback):
    """One line per log (loss, lr, tokens/s, ETA), eval perplexity, and metrics.jsonl."""

    def __init__(self, metrics_file: Path):
        self.metrics_file = metrics_file
        self.t0 = self.tokens0 = self.step0 = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0, self.tokens0, self.step0 = time.perf_counter(), state.num_input_tokens_seen, state.global_step
        loader = kwargs.get("train_dataloader")
        if loader is not None and loader.batch_size and loader.batch_size != args.per_device_train_batch_size:
            print(f"note: batch size is now {loader.batch_size} after an out-of-memory error (halved until it fits)")

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        elapsed = time.perf_counter() - self.t0
        if "loss" in logs:
            tps = (state.num_input_tokens_seen - self.tokens0) / max(elapsed, 1e-9)
            steps_done = state.global_step - self.step0
            eta = elapsed / max(steps_done, 1) * (state.max_steps - state.global_step)
            logs["tokens_per_s"] = round(tps, 1)
            # Cumulative, so that a benchmark can take the steady rate after the first (warm-up) steps.
            logs["elapsed_s"], logs["tokens_seen"] = round(elapsed, 3), state.num_input_tokens_seen - self.tokens0
            print(f"step {state.global_step}/{state.max_steps} | epoch {state.epoch:.2f} | loss {logs['loss']:.4f} | "
                  f"lr {logs.get('learning_rate', 0):.2e} | {tps:,.0f} tok/s | ETA {eta:,.0f}s", flush=True)
        if "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50))
            print(f"eval @ step {state.global_step} | loss {logs['eval_loss']:.4f} | "
                  f"perplexity {logs['eval_perplexity']:.2f}", flush=True)
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **logs}) + "\n")


# --------------------------------------------------------------------------- the command


def train(cfg: TrainConfig, *, plan_only: bool = False) -> TrainResult | dict:
    """Fine-tune ``cfg.base`` on ``cfg.data`` and write the run folder (see README "Output folder").

    Returns:
        TrainResult, or with ``plan_only`` the memory plan (nothing is trained or written).
    Raises:
        ConfigError: settings are invalid (all problems listed, before any weights load).
        DatasetError: a data file is malformed.
        LoraMedError: the base cannot be loaded, or the loss became non-finite.
    """
    t_start = time.perf_counter()
    problems = _check_values(cfg)
    base, device = None, "cpu"
    try:
        base = models.resolve_base(cfg.base)
    except ConfigError as e:
        problems.append(str(e))
    try:
        device = models.resolve_device(cfg.device)
    except ConfigError as e:
        problems.append(str(e))
    if cfg.method == "qlora":
        problems += _check_bitsandbytes(device)
    precision = _precision(cfg, device) if cfg.precision in PRECISIONS else "fp32"
    if precision == "fp16" and device == "cpu":
        problems.append("--precision fp16 needs a CUDA GPU; use fp32 or bf16 on the CPU")
    out = cfg.output_dir()
    resume_problems, checkpoint = _check_resume(cfg, out) if not plan_only else ([], None)
    problems += resume_problems
    # The model's shape from its config alone: LoRA targets are checked before any weights load.
    shape = meta = model_config = targets = None
    if base is not None:
        from transformers import AutoConfig

        try:
            model_config = AutoConfig.from_pretrained(base, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as e:
            if not problems:
                raise models._offline_error(base, e) from None
            problems.append(str(models._offline_error(base, e)))
    if model_config is not None:
        shape, meta = plan.shape_from_config(model_config)
        if cfg.method in ("lora", "qlora"):
            try:
                targets = cfg.target_modules or models.target_modules_for(model_config.model_type)
            except ConfigError as e:
                problems.append(str(e))
            names = {n.split(".")[-1] for n, _ in meta.named_modules()}
            unknown = [t for t in targets or [] if t not in names]
            if unknown:
                layers = sorted(n for n in names if n and not n.isdigit())
                problems.append(f"--target-modules: {', '.join(unknown)} not in this {model_config.model_type} "
                                f"model (its layers: {', '.join(layers[:24])})")
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) with the settings; nothing was loaded:", problems)
    trainable_est = plan.lora_params(meta, targets, cfg.r) if targets else shape.params
    dropout_width = plan.lora_input_width(meta, targets, shape.n_layer) if targets and cfg.dropout > 0 else 0.0

    # Data (validated in full before weights load)
    tokenizer = models.load_tokenizer(base, trust_remote_code=cfg.trust_remote_code)
    fmt = data.resolve_format(cfg.format, tokenizer)
    train_ds = data.load_conversations(cfg.data)
    if cfg.eval_data:
        eval_ds = data.load_conversations(cfg.eval_data)
        train_convs, eval_convs, eval_idx = train_ds.conversations, eval_ds.conversations, None
    else:
        eval_ds = None
        train_convs, eval_convs, eval_idx = data.split(train_ds.conversations, cfg.eval_fraction, cfg.seed)
    enc = dict(max_length=cfg.max_length, fmt=fmt, train_on=cfg.train_on)
    train_ex, train_cut = data.encode_all(train_convs, tokenizer, **enc)
    eval_ex, eval_cut = data.encode_all(eval_convs, tokenizer, **{**enc, "train_on": "assistant"})

    # Memory plan
    batch, accum = cfg.batch_size, cfg.grad_accum
    seq = min(cfg.max_length, max(len(e.input_ids) for e in train_ex))
    def est(b: int) -> plan.Estimate:
        return plan.estimate(shape, method=cfg.method, batch_size=b, seq_len=seq, precision=precision, device=device,
                             trainable=trainable_est, gradient_checkpointing=cfg.gradient_checkpointing,
                             quant_bits=cfg.quant_bits, lora_dropout_width=dropout_width)
    if cfg.vram_gb:
        chosen = plan.choose_batch(batch * accum, lambda b: est(b).total <= cfg.vram_gb * plan.GB)
        if chosen is None:
            raise ConfigError(f"--vram-gb {cfg.vram_gb}: {cfg.method} does not fit even at batch 1 "
                              f"(estimated {est(1).total / plan.GB:.2f} GB); try --method qlora, "
                              "--gradient-checkpointing or a smaller --max-length")
        batch, accum = chosen
    estimate = est(batch)
    if plan_only:
        return {"method": cfg.method, "device": device, "precision": precision, "effective_batch": batch * accum,
                "grad_accum": accum, "budget_gb": cfg.vram_gb, "params": shape.params, "trainable": trainable_est,
                **estimate.as_dict()}

    _set_seed(cfg.seed)
    info = models.device_info(device)
    print(f"Device: {device}" + (f" | GPU: {info['gpu']} | VRAM: {info['vram_gb']} GB" if device == "cuda" else
                                 f" | CPU: {info['cpu']} ({info['cores']} cores)"))
    print(f"Data: {len(train_convs)} train / {len(eval_convs)} eval conversations "
          f"({'file ' + str(cfg.eval_data) if cfg.eval_data else f'seeded split, seed {cfg.seed}'}); "
          f"cut at max-length {cfg.max_length}: {train_cut} train, {eval_cut} eval; format {fmt}")

    # PEFT's trainable tokens keep the embedding/lm_head tie (modules_to_save would untie and copy both).
    token_ids = sorted({t for e in train_ex for t in e.input_ids}) if targets and cfg.train_tokens == "data" else None
    _reset_peak_memory(device)
    model = _load_for_training(cfg, base, device, precision, targets, token_ids)
    total, trainable = models.count_parameters(model)
    print(f"Base: {base} ({model_config.model_type}) | parameters {total:,} | trainable {trainable:,} "
          f"({100 * trainable / total:.3f}%) | method {cfg.method}" + (f" r={cfg.r} alpha={cfg.alpha}" if targets else ""))
    print(f"Config: lr {cfg.resolved_lr():g} | batch {batch} x accum {accum} | epochs {cfg.epochs:g} | "
          f"precision {precision} | scheduler {cfg.scheduler} | seed {cfg.seed} | "
          f"planned peak {estimate.total / plan.GB:.2f} GB" + (f" (budget {cfg.vram_gb} GB)" if cfg.vram_gb else ""))

    # The run card goes down first (status running) so that --resume can check it is the same run.
    out.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite and not cfg.resume:
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    card = {
        "kind": "lora-med.train", "format_version": 1, "status": "running",
        "config": config_dict(cfg),
        "resolved": {"base": base, "learning_rate": cfg.resolved_lr(), "batch_size": batch, "grad_accum": accum,
                     "precision": precision, "format": fmt, "target_modules": targets},
        "base": {"name_or_path": base, "model_type": model_config.model_type, "parameters": total},
        "artifact": "adapter" if targets else "model",
        "data": {
            "train": {"path": str(cfg.data), "sha256": train_ds.sha256, "conversations": len(train_convs),
                      "cut": train_cut},
            "eval": {"path": str(cfg.eval_data or cfg.data),
                     "sha256": (eval_ds or train_ds).sha256, "conversations": len(eval_convs), "cut": eval_cut,
                     "source": "file" if cfg.eval_data else "split", "split_seed": None if cfg.eval_data else cfg.seed,
                     "indices": eval_idx},
            "format": fmt, "max_length": cfg.max_length, "train_on": cfg.train_on,
        },
        "seed": cfg.seed, "device": info, "versions": models.library_versions(),
        "parameters": {"total": total, "trainable": trainable, "percent": round(100 * trainable / total, 4)},
        "plan": estimate.as_dict(),
    }
    if not cfg.resume:
        write_json(out / "run.json", card)
        (out / "metrics.jsonl").unlink(missing_ok=True)

    # The Trainer's own token counter copies a tensor the way torch warns about, once per step.
    warnings.filterwarnings("ignore", message="To copy construct from a tensor", module="transformers.trainer")
    trainer = _make_trainer(cfg, model, tokenizer, train_ex, eval_ex, out, batch, accum, precision, device)
    if checkpoint:
        print(f"Resuming from {checkpoint}")
    t_train = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except NonFiniteLoss as e:
        last = latest_checkpoint(out)
        raise LoraMedError(f"non-finite loss at step {e.step}; training stopped. The last good checkpoint is "
                           f"{last or '(none yet)'}. Lower --learning-rate, or use --precision fp32.") from None
    train_s = time.perf_counter() - t_train
    peak = _peak_memory(device)  # before the final evals (a full run loads the base again for its figure)
    shutil.rmtree(out / "checkpoints" / ".partial", ignore_errors=True)

    # Final figures: token-weighted perplexity on the held-out set, fine-tuned and base.
    from .evaluate import perplexity, torch_logits_fn

    model.eval()
    pad = tokenizer.pad_token_id
    ppl = perplexity(torch_logits_fn(model), eval_ex, pad)
    base_model = None
    if targets:
        with model.disable_adapter():
            base_ppl = perplexity(torch_logits_fn(model), eval_ex, pad)
    else:
        base_model = models.load_model(base, trust_remote_code=cfg.trust_remote_code).to(device)
        base_ppl = perplexity(torch_logits_fn(base_model), eval_ex, pad)
    tokens_seen = trainer.state.num_input_tokens_seen
    metrics = {
        "train_loss": result.training_loss, "steps": trainer.state.global_step,
        "eval_loss": ppl["assistant"]["nll"], "eval_ppl": ppl["assistant"]["ppl"], "eval_ppl_all": ppl["all"]["ppl"],
        "base_eval_ppl": base_ppl["assistant"]["ppl"], "base_eval_ppl_all": base_ppl["all"]["ppl"],
        "eval_tokens": ppl["assistant"]["tokens"], "tokens_seen": tokens_seen,
        "tokens_per_s": tokens_seen / train_s if train_s else None, **peak,
    }
    comparison = _compare(cfg, model, base_model, tokenizer, fmt, bool(targets)) if cfg.compare else []

    _save_artifacts(model, tokenizer, out)
    _plot_loss(trainer.state.log_history, out / "loss.png")
    card.update(status="complete", metrics=metrics, comparison=comparison,
                resumed_from=str(checkpoint) if checkpoint else None,
                timings={"train_s": round(train_s, 2), "total_s": round(time.perf_counter() - t_start, 2)})
    write_json(out / "run.json", card)

    print("=" * 70)
    print(f"Done: train loss {metrics['train_loss']:.4f} | eval loss {metrics['eval_loss']:.4f} | "
          f"perplexity {metrics['eval_ppl']:.2f} (base {metrics['base_eval_ppl']:.2f}) | "
          f"{train_s:.1f}s | peak {metrics['peak_memory_gb']:.2f} GB ({metrics['peak_memory_kind']}) | "
          f"{metrics['tokens_per_s']:,.0f} tok/s")
    for row in comparison:
        print(f"\nUSUARIO: {row['prompt']}\n  BASE:       {row['base']}\n  FINE-TUNED: {row['fine_tuned']}")
    print(f"\nSaved to {out}\nNext: lora-med merge-export {out}")
    return TrainResult(out, card)


def _check_bitsandbytes(device: str) -> list[str]:
    try:
        import bitsandbytes  # noqa: F401  (imported to check it loads)
    except Exception as e:  # a broken native library raises more than ImportError
        return [f"--method qlora needs bitsandbytes ({type(e).__name__}: {e}); pip install bitsandbytes"]
    return []


def _set_seed(seed: int) -> None:
    from transformers import set_seed

    set_seed(seed)


def _load_for_training(cfg: TrainConfig, base: str, device: str, precision: str, targets: list[str] | None,
                       token_ids: list[int] | None = None):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    half = models.DTYPES.get(precision, torch.float32)
    if cfg.method == "full":
        # fp32 master weights; the Trainer's autocast does the 16-bit compute.
        model = models.load_model(base, trust_remote_code=cfg.trust_remote_code)
    elif cfg.method == "lora":
        model = models.load_model(base, dtype=half, trust_remote_code=cfg.trust_remote_code)
    else:
        from transformers import BitsAndBytesConfig

        compute = half if half != torch.float32 else torch.float32
        q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute)
             if cfg.quant_bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
        model = models.load_model(base, quantization_config=q, device_map={"": 0 if device == "cuda" else "cpu"},
                                  trust_remote_code=cfg.trust_remote_code)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    model.config.use_cache = False  # no KV cache while training (and required by gradient checkpointing)
    if cfg.method != "qlora":  # a quantised model is already placed by its device_map
        model = model.to(device)
    if targets:
        lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          bias="none", task_type="CAUSAL_LM", trainable_token_indices=token_ids,
                          # GPT-2 stores Conv1D weights transposed; quantised layers are plain Linear.
                          fan_in_fan_out=model.config.model_type == "gpt2" and cfg.method == "lora")
        model = get_peft_model(model, lora)
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()  # else a frozen base gives LoRA no gradients (peft#137)
    return model


def _make_trainer(cfg, model, tokenizer, train_ex, eval_ex, out: Path, batch: int, accum: int, precision: str,
                  device: str) -> Trainer:
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, PrinterCallback, ProgressCallback, TrainingArguments

    rows = lambda exs: Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in exs])  # noqa: E731
    staging = out / "checkpoints" / ".partial"
    shutil.rmtree(staging, ignore_errors=True)  # whatever a kill left half-written is never loaded
    staging.mkdir(parents=True)
    by_steps = lambda n: ("steps", n) if n else ("epoch", None)  # noqa: E731
    eval_strategy, eval_steps = by_steps(cfg.eval_every)
    save_strategy, save_steps = by_steps(cfg.save_every)
    args = TrainingArguments(
        output_dir=str(staging), logging_dir=str(out / "tensorboard"), report_to=["tensorboard"],
        per_device_train_batch_size=batch, per_device_eval_batch_size=max(batch, 8), gradient_accumulation_steps=accum,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, learning_rate=cfg.resolved_lr(),
        lr_scheduler_type=cfg.scheduler, warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, optim="adamw_torch", seed=cfg.seed, data_seed=cfg.seed,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=device == "cpu",
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        logging_steps=cfg.log_every, logging_first_step=True, eval_strategy=eval_strategy, eval_steps=eval_steps,
        save_strategy=save_strategy, save_steps=save_steps, save_safetensors=True, save_only_model=False,
        prediction_loss_only=True, remove_unused_columns=False, dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding", auto_find_batch_size=device == "cuda",
        disable_tqdm=not sys.stderr.isatty())
    trainer = _Trainer(model=model, args=args, train_dataset=rows(train_ex), eval_dataset=rows(eval_ex),
                       data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                       callbacks=[_AtomicCheckpoints(staging, out / "checkpoints"), _Reporter(out / "metrics.jsonl")])
    trainer.remove_callback(PrinterCallback)  # _Reporter prints a readable line instead of the raw dict
    if args.disable_tqdm is False:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_QuietProgress())
    return trainer


from transformers import ProgressCallback  # noqa: E402


class _QuietProgress(ProgressCallback):
    """The Trainer's progress bar (ETA included) without its raw log dicts: _Reporter prints those."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.1e}")


def _reset_peak_memory(device: str) -> None:
    """Start this run's peak-memory mark, so that a second run in one process (bench --paired) reports
    its own peak, not the first run's."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        models.reset_peak_rss()


def _peak_memory(device: str) -> dict:
    if device == "cuda":
        return {"peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
                "peak_memory_kind": "torch.cuda.max_memory_allocated"}
    # The whole process (Python, libraries, data), not only tensors; since _reset_peak_memory.
    return {"peak_memory_gb": models.rss_kib("VmHWM") * 1024 / 1e9, "peak_memory_kind": "process peak RSS (VmHWM)"}


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


def _save_artifacts(model, tokenizer, out: Path) -> None:
    """Adapter (or model) and tokenizer, written beside and then renamed into place file by file."""
    staging = out / ".saving"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "README.md").unlink(missing_ok=True)  # PEFT's empty model-card template; run.json says more
    for f in staging.iterdir():
        os.replace(f, out / f.name)
    staging.rmdir()


def _plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss (assistant tokens)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- for the next stages


def load_run(run_dir: str | Path) -> dict:
    """A finished run's card. Raises LoraMedError if the folder is not a complete lora-med run."""
    run_dir = Path(run_dir)
    card = read_json(run_dir / "run.json", f"{run_dir} is not a lora-med training run (run `lora-med train` first)")
    if card.get("kind") != "lora-med.train":
        raise LoraMedError(f"{run_dir / 'run.json'}: not a lora-med training run card")
    if card.get("status") != "complete":
        raise LoraMedError(f"{run_dir}: the run did not finish (status {card.get('status')!r}); "
                           f"continue it with `lora-med train --resume {run_dir}`")
    return card


def held_out(card: dict) -> list[data.Conversation]:
    """The run's held-out conversations: its eval file, or its seeded split of the training file."""
    ev = card["data"]["eval"]
    ds = data.load_conversations(ev["path"])
    if ds.sha256 != ev["sha256"]:
        raise LoraMedError(f"{ev['path']} changed since training (sha256 differs); held-out figures would not "
                           "be comparable. Restore the file or retrain.")
    if ev["source"] == "split":
        return [ds.conversations[i] for i in ev["indices"]]
    return ds.conversations
