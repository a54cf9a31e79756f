"""``lora-med train``: LoRA, QLoRA or a full fine-tune on the transformers Trainer + PEFT.

Modules: main (the command: checks, run folder, resume, the run card), trainer (the Trainer and its
callbacks), plan (the peak-memory planner), levers (memory levers chosen from the plan), compare (base vs
fine-tuned replies through the engine).
"""

__all__ = ["train"]


def __getattr__(name: str):
    # `from lora_med.train import plan` (the CLI's --plan, --help) must not wait for torch and transformers.
    if name == "train":
        from .main import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
