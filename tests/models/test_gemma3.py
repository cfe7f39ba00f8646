"""Gemma 3's sliding-window and global layers are called with different masks and rotary embeddings; the
layer loop replays each layer with its own kind's arguments, so every layer sees what the model's own
forward gives it."""

from __future__ import annotations

import torch

from tlq.activations import capture_layer_inputs, layer_output, next_layer_inputs, run_layer
from tlq.api import prepare_samples
from tlq.models import load_model
from tlq.models.processing import load_processor
from tlq.recipe import Recipe


def _own_calls(model, layers, samples):
    """Per layer, the hidden states the model's own forward gives it, and the last layer's outputs."""
    seen: dict[int, list[torch.Tensor]] = {}
    last: list[torch.Tensor] = []
    handles = [layer.register_forward_pre_hook(
        lambda module, args, kwargs, i=i: seen.setdefault(i, []).append(args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(lambda module, args, output: last.append(layer_output(output))))
    with torch.no_grad():
        for sample in samples:
            model(**sample.inputs, use_cache=False)
    for handle in handles:
        handle.remove()
    return seen, last


def test_each_layer_kind_is_replayed_with_its_own_arguments(tiny_checkpoints, calib_split):
    model, adapter = load_model(tiny_checkpoints["gemma3"])
    samples = prepare_samples(model, adapter, load_processor(tiny_checkpoints["gemma3"]), *calib_split,
                              Recipe(num_samples=3))
    layers = adapter.layers(model)
    own, own_last = _own_calls(model, layers, samples)
    inputs = capture_layer_inputs(model, adapter, samples, torch.device("cpu"))
    assert inputs.layer_kinds == ("sliding_attention", "full_attention")
    assert max(s.inputs["input_ids"].shape[-1] for s in samples) > model.config.text_config.sliding_window
    for index, layer in enumerate(layers):
        assert all(torch.equal(replayed, expected) for replayed, expected in zip(inputs.hidden, own[index])), index
        with torch.no_grad():
            outputs = [out for _, out in run_layer(layer, inputs, torch.device("cpu"))]
        inputs = next_layer_inputs(outputs, inputs, index)
    assert all(torch.equal(a, b) for a, b in zip(outputs, own_last))
    # The kinds' arguments really differ: the global layer replayed with the sliding layer's mask is wrong.
    wrong = inputs.entering(own[1], 0)
    with torch.no_grad():
        mixed = [out for _, out in run_layer(layers[1], wrong, torch.device("cpu"))]
    assert not all(torch.equal(a, b) for a, b in zip(mixed, own_last))
