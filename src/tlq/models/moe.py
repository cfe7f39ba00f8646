"""Mixture-of-experts layers as Linears: what lets one layer loop calibrate routed experts.

transformers 5 stores a family's experts as two 3-D parameters (`gate_up_proj` [E, 2I, H], `down_proj`
[E, H, I]) inside one module that loops over the experts. tlq calibrates, reports and exports Linears, so
after loading, `unfuse_experts` swaps each such module for `RoutedExperts`: E small MLPs of three
`nn.Linear`s holding slices of the same tensors, computing the same function. The layer loop then sees
`mlp.experts.{e}.gate_proj` like any other Linear, and the export writes the per-expert names
(`...mlp.experts.{e}.gate_proj.weight_packed`) that vLLM's MoE loaders and llm-compressor's MoE outputs
use. The router stays FP.

Each expert Linear sees only the tokens routed to it. `RoutedExperts` calls every expert on every
forward (an expert nobody chose gets zero rows), and tells its Linears which token positions their input
rows are (`routed_rows`), so per-token weights and importance scores follow the tokens (tlq.engine,
tlq.importance). Loading a quantized output in transformers swaps the class before the weights are
read (`routed_experts_as_linears`), since transformers has no quantized form of the fused parameters.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ExpertLayout:
    """Where a family keeps its routed experts and how they are stored.

    `module`: the fused experts module inside a decoder layer (the router that feeds it is the adapter's
    `kept_fp`); `block_class`: transformers' class of the MoE block that owns the experts (as its last name in
    `module`), in `transformers_module`; `count_key`: the text-config key with the number of experts.
    """

    module: str = "mlp.experts"
    block_class: str = ""
    transformers_module: str = ""
    count_key: str = "num_experts"
    norm: str = "post_attention_layernorm"  # the norm whose output feeds the router and every expert
    linears: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")

    def count(self, config) -> int:
        return int(getattr(config.get_text_config(), self.count_key))

    def linear_groups(self, count: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(every expert's gate and up, every expert's down): the MLP's two solve groups."""
        gate, up, down = self.linears
        first = tuple(f"{self.module}.{e}.{name}" for e in range(count) for name in (gate, up))
        return first, tuple(f"{self.module}.{e}.{down}" for e in range(count))

    def down_groups(self, count: int) -> tuple:
        """Each expert's up -> down scaling group (the dense MLP's up -> down, per expert): scored on the
        expert's down projection over the tokens routed to it."""
        from tlq.models.base import ScalingGroup

        _, up, down = self.linears
        return tuple(ScalingGroup(f"{self.module}.{e}.{up}", (f"{self.module}.{e}.{down}",),
                                  block=f"{self.module}.{e}.{down}", output_linear=f"{self.module}.{e}.{down}",
                                  routed=True) for e in range(count))


class ExpertMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act_fn, dtype=None, device=None) -> None:
        super().__init__()
        make = lambda i, o: nn.Linear(i, o, bias=False, dtype=dtype, device=device)  # noqa: E731
        self.gate_proj, self.up_proj, self.down_proj = make(hidden, intermediate), make(hidden, intermediate), \
            make(intermediate, hidden)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def set_routed_rows(module: nn.Module, rows: torch.Tensor, tokens: int) -> None:
    """Tell `module`'s Linears that their next input rows are positions `rows` of `tokens` tokens."""
    for linear in module.modules():
        if isinstance(linear, nn.Linear):
            linear.routed_rows = (rows, tokens)


def routed_rows(linear: nn.Module) -> tuple[torch.Tensor, int] | None:
    """(token positions of the current input rows, tokens in the call) for a routed Linear, else None."""
    return getattr(linear, "routed_rows", None)


class RoutedExperts(nn.ModuleList):
    """The experts of one MoE block as `ExpertMLP`s; same call and result as transformers' fused module:
    forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]. A list, so that expert e's
    Linears are named `experts.{e}.gate_proj`, as vLLM and llm-compressor name them."""

    def __init__(self, config=None, *, count: int | None = None, hidden: int | None = None,
                 intermediate: int | None = None, act_fn=None, dtype=None, device=None) -> None:
        super().__init__()
        if config is not None:  # built by transformers in place of its fused class (routed_experts_as_linears)
            from transformers.activations import ACT2FN

            count, hidden, intermediate = config.num_experts, config.hidden_size, config.moe_intermediate_size
            act_fn = ACT2FN[config.hidden_act]
        self.extend(ExpertMLP(hidden, intermediate, act_fn, dtype, device) for _ in range(count))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        tokens = hidden_states.shape[0]
        for index, expert in enumerate(self):
            token_idx, position = torch.where(top_k_index == index)
            set_routed_rows(expert, token_idx, tokens)
            # [1, n, H]: a batch of one, so per-token activation quantization (compressed-tensors reduces
            # over the dimensions after the first two) sees one row per token, as vLLM's kernels do.
            y = expert(hidden_states[token_idx].unsqueeze(0))[0] * top_k_weights[token_idx, position, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


@torch.no_grad()
def from_fused(fused: nn.Module) -> RoutedExperts:
    """`RoutedExperts` holding the fused module's weights (gate_up_proj [E, 2I, H], down_proj [E, H, I]).

    Each expert's weights are views of the fused tensors (contiguous row ranges), not copies: nothing is
    allocated, and the fused storage is freed once calibration has rebound every expert's weights."""
    gate_up, down = fused.gate_up_proj, fused.down_proj
    count, double, hidden = gate_up.shape
    intermediate = double // 2
    routed = RoutedExperts(count=count, hidden=hidden, intermediate=intermediate, act_fn=fused.act_fn,
                           dtype=gate_up.dtype, device="meta")  # no initialisation of weights replaced below
    for e, expert in enumerate(routed):
        expert.gate_proj.weight = nn.Parameter(gate_up[e, :intermediate], requires_grad=False)
        expert.up_proj.weight = nn.Parameter(gate_up[e, intermediate:], requires_grad=False)
        expert.down_proj.weight = nn.Parameter(down[e], requires_grad=False)
    return routed


def unfuse_experts(layers, layout: ExpertLayout) -> None:
    """Swap every decoder layer's fused experts for `RoutedExperts` (same weights)."""
    for layer in layers:
        parent_name, _, child = layout.module.rpartition(".")
        parent = layer.get_submodule(parent_name) if parent_name else layer
        fused = getattr(parent, child, None)
        if fused is None or isinstance(fused, RoutedExperts):
            continue
        setattr(parent, child, from_fused(fused))
        del fused


@contextmanager
def routed_experts_as_linears(layout: ExpertLayout):
    """While active, every MoE block transformers builds holds `RoutedExperts` instead of its fused
    experts, so a checkpoint with per-expert Linears (tlq's and llm-compressor's quantized MoE outputs)
    loads into them. The block's own class is patched, not the experts class: transformers' weight
    initialisation recognises the fused class by name and would reach for its 3-D parameters."""
    import importlib

    block = getattr(importlib.import_module(layout.transformers_module), layout.block_class)
    original = block.__init__
    attribute = layout.module.rpartition(".")[2]

    def init(self, config, *args, **kwargs):
        original(self, config, *args, **kwargs)
        setattr(self, attribute, RoutedExperts(config))

    block.__init__ = init
    try:
        yield
    finally:
        block.__init__ = original


__all__ = ["ExpertLayout", "ExpertMLP", "RoutedExperts", "from_fused", "routed_experts_as_linears", "routed_rows",
           "set_routed_rows", "unfuse_experts"]
