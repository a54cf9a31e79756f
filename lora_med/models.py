"""Base models and tokenizers: where they come from, how they load, what LoRA targets in them.

Everything loads through transformers with ``use_safetensors=True`` (pickle ``.bin`` weights are
refused) and without remote code unless the user asks for it.
"""

from __future__ import annotations

import gc
import os
import platform
import resource
from pathlib import Path
from typing import Any

import torch

from .config import DEFAULT_BASE, REPO_ROOT
from .errors import ConfigError, LoraMedError, first_line
from .fileio import sha256_file
from .weights import weights_problems

# LoRA targets per architecture. GPT-2 uses Conv1D: c_attn (fused q/k/v), c_proj (attention and MLP
# output), c_fc (MLP input). lm_head and the embeddings are never targeted: they are tied.
TARGET_MODULES = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_base(base: str) -> str:
    """A local folder (absolute path returned) or a hub id (returned as is).

    A relative path is looked up from the working directory, then from the lora-med checkout, so
    the shipped ``models/gpt2-es-tiny`` is found from anywhere.

    Raises:
        ConfigError: a path that is not a folder (a file, or a folder-like name that does not exist).
    """
    for candidate in (Path(base).expanduser(), REPO_ROOT / base):
        if candidate.is_dir():
            return str(candidate.resolve())
    if Path(base).expanduser().exists():  # transformers would read a file as a config and fail oddly
        raise ConfigError(
            f"--base {base}: is a file, not a model folder; give the folder that holds config.json, "
            "the weights and the tokenizer"
        )
    if base.startswith((".", "/", "~")) or base.count("/") > 1 or os.sep + os.sep in base:
        raise ConfigError(
            f"--base {base}: no such directory; give a local model folder or a hub id like microsoft/DialoGPT-medium"
        )
    return base


def is_local(base: str) -> bool:
    return Path(base).is_dir()


def offline_error(base: str, err: Exception) -> LoraMedError:
    return LoraMedError(
        f"cannot load '{base}': it is not a local folder and it could not be fetched from the model hub "
        f"({first_line(err, 160)}).\n"
        "Offline options:\n"
        f"  - use the shipped Spanish base: --base {DEFAULT_BASE}\n"
        "  - point --base at a local folder with config.json, model.safetensors and the tokenizer files\n"
        f"  - on a machine with network: `hf download {base} --local-dir DIR`, then copy DIR here"
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")

# DialoGPT's format in one line: every turn's text, trimmed, then EOS; the reply follows the last EOS. Rendering a
# conversation with it and tokenizing gives the same ids as training's data.segments (tests/test_models.py).
DIALOGPT_CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] | trim }}{{ eos_token }}{% endfor %}"


def tokenizer_problem(base: str, flag: str | None = "--base") -> str | None:
    """A local model folder without tokenizer files, named (after ``flag``); None otherwise (hub ids are checked
    on load)."""
    p = Path(base)
    if p.is_dir() and not any((p / f).is_file() for f in TOKENIZER_FILES):
        named = f"{flag} {base}" if flag else base
        return (
            f"{named}: no tokenizer there (none of {', '.join(TOKENIZER_FILES[:3])}); copy the tokenizer "
            "files into the folder (`tokenizer.save_pretrained(DIR)`)"
        )
    return None


def with_chat_template(tokenizer, fmt: str):
    """Give a DialoGPT-format tokenizer a chat template that reproduces the training format, so
    ``pipeline("text-generation")`` with chat messages works on what lora-med saves."""
    if fmt == "dialogpt" and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = DIALOGPT_CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(base: str, *, trust_remote_code: bool = False):
    """Load a tokenizer; pad with EOS where it has no pad token (GPT-2 / DialoGPT).

    Raises:
        LoraMedError: no tokenizer files in a local folder, damaged ones (named), or a hub id that cannot be fetched.
    """
    from transformers import AutoTokenizer

    if problem := tokenizer_problem(base, None):
        raise ConfigError(problem)
    try:
        tok = AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code)
    except Exception as e:  # a damaged local file fails deep inside transformers/tokenizers, with any type
        if is_local(base):
            raise LoraMedError(
                f"{base}: the tokenizer files cannot be loaded ({first_line(e)}); copy them again "
                "(`tokenizer.save_pretrained(DIR)`)"
            ) from None
        raise offline_error(base, e) from None
    if tok.eos_token_id is None:
        raise ConfigError(f"--base {base}: the tokenizer has no EOS token; conversations need one to end turns")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model_config(base: str, *, trust_remote_code: bool = False):
    """A model's config (``AutoConfig``), without its weights.

    Raises:
        LoraMedError: a local config.json that is not a model config (named), or a hub id that cannot be fetched.
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    except Exception as e:  # a list, a wrong type or a bad model_type in config.json surfaces as any exception
        if is_local(base):
            raise LoraMedError(
                f"{Path(base) / 'config.json'}: not a usable model config ({first_line(e)}); copy the base folder again"
            ) from None
        raise offline_error(base, e) from None


def load_model(
    base: str,
    *,
    dtype: torch.dtype = torch.float32,
    quantization_config=None,
    device_map=None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
):
    """Load a causal LM from safetensors only, in eval mode (``attn_implementation``: transformers' default
    when None).

    Raises:
        LoraMedError: a local folder whose config or weights cannot be loaded (the broken file named), or a hub
            id that cannot be fetched.
    """
    from transformers import AutoModelForCausalLM

    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            base,
            dtype=dtype,
            use_safetensors=True,
            quantization_config=quantization_config,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            **extra,
        )
    except Exception as e:  # a cut weight file raises SafetensorError, a bad config any type: all name the folder
        if not is_local(base):
            if isinstance(e, (OSError, ValueError)):
                raise offline_error(base, e) from None
            raise
        broken = weights_problems(Path(base), "model", "model")
        if broken:  # a missing, cut or pickle weight file: named, with its fix
            raise LoraMedError(f"cannot load the model in {base}: {'; '.join(broken)}") from None
        if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
            raise LoraMedError(
                f"cannot load the model in {base}: out of memory ({first_line(e)}); free memory, "
                "or load it on another device or in lower precision"
            ) from e
        if isinstance(e, (OSError, ValueError, KeyError, TypeError)):  # a config or file the loader refuses
            raise LoraMedError(
                f"cannot load the model in {base}: {first_line(e)}; check its config.json, or copy the folder again"
            ) from e
        raise  # the files are whole: anything else (bitsandbytes, a bug) keeps its own type and traceback
    return model.eval()


def fingerprint(base: str, known: str | None = None) -> str:
    """What a base model is, by content: SHA-256 over its config.json and weight files (a hub id stands for
    itself). Two folders with the same name but other weights differ; a copy of the same base does not."""
    import hashlib

    if known:
        return known
    folder = Path(base)
    if not folder.is_dir():
        return base
    h = hashlib.sha256()
    for f in sorted([folder / "config.json", *folder.glob("*.safetensors")]):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def target_modules_for(model_type: str) -> list[str]:
    if model_type in TARGET_MODULES:
        return list(TARGET_MODULES[model_type])
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_map

    if model_type in peft_map:
        return list(peft_map[model_type])
    raise ConfigError(f"no default LoRA targets for model type '{model_type}'; pass --target-modules")


def count_parameters(model) -> tuple[int, int]:
    """(total, trainable) parameter counts; tied weights are counted once."""
    seen, total, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if getattr(p, "quant_storage", None) is not None or p.__class__.__name__ == "Params4bit":
            n *= 2  # 4-bit weights pack two values per byte
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def bf16_supported() -> bool:
    """Whether the GPU computes in bf16; planning for a GPU from a machine without one assumes it does (Ampere
    and newer, the RTX 4060 Ti included)."""
    return not torch.cuda.is_available() or torch.cuda.is_bf16_supported()


def max_positions(config) -> int | None:
    """How many positions the model reads (GPT-2's n_positions, Llama's max_position_embeddings)."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def stop_ids(model) -> list[int]:
    """The token ids that end a reply: the generation config's (several for chat models: Qwen2.5-Instruct's
    ``[<|im_end|>, <|endoftext|>]``, Llama 3's three), then the model config's, without repeats. The decode
    graph's builder records the same list in engine.json."""
    out: list[int] = []
    gen = getattr(model, "generation_config", None)
    for eos in (getattr(gen, "eos_token_id", None), model.config.eos_token_id):
        for t in eos if isinstance(eos, (list, tuple)) else [eos]:
            if t is not None and int(t) not in out:
                out.append(int(t))
    return out


def set_seed(seed: int) -> None:
    from transformers import set_seed as hf_set_seed

    hf_set_seed(seed)


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: use auto, cpu or cuda")
    return device


def device_info(device: str) -> dict:
    """What the run ran on, for run cards and reports."""
    info: dict[str, Any] = {
        "device": device,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            vram_gb=round(props.total_memory / 2**30, 2),
            cuda=torch.version.cuda,
            driver=_nvidia_driver(),
        )
    return info


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else the platform's word for it: for reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _nvidia_driver() -> str | None:
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in (
        "lora-med",
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "datasets",
        "bitsandbytes",
        "optimum",
        "optimum-onnx",
        "onnx",
        "onnxruntime-gpu",
        "onnxruntime",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------- process memory (CPU)


def release_memory() -> None:
    """Free what the previous run or backend left: Python objects, then glibc's free lists (malloc_trim), so
    that its pages do not stay resident and hide the next backend's own memory."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> str:
    """Reset the process's peak-RSS mark (Linux /proc/self/clear_refs); returns what the peak will mean."""
    release_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return (
            "peak RSS during load + timing minus RSS before load (VmHWM after a /proc/self/clear_refs reset; "
            "the previous backend freed and malloc_trim'd first)"
        )
    except OSError:
        return (
            "growth of the process peak RSS (ru_maxrss) during load + timing; 0 when an earlier backend peaked higher"
        )


def rss_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def available_memory(device: str) -> int | None:
    """Bytes this process can still allocate on ``device`` now, or None when that cannot be read. The CPU: the
    kernel's MemAvailable, lowered to what is left under the cgroup's limit (a container's); CUDA: the free memory
    of the current GPU."""
    if device.startswith("cuda"):
        try:
            return int(torch.cuda.mem_get_info()[0])
        except (RuntimeError, AssertionError):
            return None
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        stat = dict(line.split() for line in Path("/sys/fs/cgroup/memory.stat").read_text().splitlines())
        used -= int(stat.get("inactive_file", 0))  # page cache the kernel gives back on demand
        if limit != "max":
            left = max(int(limit) - used, 0)
            free = left if free is None else min(free, left)
    except (OSError, ValueError):
        pass
    return free
