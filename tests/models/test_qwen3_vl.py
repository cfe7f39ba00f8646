"""Qwen3-VL's DeepStack: the visual features the model adds after its first decoder layers are replayed
by the layer loop exactly as the model's own forward adds them."""

from __future__ import annotations

import torch

from tlq.activations import capture_layer_inputs, next_layer_inputs, run_layer
from tlq.api import prepare_samples
from tlq.models import load_model
from tlq.models.processing import load_processor
from tlq.recipe import Recipe

from layer_inputs import own_layer_inputs


def test_deepstack_replay_gives_the_models_own_layer_inputs(tiny_checkpoints, calib_split):
    model, adapter = load_model(tiny_checkpoints["qwen3_vl"])
    samples = prepare_samples(model, adapter, load_processor(tiny_checkpoints["qwen3_vl"]), *calib_split,
                              Recipe(num_samples=3))
    layers = adapter.layers(model)
    own = own_layer_inputs(model, layers, samples)
    inputs = capture_layer_inputs(model, adapter, samples, torch.device("cpu"))
    assert all(sorted(per_sample) == list(range(len(layers))) for per_sample in inputs.injections)
    for index, layer in enumerate(layers):
        assert all(torch.equal(replayed, expected) for replayed, expected in zip(inputs.hidden, own[index])), index
        with torch.no_grad():
            outputs = [out for _, out in run_layer(layer, inputs, torch.device("cpu"))]
        if index + 1 < len(layers):  # the injection is what makes the next inputs right, not a no-op
            assert not torch.equal(outputs[0], own[index + 1][0])
        inputs = next_layer_inputs(outputs, inputs, index)
