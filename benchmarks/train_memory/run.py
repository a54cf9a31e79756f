"""Training memory and throughput at microsoft/DialoGPT-medium's shape: LoRA vs QLoRA vs the full fine-tune.

Random weights of the exact public config (354.8M parameters): memory and speed depend on the shape, not on
the values, so every figure here is "random weights, speed only".

Each case runs the real `lora-med train` in a fresh process (benchmarks/train_memory/launch.py, which adds
what the run card does not record) on conversations cut to exactly 128 tokens, and puts the planner
(lora_med.train.plan) beside each measurement:

* **cases** (``--cases``): method and micro-batch, then the levers: ``+gc`` gradient checkpointing, ``+cce``
  chunked cross-entropy, ``+8bit`` 8-bit AdamW (full), ``+eager`` eager attention instead of SDPA; measured peak
  (CUDA: ``torch.cuda.max_memory_allocated``, tensors only, like the planner, plus ``max_memory_reserved``;
  CPU: peak RSS of the whole process), the planner's figure for this device and for CUDA bf16, steady
  tokens/s (the first ``--warmup`` steps left out);
* **the claim** (``--claim``): for a card of ``--card-gib`` (8: an RTX 4060 Ti), per method the planner's
  choice (``levers.choose`` over every lever, as ``lora-med train --vram-gb`` does) and, on CUDA, the measured largest
  micro-batch that runs under that card's memory (the allocator is capped to what the card would leave
  after the CUDA context; the Trainer halving the batch after an out-of-memory error counts as "did not
  fit"), its tokens/s, and LoRA at its batch over full at its batch (target >= 1.5x);
* **the seed's job** (``--seed-job``): data/medical_conversations.json (222 conversations) for 3 epochs with
  LoRA at the claim's micro-batch, wall time.

Usage:
  .venv/bin/python benchmarks/train_memory/run.py                                   # CPU, the CPU table
  .venv/bin/python benchmarks/train_memory/run.py --device cuda --claim --seed-job  # the GPU figures
  .venv/bin/python benchmarks/train_memory/run.py --shape tiny --steps 3 --warmup 1 --cases lora:2,full:2 \\
      --claim --seed-job --seed-epochs 1                                            # CPU smoke test of all of it
Results: benchmarks/results/train-memory-<shape>-shape-<device>/{results.json,results.md}
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from lora_med import models
from lora_med.bench.latency import SPEED_ONLY
from lora_med.bench.shapes import SHAPES
from lora_med.train import levers, plan

SEQ = 128
TARGETS_MODULES = ["c_attn", "c_proj", "c_fc"]
CPU_CASES = [("lora", 4), ("lora", 16), ("full", 4), ("full", 16), ("lora+gc", 16)]
CUDA_CASES = [
    ("lora", 4),
    ("lora", 16),
    ("full", 4),
    ("full", 16),
    ("qlora", 16),
    ("lora+gc", 16),
    ("full+gc", 16),
    ("lora+cce", 16),
    ("full+8bit", 16),
    ("lora+eager", 16),
]
# A smoke shape: the shipped tokenizer's ids (vocabulary 8,192) fit it; seconds per case on the CPU.
SMOKE = dict(n_layer=2, n_embd=64, n_head=2, n_positions=256, vocab_size=8192, bos_token_id=0, eos_token_id=0)
# What `lora-med train` can switch on: every lever the planner models.
TRAIN_LEVERS = plan.LEVERS
# --cases suffix -> (lever, the `lora-med train` flags that switch it)
SUFFIXES = {
    "gc": ("gradient_checkpointing", ["--gradient-checkpointing"]),
    "cce": ("chunked_ce", ["--chunked-ce"]),
    "8bit": ("adamw_8bit", ["--optim", "adamw_8bit"]),
    "eager": ("eager", ["--attention", "eager"]),
}


def case_levers(case: str) -> tuple[str, tuple, list[str]]:
    """ "lora+gc+cce" -> ("lora", levers as plan.LEVERS names them, flags for `lora-med train`)."""
    method, *suffixes = case.split("+")
    names = [SUFFIXES[x][0] for x in suffixes]
    levers = tuple(x for x in plan.LEVERS if x in names or (x == "sdpa" and "eager" not in names))
    return method, levers, [f for x in suffixes for f in SUFFIXES[x][1]]


def lever_flags(levers) -> list[str]:
    """`lora-med train` flags that switch exactly ``levers`` on (and the others off)."""
    return (
        ["--attention", "sdpa" if "sdpa" in levers else "eager"]
        + ["--gradient-checkpointing" if "gradient_checkpointing" in levers else "--no-gradient-checkpointing"]
        + ["--chunked-ce" if "chunked_ce" in levers else "--no-chunked-ce"]
        + (["--optim", "adamw_8bit"] if "adamw_8bit" in levers else [])
    )


TARGETS = {
    "lora_b16_peak_gb": 5.0,
    "lora_over_full_peak": 0.35,
    "lora_over_full_tokens_per_s": 1.3,
    "lora_over_full_at_own_batch": 1.5,
    "planner_over": 0.10,
    "planner_under": 0.05,
}


def model_config(shape: str) -> dict:
    return SMOKE if shape == "tiny" else SHAPES[shape]


def build_model(work: Path, shape: str, seed: int) -> Path:
    """The shape's config with random weights, plus the shipped tokenizer (its ids fit the vocab)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = work / f"{shape}-shape"
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(**model_config(shape))).save_pretrained(out, safe_serialization=True)
    models.load_tokenizer(str(REPO / models.DEFAULT_BASE)).save_pretrained(out)
    return out


def build_data(work: Path, model_dir: Path) -> tuple[Path, Path]:
    """Conversations whose last exchange alone is longer than SEQ (sixteen clinic questions as one user
    turn, then a clinic reply), so left truncation cuts the user turn and every example is exactly SEQ
    tokens: each batch then holds b x 128 tokens, as the benchmark says."""
    from lora_med import data

    convs = json.loads((REPO / "data/medical_conversations.json").read_text(encoding="utf-8"))
    pairs = []
    for c in convs:
        msgs = (
            c["messages"]
            if "messages" in c
            else [{"role": "user", "content": c["user"]}, {"role": "assistant", "content": c["assistant"]}]
        )
        pairs += [
            (u["content"], a["content"])
            for u, a in zip(msgs, msgs[1:])
            if u["role"] == "user" and a["role"] == "assistant"
        ]
    rows = [
        {"user": " ".join(u for u, _ in pairs[i : i + 16]), "assistant": pairs[i + 15][1]}
        for i in range(0, len(pairs) - 16, 16)
    ]
    train_file, eval_file = work / "train.json", work / "eval.json"
    train_file.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    eval_file.write_text(json.dumps(rows[:2], ensure_ascii=False), encoding="utf-8")
    tok = models.load_tokenizer(str(model_dir))
    lengths = {
        len(e.input_ids)
        for e in data.encode_all(
            data.load_conversations(train_file).conversations, tok, max_length=SEQ, fmt="dialogpt"
        )[0]
    }
    if lengths != {SEQ}:
        raise SystemExit(f"every example must be {SEQ} tokens, got {sorted(lengths)}")
    return train_file, eval_file


# --------------------------------------------------------------------------- the planner beside each run


class Planner:
    """lora_med.train.plan at the benchmark's shape: the same arithmetic as the run card, for any device."""

    def __init__(self, shape: str, r: int, qlora_r: int):
        from transformers import GPT2Config

        self.shape, self.meta = plan.shape_from_config(GPT2Config(**model_config(shape)))
        self.r, self.qlora_r = r, qlora_r
        self.width = plan.lora_input_width(self.meta, TARGETS_MODULES, self.shape.n_layer)

    def trainable(self, method: str) -> int:
        if method == "full":
            return self.shape.params
        return plan.lora_params(self.meta, TARGETS_MODULES, self.qlora_r if method == "qlora" else self.r)

    def estimate(self, method: str, batch: int, levers=("sdpa",), device: str = "cuda", precision: str = "bf16"):
        lora = method != "full"
        return plan.estimate(
            self.shape,
            method=method,
            batch_size=batch,
            seq_len=SEQ,
            precision=precision,
            device=device,
            trainable=self.trainable(method),
            gradient_checkpointing="gradient_checkpointing" in levers,
            attention="sdpa" if "sdpa" in levers else "eager",
            chunked_ce="chunked_ce" in levers,
            optimizer="adamw_8bit" if "adamw_8bit" in levers else "adamw",
            lora_dropout_width=self.width if lora else 0.0,
            lora_width=self.width if lora else 0.0,
        )

    def choose(self, method: str, card_gb: float, effective_batch: int) -> levers.Choice:
        lora = method != "full"
        return levers.choose(
            self.shape,
            budget_gb=card_gb,
            effective_batch=effective_batch,
            method=method,
            seq_len=SEQ,
            trainable=self.trainable(method),
            allowed=TRAIN_LEVERS,
            lora_dropout_width=self.width if lora else 0.0,
            lora_width=self.width if lora else 0.0,
        )


# --------------------------------------------------------------------------- one `lora-med train` run


def train_run(
    name: str,
    method: str,
    batch: int,
    *,
    model_dir: Path,
    train_file: Path,
    eval_file: Path | None,
    work: Path,
    device: str,
    r: int,
    steps: int | None,
    epochs: float = 1,
    flags: list[str] = (),
    card_gb: float = 0,
    max_length: int = SEQ,
    grad_accum: int = 1,
) -> dict:
    """One run in a fresh process. Returns the run card, metrics lines, the launcher's side file, wall time,
    and whether it did not fit (an out-of-memory error, or the Trainer halving the batch after one)."""
    out = work / name
    side = work / f"{name}.side.json"
    args = [
        sys.executable,
        str(HERE / "launch.py"),
        "train",
        "--base",
        str(model_dir),
        "--data",
        str(train_file),
        "--method",
        method,
        "--batch-size",
        str(batch),
        "--grad-accum",
        str(grad_accum),
        "--max-length",
        str(max_length),
        "--log-every",
        "1",
        "--no-compare",
        "--device",
        device,
        "--output",
        str(out),
        "--overwrite",
    ]
    args += ["--eval-data", str(eval_file)] if eval_file else []
    if steps:
        args += [
            "--max-steps",
            str(steps),
            "--eval-every",
            "100000",
            "--save-every",
            "100000",
            "--learning-rate",
            "1e-5",
            "--warmup-ratio",
            "0",
        ]
    else:
        args += ["--epochs", str(epochs)]
    if method != "full":
        args += ["--r", str(r), "--alpha", str(2 * r)]
    args += list(flags)
    env = {**os.environ, "LORA_MED_BENCH_SIDE_FILE": str(side)}
    if card_gb and device == "cuda":
        env["LORA_MED_BENCH_CARD_GB"] = str(card_gb)
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    halved = re.search(r"batch size is now (\d+) after an out-of-memory error", text)
    oom = proc.returncode != 0 and "out of memory" in text.lower()
    if proc.returncode != 0 and not oom:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = {
        "wall_s": round(wall, 1),
        "did_not_fit": bool(halved or oom),
        "halved_to": int(halved.group(1)) if halved else None,
        "side": json.loads(side.read_text()) if side.exists() else {},
    }
    if proc.returncode == 0:
        result["card"] = json.loads((out / "run.json").read_text())
        result["logs"] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(out, ignore_errors=True)  # a full run writes 1.4 GB of weights
    return result


def steady_rate(logs: list[dict], warmup: int) -> tuple[float | None, float | None]:
    """Tokens/s and s/step between the end of step ``warmup`` and the last step (the first steps allocate
    optimizer state and warm kernels up)."""
    steps = [x for x in logs if "elapsed_s" in x]
    first = next((x for x in steps if x["step"] >= warmup), None)
    last = steps[-1] if steps else None
    if not first or not last or last["step"] <= first["step"]:
        return None, None
    dt = last["elapsed_s"] - first["elapsed_s"]
    return (last["tokens_seen"] - first["tokens_seen"]) / dt, dt / (last["step"] - first["step"])


def measure_case(case: str, batch: int, planner: Planner, a, paths: dict) -> dict:
    method, levers, flags = case_levers(case)
    r = a.qlora_r if method == "qlora" else a.r
    res = train_run(f"{case}-b{batch}", method, batch, device=a.device, r=r, steps=a.steps, flags=flags, **paths)
    if res["did_not_fit"]:
        raise SystemExit(f"{case} batch {batch} ran out of memory")
    card, logs = res["card"], res["logs"]
    m = card["metrics"]
    rate, per_step = steady_rate(logs, a.warmup)
    cuda_plan = planner.estimate(method, batch, levers)
    own_plan = card["plan"]
    row = {
        "method": case,
        "levers": card["resolved"]["levers"],
        "batch_size": batch,
        "seq_len": SEQ,
        "steps": m["steps"],
        "r": r if method != "full" else None,
        "trainable_params": card["parameters"]["trainable"],
        "total_params": card["parameters"]["total"],
        "precision": card["resolved"]["precision"],
        "peak_gb": round(m["peak_memory_gb"], 3),
        "peak_kind": m["peak_memory_kind"],
        "reserved_gb": (
            round(m["peak_memory_reserved_gb"], 3)
            if "peak_memory_reserved_gb" in m
            else res["side"].get("max_memory_reserved_gb")
        ),
        "outside_torch_gb": res["side"].get("outside_torch_at_start_gb"),
        "planned_gb": own_plan["total_gb"],
        "plan": own_plan,
        "planned_over_measured": round(own_plan["total_gb"] / m["peak_memory_gb"], 3),
        "planned_cuda_bf16_gb": round(cuda_plan.total / plan.GB, 3),
        "plan_cuda_bf16": cuda_plan.as_dict(),
        "tokens_per_s_steady": round(rate, 1) if rate else None,
        "tokens_per_s_overall": round(m["tokens_per_s"], 1),
        "s_per_step_steady": round(per_step, 3) if per_step else None,
        "wall_s": res["wall_s"],
    }
    return row


def claim(planner: Planner, a, paths: dict) -> dict:
    """Per method: the planner's micro-batch for the card and, on CUDA, the largest that runs capped to it."""
    out = {
        "card_gb": a.card_gb,
        "effective_batch": a.claim_batch,
        "levers_available": list(TRAIN_LEVERS),
        "methods": {},
    }
    for method in a.claim_methods.split(","):
        choice = planner.choose(method, a.card_gb, a.claim_batch)
        entry = {"planner": choice.as_dict(), "tried": []}
        if choice.fits:
            flags = lever_flags(choice.levers)
            gc = "gradient_checkpointing" in choice.levers
            divisors = [d for d in range(1, a.claim_batch + 1) if a.claim_batch % d == 0]
            r = a.qlora_r if method == "qlora" else a.r
            # the planner's micro-batch, then one step up if it ran (or down until one runs)
            i = divisors.index(choice.micro_batch)
            step = None
            while 0 <= i < len(divisors):
                b = divisors[i]
                res = train_run(
                    f"claim-{method}-b{b}",
                    method,
                    b,
                    device=a.device,
                    r=r,
                    steps=a.steps,
                    flags=flags,
                    card_gb=a.card_gb,
                    **paths,
                )
                tried = {
                    "micro_batch": b,
                    "levers": list(choice.levers),
                    "gradient_checkpointing": gc,
                    "did_not_fit": res["did_not_fit"],
                    "halved_to": res["halved_to"],
                    "wall_s": res["wall_s"],
                    "side": res["side"],
                }
                if "card" in res:
                    rate, _ = steady_rate(res["logs"], a.warmup)
                    tried.update(
                        peak_gb=round(res["card"]["metrics"]["peak_memory_gb"], 3),
                        tokens_per_s_steady=round(rate, 1) if rate else None,
                    )
                entry["tried"].append(tried)
                print(
                    f"  claim {method} b{b} {'+'.join(choice.levers)}: "
                    + (
                        "did not fit"
                        if res["did_not_fit"]
                        else f"peak {tried['peak_gb']:.2f} GB, {tried['tokens_per_s_steady'] or 0:,.0f} tok/s"
                    ),
                    flush=True,
                )
                step = step or (-1 if res["did_not_fit"] else 1)
                if (step == 1 and res["did_not_fit"]) or (step == -1 and not res["did_not_fit"]):
                    break
                if step == 1 and a.device != "cuda":
                    break  # nothing caps the CPU: the planner's micro-batch is all there is to time
                i += step
            ran = [t for t in entry["tried"] if not t["did_not_fit"]]
            if a.device == "cuda" and ran:
                entry["largest_that_ran"] = max(ran, key=lambda t: t["micro_batch"])
        out["methods"][method] = entry
    lora, full = (out["methods"].get(m, {}).get("largest_that_ran") for m in ("lora", "full"))
    if lora and full and lora.get("tokens_per_s_steady") and full.get("tokens_per_s_steady"):
        out["lora_over_full_at_own_batch"] = round(lora["tokens_per_s_steady"] / full["tokens_per_s_steady"], 2)
    return out


def seed_job(planner: Planner, a, model_dir: Path, work: Path, claim_result: dict | None) -> dict:
    """The seed's job: 222 clinic conversations, 3 epochs, LoRA, at the claim's micro-batch (else the planner's
    for the card), the shipped data and its held-out file; wall time of the whole command and of training."""
    lora = (claim_result or {}).get("methods", {}).get("lora", {})
    chosen = lora.get("largest_that_ran") or {}
    choice = planner.choose("lora", a.card_gb, a.claim_batch)
    batch = chosen.get("micro_batch") or choice.micro_batch
    levers = tuple(chosen.get("levers", choice.levers))
    gc = "gradient_checkpointing" in levers
    res = train_run(
        "seed-job",
        "lora",
        batch,
        model_dir=model_dir,
        train_file=REPO / "data/medical_conversations.json",
        eval_file=REPO / "data/medical_conversations_eval.json",
        work=work,
        device=a.device,
        r=a.r,
        steps=None,
        epochs=a.seed_epochs,
        flags=lever_flags(levers),
        card_gb=a.card_gb,
        max_length=a.seed_max_length,
    )
    card = res["card"]
    return {
        "conversations": card["data"]["train"]["conversations"],
        "epochs": a.seed_epochs,
        "max_length": a.seed_max_length,
        "micro_batch": batch,
        "levers": list(levers),
        "gradient_checkpointing": gc,
        "steps": card["metrics"]["steps"],
        "tokens_seen": card["metrics"]["tokens_seen"],
        "train_s": card["timings"]["train_s"],
        "total_s": card["timings"]["total_s"],
        "wall_s": res["wall_s"],
        "peak_gb": round(card["metrics"]["peak_memory_gb"], 3),
    }


# --------------------------------------------------------------------------- report


def checks(rows: list[dict], claim_result: dict | None, device: str) -> list[str]:
    by = {(x["method"], x["batch_size"]): x for x in rows}
    out = []
    for key in (("lora", 16), ("lora+gc", 16)):
        if key in by:
            peak = by[key]["peak_gb"]
            out.append(
                f"{key[0]} batch 16 peak {peak:.2f} GB, target < {TARGETS['lora_b16_peak_gb']} GB: "
                + ("met" if peak < TARGETS["lora_b16_peak_gb"] else "missed")
            )
    for b in (4, 16):
        if ("lora", b) in by and ("full", b) in by:
            lo, fu = by[("lora", b)], by[("full", b)]
            ratio = lo["peak_gb"] / fu["peak_gb"]
            out.append(
                f"LoRA / full peak at batch {b}: {ratio:.2f}, target <= {TARGETS['lora_over_full_peak']}: "
                + ("met" if ratio <= TARGETS["lora_over_full_peak"] else "missed")
            )
            if lo["tokens_per_s_steady"] and fu["tokens_per_s_steady"]:
                speed = lo["tokens_per_s_steady"] / fu["tokens_per_s_steady"]
                out.append(
                    f"LoRA / full tokens/s at batch {b}: {speed:.2f}x, target >= "
                    f"{TARGETS['lora_over_full_tokens_per_s']}x: "
                    + ("met" if speed >= TARGETS["lora_over_full_tokens_per_s"] else "missed")
                )
    if rows and device == "cuda":
        errors = [x["planned_cuda_bf16_gb"] / x["peak_gb"] - 1 for x in rows]
        worst_over, worst_under = max(errors), min(errors)
        ok = worst_over <= TARGETS["planner_over"] and worst_under >= -TARGETS["planner_under"]
        out.append(
            f"planner vs measured (CUDA bf16): {worst_under:+.1%} to {worst_over:+.1%}, target within "
            f"+{TARGETS['planner_over']:.0%} / -{TARGETS['planner_under']:.0%}: " + ("met" if ok else "missed")
        )
    elif rows:
        worst = max(abs(x["planned_over_measured"] - 1) for x in rows)
        out.append(
            f"planner vs measured on the CPU: worst error {worst:.0%} (the GPU target does not apply: a CPU "
            "peak RSS also counts the Python process and allocator, which the planner does not)"
        )
    if claim_result and "lora_over_full_at_own_batch" in claim_result:
        r = claim_result["lora_over_full_at_own_batch"]
        out.append(
            f"LoRA at its largest batch under {claim_result['card_gb']:g} GB / full at its own: {r:.2f}x, "
            f"target >= {TARGETS['lora_over_full_at_own_batch']}x: "
            + ("met" if r >= TARGETS["lora_over_full_at_own_batch"] else "missed")
        )
    return out


def markdown(r: dict) -> str:
    m = r["machine"]
    cfg = model_config(r["shape"])
    lines = [
        f"# Training memory and throughput: {r['shape']} shape ({SPEED_ONLY})",
        "",
        f"- Machine: {m['cpu']} ({m['cores']} cores)"
        + (f"; GPU {m['gpu']} ({m['vram_gb']} GiB)" if m.get("gpu") else "; no GPU")
        + f"; device used: {r['device']}",
        f"- Load average (1 min) at start / end: {r['load_start']} / {r['load_end']}",
        f"- Model: GPT-2 {cfg['n_layer']} layers x {cfg['n_embd']}, {cfg['n_head']} heads, vocab "
        f"{cfg['vocab_size']}, random weights",
        f"- Run: `lora-med train` in a fresh process per case, {r['steps']} steps (steady tokens/s leaves the "
        f"first {r['warmup']} out), sequence {SEQ}, AdamW, LoRA r {r['r']} (QLoRA r {r['qlora_r']}) on "
        "c_attn/c_proj/c_fc",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
        "",
    ]
    if r["rows"]:
        lines += [
            "| method | batch | precision | measured peak GB | reserved GB | planner GB (this device) | "
            "planner, CUDA bf16 GB | tokens/s (steady) | s/step |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for x in r["rows"]:
            res = f"{x['reserved_gb']:.2f}" if x.get("reserved_gb") else "-"
            tps = f"{x['tokens_per_s_steady']:,.0f}" if x["tokens_per_s_steady"] else "-"
            sps = f"{x['s_per_step_steady']:.3f}" if x["s_per_step_steady"] else "-"
            lines.append(
                f"| {x['method']} | {x['batch_size']} | {x['precision']} | {x['peak_gb']:.2f} | {res} | "
                f"{x['planned_gb']:.2f} | {x['planned_cuda_bf16_gb']:.2f} | {tps} | {sps} |"
            )
        lines += ["", f"Measured peak: {r['rows'][0]['peak_kind']}."]
        lines += [
            "",
            "## Planner parts, CUDA bf16 (GB, at the planner's peak moment)",
            "",
            "| method | batch | peak at | weights | gradients | optimizer | optimizer step | activations | "
            "logits | autocast copies | cuBLAS | allocator |",
            "|---|---:|---|" + "---:|" * 9,
        ]
        for x in r["rows"]:
            p = x["plan_cuda_bf16"]
            lines.append(
                f"| {x['method']} | {x['batch_size']} | {p['peak_at']} | "
                + " | ".join(
                    f"{p[k + '_gb']:.3f}"
                    for k in (
                        "weights",
                        "gradients",
                        "optimizer",
                        "optimizer_step",
                        "activations",
                        "logits",
                        "autocast_copies",
                        "cublas_workspace",
                        "allocator_rounding",
                    )
                )
                + " |"
            )
    c = r.get("claim")
    if c:
        lines += [
            "",
            f"## The claim: a {c['card_gb']:g} GB card (effective batch {c['effective_batch']}; levers "
            f"in lora-med train today: {', '.join(c['levers_available'])})",
            "",
            "| method | planner: micro-batch x accum, levers | planner needs GB | measured largest micro-batch "
            "under the card | its peak GB | its tokens/s |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for method, e in c["methods"].items():
            p, big = e["planner"], e.get("largest_that_ran")
            plan_txt = (
                f"{p['micro_batch']} x {p['grad_accum']}, {' + '.join(p['levers'])}" if p["fits"] else "nothing fits"
            )
            lines.append(
                f"| {method} | {plan_txt} | {p['needed_gb']:.2f} | "
                + (
                    f"{big['micro_batch']} | {big['peak_gb']:.2f} | {big['tokens_per_s_steady'] or 0:,.0f} |"
                    if big
                    else "- (not capped on the CPU) | - | - |"
                )
            )
        lines += [""] + [f"- {method}: {e['planner']['reason']}" for method, e in c["methods"].items()]
    s = r.get("seed_job")
    if s:
        lines += [
            "",
            "## The seed's job",
            "",
            f"{s['conversations']} conversations x {s['epochs']:g} epochs (max length {s['max_length']}), LoRA "
            f"r {r['r']}, micro-batch {s['micro_batch']}{' + gradient checkpointing' if s['gradient_checkpointing'] else ''}: "
            f"{s['steps']} steps, {s['tokens_seen']:,} tokens, training {s['train_s']:.1f} s, the whole command "
            f"{s['total_s']:.1f} s (wall {s['wall_s']:.1f} s with process start), peak {s['peak_gb']:.2f} GB.",
        ]
    lines += ["", "## Targets", ""] + [f"- {x}" for x in r["checks"]]
    if r["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--shape",
        default="dialogpt-medium",
        choices=["dialogpt-medium", "tiny"],
        help="tiny: 2 layers x 64, for a CPU smoke test of the whole benchmark",
    )
    ap.add_argument("--steps", type=int, default=None, help="steps per case (default: 4 on the CPU, 24 on CUDA)")
    ap.add_argument(
        "--warmup", type=int, default=None, help="first steps left out of tokens/s (default: 1 on the CPU, 4 on CUDA)"
    )
    ap.add_argument("--r", type=int, default=16, help="LoRA rank")
    ap.add_argument(
        "--qlora-r",
        type=int,
        default=8,
        help="QLoRA rank (8: as the H200 reference in benchmarks/results/h200-dialogpt-medium-shape/)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--cases",
        default=None,
        help="method[+gc][+cce][+8bit][+eager]:batch,... (method lora, qlora or full; default per device); '' for none",
    )
    ap.add_argument("--claim", action="store_true", help="the largest micro-batch per method under --card-gib")
    ap.add_argument(
        "--card-gib",
        type=float,
        default=8.0,
        help="memory of the card the claim is about, GiB (an '8 GB' RTX 4060 Ti has 8 GiB = 8.59 GB)",
    )
    ap.add_argument("--claim-batch", type=int, default=32, help="effective batch the claim keeps with grad-accum")
    ap.add_argument("--claim-methods", default="lora,full,qlora")
    ap.add_argument("--seed-job", action="store_true", help="222 conversations x 3 epochs with LoRA, wall time")
    ap.add_argument("--seed-epochs", type=float, default=3.0)
    ap.add_argument("--seed-max-length", type=int, default=256, help="lora-med train's default")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/train-memory-...)")
    ap.add_argument("--note", action="append", default=[], help="free text for the notes (repeatable)")
    a = ap.parse_args()
    cuda = a.device == "cuda"
    a.card_gb = round(a.card_gib * 2**30 / 1e9, 3)  # the planner and the cap count decimal GB
    a.steps = a.steps or (24 if cuda else 4)
    a.warmup = a.warmup if a.warmup is not None else (4 if cuda else 1)
    if a.steps <= a.warmup:
        ap.error(f"--steps {a.steps} must exceed --warmup {a.warmup} (those steps are left out of tokens/s)")
    default_cases = CUDA_CASES if cuda else CPU_CASES
    try:
        cases = (
            [(m, int(b)) for m, b in (c.split(":") for c in a.cases.split(",") if c)]
            if a.cases is not None
            else default_cases
        )
    except ValueError:
        ap.error(f"--cases {a.cases}: use method:batch pairs, e.g. lora:4,full:16,lora+gc:16")
    methods = {"lora", "qlora", "full"}
    if unknown := [
        m for m, _ in cases if m.split("+")[0] not in methods or any(x not in SUFFIXES for x in m.split("+")[1:])
    ]:
        ap.error(
            f"--cases: unknown method or lever {', '.join(unknown)}; use lora, qlora or full, then any of "
            f"{', '.join('+' + x for x in SUFFIXES)}"
        )
    if unknown := [m for m in a.claim_methods.split(",") if m not in methods]:
        ap.error(f"--claim-methods: unknown {', '.join(unknown)}; use lora, qlora, full")
    out_dir = Path(a.out or REPO / "benchmarks" / "results" / f"train-memory-{a.shape}-shape-{a.device}")
    load_start = round(os.getloadavg()[0], 2)
    planner = Planner(a.shape, a.r, a.qlora_r)
    rows, claim_result, seed_result = [], None, None
    with tempfile.TemporaryDirectory(prefix="lora-med-train-memory-") as tmp:
        work = Path(tmp)
        model_dir = build_model(work, a.shape, a.seed)
        train_file, eval_file = build_data(work, model_dir)
        paths = dict(model_dir=model_dir, train_file=train_file, eval_file=eval_file, work=work)
        for method, batch in cases:
            print(f"{method} batch {batch}: {a.steps} steps ...", flush=True)
            rows.append(measure_case(method, batch, planner, a, paths))
            x = rows[-1]
            print(
                f"  peak {x['peak_gb']:.2f} GB (planner {x['planned_gb']:.2f}; CUDA bf16 {x['planned_cuda_bf16_gb']:.2f}) "
                f"| {x['tokens_per_s_steady'] or 0:,.0f} tok/s",
                flush=True,
            )
        if a.claim:
            print(f"claim: the largest micro-batch under {a.card_gb:g} GB per method ...", flush=True)
            claim_result = claim(planner, a, paths)
        if a.seed_job:
            print("seed job ...", flush=True)
            seed_result = seed_job(planner, a, model_dir, work, claim_result)
            print(
                f"  {seed_result['steps']} steps, training {seed_result['train_s']:.1f} s, "
                f"command {seed_result['total_s']:.1f} s",
                flush=True,
            )
    report = {
        "kind": "lora-med.train-memory",
        "label": SPEED_ONLY,
        "device": a.device,
        "shape": a.shape,
        "steps": a.steps,
        "warmup": a.warmup,
        "r": a.r,
        "qlora_r": a.qlora_r,
        "seq_len": SEQ,
        "machine": models.device_info(a.device),
        "versions": models.library_versions(),
        "load_start": load_start,
        "load_end": round(os.getloadavg()[0], 2),
        "rows": rows,
        "claim": claim_result,
        "seed_job": seed_result,
        "checks": checks(rows, claim_result, a.device),
        "notes": a.note,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / "results.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))


if __name__ == "__main__":
    main()
