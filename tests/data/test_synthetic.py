import hashlib
import json

import pytest
import numpy as np

from tlq.data import build_samples, load_records
from tlq.data.synthetic import CELL, SceneConfig, make_example, vocabulary, write_split, write_splits
from tlq.models import IMAGE
from tlq.models.processing import load_processor


def _digests(folder, records):
    return {hashlib.sha256((folder / r["image"]).read_bytes()).hexdigest() for r in records}


def test_same_seed_same_data(tmp_path):
    a = write_split(tmp_path / "a", 5, seed=3)
    b = write_split(tmp_path / "b", 5, seed=3)
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra == rb
    assert _digests(tmp_path / "a", ra) == _digests(tmp_path / "b", rb)


def test_calibration_validation_and_test_splits_never_share_an_image(tmp_path):
    paths = write_splits(tmp_path, calib=40, test=40, val=40)
    splits = {name: json.loads(path.read_text()) for name, path in paths.items()}
    assert sorted(splits) == ["calib", "test", "val"]
    for a, b in (("calib", "test"), ("calib", "val"), ("val", "test")):
        assert not {r["image"] for r in splits[a]} & {r["image"] for r in splits[b]}
        assert not _digests(tmp_path, splits[a]) & _digests(tmp_path, splits[b])


def test_answers_depend_on_a_few_cells_and_most_of_the_image_is_background():
    rng = np.random.default_rng(0)
    config = SceneConfig()
    for _ in range(20):
        canvas, qas = make_example(rng, config)
        assert canvas.shape == (config.grid * CELL, config.grid * CELL, 3)
        cells = canvas.reshape(config.grid, CELL, config.grid, CELL, 3).astype(int)
        # A cell holds an object if some pixel is far from the background texture.
        spread = cells.max(axis=(1, 3)) - cells.min(axis=(1, 3))
        busy = (spread.max(axis=-1) > 80).sum()
        assert 1 <= busy <= config.scene * config.scene
        assert busy / config.grid ** 2 <= 0.25
        assert len(qas) == config.questions_per_image
        for qa in qas:
            assert set((qa["question"] + " " + qa["answer"]).split()) <= set(vocabulary())


def test_image_tokens_outnumber_text_tokens_four_to_one(tmp_path, tiny_checkpoints):
    from tlq.reference.checkpoint import ModelSize, build_tiny_checkpoint

    path = write_split(tmp_path, 8, seed=5)
    for family in ("qwen2_vl", "llava_onevision"):
        # The reference models' image geometry: 128 px, one token per 16 px cell.
        patch = 8 if family == "qwen2_vl" else 16
        checkpoint = build_tiny_checkpoint(family, tmp_path / family, words=vocabulary(),
                                           size=ModelSize(patch=patch, image_size=128))
        processor = load_processor(checkpoint)
        samples = build_samples(load_records(path, tmp_path), processor)
        image = sum(int((s.inputs["input_ids"] == processor.image_token_id).sum()) for s in samples)
        text = sum(s.num_tokens for s in samples) - image
        assert image >= 4 * text, (family, image, text)
    assert IMAGE == 1



@pytest.mark.parametrize("condition", ["background", "padded", "multi_image", "long_prompt", "video"])
def test_calibration_conditions_are_loadable_and_shaped_as_documented(tmp_path, condition):
    from PIL import Image

    from tlq.data import load_records
    from tlq.data.synthetic import CELL, CONDITIONS, write_splits

    paths = write_splits(tmp_path, calib=4, test=2, condition=condition)
    records = load_records(paths["calib"], tmp_path)
    standard = load_records(paths["test"], tmp_path)
    assert len(records) == 4 and condition in CONDITIONS
    assert all("condition" not in r.meta for r in standard)  # held-out splits stay standard
    for record in records:
        sizes = [Image.open(p).size for p in record.images]
        question = record.messages[0]["content"][-1]["text"]
        if condition in ("background", "padded"):
            assert sizes == [(16 * CELL, 16 * CELL)]
        if condition == "padded":
            pixels = np.asarray(Image.open(record.images[0]))
            assert not pixels[:4 * CELL].any() and not pixels[:, -4 * CELL:].any()  # the black border
        if condition == "multi_image":
            assert len(record.images) == 2 and len(set(record.images)) == 2
            assert sum(c["type"] == "image" for c in record.messages[0]["content"]) == 2
        if condition == "video":  # one clip of 4 frames, the same picture moved half a cell each frame
            frames = [np.asarray(Image.open(p)) for p in record.videos[0]]
            assert not record.images and len(record.videos) == 1 and len(frames) == 4 and record.fps == 2
            assert all(np.array_equal(np.roll(frames[0], k * CELL // 2, axis=1), f) for k, f in enumerate(frames))
            assert [c["type"] for c in record.messages[0]["content"]] == ["video", "text"]
        if condition == "long_prompt":
            assert question.count("?") == 6
        else:
            assert question.count("?") == 1
