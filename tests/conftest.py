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


@pytest.fixture(scope="session")
def video_split(calib_split):
    """(json path, image folder) of 3 records with videos made of the calibration images (64 px frames): a
    video alone, an image with two videos (4 and 3 frames: an odd count is padded), and a folder of frames."""
    import json
    import shutil

    path, folder = calib_split
    rows = json.loads(Path(path).read_text())
    names = [row["image"] for row in rows]
    clip = folder / "clip"
    clip.mkdir(exist_ok=True)
    for i, name in enumerate(names[:4]):
        shutil.copy(folder / name, clip / f"frame_{i:03d}.png")
    answer = rows[0]["conversations"][1]["value"]
    records = [
        {"video": names[:4], "fps": 2, "conversations": [{"from": "human", "value": "<video>\nwhat is shown ?"},
                                                        {"from": "gpt", "value": answer}]},
        {"image": names[0], "video": [names[1:5], names[2:5]],
         "conversations": [{"from": "human", "value": "<image> <video> <video>\nwhat is shown ?"},
                           {"from": "gpt", "value": answer}]},
        {"video": "clip", "fps": 4, "conversations": [{"from": "human", "value": "<video> what is shown ?"},
                                                     {"from": "gpt", "value": answer}]},
    ]
    video_path = folder / "video.json"
    video_path.write_text(json.dumps(records))
    return video_path, folder
