"""Training memory and throughput at microsoft/DialoGPT-medium's shape: LoRA vs the full fine-tune.

Random weights of the exact public config (354.8M parameters): memory and speed depend on the shape,
not on the values, so every figure here is "random weights, speed only".

For each method (lora, full) and batch (4, 16) at sequence length 128, this runs the real
`lora-med train` in a fresh process (so each peak is that run's own) for a few steps on clinic
conversations joined and cut to exactly 128 tokens, and puts the planner's estimate (`--plan`, the
same figure the run card records) beside each measurement:

* CPU: peak RSS of the training process, taken right after the training loop (the whole process:
  Python, libraries, data; the planner counts tensors only);
* CUDA: torch.cuda.max_memory_allocated (tensors only, like the planner).

Tokens/s is the steady rate: the first step (allocating optimizer state, warming kernels) is left out.

Usage:
  .venv/bin/python benchmarks/train_memory/run.py                      # CPU, 4 steps
  .venv/bin/python benchmarks/train_memory/run.py --device cuda --steps 10
Results: benchmarks/results/train-memory-dialogpt-medium-shape-<device>/{results.json,results.md}
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from lora_med import models  # noqa: E402
from lora_med.bench import SHAPES, SPEED_ONLY  # noqa: E402

SEQ = 128
CASES = [("lora", 4), ("lora", 16), ("full", 4), ("full", 16)]
EXTRA_CASES = [("lora+gc", 16)]  # LoRA with gradient checkpointing: what fits a small budget
TARGETS = {"lora_b16_peak_gb": 5.0, "lora_over_full_peak": 0.35, "lora_over_full_tokens_per_s": 1.3,
           "planner_error_gpu": 0.10}


def build_model(work: Path, seed: int) -> Path:
    """DialoGPT-medium's config with random weights, plus the shipped tokenizer (its ids fit the vocab)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = work / "dialogpt-medium-shape"
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(**SHAPES["dialogpt-medium"])).save_pretrained(out, safe_serialization=True)
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
        msgs = c["messages"] if "messages" in c else [{"role": "user", "content": c["user"]},
                                                       {"role": "assistant", "content": c["assistant"]}]
        pairs += [(u["content"], a["content"]) for u, a in zip(msgs, msgs[1:])
                  if u["role"] == "user" and a["role"] == "assistant"]
    rows = [{"user": " ".join(u for u, _ in pairs[i:i + 16]), "assistant": pairs[i + 15][1]}
            for i in range(0, len(pairs) - 16, 16)]
    train_file, eval_file = work / "train.json", work / "eval.json"
    train_file.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    eval_file.write_text(json.dumps(rows[:2], ensure_ascii=False), encoding="utf-8")
    tok = models.load_tokenizer(str(model_dir))
    lengths = {len(e.input_ids) for e in data.encode_all(data.load_conversations(train_file).conversations, tok,
                                                          max_length=SEQ, fmt="dialogpt")[0]}
    if lengths != {SEQ}:
        raise SystemExit(f"every example must be {SEQ} tokens, got {sorted(lengths)}")
    return train_file, eval_file


def run_case(method: str, batch: int, model_dir: Path, train_file: Path, eval_file: Path, work: Path,
             steps: int, device: str, r: int) -> dict:
    out = work / f"{method}-b{batch}"
    args = [sys.executable, "-m", "lora_med", "train", "--base", str(model_dir), "--data", str(train_file),
            "--eval-data", str(eval_file), "--method", method.split("+")[0], "--batch-size", str(batch), "--max-length", str(SEQ),
            "--max-steps", str(steps), "--log-every", "1", "--eval-every", "100000", "--save-every", "100000",
            "--no-compare", "--learning-rate", "1e-5", "--warmup-ratio", "0", "--device", device,
            "--output", str(out), "--overwrite"]
    if method.startswith("lora"):
        args += ["--r", str(r), "--alpha", str(2 * r)]
    if method.endswith("+gc"):
        args += ["--gradient-checkpointing"]
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{method} batch {batch} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    card = json.loads((out / "run.json").read_text())
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_logged = [x for x in logs if "elapsed_s" in x]
    first, last = steps_logged[0], steps_logged[-1]
    steady = (last["tokens_seen"] - first["tokens_seen"]) / (last["elapsed_s"] - first["elapsed_s"])
    m, plan = card["metrics"], card["plan"]
    row = {"method": method, "batch_size": batch, "seq_len": SEQ, "steps": m["steps"],
           "trainable_params": card["parameters"]["trainable"], "total_params": card["parameters"]["total"],
           "precision": card["resolved"]["precision"],
           "peak_gb": round(m["peak_memory_gb"], 3), "peak_kind": m["peak_memory_kind"],
           "planned_gb": plan["total_gb"], "plan": plan,
           "planned_over_measured": round(plan["total_gb"] / m["peak_memory_gb"], 3),
           "tokens_per_s_steady": round(steady, 1), "tokens_per_s_overall": round(m["tokens_per_s"], 1),
           "s_per_step_steady": round((last["elapsed_s"] - first["elapsed_s"]) / (len(steps_logged) - 1), 2),
           "wall_s": round(time.perf_counter() - t0, 1)}
    row["planned_cuda_bf16_gb"] = round(gpu_plan(method, batch, r) / 1e9, 2)
    shutil.rmtree(out, ignore_errors=True)  # a full run writes 1.4 GB of weights
    return row


def gpu_plan(method: str, batch: int, r: int) -> float:
    """The planner's figure for the same case on a CUDA GPU in bf16 (fused attention): not measured here."""
    from transformers import GPT2Config

    from lora_med import plan

    shape, meta = plan.shape_from_config(GPT2Config(**SHAPES["dialogpt-medium"]))
    targets = ["c_attn", "c_proj", "c_fc"]
    lora = method.startswith("lora")
    return plan.estimate(shape, method=method.split("+")[0], batch_size=batch, seq_len=SEQ, precision="bf16",
                         device="cuda", trainable=plan.lora_params(meta, targets, r) if lora else shape.params,
                         gradient_checkpointing=method.endswith("+gc"),
                         lora_dropout_width=plan.lora_input_width(meta, targets, shape.n_layer) if lora else 0.0).total


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Training memory and throughput: DialoGPT-medium shape ({SPEED_ONLY})", "",
             f"- Machine: {m['cpu']} ({m['cores']} cores)" + (f"; GPU {m['gpu']} ({m['vram_gb']} GB)" if m.get("gpu")
                                                             else "; no GPU") + f"; device used: {r['device']}",
             f"- Load average (1 min) at start / end: {r['load_start']} / {r['load_end']}",
             f"- Model: GPT-2 24 layers x 1024, 16 heads, vocab 50257 (microsoft/DialoGPT-medium's config), "
             f"{r['rows'][0]['total_params']:,} parameters, random weights",
             f"- Run: `lora-med train`, {r['steps']} steps per case, sequence {SEQ}, AdamW, precision "
             f"{r['rows'][0]['precision']}, LoRA r {r['r']} on c_attn/c_proj/c_fc; each case in a fresh process",
             "- Versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()), "",
             "| method | batch | trainable params | measured peak GB | planner GB | planner / measured | "
             "tokens/s (steady) | s/step | planner, CUDA bf16 GB (not measured) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        lines.append(f"| {x['method']} | {x['batch_size']} | {x['trainable_params']:,} | {x['peak_gb']:.2f} | "
                     f"{x['planned_gb']:.2f} | {x['planned_over_measured']:.2f} | {x['tokens_per_s_steady']:,.0f} | "
                     f"{x['s_per_step_steady']:.1f} | {x['planned_cuda_bf16_gb']:.2f} |")
    lines += ["", f"Measured peak: {r['rows'][0]['peak_kind']}.", "", "## Targets (issue 3)", ""]
    lines += [f"- {c}" for c in r["checks"]]
    lines += ["", "## Planner parts (GB)", "", "| method | batch | weights | gradients | optimizer | activations | logits |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        p = x["plan"]
        lines.append(f"| {x['method']} | {x['batch_size']} | {p['weights_gb']:.2f} | {p['gradients_gb']:.2f} | "
                     f"{p['optimizer_gb']:.2f} | {p['activations_gb']:.2f} | {p['logits_gb']:.2f} |")
    if r["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in r["notes"]]
    return "\n".join(lines) + "\n"


def checks(rows: list[dict], device: str) -> list[str]:
    by = {(x["method"], x["batch_size"]): x for x in rows}
    out = []
    for key in (("lora", 16), ("lora+gc", 16)):
        if key in by:
            peak = by[key]["peak_gb"]
            out.append(f"{key[0]} batch 16 peak {peak:.2f} GB, target < {TARGETS['lora_b16_peak_gb']} GB: "
                       + ("met" if peak < TARGETS["lora_b16_peak_gb"] else "missed"))
    for b in (4, 16):
        ratio = by[("lora", b)]["peak_gb"] / by[("full", b)]["peak_gb"]
        out.append(f"LoRA / full peak at batch {b}: {ratio:.2f}, target <= {TARGETS['lora_over_full_peak']}: "
                   + ("met" if ratio <= TARGETS["lora_over_full_peak"] else "missed"))
        speed = by[("lora", b)]["tokens_per_s_steady"] / by[("full", b)]["tokens_per_s_steady"]
        out.append(f"LoRA / full tokens/s at batch {b}: {speed:.2f}x, target >= {TARGETS['lora_over_full_tokens_per_s']}x: "
                   + ("met" if speed >= TARGETS["lora_over_full_tokens_per_s"] else "missed"))
    worst = max(abs(x["planned_over_measured"] - 1) for x in rows)  # every case, +gc included
    out.append(f"planner vs measured: worst error {worst:.0%}" + (
        f", target <= {TARGETS['planner_error_gpu']:.0%} on a GPU: " + ("met" if worst <= TARGETS["planner_error_gpu"]
                                                                       else "missed")
        if device == "cuda" else " (the 10% target is for a GPU peak; a CPU peak RSS also counts the Python process "
                                 "and allocator, which the planner does not)"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=4, help="training steps per case (the first is warm-up)")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", default=",".join(f"{m}:{b}" for m, b in CASES + EXTRA_CASES),
                    help="method[+gc]:batch,... (+gc: with --gradient-checkpointing)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/train-memory-...)")
    ap.add_argument("--note", action="append", default=[], help="free text for the notes (repeatable)")
    a = ap.parse_args()
    if a.steps < 2:
        ap.error("--steps must be >= 2 (the first step is left out of the steady tokens/s)")
    try:
        cases = [(m, int(b)) for m, b in (c.split(":") for c in a.cases.split(","))]
    except ValueError:
        ap.error(f"--cases {a.cases}: use method:batch pairs, e.g. lora:4,full:16,lora+gc:16")
    if unknown := [m for m, _ in cases if m not in ("lora", "full", "lora+gc", "full+gc")]:
        ap.error(f"--cases: unknown method {', '.join(unknown)}; use lora, full, lora+gc or full+gc")
    out_dir = Path(a.out or REPO / "benchmarks" / "results" / f"train-memory-dialogpt-medium-shape-{a.device}")
    load_start = round(os.getloadavg()[0], 2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lora-med-train-memory-") as tmp:
        work = Path(tmp)
        model_dir = build_model(work, a.seed)
        train_file, eval_file = build_data(work, model_dir)
        for method, batch in cases:
            print(f"{method} batch {batch}: {a.steps} steps ...", flush=True)
            rows.append(run_case(method, batch, model_dir, train_file, eval_file, work, a.steps, a.device, a.r))
            x = rows[-1]
            print(f"  peak {x['peak_gb']:.2f} GB (planner {x['planned_gb']:.2f}) | {x['tokens_per_s_steady']:,.0f} tok/s "
                  f"| {x['s_per_step_steady']:.1f} s/step", flush=True)
    report = {"kind": "lora-med.train-memory", "label": SPEED_ONLY, "device": a.device, "steps": a.steps, "r": a.r,
              "seq_len": SEQ, "machine": models.device_info(a.device), "versions": models.library_versions(),
              "load_start": load_start, "load_end": round(os.getloadavg()[0], 2), "rows": rows,
              "checks": checks(rows, a.device) if {(x["method"], x["batch_size"]) for x in rows} >= set(CASES) else [],
              "notes": a.note}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out_dir / "results.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))


if __name__ == "__main__":
    main()
