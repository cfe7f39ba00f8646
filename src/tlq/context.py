"""What every decoder layer of one calibration run shares, built once by the layer loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from tlq.distributed import SINGLE, Ranks
from tlq.models import ModelAdapter
from tlq.recipe import Recipe, RunConfig

# token_weights(layer_index, linear_name, sample_index) -> weights [tokens] or None (uniform)
TokenWeights = Callable[[int, str, int], "torch.Tensor | None"]


@dataclass(frozen=True)
class RunContext:
    """The resolved recipe, the model's adapter, the device, the ranks and the token weights of a run."""

    config: RunConfig
    adapter: ModelAdapter
    device: torch.device
    ranks: Ranks = field(default_factory=lambda: SINGLE)
    token_weights: TokenWeights | None = None

    @classmethod
    def of(cls, recipe: Recipe | RunConfig, adapter: ModelAdapter, device: torch.device | str = "cpu",
           ranks: Ranks = SINGLE, token_weights: TokenWeights | None = None) -> "RunContext":
        config = recipe if isinstance(recipe, RunConfig) else recipe.resolve()
        return cls(config, adapter, torch.device(device), ranks, token_weights)


__all__ = ["RunContext", "TokenWeights"]
