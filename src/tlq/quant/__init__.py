"""Quantization primitives and calibration algorithms (each registers itself by name)."""

from tlq.quant import gptq, rtn  # noqa: F401  (registration)
from tlq.quant.base import LinearSolver, solver_factory
from tlq.quant.primitives import QuantizedWeight, fake_quant_activation, fake_quant_weight

__all__ = ["LinearSolver", "QuantizedWeight", "fake_quant_activation", "fake_quant_weight", "solver_factory"]
