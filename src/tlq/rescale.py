"""The rescaling step of a layer (AWQ, MBQ, TLQ's scale backend, SmoothQuant), before its Linears are solved.

For each scaling group that applies (norm -> Linears, and Linear -> Linear where the shapes match), the
targets' shared input is captured from the layer on the quantized-path inputs (only the tokens the
token weights keep, subsampled to a cap), the scales are searched or computed, then folded in. All
groups are captured before any is rescaled; the folding keeps the FP function, so no capture goes stale.
"""

from __future__ import annotations

import torch
from torch import nn

from tlq.activations import LayerInputs, capture_linear_inputs
from tlq.distributed import SINGLE, Ranks
from tlq.models import ModelAdapter
from tlq.quant.scaling import apply_scales, group_applies, search_scales, smoothquant_scales
from tlq.recipe import Recipe


def _group_weights(token_weights, index: int, targets: tuple[str, ...], sample: int) -> torch.Tensor | None:
    if token_weights is None:
        return None
    values = [token_weights(index, name, sample) for name in targets]
    if any(v is None for v in values):
        return None
    return torch.stack(values).mean(0)


@torch.no_grad()
def rescale_layer(layer: nn.Module, index: int, inputs: LayerInputs, adapter: ModelAdapter, recipe: Recipe,
                  device: torch.device, token_weights=None, fp_inputs: LayerInputs | None = None,
                  ranks: Ranks = SINGLE) -> list[dict]:
    """Search (or compute) and fold the scales of every applicable group; returns one record per group."""
    plan = recipe.plan()
    scheme = recipe.resolved_scheme()
    groups = []
    for group in adapter.scaling_groups:
        source = layer.get_submodule(group.source)
        targets = [layer.get_submodule(t) for t in group.targets]
        if not group_applies(source, targets):
            continue
        if plan.transform == "smoothquant" and isinstance(source, nn.Linear):
            continue  # SmoothQuant migrates into the norms only
        groups.append((group, source, targets))
    if not groups:
        return []
    first = {group.targets[0]: group for group, _, _ in groups}

    def rows(sample: int, name: str) -> torch.Tensor | None:
        w = _group_weights(token_weights, index, first[name].targets, sample)
        return None if w is None else (w > 0).nonzero().squeeze(1)

    captured = capture_linear_inputs(layer, list(first), inputs, device, rows)
    fp_captured = None
    if recipe.target == "asymmetric" and fp_inputs is not None and fp_inputs is not inputs:
        fp_captured = capture_linear_inputs(layer, list(first), fp_inputs, device, rows)
    records = []
    generator = torch.Generator().manual_seed(recipe.seed * 100_003 + index)
    for group, source, targets in groups:
        name = group.targets[0]
        x = torch.cat(captured[name]).to(device)
        target_x = torch.cat(fp_captured[name]).to(device) if fp_captured is not None else None
        weights = None
        if token_weights is not None:
            per_sample = [_group_weights(token_weights, index, group.targets, i) for i in range(len(inputs.hidden))]
            weights = torch.cat([w[w > 0] for w in per_sample]).to(device) if per_sample[0] is not None else None
        # The subsample is drawn over all ranks' tokens (rank order = sample order), so it is the same
        # token set whatever the number of ranks.
        counts = ranks.gather_objects(len(x))
        offset, total = sum(counts[:ranks.rank]), sum(counts)
        if total > recipe.scale_max_tokens:
            pick = torch.randperm(total, generator=generator)[:recipe.scale_max_tokens]
            pick = (pick[(pick >= offset) & (pick < offset + len(x))] - offset).to(device)
            x = x[pick]
            target_x = target_x[pick] if target_x is not None else None
            weights = weights[pick] if weights is not None else None
        if plan.transform == "smoothquant":
            scales = smoothquant_scales(x, targets, recipe.smooth_alpha, ranks)
            alpha, ratio = recipe.smooth_alpha, None
        else:
            scales, alpha, ratio = search_scales(x, targets, scheme, weights, recipe.scale_loss_resolved,
                                                 recipe.scale_grid, target_x, ranks=ranks)
        apply_scales(source, targets, scales)
        records.append({"source": group.source, "alpha": alpha, "loss_ratio": ratio,
                        "tokens": min(total, recipe.scale_max_tokens)})
    return records
