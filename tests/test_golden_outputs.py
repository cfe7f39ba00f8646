"""Refactoring guard: every method writes byte-identical weights before and after a change that should
not change results.

The digests in tests/fixtures/golden_outputs.json are recorded per environment (torch version, CPU
architecture and instruction set, thread count), because float results legitimately differ between
them; in an environment without a record the test skips and says how to record one. A change that is
meant to change results (a new default, a fixed algorithm) re-records them in the same commit:

    TLQ_RECORD_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden_outputs.py
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import pytest
import torch

from tlq.api import quantize
from tlq.recipe import Recipe

GOLDEN = Path(__file__).parent / "fixtures" / "golden_outputs.json"
CASES = {  # method -> (family, scheme): every method once, both decoder families, both scheme kinds
    "rtn": ("qwen2_vl", "W4A16-g32"), "gptq": ("qwen2_vl", "W3A16-g32"), "awq": ("qwen2_vl", "W3A16-g32"),
    "smoothquant": ("qwen2_vl", "W8A8"), "mbq": ("llava_onevision", "W4A8"), "tlq": ("qwen2_vl", "W3A16-g32"),
    "awq_gptq": ("llava_onevision", "W4A16-g32"), "smoothquant_gptq": ("qwen2_vl", "W4A8"),
}


def _environment() -> str:
    flags = ""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        flags = ",".join(f for f in ("avx512f", "avx512_bf16", "amx_tile", "avx2") if f" {f}" in cpuinfo)
    except OSError:
        pass
    return f"torch {torch.__version__} | {platform.machine()} | {flags} | threads {torch.get_num_threads()}"


def _digest(folder: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        sha.update(path.read_bytes())
    return sha.hexdigest()


def test_every_method_writes_the_recorded_weights(tiny_checkpoints, calib_split, tmp_path):
    recording = os.environ.get("TLQ_RECORD_GOLDEN") == "1"
    records = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    environment = _environment()
    if environment not in records and not recording:
        pytest.skip(f"no golden digests for {environment}: record them with TLQ_RECORD_GOLDEN=1")
    digests = {}
    for method, (family, scheme) in CASES.items():
        out = tmp_path / method
        quantize(tiny_checkpoints[family], out, *calib_split, Recipe(method=method, scheme=scheme, num_samples=4),
                 progress=False, resume=False)
        digests[method] = _digest(out)
    if recording:
        records[environment] = digests
        GOLDEN.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
        return
    changed = sorted(m for m in CASES if digests[m] != records[environment].get(m))
    assert not changed, f"outputs changed for {changed}: a refactor must not change them (re-record if intended)"
