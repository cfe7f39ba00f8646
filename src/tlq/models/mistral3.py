"""Mistral 3 (`Mistral3ForConditionalGeneration`, Mistral-Small-3.1/3.2): Pixtral tower, patch merger and
projector, Mistral decoder (Qwen2's Linears)."""

from tlq.models.base import qwen2_style

ADAPTER = qwen2_style("mistral3", ("mistral3",))
