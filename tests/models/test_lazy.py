"""Lazy decoder layers: the same checkpoint as calibrating the fully loaded model, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from tlq.api import quantize
from tlq.compat import load_quantized
from tlq.errors import TlqError
from tlq.models.lazy import CheckpointTensors, load_lazy
from tlq.recipe import Recipe


@pytest.mark.parametrize(("family", "method", "scheme", "data"), [("qwen2_vl", "gptq", "W4A16-g32", "images"),
                                                                  ("llava_onevision", "tlq", "W4A8", "images"),
                                                                  ("gemma3", "tlq", "W4A16-g32", "images"),
                                                                  # hub-stored experts
                                                                  ("qwen3_vl_moe", "tlq", "W4A16-g32", "images"),
                                                                  ("qwen3_vl", "tlq", "W4A16-g32", "videos")])
def test_lazy_output_equals_eager_output(family, method, scheme, data, tiny_checkpoints, calib_split, video_split,
                                         tmp_path):
    path, images = calib_split if data == "images" else video_split
    recipe = Recipe(method=method, scheme=scheme, num_samples=4 if data == "images" else 3)
    eager = quantize(tiny_checkpoints[family], tmp_path / "eager", path, images, recipe, progress=False).out_dir
    lazy = quantize(tiny_checkpoints[family], tmp_path / "lazy", path, images, recipe, progress=False, lazy=True).out_dir
    assert not (tmp_path / "lazy.tlq-work").exists()
    weight_map = json.loads((lazy / "model.safetensors.index.json").read_text())["weight_map"]
    prefix = CheckpointTensors(tiny_checkpoints[family]).layer_prefix()
    shards = {i: {f for k, f in weight_map.items() if k.startswith(f"{prefix}{i}.")} for i in range(2)}
    assert all(len(s) == 1 for s in shards.values()) and shards[0] != shards[1]  # one shard per decoder layer
    stored_eager, stored_lazy = CheckpointTensors(eager), CheckpointTensors(lazy)
    assert sorted(stored_eager.keys()) == sorted(stored_lazy.keys())  # the same names, the source's
    for key in stored_eager.keys():
        assert torch.equal(stored_eager.get(key), stored_lazy.get(key)), key
    a, b = load_quantized(eager).state_dict(), load_quantized(lazy).state_dict()
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_skeleton_holds_no_decoder_layer(tiny_checkpoints):
    model, adapter, layers = load_lazy(tiny_checkpoints["qwen2_vl"])
    assert len(layers) == 2 and not any(isinstance(m, torch.nn.Linear) for m in adapter.layers(model).modules())
    layer = layers.load(1, torch.device("cpu"))
    prefix = CheckpointTensors(tiny_checkpoints["qwen2_vl"]).layer_prefix()
    expected = CheckpointTensors(tiny_checkpoints["qwen2_vl"]).get(f"{prefix}1.mlp.down_proj.weight")
    assert torch.equal(layer.mlp.down_proj.weight, expected)
    layers.release(1)
    assert not list(adapter.layers(model)[1].parameters())


def test_lazy_needs_the_work_directory(tiny_checkpoints, calib_split, tmp_path):
    with pytest.raises(TlqError, match="drop --no-resume"):
        quantize(tiny_checkpoints["qwen2_vl"], tmp_path / "o", *calib_split, Recipe(num_samples=2), lazy=True,
                 resume=False)


def test_offloaded_activations_give_the_same_checkpoint(tiny_checkpoints, calib_split, tmp_path):
    """--offload-dir keeps activations in files; the result does not change, and the files go away."""
    path, images = calib_split
    recipe = Recipe(method="tlq", scheme="W4A16-g32", num_samples=3)
    memory = quantize(tiny_checkpoints["qwen2_vl"], tmp_path / "memory", path, images, recipe, progress=False)
    disk = quantize(tiny_checkpoints["qwen2_vl"], tmp_path / "disk", path, images, recipe, progress=False, lazy=True,
                    offload_dir=tmp_path / "spill")
    a, b = load_quantized(memory.out_dir).state_dict(), load_quantized(disk.out_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "spill").is_dir() and not list((tmp_path / "spill").iterdir())  # nothing left behind
