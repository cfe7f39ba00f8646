"""Per-channel rescaling of a scaling group before its Linears are quantized (AWQ, MBQ, TLQ, SmoothQuant).

A scaling group is a source (a norm, or a Linear whose output rows feed the targets) and the Linears it
feeds. Scaling input channel c of the targets by s_c and the source's output channel c by 1/s_c keeps
the FP function; it moves quantization difficulty between weights and activations.

- `search_scales` (AWQ-style): s = mean|x|^alpha over a grid of alpha, each scored by the token-weighted
  error of the targets' outputs, with the weight (and, for W*A8, the per-token activation)
  fake-quantization the deployed model applies. Uniform weights give AWQ; modality weights MBQ;
  gradient importance TLQ.
- `smoothquant_scales`: s = max|x|^a / max|W|^(1-a) (Xiao et al., 2023), no search.
"""

from __future__ import annotations

import torch
from torch import nn

from tlq.distributed import SINGLE, Ranks
from tlq.quant.primitives import fake_quant_activation, fake_quant_weight
from tlq.recipe import Scheme


def concat_targets(targets: list[nn.Linear]) -> torch.Tensor:
    return torch.cat([t.weight.detach().float() for t in targets], dim=0)


def _weighted_error(diff: torch.Tensor, weights: torch.Tensor | None, loss: str) -> torch.Tensor:
    per_token = diff.abs().mean(-1) if loss == "mae" else diff.pow(2).mean(-1)
    if weights is None:
        return per_token.sum()
    return (per_token * weights).sum()


@torch.no_grad()
def search_scales(x: torch.Tensor, targets: list[nn.Linear], scheme: Scheme, weights: torch.Tensor | None = None,
                  loss: str = "mse", grid: int = 20, target_x: torch.Tensor | None = None,
                  chunk: int = 4096, ranks: Ranks = SINGLE) -> tuple[torch.Tensor, float, float]:
    """Best per-channel scales for the targets' shared input.

    x: [tokens, in] quantized-path inputs; weights: [tokens] or None; target_x: FP-path inputs (the
    asymmetric target), else the FP targets applied to x. Returns (scales, best alpha, best / unscaled loss).
    Under data-parallel calibration x holds this rank's tokens; magnitudes and losses are summed over ranks.
    """
    weight = concat_targets(targets)
    x = x.float()
    target_x = x if target_x is None else target_x.float()
    # Summed in float64 so that the magnitudes, hence the scales, do not depend on how tokens are split
    # over ranks (with W*A8 a last-bit change in a scale can flip an activation rounding).
    absolute = x.abs().double()
    if weights is None:
        totals = ranks.sum(torch.cat([absolute.sum(0), absolute.new_tensor([len(x)])]))
    else:
        w = weights.double()
        totals = ranks.sum(torch.cat([(absolute * w[:, None]).sum(0), w.sum()[None]]))
    magnitude = (totals[:-1] / totals[-1].clamp_min(1e-30)).float().clamp_min(1e-8)

    def error(scales: torch.Tensor) -> float:
        q = fake_quant_weight((weight * scales).to(targets[0].weight.dtype), scheme).weight.float()
        total = 0.0
        for a in range(0, len(x), chunk):
            xs = x[a:a + chunk] / scales
            if scheme.quantizes_activations:
                xs = fake_quant_activation(xs, scheme.act_bits)
            diff = xs @ q.T - target_x[a:a + chunk] @ weight.T
            total += float(_weighted_error(diff, None if weights is None else weights[a:a + chunk], loss))
        return float(ranks.sum(torch.tensor(total, dtype=torch.float64)))

    best_scales = torch.ones_like(magnitude)
    baseline = best = error(best_scales)
    best_alpha = 0.0
    for step in range(1, grid):
        alpha = step / grid
        scales = magnitude.pow(alpha)
        scales = scales / (scales.max() * scales.min()).sqrt()
        value = error(scales)
        if value < best:
            best, best_alpha, best_scales = value, alpha, scales
    return best_scales, best_alpha, best / max(baseline, 1e-30)


@torch.no_grad()
def smoothquant_scales(x: torch.Tensor, targets: list[nn.Linear], alpha: float = 0.5,
                       ranks: Ranks = SINGLE) -> torch.Tensor:
    local_max = x.float().abs().amax(0) if len(x) else x.new_zeros(x.shape[-1], dtype=torch.float32)
    act_max = ranks.max(local_max).clamp_min(1e-5)
    weight_max = concat_targets(targets).abs().amax(0).clamp_min(1e-5)
    return (act_max.pow(alpha) / weight_max.pow(1 - alpha)).clamp_min(1e-5)


@torch.no_grad()
def apply_scales(source: nn.Module, targets: list[nn.Linear], scales: torch.Tensor) -> None:
    """Fold 1/s into the source's output channels and s into the targets' input columns.

    New tensors are bound (never written in place), so a storage-sharing FP view of the layer
    (tlq.engine.fp_view) keeps the original values.
    """
    if isinstance(source, nn.Linear):
        source.weight.data = source.weight / scales.to(source.weight)[:, None]
        if source.bias is not None:
            source.bias.data = source.bias / scales.to(source.bias)
    else:  # RMSNorm / LayerNorm: y = weight * normalised(x) (+ bias)
        source.weight.data = source.weight / scales.to(source.weight)
        if getattr(source, "bias", None) is not None:
            source.bias.data = source.bias / scales.to(source.bias)
    for target in targets:
        target.weight.data = target.weight * scales.to(target.weight)[None, :]


def group_applies(source: nn.Module, targets: list[nn.Linear]) -> bool:
    """A Linear source feeds the targets channel for channel only when the shapes match (not under GQA)."""
    width = targets[0].in_features
    if isinstance(source, nn.Linear):
        return source.out_features == width
    return getattr(source, "weight", None) is not None and source.weight.numel() == width
