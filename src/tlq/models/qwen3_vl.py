"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): ViT with DeepStack, Qwen3 decoder (q/k norms) with
interleaved M-RoPE.

DeepStack adds visual features from several ViT depths to the hidden states at the image positions after
the first decoder layers (`Qwen3VLTextModel._deepstack_process`). The layer loop replays them: they are
captured from the model's own forward, with layer 0's inputs, and added to each such layer's output
before it becomes the next layer's input. The decoder's Linears are Qwen2's.
"""

from tlq.models.base import qwen2_style

ADAPTER = qwen2_style("qwen3_vl", ("qwen3_vl",),
                      layer_injections=("model.language_model", "visual_pos_masks", "deepstack_visual_embeds"),
                      video_token_config_key="video_token_id")
