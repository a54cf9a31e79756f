"""Informal engine timing for iteration: the decode-graph engine beside its peers, in one process.

    .venv/bin/python benchmarks/engine/run.py                          # shipped base, fp32 + int8 engine vs ORTModel
    .venv/bin/python benchmarks/engine/run.py --shape dialogpt-medium  # random weights, speed only; adds torch eager

Every reply is forced to exactly --new-tokens greedy tokens (min = max), batch 1, the same prompts for every
backend, backends interleaved per repeat so that machine load hits them alike. The figures are for the
developer's own iteration; the project's reported figures come from `lora-med bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "Hola, necesito una cita",
    "Quiero cancelar mi cita",
    "Me duele mucho el pecho y me cuesta respirar",
    "¿Cuál es el horario de atención?",
    "¿Cuánto cuesta una consulta con el cardiólogo?",
    "¿Ya están mis resultados de laboratorio?",
    "¿Qué pastilla puedo tomar para el dolor de cabeza?",
    "Gracias, hasta luego",
]


def _shape_model(work: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = work / "dialogpt-medium-shape"
    if not (out / "config.json").exists():
        torch.manual_seed(0)
        cfg = GPT2Config(
            n_layer=24,
            n_embd=1024,
            n_head=16,
            n_positions=1024,
            vocab_size=50257,
            bos_token_id=50256,
            eos_token_id=50256,
        )
        GPT2LMHeadModel(cfg).save_pretrained(out, safe_serialization=True)
    return out


def _optimum_export(model_dir: Path, out: Path) -> Path:
    if not (out / "model.onnx").exists():
        from optimum.exporters.onnx import main_export

        main_export(
            model_name_or_path=str(model_dir),
            output=out,
            task="text-generation-with-past",
            device="cpu",
            do_validation=False,
            library_name="transformers",
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models/gpt2-es-tiny"))
    ap.add_argument("--shape", choices=["dialogpt-medium"], default=None)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lora-med-engine-bench"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--capacity", type=int, default=None)
    ap.add_argument("--backends", default=None, help="comma list; default: all that apply")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from lora_med.engine import GenerationSettings, load_engine
    from lora_med.engine.torch_backend import torch_engine
    from lora_med.export.decode_graph import build_decode_graph
    from lora_med.models import load_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = _shape_model(work) if args.shape else Path(args.model)
    tag = args.shape or model_dir.name
    n = args.new_tokens
    if args.shape:
        g = np.random.default_rng(0)
        prompts = [g.integers(0, 50256, size=int(k)).tolist() for k in g.integers(8, 24, size=args.prompts)]
    else:
        from lora_med.models import load_tokenizer

        tok = load_tokenizer(str(model_dir))
        prompts = [tok(p, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for p in PROMPTS][: args.prompts]

    wanted = set(args.backends.split(",")) if args.backends else None
    backends: dict = {}
    build: dict = {}

    def want(name: str) -> bool:
        return wanted is None or name in wanted

    if want("ort-cpu-fp32"):
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        t0 = time.perf_counter()
        onnx_dir = _optimum_export(model_dir, work / f"{tag}-optimum-fp32")
        build["ort-cpu-fp32"] = round(time.perf_counter() - t0, 1)
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        m = ORTModelForCausalLM.from_pretrained(
            onnx_dir, provider="CPUExecutionProvider", session_options=so, use_io_binding=False
        )
        eos = m.config.eos_token_id

        def ort_reply(p, m=m, eos=eos):
            x = torch.tensor([p])
            out = m.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
            assert out.shape[1] - len(p) == n

        backends["ort-cpu-fp32"] = ort_reply
    if want("ort-cpu-int8"):
        import shutil

        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM

        from lora_med.export.precision import quantize_int8

        t0 = time.perf_counter()
        fp32_dir = _optimum_export(model_dir, work / f"{tag}-optimum-fp32")
        int8_dir = work / f"{tag}-optimum-int8"
        if not (int8_dir / "model.onnx").exists():
            int8_dir.mkdir(parents=True, exist_ok=True)
            quantize_int8(fp32_dir / "model.onnx", int8_dir / "model.onnx")  # the project's one int8 recipe
            for f in fp32_dir.iterdir():
                if f.suffix in (".json", ".txt"):
                    shutil.copy(f, int8_dir / f.name)
        build["ort-cpu-int8"] = round(time.perf_counter() - t0, 1)
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        m8 = ORTModelForCausalLM.from_pretrained(
            int8_dir, provider="CPUExecutionProvider", session_options=so, use_io_binding=False
        )

        def ort8_reply(p, m=m8):
            x = torch.tensor([p])
            eos = m.config.eos_token_id
            m.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )

        backends["ort-cpu-int8"] = ort8_reply
    for precision in ("fp32", "int8"):
        name = f"engine-cpu-{precision}"
        if not want(name):
            continue
        gdir = work / f"{tag}-decode-{precision}"
        t0 = time.perf_counter()
        if not (gdir / "engine.json").exists():
            build_decode_graph(model_dir, gdir, precision=precision, capacity=args.capacity)
        build[name] = round(time.perf_counter() - t0, 1)
        eng = load_engine(gdir, device="cpu", threads=args.threads)
        s = GenerationSettings(max_new_tokens=n, min_new_tokens=n)
        backends[name] = lambda p, eng=eng, s=s: eng.generate([p], s)
    if want("torch-eager-fp32") and (args.shape or wanted):
        model = load_model(str(model_dir))
        eos = model.config.eos_token_id

        def torch_reply(p, model=model, eos=eos):
            x = torch.tensor([p])
            with torch.no_grad():
                model.generate(
                    input_ids=x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=eos,
                )

        backends["torch-eager-fp32"] = torch_reply
    if want("engine-torch-cpu-fp32") and wanted:
        eng = torch_engine(load_model(str(model_dir)), eos_token_id=0)
        s = GenerationSettings(max_new_tokens=n, min_new_tokens=n)
        backends["engine-torch-cpu-fp32"] = lambda p, eng=eng, s=s: eng.generate([p], s)

    for fn in backends.values():  # warm-up
        fn(prompts[0])
        fn(prompts[-1])
    times: dict[str, list[float]] = {k: [] for k in backends}
    cpu: dict[str, list[float]] = {k: [] for k in backends}
    for _ in range(args.repeats):
        for p in prompts:
            for name, fn in backends.items():
                c0, t0 = time.process_time(), time.perf_counter()
                fn(p)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    load = os.getloadavg()
    base = "torch-eager-fp32" if args.shape and "torch-eager-fp32" in times else "ort-cpu-fp32"
    ref = statistics.median(times[base]) if base in times else None
    rows = {}
    print(
        f"{tag}: {n} new tokens forced, batch 1, {len(prompts)} prompts x {args.repeats}, {args.threads} threads, "
        f"load avg {load[0]:.2f}"
    )
    for name, ts in times.items():
        p50 = statistics.median(ts)
        cpu50 = statistics.median(cpu[name])
        rows[name] = {
            "p50_ms": round(p50 * 1000, 2),
            "p95_ms": round(float(np.percentile(ts, 95)) * 1000, 2),
            "cpu_p50_ms": round(cpu50 * 1000, 2),
            "vs_" + base: round(p50 / ref, 3) if ref else None,
            "build_s": build.get(name),
        }
        print(
            f"  {name:24s} p50 {p50 * 1000:8.2f} ms  p95 {rows[name]['p95_ms']:8.2f} ms  cpu {cpu50 * 1000:8.2f} ms"
            + (f"  {p50 / ref:.3f}x {base}" if ref else "")
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {"model": tag, "threads": args.threads, "new_tokens": n, "load_avg": load, "backends": rows}, indent=1
            )
        )


if __name__ == "__main__":
    main()
