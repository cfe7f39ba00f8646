#!/usr/bin/env bash
# Fetches, on a machine with a package registry, the wheels the GPU image lacks for tlq (its python3 is
# 3.12 with torch, transformers, safetensors, pillow, psutil already there), into .whl/ for the device
# tool's `carry`. The pins are benchmarks/gpu_wheels.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -v '^#' benchmarks/gpu_wheels.txt | while read -r spec; do
  [ -n "$spec" ] || continue
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec"
done
ls -la .whl
