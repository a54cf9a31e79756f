#!/usr/bin/env bash
# Creates .venv with the pinned stack (CPU torch first, so pip does not pull the multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# The CPU wheel of torch; where only PyPI is reachable and no local wheel exists, fall back to PyPI's torch.
.venv/bin/python -m pip install -q "torch==2.13.0+cpu" 2>/dev/null || .venv/bin/python -m pip install -q "torch>=2.6,<2.15"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import torch, transformers, peft, optimum.onnxruntime, onnxruntime; print('lora-med stack ready: torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| onnxruntime', onnxruntime.__version__)"
