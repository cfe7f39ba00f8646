"""InternVL 3 in transformers' own class (`InternVLForConditionalGeneration`, the `-hf` checkpoints):
InternViT, pixel-shuffle MLP projector, Qwen2 decoder."""

from tlq.models.base import qwen2_style

ADAPTER = qwen2_style("internvl", ("internvl",))
