"""Class 3: resume trusts nothing in the work folder. A run is killed after its first layer; each case
then damages the work folder one way, and the rerun of the same command is refused with the path of
the damaged file (and the fix), changing nothing. The undamaged folder resumes to identical bytes
(tests/test_resume.py and test_faults.py)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import snapshot
from stop_at import stopping

WORK = "out.tlq-work"


def _command(ws: Path) -> list[str]:
    return ["quantize", str(ws / "model"), "--out", str(ws / "out"), "--calib", str(ws / "data" / "calib.json"),
            "--images", str(ws / "data"), "--method", "tlq", "--scheme", "W4A8", "--num-samples", "4", "--quiet"]


def stopped(proc: subprocess.Popen, timeout: float = 240) -> None:
    """Wait until `proc` has stopped itself at its stop point (tests/stop_at.py)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before reaching its stop point"
        if open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "T":
            return
        time.sleep(0.05)
    raise AssertionError("the run never reached its stop point")


@pytest.fixture(scope="module")
def killed_run(tiny_checkpoints, calib_split, tmp_path_factory):
    """(workspace, pristine copy of its work folder) after SIGKILL right after layer 0 was recorded."""
    ws = tmp_path_factory.mktemp("tamper") / "ws"
    shutil.copytree(tiny_checkpoints["qwen2_vl"], ws / "model")
    shutil.copytree(calib_split[1], ws / "data")
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(stopping("layer-0-saved", [sys.executable, "-m", "tlq", *_command(ws)]), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    stopped(proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    pristine = ws.parent / "pristine-work"
    shutil.copytree(ws / WORK, pristine)
    return ws, pristine


@pytest.fixture
def work(killed_run):
    ws, pristine = killed_run
    shutil.rmtree(ws / WORK, ignore_errors=True)
    shutil.copytree(pristine, ws / WORK)
    return ws / WORK


def _flip_bit(path: Path, offset_from_end: int = 100) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def _run_state(work: Path) -> dict:
    return json.loads((work / "run.json").read_text())


def _edit_state(work: Path, edit) -> None:
    state = _run_state(work)
    result = edit(state)
    (work / "run.json").write_text(json.dumps(state if result is None else result))


def _rerecord(work: Path, name: str) -> None:
    """What an attacker who also rewrites run.json would do: the digest matches the damaged file."""
    digest = hashlib.sha256((work / name).read_bytes()).hexdigest()
    _edit_state(work, lambda s: s["digests"].__setitem__(name, digest))


def _rewrite_tensors(work: Path, name: str, change, rerecord: bool) -> None:
    from safetensors import safe_open

    with safe_open(str(work / name), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(work / name))
    change(tensors)
    save_file(tensors, str(work / name), metadata=metadata)
    if rerecord:
        _rerecord(work, name)


def _nan_in(key_part: str):
    def change(tensors):
        key = next(k for k in tensors if key_part in k and tensors[k].is_floating_point())
        tensors[key].view(-1)[0] = math.nan
    return change


def _wrong_shape(tensors):
    key = next(k for k in tensors if k.startswith("state.") and k.endswith("q_proj.weight"))
    tensors[key] = torch.zeros(3, 3)


LAYER, INPUTS, IMPORTANCE = "layer_00000.safetensors", "inputs_00001.rank0.safetensors", "importance.safetensors"

# name -> (damage(work), the file the refusal must name, words)
CASES = {
    "NaN in the saved layer": (lambda w: _rewrite_tensors(w, LAYER, _nan_in("state."), False), LAYER, "sha256"),
    "NaN in the saved layer, digest rewritten": (lambda w: _rewrite_tensors(w, LAYER, _nan_in("state."), True), LAYER,
                                                 "NaN or inf"),
    "NaN in the saved inputs, digest rewritten": (lambda w: _rewrite_tensors(w, INPUTS, _nan_in("hidden."), True),
                                                  INPUTS, "NaN or inf"),
    "NaN in the importance, digest rewritten": (lambda w: _rewrite_tensors(w, IMPORTANCE, _nan_in("score."), True),
                                                IMPORTANCE, "NaN or inf"),
    "one flipped bit in the inputs": (lambda w: _flip_bit(w / INPUTS), INPUTS, "sha256"),
    "one flipped bit in the layer": (lambda w: _flip_bit(w / LAYER), LAYER, "sha256"),
    "one flipped bit in the importance": (lambda w: _flip_bit(w / IMPORTANCE), IMPORTANCE, "sha256"),
    "wrong-shaped layer tensor": (lambda w: _rewrite_tensors(w, LAYER, _wrong_shape, False), LAYER, "sha256"),
    "wrong-shaped layer tensor, digest rewritten": (lambda w: _rewrite_tensors(w, LAYER, _wrong_shape, True), LAYER,
                                                    "does not fit"),
    "truncated layer, digest rewritten": (lambda w: ((w / LAYER).write_bytes((w / LAYER).read_bytes()[:200]),
                                                     _rerecord(w, LAYER)), LAYER, "not a readable safetensors"),
    "saved inputs deleted": (lambda w: (w / INPUTS).unlink(), INPUTS, "is missing"),
    "finished_layers is 'two'": (lambda w: _edit_state(w, lambda s: s.__setitem__("finished_layers", "two")),
                                 "run.json", "finished_layers='two'"),
    "finished_layers is 99": (lambda w: _edit_state(w, lambda s: s.__setitem__("finished_layers", 99)), "run.json",
                              "finished_layers=99"),
    "finished_layers is -1": (lambda w: _edit_state(w, lambda s: s.__setitem__("finished_layers", -1)), "run.json",
                              "finished_layers=-1"),
    "finished_layers is true": (lambda w: _edit_state(w, lambda s: s.__setitem__("finished_layers", True)),
                                "run.json", "finished_layers=True"),
    "run.json is a list": (lambda w: _edit_state(w, lambda s: [s]), "run.json", "not a tlq run record"),
    "run.json is not JSON": (lambda w: (w / "run.json").write_text("{"), "run.json", "cannot be read"),
    "run.json nested too deeply": (lambda w: (w / "run.json").write_text("[" * 100000 + "]" * 100000), "run.json",
                                   "cannot be read"),
    "run.json lost its digests": (lambda w: _edit_state(w, lambda s: s.pop("digests") and None), LAYER,
                                  "not recorded"),
    "run.json digests are not strings": (lambda w: _edit_state(w, lambda s: s.__setitem__("digests", {"a": 1})),
                                         "run.json", "no valid digests"),
    "run.json fingerprint is a string": (lambda w: _edit_state(w, lambda s: s.__setitem__("fingerprint", "x")),
                                         "run.json", "not a tlq run record"),
    "run.json deleted, files kept": (lambda w: (w / "run.json").unlink(), WORK, "no run.json"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_damaged_work_folder_is_refused_with_its_path(case, work, run_cli):
    damage, culprit, words = CASES[case]
    damage(work)
    ws = work.parent
    before = snapshot(ws)
    before.pop(".out.tlq-lock", None)  # the killed run's lock file: the rerun takes it and removes it
    outcome = run_cli(_command(ws))
    assert outcome.code == 2, outcome.err[-5:]
    assert len(outcome.err) == 1 and outcome.err[0].startswith("tlq: error: "), outcome.err  # warnings filtered
    assert culprit in outcome.err[0] and words in outcome.err[0], outcome.err[0]
    assert "remove" in outcome.err[0]  # the fix
    after = snapshot(ws)
    after.pop(".out.tlq-lock", None)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}
