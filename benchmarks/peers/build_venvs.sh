#!/usr/bin/env bash
# Builds the venvs the external peers run in: pinned, scripted, no hand edits, the CPU torch first.
#   benchmarks/peers/build_venvs.sh [llmc|autoround|all]      (.venv-llmc, .venv-autoround; ~1-2 minutes each)
#
# llm-compressor 0.14.0.1 pins transformers <= 5.17 and compressed-tensors 0.19.0; AutoRound 0.16.1 is
# newer than the auto-round llm-compressor accepts (<= 0.15.1), so each peer gets its own venv. tlq is
# never installed into them: the calibration samples travel as safetensors written by tlq
# (benchmarks/peers/samples.py), so every peer sees exactly the tokens and pixels tlq calibrates on.
set -euo pipefail
cd "$(dirname "$0")/../.."
WHICH=${1:-all}
PYTHON=${PYTHON:-python3}
TORCH=torch==2.13.0
LLMC=llmcompressor==0.14.0.1
AUTOROUND=auto-round==0.16.1
PILLOW=pillow==13.0.0  # the image processors need it; auto-round does not ask for it
CT=compressed-tensors==0.20.1  # for its llm-compressor export format (the format tlq and vLLM load)

build() {  # build VENV PACKAGES...
  local venv=$1; shift
  $PYTHON -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet "$TORCH"
  "$venv/bin/python" -m pip install --quiet "$@"
  # A resolver that swapped the CPU torch for another build would make every timing meaningless.
  "$venv/bin/python" -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if v.startswith('2.13.0') and not torch.version.cuda else 1)"
}

if [ "$WHICH" = llmc ] || [ "$WHICH" = all ]; then
  build .venv-llmc "$TORCH" "$LLMC"
  .venv-llmc/bin/python -c "import llmcompressor, transformers, compressed_tensors as ct; print('llmcompressor', llmcompressor.__version__, 'transformers', transformers.__version__, 'compressed-tensors', ct.__version__)"
fi
if [ "$WHICH" = autoround ] || [ "$WHICH" = all ]; then
  build .venv-autoround "$TORCH" "$AUTOROUND" "$PILLOW" "$CT"
  .venv-autoround/bin/python -c "import auto_round, transformers; print('auto-round', auto_round.__version__, 'transformers', transformers.__version__)"
fi
