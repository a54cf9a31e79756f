"""``lora-med bench --paired``: the whole story in one process. Train LoRA and the full fine-tune on the same data,
seed, epochs and batch, merge-export both behind the parity gate; ``bench`` then measures them."""

from __future__ import annotations

import time
from pathlib import Path

from .. import settings
from ..config import BenchConfig, ExportConfig, ExportDevice, ExportDtype, Quantize, TrainConfig
from ..errors import GateError
from ..export.main import merge_export
from ..train.main import train

# --------------------------------------------------------------------------- --paired


def paired_runs(cfg: BenchConfig, name_: str, device: str) -> tuple[str, str, list[str], dict]:
    """Train LoRA and full on the same split, seed and token budget; merge-export both. Returns their folders.

    A quantised export that its own parity gate refuses is left out (and named in the report) rather than
    ending the run: the refusal is merge-export doing its job, and the fp32 exports still get measured.
    """
    work = Path(cfg.paired_dir or Path("adapters") / f"paired-{name_}")
    common = dict(
        data=cfg.data,
        eval_data=cfg.eval_data,
        allow_eval_overlap=cfg.allow_eval_overlap,
        epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        batch_size=cfg.train_batch_size,
        grad_accum=1,
        seed=cfg.seed,
        device=device,
        compare=True,
        overwrite=True,
    )
    if cfg.base:
        common["base"] = cfg.base
    trained, exports, timings, refused = {}, [], {}, []
    for method, config_file in (("lora", cfg.lora_config), ("full", cfg.full_config)):
        tcfg = settings.load_config(
            TrainConfig, config_file, {**common, "method": method, "output": str(work / method)}, argv=[]
        )
        t0 = time.perf_counter()
        trained[method] = str(train(tcfg).output)
        timings[f"train_{method}_s"] = round(time.perf_counter() - t0, 2)
        variants: list[tuple[ExportDevice, ExportDtype, Quantize]] = [("cpu", "fp32", "none"), ("cpu", "fp32", "int8")]
        if device == "cuda":
            variants.append(("cuda", "fp16", "none"))
        for dev, dtype, quant in variants:
            out = work / f"export-{method}-{dev}-{'int8' if quant == 'int8' else dtype}"
            t0 = time.perf_counter()
            try:
                exports.append(
                    str(
                        merge_export(
                            ExportConfig(
                                run_dir=trained[method],
                                output=str(out),
                                device=dev,
                                dtype=dtype,
                                quantize=quant,
                                min_top1=cfg.min_top1,
                                min_same_replies=cfg.min_same_replies,
                                overwrite=out.exists(),
                            )
                        ).output
                    )
                )
            except GateError as e:
                if quant == "none" and dtype == "fp32":
                    raise  # an fp32 export that fails parity is a real fault, not a precision trade-off
                why = [ln.strip()[2:] for ln in str(e).splitlines() if ln.strip().startswith("- ")] or [str(e)]
                refused.append(f"{out.name}: refused by its parity gate ({'; '.join(why)}); left out")
                print(f"note: {refused[-1]}")
            timings[f"export_{out.name}_s"] = round(time.perf_counter() - t0, 2)
    return (
        trained["lora"],
        trained["full"],
        exports,
        {
            "dir": str(work),
            "timings": timings,
            "refused_exports": refused,
            "lora_config": cfg.lora_config,
            "full_config": cfg.full_config,
        },
    )
