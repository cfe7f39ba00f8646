"""Mistral 3 (`Mistral3ForConditionalGeneration`, Mistral-Small-3.1/3.2): Pixtral tower, patch merger and
projector, Mistral decoder (Qwen2's Linears)."""

from tlq.models.base import QWEN2_BLOCKS, QWEN2_LINEAR_GROUPS, QWEN2_SCALING_GROUPS, ModelAdapter

ADAPTER = ModelAdapter(
    family="mistral3",
    model_types=("mistral3",),
    decoder_layers="model.language_model.layers",
    linear_groups=QWEN2_LINEAR_GROUPS,
    scaling_groups=QWEN2_SCALING_GROUPS,
    blocks=QWEN2_BLOCKS,
)
