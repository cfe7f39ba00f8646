"""RTN: min-max round-to-nearest per group. Needs no calibration data."""

from __future__ import annotations

from tlq.quant.base import LinearSolver, register
from tlq.quant.primitives import QuantizedWeight, fake_quant_weight


@register("rtn")
class RTN(LinearSolver):
    needs_inputs = False

    def solve(self) -> QuantizedWeight:
        return fake_quant_weight(self.weight, self.scheme)
