"""The interface every calibration algorithm implements.

The layer loop (tlq.engine) knows nothing about any algorithm. For each quantized Linear it asks the
algorithm for a `LinearSolver`, feeds it the Linear's inputs as the deployed model would see them
(`observe`, once per calibration sample, with optional per-token weights), then calls `solve`, which
returns the fake-quantized weight and its grid. Algorithms that need no statistics (RTN) say so with
`needs_inputs = False`, and the loop skips the forward passes that would only feed them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from tlq.errors import TlqError
from tlq.quant.primitives import QuantizedWeight
from tlq.recipe import RunConfig, Scheme


class LinearSolver:
    """Statistics and solve for one Linear layer; `config` is the algorithm's own frozen config (its part
    of the resolved recipe, chosen by `config_of`), None for an algorithm without knobs."""

    needs_inputs: bool = True

    def __init__(self, weight: torch.Tensor, scheme: Scheme, config: Any = None) -> None:
        self.weight = weight
        self.scheme = scheme
        self.config = config

    @staticmethod
    def config_of(run: RunConfig) -> Any:
        """This algorithm's part of a resolved recipe."""
        return None

    def observe(self, inputs: torch.Tensor, token_weights: torch.Tensor | None = None,
                target_inputs: torch.Tensor | None = None) -> None:
        """Accumulate inputs [..., in_features]; token_weights [...] scale each token's error.

        target_inputs, when given, are the same tokens' inputs on the FP path: the objective then
        compares Q x~ with W x_fp (the asymmetric target) instead of W x~.
        """

    def statistics(self) -> list[torch.Tensor]:
        """The accumulated statistics as tensors that add up over calibration ranks (none by default)."""
        return []

    def load_statistics(self, tensors: list[torch.Tensor]) -> None:
        """Replace the statistics with the sum over all ranks (same order as `statistics`)."""

    def solve(self) -> QuantizedWeight:
        raise NotImplementedError

    @classmethod
    def solve_given(cls, weight: torch.Tensor, hessian, scheme: Scheme, config: Any = None
                    ) -> QuantizedWeight:
        """One solve of `weight` for inputs whose (unnormalised) Hessian sum_t w_t x_t x_t^T is `hessian` (a
        tensor, or a function building a fresh one that the solve may overwrite), without observing them:
        what the scale search asks when it scores a candidate with the solver the Linear will get. An
        algorithm that reads no inputs ignores the Hessian."""
        if cls.needs_inputs:
            raise TlqError(f"the {cls.__name__} solver cannot score scale candidates from a Hessian (no "
                           "solve_given): use --scale-rescore-top 0")
        return cls(weight, scheme, config).solve()


_REGISTRY: dict[str, type[LinearSolver]] = {}


def register(name: str) -> Callable[[type[LinearSolver]], type[LinearSolver]]:
    def add(solver: type[LinearSolver]) -> type[LinearSolver]:
        _REGISTRY[name] = solver
        return solver

    return add


def solver_class(method: str) -> type[LinearSolver]:
    if method not in _REGISTRY:
        raise KeyError(f"no algorithm {method!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[method]


def solver_factory(method: str) -> Callable[[torch.Tensor, RunConfig], LinearSolver]:
    """make(weight, run) -> the registered solver for one Linear, given the scheme and its own config."""
    solver = solver_class(method)
    return lambda weight, run: solver(weight, run.scheme, solver.config_of(run))
