"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, v1.6): CLIP tower, MLP projector, anyres tiles with
image-newline tokens, and a Llama, Mistral or Qwen2 decoder: all have Qwen2's Linears."""

from tlq.models.base import QWEN2_BLOCKS, QWEN2_LINEAR_GROUPS, QWEN2_SCALING_GROUPS, ModelAdapter

ADAPTER = ModelAdapter(
    family="llava_next",
    model_types=("llava_next",),
    decoder_layers="model.language_model.layers",
    linear_groups=QWEN2_LINEAR_GROUPS,
    scaling_groups=QWEN2_SCALING_GROUPS,
    blocks=QWEN2_BLOCKS,
)
