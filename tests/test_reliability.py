"""Nothing lost, no tracebacks: every class of careless use, with its exit code or error, its message, and the
bytes on disk before and after.

Classes: destructive --overwrite; outputs that are inputs; YAML/flag/Python types; bounds that depend
on the model; one run per folder (locks, stale locks); truncated checkpoints (test_train.py); corrupt or
wrong-shaped cards; a read-only output; a FIFO or /dev/zero as data; a merge-export killed mid-way; bench inputs
that do not belong together; data check's exit code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lora_med import runs, settings
from lora_med.bench.main import bench
from lora_med.cards import TrainCard
from lora_med.config import BenchConfig, ExportConfig, TrainConfig
from lora_med.errors import ConfigError, DatasetError, LoraMedError
from lora_med.export.main import merge_export
from lora_med.train.main import train

from .conftest import run_cli, tiny_train_config


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (itself included if a file) -> its SHA-256: the bytes on disk."""
    root = Path(root)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# --------------------------------------------------------------------------- destructive overwrite


def test_overwrite_never_empties_a_folder_lora_med_did_not_write(tiny_base, tmp_path, monkeypatch, capsys):
    from .conftest import CONVERSATIONS

    proj = tmp_path / "userproj"
    proj.mkdir()
    (proj / "data.json").write_text(json.dumps(CONVERSATIONS, ensure_ascii=False))
    (proj / "notes.txt").write_text("mis notas")
    before = snapshot(proj)
    monkeypatch.chdir(tmp_path)
    code, out = run_cli(
        monkeypatch,
        capsys,
        "train",
        "--data",
        "userproj/data.json",
        "--eval-data",
        "userproj/data.json",
        "--base",
        str(tiny_base),
        "--output",
        "userproj",
        "--overwrite",
        "--max-steps",
        "1",
    )
    assert code == 2 and "Traceback" not in out
    assert "--output userproj: contains the training data userproj/data.json; an output may not be an input" in out
    assert snapshot(proj) == before


def test_overwrite_of_the_working_directory_is_refused(tiny_base, conversations_file, tmp_path, monkeypatch, capsys):
    work = tmp_path / "here"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    before = snapshot(work)
    monkeypatch.chdir(work)
    code, out = run_cli(
        monkeypatch,
        capsys,
        "train",
        "--data",
        str(conversations_file),
        "--base",
        str(tiny_base),
        "--output",
        ".",
        "--overwrite",
    )
    assert code == 2 and "--output .: is the working directory" in out and snapshot(work) == before


def test_output_that_is_the_base_is_refused(tiny_base, conversations_file, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    before = snapshot(base)
    with pytest.raises(
        ConfigError, match=r"TrainConfig.output \S+/base: is the base model .*an output may not be an input"
    ):
        train(tiny_train_config(base, conversations_file, base, method="full"))
    assert snapshot(base) == before


def test_overwrite_names_foreign_files_in_a_run_folder(trained, tiny_base, conversations_file, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["lora"], run)
    (run / "my-notes.md").write_text("apuntes")
    before = snapshot(run)
    with pytest.raises(ConfigError, match=r"holds files lora-med did not write \(my-notes.md\)"):
        train(tiny_train_config(tiny_base, conversations_file, run, overwrite=True))
    assert snapshot(run) == before


def test_overwrite_of_a_run_lora_med_wrote_replaces_only_its_entries(tiny_base, conversations_file, tmp_path):
    run = tmp_path / "run"
    first = train(tiny_train_config(tiny_base, conversations_file, run, max_steps=1))
    second = train(tiny_train_config(tiny_base, conversations_file, run, max_steps=2, overwrite=True))
    assert second.run["metrics"]["steps"] == 2 and first.run["metrics"]["steps"] == 1
    assert runs.foreign_entries(run) == []
    assert [
        json.loads(line)["step"]
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ] == [1, 2], "the old run's metrics are gone, not appended to"


def test_overwrite_never_follows_a_marker_out_of_its_folder(trained, tiny_base, conversations_file, tmp_path):
    proj = tmp_path / "proj"
    run = proj / "run"
    shutil.copytree(trained["lora"], run)
    (proj / "victim").mkdir()
    (proj / "victim" / "a.txt").write_text("mío")
    (tmp_path / "abs").mkdir()
    (tmp_path / "abs" / "b.txt").write_text("mío")
    m = json.loads((run / ".lora-med").read_text())
    m["entries"] += ["../victim", str(tmp_path / "abs"), ".."]  # hand-edited or damaged
    (run / ".lora-med").write_text(json.dumps(m))
    before = {**snapshot(proj / "victim"), **snapshot(tmp_path / "abs")}
    train(tiny_train_config(tiny_base, conversations_file, run, max_steps=1, overwrite=True))
    assert {**snapshot(proj / "victim"), **snapshot(tmp_path / "abs")} == before


def test_a_damaged_marker_makes_the_folder_foreign(trained, tiny_base, conversations_file, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["lora"], run)
    (run / ".lora-med").write_text(json.dumps({"kind": "lora-med.train", "entries": [{"x": 1}]}))
    before = snapshot(run)
    with pytest.raises(ConfigError, match="lora-med did not write it"):
        train(tiny_train_config(tiny_base, conversations_file, run, overwrite=True))
    assert snapshot(run) == before


@pytest.mark.parametrize("where", ["parent", "run"])
def test_export_over_its_own_run_or_its_parent_is_refused(trained, tmp_path, where):
    parent = tmp_path / "proj"
    run = parent / "lora"
    shutil.copytree(trained["lora"], run)
    before = snapshot(parent)
    target = parent if where == "parent" else run
    with pytest.raises(ConfigError) as e:
        merge_export(ExportConfig(run_dir=str(run), output=str(target), overwrite=True))
    assert f"ExportConfig.output {target}: {'contains' if where == 'parent' else 'is'} the training run" in str(e.value)
    assert snapshot(parent) == before


def test_export_over_a_foreign_folder_is_refused(trained, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.bin").write_bytes(b"\0")
    before = snapshot(out)
    with pytest.raises(ConfigError, match="already exists and lora-med did not write it"):
        merge_export(ExportConfig(run_dir=str(trained["lora"]), output=str(out), overwrite=True))
    assert snapshot(out) == before


def test_bench_report_folder_with_foreign_files_is_refused(trained, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "draft.md").write_text("x")
    with pytest.raises(ConfigError, match=r"BenchConfig.out \S+/report: already exists and lora-med did not write it"):
        bench(BenchConfig(run=str(trained["lora"]), out=str(out)))
    assert sorted(p.name for p in out.iterdir()) == ["draft.md"]


def test_resume_of_a_finished_run_changes_nothing(trained, tmp_path, monkeypatch, capsys):
    run = tmp_path / "done"
    shutil.copytree(trained["lora"], run)
    before = snapshot(run)
    code, out = run_cli(monkeypatch, capsys, "train", "--resume", str(run))
    assert code == 2 and "that run is finished; nothing to resume" in out and snapshot(run) == before


def _interrupted_copy(trained, tmp_path, status="running") -> Path:
    """The finished LoRA run copied elsewhere and marked as interrupted after its last checkpoint."""
    run = tmp_path / "moved" / "run"
    shutil.copytree(trained["lora"], run)
    card = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**card, "status": status}))
    return run


@pytest.mark.slow
def test_a_copied_run_resumes_where_it_is(trained, tmp_path, monkeypatch, capsys):
    run = _interrupted_copy(trained, tmp_path)
    code, out = run_cli(monkeypatch, capsys, "train", "--resume", str(run))
    assert code == 0 and "training had finished; running the final evaluation" in out, out
    assert json.loads((run / "run.json").read_text())["status"] == "complete"


def test_resume_refuses_training_data_edited_since(trained, tmp_path, monkeypatch, capsys):
    from .conftest import CONVERSATIONS

    run = _interrupted_copy(trained, tmp_path)
    data = tmp_path / "convs.json"
    data.write_text(json.dumps(CONVERSATIONS[:5], ensure_ascii=False))
    card = json.loads((run / "run.json").read_text())
    card["config"].update(data=str(data), eval_data=str(data))
    (run / "run.json").write_text(json.dumps(card))
    before = snapshot(run)
    code, out = run_cli(monkeypatch, capsys, "train", "--resume", str(run))
    assert code == 2 and f"the training data {data} changed since the run started" in out, out
    assert snapshot(run) == before


# --------------------------------------------------------------------------- types: YAML, flags, Python


@pytest.mark.parametrize(
    "yaml_text,field,value",
    [
        ("learning_rate: 2e-4\n", "learning_rate", 2e-4),  # a string to PyYAML
        ("learning_rate: '3.0e-3'\n", "learning_rate", 3e-3),
        ("target_modules: c_attn\n", "target_modules", ["c_attn"]),  # one module, not six characters
        ("target_modules: c_attn, c_fc\n", "target_modules", ["c_attn", "c_fc"]),
        ("target_modules: [c_attn, c_proj]\n", "target_modules", ["c_attn", "c_proj"]),
        ("batch_size: '8'\n", "batch_size", 8),
        ("epochs: 2\n", "epochs", 2.0),
        ("max_length: 128.0\n", "max_length", 128),
        ("num_train_epochs: 4\n", "epochs", 4.0),  # the Hugging Face name
        ("lora_r: 4\n", "r", 4),
        ("eval-fraction: 0.2\neval_data: split\n", "eval_fraction", 0.2),
        ("report_to: none\n", "report_to", ["none"]),
    ],
)
def test_yaml_values_are_coerced_to_their_declared_type(tmp_path, yaml_text, field, value):
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    cfg = settings.load_config(TrainConfig, f)
    assert settings.check(cfg) == [] and getattr(cfg, field) == value


@pytest.mark.parametrize(
    "yaml_text,message",
    [
        ("r: null\n", "r: None (in {f}): must be a whole number, not null"),
        ("r: [1, 2]\n", "r: 1,2 (in {f}): must be a whole number, got a list"),
        ("r: true\n", "r: True (in {f}): must be a whole number, got a boolean"),
        ("r: 2.5\n", "r: 2.5 (in {f}): must be a whole number, got 2.5"),
        ("learning_rate: fast\n", "learning_rate: fast (in {f}): must be a number, got 'fast'"),
        ("learning_rate: .inf\n", "learning_rate: inf (in {f}): must be a finite number"),
        ("learning_rate: .nan\n", "learning_rate: nan (in {f}): must be a finite number"),
        ("seed: -1\n", "seed: -1 (in {f}): must be >= 0"),
        ("weight_decay: -0.1\n", "weight_decay: -0.1 (in {f}): must be >= 0"),
        ("dropout: 1\n", "dropout: 1 (in {f}): must be in [0, 1)"),
        ("method: prefix\n", "method: prefix (in {f}): use one of lora, qlora, full"),
        ("report_to: [tensorboard, neptune]\n", "use one of tensorboard, wandb, mlflow, none"),
        ("compare: maybe\n", "compare: maybe (in {f}): must be true or false"),
        ("base: 123\n", "base: 123 (in {f}): must be text, got a number"),
        ("target_modules: [c_attn, 3]\n", "must be a list of names, got a number 3"),
    ],
)
def test_yaml_type_errors_name_the_key_and_file(tmp_path, yaml_text, message):
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    problems = settings.check(settings.load_config(TrainConfig, f))
    assert any(message.format(f=f) in p for p in problems), problems


def test_a_yaml_alias_bomb_gives_a_short_message(tmp_path):
    f = tmp_path / "c.yaml"  # 8 levels of 9 references: 43M items if a message quoted it in full
    f.write_text(
        "report_to: [&l0 [x,x,x,x,x,x,x,x,x], "
        + ", ".join(f"&l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 8))
        + "]\n"
    )
    problems = settings.check(settings.load_config(TrainConfig, f))
    assert len(problems) == 1 and problems[0].startswith("report_to: ") and len(problems[0]) < 1000


def test_yaml_problems_reach_the_user_as_errors_not_tracebacks(tiny_base, tmp_path, monkeypatch, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("learning_rate: [1]\nr: null\nbatch_size: many\nlm: 1\n")
    code, out = run_cli(monkeypatch, capsys, "train", "--config", str(f))
    assert code == 2 and "unknown setting(s): lm" in out and "Traceback" not in out
    f.write_text("learning_rate: [1]\nr: null\nbatch_size: many\n")
    code, out = run_cli(monkeypatch, capsys, "train", "--config", str(f), "--base", str(tiny_base))
    assert code == 2 and "3 problem(s)" in out and "Traceback" not in out
    f.write_text("- just\n- a list\n")
    code, out = run_cli(monkeypatch, capsys, "train", "--config", str(f))
    assert code == 2 and "expected a mapping of settings" in out
    f.write_text("r: [unclosed\n")
    code, out = run_cli(monkeypatch, capsys, "train", "--config", str(f))
    assert code == 2 and "invalid YAML" in out


def test_flags_name_the_spelling_typed(tiny_base, conversations_file, monkeypatch, capsys):
    code, out = run_cli(
        monkeypatch,
        capsys,
        "train",
        "--data",
        str(conversations_file),
        "--base",
        str(tiny_base),
        "--lora_r",
        "0",
        "--per_device_train_batch_size",
        "x",
        "--learning_rate",
        "nan",
        "--seed",
        "-3",
    )
    assert code == 2 and "Traceback" not in out
    for m in (
        "--lora_r 0: must be >= 1",
        "--per_device_train_batch_size x: must be a whole number, got 'x'",
        "--learning_rate nan: must be a finite number",
        "--seed -3: must be >= 0",
    ):
        assert m in out


def test_python_api_gets_the_same_checks(tiny_base, conversations_file, tmp_path):
    with pytest.raises(ConfigError) as e:
        train(
            tiny_train_config(
                tiny_base,
                conversations_file,
                tmp_path / "x",
                learning_rate="2e-4x",
                target_modules="c_attn",
                max_grad_norm=float("inf"),
            )
        )
    msg = str(e.value)
    assert "TrainConfig.learning_rate='2e-4x': must be a number" in msg
    assert "TrainConfig.max_grad_norm=inf: must be a finite number" in msg
    assert "target_modules" not in msg, "one string is one module"
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(max_length=512), "TrainConfig.max_length=512: the base reads at most 256 positions"),
        (dict(target_modules=["lm_head"]), "lm_head cannot be a LoRA target"),
        (dict(eval_fraction=0.2), "TrainConfig.eval_fraction=0.2 and TrainConfig.eval_data="),
        (dict(compare=True, compare_max_new_tokens=300), "compare_max_new_tokens=300: the base reads at most 256"),
        (dict(report_to=["none", "tensorboard"]), "none cannot be combined"),
        (dict(r=65), "TrainConfig.r=65: above the width of the adapted layers (64)"),  # and 1e30 would not allocate
        (dict(batch_size=9), "TrainConfig.batch_size=9: more than the 8 training conversations"),
        (dict(run_name="../elsewhere"), "TrainConfig.run_name='../elsewhere': a name, not a path"),
    ],
)
def test_bounds_that_depend_on_the_model_or_other_settings(tiny_base, conversations_file, tmp_path, kw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(tiny_train_config(tiny_base, conversations_file, tmp_path / "x", **kw))
    assert not (tmp_path / "x").exists()


def test_eval_fraction_is_honoured_without_an_eval_file(tiny_base, conversations_file, tmp_path):
    res = train(
        tiny_train_config(
            tiny_base, conversations_file, tmp_path / "x", eval_data="split", eval_fraction=0.25, max_steps=1
        )
    )
    ev = res.run["data"]["eval"]
    assert ev["source"] == "split" and ev["conversations"] == 2 and len(ev["indices"]) == 2  # 25% of 8


def test_plan_for_a_gpu_from_a_machine_without_one(tiny_base, conversations_file, tmp_path, monkeypatch, capsys):
    shape_only = tmp_path / "shape-only"
    shape_only.mkdir()
    for f in tiny_base.iterdir():
        if f.name != "model.safetensors":  # config and tokenizer only: planning reads the shape
            shutil.copy(f, shape_only / f.name)
    plan = train(
        tiny_train_config(shape_only, conversations_file, tmp_path / "p", device="cuda", precision="bf16", vram_gb=8),
        plan_only=True,
    )
    assert plan["device"] == "cuda" and plan["precision"] == "bf16" and plan["total_gb"] > 0
    assert not (tmp_path / "p").exists()
    # The planner's command, as JSON: the estimate per part, the moments, the micro-batch, the levers and why.
    flags = [
        "train",
        "--plan",
        "--device",
        "cuda",
        "--precision",
        "bf16",
        "--vram-gb",
        "8",
        "--base",
        str(shape_only),
        "--data",
        str(conversations_file),
        "--batch-size",
        "16",
        "--output",
        str(tmp_path / "p"),
    ]
    code, out = run_cli(monkeypatch, capsys, *flags, "--json")
    assert code == 0, out
    p = json.loads(out[out.index("{") :])
    assert p["batch_size"] * p["grad_accum"] == p["effective_batch"] == 16 and p["levers"] == ["sdpa"]
    assert p["attention"] == "sdpa" and p["optim"] == "adamw" and p["budget_gb"] == 8
    assert {"weights_gb", "optimizer_gb", "activations_gb", "logits_gb", "cublas_workspace_gb"} <= set(p)
    assert p["peak_at"] in p["moments"] and p["moments"][p["peak_at"]] == pytest.approx(p["total_gb"], abs=2e-3)
    assert p["choice"]["fits"] and p["choice"]["needed_gb"] <= 8 and "within 8 GB" in p["choice"]["reason"]
    code, out = run_cli(monkeypatch, capsys, *flags)
    assert code == 0 and "micro-batch 16 x grad-accum 1" in out and "levers: sdpa" in out and "each moment" in out
    assert not (tmp_path / "p").exists()


def test_vram_budget_too_small_is_named(tiny_base, conversations_file, tmp_path):
    with pytest.raises(ConfigError, match=r"TrainConfig.vram_gb=1e-06: lora does not fit even at batch 1"):
        train(tiny_train_config(tiny_base, conversations_file, tmp_path / "x", vram_gb=1e-6), plan_only=True)


def test_base_folder_without_a_tokenizer(tiny_base, conversations_file, tmp_path):
    base = tmp_path / "no-tok"
    base.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_base / f, base / f)
    with pytest.raises(ConfigError, match="no tokenizer there"):
        train(tiny_train_config(base, conversations_file, tmp_path / "x"))


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda b: (b / "config.json").write_text("[]"), "config.json: not a usable model config"),
        (
            lambda b: (b / "config.json").write_text(
                json.dumps({**json.loads((b / "config.json").read_text()), "n_layer": "two"})
            ),
            "config.json does not describe a model",
        ),
        (lambda b: (b / "tokenizer.json").write_text("{not json"), "the tokenizer files cannot be loaded"),
        (
            lambda b: (b / "model.safetensors").write_bytes((b / "model.safetensors").read_bytes()[:5000]),
            "model.safetensors: not a complete safetensors file",
        ),
    ],
)
def test_a_damaged_base_folder_is_named(tiny_base, conversations_file, tmp_path, damage, message):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    damage(base)
    with pytest.raises(LoraMedError, match=message):
        train(tiny_train_config(base, conversations_file, tmp_path / "x", max_steps=1))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("what", ["file", "empty folder", "missing"])
def test_base_or_tokenizer_that_is_not_a_model_folder(
    tiny_base, conversations_file, tmp_path, monkeypatch, capsys, what
):
    path = tmp_path / "thing"
    if what == "file":
        path.write_text("[]")  # transformers would read it as a config
    elif what == "empty folder":
        path.mkdir()
    code, out = run_cli(monkeypatch, capsys, "data", "check", str(conversations_file), "--tokenizer", str(path))
    assert code == 2 and f"--tokenizer {path}" in out and "Traceback" not in out, out
    code, out = run_cli(monkeypatch, capsys, "train", "--data", str(conversations_file), "--base", str(path))
    assert code == 2 and "Traceback" not in out and str(path) in out, out


def test_names_the_system_refuses_are_errors(tiny_base, conversations_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    os.symlink("loop", tmp_path / "loop")
    for args in (["--data", "x" * 300], ["--output", "x" * 300], ["--data", "loop"], ["--output", "loop"]):
        code, out = run_cli(
            monkeypatch, capsys, "train", "--data", str(conversations_file), "--base", str(tiny_base), *args
        )
        assert code == 2 and "Traceback" not in out, out
        assert ("File name too long" if "x" * 300 in args else f"{args[0]} loop") in out, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop"]


# --------------------------------------------------------------------------- one run at a time


def _holder() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


@pytest.mark.slow
def test_a_second_train_on_the_same_folder_is_refused_while_the_first_runs(tiny_base, conversations_file, tmp_path):
    out = tmp_path / "run"
    runs.claim(out, "train", "run.json")  # what a run in progress holds: its marker, its card, its lock
    (out / "run.json").write_text(json.dumps({"kind": "lora-med.train", "status": "running"}))
    proc = _holder()
    try:
        (out / ".lock").write_text(json.dumps({"pid": proc.pid, "started": runs._start_time(proc.pid)}))
        before = snapshot(out)
        for kw in (dict(), dict(overwrite=True), dict(resume=str(out), output=None)):
            with pytest.raises(LoraMedError, match=f"in use by pid {proc.pid}"):
                train(tiny_train_config(tiny_base, conversations_file, out, **kw))
        assert snapshot(out) == before
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_a_stale_lock_is_taken_over(tiny_base, conversations_file, tmp_path, capsys):
    out = tmp_path / "run"
    runs.claim(out, "train")  # a folder lora-med made, whose process was killed before it wrote more
    proc = _holder()
    proc.kill()
    proc.wait()
    (out / ".lock").write_text(json.dumps({"pid": proc.pid, "started": "1"}))
    res = train(tiny_train_config(tiny_base, conversations_file, out, max_steps=1))
    assert res.run["status"] == "complete" and "took over a stale lock" in capsys.readouterr().out
    assert not (out / ".lock").exists()


def test_a_run_that_dies_is_marked_failed_with_the_reason(tiny_base, conversations_file, tmp_path):
    from transformers import TrainerCallback

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            raise RuntimeError("disk on fire")

    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        train(tiny_train_config(tiny_base, conversations_file, out), callbacks=[Boom()])
    card = json.loads((out / "run.json").read_text())
    assert card["status"] == "failed" and card["failure"]["reason"] == "RuntimeError: disk on fire"
    with pytest.raises(LoraMedError, match="it failed: RuntimeError: disk on fire.*--resume"):
        runs.load_card(out, "train")


# --------------------------------------------------------------------------- Ctrl-C


@pytest.mark.slow
def test_ctrl_c_dropped_in_a_finalizer_still_stops_the_command():
    from .conftest import REPO

    code = """if True:
        import os, signal, time
        from lora_med.cli import _CtrlC
        _CtrlC.install()  # what cli.main does first
        class Finalized:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)  # raised in here: CPython drops it ("Exception ignored in")
                sum(range(1000))
        try:
            Finalized()
            deadline = time.time() + 5
            while time.time() < deadline:
                sum(range(1000))
            print("not interrupted")
        except KeyboardInterrupt:
            print("interrupted")
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.stdout.strip() == "interrupted", out.stdout + out.stderr


def test_ctrl_c_surfacing_as_another_exception_is_an_abort():
    from lora_med.cli import _interrupted

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:  # what CPython does when C code calls back into Python (torch's tracer)
            raise SystemError("<method '__bool__'> returned a result with an exception set") from e
    except SystemError as e:
        assert _interrupted(e)
    assert not _interrupted(ValueError("not an interrupt"))


# --------------------------------------------------------------------------- corrupt cards


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda c: "{ not json", "run.json: not valid JSON"),
        (lambda c: json.dumps([1, 2]), "run.json: expected a JSON object"),
        (lambda c: json.dumps({**c, "kind": "something"}), "not a lora-med training run card"),
        (
            lambda c: json.dumps({**c, "data": {**c["data"], "eval": {"path": 3}}}),
            "field 'data.eval.path' is of the wrong",
        ),
        (lambda c: json.dumps({k: v for k, v in c.items() if k != "base"}), "field 'base.name_or_path' is missing"),
        (lambda c: "", "run.json: not valid JSON"),
    ],
)
def test_corrupt_run_card_is_named_by_merge_export(trained, tmp_path, damage, message):
    run = tmp_path / "run"
    shutil.copytree(trained["lora"], run)
    card = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(damage(card))
    with pytest.raises(ConfigError, match=message):
        merge_export(ExportConfig(run_dir=str(run), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda r: (r / "adapter_config.json").write_text("[]"), "adapter_config.json: expected a JSON object"),
        (
            lambda r: (r / "adapter_config.json").write_text(
                json.dumps({**json.loads((r / "adapter_config.json").read_text()), "r": "four"})
            ),
            "adapter_config.json: r is 'four'",
        ),
        (
            lambda r: shutil.copy(r.parent / "full-model.safetensors", r / "adapter_model.safetensors"),
            "adapter_model.safetensors: holds no LoRA tensors",
        ),
    ],
)
def test_a_damaged_adapter_is_named_by_merge_export(trained, tmp_path, damage, message):
    run = tmp_path / "run"
    shutil.copytree(trained["lora"], run)
    shutil.copy(trained["full"] / "model.safetensors", tmp_path / "full-model.safetensors")
    damage(run)
    with pytest.raises(ConfigError, match=message):
        merge_export(ExportConfig(run_dir=str(run), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_split_indices_outside_the_data_are_named(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["lora"], run)
    card = json.loads((run / "run.json").read_text())
    card["data"]["eval"].update(source="split", indices=[999])
    (run / "run.json").write_text(json.dumps(card))
    with pytest.raises(LoraMedError, match="field 'data.eval.indices' does not list held-out rows"):
        merge_export(ExportConfig(run_dir=str(run), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_run_and_data_moved_together_are_still_found(trained, conversations_file, tmp_path):
    a = tmp_path / "a"
    shutil.copytree(trained["lora"], a / "run")
    shutil.copy(conversations_file, a / "convs.json")
    card = json.loads((a / "run" / "run.json").read_text())
    card["data"]["eval"].update(runs.data_record(a / "convs.json", a / "run"))
    (a / "run" / "run.json").write_text(json.dumps(card))
    b = tmp_path / "b"
    a.rename(b)  # the absolute path is gone; the path relative to the run still holds
    card = TrainCard.read(b / "run")
    assert card.held_out_path() == b / "run" / "../convs.json"
    assert len(card.held_out()) == 8
    (b / "convs.json").unlink()
    with pytest.raises(LoraMedError, match=rf"the held-out data is gone \(looked for {a / 'convs.json'} and"):
        card.held_out()


def test_merge_export_and_bench_work_from_another_directory(trained, exported, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = bench(
        BenchConfig(
            run=str(trained["lora"]),
            export=[str(exported["fp32"])],
            backends=["ort-cpu-fp32"],
            prompts=1,
            repeats=1,
            warmup=0,
            new_tokens=2,
            scaling=False,
            threads=1,
            max_latency_s=60.0,
            min_ppl_gain=1e-6,
        )
    )
    assert res.out_dir == Path("reports") / "lora" and (tmp_path / "reports" / "lora" / "report.json").is_file()


# --------------------------------------------------------------------------- read-only output, special files


def test_read_only_report_folder_is_refused_before_measuring(trained, capsys):
    with pytest.raises(ConfigError, match=r"BenchConfig.out /sys/lora-med-report: /sys is not writable"):
        bench(BenchConfig(run=str(trained["lora"]), out="/sys/lora-med-report"))
    assert "Perplexity" not in capsys.readouterr().out, "refused before anything was measured"


@pytest.mark.parametrize("kind", ["fifo", "devzero"])
def test_fifo_or_dev_zero_as_data_is_a_clear_error(tiny_base, tmp_path, kind, monkeypatch, capsys):
    path = tmp_path / "pipe.json"
    if kind == "fifo":
        os.mkfifo(path)  # nobody writes: a plain read would block forever
    else:
        path = Path("/dev/zero")  # endless: a plain read would fill memory
    with pytest.raises(DatasetError, match="not a regular file"):
        from lora_med.data import load_conversations

        load_conversations(path)
    code, out = run_cli(monkeypatch, capsys, "data", "check", str(path), "--tokenizer", str(tiny_base))
    assert code == 2 and "not a regular file" in out
    with pytest.raises(ConfigError, match=r"TrainConfig.data=.*: not a regular file"):
        train(tiny_train_config(tiny_base, path, tmp_path / "x", eval_data="split"))
    code, out = run_cli(monkeypatch, capsys, "train", "--config", str(path))
    assert code == 2 and "not a regular file" in out and "Traceback" not in out


def test_data_check_names_the_tokenizer_flag(conversations_file, tmp_path, monkeypatch, capsys):
    code, out = run_cli(
        monkeypatch, capsys, "data", "check", str(conversations_file), "--tokenizer", str(tmp_path / "no")
    )
    assert code == 2 and f"--tokenizer {tmp_path / 'no'}" in out and "Traceback" not in out


def test_jsonl_with_line_separators_inside_strings_loads(tmp_path):
    from lora_med.data import load_conversations

    f = tmp_path / "odd.jsonl"
    rows = [{"user": "hola\u2028mundo", "assistant": "sí\u0085claro"}, {"user": "a\u2029b", "assistant": "c"}]
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    convs = load_conversations(f).conversations
    assert [c.messages[0].content for c in convs] == ["hola\u2028mundo", "a\u2029b"]


# --------------------------------------------------------------------------- merge-export killed mid-way


def test_stale_partial_export_is_removed_by_the_next_run(trained, tmp_path, capsys):
    out = tmp_path / "exp"
    dead = tmp_path / "exp.partial-999999999"  # no such pid
    runs.claim(dead, "export", "merged")
    (dead / "merged").mkdir()
    live = tmp_path / f"exp.partial-{os.getppid()}"  # a live process's work: kept
    runs.claim(live, "export")
    res = merge_export(ExportConfig(run_dir=str(trained["lora"]), output=str(out), n_parity=1, max_new_tokens=2))
    assert res.output == out and not dead.exists() and live.exists()
    assert "left by a merge-export (pid 999999999) that did not finish" in capsys.readouterr().out


# --------------------------------------------------------------------------- bench inputs that do not belong


def test_bench_refuses_an_export_of_another_run(trained, exported, tmp_path):
    with pytest.raises(ConfigError, match="exported from the run .*which is neither --run nor --full-run"):
        bench(BenchConfig(run=str(trained["tokens"]), export=[str(exported["fp32"])], out=str(tmp_path / "r")))


def test_bench_refuses_the_onnx_folder_of_a_failed_export(trained, exported, tmp_path):
    failed = tmp_path / "exp.failed"
    shutil.copytree(exported["fp32"], failed)
    m = json.loads((failed / "manifest.json").read_text())
    (failed / "manifest.json").write_text(json.dumps({**m, "status": "failed"}))
    with pytest.raises(ConfigError, match="the export is not complete \\(status 'failed'\\)"):
        bench(BenchConfig(run=str(trained["lora"]), export=[str(failed / "onnx")], out=str(tmp_path / "r")))


def _damaged(src: Path, tmp_path: Path, damage) -> Path:
    out = tmp_path / src.name
    shutil.copytree(src, out)
    damage(out)
    return out


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "what,message",
    [
        ("cut graph", "the export's files differ from its manifest"),
        ("cut adapter", "adapter_model.safetensors: not a complete safetensors file"),
        ("base gone", "no longer exists; restore that folder"),
        ("new tokens", "BenchConfig.new_tokens=100000: the model reads at most 256 positions"),
        ("name", "BenchConfig.name='../x': a name, not a path"),
    ],
)
def test_bench_refuses_damaged_inputs_before_measuring(trained, exported, tmp_path, monkeypatch, capsys, what, message):
    monkeypatch.chdir(tmp_path)  # --name alone writes under the working directory
    run, export, kw = trained["lora"], exported["fp32"], {}
    if what == "cut graph":
        export = _damaged(export, tmp_path, lambda e: _cut(e / "onnx" / "model.onnx"))
    elif what == "cut adapter":
        run = _damaged(run, tmp_path, lambda r: _cut(r / "adapter_model.safetensors"))
    elif what == "base gone":

        def gone(r):
            card = json.loads((r / "run.json").read_text())
            card["base"]["name_or_path"] = str(tmp_path / "no-such-base")
            (r / "run.json").write_text(json.dumps(card))

        run = _damaged(run, tmp_path, gone)
    elif what == "new tokens":
        kw = dict(new_tokens=100000)
    else:
        kw = dict(name="../x", out=None)
    with pytest.raises(ConfigError, match=re.escape(message)):
        bench(
            BenchConfig(
                **{
                    "run": str(run),
                    "export": [str(export)] if what == "cut graph" else None,
                    "out": str(tmp_path / "r"),
                    **kw,
                }
            )
        )
    assert "perplexity" not in capsys.readouterr().out.lower(), "refused before anything was measured"


def test_a_damaged_graph_of_the_right_size_is_named(exported, tmp_path):
    from lora_med.engine.ort_backend import ort_model

    export = _damaged(
        exported["fp32"],
        tmp_path,
        lambda e: (e / "onnx" / "model.onnx").write_bytes(b"\xff" * (e / "onnx" / "model.onnx").stat().st_size),
    )
    with pytest.raises(LoraMedError, match="model.onnx: ONNX Runtime cannot load it"):
        ort_model(export)


def test_bench_paired_names_problems_in_its_train_configs(tmp_path):
    f = tmp_path / "lora.yaml"
    f.write_text("r: zero\n")
    with pytest.raises(ConfigError, match=r"BenchConfig.lora_config: r: zero \(in .*lora.yaml\): must be a whole"):
        bench(BenchConfig(paired=True, lora_config=str(f), out=str(tmp_path / "r")))


def test_bench_compares_bases_by_content_not_by_name(trained, tiny_base, conversations_file, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    other = tmp_path / "elsewhere" / tiny_base.name  # same folder name, other weights
    shutil.copytree(tiny_base, other)
    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.add_(1.0)
    model.save_pretrained(other, safe_serialization=True)
    full = train(
        tiny_train_config(
            other, conversations_file, tmp_path / "full", method="full", max_steps=1, seed=0, batch_size=4, alpha=8
        )
    ).output
    with pytest.raises(ConfigError, match="start from different bases .*config and weights differ"):
        bench(BenchConfig(run=str(trained["lora"]), full_run=str(full), out=str(tmp_path / "r")))
