"""GPTQ (Frantar et al., 2022) with per-token weights.

The layer objective is sum_t w_t ||W x_t - Q x_t||^2, so the Hessian is H = 2 sum_t w_t x_t x_t^T / N:
feeding sqrt(w_t) x_t to the usual accumulation gives it. Each sample's product is computed in float32
and added into a float64 sum, so the Hessian does not depend on how samples are split over ranks (the
float32 solve then sees the same matrix for 1, 2 or 3 ranks). Uniform weights are plain GPTQ; a zero weight
removes a token. The solve is the reference column-by-column OBS update with lazy block updates,
damping as a fraction of the mean Hessian diagonal, group-wise grids, and act-order with static groups
(the grids are fixed up front in the original column order, so the exported layout needs no g_idx).
"""

from __future__ import annotations

import torch

from tlq.errors import TlqError
from tlq.quant.base import LinearSolver, register
from tlq.quant.primitives import QuantizedWeight, grid_params, quant_dequant
from tlq.recipe import Recipe, Scheme


@register("gptq")
class GPTQ(LinearSolver):
    def __init__(self, weight: torch.Tensor, scheme: Scheme, recipe: Recipe) -> None:
        super().__init__(weight, scheme, recipe)
        columns = weight.shape[1]
        self.hessian_sum = torch.zeros(columns, columns, dtype=torch.float64, device=weight.device)
        self.cross_sum: torch.Tensor | None = None  # sum_t w_t x_fp,t x~_t^T (asymmetric target)
        self.num_tokens = torch.zeros((), dtype=torch.float64, device=weight.device)

    def observe(self, inputs: torch.Tensor, token_weights: torch.Tensor | None = None,
                target_inputs: torch.Tensor | None = None) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).float()
        root = None
        if token_weights is not None:
            w = token_weights.reshape(-1).to(x)
            if w.shape[0] != x.shape[0]:
                raise ValueError(f"{w.shape[0]} token weights for {x.shape[0]} tokens")
            root = w.clamp_min(0).sqrt().unsqueeze(1)
            x = x * root
        self.hessian_sum += x.t() @ x  # float32 product summed in float64, without a float64 copy
        if target_inputs is not None:
            x_fp = target_inputs.reshape(-1, target_inputs.shape[-1]).float().to(x.device)
            x_fp = x_fp * root if root is not None else x_fp
            if self.cross_sum is None:
                self.cross_sum = torch.zeros_like(self.hessian_sum)
            self.cross_sum += x_fp.t() @ x
        self.num_tokens += x.shape[0]

    def statistics(self) -> list[torch.Tensor]:
        return [self.hessian_sum, self.num_tokens] + ([self.cross_sum] if self.cross_sum is not None else [])

    def load_statistics(self, tensors: list[torch.Tensor]) -> None:
        self.hessian_sum, self.num_tokens = tensors[0], tensors[1]
        if len(tensors) > 2:
            self.cross_sum = tensors[2]

    def hessian(self) -> torch.Tensor:
        return (2.0 * self.hessian_sum / self.num_tokens.clamp_min(1)).float()

    def target_weight(self) -> torch.Tensor:
        """W for the symmetric target; for the asymmetric one the least-squares W C H^-1, since
        sum_t w_t ||W x_fp,t - Q x~_t||^2 = sum_t w_t ||W C H^-1 x~_t - Q x~_t||^2 + const."""
        if self.cross_sum is None:
            return self.weight
        h = self.hessian_sum.float()
        diag = torch.arange(h.shape[0], device=h.device)
        h[diag, diag] += self.recipe.dampening * h.diagonal().mean().clamp_min(1e-12)
        mapping = torch.linalg.solve(h, self.cross_sum.float().t()).t()  # C H^-1 (H symmetric)
        return (self.weight.float() @ mapping).to(self.weight.dtype)

    def solve(self) -> QuantizedWeight:
        target = self.target_weight()
        # The float64 sums are consumed: scaled in place (same operations as hessian()), converted, and
        # dropped before the solve, so the peak stays near three float32 in x in matrices (a 29568-wide
        # down_proj Hessian is 7 GB in float64).
        hessian = self.hessian_sum.mul_(2.0).div_(self.num_tokens.clamp_min(1)).float()
        self.hessian_sum = self.cross_sum = None
        return gptq_quantize(target, hessian, self.scheme, self.recipe.dampening, self.recipe.block_size,
                             self.recipe.act_order_resolved, overwrite_hessian=True)


def _inverse_cholesky(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after damping; retries with stronger damping if H is not PD.

    Damps `hessian` in place (its diagonal is restored before each retry), so it is the caller's to
    give; at most two other in x in matrices are alive at once.
    """
    diag = torch.arange(hessian.shape[0], device=hessian.device)
    original = hessian.diagonal().clone()
    mean_diag = torch.mean(original)
    for attempt in range(6):
        hessian[diag, diag] = original + dampening * (10 ** attempt) * mean_diag
        chol, info = torch.linalg.cholesky_ex(hessian)
        if info == 0:
            inverse = torch.cholesky_inverse(chol)
            del chol
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
            del inverse, upper
    finite = bool(torch.isfinite(original).all())
    raise TlqError("GPTQ: the input Hessian is not positive definite even with 10^5 x damping "
                   + ("(it holds NaN or inf: the layer's inputs overflowed; try --dtype float32)" if not finite else
                      "(its inputs are degenerate: use more or more varied calibration samples)"))


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, dampening: float = 0.01,
                  block_size: int = 128, act_order: bool = False, overwrite_hessian: bool = False) -> QuantizedWeight:
    """Quantize `weight` [out, in] to `scheme` minimising the H-weighted output error.

    `overwrite_hessian` lets the solve use a float32 `hessian` as its workspace instead of a copy.
    """
    W = weight.detach().float().clone()
    H = hessian.detach().float()
    if not (overwrite_hessian and H is hessian):
        H = H.clone()
    rows, columns = W.shape
    bits = scheme.weight_bits
    group = scheme.group_for(columns)
    if columns % group:
        raise ValueError(f"in_features {columns} is not a multiple of group size {group}")
    num_groups = columns // group

    # Inputs that never fire carry no information: pin their weights to zero, keep H invertible.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    # Static grids, one per group in the original column order (before any permutation).
    scales = torch.empty(rows, num_groups, dtype=weight.dtype, device=W.device)
    zeros = torch.empty(rows, num_groups, dtype=torch.float32, device=W.device)
    static = act_order or group == columns
    if static:
        for g in range(num_groups):
            scales[:, g:g + 1], zeros[:, g:g + 1] = grid_params(W[:, g * group:(g + 1) * group], bits,
                                                                scheme.symmetric, weight.dtype, scheme.grid)

    perm = torch.arange(columns, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]

    Hinv = _inverse_cholesky(H, dampening)
    del H, hessian  # only H^-1's factor is used from here on
    # Lazy batches aligned to group boundaries, so every dynamic group lies inside one block and its
    # grid is read from the error-updated weights.
    if group < columns:
        block_size = group * max(1, block_size // group)
    Q = torch.zeros_like(W)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            if not static and column % group == 0:
                g = column // group
                scales[:, g:g + 1], zeros[:, g:g + 1] = grid_params(W1[:, i:i + group], bits, scheme.symmetric,
                                                                    weight.dtype, scheme.grid)
            g = int(perm[column]) // group
            w = W1[:, i]
            q = quant_dequant(w.unsqueeze(1), scales[:, g:g + 1], zeros[:, g:g + 1], bits).squeeze(1)
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return QuantizedWeight(weight=Q.to(weight.dtype), scale=scales, zero_point=zeros)
