"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, v1.6): CLIP tower, MLP projector, anyres tiles with
image-newline tokens, and a Llama, Mistral or Qwen2 decoder: all have Qwen2's Linears."""

from tlq.models.base import qwen2_style

ADAPTER = qwen2_style("llava_next", ("llava_next",))
