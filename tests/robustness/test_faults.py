"""Class 6 and the crash promises: a run stopped by SIGKILL, SIGTERM or SIGINT at a named point (after
the importance pass, after a layer, with the output staged, just after the output appeared) leaves
either nothing or a resumable work folder, and the same command then writes exactly the bytes of an
uninterrupted run, leaving nothing else behind. Two runs on one output: the second is refused. A full
disk and a read-only target are one line each, with nothing left behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import assert_refused, snapshot
from test_resume_tamper import stopped
from stop_at import stopping

COMMAND = ["--method", "tlq", "--scheme", "W4A8", "--num-samples", "4", "--quiet"]


def _argv(ws: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "tlq", "quantize", str(ws / "model"), "--out", str(out), "--calib",
            str(ws / "data" / "calib.json"), "--images", str(ws / "data"), *COMMAND]


def _env(**extra) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def fault_ws(tiny_checkpoints, calib_split, tmp_path_factory):
    """A workspace and the output of one uninterrupted run (the bytes every resumed run must match)."""
    ws = tmp_path_factory.mktemp("faults") / "ws"
    shutil.copytree(tiny_checkpoints["qwen2_vl"], ws / "model")
    shutil.copytree(calib_split[1], ws / "data")
    straight = ws.parent / "straight"
    run = subprocess.run(_argv(ws, straight), env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return ws, snapshot(straight)


def _weights_and_layers(tree: dict[str, str]) -> dict[str, str]:
    # tlq_recipe.json differs in timings and in `resumed_layers`; everything else must be byte-identical.
    return {k: v for k, v in tree.items() if k != "tlq_recipe.json"}


# point -> (signal, expected exit status of the stopped run, whether the output exists afterwards)
STOPS = {
    "kill after the importance pass": ("importance-saved", signal.SIGKILL, -9, False),
    "kill after layer 0": ("layer-0-saved", signal.SIGKILL, -9, False),
    "kill after the last layer": ("layer-1-saved", signal.SIGKILL, -9, False),
    "kill with the output staged": ("export-staged", signal.SIGKILL, -9, False),
    "kill just after the output appeared": ("export-renamed", signal.SIGKILL, -9, True),
    "SIGTERM after layer 0": ("layer-0-saved", signal.SIGTERM, 143, False),
    "SIGTERM with the output staged": ("export-staged", signal.SIGTERM, 143, False),
    "SIGINT after layer 0": ("layer-0-saved", signal.SIGINT, 130, False),
}


@pytest.mark.parametrize("case", sorted(STOPS))
def test_a_stopped_run_resumes_to_identical_bytes(case, fault_ws, tmp_path):
    ws, expected = fault_ws
    point, sig, status, output_exists = STOPS[case]
    out = tmp_path / "out"
    proc = subprocess.Popen(stopping(point, _argv(ws, out)), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    stopped(proc)
    proc.send_signal(sig)
    if sig != signal.SIGKILL:
        proc.send_signal(signal.SIGCONT)  # a stopped process handles the signal once it runs again
    assert proc.wait(timeout=60) == status
    stderr = proc.stderr.read()
    assert "Traceback" not in stderr
    assert out.exists() == output_exists
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")] or sig == signal.SIGKILL
    if not output_exists:
        rerun = subprocess.run(_argv(ws, out), env=_env(), capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
    else:  # the output is complete; the rerun says so and sweeps what the kill left
        rerun = subprocess.run(_argv(ws, out), env=_env(), capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 2 and "already exists" in rerun.stderr
    assert _weights_and_layers(snapshot(out)) == _weights_and_layers(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "leftovers beside the output"


def test_a_second_run_on_the_same_output_is_refused(fault_ws, tmp_path):
    ws, _ = fault_ws
    out = tmp_path / "out"
    first = subprocess.Popen(stopping("layer-0-saved", _argv(ws, out)), env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        stopped(first)
        second = subprocess.run(_argv(ws, out), env=_env(), capture_output=True, text=True, timeout=300)
        lines = [line for line in second.stderr.strip().splitlines() if not line.startswith("tlq: warning:")]
        assert second.returncode == 2 and len(lines) == 1 and "another tlq run is writing" in lines[0], lines
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)


@pytest.fixture
def small_mount(tmp_path):
    """A 600 kB tmpfs (root only; skipped where mounting is not allowed)."""
    target = tmp_path / "small"
    target.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(target)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield target
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_disk_full_during_export_is_one_line_and_leaves_nothing(workspace, run_cli, small_mount):
    # The tiny model's output is ~0.3 MB: pad the filesystem so it fills while the output is written.
    (small_mount / "filler").write_bytes(b"\0" * 450_000)
    before = snapshot(small_mount)
    outcome = run_cli(workspace.quantize_argv(out=small_mount / "out"))
    assert_refused(outcome, "no space left")
    assert snapshot(small_mount) == before


def test_read_only_target_is_refused_before_any_work(workspace, refused_cleanly, small_mount):
    subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    refused_cleanly(workspace.quantize_argv(out=small_mount / "out"), "read-only")
    refused_cleanly(workspace.quantize_argv(out=small_mount / "deeper" / "out"), "read-only")
    refused_cleanly(["eval", workspace.model, "--data", workspace.calib, "--images", workspace.data, "--out",
                     small_mount / "r.json"], "read-only")
    refused_cleanly(["importance", workspace.model, "--calib", workspace.calib, "--images", workspace.data, "--out",
                     small_mount / "i.safetensors"], "read-only")


def test_a_refusal_removes_the_folders_it_made_for_the_output(workspace, refused_cleanly):
    """--out in folders that do not exist yet, and a refusal after the lock was taken: they are gone again."""
    import json

    config = json.loads((workspace.model / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 5  # disagrees with layer_types: found when the model loads
    (workspace.model / "config.json").write_text(json.dumps(config))
    refused_cleanly(workspace.quantize_argv(out=workspace.root / "new" / "deeper" / "out"), "layer_types")


def test_outputs_follow_the_umask(workspace, run_cli):
    """Served models are read by other users: the output gets the umask's modes, not mkdtemp's 0700."""
    old = os.umask(0o022)
    try:
        assert run_cli(workspace.quantize_argv()).code == 0
    finally:
        os.umask(old)
    out = workspace.root / "out"
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o644)}


def test_leftovers_of_a_killed_export_are_swept_by_the_next_run(workspace, run_cli):
    """A `.OUT.tmp-*` staging folder and a `.OUT.old-*` folder from a killed run disappear on success."""
    for name in (".out.tmp-abc123", ".out.old-def456"):
        (workspace.root / name).mkdir()
        (workspace.root / name / "model.safetensors").write_bytes(b"partial")
    assert run_cli(workspace.quantize_argv()).code == 0
    assert sorted(os.listdir(workspace.root)) == ["data", "model", "notes.txt", "out"]
