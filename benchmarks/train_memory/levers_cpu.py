"""What each memory lever costs in speed, and saves in kept activations, on the CPU: training steps of the code
`lora-med train` runs, with the levers switched per step and the cases interleaved.

On a shared machine, tokens/s drift with the other jobs; the cases are timed round-robin (one step of each,
again and again), so every case meets the same load, and each case's fastest step (the least disturbed, as
``timeit`` reports) and median are given: ratios of the fastest steps hold best where the absolute figures do
not. Random weights of a GPT-2 shape (speed only).

Per step: forward, loss, backward, AdamW step, zero_grad, as the Trainer does it (fp32 on the CPU):
* LoRA r16 on c_attn/c_proj/c_fc, dropout 0.05 (PEFT, as lora_med.train.trainer.load_for_training sets it up);
* ``gc``: ``gradient_checkpointing_enable(use_reentrant=False)`` + input grads (what the Trainer switches on);
* ``cce``: ``lora_med.train.levers.chunked_causal_lm_loss`` on the decoder's last hidden state (256-token chunks);
* ``8bit``: bitsandbytes' ``AdamW8bit`` for the full fine-tune (the Trainer's "adamw_bnb_8bit"), else torch AdamW;
* ``eager``: transformers' eager attention instead of SDPA.
``kept MB``: what autograd keeps for the backward in one forward + loss (saved-tensor hooks; under a
checkpoint only its inputs are kept), the figure the levers shrink.

Usage: .venv/bin/python benchmarks/train_memory/levers_cpu.py [--layers 12 --hidden 768 --batch 4 --rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lora_med import models
from lora_med.train import levers, plan

CASES = ["lora", "lora+gc", "lora+cce", "lora+gc+cce", "lora+eager", "full", "full+8bit", "full+cce"]


def build(method: str, optim: str, a):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=a.layers,
        n_embd=a.hidden,
        n_head=a.hidden // 64,
        vocab_size=a.vocab,
        n_positions=max(1024, a.seq),
        attn_implementation="sdpa",
    )
    model = GPT2LMHeadModel(config)
    model.config.use_cache = False
    if method == "lora":
        model = get_peft_model(
            model,
            LoraConfig(
                r=16,
                lora_alpha=32,
                lora_dropout=0.05,
                task_type="CAUSAL_LM",
                target_modules=["c_attn", "c_proj", "c_fc"],
                fan_in_fan_out=True,
            ),
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if optim == "adamw_8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-5)
    else:
        opt = torch.optim.AdamW(params, lr=1e-5)
    return model.train(), opt


def set_levers(model, case: str) -> None:
    core = levers.causal_lm(model)
    if "+gc" in case:
        core.gradient_checkpointing_enable({"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    elif core.is_gradient_checkpointing:
        core.gradient_checkpointing_disable()
        if hasattr(model, "disable_input_require_grads"):
            model.disable_input_require_grads()
    core.set_attn_implementation("eager" if "+eager" in case else "sdpa")


def loss_of(model, ids, labels, case: str):
    items = labels.ne(-100).sum()
    if "+cce" not in case:
        return model(input_ids=ids, labels=labels, num_items_in_batch=items).loss
    core = levers.causal_lm(model)
    captured = []
    hook = core.transformer.register_forward_hook(lambda m, args, out: captured.append(out[0]))
    try:
        model(input_ids=ids, logits_to_keep=torch.empty(0, dtype=torch.long))
    finally:
        hook.remove()
    return levers.chunked_causal_lm_loss(core.get_output_embeddings(), captured[-1], labels, items)


def kept_bytes(model, ids, labels, case: str) -> int:
    return plan.saved_activation_bytes(model, run=lambda: loss_of(model, ids, labels, case))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5, help="timed steps per case (after one untimed)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default=None, help="JSON file for the results")
    a = ap.parse_args()
    cases = a.cases.split(",")
    load0 = os.getloadavg()[0]
    built = {}
    for case in cases:
        method = case.split("+")[0]
        optim = "adamw_8bit" if "+8bit" in case else "adamw"
        if (method, optim) not in built:
            built[(method, optim)] = build(method, optim, a)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)
    labels = ids.clone()
    labels[:, : a.seq // 2] = -100  # loss on the second half, as on replies

    def step(case: str) -> float:
        model, opt = built[(case.split("+")[0], "adamw_8bit" if "+8bit" in case else "adamw")]
        set_levers(model, case)
        t0 = time.perf_counter()
        loss_of(model, ids, labels, case).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    kept = {}
    for case in cases:  # warm-up step (optimizer state, allocator) and the kept-activation figure
        step(case)
        model, _ = built[(case.split("+")[0], "adamw_8bit" if "+8bit" in case else "adamw")]
        set_levers(model, case)
        kept[case] = kept_bytes(model, ids, labels, case)
    times: dict[str, list[float]] = {c: [] for c in cases}
    for _ in range(a.rounds):
        for case in cases:
            times[case].append(step(case))
    tokens = a.batch * a.seq
    rows = []
    for case in cases:
        fast, med = min(times[case]), statistics.median(times[case])
        plain = case.split("+")[0]
        base = min(times[plain]) if plain in times else fast
        rows.append(
            {
                "case": case,
                "s_per_step_min": round(fast, 3),
                "s_per_step_median": round(med, 3),
                "tokens_per_s": round(tokens / fast, 1),
                "time_vs_plain": round(fast / base, 3),
                "kept_mb": round(kept[case] / 2**20, 1),
                "s_per_step_all": [round(t, 3) for t in times[case]],
            }
        )
    shape, _ = plan.shape_from_config(levers.causal_lm(next(iter(built.values()))[0]).config)
    result = {
        "machine": models.device_info("cpu"),
        "versions": models.library_versions(),
        "load_avg_1min_start": round(load0, 2),
        "load_avg_1min_end": round(os.getloadavg()[0], 2),
        "shape": {"layers": a.layers, "hidden": a.hidden, "vocab": a.vocab, "params": shape.params},
        "batch": a.batch,
        "seq": a.seq,
        "rounds": a.rounds,
        "torch_threads": torch.get_num_threads(),
        "planner_compute_factor": {
            c: round(
                plan.compute_factor(
                    shape, [l for k, l in (("+gc", "gradient_checkpointing"), ("+cce", "chunked_ce")) if k in c]
                ),
                3,
            )
            for c in cases
        },
        "rows": rows,
    }
    text = json.dumps(result, indent=2)
    if a.out:
        Path(a.out).write_text(text + "\n", encoding="utf-8")
    print(
        f"GPT-2 {a.layers}x{a.hidden}, vocab {a.vocab} ({shape.params / 1e6:.1f}M), batch {a.batch} x {a.seq}, "
        f"fp32, {torch.get_num_threads()} threads; load {load0:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    print(
        "| case | s/step (fastest) | s/step (median) | tokens/s (fastest) | time vs plain | planner compute "
        "factor | kept MB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['case']} | {r['s_per_step_min']:.3f} | {r['s_per_step_median']:.3f} | {r['tokens_per_s']:,.0f} | "
            f"{r['time_vs_plain']:.2f}x | {result['planner_compute_factor'][r['case']]:.2f}x | {r['kept_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
