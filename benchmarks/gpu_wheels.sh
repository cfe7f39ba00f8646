#!/usr/bin/env bash
# Fetches, on a machine with a package registry, the wheels the GPU image lacks for tlq (its python3 is
# 3.12 with torch, transformers, safetensors, pillow, psutil already there), into .whl/ for the device
# tool's `carry`. Pinned; pure-Python except pydantic-core.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for spec in compressed-tensors==0.20.1 pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 \
            typing-inspection==0.4.2 loguru==0.7.3; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec"
done
ls -la .whl
