"""`lora-med train` on a tiny GPT-2: what changes, what is written, resume after a real kill, errors."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_med.config import TrainConfig
from lora_med.errors import ConfigError, LoraMedError
from lora_med.runs import latest_checkpoint as _latest
from lora_med.train.main import train

from .conftest import REPO, tiny_train_config


def latest_checkpoint(run_dir):
    return _latest(run_dir)[0]


cfg_for = functools.partial(tiny_train_config, max_steps=6, alpha=8, batch_size=4, learning_rate=1e-2)


@pytest.fixture(scope="module")
def lora_run(tiny_base, conversations_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    result = train(
        cfg_for(tiny_base, conversations_file, out, max_steps=8, compare=True, compare_max_new_tokens=4, save_every=4)
    )
    return result


def test_output_folder_holds_exactly_the_documented_files(lora_run):
    out = lora_run.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            ".lora-med",
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
            "chat_template.jinja",
            "checkpoints",
            "loss.png",
            "metrics.jsonl",
            "merges.txt",
            "run.json",
            "special_tokens_map.json",
            "tensorboard",
            "tokenizer.json",
            "tokenizer_config.json",
            "vocab.json",
        ]
    )
    marker = json.loads((out / ".lora-med").read_text())
    assert marker["kind"] == "lora-med.train" and set(marker["entries"]) == {
        p.name for p in out.iterdir() if p.name != ".lora-med"
    }, "every entry is recorded as lora-med's"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-8"]
    ckpt = sorted(p.name for p in (out / "checkpoints/checkpoint-8").iterdir())
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(
        ckpt
    ) and "training_args.bin" not in ckpt
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").rglob("*"))
    assert not list(out.rglob("*.bin")), "no pickle weights are written"


def test_run_card_records_what_produced_the_adapter(lora_run, conversations_file):
    card = json.loads((lora_run.output / "run.json").read_text())
    assert card["status"] == "complete" and card["artifact"] == "adapter"
    assert card["resolved"]["target_modules"] == ["c_attn", "c_proj", "c_fc"]
    assert card["data"]["train"]["sha256"] == __import__("hashlib").sha256(conversations_file.read_bytes()).hexdigest()
    assert card["data"]["eval"]["source"] == "file" and card["seed"] == 42
    m = card["metrics"]
    assert m["steps"] == 8 and m["eval_ppl"] > 1 and m["tokens_per_s"] > 0 and m["peak_memory_gb"] > 0
    assert 0 < card["parameters"]["trainable"] < card["parameters"]["total"]
    assert [r["prompt"] for r in card["comparison"]][:2] == ["Hola, necesito una cita", "Quiero cancelar mi cita"]
    assert {"torch", "transformers", "peft"} <= set(card["versions"])
    lines = [json.loads(l) for l in (lora_run.output / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if "loss" in l] == list(range(1, 9))
    assert all(l["tokens_per_s"] > 0 for l in lines if "loss" in l)


def test_only_lora_weights_change(lora_run, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    original = load_file(str(tiny_base / "model.safetensors"))
    adapter = load_file(str(lora_run.output / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it trained
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), lora_run.output)
    for name, p in model.named_parameters():
        if "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, original[key]), name


@pytest.mark.slow
def test_adapter_reloads_with_stock_peft_in_a_fresh_process(lora_run, tiny_base, conversations_file):
    code = f"""
import json, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from lora_med.data import load_conversations, encode_all
from lora_med.perplexity import perplexity, torch_logits_fn
tok = AutoTokenizer.from_pretrained({str(lora_run.output)!r})
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(tiny_base)!r}), {str(lora_run.output)!r}).eval()
ex, _ = encode_all(load_conversations({str(conversations_file)!r}).conversations, tok, max_length=256, fmt="dialogpt")
print(json.dumps(perplexity(torch_logits_fn(model), ex, tok.pad_token_id)["assistant"]["ppl"]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    card = json.loads((lora_run.output / "run.json").read_text())
    assert float(r.stdout.strip().splitlines()[-1]) == pytest.approx(card["metrics"]["eval_ppl"], rel=1e-5)


def test_train_tokens_trains_the_data_rows_and_keeps_the_tie(tiny_base, conversations_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_med import data, models

    res = train(cfg_for(tiny_base, conversations_file, tmp_path / "tt", train_tokens="data", max_steps=4))
    adapter = load_file(str(res.output / "adapter_model.safetensors"))
    delta_key = "base_model.model.transformer.wte.token_adapter.trainable_tokens_delta"
    assert set(adapter) - {k for k in adapter if "lora_" in k} == {delta_key}  # lm_head is tied, not a copy
    seen = sorted(
        {
            t
            for e in data.encode_all(
                data.load_conversations(conversations_file).conversations,
                models.load_tokenizer(str(tiny_base)),
                max_length=256,
                fmt="dialogpt",
            )[0]
            for t in e.input_ids
        }
    )
    config = json.loads((res.output / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == seen and adapter[delta_key].shape[0] == len(seen)
    assert adapter[delta_key].abs().sum() > 0
    # Reloaded with stock PEFT and merged: the trained rows moved, the others did not, and the output
    # layer still is the embedding (the tie holds, so an export has one matrix, not two).
    original = AutoModelForCausalLM.from_pretrained(tiny_base).transformer.wte.weight
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), res.output).merge_and_unload()
    wte = merged.transformer.wte.weight
    assert merged.lm_head.weight.data_ptr() == wte.data_ptr()
    unseen = sorted(set(range(wte.shape[0])) - set(seen))
    assert torch.equal(wte[unseen], original[unseen]) and not torch.equal(wte[seen], original[seen])


@pytest.mark.parametrize("method,lr,ratio", [("lora", 5e-2, 0.985), ("full", 1e-2, 0.2)])
def test_loss_falls_when_overfitting(tiny_base, tmp_path, method, lr, ratio):
    # Two conversations, 30 steps. LoRA on a random 2-layer base has little to adapt (the shipped
    # pretrained base is what makes LoRA meaningful), so its bar is lower than the full fine-tune's.
    from .conftest import CONVERSATIONS

    two = tmp_path / "two.json"
    two.write_text(json.dumps(CONVERSATIONS[:2], ensure_ascii=False), encoding="utf-8")
    res = train(
        cfg_for(
            tiny_base,
            two,
            tmp_path / method,
            method=method,
            max_steps=30,
            learning_rate=lr,
            r=8,
            alpha=16,
            dropout=0.0,
            warmup_ratio=0.0,
            batch_size=2,
            eval_every=100,
            save_every=100,
        )
    )
    losses = [
        json.loads(l)["loss"]
        for l in (res.output / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(l)
    ]
    assert losses[-1] < ratio * losses[0]
    assert res.run["metrics"]["eval_ppl"] < 0.9 * res.run["metrics"]["base_eval_ppl"]


def test_full_fine_tune_writes_a_model(tiny_base, conversations_file, tmp_path):
    res = train(
        cfg_for(tiny_base, conversations_file, tmp_path / "full", method="full", max_steps=2, learning_rate=1e-3)
    )
    assert res.run["artifact"] == "model" and res.run["parameters"]["trainable"] == res.run["parameters"]["total"]
    weights = load_file(str(res.output / "model.safetensors"))
    original = load_file(str(tiny_base / "model.safetensors"))
    assert not torch.equal(
        weights["transformer.h.0.attn.c_attn.weight"], original["transformer.h.0.attn.c_attn.weight"]
    )
    assert (res.output / "config.json").is_file() and not (res.output / "adapter_config.json").exists()


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_runs_on_the_cpu(tiny_base, conversations_file, tmp_path, bits):
    res = train(
        cfg_for(tiny_base, conversations_file, tmp_path / f"q{bits}", method="qlora", quant_bits=bits, max_steps=2)
    )
    adapter = load_file(str(res.output / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert res.run["config"]["quant_bits"] == bits


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_base, conversations_file, tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(LoraMedError, match=r"non-finite loss at step \d+") as err:
        train(
            cfg_for(
                tiny_base,
                conversations_file,
                out,
                method="full",
                learning_rate=1e30,
                max_steps=20,
                save_every=1,
                warmup_ratio=0.0,
            )
        )
    assert not (out / "model.safetensors").exists()
    card = json.loads((out / "run.json").read_text())
    assert card["status"] == "failed" and "non-finite loss at step" in card["failure"]["reason"]
    step = int(str(err.value).split("step ")[1].split(";")[0])
    last = latest_checkpoint(out)
    assert last is not None and last.name == f"checkpoint-{step - 1}"
    weights = load_file(str(last / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


# --------------------------------------------------------------------------- resume after kill -9


RESUME_FLAGS = dict(max_steps=20, save_every=5, log_every=1, batch_size=2, r=4, learning_rate=5e-3, compare=False)
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


def _train_in_child(tiny_base, data, out: Path, kill: str | None = None) -> subprocess.CompletedProcess:
    """`train()` in a fresh process; ``kill`` ("step:13" or "train_end") makes it SIGKILL itself there: a real
    kill -9 at a deterministic point, however loaded the machine is."""
    settings = dict(
        data=str(data),
        eval_data=str(data),
        allow_eval_overlap=True,
        base=str(tiny_base),
        output=str(out),
        **RESUME_FLAGS,
    )
    code = f"""
import os, signal
from transformers import TrainerCallback
from lora_med.config import TrainConfig
from lora_med.train import train
kill = {kill!r}
class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if kill == f"step:{{state.global_step}}":
            os.kill(os.getpid(), signal.SIGKILL)
    def on_train_end(self, args, state, control, **kw):
        if kill == "train_end":  # after the last checkpoint, before the final evaluation
            os.kill(os.getpid(), signal.SIGKILL)
train(TrainConfig(**{settings!r}), callbacks=[Kill()])
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=REPO)


@pytest.fixture(scope="module")
def uninterrupted(tiny_base, conversations_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "a"
    r = _train_in_child(tiny_base, conversations_file, out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _resume(run: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lora_med", "train", "--resume", str(run)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=REPO,
    )


def _assert_same_adapter(a: Path, b: Path) -> None:
    wa = load_file(str(a / "adapter_model.safetensors"))
    wb = load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted_run(uninterrupted, tiny_base, conversations_file, tmp_path):
    b = tmp_path / "b"
    killed = _train_in_child(tiny_base, conversations_file, b, kill="step:13")
    assert killed.returncode == -signal.SIGKILL
    assert not (b / "adapter_model.safetensors").exists()
    assert latest_checkpoint(b).name == "checkpoint-10"
    card = json.loads((b / "run.json").read_text())
    assert card["status"] == "running"
    with pytest.raises(LoraMedError, match="interrupted before finishing.*--resume"):
        from lora_med.runs import load_card

        load_card(b, "train")  # the stale lock tells a killed run from a live one
    # what a kill during a save leaves behind: never loaded
    junk = b / "checkpoints" / ".partial" / "checkpoint-20"
    junk.mkdir(parents=True, exist_ok=True)
    (junk / "adapter_model.safetensors").write_bytes(b"\x00" * 10)

    resumed = _resume(b)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stdout and "took over a stale lock" in resumed.stdout
    _assert_same_adapter(uninterrupted, b)
    card, ref = (json.loads((d / "run.json").read_text()) for d in (b, uninterrupted))
    assert card["status"] == "complete" and card["resumed_from"]
    # The whole run's mean loss, not the resumed part's sum over every step (issue: 4.02 for a ~6.0 run).
    assert card["metrics"]["train_loss"] == pytest.approx(ref["metrics"]["train_loss"], rel=1e-4)
    assert card["metrics"]["steps"] == ref["metrics"]["steps"] == 20


@pytest.mark.slow
def test_kill_during_the_final_evaluation_resumes_into_the_evaluation(
    uninterrupted, tiny_base, conversations_file, tmp_path
):
    c = tmp_path / "c"
    killed = _train_in_child(tiny_base, conversations_file, c, kill="train_end")
    assert killed.returncode == -signal.SIGKILL and latest_checkpoint(c).name == "checkpoint-20"
    resumed = _resume(c)
    assert resumed.returncode == 0, resumed.stderr
    assert "training had finished; running the final evaluation" in resumed.stdout
    assert "step 21" not in resumed.stdout and "step 20/20" not in resumed.stdout  # no phantom step
    _assert_same_adapter(uninterrupted, c)
    card, ref = (json.loads((d / "run.json").read_text()) for d in (c, uninterrupted))
    assert card["metrics"]["steps"] == 20
    assert card["metrics"]["train_loss"] == pytest.approx(ref["metrics"]["train_loss"], rel=1e-4)
    assert card["metrics"]["eval_ppl"] == pytest.approx(ref["metrics"]["eval_ppl"], rel=1e-5)


@pytest.mark.slow
def test_resume_falls_back_past_a_truncated_checkpoint(uninterrupted, tmp_path):
    import shutil

    from lora_med.runs import latest_checkpoint as find

    run = tmp_path / "copy"
    shutil.copytree(uninterrupted, run)
    newest = run / "checkpoints" / "checkpoint-20" / "adapter_model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # a cut copy
    found, skipped = find(run)
    assert found.name == "checkpoint-15" and len(skipped) == 1 and "checkpoint-20" in skipped[0]
    assert "truncated or corrupt" in skipped[0]


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "overrides,message",
    [  # the Python API names Python fields
        ({"r": 0}, "TrainConfig.r=0: must be >= 1"),
        ({"method": "prefix"}, "TrainConfig.method='prefix': use one of lora, qlora, full"),
        ({"dropout": 1.5}, "TrainConfig.dropout=1.5: must be in [0, 1)"),
        ({"target_modules": ["q_proj", "c_attn"]}, "TrainConfig.target_modules: q_proj not in this gpt2 model"),
        ({"data": "nope.json"}, "TrainConfig.data='nope.json': file not found"),
        ({"base": "./no/such/model"}, "TrainConfig.base ./no/such/model: no such directory"),
        ({"precision": "fp16"}, "TrainConfig.precision='fp16' needs a CUDA GPU"),
        ({"device": "cuda"}, "--device cuda: no CUDA GPU"),
        ({"quant_bits": 3, "method": "qlora"}, "TrainConfig.quant_bits=3: use one of 4, 8"),
        ({"batch_size": 0}, "TrainConfig.batch_size=0: must be >= 1"),
        ({"learning_rate": -1.0}, "TrainConfig.learning_rate=-1.0: must be > 0"),
        ({"train_tokens": "all"}, "TrainConfig.train_tokens='all': use one of none, data"),
        ({"method": "full", "train_tokens": "data"}, "TrainConfig.train_tokens='data' applies to LoRA/QLoRA only"),
    ],
)
def test_config_errors(tiny_base, conversations_file, tmp_path, overrides, message):
    if overrides.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError) as err:
        train(cfg_for(tiny_base, conversations_file, tmp_path / "x", **overrides))
    assert message in str(err.value)
    assert not (tmp_path / "x").exists()


def test_all_config_errors_are_reported_together(tiny_base, conversations_file, tmp_path):
    with pytest.raises(ConfigError) as err:
        train(cfg_for(tiny_base, conversations_file, tmp_path / "x", r=0, dropout=2.0, batch_size="many"))
    assert len(err.value.problems) == 3
    with pytest.raises(ConfigError) as err:
        train(cfg_for(tiny_base, conversations_file, tmp_path / "x", target_modules=["nope"], data="no.json"))
    assert len(err.value.problems) == 2


def test_qlora_without_bitsandbytes_is_a_config_error(tiny_base, conversations_file, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now fails as on a machine without it
    with pytest.raises(ConfigError, match="TrainConfig.method='qlora' needs bitsandbytes"):
        train(cfg_for(tiny_base, conversations_file, tmp_path / "x", method="qlora"))


def test_resume_of_a_finished_run_is_refused(lora_run, tiny_base, conversations_file):
    before = (lora_run.output / "run.json").read_bytes()
    with pytest.raises(ConfigError, match=r"that run is finished; nothing to resume"):
        train(TrainConfig(resume=str(lora_run.output)))
    assert (lora_run.output / "run.json").read_bytes() == before


def test_resume_of_another_run_is_refused(lora_run, tiny_base, conversations_file, tmp_path):
    import shutil

    copy = tmp_path / "unfinished"
    shutil.copytree(lora_run.output, copy)
    card = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**card, "status": "running"}))
    with pytest.raises(ConfigError, match=r"holds another run; these settings differ: r \(run: 4, now: 16\)"):
        train(
            cfg_for(
                tiny_base,
                conversations_file,
                copy,
                r=16,
                resume=str(copy),
                output=None,
                max_steps=8,
                compare=True,
                compare_max_new_tokens=4,
                save_every=4,
            )
        )


def test_existing_output_is_not_overwritten(lora_run, tiny_base, conversations_file):
    with pytest.raises(ConfigError, match="already holds a finished run"):
        train(cfg_for(tiny_base, conversations_file, lora_run.output))


def test_hub_id_offline_names_the_offline_options(conversations_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoraMedError, match="Offline options") as err:
        train(
            TrainConfig(
                data=str(conversations_file),
                eval_data=None,
                base="microsoft/DialoGPT-medium",
                output=str(tmp_path / "x"),
            )
        )
    assert "--base models/gpt2-es-tiny" in str(err.value)


def test_plan_picks_the_largest_batch_that_fits(tiny_base, conversations_file, tmp_path):
    cfg = cfg_for(tiny_base, conversations_file, tmp_path / "p", batch_size=8, grad_accum=2)
    unbounded = train(cfg, plan_only=True)
    assert unbounded["batch_size"] == 8 and unbounded["grad_accum"] == 2 and unbounded["total_gb"] > 0
    per_sample = train(cfg_for(tiny_base, conversations_file, tmp_path / "p", batch_size=1), plan_only=True)
    budget = per_sample["total_gb"] + (unbounded["total_gb"] - per_sample["total_gb"]) / 3
    planned = train(
        cfg_for(tiny_base, conversations_file, tmp_path / "p", batch_size=8, grad_accum=2, vram_gb=budget),
        plan_only=True,
    )
    assert planned["batch_size"] * planned["grad_accum"] == 16 and 1 <= planned["batch_size"] < 8
    assert planned["total_gb"] <= budget
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_cli_plan_and_bad_flag(tiny_base, conversations_file, monkeypatch, capsys):
    from lora_med.cli import main

    base = ["train", "--data", str(conversations_file), "--base", str(tiny_base)]
    monkeypatch.setattr(sys, "argv", ["lora-med", *base, "--plan", "--json", "--batch_size", "16"])
    main()  # in this process: the plan path returns normally
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") :])["batch_size"] == 16
    # The real entry point in a fresh process: exit code 2, every problem named as typed, no traceback.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "lora_med", *base, "--r", "0", "--lora_dropout", "3"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert r.returncode == 2 and "--r 0: must be >= 1" in r.stderr and "--lora_dropout 3: must be in [0, 1)" in r.stderr
    assert "Traceback" not in r.stderr
