"""Resume is exact at every checkpoint: a run killed with SIGKILL at any point and continued with
`lora-med train --resume` ends with the adapter of the run that was never interrupted (within 1e-5), the same
losses step by step, and a metrics.jsonl that is the record of the run that finished (what the dead process logged
after its checkpoint is dropped, nothing before it is lost).

The run: 12 training conversations, batch 2 (6 steps an epoch), 2 epochs, a checkpoint every 2 steps and an
evaluation every epoch (or both every epoch, the defaults). The kill is a real SIGKILL that the process sends itself
from a Trainer callback at a chosen moment (after a step, after a log line, right after a checkpoint, after
training), so that it lands at the same place every time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import CONVERSATIONS, REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}

# Trains with the settings in argv[2] (JSON), killing itself (SIGKILL) at argv[3]: "step:N" (a step's end, before its
# log line and checkpoint), "log:N" (after a log line of step N is written), "save:N" (checkpoint-N in place),
# "end" (training over, the final evaluation not yet done), or "" (never).
KILLER = """if True:
    import json, os, signal, sys
    from transformers import TrainerCallback
    from lora_med.config import TrainConfig
    from lora_med.train.main import train
    at = sys.argv[2]
    def die(now):
        if now == at:
            os.kill(os.getpid(), signal.SIGKILL)
    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kw): die(f"step:{state.global_step}")
        def on_log(self, args, state, control, **kw): die(f"log:{state.global_step}")
        def on_save(self, args, state, control, **kw): die(f"save:{state.global_step}")
        def on_train_end(self, args, state, control, **kw): die("end")
    train(TrainConfig(**json.loads(sys.argv[1])), callbacks=[Kill()])
"""
EXTRA = [{"user": f"Pregunta número {i}", "assistant": f"Respuesta {i}, con gusto."} for i in range(4)]
EVAL = [
    {"user": "¿Atienden los sábados?", "assistant": "Sí, de 8:00 a 12:00."},
    {"user": "¿Dónde están?", "assistant": "En la avenida principal, Santa Cruz."},
]
SCHEDULES = {
    "checkpoint every 2 steps, eval every epoch": {"save_every": 2},
    "checkpoint and eval every epoch": {},
}


@pytest.fixture(scope="module")
def files(tiny_base, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("resume")
    (d / "train.json").write_text(json.dumps(CONVERSATIONS + EXTRA, ensure_ascii=False), encoding="utf-8")
    (d / "eval.json").write_text(json.dumps(EVAL, ensure_ascii=False), encoding="utf-8")
    return {"dir": d, "base": tiny_base}


def settings(files: dict, out: Path, schedule: str) -> dict:
    return {
        "data": str(files["dir"] / "train.json"),
        "eval_data": str(files["dir"] / "eval.json"),
        "base": str(files["base"]),
        "output": str(out),
        "epochs": 2,
        "batch_size": 2,
        "log_every": 1,
        "compare": False,
        "r": 4,
        "alpha": 8,
        "seed": 0,
        "learning_rate": 1e-2,  # large enough that a different order or dropout shows in the adapter
        "report_to": ["none"],
        **SCHEDULES[schedule],
    }


def run(files: dict, out: Path, schedule: str, kill_at: str = "") -> int:
    cmd = [sys.executable, "-c", KILLER, json.dumps(settings(files, out, schedule)), kill_at]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600).returncode


def metrics(run_dir: Path) -> list[tuple]:
    """metrics.jsonl as (step, what, value): the loss and eval lines, in order (the runtime summary left out)."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        for key in ("loss", "eval_loss"):
            if key in row:
                out.append((row["step"], key, row[key]))
    return out


def adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def reference(files) -> dict:
    """The uninterrupted run of each schedule."""
    out = {}
    for schedule in SCHEDULES:
        d = files["dir"] / f"reference-{len(out)}"
        assert run(files, d, schedule) == 0
        out[schedule] = d
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "schedule,kill_at,resumes_from",
    [
        ("checkpoint every 2 steps, eval every epoch", "step:3", "checkpoint-2"),  # mid-epoch
        ("checkpoint every 2 steps, eval every epoch", "log:7", "checkpoint-6"),  # after the epoch boundary
        ("checkpoint every 2 steps, eval every epoch", "save:6", "checkpoint-6"),  # at the epoch boundary
        ("checkpoint every 2 steps, eval every epoch", "step:12", "checkpoint-10"),  # before the last checkpoint
        ("checkpoint every 2 steps, eval every epoch", "end", "checkpoint-12"),  # after training
        ("checkpoint and eval every epoch", "log:8", "checkpoint-6"),
        ("checkpoint and eval every epoch", "save:6", "checkpoint-6"),
    ],
)
def test_resume_after_kill_9_equals_the_uninterrupted_run(files, reference, tmp_path, schedule, kill_at, resumes_from):
    out = tmp_path / "run"
    assert run(files, out, schedule, kill_at) == -9, "the run was not killed"
    resumed = subprocess.run(
        [sys.executable, "-m", "lora_med", "train", "--resume", str(out)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert resumes_from in resumed.stdout
    ref = reference[schedule]
    a, b = adapter(ref), adapter(out)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    got, want = metrics(out), metrics(ref)
    assert [(s, k) for s, k, _ in got] == [(s, k) for s, k, _ in want], "a line lost or written twice"
    assert max(abs(x - y) for (_, _, x), (_, _, y) in zip(got, want)) <= 1e-5
    card, ref_card = (json.loads((d / "run.json").read_text()) for d in (out, ref))
    assert card["status"] == "complete"
    assert abs(card["metrics"]["train_loss"] - ref_card["metrics"]["train_loss"]) <= 1e-5
    assert abs(card["metrics"]["eval_loss"] - ref_card["metrics"]["eval_loss"]) <= 1e-5
