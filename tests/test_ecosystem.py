"""What lora-med writes works with the ecosystem's own tools, and what it claims to do it really does.

Chat templates that reproduce the training format token for token (so `pipeline("text-generation")` with chat
messages works on merged/), Hugging Face model cards, QLoRA's quantised layers, gradient checkpointing, token
type ids kept away from GPT-2, ONNX Runtime graph optimisation, PEFT's safe merge refusing NaN, the parity gate
re-run on an existing export, a chat-template format through train and export, eval perplexity in TensorBoard.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from lora_med import data, models
from lora_med.cards import TrainCard
from lora_med.config import REPO_ROOT, ExportConfig
from lora_med.errors import LoraMedError
from lora_med.export.main import merge_export
from lora_med.train.main import train

from .conftest import tiny_train_config

tcfg = functools.partial(tiny_train_config, learning_rate=1e-2)


# --------------------------------------------------------------------------- chat templates


def test_chat_template_reproduces_the_training_format_token_for_token():
    tok = models.with_chat_template(models.load_tokenizer(str(REPO_ROOT / "models/gpt2-es-tiny")), "dialogpt")
    convs = data.load_conversations(REPO_ROOT / "data/medical_conversations.json").conversations
    for conv in convs:
        msgs = [{"role": m.role, "content": m.content} for m in conv.messages]
        trained_on = [t for ids, _ in data.segments(conv, tok, "dialogpt") for t in ids]
        assert tok.apply_chat_template(msgs, tokenize=True) == trained_on, conv.where
        history = list(conv.messages[:-1])  # up to the last user turn: what the app sends
        assert tok.apply_chat_template(msgs[:-1], tokenize=True, add_generation_prompt=True) == data.prompt_ids(
            history, tok, "dialogpt"
        ), conv.where


def test_pipeline_with_chat_messages_works_on_the_merged_export(exported):
    from transformers import pipeline

    merged = exported["fp32"] / "merged"
    pipe = pipeline("text-generation", model=str(merged), device="cpu")
    messages = [{"role": "user", "content": "Hola, necesito una cita"}]
    out = pipe(messages, max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"][:1] == messages and out[0]["generated_text"][-1]["role"] == "assistant"
    tok = models.load_tokenizer(str(merged))
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == data.prompt_ids(
        [data.Message("user", messages[0]["content"])], tok, "dialogpt"
    )


# --------------------------------------------------------------------------- model cards


@pytest.mark.parametrize(
    "where,library,tag", [("run", "peft", "lora"), ("merged", "transformers", "lora"), ("onnx", "transformers", "onnx")]
)
def test_model_cards_carry_hub_metadata(trained, exported, where, library, tag):
    from huggingface_hub import ModelCard

    folder = trained["lora"] if where == "run" else exported["fp32"] / where
    card = ModelCard.load(folder / "README.md")
    run = TrainCard.read(trained["lora"])
    assert card.data.library_name == library
    assert card.data.base_model == Path(run.base).name  # a local base: its folder name
    assert {"lora-med", tag} <= set(card.data.tags) and card.data.pipeline_tag == "text-generation"
    assert run.train_sha256 and run.train_sha256 in card.text and f"{run.metrics['eval_ppl']:.4g}" in card.text


# --------------------------------------------------------------------------- what training really does


class _Watch(TrainerCallback):
    """Records what the model is given and how it is set up while the Trainer trains it."""

    def __init__(self):
        self.kwargs_seen: set[str] = set()
        self.checkpointing = None
        self.layer_types: set[str] = set()

    def on_train_begin(self, args, state, control, model=None, **kw):
        self.checkpointing = getattr(model, "is_gradient_checkpointing", None)
        self.layer_types = {type(m).__name__ for m in model.modules()}
        base = model.get_base_model() if hasattr(model, "get_base_model") else model

        def hook(module, a, k):
            self.kwargs_seen |= set(k)

        base.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("bits,layer", [(4, "Linear4bit"), (8, "Linear8bitLt")])
def test_qlora_really_quantises_the_base(tiny_base, conversations_file, tmp_path, bits, layer):
    watch = _Watch()
    res = train(tcfg(tiny_base, conversations_file, tmp_path / "q", method="qlora", quant_bits=bits), callbacks=[watch])
    assert layer in watch.layer_types, watch.layer_types
    assert res.run["config"]["quant_bits"] == bits


def test_token_type_ids_never_reach_the_model(tiny_base, conversations_file, tmp_path):
    watch = _Watch()
    train(tcfg(tiny_base, conversations_file, tmp_path / "t"), callbacks=[watch])
    assert "input_ids" in watch.kwargs_seen and "token_type_ids" not in watch.kwargs_seen


def test_gradient_checkpointing_is_on_and_lora_still_learns(tiny_base, conversations_file, tmp_path):
    from safetensors.torch import load_file

    watch = _Watch()
    res = train(tcfg(tiny_base, conversations_file, tmp_path / "gc", gradient_checkpointing=True), callbacks=[watch])
    assert watch.checkpointing is True
    adapter = load_file(str(res.output / "adapter_model.safetensors"))
    assert all(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # input grads were enabled


def test_eval_perplexity_reaches_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(trained["lora"] / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "eval/loss", "eval/perplexity"} <= tags, tags


def test_chat_template_format_through_train_and_export(tiny_base, conversations_file, tmp_path):
    base = tmp_path / "templated"
    shutil.copytree(tiny_base, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    run = train(tcfg(base, conversations_file, tmp_path / "run", format="auto"))
    assert run.run["data"]["format"] == "chat-template"
    res = merge_export(
        ExportConfig(run_dir=str(run.output), output=str(tmp_path / "exp"), n_parity=2, max_new_tokens=4)
    )
    assert res.manifest["source"]["format"] == "chat-template" and res.manifest["parity"]["passed"]


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("level,fused", [("O1", None), ("O2", "SkipLayerNormalization")])
def test_onnx_runtime_optimisation_levels(trained, exported, tmp_path, level, fused):
    import onnx

    res = merge_export(
        ExportConfig(
            run_dir=str(trained["lora"]), output=str(tmp_path / level), optimize=level, n_parity=2, max_new_tokens=4
        )
    )
    assert res.manifest["export"]["optimization"] == {"level": level, "for_gpu": False}
    assert res.manifest["parity"]["passed"]
    plain = onnx.load(str(exported["fp32"] / "onnx" / "model.onnx"), load_external_data=False)
    optimised = onnx.load(str(tmp_path / level / "onnx" / "model.onnx"), load_external_data=False)
    assert len(optimised.graph.node) < len(plain.graph.node)
    if fused:
        assert fused in {n.op_type for n in optimised.graph.node}


def test_safe_merge_refuses_nan(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "nan"
    shutil.copytree(trained["lora"], run, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    weights = load_file(str(run / "adapter_model.safetensors"))
    key = next(k for k in weights if "lora_B" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, str(run / "adapter_model.safetensors"))
    with pytest.raises(LoraMedError, match="merging it gives non-finite weights"):
        merge_export(ExportConfig(run_dir=str(run), output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_verify_export_reruns_the_gate(exported):
    from lora_med.export.parity import verify_export

    figures = verify_export(exported["fp32"])
    assert figures["passed"] and figures["precision"] == "fp32" and figures["max_abs_diff"] <= 1e-4
    assert torch.isfinite(torch.tensor(figures["perplexity"]["onnx"]))


def test_the_cli_starts_without_the_heavy_libraries():
    """`lora-med --help`, `--version` and every command's --help need none of torch, transformers, PEFT,
    bitsandbytes or ONNX Runtime (they cost seconds to import)."""
    import subprocess
    import sys

    code = (
        "import sys; from lora_med.cli import cli; from click.testing import CliRunner; "
        "r = [CliRunner().invoke(cli, a) for a in (['--help'], ['--version'], ['train', '--help'], "
        "['merge-export', '--help'], ['bench', '--help'], ['serve', '--help'], ['data', 'check', '--help'])]; "
        "assert all(x.exit_code == 0 for x in r), [x.output for x in r]; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'onnxruntime', 'fastapi') "
        "if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
