"""InternVL 3 in transformers' own class (`InternVLForConditionalGeneration`, the `-hf` checkpoints):
InternViT, pixel-shuffle MLP projector, Qwen2 decoder."""

from tlq.models.base import QWEN2_BLOCKS, QWEN2_LINEAR_GROUPS, QWEN2_SCALING_GROUPS, ModelAdapter

ADAPTER = ModelAdapter(
    family="internvl",
    model_types=("internvl",),
    decoder_layers="model.language_model.layers",
    linear_groups=QWEN2_LINEAR_GROUPS,
    scaling_groups=QWEN2_SCALING_GROUPS,
    blocks=QWEN2_BLOCKS,
)
