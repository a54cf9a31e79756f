"""Run ``lora-med train`` (``python -m lora_med train ...``) in this process, for run.py, with two additions
on CUDA that the run card does not record:

* ``LORA_MED_BENCH_CARD_GB``: cap the caching allocator so that this process gets what a card of that many
  GB would leave it once the CUDA context is loaded (``torch.cuda.set_per_process_memory_fraction``): a
  larger GPU then runs out of memory where the smaller card would, and the Trainer's
  ``auto_find_batch_size`` halves the batch (run.py reports that as "did not fit");
* ``LORA_MED_BENCH_SIDE_FILE``: a JSON file that receives the device's memory as the card reports it
  (``torch.cuda.mem_get_info``: the context and anything else outside torch), the cap, and
  ``torch.cuda.max_memory_reserved`` read at the moment the run card reads ``max_memory_allocated``
  (lora_med.train's ``peak_memory``, wrapped; else at exit; the card records the reserved figure too).

Usage (what run.py does): python benchmarks/train_memory/launch.py train --base DIR --data FILE ...
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
from pathlib import Path

# This checkout's lora_med, not whichever one is installed (a script's own folder heads sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    side_file = os.environ.get("LORA_MED_BENCH_SIDE_FILE")
    card_gb = float(os.environ.get("LORA_MED_BENCH_CARD_GB") or 0)
    info: dict = {}
    if side_file:  # registered first, so it runs last (atexit is last-in, first-out)
        atexit.register(lambda: Path(side_file).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8"))
    import torch

    if torch.cuda.is_available():
        torch.cuda.init()
        torch.zeros(1, device="cuda")  # load the context before measuring it
        free, total = torch.cuda.mem_get_info()
        info.update(device_total_gb=round(total / 1e9, 3), outside_torch_at_start_gb=round((total - free) / 1e9, 3))
        if card_gb:
            allowed = card_gb * 1e9 - (total - free)
            torch.cuda.set_per_process_memory_fraction(max(allowed, 0) / total)
            info.update(card_gb=card_gb, allocator_cap_gb=round(allowed / 1e9, 3))

        def record(where: str) -> None:
            info.update(
                max_memory_reserved_gb=round(torch.cuda.max_memory_reserved() / 1e9, 3),
                max_memory_allocated_gb=round(torch.cuda.max_memory_allocated() / 1e9, 3),
                read_at=where,
            )

        try:
            from lora_med.train import main as train_module

            original = getattr(train_module, "peak_memory", None)
        except Exception:
            train_module = original = None
        if original is not None:

            def peak_memory(device: str):
                record("end of training (with the run card's peak)")
                return original(device)

            train_module.peak_memory = peak_memory
        atexit.register(lambda: "read_at" in info or record("process exit (includes the final evals)"))
    sys.argv = ["lora_med", *sys.argv[1:]]
    runpy.run_module("lora_med", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
