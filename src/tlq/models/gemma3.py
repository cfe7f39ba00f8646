"""Gemma 3 (`Gemma3ForConditionalGeneration`): SigLIP tower, pooled projector, Gemma 3 decoder.

Its decoder differs from Qwen2's in what feeds the MLP: the attention output passes through its own norm
(`post_attention_layernorm`) into the residual, and `pre_feedforward_layernorm` feeds gate/up. Its
RMSNorms multiply by (1 + weight), so a scale folds in with that offset. Sliding-window and global layers
are called with different masks and rotary embeddings; tlq.activations captures and replays each kind's.
"""

from tlq.models.base import ScalingGroup, qwen2_style

GEMMA3_SCALING_GROUPS = (
    ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 block="self_attn", output_linear="self_attn.o_proj", mixes_tokens=True, source_weight_offset=1.0),
    ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",), block="self_attn.o_proj", output_linear="self_attn.o_proj"),
    ScalingGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), block="mlp",
                 output_linear="mlp.down_proj", source_weight_offset=1.0),
    ScalingGroup("mlp.up_proj", ("mlp.down_proj",), block="mlp.down_proj", output_linear="mlp.down_proj"),
)

ADAPTER = qwen2_style("gemma3", ("gemma3",), scaling_groups=GEMMA3_SCALING_GROUPS)
