import json

import pytest

import tlq.bench as bench
from tlq.bench import BenchConfig, run_bench


def test_bench_runs_cells_and_skips_finished_ones(tiny_checkpoints, calib_split, tmp_path, monkeypatch):
    path, folder = calib_split
    cfg = BenchConfig(model_dir=str(tiny_checkpoints["qwen2_vl"]), calib=str(path), eval_data=str(path),
                      calib_images=str(folder), eval_images=str(folder), out_dir=str(tmp_path / "b"),
                      methods=["rtn"], schemes=["W4A16-g32"], seeds=[0, 1], num_samples=2, device="cpu")
    results = run_bench(cfg, progress=False)
    cells = results["cells"]
    assert set(cells) == {"rtn|W4A16-g32|0", "rtn|W4A16-g32|1"}
    for cell in cells.values():
        assert cell["status"] == "done" and cell["peak_rss_mib"] > 50 and 0 <= cell["accuracy"] <= 1
        assert cell["calibration_seconds"] > 0
    table = (tmp_path / "b" / "table.md").read_text()
    assert "| W4A16-g32 | rtn | 2 |" in table
    assert (tmp_path / "b" / "chart.png").stat().st_size > 1000
    assert not (tmp_path / "b" / "checkpoints").exists()  # no cell's checkpoint, and no empty folder either

    def fail(*args, **kwargs):
        raise AssertionError("finished cells must not be recomputed")

    monkeypatch.setattr(bench, "_run_quantize_measured", fail)
    again = run_bench(cfg, progress=False)
    assert again["cells"] == json.loads((tmp_path / "b" / "results.json").read_text())["cells"]


def test_method_specs():
    from tlq.bench import parse_method_spec
    from tlq.errors import TlqError

    assert parse_method_spec("tlq") == ("tlq", [])
    assert parse_method_spec("tlq+keep-ratio=0.25+no-exposure") == ("tlq", ["--keep-ratio", "0.25", "--no-exposure"])
    with pytest.raises(TlqError, match="unknown method"):
        parse_method_spec("magic+x=1")


def test_measured_peak_rss_is_the_childs_own(tmp_path):
    """The caller holds ~600 MiB; the child allocates ~100 MiB: the report must be about the child."""
    import sys

    from tlq.bench import run_measured

    ballast = bytearray(600 * 2**20)  # noqa: F841  (resident in this process while the child runs)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    child = [sys.executable, "-c", "b = bytearray(100 * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1"]
    measured = run_measured(child, "allocate")
    assert 100 <= measured["peak_rss_mib"] < 400
