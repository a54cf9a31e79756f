#!/usr/bin/env bash
# The figures in docs/architectures.md: random weights of public configs, speed only, 2 intra-op threads, 32 new
# tokens per reply. Run on a quiet machine (the report records the load average at its start and end); the genai
# rows need `bash scripts/setup-genai.sh` first (they are listed as not measured, with the reason, without it).
#   bash benchmarks/architectures/run.sh            # both
#   bash benchmarks/architectures/run.sh qwen       # or: dialogpt
set -euo pipefail
cd "$(dirname "$0")/../.."
B=(.venv/bin/python -m lora_med bench --threads 2 --new-tokens 32 --no-scaling --max-latency-s 0 --warmup 1)
what=${1:-all}
if [ "$what" = all ] || [ "$what" = qwen ]; then
  # Qwen2.5-0.5B's shape: the engine beside onnxruntime-genai at the same precision, rows alternating; batch 1
  # (4 prompts x 3 repeats) and 8 prompts arriving together with replies of 8..64 tokens.
  "${B[@]}" --shape qwen2.5-0.5b --prompts 4 --repeats 3 --no-throughput --concurrent 8 --scaling-repeats 1 \
    --backends engine-cpu-fp32,genai-cpu-fp32,engine-cpu-int4,genai-cpu-int4 \
    --out benchmarks/results/qwen2.5-0.5b-shape-cpu-genai
fi
if [ "$what" = all ] || [ "$what" = dialogpt ]; then
  # DialoGPT-medium's shape: int4 vs int8 vs fp32 through the engine (decoding reads every weight per token).
  "${B[@]}" --shape dialogpt-medium --prompts 4 --repeats 3 --concurrent 0 --scaling-repeats 2 \
    --backends engine-cpu-fp32,engine-cpu-int8,engine-cpu-int4 \
    --out benchmarks/results/dialogpt-medium-shape-cpu-int4
fi
