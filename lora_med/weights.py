"""Weight files proven before use: whole safetensors files (header and extent), shards, LoRA adapters.

Pickle files (``.bin``) are refused by name: loading them can run code.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import first_line


def safetensors_problem(path: Path) -> str | None:
    """None if ``path`` is a whole safetensors file (its header and the extent it promises; nothing is loaded),
    else what is wrong with it and the fix."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        return (
            f"{path}: not a complete safetensors file, truncated or corrupt ({first_line(e)}); copy it "
            "again, or retrain"
        )
    return None


def weights_problems(folder: Path, stem: str, what: str) -> list[str]:
    """Problems with ``folder/<stem>.safetensors`` (or its shards); pickle files are refused."""
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        return [p] if (p := safetensors_problem(single)) else []
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return [f"{index}: unreadable shard index; copy the {what} again"]
        out = []
        for shard in shards:
            if not (folder / shard).is_file():
                out.append(f"{folder / shard}: missing (listed in {index.name}); copy the {what} again")
            elif p := safetensors_problem(folder / shard):
                out.append(p)
        return out
    pickled = [f for f in (f"{stem}.bin", "pytorch_model.bin") if (folder / f).is_file()]
    if pickled:
        return [
            f"{folder / pickled[0]}: pickle files are not loaded (they can run code); re-save the {what} as "
            "safetensors (`model.save_pretrained(dir, safe_serialization=True)`) and remove the .bin file"
        ]
    return [f"{single}: missing; the {what} weights are not in {folder}: copy them there, or retrain"]


def adapter_problems(run_dir: Path) -> list[str]:
    """Problems with a run's LoRA adapter beyond its file being whole: its config must be a PEFT config with a
    positive whole rank, and its weights LoRA tensors (a full model's weights renamed would merge to the base)."""
    cfg_file, weights = run_dir / "adapter_config.json", run_dir / "adapter_model.safetensors"
    try:
        adapter = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # missing or not JSON: named by the caller's checks
    p = []
    if not isinstance(adapter, dict):
        return [f"{cfg_file}: expected a JSON object (a PEFT adapter config); copy it again from the run, or retrain"]
    for key in ("r", "lora_alpha"):
        v = adapter.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            p.append(
                f"{cfg_file}: {key} is {v!r}, not a positive whole number; the file is damaged: copy it again "
                "from the run, or retrain"
            )
    if weights.is_file() and safetensors_problem(weights) is None:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
        if not any(".lora_A." in k for k in keys) or not any(".lora_B." in k for k in keys):
            p.append(
                f"{weights}: holds no LoRA tensors (lora_A/lora_B), so it is not an adapter (a full model's "
                "weights?); copy the run's own adapter_model.safetensors, or retrain"
            )
    return p
