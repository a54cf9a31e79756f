"""lora-med: LoRA/QLoRA fine-tuning, merge + ONNX Runtime export, and benchmarks for small chat models."""

import logging

__version__ = "0.1.0"

# bitsandbytes (imported by PEFT) warns on every start that it cannot fetch an optional 4-bit CPU kernel
# from the model hub; offline that is expected and its built-in CPU kernel is used instead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
