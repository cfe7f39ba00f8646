"""What a model's own forward feeds each decoder layer: the reference the layer loop's replay is held to."""

from __future__ import annotations

import torch


def own_layer_inputs(model, layers, samples) -> dict[int, list[torch.Tensor]]:
    """Per decoder layer index, the hidden states each sample's forward passes into it."""
    seen: dict[int, list[torch.Tensor]] = {}
    handles = [layer.register_forward_pre_hook(
        lambda module, args, kwargs, i=i: seen.setdefault(i, []).append(args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad():
        for sample in samples:
            model(**sample.inputs, use_cache=False)
    for handle in handles:
        handle.remove()
    return seen
