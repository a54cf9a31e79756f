#!/usr/bin/env bash
# Optional: onnxruntime-genai as a `lora-med bench` peer (genai-cpu-fp32, genai-cpu-int4; genai-cuda-fp16 on a GPU).
# Nothing else in lora-med needs it; the tests skip its rows when it is missing.
#
# Two halves, two places (see lora_med/bench/genai.py):
#  1. its generator goes into lora-med's .venv with --no-deps: the wheel declares the CPU `onnxruntime` package,
#     which would replace onnxruntime-gpu's module; its native library loads the installed onnxruntime instead;
#  2. its model builder needs transformers 5 (lora-med pins < 4.58 for optimum-onnx) and onnx-ir: it gets a venv
#     of its own, .venv-genai, which sees lora-med's packages (torch, onnx, numpy) underneath through a .pth file
#     read after its own site-packages, with transformers 5 on top. bench runs the builder with that interpreter.
# With a GPU, GENAI_PACKAGE=onnxruntime-genai-cuda installs the CUDA build of the generator instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
GENAI=${GENAI_PACKAGE:-onnxruntime-genai}
GENAI_VERSION=${GENAI_VERSION:-0.18.0}
[ -x .venv/bin/python ] || { echo "error: no .venv here; run scripts/setup.sh first" >&2; exit 2; }

# 1. the generator, against lora-med's onnxruntime (onnx-ir is already a lora-med dependency)
.venv/bin/python -m pip install -q --no-deps "$GENAI==$GENAI_VERSION"

# 2. the builder's own environment
[ -x .venv-genai/bin/python ] || "$PY" -m venv .venv-genai
SITE=$(.venv-genai/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$SITE/zz_lora_med_venv.pth"
.venv-genai/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# transformers 5 without its `kernels` dependency (bench runs the builder with USE_HUB_KERNELS=0)
.venv-genai/bin/python -m pip install -q --no-deps "transformers==5.25.0"
.venv-genai/bin/python -m pip install -q "huggingface-hub>=2.4,<3" "tokenizers>=0.23.1,<0.24" typer onnx-ir
.venv-genai/bin/python -m pip install -q --no-deps "$GENAI==$GENAI_VERSION"

.venv/bin/python -c "import onnxruntime_genai as og, onnxruntime as ort; print('generator:', og.__version__, 'on onnxruntime', ort.__version__)"
USE_HUB_KERNELS=0 .venv-genai/bin/python -c "import transformers, onnxruntime_genai.models.builder; print('builder: transformers', transformers.__version__)"
echo "ready: lora-med bench --backends engine-cpu-fp32,genai-cpu-fp32,engine-cpu-int4,genai-cpu-int4 ..."
