"""GPTQ (Frantar et al., 2022) with per-token weights.

The layer objective is sum_t w_t ||W x_t - Q x_t||^2, so the Hessian is H = 2 sum_t w_t x_t x_t^T / N:
feeding sqrt(w_t) x_t to the usual accumulation gives it. Each chunk of consecutive samples (the engine
hands them over together; rank shards start at chunk boundaries) gives one float32 product, added into a
float64 sum, so the Hessian does not depend on how samples are split over ranks (the float32 solve then
sees the same matrix for 1, 2 or 3 ranks). Only the upper block triangle is accumulated; the lower one is
mirrored once before the solve. Uniform weights are plain GPTQ; a zero weight
removes a token. The solve is the reference column-by-column OBS update with lazy block updates,
damping as a fraction of the mean Hessian diagonal, group-wise grids, and act-order with static groups
(the grids are fixed up front in the original column order, so the exported layout needs no g_idx).
"""

from __future__ import annotations

import torch

from tlq.errors import TlqError
from tlq.quant.base import LinearSolver, register
from tlq.quant.primitives import QuantizedWeight, grid_params, quant_dequant
from tlq.recipe import GPTQConfig, RunConfig, Scheme


@register("gptq")
class GPTQ(LinearSolver):
    config: GPTQConfig

    def __init__(self, weight: torch.Tensor, scheme: Scheme, config: GPTQConfig) -> None:
        super().__init__(weight, scheme, config)
        columns = weight.shape[1]
        # sum_t w_t x_t x_t^T: its row blocks on and above the diagonal (gram_blocks), in float64
        self.gram: list[torch.Tensor] | None = [
            torch.zeros(stop - start, columns - start, dtype=torch.float64, device=weight.device)
            for start, stop in gram_blocks(columns)]
        self.cross_sum: torch.Tensor | None = None  # sum_t w_t x_fp,t x~_t^T (asymmetric target)
        self.num_tokens = torch.zeros((), dtype=torch.float64, device=weight.device)

    @staticmethod
    def config_of(run: RunConfig) -> GPTQConfig:
        return run.gptq

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
        add_gram_upper(self.gram, x)
        if target_inputs is not None:
            x_fp = target_inputs.reshape(-1, target_inputs.shape[-1]).float().to(x.device)
            x_fp = x_fp * root if root is not None else x_fp
            if self.cross_sum is None:
                self.cross_sum = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            self.cross_sum += x_fp.t() @ x
        self.num_tokens += x.shape[0]

    def statistics(self) -> list[torch.Tensor]:
        return [*self.gram, self.num_tokens] + ([self.cross_sum] if self.cross_sum is not None else [])

    def load_statistics(self, tensors: list[torch.Tensor]) -> None:
        count = len(self.gram)
        self.gram, self.num_tokens = list(tensors[:count]), tensors[count]
        if len(tensors) > count + 1:
            self.cross_sum = tensors[count + 1]

    def hessian(self) -> torch.Tensor:
        """H = 2 sum_t w_t x_t x_t^T / N in float32."""
        return assemble_gram(self.gram, 2.0, self.num_tokens.clamp_min(1))

    def target_weight(self) -> torch.Tensor:
        """W for the symmetric target; for the asymmetric one the least-squares W C H^-1, since
        sum_t w_t ||W x_fp,t - Q x~_t||^2 = sum_t w_t ||W C H^-1 x~_t - Q x~_t||^2 + const."""
        if self.cross_sum is None:
            return self.weight
        h = assemble_gram(self.gram, 1.0, 1.0)
        diag = torch.arange(h.shape[0], device=h.device)
        h[diag, diag] += self.config.dampening * h.diagonal().mean().clamp_min(1e-12)
        mapping = torch.linalg.solve(h, self.cross_sum.float().t()).t()  # C H^-1 (H symmetric)
        return (self.weight.float() @ mapping).to(self.weight.dtype)

    def solve(self) -> QuantizedWeight:
        target = self.target_weight()
        # The float64 sums are handed to the solve, which builds the float32 matrix from them (again only
        # if damping must be retried) and drops them once H^-1's factor exists: with the factorisation
        # done in place, the peak is the upper half in float64 plus two float32 in x in matrices (a
        # 29568-wide down_proj Hessian is 7 GB in float64).
        self.cross_sum = None
        return gptq_quantize(target, self._take_hessian_builder(), self.scheme, self.config.dampening,
                             self.config.block_size, self.config.act_order)

    @classmethod
    def solve_given(cls, weight: torch.Tensor, hessian, scheme: Scheme, config: GPTQConfig
                    ) -> QuantizedWeight:
        """GPTQ on a given Hessian (scale is irrelevant: damping is relative to its mean diagonal)."""
        return gptq_quantize(weight, hessian, scheme, config.dampening, config.block_size, config.act_order)

    def _take_hessian_builder(self) -> "_HessianBuilder":
        """A function building H from the sums, which now belong to it alone (the solve frees them)."""
        builder = _HessianBuilder(self.gram, 2.0, self.num_tokens.clamp_min(1))
        self.gram = None
        return builder


GRAM_BLOCK = 1024  # columns per row block of the upper-triangle Gram sums


def gram_blocks(columns: int) -> list[tuple[int, int]]:
    return [(start, min(start + GRAM_BLOCK, columns)) for start in range(0, columns, GRAM_BLOCK)]


def add_gram_upper(gram: list[torch.Tensor], x: torch.Tensor) -> None:
    """gram += x^T x on the row blocks on and above the diagonal only (gram_blocks): the lower blocks
    mirror the upper ones, so they are filled in once by `assemble_gram` instead of being computed for
    every chunk (nearly half the products of a wide Hessian, and half its float64 memory). Each block is
    a float32 product summed into float64 without a float64 copy."""
    for block, (start, stop) in zip(gram, gram_blocks(x.shape[1])):
        block += x[:, start:stop].t() @ x[:, start:]


def assemble_gram(gram: list[torch.Tensor], factor: float, divisor) -> torch.Tensor:
    """The full symmetric float32 matrix factor * sum / divisor from the upper row blocks."""
    return _mirrored([(block * factor / divisor).float() for block in gram])


def _mirrored(rows: list[torch.Tensor]) -> torch.Tensor:
    """The full symmetric matrix whose upper row blocks (gram_blocks) are `rows`."""
    columns = rows[0].shape[1]
    full = torch.empty(columns, columns, dtype=rows[0].dtype, device=rows[0].device)
    for block, (start, stop) in zip(rows, gram_blocks(columns)):
        full[start:stop, start:] = block
        full[stop:, start:stop] = block[:, stop - start:].t()
    return full


class _HessianBuilder:
    """Builds the float32 H = factor * sum / divisor from float64 Gram sums that it consumes: the first
    call converts each upper row block to float32 and frees the float64 one, keeping the float32 rows
    (half an in x in matrix) to build H again if damping has to be retried."""

    def __init__(self, gram: list[torch.Tensor], factor: float, divisor) -> None:
        self.gram, self.factor, self.divisor = list(gram), factor, divisor
        self.rows: list[torch.Tensor] = []

    def __call__(self) -> torch.Tensor:
        while self.gram:
            block = self.gram.pop(0)
            self.rows.append((block * self.factor / self.divisor).float())
            del block
        return _mirrored(self.rows)


def _inverse_cholesky(hessian: torch.Tensor, dampening: float, rebuild=None) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after damping; retries with stronger damping if H is not PD.

    Works in place in `hessian` (returned as the factor), so at most one other in x in matrix is alive
    at once; a retry takes a fresh H from `rebuild()` (by default a copy kept for the purpose). `hessian`
    may also be a one-element list, which is emptied: the caller then holds no reference to the failed
    attempt's matrix, which is freed before a retry builds the next one (else a retry held two or three
    in x in matrices at once: 321 MB each at 8960 wide).
    """
    if isinstance(hessian, list):
        hessian = hessian.pop()
    original = hessian.diagonal().clone()
    mean_diag = torch.mean(original)
    if rebuild is None:
        backup = hessian.clone()
        rebuild = backup.clone
    info = torch.zeros((), dtype=torch.int32, device=hessian.device)
    for attempt in range(6):
        if attempt:
            del hessian  # the failed attempt's matrix, before the next one is built
            hessian = rebuild()
        hessian.diagonal().copy_(original + dampening * (10 ** attempt) * mean_diag)
        torch.linalg.cholesky_ex(hessian, out=(hessian, info))
        if info != 0:
            continue
        torch.cholesky_inverse(hessian, out=hessian)
        torch.linalg.cholesky_ex(hessian, upper=True, out=(hessian, info))
        if info == 0:
            return hessian
    finite = bool(torch.isfinite(original).all())
    raise TlqError("GPTQ: the input Hessian is not positive definite even with 10^5 x damping "
                   + ("(it holds NaN or inf: the layer's inputs overflowed; try --dtype float32)" if not finite else
                      "(its inputs are degenerate: use more or more varied calibration samples)"))


def _prepared(hessian: torch.Tensor, dead: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """H with dead inputs pinned (diagonal 1) and, for act-order, rows and columns permuted."""
    hessian[dead, dead] = 1.0
    if perm is not None:  # in place, so that no caller still holds the unpermuted matrix
        hessian.copy_(hessian.index_select(0, perm))
        hessian.copy_(hessian.index_select(1, perm))
    return hessian


def gptq_quantize(weight: torch.Tensor, hessian, scheme: Scheme, dampening: float = 0.01,
                  block_size: int = 128, act_order: bool = False) -> QuantizedWeight:
    """Quantize `weight` [out, in] to `scheme` minimising the H-weighted output error.

    `hessian` is the float32 matrix (not modified) or a function that builds a fresh one, which the
    solve then uses as its workspace and calls again only if damping has to be retried.
    """
    build = hessian if callable(hessian) else (lambda source=hessian: source.detach().float().clone())
    del hessian
    W = weight.detach().float().clone()
    H = build()
    rows, columns = W.shape
    bits = scheme.weight_bits
    group = scheme.group_for(columns)
    if columns % group:
        raise ValueError(f"in_features {columns} is not a multiple of group size {group}")
    num_groups = columns // group

    # Inputs that never fire carry no information: pin their weights to zero, keep H invertible.
    dead = torch.diag(H) == 0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.where(dead, 1.0, torch.diag(H)), descending=True) if act_order else None

    # Static grids, one per group in the original column order (before any permutation).
    scales = torch.empty(rows, num_groups, dtype=weight.dtype, device=W.device)
    zeros = torch.empty(rows, num_groups, dtype=torch.float32, device=W.device)
    static = act_order or group == columns
    if static:
        for g in range(num_groups):
            scales[:, g:g + 1], zeros[:, g:g + 1] = grid_params(W[:, g * group:(g + 1) * group], bits,
                                                                scheme.symmetric, weight.dtype, scheme.grid)

    handed = [_prepared(H, dead, perm)]
    del H  # handed over: a damping retry frees it before building the next H
    Hinv = _inverse_cholesky(handed, dampening, rebuild=lambda: _prepared(build(), dead, perm))
    del build  # only H^-1's factor is used from here on (a Gram-sum builder frees the sums with it)
    if perm is not None:
        W = W[:, perm]
    else:
        perm = torch.arange(columns, device=W.device)
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
