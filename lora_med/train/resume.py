"""What makes a resumed run the run that was never interrupted: evaluations inside the checkpoint they precede, and
a metrics.jsonl cut back to its checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import TrainerCallback

# In each checkpoint: the loss sum so far (the Trainer keeps only this process's) and metrics.jsonl's length then.
STATE_FILE = "lora_med_state.json"


class EvaluateBeforeSave(TrainerCallback):
    """With evaluation every epoch, the Trainer evaluates at an epoch's end in a second pass, after that step's
    checkpoint was saved (a step's save comes before the epoch's evaluation). That evaluation is then in no
    checkpoint: a resume from it skipped the evaluation (its metrics line was lost) and its draw from the RNG (every
    DataLoader iterator takes a seed), so the next epoch's data order and dropout differed from an uninterrupted
    run's. Here the evaluation moves into the step's own pass, before its save, and the epoch's pass skips it."""

    def __init__(self) -> None:
        self.evaluated_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        ends_epoch = abs(state.epoch - round(state.epoch)) < 1e-6 or state.global_step >= state.max_steps
        if args.eval_strategy == "epoch" and ends_epoch:
            control.should_evaluate = True
            self.evaluated_at = state.global_step
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.evaluated_at == state.global_step:  # (after DefaultFlowCallback, which asked for it again)
            control.should_evaluate = False
        return control


def rewind_metrics(metrics_file: Path, ckpt: Path | None) -> None:
    """Make metrics.jsonl the record of the run being resumed from ``ckpt`` (None: from step 0): the lines written
    after that checkpoint (by the process that died) are cut off; the resumed run writes them again."""
    if not metrics_file.is_file():
        return
    keep = 0
    if ckpt is not None:
        try:
            keep = int(json.loads((ckpt / STATE_FILE).read_text())["metrics_bytes"])
        except (OSError, ValueError, KeyError, TypeError):  # a checkpoint from before the length was recorded
            step = json.loads((ckpt / "trainer_state.json").read_text())["global_step"]
            lines = metrics_file.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
            keep = sum(len(ln.encode("utf-8")) for ln in kept)
            metrics_file.write_text("".join(kept), encoding="utf-8")
    if metrics_file.stat().st_size > keep:
        os.truncate(metrics_file, keep)
