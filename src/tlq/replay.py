"""Replaying a solved block's outputs instead of recomputing them on the layer's later passes.

Once every Linear of a block (the adapter's `Block`: the attention) is solved and written back, and every
Linear before it in the forward is too (solve groups follow the forward), the block computes the same output
for a sample on every later pass of the layer: the next group's observe pass records it, and the passes after
that (the MLP's down projection observed, the quantized layer propagated) return the record instead of
running the block. One step earlier, once every Linear of the block but its output Linear (o_proj) is solved,
that Linear's input no longer changes: the pass observing it records it, and the next pass computes the
block as the output Linear applied to the record (checked equal to the block's own output on the pass's
first sample). At Qwen2-VL 2B widths that is the attention's projections and the attention itself in three
passes per layer, for one more stream of s x T x d activations while the later groups are solved (the
layer's outputs, which `tlq plan` counts beside its inputs, do not exist yet then; each record is freed as
its last reader moves on). Outputs are byte-identical: the record is what the recomputation would return.

A block whose output carries tensors beyond its first (attention weights), or other rows than the layer's
input, is never replayed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tlq.activations import activation_list, activations_offloaded
from tlq.models.base import Block


class _Replaying:
    """A handle (like a hook's) that makes `module` return the record of the replay's sample until removed."""

    def __init__(self, module: nn.Module, outputs, rest: tuple | None, replay: "BlockReplay",
                 device: torch.device) -> None:
        def forward(*args: Any, **kwargs: Any):
            output = outputs[replay.sample].to(device)
            return (output, *rest) if rest is not None else output

        self.module = module
        # An instance attribute: nn.Module.__call__ runs it instead of the class's. One may be there already
        # (accelerate's dispatch hooks wrap `forward` so): it is put back on removal.
        self.previous = module.__dict__.get("forward")
        module.forward = forward

    def remove(self) -> None:
        _restore_forward(self.module, self.previous)


# Samples share a record buffer until it holds this many bytes: glibc maps an allocation above 32 MiB on its
# own and unmaps it when freed, where per-sample tensors of a few MB land in the heap among the pass's
# transient allocations (and one buffer per few dozen samples is freed as propagation moves on).
BUFFER_BYTES = 64 * 2**20


class PackedOutputs:
    """Per-sample outputs copied into a few large buffers, each freed once all of its samples are released.

    `rows[i]` is sample i's token count (the layer input's), fixed up front; the buffers are laid out at the
    first append, from the outputs' width and dtype."""

    def __init__(self, rows: list[int]) -> None:
        self.rows, self.shapes = rows, []
        self.buffer_of: list[int] = []  # sample -> its buffer
        self.offsets: list[int] = []  # sample -> its first row in that buffer
        self.buffers: dict[int, torch.Tensor] = {}
        self.released: set[int] = set()

    def __len__(self) -> int:
        return len(self.shapes)

    def _lay_out(self, row_bytes: int) -> None:
        buffer, filled = 0, 0
        for rows in self.rows:
            if filled and filled + rows * row_bytes > BUFFER_BYTES:
                buffer, filled = buffer + 1, 0
            self.buffer_of.append(buffer)
            self.offsets.append(filled // row_bytes)
            filled += rows * row_bytes

    def append(self, tensor: torch.Tensor) -> None:
        index, width = len(self.shapes), tensor.shape[-1]
        flat = tensor.reshape(-1, width)
        if index >= len(self.rows) or flat.shape[0] != self.rows[index]:
            raise ValueError(f"sample {index}: {flat.shape[0]} output rows where the layer input has "
                             f"{self.rows[index] if index < len(self.rows) else 'none'}")
        if not self.buffer_of:
            self._lay_out(width * tensor.element_size())
        buffer = self.buffer_of[index]
        if buffer not in self.buffers:
            rows = sum(r for r, b in zip(self.rows, self.buffer_of) if b == buffer)
            self.buffers[buffer] = torch.empty(rows, width, dtype=tensor.dtype)
        start = self.offsets[index]
        self.buffers[buffer][start:start + flat.shape[0]].copy_(flat)
        self.shapes.append(tensor.shape)

    def __getitem__(self, index: int) -> torch.Tensor:
        start = self.offsets[index]
        return self.buffers[self.buffer_of[index]][start:start + self.rows[index]].view(self.shapes[index])

    def release(self, index: int) -> None:
        """Sample `index` is read for the last time: its buffer goes once every sample in it has."""
        self.released.add(index)
        buffer = self.buffer_of[index]
        if all(i in self.released for i, b in enumerate(self.buffer_of) if b == buffer):
            self.buffers.pop(buffer, None)


class _ThroughOutput:
    """A handle that makes a block compute its output as its output Linear applied to that Linear's recorded
    input, once the first sample of the pass has shown (by running the block itself) that this is exact."""

    UNKNOWN = object()

    def __init__(self, module: nn.Module, linear: nn.Module, inputs: "PackedOutputs", replay: "BlockReplay",
                 name: str, device: torch.device) -> None:
        self.module, self.previous = module, module.__dict__.get("forward")
        original = self.previous if self.previous is not None else type(module).forward.__get__(module)
        self.rest: Any = self.UNKNOWN

        def forward(*args: Any, **kwargs: Any):
            index = replay.sample
            if name in replay.refused:
                inputs.release(index)
                return original(*args, **kwargs)
            x = inputs[index].to(device)
            inputs.release(index)
            if self.rest is self.UNKNOWN:
                output = original(*args, **kwargs)
                self.rest = _verified_rest(output, linear(x))
                if self.rest is self.UNKNOWN:
                    replay.refused.add(name)
                return output
            result = linear(x)
            return (result, *self.rest) if self.rest is not None else result

        module.forward = forward

    def remove(self) -> None:
        _restore_forward(self.module, self.previous)


def _split(output: Any) -> tuple[torch.Tensor, tuple | None, bool]:
    """A block's output as (its first tensor, the rest or None when it returns one tensor, whether a record
    of the first can stand for it: the rest holds no tensor)."""
    first, rest = (output[0], tuple(output[1:])) if isinstance(output, (tuple, list)) else (output, None)
    return first, rest, not (rest and any(isinstance(r, torch.Tensor) for r in rest))


def _verified_rest(output: Any, recomputed: torch.Tensor) -> Any:
    """The rest of a block's output (see _split) if its first tensor equals `recomputed` exactly and it is
    replayable; else _ThroughOutput.UNKNOWN."""
    first, rest, replayable = _split(output)
    return rest if replayable and torch.equal(first, recomputed) else _ThroughOutput.UNKNOWN


def _restore_forward(module: nn.Module, previous) -> None:
    if previous is not None:
        module.forward = previous
    elif "forward" in module.__dict__:
        del module.forward


class BlockReplay:
    """The recorded outputs of a decoder layer's solved blocks (and their output Linears' inputs), per
    sample, and the hooks that record and replay them on a pass over the layer's samples."""

    def __init__(self, layer: nn.Module, blocks: tuple[Block, ...], rows: list[int]) -> None:
        self.layer, self.rows, self.samples = layer, rows, len(rows)  # rows: each sample's token count
        self.pending = [b for b in blocks if b.role == "attention"]  # blocks not yet recorded
        self.solved_linears: set[str] = set()
        self.recording: dict[str, Any] = {}  # block module -> its outputs so far on the pass under way
        self.records: dict[str, tuple[Any, tuple | None]] = {}  # block module -> (outputs, the rest of its output)
        self.inputs_recording: dict[str, PackedOutputs] = {}  # block module -> its output Linear's inputs so far
        self.output_inputs: dict[str, PackedOutputs] = {}  # ... recorded on every sample, for the next pass
        self.refused: set[str] = set()  # blocks that are recomputed (see the module's docstring)
        self.sample = 0

    def solved(self, linears) -> None:
        """Linears just solved and written back: a block whose Linears are now all solved is recorded on the
        next pass; one whose Linears but its output Linear are, records that Linear's inputs."""
        self.solved_linears.update(linears)

    def _ready(self) -> list[Block]:
        return [b for b in self.pending if set(b.linears) <= self.solved_linears and b.module not in self.refused]

    def _ready_for_inputs(self) -> list[Block]:
        return [b for b in self.pending if isinstance(b.output, str) and b.output in b.linears
                and b.output not in self.solved_linears and set(b.linears) - {b.output} <= self.solved_linears
                and b.module not in self.refused and b.module not in self.output_inputs]

    def set_sample(self, index: int) -> None:
        self.sample = index

    def handles(self, device: torch.device, record: bool = True) -> list:
        """Hooks for one pass over the samples: the recorded blocks replay, and (with `record`) the blocks
        solved since the last pass record their outputs (or their output Linear's inputs)."""
        handles: list = [_Replaying(self.layer.get_submodule(name), outputs, rest, self, device)
                         for name, (outputs, rest) in self.records.items()]
        for name, inputs in self.output_inputs.items():
            block = next(b for b in self.pending if b.module == name)
            handles.append(_ThroughOutput(self.layer.get_submodule(name), self.layer.get_submodule(block.output),
                                          inputs, self, name, device))
        self.output_inputs = {}  # read by this pass only: each sample's input is freed once used
        if record:
            for block in self._ready():
                # under --offload-dir, on disk; else packed in memory
                store = activation_list() if activations_offloaded() else PackedOutputs(self.rows)
                self.recording[block.module] = [store, None]
                module = self.layer.get_submodule(block.module)
                handles.append(module.register_forward_hook(self._recorder(block.module)))
            if not activations_offloaded():
                for block in self._ready_for_inputs():
                    self.inputs_recording[block.module] = PackedOutputs(self.rows)
                    # Before the activation fake-quant hook: the replay calls the Linear, which applies it.
                    handles.append(self.layer.get_submodule(block.output).register_forward_pre_hook(
                        self._input_recorder(block.module), prepend=True))
        return handles

    def _input_recorder(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            inputs = self.inputs_recording.get(name)
            if inputs is None:
                return
            try:
                if len(inputs) != self.sample:
                    raise ValueError("a sample's forward stopped before the Linear")
                if not args[0].is_contiguous():  # replayed from a contiguous copy, the product could round apart
                    raise ValueError("a strided input")
                inputs.append(args[0].detach())
            except ValueError:
                self.inputs_recording.pop(name)
        return hook

    def _recorder(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            state = self.recording.get(name)
            if state is None:
                return
            outputs, _ = state
            first, rest, replayable = _split(output)
            if not replayable:
                self.recording.pop(name)  # always recomputed
                self.refused.add(name)
                return
            if len(outputs) != self.sample:  # a sample's forward stopped before the block: not this pass
                self.recording.pop(name)
                return
            try:
                outputs.append(first.detach())
            except ValueError:  # an output of another length than the layer's input: not replayable
                self.recording.pop(name)
                self.refused.add(name)
                return
            state[1] = rest
        return hook

    def pass_finished(self) -> None:
        """Keep the records that hold every sample; the others are dropped (their blocks record again on
        the next pass)."""
        for name, (outputs, rest) in self.recording.items():
            if len(outputs) == self.samples:
                self.records[name] = (outputs, rest)
                self.pending = [b for b in self.pending if b.module != name]
        for name, inputs in self.inputs_recording.items():
            if len(inputs) == self.samples:
                self.output_inputs[name] = inputs
        self.recording, self.inputs_recording = {}, {}

    def release(self, index: int) -> None:
        """Sample `index`'s records are read for the last time (propagation): free them."""
        for outputs, _ in self.records.values():
            if isinstance(outputs, PackedOutputs):
                outputs.release(index)


__all__ = ["BlockReplay", "PackedOutputs"]
