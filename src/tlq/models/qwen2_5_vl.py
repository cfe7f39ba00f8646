"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): windowed-attention ViT, Qwen2 decoder with M-RoPE."""

from tlq.models.base import qwen2_style

ADAPTER = qwen2_style("qwen2_5_vl", ("qwen2_5_vl",), video_token_config_key="video_token_id")
