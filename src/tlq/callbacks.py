"""What the layer loop tells the rest of a run: hooks at fixed points of tlq.engine.quantize_layers.

The loop knows layers, streams and solvers; it does not know work folders, resumption or tests. Each
of those is a `LayerCallback`: `tlq.resume.WorkDir` restores finished layers before the loop starts and
saves each layer as it finishes; a test watches the inputs of every layer. Where finished layers live
(in the model, or only in the work folder when layers are read lazily) is the layer source's business
(tlq.models.lazy), not the loop's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from tlq.activations import LayerStreams
    from tlq.phases import PhaseClock
    from tlq.quant import QuantizedWeight


@dataclass
class FinishedLayer:
    """A layer the loop has just calibrated (already back on the CPU), and what the next layer gets."""

    index: int
    layer: nn.Module
    quantized: dict[str, QuantizedWeight]  # keyed by full module name
    report: Any  # tlq.engine.LayerReport
    streams: LayerStreams  # the inputs of layer index + 1
    clock: PhaseClock  # the run's phase clock, for the time a callback spends


@dataclass
class LoopStart:
    """Where the loop begins: the first layer to calibrate and its input streams."""

    first: int
    streams: LayerStreams


class LayerCallback:
    """No-op hooks; a callback overrides the ones it needs."""

    def resume(self, start: LoopStart, layers: Any, result: Any) -> LoopStart:
        """Before the first layer: layers finished earlier may be put back (into `layers`, a layer source,
        and `result`, the CalibrationResult), moving the start past them."""
        return start

    def layer_starting(self, index: int, streams: LayerStreams) -> None:
        """Layer `index` is about to be calibrated on `streams`."""

    def layer_finished(self, finished: FinishedLayer) -> None:
        """Layer `finished.index` is calibrated; the loop has recorded it in the result."""


class InputsWatcher(LayerCallback):
    """Calls `see(index, inputs)` with the quantized-path inputs of every layer before it is calibrated."""

    def __init__(self, see) -> None:
        self.see = see

    def layer_starting(self, index: int, streams: LayerStreams) -> None:
        self.see(index, streams.quantized)


__all__ = ["FinishedLayer", "InputsWatcher", "LayerCallback", "LoopStart"]
