"""The transformers ``Trainer`` as lora-med drives it: arguments, callbacks and the loss plot.

The Trainer does the loop, mixed precision, gradient accumulation, DDP, checkpoint contents and
resume. What is added here: a stop on the first non-finite loss, checkpoints renamed into place only
once whole, one readable log line per step (and metrics.jsonl), eval perplexity in TensorBoard, the
whole run's mean loss across resumes, the memory levers (lora_med/levers.py: chunked cross-entropy in
``compute_loss``, 8-bit AdamW, the attention kernel, gradient checkpointing), and arguments that work on
transformers 4.57 and 5.x.

Distributed runs (``torchrun`` / ``accelerate launch``, the Trainer's DDP): every process trains; the
main one (rank 0) alone writes the run folder (card, metrics.jsonl, TensorBoard, the checkpoint rename,
the final evaluation). The loss each process sees is averaged across processes every micro-step, so that
the whole-run loss is the global one and a non-finite loss stops every process at the same step.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import ProgressCallback, Trainer, TrainerCallback, TrainingArguments

from .. import models
from .levers import causal_lm, chunked_causal_lm_loss
from .resume import STATE_FILE, EvaluateBeforeSave

CHECKPOINTS_KEPT = 2


class NonFiniteLoss(Exception):
    def __init__(self, step: int):
        self.step = step


def is_main_process() -> bool:
    """Rank 0 of a distributed run (torchrun / accelerate launch), or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device: str) -> str:
    """Where this process's model goes: under torchrun / accelerate launch each process has its own GPU
    (LOCAL_RANK), made the current one so that memory statistics read it; otherwise ``device`` itself."""
    if device == "cuda" and world_size() > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def leave_process_group() -> None:
    """After training, every process together: the others exit while rank 0 evaluates and saves alone. Without
    this a process exiting with its process group alive can abort ("terminate called without an active
    exception"), and torchrun then stops rank 0 too."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


class LoraMedTrainer(Trainer):
    """Stops at the first non-finite loss, keeps the sum of every step's loss (for the whole-run mean) and,
    with ``loss_chunk``, computes the loss in chunks (the "chunked_ce" lever)."""

    loss_sum = 0.0
    loss_chunk: int | None = None  # tokens per chunk of the chunked cross-entropy; None: the model's own loss

    def continue_from(self, ckpt: Path) -> None:
        """Carry the loss sum of the steps before ``ckpt`` (each checkpoint stores it) into this process."""
        state = ckpt / STATE_FILE
        self.loss_sum = json.loads(state.read_text())["loss_sum"] if state.is_file() else 0.0

    @property
    def run_loss(self) -> float | None:
        """Mean training loss per optimizer step over the whole run, resumes included (the Trainer's own figure
        divides this process's losses by every step, so a resumed run looked better than it was)."""
        steps = self.state.global_step
        return self.loss_sum / steps if steps else None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Distributed: every process's share, averaged (each is already scaled to the global token count), so
        # loss_sum is the run's and all processes stop together on a NaN instead of one waiting for the others.
        seen = self.accelerator.reduce(loss, reduction="mean") if self.accelerator.num_processes > 1 else loss
        value = float(seen)  # one sync per micro-step; the finiteness check needs it anyway
        if not math.isfinite(value):  # stop at once: a NaN would poison the next checkpoint
            raise NonFiniteLoss(self.state.global_step + 1)
        self.loss_sum += value
        return loss

    def _load_optimizer_and_scheduler(self, checkpoint):
        """transformers 4.57 loads a distributed run's optimizer state onto ``args.device``, which on the CPU reads
        "cpu:0", a location torch.load does not know ("don't know how to restore data location"): there, load
        both states onto the CPU as a one-process run does."""
        ckpt = Path(checkpoint) if checkpoint else None
        if (
            ckpt
            and self.args.world_size > 1
            and self.args.device.type == "cpu"
            and self.optimizer is not None
            and self.lr_scheduler is not None
            and not self.is_fsdp_enabled
            and (ckpt / "optimizer.pt").is_file()
            and (ckpt / "scheduler.pt").is_file()
        ):
            self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
            self.lr_scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
            return
        super()._load_optimizer_and_scheduler(checkpoint)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """With ``loss_chunk``: the model runs without labels and computes no logits (``logits_to_keep`` an empty
        index), its decoder's last hidden state is taken with a forward hook, and the loss is
        ``levers.chunked_causal_lm_loss`` inside the accelerator's autocast. The call still goes through the
        wrapped model (DDP's gradient sync is set up in its forward). Scaled as ``Trainer.compute_loss`` scales
        the model's own loss."""
        if not self.loss_chunk or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        core = causal_lm(model)
        labels = inputs["labels"]
        captured = []
        decoder = getattr(core, core.base_model_prefix)
        hook = decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
        try:
            nothing = torch.empty(0, dtype=torch.long, device=labels.device)
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=nothing)
        finally:
            hook.remove()
        # The model would get num_items_in_batch only if it takes loss kwargs; else the Trainer averages.
        items = num_items_in_batch if self.model_accepts_loss_kwargs else None
        with self.accelerator.autocast():
            loss = chunked_causal_lm_loss(
                core.get_output_embeddings(), captured[-1], labels, items, chunk=self.loss_chunk
            )
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and items is not None:
            loss = loss * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss


class AtomicCheckpoints(TrainerCallback):
    """Trainer writes checkpoint-N under checkpoints/.partial; once complete it gets the loss sum and the length of
    metrics.jsonl so far (a resume cuts the file back there), and is renamed into checkpoints/ (an atomic rename);
    older ones beyond CHECKPOINTS_KEPT are removed."""

    def __init__(self, staging: Path, final: Path, trainer: LoraMedTrainer, metrics_file: Path):
        self.staging, self.final, self.trainer, self.metrics_file = staging, final, trainer, metrics_file

    def on_save(self, args, state, control, **kwargs):
        _barrier()  # distributed: every process has written its rng_state_<rank>.pth into the staging folder
        if not state.is_world_process_zero:
            return
        src = self.staging / f"checkpoint-{state.global_step}"
        if src.is_dir():
            # Trainer pickles its arguments there; nothing reads them back (run.json holds the config).
            (src / "training_args.bin").unlink(missing_ok=True)
            size = self.metrics_file.stat().st_size if self.metrics_file.is_file() else 0
            (src / STATE_FILE).write_text(
                json.dumps({"loss_sum": self.trainer.loss_sum, "step": state.global_step, "metrics_bytes": size})
            )
            dst = self.final / src.name
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(src, dst)
        done = sorted((int(d.name.split("-")[1]), d) for d in self.final.glob("checkpoint-*") if d.is_dir())
        for _, d in done[:-CHECKPOINTS_KEPT]:
            shutil.rmtree(d, ignore_errors=True)


class Reporter(TrainerCallback):
    """One line per log (loss, lr, tokens/s, ETA), eval perplexity (also into the logs the TensorBoard callback
    after this one writes), and metrics.jsonl. Main process only."""

    def __init__(self, metrics_file: Path):
        self.metrics_file = metrics_file
        self.t0, self.tokens0, self.step0 = 0.0, 0, 0  # set when training begins

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0, self.tokens0, self.step0 = time.perf_counter(), state.num_input_tokens_seen, state.global_step
        loader = kwargs.get("train_dataloader")
        if (
            loader is not None
            and loader.batch_size
            and loader.batch_size != args.per_device_train_batch_size
            and state.is_world_process_zero
        ):
            print(f"note: batch size is now {loader.batch_size} after an out-of-memory error (halved until it fits)")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if "eval_loss" in logs:  # added to the shared dict, so TensorBoard (after this callback) records it too
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50))
        if not state.is_world_process_zero:
            return
        row = dict(logs)
        elapsed = time.perf_counter() - self.t0
        if "loss" in row:
            tps = (state.num_input_tokens_seen - self.tokens0) / max(elapsed, 1e-9)  # all processes together
            steps_done = state.global_step - self.step0
            eta = elapsed / max(steps_done, 1) * max(state.max_steps - state.global_step, 0)
            row["tokens_per_s"] = round(tps, 1)
            # Cumulative, so that a benchmark can take the steady rate after the first (warm-up) steps.
            row["elapsed_s"], row["tokens_seen"] = round(elapsed, 3), state.num_input_tokens_seen - self.tokens0
            print(
                f"step {state.global_step}/{state.max_steps} | epoch {state.epoch:.2f} | loss {row['loss']:.4f} | "
                f"lr {row.get('learning_rate', 0):.2e} | {tps:,.0f} tok/s | ETA {eta:,.0f}s",
                flush=True,
            )
        if "eval_loss" in row:
            print(
                f"eval @ step {state.global_step} | loss {row['eval_loss']:.4f} | "
                f"perplexity {row['eval_perplexity']:.2f}",
                flush=True,
            )
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **row}) + "\n")


class QuietProgress(ProgressCallback):
    """The Trainer's progress bar (ETA included) without its raw log dicts: Reporter prints those."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0):.1e}")


def training_arguments(*, warmup_ratio: float, total_steps: int, **kw) -> TrainingArguments:
    """TrainingArguments for the installed transformers: 5.x dropped ``warmup_ratio``, ``logging_dir`` and
    ``save_safetensors`` (safetensors is then the only format), which 4.57 still takes."""
    accepted = set(inspect.signature(TrainingArguments.__init__).parameters)
    if "warmup_ratio" in accepted:
        kw["warmup_ratio"] = warmup_ratio
    else:  # the same rounding as Trainer.get_warmup_steps
        kw["warmup_steps"] = math.ceil(total_steps * warmup_ratio)
    if "save_safetensors" in accepted:
        kw["save_safetensors"] = True
    return TrainingArguments(**{k: v for k, v in kw.items() if k in accepted})


def make_trainer(
    cfg,
    model,
    tokenizer,
    train_ex,
    eval_ex,
    out: Path,
    batch: int,
    accum: int,
    precision: str,
    device: str,
    callbacks=(),
    levers=(),
) -> LoraMedTrainer:
    """The Trainer for one run: checkpoints staged in out/checkpoints/.partial, metrics in out/metrics.jsonl,
    TensorBoard in out/tensorboard (when asked for), wandb/mlflow through the Trainer's own report_to; the
    ``levers`` (names from ``plan.LEVERS``) switched on."""
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, PrinterCallback
    from transformers.integrations import TensorBoardCallback

    rows = lambda exs: Dataset.from_list([{"input_ids": e.input_ids, "labels": e.labels} for e in exs])
    staging = out / "checkpoints" / ".partial"
    if is_main_process():
        shutil.rmtree(staging, ignore_errors=True)  # whatever a kill left half-written is never loaded
        staging.mkdir(parents=True)
    by_steps = lambda n: ("steps", n) if n else ("epoch", None)
    eval_strategy, eval_steps = by_steps(cfg.eval_every)
    save_strategy, save_steps = by_steps(cfg.save_every)
    per_epoch = max(math.ceil(len(train_ex) / (batch * world_size())) // accum, 1)
    total = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.epochs * per_epoch)
    gc = "gradient_checkpointing" in levers
    args = training_arguments(
        warmup_ratio=cfg.warmup_ratio,
        total_steps=total,
        output_dir=str(staging),
        report_to=[r for r in cfg.report_to if r not in ("tensorboard", "none")],
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=max(batch, 8),
        gradient_accumulation_steps=accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.resolved_lr(),
        lr_scheduler_type=cfg.scheduler,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim="adamw_bnb_8bit" if "adamw_8bit" in levers else "adamw_torch",
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=device == "cpu",
        gradient_checkpointing=gc,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gc else None,
        logging_steps=cfg.log_every,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=eval_steps,
        save_strategy=save_strategy,
        save_steps=save_steps,
        save_only_model=False,
        prediction_loss_only=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",  # counted over every process
        # Halving the batch after an out-of-memory error is one process's decision: not under DDP.
        auto_find_batch_size=device == "cuda" and world_size() == 1,
        log_level_replica="error",
        disable_tqdm=not sys.stderr.isatty(),
        ddp_find_unused_parameters=False if world_size() > 1 else None,
    )
    trainer = LoraMedTrainer(
        model=model,
        args=args,
        train_dataset=rows(train_ex),
        eval_dataset=rows(eval_ex),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
    )
    trainer.loss_chunk = cfg.loss_chunk if "chunked_ce" in levers else None
    trainer.add_callback(EvaluateBeforeSave())
    trainer.add_callback(AtomicCheckpoints(staging, out / "checkpoints", trainer, out / "metrics.jsonl"))
    trainer.add_callback(Reporter(out / "metrics.jsonl"))
    if "tensorboard" in cfg.report_to and is_main_process():
        from torch.utils.tensorboard import SummaryWriter

        # Our own writer on out/tensorboard (transformers 5.x has no logging_dir), after Reporter so that
        # eval perplexity reaches it.
        trainer.add_callback(TensorBoardCallback(SummaryWriter(log_dir=str(out / "tensorboard"))))
    for cb in callbacks:
        trainer.add_callback(cb)
    trainer.remove_callback(PrinterCallback)  # Reporter prints a readable line instead of the raw dict
    if args.disable_tqdm is False:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(QuietProgress())
    return trainer


def load_for_training(
    cfg,
    base: str,
    device: str,
    precision: str,
    targets: list[str] | None,
    token_ids: list[int] | None = None,
    levers=("sdpa",),
):
    """The model to train: the full model in fp32 (mixed precision computes in 16 bits), or the frozen base
    (16-bit on a GPU; 4/8-bit for QLoRA) with a LoRA adapter (and trainable token rows) on top; SDPA or
    eager attention and gradient checkpointing as ``levers`` say."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    half = models.DTYPES.get(precision, torch.float32)
    gc = "gradient_checkpointing" in levers
    load = dict(trust_remote_code=cfg.trust_remote_code, attn_implementation="sdpa" if "sdpa" in levers else "eager")
    if cfg.method == "full":
        # fp32 master weights; the Trainer's autocast does the 16-bit compute.
        model = models.load_model(base, **load)
    elif cfg.method == "lora":
        model = models.load_model(base, dtype=half, **load)
    else:
        from transformers import BitsAndBytesConfig

        q = (
            BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=half,
            )
            if cfg.quant_bits == 4
            else BitsAndBytesConfig(load_in_8bit=True)
        )
        local = int(os.environ.get("LOCAL_RANK", "0"))
        model = models.load_model(
            base, quantization_config=q, device_map={"": local if device == "cuda" else "cpu"}, **load
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)
    model.config.use_cache = False  # no KV cache while training (and required by gradient checkpointing)
    if cfg.method != "qlora":  # a quantised model is already placed by its device_map
        model = model.to(local_device(device))
    if targets:
        lora = LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=targets,
            bias="none",
            task_type="CAUSAL_LM",
            trainable_token_indices=token_ids,
            # GPT-2 stores Conv1D weights transposed; quantised layers are plain Linear.
            fan_in_fan_out=model.config.model_type == "gpt2" and cfg.method == "lora",
        )
        model = get_peft_model(model, lora)
        if gc:
            model.enable_input_require_grads()  # else a frozen base gives LoRA no gradients (peft#137)
    return model


def finished_checkpoint(ckpt: Path) -> bool:
    """Whether a checkpoint is the run's last step (a run killed after it only has its final evaluation left)."""
    state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    return state.get("max_steps", 0) > 0 and state.get("global_step", 0) >= state["max_steps"]


def load_checkpoint_weights(model, ckpt: Path) -> None:
    """Put a checkpoint's trained weights into ``model`` (adapter, or the full model) without training."""
    from safetensors.torch import load_file

    if (ckpt / "adapter_model.safetensors").is_file():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
        unexpected = getattr(result, "unexpected_keys", [])
    else:
        result = model.load_state_dict(load_file(str(ckpt / "model.safetensors")), strict=False)
        unexpected = result.unexpected_keys
        tied = {"lm_head.weight"}  # saved once, as the embedding
        if set(result.missing_keys) - tied:
            raise RuntimeError(f"{ckpt}: weights missing from the checkpoint: {sorted(result.missing_keys)[:5]}")
    if unexpected:
        raise RuntimeError(f"{ckpt}: the checkpoint holds weights this model does not have: {unexpected[:5]}")


def peak_memory(device: str) -> dict:
    if device == "cuda":  # this process's GPU (rank 0's in a distributed run)
        return {
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
            "peak_memory_kind": "torch.cuda.max_memory_allocated",
            # what the caching allocator held from the card: the figure to compare with its memory
            "peak_memory_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
        }
    # The whole process (Python, libraries, data), not only tensors; since reset_peak_memory.
    return {"peak_memory_gb": models.rss_kib("VmHWM") * 1024 / 1e9, "peak_memory_kind": "process peak RSS (VmHWM)"}


def reset_peak_memory(device: str) -> None:
    """Start this run's peak-memory mark, so that a second run in one process (bench --paired) reports
    its own peak, not the first run's."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        models.reset_peak_rss()


def plot_loss(history: list[dict], path: Path) -> None:
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
