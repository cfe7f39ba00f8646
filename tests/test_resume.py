"""A run killed (SIGKILL) after a finished layer continues from there and gives the same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file
from stop_at import stopping


def _command(model, calib_split, out, *extra):
    path, images = calib_split
    return [sys.executable, "-m", "tlq", "-v", "quantize", str(model), "--out", str(out), "--calib", str(path),
            "--images", str(images), "--method", "tlq", "--scheme", "W4A8", "--num-samples", "4", "--quiet", *extra]


def _state(pid: int) -> str:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def test_killed_run_resumes_bit_identical(tiny_checkpoints, calib_split, tmp_path):
    model = tiny_checkpoints["qwen2_vl"]
    straight = subprocess.run(_command(model, calib_split, tmp_path / "straight"), env=_env(), capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]

    out = tmp_path / "resumed"
    work = tmp_path / "resumed.tlq-work"
    proc = subprocess.Popen(stopping("layer-0-saved", _command(model, calib_split, out)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and _state(proc.pid) != "T":  # stopped itself at the named point
        assert proc.poll() is None
        time.sleep(0.1)
    assert json.loads((work / "run.json").read_text())["finished_layers"] == 1
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists() and (work / "layer_00000.safetensors").exists()

    # A different command must not pick up this run's layers.
    other = subprocess.run(_command(model, calib_split, out, "--seed", "5"), env=_env(), capture_output=True,
                           text=True, timeout=300)
    lines = other.stderr.strip().splitlines()
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "belongs to a different run (differs in data_sha256, recipe)" in lines[-1]

    resumed = subprocess.run(_command(model, calib_split, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    assert "layer 0: relative output error" not in resumed.stderr  # layer 0 was not recomputed
    assert "layer 1: relative output error" in resumed.stderr
    assert json.loads((out / "tlq_recipe.json").read_text())["resumed_layers"] == 1
    assert not work.exists()

    expected, actual = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(expected) == sorted(actual)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    straight_record = json.loads((tmp_path / "straight" / "tlq_recipe.json").read_text())
    resumed_record = json.loads((out / "tlq_recipe.json").read_text())
    assert straight_record["layer_relative_error"] == resumed_record["layer_relative_error"]
