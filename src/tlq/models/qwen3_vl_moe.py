"""Qwen3-VL-MoE (`Qwen3VLMoeForConditionalGeneration`, e.g. Qwen3-VL-30B-A3B): Qwen3-VL's tower and
DeepStack, and a decoder whose MLP is a block of routed experts (top-k of E, softmax router).

transformers 5 keeps the experts as fused 3-D parameters; tlq.models.moe turns them into one small MLP of
Linears per expert after loading, so each expert is calibrated on the tokens routed to it. The router
(`mlp.gate`) stays FP and is listed in `ignore` (vLLM builds it as a Linear).
"""

from tlq.models.base import MOE_SCALING_GROUPS, qwen2_style
from tlq.models.moe import ExpertLayout

ADAPTER = qwen2_style(
    "qwen3_vl_moe", ("qwen3_vl_moe",),
    layer_injections=("model.language_model", "visual_pos_masks", "deepstack_visual_embeds"),
    scaling_groups=MOE_SCALING_GROUPS, kept_fp=("mlp.gate",), video_token_config_key="video_token_id",
    experts=ExpertLayout(module="mlp.experts", block_class="Qwen3VLMoeTextSparseMoeBlock",
                         transformers_module="transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe"))
