#!/usr/bin/env bash
# Rehearses the GPU check on this CPU with the GPU machine's own package versions, so that a lent device's
# 15 minutes are not lost to an incompatibility found there. The device image (the device tool's KINDS.md,
# as sessions read it in 2026-11) has python 3.12, torch 2.11.0, transformers 5.17.0, safetensors 0.8.0,
# tokenizers 0.23.2, pytest, pillow, psutil, and no compressed-tensors and no num2words; tlq's own venv has
# torch 2.13.0 and transformers 5.24. This builds a venv of those versions (torch 2.11.0 is PyPI's CUDA
# build, which does not import without its CUDA libraries, so they come too: ~4 GB; compressed-tensors and
# its needs at the pins benchmarks/gpu_wheels.txt gives the device, built for this python) and runs
# `benchmarks/gpu_check.sh --dry-run` with it, the suite's CUDA-marked tests collected as they would be.
#   benchmarks/gpu_image_rehearsal.sh [VENV]     (default .venv-gpu-image, ~4 GB; 1.7 minutes here with pip's cache warm)
# Not rehearsed: python 3.12 (this machine has 3.11), CUDA itself.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-gpu-image}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  $PYTHON -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet torch==2.11.0
  "$VENV/bin/python" -m pip install --quiet transformers==5.17.0 safetensors==0.8.0 tokenizers==0.23.2 \
    pytest pillow psutil
  grep -v '^#' benchmarks/gpu_wheels.txt | xargs "$VENV/bin/python" -m pip install --quiet --no-deps
fi
"$VENV/bin/python" -c "import torch, transformers, safetensors, compressed_tensors; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'safetensors', safetensors.__version__, 'compressed-tensors', \
compressed_tensors.__version__)"
if "$VENV/bin/python" -c "import num2words" 2>/dev/null; then
  echo "error: $VENV has num2words, which the device image lacks: the rehearsal would not show its absence" >&2
  exit 1
fi
# Twice: without torchvision (transformers 5.17 then has no AutoImageProcessor at all: what a user without
# torchvision meets) and with the image's torchvision 0.26.0 beside it (what the device runs).
TORCHVISION=$VENV-torchvision
if [ ! -d "$TORCHVISION/torchvision" ]; then
  "$VENV/bin/python" -m pip install --quiet --no-deps --target "$TORCHVISION" torchvision==0.26.0
fi
for pass in without-torchvision with-torchvision; do
  OUT_DIR=runs/gpu_image_rehearsal/$pass
  rm -rf "$OUT_DIR"
  EXTRA=$([ $pass = with-torchvision ] && echo "$PWD/$TORCHVISION:" || true)
  echo "== $pass: $(PYTHONPATH=$EXTRA "$VENV/bin/python" -c 'import importlib.util as u; print("torchvision", "present" if u.find_spec("torchvision") else "absent")')"
  PYTHONPATH=$EXTRA$PWD/src PYTHON="$VENV/bin/python" bash benchmarks/gpu_check.sh --dry-run --out "$OUT_DIR"
  # collected as the device would (skipped here: no CUDA)
  PYTHONPATH=$EXTRA$PWD/src "$VENV/bin/python" -m pytest -q -p no:cacheprovider -m cuda --collect-only tests/test_cuda.py | tail -1
done
