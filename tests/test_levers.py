"""The memory levers of `lora-med train` (lora_med/levers.py): each one acted on, and changing memory, not results.

Chunked cross-entropy equals the model's own loss and gradients; training with it equals training without;
8-bit AdamW keeps 8-bit state (bitsandbytes runs on the CPU); the attention setting reaches the model;
`--vram-gb` picks levers among those the settings allow, and says which.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from lora_med.errors import ConfigError
from lora_med.train import levers, plan
from lora_med.train.main import train

from .conftest import REPO, tiny_train_config

cfg_for = functools.partial(tiny_train_config, max_steps=3, alpha=8, batch_size=2, learning_rate=1e-2, seed=0)


# --------------------------------------------------------------------------- chunked cross-entropy


def _batch(tiny_tokenizer, conversations_file):
    from lora_med import data

    convs = data.load_conversations(conversations_file).conversations
    ex, _ = data.encode_all(convs, tiny_tokenizer, max_length=256, fmt="dialogpt")
    width = max(len(e.input_ids) for e in ex)
    ids = torch.tensor([e.input_ids + [0] * (width - len(e.input_ids)) for e in ex])
    labels = torch.tensor([e.labels + [-100] * (width - len(e.labels)) for e in ex])
    mask = (torch.arange(width)[None] < torch.tensor([len(e.input_ids) for e in ex])[:, None]).long()
    return ids, labels, mask


@pytest.mark.parametrize("chunk", [7, 37, 100_000])
@pytest.mark.parametrize("given_items", [True, False])
def test_chunked_loss_equals_the_models_own_loss_and_gradients(
    tiny_base, tiny_tokenizer, conversations_file, chunk, given_items
):
    from transformers import AutoModelForCausalLM

    ids, labels, mask = _batch(tiny_tokenizer, conversations_file)
    # The Trainer's count: labels that are not -100, before the shift (so one more per row that starts with one).
    items = labels.ne(-100).sum() if given_items else None
    model = AutoModelForCausalLM.from_pretrained(tiny_base).train()
    model.config.use_cache = False
    kw = dict(num_items_in_batch=items) if given_items else {}

    torch.manual_seed(1)
    own = model(input_ids=ids, attention_mask=mask, labels=labels, **kw).loss
    own.backward()
    own_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    torch.manual_seed(1)  # the same dropout masks
    hidden = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    mine = levers.chunked_causal_lm_loss(model.lm_head, hidden, labels, items, chunk=chunk)
    mine.backward()
    torch.testing.assert_close(mine, own, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, own_grads[n], atol=1e-5, rtol=1e-4, msg=n)


class LmHeadRows(TrainerCallback):
    """The most tokens lm_head computed logits for at once, during training and its evaluations (the final
    perplexity afterwards computes every position's logits, as it must)."""

    def __init__(self):
        self.most = 0

    def on_train_begin(self, args, state, control, model=None, **kw):
        core = levers.causal_lm(model)
        self.hook = core.get_output_embeddings().register_forward_hook(self._seen)

    def on_train_end(self, args, state, control, **kw):
        self.hook.remove()

    def _seen(self, module, args, output):
        self.most = max(self.most, output[..., 0].numel())


@pytest.mark.parametrize("method,train_tokens", [("lora", "none"), ("lora", "data"), ("full", "none")])
def test_training_with_chunked_ce_equals_training_without(
    tiny_base, conversations_file, tmp_path, method, train_tokens
):
    """Three steps with grad-accum 2 (the loss is divided by the Trainer's token count across micro-batches):
    the same losses, eval losses and weights, while lm_head never sees more than --loss-chunk tokens. Trained
    token rows (PEFT wraps the tied lm_head too) and a full fine-tune's tied lm_head get their gradients."""
    kw = dict(
        method=method,
        grad_accum=2,
        eval_every=3,
        learning_rate=1e-2 if method == "lora" else 1e-3,
        train_tokens=train_tokens,
    )
    plain = train(cfg_for(tiny_base, conversations_file, tmp_path / "plain", **kw))
    rows = LmHeadRows()
    chunked = train(
        cfg_for(tiny_base, conversations_file, tmp_path / "chunked", chunked_ce=True, loss_chunk=16, **kw),
        callbacks=[rows],
    )
    assert chunked.run["resolved"]["levers"] == ["sdpa", "chunked_ce"] and plain.run["resolved"]["levers"] == ["sdpa"]
    assert chunked.run["plan"]["loss_chunk"] == 16 and 0 < rows.most <= 16

    def logged(run):
        return [json.loads(line) for line in (run.output / "metrics.jsonl").read_text().splitlines()]

    for key in ("loss", "eval_loss"):
        a = [x[key] for x in logged(plain) if key in x]
        b = [x[key] for x in logged(chunked) if key in x]
        assert len(a) == len(b) > 0 and b == pytest.approx(a, rel=1e-4), key
    assert chunked.run["metrics"]["train_loss"] == pytest.approx(plain.run["metrics"]["train_loss"], rel=1e-5)
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    wa, wb = load_file(str(plain.output / name)), load_file(str(chunked.output / name))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4, msg=k)


# --------------------------------------------------------------------------- 8-bit AdamW, attention


class Watch(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        self.attention = levers.causal_lm(model).config._attn_implementation
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        self.optimizer = type(inner).__module__ + "." + type(inner).__name__
        self.state_dtypes = {
            n: {k: v.dtype for k, v in inner.state[p].items() if torch.is_tensor(v) and v.dim()}
            for n, p in model.named_parameters()
            if p in inner.state
        }


def test_8bit_adamw_runs_on_the_cpu_with_8bit_state(tiny_base, conversations_file, tmp_path):
    watch = Watch()
    res = train(
        cfg_for(
            tiny_base,
            conversations_file,
            tmp_path / "8bit",
            method="full",
            optim="adamw_8bit",
            attention="eager",
            learning_rate=1e-3,
        ),
        callbacks=[watch],
    )
    assert res.run["resolved"]["optim"] == "adamw_8bit" and res.run["resolved"]["attention"] == "eager"
    assert watch.optimizer.startswith("bitsandbytes.") and watch.attention == "eager"
    # Blockwise uint8 moments for the block weights; the Trainer keeps the embedding (tied lm_head) in 32-bit.
    assert watch.state_dtypes["transformer.h.0.mlp.c_fc.weight"]["state1"] == torch.uint8
    assert watch.state_dtypes["transformer.wte.weight"]["state1"] == torch.float32
    weights = load_file(str(res.output / "model.safetensors"))
    original = load_file(str(tiny_base / "model.safetensors"))
    assert not torch.equal(weights["transformer.h.0.mlp.c_fc.weight"], original["transformer.h.0.mlp.c_fc.weight"])
    assert res.run["metrics"]["eval_ppl"] < res.run["metrics"]["base_eval_ppl"]


def test_sdpa_is_what_auto_loads(tiny_base, conversations_file, tmp_path):
    watch = Watch()
    res = train(cfg_for(tiny_base, conversations_file, tmp_path / "auto", max_steps=1), callbacks=[watch])
    assert watch.attention == "sdpa" and res.run["resolved"]["attention"] == "sdpa"
    assert watch.optimizer == "torch.optim.adamw.AdamW" and res.run["resolved"]["optim"] == "adamw"


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"optim": "adamw_8bit"}, "TrainConfig.optim='adamw_8bit' applies to TrainConfig.method full only"),
        ({"optim": "sgd"}, "TrainConfig.optim='sgd': use one of auto, adamw, adamw_8bit"),
        ({"attention": "flash"}, "TrainConfig.attention='flash': use one of auto, sdpa, eager"),
        ({"loss_chunk": 0}, "TrainConfig.loss_chunk=0: must be >= 1"),
    ],
)
def test_lever_settings_are_checked(tiny_base, conversations_file, tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        train(cfg_for(tiny_base, conversations_file, tmp_path / "x", **overrides))
    assert message in str(err.value)
    assert not (tmp_path / "x").exists()


def test_chunked_ce_is_refused_under_fsdp(tiny_base, conversations_file, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --config_file fsdp.yaml` sets
    with pytest.raises(ConfigError, match="TrainConfig.chunked_ce: not with FSDP"):
        train(cfg_for(tiny_base, conversations_file, tmp_path / "x", chunked_ce=True), plan_only=True)
    assert "chunked_ce" not in train(cfg_for(tiny_base, conversations_file, tmp_path / "x"), plan_only=True)["levers"]


# --------------------------------------------------------------------------- --vram-gb picks the levers


@pytest.fixture(scope="module")
def medium_shape(tmp_path_factory, tiny_tokenizer):
    """microsoft/DialoGPT-medium's config and a tokenizer, no weights: what planning for a GPU needs."""
    from transformers import GPT2Config

    from lora_med.bench.shapes import SHAPES

    folder = tmp_path_factory.mktemp("dialogpt-medium-shape")
    GPT2Config(**SHAPES["dialogpt-medium"]).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)  # its ids fit the larger vocabulary
    return folder


def _gpu_plan(medium_shape, conversations_file, tmp_path, **kw):
    return train(
        cfg_for(
            medium_shape,
            conversations_file,
            tmp_path / "never",
            device="cuda",
            precision="bf16",
            vram_gb=8,
            max_length=128,
            **kw,
        ),
        plan_only=True,
    )


def test_vram_budget_picks_levers_among_those_allowed(medium_shape, conversations_file, tmp_path):
    # Full fine-tune of DialoGPT-medium on an 8 GB card: fp32 weights + AdamW's moments + the foreach step's copy
    # (~7.1 GB) do not fit with the CUDA context; 8-bit AdamW does.
    full = _gpu_plan(medium_shape, conversations_file, tmp_path, method="full", batch_size=32)
    assert full["levers"][:1] == ["sdpa"] and "adamw_8bit" in full["levers"] and full["optim"] == "adamw_8bit"
    assert full["batch_size"] * full["grad_accum"] == 32 and full["choice"]["needed_gb"] <= 8
    assert "adamw_8bit" in full["choice"]["reason"] and full["peak_at"] in full["moments"]
    with pytest.raises(
        ConfigError,
        match=r"TrainConfig.vram_gb=8.0: full does not fit even at batch 1.*try the "
        r"levers left out \(adamw_8bit\)",
    ):
        _gpu_plan(medium_shape, conversations_file, tmp_path, method="full", optim="adamw")
    # LoRA: the fastest that fits; ruling levers out or forcing them is obeyed.
    lora = _gpu_plan(medium_shape, conversations_file, tmp_path, batch_size=32)
    assert "adamw_8bit" not in lora["levers"] and lora["choice"]["needed_gb"] <= 8
    bare = _gpu_plan(
        medium_shape,
        conversations_file,
        tmp_path,
        batch_size=32,
        gradient_checkpointing=False,
        chunked_ce=False,
        attention="eager",
    )
    assert bare["levers"] == [] and bare["attention"] == "eager" and bare["choice"]["needed_gb"] <= 8
    forced = _gpu_plan(
        medium_shape, conversations_file, tmp_path, batch_size=32, gradient_checkpointing=True, chunked_ce=True
    )
    assert set(forced["levers"]) == set(plan.LEVERS) - {"adamw_8bit"}
    assert forced["choice"]["relative_speed"] < lora["choice"]["relative_speed"]  # each costs compute


@pytest.mark.slow
def test_plan_text_names_parts_moments_and_levers(medium_shape, conversations_file):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_med",
            "train",
            "--plan",
            "--device",
            "cuda",
            "--precision",
            "bf16",
            "--vram-gb",
            "8",
            "--base",
            str(medium_shape),
            "--data",
            str(conversations_file),
            "--method",
            "full",
            "--batch-size",
            "32",
            "--max-length",
            "128",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for text in (
        "Memory plan: full on cuda (bf16)",
        "levers: sdpa",
        "adamw_8bit",
        "at the peak (",
        "weights",
        "optimizer",
        "each moment of a step:",
        "optimizer step",
        "--vram-gb: micro-batch",
    ):
        assert text in out, text
