"""benchmarks/gpu_check.sh --dry-run: the GPU check's every step, on the CPU with a tiny shape, so the
script a lent GPU will run cannot rot between GPU sessions."""

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path),
                           "--samples", "8"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dry_run"] and not results["environment"]["missing"]
    assert results["cuda_tests"]["exit"] in (0, 5)  # skipped without CUDA (pytest exits 0 with all skipped)
    assert [m["method"] for m in results["methods"]] == ["gptq", "tlq"]
    assert all(m["exit"] == 0 and len(m["layer_seconds"]) == 2 for m in results["methods"])
    assert "peak" in results["plan"]["device_gib"]
    assert (tmp_path / "table.md").read_text().count("\n| ") == 3
