"""What the planner's activation term misses: bytes autograd actually saves per layer.

Runs one training-mode forward of DialoGPT-medium-width GPT-2 blocks (random weights; 2 and 4 layers, so
the per-layer figure is their difference) under saved-tensor hooks (``lora_med.train.plan.saved_activation_bytes``)
and sums the distinct storages saved for backward, parameters excluded. That is the activation memory of this
implementation (transformers' eager GPT-2, unfused GELU, PEFT LoRA with dropout) on this device, which the
planner's Korthikanti et al. formula (34 bytes x s*b*h per layer in 16-bit, for fused kernels) undercounts.

Usage: .venv/bin/python benchmarks/train_memory/saved_activations.py [--batch 4] [--seq 128]
Writes saved_activations.json next to results.json of the CPU training-memory benchmark.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lora_med.train import plan


def saved_bytes(method: str, n_layer: int, batch: int, seq: int) -> int:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_layer=n_layer, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024, use_cache=False)
    )
    if method == "lora":
        model = get_peft_model(
            model,
            LoraConfig(
                r=16,
                lora_alpha=32,
                lora_dropout=0.05,
                fan_in_fan_out=True,
                target_modules=["c_attn", "c_proj", "c_fc"],
                task_type="CAUSAL_LM",
            ),
        )
    ids = torch.randint(0, 50000, (batch, seq))
    return plan.saved_activation_bytes(model.train(), input_ids=ids, labels=ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    a = ap.parse_args()
    sbh = a.batch * a.seq * 1024
    rows = {}
    for method in ("full", "lora"):
        two, four = saved_bytes(method, 2, a.batch, a.seq), saved_bytes(method, 4, a.batch, a.seq)
        per_layer = (four - two) / 2
        rows[method] = {
            "per_layer_mb": round(per_layer / 1e6, 1),
            "bytes_per_sbh": round(per_layer / sbh, 1),
            "outside_layers_mb": round((two - 2 * per_layer) / 1e6, 1),
        }
        print(f"{method}: {rows[method]}")
    korthikanti = 2 * (34 + 5 * 16 * a.seq / 1024)  # fp32 = twice the 16-bit bytes
    out = REPO / "benchmarks/results/train-memory-dialogpt-medium-shape-cpu/saved_activations.json"
    out.write_text(
        json.dumps(
            {
                "device": "cpu",
                "precision": "fp32",
                "batch": a.batch,
                "seq": a.seq,
                "hidden": 1024,
                "heads": 16,
                "measured": rows,
                "planner_bytes_per_sbh": korthikanti,
                "torch": torch.__version__,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    print(f"planner (Korthikanti, fp32): {korthikanti:.1f} bytes x s*b*h per layer -> {out}")


if __name__ == "__main__":
    main()
