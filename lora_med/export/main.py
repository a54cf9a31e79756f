"""``lora-med merge-export``: a training run -> merged model + two ONNX Runtime graphs, behind a parity gate.

Steps (each printed with its timing):

1. merge (``merge.py``): the adapter merged onto the base in fp32, merged logits equal to the adapter's;
2. save: ``merged/`` (transformers format, safetensors, tokenizer with a chat template, model card);
3. export: Optimum's ``text-generation-with-past`` graph (``onnx/model.onnx``, what stock
   ``ORTModelForCausalLM`` loads), traced in fp32;
4. optimise / quantise: ``ORTOptimizer`` (O1..O4), the int8 or int4 recipe or the fp16 conversion (``optimum.py``);
5. engine: the engine's decode graph (``engine/``) built from the merged weights, in the same precision
   (GPT-2 and the Llama family; other bases ship ``onnx/`` only, with the reason in the manifest);
6. parity (``parity.py``): both graphs vs the merged PyTorch model on the run's held-out conversations.

Everything is built in ``<output>.partial-<pid>`` and renamed to the output name only once the gate has
passed, so the output name never holds an unverified export; a partial folder left by a killed run is
removed by the next one. ``manifest.json`` records the source run, options, versions, every file's SHA-256
and size, the parity figures and timings.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .. import data, modelcard, models, runs, settings, weights
from ..cards import TrainCard
from ..config import ExportConfig
from ..engine import load_engine
from ..engine.ort_backend import ort_model, session_options
from ..errors import ConfigError, GateError, LoraMedError
from ..fileio import sha256_file, write_json
from ..settings import describe, name
from . import optimum
from .merge import merge
from .parity import check_parity, print_parity

TOKENIZER_FILES = ("tokenizer_config.json",)
SUBDIRS = ("merged", "onnx", "engine")


@dataclass
class ExportResult:
    output: Path
    manifest: dict  # manifest.json


# --------------------------------------------------------------------------- validation


def validate(cfg: ExportConfig) -> tuple[TrainCard, str, Path]:
    """Every problem with the settings, the run folder and the output, raised together before any weights load.

    Returns:
        (run card, device, output folder)
    """
    p = settings.check(cfg)
    if p:
        raise runs.problems_error("with the settings; nothing was loaded", p)
    if cfg.device == "cuda" and cfg.quantize in ("int8", "int4"):
        p.append(
            f"{describe(cfg, 'quantize')} with {describe(cfg, 'device')}: the int8 and int4 graphs (MatMulInteger, "
            "MatMulNBits with int8 activations) do not run on the CUDA execution provider; use --dtype fp16 on "
            f"CUDA, or --device cpu for {cfg.quantize}"
        )
    if cfg.dtype == "fp16" and cfg.device == "cpu":
        p.append(
            f"{describe(cfg, 'dtype')} on --device cpu: ONNX Runtime's CPU provider has few fp16 kernels; use "
            "fp32 (or --quantize int8/int4) on the CPU, fp16 with --device cuda"
        )
    if cfg.optimize == "O4" and cfg.device != "cuda":
        p.append(f"{describe(cfg, 'optimize')} is fp16 mixed precision for CUDA; use O1-O3 with --device cpu")
    if cfg.quantize in ("int8", "int4") and cfg.dtype == "fp16":
        p.append(f"{describe(cfg, 'quantize')} quantises an fp32 graph; drop {name(cfg, 'dtype')} fp16")
    device = "cpu"
    if cfg.device == "cuda":
        try:
            device = models.resolve_device("cuda")
        except ConfigError as e:
            p.append(str(e))
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            p.append(
                "--device cuda: this onnxruntime has no CUDAExecutionProvider; install onnxruntime-gpu (and not "
                "the plain onnxruntime package beside it)"
            )
    if not cfg.run_dir:
        p.append("RUN_DIR: give the folder of a `lora-med train` run (e.g. adapters/clinic-lora)")
        raise runs.problems_error("with the export; nothing was loaded", p)
    run_dir = Path(cfg.run_dir)
    try:
        card = TrainCard.read(run_dir)
    except LoraMedError as e:
        raise runs.problems_error("with the export; nothing was loaded", [*p, str(e)]) from None

    base = card.base
    if card.artifact == "adapter":
        cfg_file = run_dir / "adapter_config.json"
        p += weights.weights_problems(run_dir, "adapter_model", "adapter")
        if not cfg_file.is_file():
            p.append(f"{cfg_file}: missing; copy the whole run folder, or retrain")
        else:
            try:
                adapter_json = json.loads(cfg_file.read_text(encoding="utf-8"))
            except ValueError:
                p.append(f"{cfg_file}: not valid JSON; copy it again from the run, or retrain")
                adapter_json = None
            adapter_base = adapter_json.get("base_model_name_or_path") if isinstance(adapter_json, dict) else None
            p += weights.adapter_problems(run_dir)  # a PEFT config, LoRA tensors
            if isinstance(adapter_base, str) and adapter_base != base and runs.real(adapter_base) != runs.real(base):
                p.append(
                    f"{cfg_file}: the adapter was made for base {adapter_base!r}, but run.json names {base!r}; "
                    "this is another run's adapter: copy the matching run folder"
                )
        if models.is_local(base):
            p += weights.weights_problems(Path(base), "model", "base model")
        elif base.startswith(("/", ".", "~")):
            p.append(
                f"{run_dir / 'run.json'}: its base {base} no longer exists; restore that folder (the adapter is "
                "merged onto it)"
            )
    else:  # a full fine-tune's model (TrainCard knows no other artifact)
        p += weights.weights_problems(run_dir, "model", "fine-tuned model")
        if not (run_dir / "config.json").is_file():
            p.append(f"{run_dir / 'config.json'}: missing; copy the whole run folder, or retrain")
    for f in TOKENIZER_FILES:
        if not (run_dir / f).is_file():
            p.append(
                f"{run_dir / f}: missing; the tokenizer is saved with every run: copy the whole run folder, or retrain"
            )
    try:
        eval_path = card.held_out_path()
    except LoraMedError as e:
        p.append(str(e))
        eval_path = None

    out = cfg.output_dir()
    inputs = [("training run", run_dir)] + ([("base model", Path(base))] if models.is_local(base) else [])
    inputs += [("held-out data", eval_path)] if eval_path else []
    found, state = runs.output_problems(
        out, "export", flag=name(cfg, "output") if cfg.output else "--output", inputs=inputs, overwrite=cfg.overwrite
    )
    p += found
    if state == "owned" and not cfg.overwrite and not found:
        p.append(f"--output {out}: already holds an export; choose another --output or add --overwrite")
    if p:
        raise runs.problems_error("with the export; nothing was loaded", p)
    return card, device, out


# --------------------------------------------------------------------------- export


def _export_onnx(merged_dir: Path, onnx_dir: Path, work: Path, cfg: ExportConfig, tokenizer, step) -> dict:
    """The Optimum graph (export + optimisation + int8 or fp16, ``optimum.optimum_graph``) in ``onnx_dir``."""
    info = optimum.optimum_graph(
        merged_dir,
        onnx_dir,
        work,
        precision=cfg.precision(),
        optimize=cfg.optimize,
        for_gpu=cfg.device == "cuda",
        trust_remote_code=cfg.trust_remote_code,
        step=step,
    )
    tokenizer.save_pretrained(onnx_dir)
    return info


def _build_engine(merged_dir: Path, engine_dir: Path, cfg: ExportConfig, step) -> dict:
    """The decode graph in the export's precision (``optimum.engine_graph``): the manifest's ``engine`` section."""
    precision = cfg.precision()
    with step("engine", f"decode graph ({precision}, {optimum.engine_device(precision)}) from the merged weights"):
        section = optimum.engine_graph(merged_dir, engine_dir, precision)
    if section["status"] != "built":
        print(f"note: engine/ not built: {section['reason']}")
    elif cfg.device == "cuda" and precision == "fp32":
        section["note"] = (
            f"no CUDA fp32 decode graph: {optimum.NO_CUDA_FP32}; this fp32 graph runs on the CPU "
            "(export with --dtype fp16 for the CUDA engine)"
        )
        print(f"note: {section['note']}")
    return section


def _present(root: Path) -> list[str]:
    """The export's subfolders that exist (engine/ is absent where the decode graph was not built)."""
    return [sub for sub in SUBDIRS if (root / sub).is_dir()]


def _files(root: Path, *subdirs: str) -> dict:
    out = {}
    for sub in subdirs:
        for f in sorted((root / sub).rglob("*")):
            if f.is_file():
                out[f.relative_to(root).as_posix()] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return out


def _clean_stale(out: Path) -> None:
    """Remove ``<out>.partial-<pid>`` folders whose process is gone (a kill -9 mid-export leaves one)."""
    for d in out.parent.glob(f"{out.name}.partial-*"):
        pid = d.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not runs.pid_alive(int(pid)) and runs.marker(d):
            shutil.rmtree(d, ignore_errors=True)
            print(f"note: removed {d}, left by a merge-export (pid {pid}) that did not finish")


# --------------------------------------------------------------------------- the command


def merge_export(cfg: ExportConfig) -> ExportResult:
    """Merge ``cfg.run_dir``, export it to ONNX Runtime, prove parity, and write the output folder.

    Returns:
        ExportResult(output folder, manifest).
    Raises:
        ConfigError: settings, run folder or output invalid (all problems listed; nothing loaded or written).
        LoraMedError: the adapter does not fit its base, a weight file cannot be loaded, or the output is in use.
        GateError: the merge check or the parity gate failed (the output name is not created; a gate
            failure leaves the unverified export in ``<output>.failed`` for inspection).
    """
    card, device, out = validate(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    with runs.Lock(out.parent / f".{out.name}.lock", f"the export {out}") as lock:
        if lock.note:
            print(lock.note)
        _clean_stale(out)
        return _merge_export(cfg, card, device, out)


def _merge_export(cfg: ExportConfig, card: TrainCard, device: str, out: Path) -> ExportResult:
    t0 = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    timings: dict[str, float] = {}
    n_steps = 6 if cfg.optimize != "none" or cfg.precision() != "fp32" else 5
    counter = iter(range(1, n_steps + 1))

    @contextlib.contextmanager
    def step(what: str, detail: str = ""):
        print(f"[{next(counter)}/{n_steps}] {what}" + (f": {detail}" if detail else "") + " ...", flush=True)
        t = time.perf_counter()
        yield
        timings[f"{what}_s"] = round(time.perf_counter() - t, 3)
        print(f"      {what} done in {timings[f'{what}_s']:.1f}s", flush=True)

    tokenizer = models.load_tokenizer(str(run_dir), trust_remote_code=cfg.trust_remote_code)
    fmt, max_length = card.format, card.max_length
    convs = card.held_out()[: cfg.n_parity]
    examples, _ = data.encode_all(convs, tokenizer, max_length=max_length, fmt=fmt)
    if note := card.overlap_note():
        print(f"note: {note}")
    print(
        f"Run: {run_dir} ({card.method}, base {card.base}) -> {out} | "
        f"device {device} | {cfg.precision()} | optimise {cfg.optimize} | {len(convs)} held-out conversations"
    )

    with step(
        "merge",
        "fp32 base + adapter, merged logits must equal the adapter's"
        if card.artifact == "adapter"
        else "full fine-tune: nothing to merge",
    ):
        model, merge_figures = merge(
            card,
            run_dir,
            examples,
            tokenizer.pad_token_id,
            device=device,
            batch_size=cfg.batch_size,
            trust_remote_code=cfg.trust_remote_code,
        )
    if merge_figures.get("max_abs_diff_vs_adapter") is not None:
        print(
            f"      merged vs adapter logits: max abs diff {merge_figures['max_abs_diff_vs_adapter']:.2e} "
            f"(weights moved up to {merge_figures['max_weight_delta_vs_base']:.2e} from the base)"
        )

    work = out.parent / f"{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    runs.claim(work, "export")
    try:
        models.with_chat_template(tokenizer, fmt)
        # The reply ends where training taught it to: with a chat template, at the template's end-of-turn token
        # (ChatML's <|im_end|>), which a base model's EOS is not; transformers' generate() and the engine read
        # the list from the generation config.
        known = models.stop_ids(model)
        stop = known + [t for t in data.turn_end_ids(tokenizer, fmt) if t not in known]
        model.generation_config.eos_token_id = stop if len(stop) > 1 else stop[0]
        with step("save", "merged/ (safetensors + tokenizer)"):
            model.config.use_cache = True  # training turned it off; the app decodes with the cache
            model.save_pretrained(work / "merged", safe_serialization=True)
            tokenizer.save_pretrained(work / "merged")
        export_info = _export_onnx(work / "merged", work / "onnx", work / "tmp", cfg, tokenizer, step)
        shutil.rmtree(work / "tmp")
        provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
        export_info["provider"] = provider
        engine_info = _build_engine(work / "merged", work / "engine", cfg, step)
        manifest = {
            "kind": "lora-med.export",
            "format_version": 3,
            "status": "running",
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": {
                "run_dir": str(run_dir.resolve()),
                "run_json_sha256": sha256_file(run_dir / "run.json"),
                "method": card.method,
                "artifact": card.artifact,
                "base": card.base,
                "format": fmt,
                "max_length": max_length,
            },
            "options": settings.as_dict(cfg),
            "output": str(out.resolve()),
            "device": models.device_info(device),
            "versions": models.library_versions(),
            "merge": merge_figures,
            "export": export_info,
            "engine": engine_info,
        }
        failed = None
        graphs_checked = "onnx/ and engine/" if engine_info["status"] == "built" else "onnx/"
        with step("parity", f"{graphs_checked} ({provider}) vs merged PyTorch on {len(convs)} held-out conversations"):
            onnx_model = ort_model(
                work / "onnx",
                provider,
                use_io_binding=True if device == "cuda" else None,
                session_options=session_options(spin=False),
            )
            engine = (
                load_engine(work / "engine", device=engine_info["device"], spin=False)
                if engine_info["status"] == "built"
                else None
            )
            try:
                parity = check_parity(
                    onnx_model,
                    model,
                    tokenizer,
                    convs,
                    fmt=fmt,
                    max_length=max_length,
                    cfg=cfg,
                    engine=engine,
                    engine_note=engine_info.get("reason"),
                )
            except GateError as e:
                parity, failed = e.figures, e
            finally:
                if engine is not None:
                    engine.close()
        manifest["parity"] = parity
        print_parity(parity)
        if failed is not None:
            manifest["status"] = "failed"
            write_json(work / "manifest.json", manifest)
            runs.record(work, *_present(work), "manifest.json")
            dead = out.parent / f"{out.name}.failed"
            if dead.exists() and not runs.marker(dead):  # not ours: never replaced
                dead = out.parent / f"{out.name}.failed-{os.getpid()}"
            shutil.rmtree(dead, ignore_errors=True)
            os.replace(work, dead)
            raise GateError(
                f"{failed}\nNothing was written to {out}; the unverified export is kept in {dead} for inspection"
            ) from None
        figures = {
            "parity: max abs logits diff": parity.get("max_abs_diff"),
            "parity: top-1 agreement": parity.get("top1_agreement"),
            "ONNX precision": cfg.precision(),
        }
        modelcard.write(work / "merged", "merged", card, extra=figures)
        modelcard.write(work / "onnx", "onnx", card, extra=figures)
        present = _present(work)
        manifest["files"] = _files(work, *present)
        manifest["sizes"] = {
            sub: sum(v["bytes"] for k, v in manifest["files"].items() if k.startswith(sub + "/")) for sub in present
        }
        timings["total_s"] = round(time.perf_counter() - t0, 3)
        manifest["timings"] = timings
        manifest["status"] = "complete"
        write_json(work / "manifest.json", manifest)
        runs.record(work, *present, "manifest.json")
        # Only now does the output name appear (or change): a rename, so it is never half there.
        old = None
        if out.exists():
            old = out.parent / f"{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(work, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    sizes = ", ".join(f"{sub} {mb / 1e6:.1f} MB" for sub, mb in manifest["sizes"].items())
    q = lambda p: shlex.quote(str(p))  # pasted into a shell: a path with spaces stays one argument
    print(
        f"Saved to {out} ({sizes}) in {timings['total_s']:.1f}s\n"
        f"Next: lora-med bench --run {q(run_dir)} --export {q(out)}   or   lora-med serve {q(out)}"
    )
    return ExportResult(out, manifest)
