"""`lora-med train` on the Trainer's DDP: two processes on the CPU (gloo) under torchrun, as
`python -m torch.distributed.run --nproc_per_node 2 -m lora_med train ...` runs it.

Every process trains; rank 0 alone writes the run folder. So the folder holds what a one-process run's holds
(one card, one metrics line per step, one TensorBoard log, whole checkpoints renamed into place once), with the
effective batch and the tokens seen counted over both processes, and a killed run resumes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_med.config import TrainConfig
from lora_med.train.main import train

from .conftest import REPO

pytestmark = pytest.mark.slow  # several processes each

# With chunked cross-entropy: its loss runs outside the DDP-wrapped forward, which must still sync gradients.
SETTINGS = dict(
    max_steps=4,
    batch_size=2,
    log_every=1,
    save_every=2,
    eval_every=4,
    r=4,
    alpha=8,
    learning_rate=1e-2,
    compare=False,
    seed=0,
    chunked_ce=True,
    loss_chunk=64,
)
# As flags. torchrun reads abbreviations of its own options anywhere on the line (--r would be taken for
# --rdzv-*), so the LoRA rank goes by its alias --lora_r.
FLAGS = [
    "--max-steps",
    "4",
    "--batch-size",
    "2",
    "--log-every",
    "1",
    "--save-every",
    "2",
    "--eval-every",
    "4",
    "--lora_r",
    "4",
    "--lora_alpha",
    "8",
    "--learning-rate",
    "1e-2",
    "--no-compare",
    "--seed",
    "0",
    "--chunked-ce",
    "--loss-chunk",
    "64",
]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _files(run: Path) -> list[str]:
    """Every path in a run folder; each process's RNG state file as one name, TensorBoard logs by count."""
    names = []
    for p in sorted(run.rglob("*")):
        rel = p.relative_to(run).as_posix()
        rel = re.sub(r"rng_state(_\d+)?\.pth$", "rng_state*.pth", rel)
        rel = re.sub(r"events\.out\.tfevents\..*$", "events.out.tfevents.*", rel)
        names.append(rel)
    return sorted(set(names)) + [f"tfevents x{sum('tfevents' in n for n in map(str, run.rglob('*')))}"]


def _lines(run: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], "loss" if "loss" in r else "eval" if "eval_loss" in r else "end") for r in rows]


@pytest.fixture(scope="module")
def two_runs(tiny_base, conversations_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    data = dict(
        data=str(conversations_file), eval_data=str(conversations_file), allow_eval_overlap=True, base=str(tiny_base)
    )
    one = train(TrainConfig(**data, **SETTINGS, output=str(root / "one"))).output
    r = subprocess.run(
        [
            *TORCHRUN,
            "-m",
            "lora_med",
            "train",
            "--base",
            str(tiny_base),
            "--data",
            str(conversations_file),
            "--eval-data",
            str(conversations_file),
            "--allow-eval-overlap",
            "--output",
            str(root / "two"),
            *FLAGS,
        ],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return one, root / "two", r.stdout


def test_two_processes_write_what_one_writes(two_runs):
    one, two, stdout = two_runs
    assert _files(two) == _files(one)  # same files; one TensorBoard log; no .lock left, no .partial checkpoint
    assert _lines(two) == _lines(one) == [(1, "loss"), (2, "loss"), (3, "loss"), (4, "loss"), (4, "eval"), (4, "end")]
    for text in ("Done: train loss", "step 1/4 ", "eval @ step 4 ", "Saved to ", "Memory levers: "):
        assert stdout.count(text) == 1, text  # printed by rank 0 only


def test_two_processes_count_the_batch_and_tokens_of_both(two_runs):
    one, two, _ = two_runs
    c1, c2 = (json.loads((run / "run.json").read_text()) for run in (one, two))
    assert c2["status"] == "complete" and c2["resolved"]["world_size"] == 2 and c1["resolved"]["world_size"] == 1
    assert c2["metrics"]["effective_batch"] == 2 * c1["metrics"]["effective_batch"] == 4
    assert c2["plan"]["effective_batch"] == 4 and c2["plan"]["world_size"] == 2
    assert c2["resolved"]["levers"] == c1["resolved"]["levers"] == ["sdpa", "chunked_ce"]
    # 4 steps x 2 conversations x 2 processes = two epochs of the 8 conversations, vs one epoch for one process
    assert c2["metrics"]["tokens_seen"] == 2 * c1["metrics"]["tokens_seen"] > 0
    assert c2["metrics"]["tokens_per_s"] > 0 and c2["metrics"]["steps"] == 4
    logged = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["num_input_tokens_seen"] == c2["metrics"]["tokens_seen"]


def test_two_processes_save_the_same_adapter_shapes(two_runs):
    one, two, _ = two_runs
    a, b = (load_file(str(run / "adapter_model.safetensors")) for run in (one, two))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert all(torch.isfinite(v).all() for v in b.values())
    ckpt = sorted(p.name for p in (two / "checkpoints" / "checkpoint-4").iterdir())
    assert "rng_state_0.pth" in ckpt and "rng_state_1.pth" in ckpt  # each process's, written before the rename


def test_two_processes_resume_after_a_kill(two_runs, tiny_base, conversations_file, tmp_path):
    """Rank 0 killed with SIGKILL at step 3 (after checkpoint-2): torchrun stops the other; a resume with two
    processes finishes the run as the uninterrupted one did. Before the kill, both processes hold the same
    weights (DDP synchronised the gradients, the chunked loss's included)."""
    _, reference, _ = two_runs
    out = tmp_path / "killed"
    settings = dict(
        data=str(conversations_file),
        eval_data=str(conversations_file),
        allow_eval_overlap=True,
        base=str(tiny_base),
        output=str(out),
        **SETTINGS,
    )
    script = tmp_path / "killed_at_step_3.py"
    script.write_text(f"""
import json, os, signal
from transformers import TrainerCallback
from lora_med.config import TrainConfig
from lora_med.train import train
class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == 2:
            weights = {{n: p.detach().double().sum().item() for n, p in model.named_parameters() if p.requires_grad}}
            open({str(tmp_path)!r} + f"/weights-{{args.process_index}}.json", "w").write(json.dumps(weights))
        if state.is_world_process_zero and state.global_step == 3:
            os.kill(os.getpid(), signal.SIGKILL)
train(TrainConfig(**{settings!r}), callbacks=[Kill()])
""")
    # A script's own folder heads sys.path, not the working directory: point Python at this checkout.
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), ENV.get("PYTHONPATH")]))}
    killed = subprocess.run([*TORCHRUN, str(script)], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name != ".partial") == ["checkpoint-2"]
    w0, w1 = (json.loads((tmp_path / f"weights-{rank}.json").read_text()) for rank in (0, 1))
    assert w0.keys() == w1.keys() and w0 == pytest.approx(w1, rel=1e-6, abs=1e-9)
    assert any(v != 0 for k, v in w0.items() if "lora_B" in k)  # trained, not the zeros LoRA B starts at
    resumed = subprocess.run(
        [*TORCHRUN, "-m", "lora_med", "train", "--resume", str(out)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert resumed.stdout.count("Resuming from") == 1 and "took over a stale lock" in resumed.stdout
    card, ref = (json.loads((d / "run.json").read_text()) for d in (out, reference))
    assert card["status"] == "complete" and card["metrics"]["steps"] == 4 and card["resolved"]["world_size"] == 2
    assert card["metrics"]["train_loss"] == pytest.approx(ref["metrics"]["train_loss"], rel=1e-4)
    assert [s for s, kind in _lines(out) if kind == "loss"] == [1, 2, 3, 4]  # steps 1-2 before, 3-4 after
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (reference, out))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0, msg=k)
