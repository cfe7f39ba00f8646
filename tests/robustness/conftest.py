"""The fault and bad-input corpus: what every case checks.

Each case builds a workspace (a tiny checkpoint, a calibration file with its images, an unrelated
file), breaks one thing, runs a `tlq` command, and asserts the promise of its class:
- refused: exit status 2 and exactly one stderr line, `tlq: error: ...`, naming the problem (the
  case's expected words), no traceback;
- nothing lost and nothing left: every file and folder of the workspace has the same bytes after the
  command as before it (so no input changed or vanished, and no output, work folder, lock, staging or
  temporary file was left behind);
- or the documented success, where a case's input is odd but valid.
See docs/robustness.md for the classes and the promise each checks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tlq.cli import main


@dataclass
class Workspace:
    root: Path
    model: Path
    data: Path  # folder: calib.json + images/
    calib: Path
    unrelated: Path

    @property
    def images(self) -> Path:
        return self.data

    def quantize_argv(self, *extra: str, out: str | Path | None = None, model: str | Path | None = None,
                      calib: str | Path | None = None, images: str | Path | None = None) -> list[str]:
        return ["quantize", str(model or self.model), "--out", str(out or self.root / "out"), "--calib",
                str(calib or self.calib), "--images", str(images or self.images), "--scheme", "W4A16-g32",
                "--num-samples", "2", "--quiet", *extra]


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> what is there (a digest, 'dir', or a link target), for everything under root."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture
def workspace(tiny_checkpoints, calib_split, tmp_path) -> Workspace:
    root = tmp_path / "ws"
    model = root / "model"
    shutil.copytree(tiny_checkpoints["qwen2_vl"], model)
    path, folder = calib_split
    data = root / "data"
    shutil.copytree(folder, data)
    unrelated = root / "notes.txt"
    unrelated.write_text("an unrelated file of the user's\n")
    return Workspace(root=root, model=model, data=data, calib=data / path.name, unrelated=unrelated)


@dataclass
class Outcome:
    code: int
    err: list[str]
    out: str


@pytest.fixture
def run_cli(capsys):
    def run(argv: list[str]) -> Outcome:
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        # `tlq: warning:` lines (where a scheme cannot run, said before calibrating) are not errors.
        lines = [line for line in captured.err.splitlines() if line.strip() and not line.startswith("tlq: warning:")]
        return Outcome(code, lines, captured.out)

    return run


def assert_refused(outcome: Outcome, words: str) -> None:
    assert outcome.code == 2, (outcome.code, outcome.err[-5:])
    assert len(outcome.err) == 1, outcome.err[-10:]
    line = outcome.err[0]
    assert line.startswith("tlq: error: ") and "Traceback" not in line, line
    assert words.lower() in line.lower(), (words, line)


@pytest.fixture
def refused_cleanly(workspace, run_cli):
    """run(argv, words, root=workspace.root): the command is refused and the tree under root is unchanged."""

    def check(argv: list[str], words: str, root: Path | None = None) -> Outcome:
        root = root or workspace.root
        before = snapshot(root)
        outcome = run_cli(argv)
        assert_refused(outcome, words)
        assert snapshot(root) == before, "the command changed, removed or left files"
        return outcome

    return check
