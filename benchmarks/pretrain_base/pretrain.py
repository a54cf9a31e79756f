"""Pretrain a tiny GPT-2 (GPT2LMHeadModel, tied embeddings) on the Spanish corpus, on CPU.

Data: every prose document is tokenized and followed by EOS; every chatterbot dialogue
turn is followed by EOS (the DialoGPT convention the LoRA fine-tune relies on). Documents
are shuffled, concatenated and cut into fixed blocks of --block tokens (no padding, so
every position is a training target).

Training: transformers Trainer, AdamW, fp32, 2 threads, linear warm-up then a cosine
decay over WALL-CLOCK time: the LR reaches 0 exactly when --max-minutes of training
have passed, however many steps that turns out to be. Why: the CPU is shared with other
jobs and its speed varied 3x within one run; a step-count schedule sized from a probe
would either stop early with a high LR or overrun the time budget.
Checkpoints every --save-steps (with the wall time spent so far); --resume continues
from the latest one (optimizer, RNG, data order and the time already spent are restored).
--max-steps is only an upper bound.

Usage:  python pretrain.py --work-dir /tmp/pretrain_base --max-minutes 40
        python pretrain.py --work-dir /tmp/pretrain_base --max-minutes 40 --resume
"""

import argparse
import json
import math
import os
import random
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

# Model shape: 6 x 256, ~7.0M parameters (4 layers = 5.4M). A 20-step probe of the 4-layer
# model ran at ~3,500 tok/s here and the corpus is only ~1.7M tokens, so 40 minutes can
# cover it more than once even with 6 layers: spend spare compute on depth, not repetition.
MODEL = dict(n_layer=6, n_embd=256, n_head=4, n_positions=512, vocab_size=8192)


def load_blocks(path, tok, block, dialogue_repeats=1, seed=0):
    """Token blocks of length `block` from a corpus jsonl file."""
    eos = tok.eos_token_id
    docs = []
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            if "text" in d:
                docs.append(tok(d["text"])["input_ids"] + [eos])
            else:
                ids = []
                for turn in d["turns"]:
                    ids += tok(turn)["input_ids"] + [eos]
                # The dialogues are <1% of the characters; repeating them makes the
                # turn/EOS structure visible to the model more than a handful of times.
                docs += [ids] * dialogue_repeats
    random.Random(seed).shuffle(docs)  # mix sources so blocks are not one manual long
    stream = [t for d in docs for t in d]
    n = len(stream) // block
    blocks = torch.tensor(stream[: n * block], dtype=torch.long).view(n, block)
    return blocks, len(stream)


class Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks):
        self.blocks = blocks

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        # labels = inputs: GPT2LMHeadModel shifts them itself
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class Clock:
    """Training wall time, accumulated across resumed processes."""

    def __init__(self, budget_s, spent_before_s=0.0):
        self.budget, self.before, self.t0 = budget_s, spent_before_s, time.time()

    def spent(self):
        return self.before + time.time() - self.t0

    def fraction(self):
        return min(1.0, self.spent() / self.budget)


class TimeGuard(TrainerCallback):
    """Stop (and save) when the time budget is used; store the time spent in checkpoints."""

    def __init__(self, clock):
        self.clock = clock

    def on_step_end(self, args, state, control, **kw):
        if self.clock.fraction() >= 1.0:
            print(f"time budget used: stopping at step {state.global_step}", flush=True)
            control.should_training_stop = True
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kw):
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        with open(os.path.join(ckpt, "wall_clock.json"), "w") as f:
            json.dump({"spent_seconds": self.clock.spent()}, f)


class TimeCosineTrainer(Trainer):
    """Trainer whose LR = warm-up over steps x cosine over the fraction of time used."""

    def __init__(self, *a, clock, warmup_steps, **kw):
        super().__init__(*a, **kw)
        self.clock, self.warmup_steps = clock, warmup_steps

    def create_scheduler(self, num_training_steps, optimizer=None):
        if self.lr_scheduler is None:

            def factor(step):
                warm = min(1.0, (step + 1) / self.warmup_steps)
                return warm * 0.5 * (1.0 + math.cos(math.pi * self.clock.fraction()))

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        return self.lr_scheduler


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work-dir", default="/tmp/pretrain_base")
    ap.add_argument("--max-steps", type=int, default=20000, help="upper bound only")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=65)
    ap.add_argument("--save-steps", type=int, default=150)
    ap.add_argument("--dialogue-repeats", type=int, default=3)
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=40.0,
        help="training wall-time budget (across resumes); the LR decays to 0 at it",
    )
    ap.add_argument("--run-name", default="run")
    ap.add_argument("--n-layer", type=int, default=MODEL["n_layer"])
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(2)  # the CI/dev machines have 2 cores
    torch.manual_seed(42)
    tok = GPT2TokenizerFast.from_pretrained(os.path.join(args.work_dir, "tokenizer"))
    t0 = time.time()
    blocks, n_tok = load_blocks(
        os.path.join(args.work_dir, "corpus", "train.jsonl"), tok, args.block, args.dialogue_repeats
    )
    heldout, _ = load_blocks(os.path.join(args.work_dir, "corpus", "heldout.jsonl"), tok, args.block)
    print(
        f"train corpus: {n_tok:,} tokens -> {len(blocks):,} blocks of {args.block} "
        f"({time.time() - t0:.0f}s to tokenize)",
        flush=True,
    )

    MODEL["n_layer"] = args.n_layer
    config = GPT2Config(
        **MODEL,
        n_ctx=MODEL["n_positions"],
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
        # No dropout while pretraining: a few passes over the data by a 7M model is
        # under-fitting, not over-fitting (the held-out loss logged below checks this).
        # (export_model.py restores GPT-2's 0.1 for downstream fine-tuning.)
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    print(f"model: {MODEL}, {n_params:,} parameters", flush=True)

    out = os.path.join(args.work_dir, args.run_name)
    targs = TrainingArguments(
        output_dir=out,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,  # GPT-style betas: steadier with small batches
        max_grad_norm=1.0,
        logging_steps=20,
        # held-out loss logged at every checkpoint to watch for over-fitting across
        # epochs; it is only logged, never used to pick a checkpoint.
        eval_strategy="steps",
        eval_steps=args.save_steps,
        per_device_eval_batch_size=32,
        save_steps=args.save_steps,
        save_total_limit=2,
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,  # only 2 cores: workers would steal them from matmuls
        disable_tqdm=True,
        seed=42,
    )
    spent = 0.0
    if args.resume:  # time already spent, as recorded in the checkpoint we resume from
        with open(os.path.join(get_last_checkpoint(out), "wall_clock.json")) as f:
            spent = json.load(f)["spent_seconds"]
        print(f"resuming: {spent / 60:.1f} of {args.max_minutes} minutes already spent")
    clock = Clock(args.max_minutes * 60, spent)
    trainer = TimeCosineTrainer(
        model=model,
        args=targs,
        train_dataset=Blocks(blocks),
        eval_dataset=Blocks(heldout),
        callbacks=[TimeGuard(clock)],
        clock=clock,
        warmup_steps=args.warmup_steps,
    )
    t0 = time.time()
    result = trainer.train(resume_from_checkpoint=True if args.resume else None)
    wall = time.time() - t0
    trainer.save_model(os.path.join(out, "final"))
    tok.save_pretrained(os.path.join(out, "final"))

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    step = trainer.state.global_step
    summary = {
        "model": MODEL,
        "parameters": n_params,
        "train_corpus_tokens": n_tok,
        "train_blocks": len(blocks),
        "batch_size": args.batch_size,
        "block": args.block,
        "max_steps": args.max_steps,
        "steps_done": step,
        "tokens_seen": step * args.batch_size * args.block,
        "epochs": step * args.batch_size / len(blocks),
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "schedule": f"cosine over {args.max_minutes} min of wall time",
        "wall_seconds_total": round(clock.spent(), 1),
        "dialogue_repeats": args.dialogue_repeats,
        "wall_seconds_this_process": round(wall, 1),
        "resumed": args.resume,
        "train_runtime_reported": result.metrics.get("train_runtime"),
        "eval_history": [
            {"step": h["step"], "eval_loss": h["eval_loss"]} for h in trainer.state.log_history if "eval_loss" in h
        ],
        "final_logged_train_loss": losses[-1] if losses else None,
        "mean_train_loss_last_5_logs": sum(losses[-5:]) / len(losses[-5:]) if losses else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    # Append so that a resumed run keeps the record of the earlier process(es).
    with open(os.path.join(out, "train_summary.jsonl"), "a") as f:
        f.write(json.dumps(summary) + "\n")
    print(json.dumps(summary, indent=1), flush=True)


if __name__ == "__main__":
    main()
