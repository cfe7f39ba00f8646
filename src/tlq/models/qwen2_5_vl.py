"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): windowed-attention ViT, Qwen2 decoder with M-RoPE."""

from tlq.models.base import QWEN2_BLOCKS, QWEN2_LINEAR_GROUPS, QWEN2_SCALING_GROUPS, ModelAdapter

ADAPTER = ModelAdapter(
    family="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    decoder_layers="model.language_model.layers",
    linear_groups=QWEN2_LINEAR_GROUPS,
    scaling_groups=QWEN2_SCALING_GROUPS,
    blocks=QWEN2_BLOCKS,
)
