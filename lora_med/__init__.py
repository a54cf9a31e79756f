"""lora-med: LoRA/QLoRA fine-tuning, merge + ONNX Runtime export, and benchmarks for small chat models."""

__version__ = "0.1.0"
