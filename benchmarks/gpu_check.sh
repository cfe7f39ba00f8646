#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py says what it runs), for a machine with a CUDA device that
# starts bare and reaches no registry; `--dry-run` runs the same steps on this CPU with a tiny shape.
#   benchmarks/gpu_check.sh [--dry-run] [--layers N] [--samples N]
# On the device machine: tlq runs from src/ with the image's python3 (torch, transformers there); what
# the image lacks (compressed-tensors and its needs) comes as wheels in .whl/, fetched here beforehand by
# benchmarks/gpu_wheels.sh and carried. Results: $OUT/gpu_check (the device tool) or runs/gpu_check.
# With the device tool: run `bash benchmarks/gpu_wheels.sh` here, then
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# and commit $OUT/gpu_check/{results.json,table.md} under benchmarks/results/gpu/.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--dry-run" ]; then
  PY=${PYTHON:-.venv/bin/python}
  exec "$PY" benchmarks/gpu_check.py "$@"
fi
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tlq-site .whl/*.whl
  export PYTHONPATH=/tmp/tlq-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py --out "${OUT:-runs}/gpu_check" "$@"
