"""What a model adapter describes: structure only, no behaviour.

Every supported VLM family runs a Qwen2-style decoder (pre-norm attention + gated MLP), so an adapter
is a short table: where the decoder layers are, the Linear groups in solve order, the scaling groups
(the module whose output feeds a set of Linears, for scale search and smoothing), and which input ids
mark image tokens. Modules are found by structure (the decoder layer list), never by name patterns, so
a vision tower can never be quantized by accident.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Token kinds, stored per position with each calibration sample.
PROMPT, IMAGE, ANSWER = 0, 1, 2
TOKEN_KIND_NAMES = ("prompt", "image", "answer")


@dataclass(frozen=True)
class ScalingGroup:
    """`source` (a norm or a Linear inside the layer) feeds exactly the Linears in `targets`."""

    source: str
    targets: tuple[str, ...]


@dataclass(frozen=True)
class ModelAdapter:
    family: str
    model_types: tuple[str, ...]
    decoder_layers: str
    linear_groups: tuple[tuple[str, ...], ...]
    scaling_groups: tuple[ScalingGroup, ...]
    image_token_config_key: str = "image_token_id"
    # The language-model head after the last decoder layer (the streamed importance backward starts there).
    final_norm: str = "model.language_model.norm"
    lm_head: str = "lm_head"
    # Linears whose inputs a tensor-parallel engine splits over the ranks (vLLM's RowParallelLinear).
    row_parallel: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.linear_groups for name in group)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.decoder_layers)

    def quantized_linear_names(self, model: nn.Module) -> list[str]:
        """Full module names of every Linear that tlq quantizes, in layer and solve order."""
        return [f"{self.decoder_layers}.{i}.{name}" for i in range(len(self.layers(model))) for name in self.linear_names]

    def image_token_id(self, model: nn.Module) -> int:
        value = getattr(model.config, self.image_token_config_key, None)
        if value is None:
            raise ValueError(f"config has no {self.image_token_config_key}")
        return int(value)

    def token_kinds(self, model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per position: IMAGE for image placeholder tokens, ANSWER where a label is set, else PROMPT."""
        kinds = torch.full_like(input_ids, PROMPT, dtype=torch.uint8)
        kinds[labels != -100] = ANSWER
        kinds[input_ids == self.image_token_id(model)] = IMAGE
        return kinds


# The decoder block shared by Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision (Qwen2 language model).
QWEN2_LINEAR_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
QWEN2_SCALING_GROUPS = (
    ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",)),  # used only when the shapes match (no GQA)
    ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScalingGroup("mlp.up_proj", ("mlp.down_proj",)),
)
