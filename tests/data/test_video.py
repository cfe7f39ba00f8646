"""Video calibration for the Qwen-VL families: records with frames, video tokens as a kind of their own, the
layer loop's replay and the gradient pass on video samples, and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tlq.api import check_videos_supported, prepare_samples
from tlq.data import load_records
from tlq.errors import TlqError
from tlq.importance import compute_importance
from tlq.models import ANSWER, VIDEO, adapter_for, load_model
from tlq.models.processing import load_processor
from tlq.models.video import FramesVideoProcessor
from tlq.recipe import Recipe
from tlq.weighting import modality_weights

from layer_inputs import own_layer_inputs

VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


def _samples(tiny_checkpoints, video_split, family):
    model, adapter = load_model(tiny_checkpoints[family])
    samples = prepare_samples(model, adapter, load_processor(tiny_checkpoints[family]), *video_split, Recipe())
    return model, adapter, samples


def test_records_read_every_video_form(video_split):
    records = load_records(*video_split)
    assert [len(r.videos) for r in records] == [1, 2, 1]
    assert [len(v) for v in records[1].videos] == [4, 3] and len(records[1].images) == 1
    assert [p.name for p in records[2].videos[0]] == [f"frame_{i:03d}.png" for i in range(4)]  # folder, in order
    assert [r.fps for r in records] == [2.0, 2.0, 4.0]
    assert [part["type"] for part in records[1].messages[0]["content"]][:3] == ["image", "video", "video"]


@pytest.mark.parametrize("change, message", [
    ({"video": "clip.mp4"}, "does not decode"),
    ({"video": ["a.png"]}, "at least 2 frames"),
    ({"video": ["missing_1.png", "missing_2.png"]}, "is missing"),
    ({"video": ["../outside_1.png", "../outside_2.png"]}, "outside the image folder"),
    ({"fps": 0}, "'fps' must be a positive number"),
    ({"video": 3}, "'video' must be a folder"),
    ({"conversations": [{"from": "human", "value": "no placeholder"}, {"from": "gpt", "value": "x"}]},
     "0 '<video>' placeholders for 1 videos"),
])
def test_bad_video_records_are_refused_in_one_line(video_split, tmp_path, change, message):
    path, folder = video_split
    row = {**json.loads(path.read_text())[0], **change}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([row]))
    with pytest.raises(TlqError, match=message) as caught:
        load_records(bad, folder)
    assert "\n" not in str(caught.value)


def test_image_only_families_refuse_video_records(video_split):
    records = load_records(*video_split)
    with pytest.raises(TlqError, match="calibrates llava_onevision on images only .*qwen2_vl"):
        check_videos_supported(adapter_for("llava_onevision"), records)
    check_videos_supported(adapter_for("qwen2_vl"), records)  # no error


def test_frames_are_cut_into_the_processors_patch_layout():
    """Each row of the patch tensor is one (temporal pair, merge window, patch) of the video, in the order
    temporal group -> 2x2 merge window (row major) -> patch inside the window, each patch's values ordered
    channel, time, y, x: the layout transformers' Qwen video processors produce."""
    t, p, m = 2, 2, 2
    processor = FramesVideoProcessor({"patch_size": p, "temporal_patch_size": t, "merge_size": m}, "qwen2")
    video = np.arange(4 * 3 * 8 * 12, dtype=np.float32).reshape(4, 3, 8, 12)  # T, C, H, W
    flat, grid = processor.patchify(video)
    assert grid == [2, 4, 6]
    row = 0
    for gt in range(2):
        for wy in range(4 // m):
            for wx in range(6 // m):
                for my in range(m):
                    for mx in range(m):
                        y, x = (wy * m + my) * p, (wx * m + mx) * p
                        expected = video[gt * t:(gt + 1) * t, :, y:y + p, x:x + p].transpose(1, 0, 2, 3)
                        assert torch.equal(flat[row], torch.from_numpy(expected.reshape(-1).copy())), row
                        row += 1
    # An odd frame count repeats the last frame, as the processor pads.
    flat3, grid3 = processor.patchify(video[:3])
    assert grid3 == [2, 4, 6] and torch.equal(flat3[24:], processor.patchify(video[[0, 1, 2, 2]])[0][24:])


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_tokens_are_a_kind_of_their_own(family, tiny_checkpoints, video_split):
    model, adapter, samples = _samples(tiny_checkpoints, video_split, family)
    video_id = adapter.video_token_id(model)
    for sample in samples:
        grids = sample.inputs["video_grid_thw"]
        assert int((sample.token_kinds == VIDEO).sum()) == int(grids.prod(-1).sum()) // 4  # 2x2 merge
        assert torch.equal(sample.token_kinds == VIDEO, sample.inputs["input_ids"][0] == video_id)
        assert torch.equal(sample.token_kinds == ANSWER, sample.labels[0] != -100)
        assert not (sample.labels[0][sample.token_kinds == VIDEO] != -100).any()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_layer_loop_replays_video_samples_as_the_model_runs_them(family, tiny_checkpoints, video_split):
    """Layer l's captured/replayed inputs equal what the model's own forward feeds layer l (M-RoPE over the
    video grid, Qwen3-VL's DeepStack features at the video positions)."""
    from tlq.activations import capture_layer_inputs, next_layer_inputs, run_layer

    model, adapter, samples = _samples(tiny_checkpoints, video_split, family)
    layers = adapter.layers(model)
    own = own_layer_inputs(model, layers, samples)
    inputs = capture_layer_inputs(model, adapter, samples, torch.device("cpu"))
    for index, layer in enumerate(layers):
        assert all(torch.equal(replayed, expected) for replayed, expected in zip(inputs.hidden, own[index])), index
        with torch.no_grad():
            outputs = [out for _, out in run_layer(layer, inputs, torch.device("cpu"))]
        inputs = next_layer_inputs(outputs, inputs, index)


def test_gradient_pass_scores_video_tokens_and_mbq_weighs_them_apart(tiny_checkpoints, video_split):
    model, adapter, samples = _samples(tiny_checkpoints, video_split, "qwen3_vl")
    full = compute_importance(model, adapter, samples, streamed=False)
    streamed = compute_importance(model, adapter, samples, streamed=True)
    for key, values in full.scores.items():  # the layer-by-layer pass replays the video samples exactly
        for a, b in zip(values, streamed.scores[key]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-10), key
    kinds = torch.cat(full.token_kinds)
    first = torch.cat(full.scores[f"0.{adapter.linear_names[0]}"])
    assert (first[kinds == VIDEO] > 0).any()
    assert full.kept_summary()["video"] == int((kinds == VIDEO).sum()) > 0
    weights = modality_weights(full, adapter)
    w = weights(0, adapter.linear_names[0], 0)
    video = samples[0].token_kinds == VIDEO
    assert torch.all(w[video] == w[video][0]) and w[video][0] > 0  # one ratio for the video kind


def test_tlq_quantizes_on_video_records_and_reports_their_tokens(tiny_checkpoints, video_split, tmp_path):
    from tlq.api import quantize
    from tlq.compat import load_quantized

    recipe = Recipe(method="tlq", scheme="W4A16-g32", token_budget=40)
    quantize(tiny_checkpoints["qwen2_5_vl"], tmp_path / "out", *video_split, recipe=recipe, progress=False)
    record = json.loads((tmp_path / "out" / "tlq_recipe.json").read_text())["token_weighting"]
    assert record["tokens_by_kind"]["video"] > 0
    assert all(kept["video"] > 0 for kept in record["kept_tokens_by_kind"].values())  # the set keeps a share
    model = load_quantized(tmp_path / "out")
    assert model.config.model_type == "qwen2_5_vl"
