"""Shared fixtures: tiny random checkpoints of each family and a small synthetic calibration split."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/stop_at.py, for the crash tests in every folder

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from tlq.reference.checkpoint import FAMILIES  # noqa: E402 - every family the builder knows


@pytest.fixture(scope="session")
def calib_split(tmp_path_factory):
    """(json path, image folder) of 6 synthetic records, 3 questions each, 64 px images."""
    from tlq.data.synthetic import SceneConfig, write_split

    folder = tmp_path_factory.mktemp("calib")
    path = write_split(folder, 6, seed=11, config=SceneConfig(grid=4, scene=3, questions_per_image=3), name="calib")
    return path, folder


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """family -> folder of a randomly initialised tiny checkpoint (hidden 64, 2 layers)."""
    from tlq.data.synthetic import vocabulary
    from tlq.reference.checkpoint import ModelSize, build_tiny_checkpoint

    root = tmp_path_factory.mktemp("models")
    return {family: build_tiny_checkpoint(family, root / family, words=vocabulary(), size=ModelSize(image_size=64),
                                          seed=3)
            for family in FAMILIES}
