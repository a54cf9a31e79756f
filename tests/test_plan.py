"""The memory planner's activation term against what autograd really keeps (CPU, fp32, tiny GPT-2s).

Saved-tensor hooks see every tensor stored for the backward pass; the per-layer figure is the difference
between a 4-layer and a 2-layer model, so embeddings and logits drop out. The planner must match it,
for the full fine-tune and for LoRA (whose dropout keeps a copy of each adapted layer's input).
"""

from __future__ import annotations

import pytest
import torch

from lora_med import plan

TARGETS = ["c_attn", "c_proj", "c_fc"]


def _model(n_layer: int, hidden: int, heads: int, method: str):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layer, n_embd=hidden, n_head=heads, vocab_size=400, n_positions=256,
                        use_cache=False)
    model = GPT2LMHeadModel(config)
    if method == "lora":
        model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.05, target_modules=TARGETS,
                                                 fan_in_fan_out=True, task_type="CAUSAL_LM"))
    return model.train(), config


@pytest.mark.parametrize("hidden,heads,seq", [(64, 2, 64), (128, 4, 128)])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_planned_activations_match_what_autograd_saves(method, hidden, heads, seq):
    ids = torch.randint(0, 400, (4, seq), generator=torch.Generator().manual_seed(0))
    (two, config), (four, _) = _model(2, hidden, heads, method), _model(4, hidden, heads, method)
    measured = (plan.saved_activation_bytes(four, input_ids=ids, labels=ids)
                - plan.saved_activation_bytes(two, input_ids=ids, labels=ids)) / 2
    shape, meta = plan.shape_from_config(config)
    width = plan.lora_input_width(meta, TARGETS, shape.n_layer) if method == "lora" else 0.0
    est = plan.estimate(shape, method=method, batch_size=4, seq_len=seq, precision="fp32", device="cpu",
                        trainable=0, lora_dropout_width=width)
    assert est.parts["activations"] / shape.n_layer == pytest.approx(measured, rel=0.05)


def test_lora_dropout_width_counts_gpt2_inputs():
    from transformers import GPT2Config

    _, meta = plan.shape_from_config(GPT2Config(n_layer=3, n_embd=64, n_head=2, vocab_size=400))
    assert plan.lora_input_width(meta, TARGETS, 3) == 7.0  # c_attn h + attn c_proj h + c_fc h + mlp c_proj 4h
    assert plan.lora_input_width(meta, ["c_attn"], 3) == 1.0
