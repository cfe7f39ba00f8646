"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): ViT with 2x2 patch merger, Qwen2 decoder with M-RoPE.

Layer 0's inputs (3-D M-RoPE position ids, rotary cos/sin, causal mask) are captured from the model's
own forward, so the adapter only says where the decoder is.
"""

from tlq.models.base import QWEN2_BLOCKS, QWEN2_LINEAR_GROUPS, QWEN2_SCALING_GROUPS, ModelAdapter

ADAPTER = ModelAdapter(
    family="qwen2_vl",
    model_types=("qwen2_vl",),
    decoder_layers="model.language_model.layers",
    linear_groups=QWEN2_LINEAR_GROUPS,
    scaling_groups=QWEN2_SCALING_GROUPS,
    blocks=QWEN2_BLOCKS,
)
