#!/usr/bin/env bash
# The serving check, from nothing: builds the vLLM venv if missing, then quantizes every reference model
# at each scheme and compares greedy answers in vLLM (CPU) and plain transformers with the FP model's.
#   benchmarks/serve/serve_check.sh [--models qwen2_vl-small,...] [--num 200]
# Results: benchmarks/results/serve/{results.json,table.md}. About 40 minutes on 2 cores for all four models.
set -euo pipefail
cd "$(dirname "$0")/../.."
make venv >/dev/null
[ -x .venv-vllm/bin/python ] || bash benchmarks/serve/build_vllm_venv.sh .venv-vllm
exec .venv/bin/python benchmarks/serve/serve_check.py "$@"
