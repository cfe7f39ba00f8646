"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): SigLIP tower, MLP projector, Qwen2 decoder."""

from tlq.models.base import QWEN2_BLOCKS, QWEN2_LINEAR_GROUPS, QWEN2_SCALING_GROUPS, ModelAdapter

ADAPTER = ModelAdapter(
    family="llava_onevision",
    model_types=("llava_onevision",),
    decoder_layers="model.language_model.layers",
    linear_groups=QWEN2_LINEAR_GROUPS,
    scaling_groups=QWEN2_SCALING_GROUPS,
    blocks=QWEN2_BLOCKS,
)
