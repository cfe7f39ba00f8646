"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): SigLIP tower, MLP projector, Qwen2 decoder."""

from tlq.models.base import qwen2_style

ADAPTER = qwen2_style("llava_onevision", ("llava_onevision",))
