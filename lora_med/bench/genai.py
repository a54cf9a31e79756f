"""onnxruntime-genai as a bench peer: its own generator on its own model builder's graph of the same model
(``genai-cpu-fp32``, ``genai-cpu-int4``; ``genai-cuda-fp16`` on a GPU).

onnxruntime-genai writes decode graphs for Llama, Qwen2/3, Mistral, Phi, Gemma (not GPT-2) and runs them with a
generator of its own (static batches) and, since 0.18, an ``Engine`` of requests. The Engine's continuous
batching and prefix cache need the builder's PagedAttention graph, which it writes for CUDA and WebGPU fp16 only:
on the CPU the Engine batches statically, like the generator. It is the obvious peer for the engine on these
models, and it is optional: nothing in lora-med needs it.

Installing it (``scripts/setup-genai.sh``) takes two places, because its two halves want different things:

- the generator (``onnxruntime_genai``) goes into lora-med's venv with ``pip install --no-deps``: the wheel
  declares the CPU ``onnxruntime`` package, which would clobber ``onnxruntime-gpu``'s module, but its native
  library links no onnxruntime and loads the installed package's ``libonnxruntime`` at import;
- the model builder (``python -m onnxruntime_genai.models.builder``) imports transformers 5 (lora-med pins
  transformers < 4.58 for optimum-onnx) and ``onnx-ir``: it runs from a separate venv (``.venv-genai``) that
  sees lora-med's packages underneath (torch, onnx, numpy) with transformers 5 on top. bench calls it in a
  subprocess with that interpreter (``--genai-python``), offline, on the model folder (which must hold a
  tokenizer: the builder loads one).

Rows are skipped, with the reason, when either half is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np

from ..config import REPO_ROOT
from ..errors import LoraMedError, first_line

DEFAULT_PYTHON = REPO_ROOT / ".venv-genai" / "bin" / "python"
# backend name -> (builder precision, builder execution provider)
BACKENDS = {"genai-cpu-fp32": ("fp32", "cpu"), "genai-cpu-int4": ("int4", "cpu"), "genai-cuda-fp16": ("fp16", "cuda")}
SETUP = "bash scripts/setup-genai.sh"
ENGINE_ROWS = 64  # requests genai's Engine takes at once (the concurrent workload's --concurrent at most)
BUILD_TIMEOUT_S = 1800


def builder_python(configured: str | None) -> Path:
    return Path(configured) if configured else DEFAULT_PYTHON


def missing(python: Path) -> str | None:
    """Why the genai rows cannot run here, or None."""
    try:
        import onnxruntime_genai  # noqa: F401  (imported to check it loads)
    except Exception as e:  # ImportError, or its native library failing to load
        return f"onnxruntime-genai is not installed in this environment ({first_line(e, 120)}); {SETUP}"
    if not python.is_file():
        return f"onnxruntime-genai's model builder: no interpreter at {python}; {SETUP} (or --genai-python)"
    return None


def build(model_dir: Path, out: Path, backend: str, python: Path, threads: int) -> dict:
    """onnxruntime-genai's model builder on ``model_dir`` into ``out``, offline, in its own interpreter; the
    session's threads set in its genai_config.json. Returns what was built (for the report).

    Raises:
        LoraMedError: the builder failed (its last lines quoted).
    """
    precision, provider = BACKENDS[backend]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # No hub, and no `kernels` package (transformers 5 asks for it unless told not to).
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", USE_HUB_KERNELS="0")
    cmd = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(model_dir), "-o", str(out)]
    cmd += ["-p", precision, "-e", provider, "-c", str(out.parent / f"{out.name}-cache")]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LoraMedError(f"onnxruntime-genai's model builder ({python}) did not run: {first_line(e)}") from None
    if done.returncode != 0 or not (out / "genai_config.json").is_file():
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise LoraMedError(f"onnxruntime-genai's model builder failed on {model_dir} ({precision}, {provider}): {tail}")
    cfg_file = out / "genai_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    session = cfg["model"]["decoder"].setdefault("session_options", {})
    session.update(intra_op_num_threads=int(threads), inter_op_num_threads=1)
    cfg_file.write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    return {
        "builder": "onnxruntime_genai.models.builder",
        "precision": precision,
        "execution_provider": provider,
        "build_s": round(time.perf_counter() - t0, 2),
        "pad_token_id": cfg["model"].get("pad_token_id"),
    }


def load(folder: Path):
    """genai's model for ``folder``, its static Engine allowed ``ENGINE_ROWS`` requests at once (its default is 4;
    the cache is allocated per batch, not at load)."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"engine": {"static_batching": {"max_batch_size": ENGINE_ROWS}}}))
    return og.Model(config)


def decode(model, ids: list[int], n: int) -> int:
    """Exactly ``n`` greedy new tokens after ``ids`` through genai's generator; returns how many it made."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
    g = og.Generator(model, params)
    g.append_tokens(np.array([ids], np.int32))
    while not g.is_done():
        g.generate_next_token()
    return len(g.get_sequence(0)) - len(ids)


def decode_batch(model, prompts: list[list[int]], n: int, pad: int) -> None:
    """One static batch: the prompts left-padded with ``pad`` (genai masks pad positions), every row decoded
    until the batch has ``n`` new tokens (genai's generator cannot retire a row early)."""
    import onnxruntime_genai as og

    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
    params = og.GeneratorParams(model)
    params.set_search_options(batch_size=len(prompts), max_length=width + n, min_length=width + n, do_sample=False)
    g = og.Generator(model, params)
    g.append_tokens(ids)
    while not g.is_done():
        g.generate_next_token()


def _greedy_turn(og, request, n: int):
    opts = og.TurnOptions(request)
    opts.set_do_sample(False)
    opts.set_max_generated_tokens(n)
    opts.set_min_generated_tokens(n)
    return opts


def engine_batch(engine, prompts: list[list[int]], lengths: list[int]) -> None:
    """Every prompt as a Request to genai's ``og.Engine(model)``, each for exactly its length, run until all are
    done. On the CPU this Engine batches statically (a row is released only with its batch): its continuous
    batching and prefix cache need the builder's PagedAttention graph, which it writes for CUDA and WebGPU fp16
    only.

    Raises:
        LoraMedError: the Engine reported a failed request.
    """
    import onnxruntime_genai as og

    requests = []
    for p, n in zip(prompts, lengths):
        r = engine.create_request()
        r.begin_turn(np.asarray(p, np.int32), _greedy_turn(og, r, n))
        requests.append(r)
    buffer, done = engine.create_event_buffer(256), 0
    failed, finished = og.EngineEventFlags.FAILED.value, og.EngineEventFlags.TURN_FINISHED.value
    try:
        while done < len(requests):
            for event in engine.run(buffer):
                if event.flags.value & failed:
                    raise LoraMedError(f"onnxruntime-genai's Engine failed a request ({event.error_code})")
                done += bool(event.flags.value & finished)
    finally:
        for r in requests:
            r.close()


class KeptPrefix:
    """One genai generator holding ``system`` (a start every prompt shares) in its KV cache: each prompt rewinds
    to it and appends only what follows (``rewind_to``), one request at a time. genai's way of keeping a system
    prompt on the CPU, where its Engine has no prefix cache."""

    def __init__(self, model, system: list[int], longest: int):
        import onnxruntime_genai as og

        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(system) + longest, do_sample=False)
        self.generator = og.Generator(model, params)
        self.generator.append_tokens(np.array([system], np.int32))
        self.kept = len(system)

    def reply(self, rest: list[int], n: int) -> None:
        """Exactly ``n`` greedy tokens after the kept start and ``rest``."""
        g = self.generator
        g.rewind_to(self.kept)
        g.append_tokens(np.array([rest], np.int32))
        for _ in range(n):
            g.generate_next_token()


def engine(model):
    """genai's ``og.Engine`` on ``model`` (made once: a server keeps one)."""
    import onnxruntime_genai as og

    return og.Engine(model)
