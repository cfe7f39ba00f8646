"""Integer fake-quantization primitives shared by every algorithm and by export.

Conventions follow compressed-tensors so that what tlq simulates is bit-for-bit what the exported
checkpoint computes after loading: signed integer codes q in [-2^(b-1), 2^(b-1)-1], dequantized as
(q - zero_point) * scale; symmetric scales are max|w| / ((qmax - qmin) / 2) with zero point 0;
asymmetric ranges always contain 0. Scales are rounded to the weight's dtype before they are used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tlq.recipe import Scheme


@dataclass
class QuantizedWeight:
    """A fake-quantized weight and the grid it lies on: scale/zero_point are [out, n_groups]."""

    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.weight, self.scale, self.zero_point]


GRIDS = ("minmax", "mse")
# The MSE search (llm-compressor's "mse" observer, GPTQ reference's optional search): shrink each
# group's range by p = 1.00, 0.99, ..., 0.80 and keep, per group, the p with the least sum |w - Q(w)|^2.4.
SHRINKS = tuple(1.0 - k / 100 for k in range(21))
MSE_NORM = 2.4


def _range_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
                out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if symmetric:
        scale = torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2)
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = scale.to(out_dtype)
    tiny = torch.finfo(out_dtype).eps
    scale = torch.where(scale == 0, torch.full_like(scale, tiny), scale)
    if symmetric:
        zero = torch.zeros_like(scale, dtype=torch.float32)
    else:
        zero = torch.clamp(torch.round(qmin - lo / scale.float()), qmin, qmax)
    return scale, zero


def grid_params(w: torch.Tensor, bits: int, symmetric: bool, out_dtype: torch.dtype,
                search: str = "minmax") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of `w` (one group of columns): both [rows, 1].

    minmax: the row's range (always containing 0); mse: that range shrunk by the factor in SHRINKS
    that minimises the row's quantization error.
    """
    w = w.float()
    lo = torch.clamp(w.amin(dim=1, keepdim=True), max=0.0)
    hi = torch.clamp(w.amax(dim=1, keepdim=True), min=0.0)
    if search == "minmax":
        return _range_grid(lo, hi, bits, symmetric, out_dtype)
    if search != "mse":
        raise ValueError(f"unknown grid search {search!r}: use one of {GRIDS}")
    best_scale, best_zero = _range_grid(lo, hi, bits, symmetric, out_dtype)
    best_error = (quant_dequant(w, best_scale, best_zero, bits) - w).abs().pow(MSE_NORM).sum(1, keepdim=True)
    for shrink in SHRINKS[1:]:
        scale, zero = _range_grid(lo * shrink, hi * shrink, bits, symmetric, out_dtype)
        error = (quant_dequant(w, scale, zero, bits) - w).abs().pow(MSE_NORM).sum(1, keepdim=True)
        better = error < best_error
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
        best_error = torch.where(better, error, best_error)
    return best_scale, best_zero


def quant_dequant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round `w` onto the grid (scale, zero) and map back to real values, in float32.

    One float32 copy of `w` is made and worked on in place: the scale search calls this for every target
    of every candidate, where each temporary would be a weight-sized allocation (same values as the
    out-of-place expression)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = scale.float()
    q = w.to(torch.float32, copy=True).div_(scale).add_(zero).round_().clamp_(qmin, qmax)
    return q.sub_(zero).mul_(scale)


def fake_quant_weight(weight: torch.Tensor, scheme: Scheme) -> QuantizedWeight:
    """Round-to-nearest quantization of a Linear weight [out, in] under `scheme` (its grid search)."""
    out_features, in_features = weight.shape
    group = scheme.group_for(in_features)
    if in_features % group:
        raise ValueError(f"in_features {in_features} is not a multiple of group size {group}")
    grouped = weight.reshape(out_features * (in_features // group), group)
    scale, zero = grid_params(grouped, scheme.weight_bits, scheme.symmetric, weight.dtype, scheme.grid)
    deq = quant_dequant(grouped, scale, zero, scheme.weight_bits).reshape(out_features, in_features)
    return QuantizedWeight(
        weight=deq.to(weight.dtype),
        scale=scale.reshape(out_features, -1),
        zero_point=zero.reshape(out_features, -1),
    )


def fake_quant_activation(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic per-token symmetric fake quantization (one scale per row of the last dimension)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = amax / ((qmax - qmin) / 2)
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(x.dtype).eps), scale)
    return torch.clamp(torch.round(x / scale), qmin, qmax) * scale
