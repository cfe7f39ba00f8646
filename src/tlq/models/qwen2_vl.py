"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): ViT with 2x2 patch merger, Qwen2 decoder with M-RoPE.

Layer 0's inputs (3-D M-RoPE position ids, rotary cos/sin, causal mask) are captured from the model's
own forward, so the adapter only says where the decoder is.
"""

from tlq.models.base import qwen2_style

ADAPTER = qwen2_style("qwen2_vl", ("qwen2_vl",), video_token_config_key="video_token_id")
