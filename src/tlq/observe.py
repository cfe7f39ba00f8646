"""Observing a decoder layer: its Linears' inputs handed to their solvers, and the FP view of a layer.

Split from tlq.engine (the loop); `run` is the engine's per-layer record (`_LayerRun`: layer, streams,
context, chunk, Linears, FP view, the reference samples kept, the tokens routed to each expert, the solved
blocks' recorded outputs).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from tlq.activations import capture_linear_inputs, run_with_hooks
from tlq.models.moe import routed_rows
from tlq.quant import fake_quant_activation


class Observer:
    """Forward pre-hook that hands a Linear's (possibly activation-quantized) input to its solver.

    Consecutive samples are handed over `chunk` at a time (one product per chunk is far cheaper for
    GPTQ's wide Hessians than one per sample); rank shards start at chunk boundaries
    (tlq.distributed.samples_per_chunk), so every rank count forms the same chunks.
    """

    def __init__(self, solver, run, name: str, fp_inputs: list[torch.Tensor] | None,
                 act_bits: int | None) -> None:
        self.solver, self.layer_index, self.name = solver, run.index, name
        self.token_weights, self.fp_inputs, self.chunk = run.token_weights, fp_inputs, run.chunk
        self.act_bits = act_bits  # fake-quantize the input for the solver only (the forward stays FP)
        self.sample = 0
        self.tokens_seen = 0  # rows observed, counted for routed Linears only
        self.pending: list[tuple] = []

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])
        if self.act_bits is not None:
            x = fake_quant_activation(x, self.act_bits)
        weights = self.token_weights(self.layer_index, self.name, self.sample) if self.token_weights else None
        routing = routed_rows(module)
        if routing is not None:  # an expert: its rows are the tokens routed to it
            self.tokens_seen += x.shape[0]
            if weights is not None:
                weights = weights.reshape(-1)[routing[0].to(weights.device)]
        target = self.fp_inputs[self.sample].to(x.device) if self.fp_inputs is not None else None
        self.pending.append((x, None if weights is None else weights.reshape(-1).to(x.device),
                             None if target is None else target.reshape(-1, target.shape[-1])))
        if len(self.pending) == self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        xs, weights, targets = zip(*self.pending)
        self.pending = []
        if len(xs) == 1:
            self.solver.observe(xs[0], weights[0], targets[0])
            return
        if all(w is None for w in weights):
            weight = None
        else:  # a sample without weights counts every token once
            weight = torch.cat([torch.ones(x.shape[0], device=x.device) if w is None else w
                                for x, w in zip(xs, weights)])
        self.solver.observe(torch.cat(xs), weight, None if targets[0] is None else torch.cat(targets))


def fp_view(layer: nn.Module) -> nn.Module:
    """A copy of `layer` whose parameters share storage with it: its FP weights, without a copy now.

    Sound because, once a layer has a view (the asymmetric target, made after rescaling), solved weights
    rebind `.data` to new tensors instead of writing in place (`_write_back`), so this copy keeps the FP
    values (tests/test_engine.py checks it for every method). They stay alive as long as the view does.
    """
    memo: dict[int, Any] = {id(p): nn.Parameter(p.data, requires_grad=False) for p in layer.parameters()}
    memo.update({id(b): b for b in layer.buffers()})
    return copy.deepcopy(layer, memo)


def observe(run, solvers: dict, act_bits: int | None = None, keep_outputs: bool = False):
    """Run the layer up to the observed Linears, handing each one's input (and FP-path input) to its solver.

    With `keep_outputs` the forward runs to the end and its outputs are returned: the FP layer's outputs
    when nothing has changed yet (then `act_bits` fake-quantizes the observed inputs for the solvers only).
    """
    observed = [name for name, s in solvers.items() if s.needs_inputs]
    fp_linear_inputs = (capture_linear_inputs(run.fp_scaled, observed, run.fp_inputs, run.device)
                        if run.fp_scaled is not None and observed else {})
    observers = {name: Observer(solvers[name], run, name, fp_linear_inputs.get(name), act_bits)
                 for name in observed}

    replay = run.replay if observers else None  # (a pass that observes nothing runs no sample at all)

    def set_sample(i: int) -> None:
        for obs in observers.values():
            obs.sample = i
        if replay is not None:
            replay.set_sample(i)

    handles = [run.linears[name].register_forward_pre_hook(obs) for name, obs in observers.items()]
    if replay is not None:
        handles += replay.handles(run.device)
    # Samples past the kept references stop at the observed Linears: the rest of the layer would compute
    # outputs nobody reads (at 2B widths, 128 samples and 16 kept, most of a layer forward per layer).
    outputs = run_with_hooks(run.layer, run.inputs, run.device, handles, set_sample,
                             stop_after=[run.linears[name] for name in observed],
                             outputs_of=run.references_kept if keep_outputs else 0)
    if replay is not None:
        replay.pass_finished()
    for name, obs in observers.items():
        obs.flush()
        if routed_rows(run.linears[name]) is not None:
            run.routed_tokens[name] = obs.tokens_seen
    return outputs if keep_outputs else None


__all__ = ["Observer", "fp_view", "observe"]
