"""What a model adapter describes: structure only, no behaviour.

Every supported VLM family runs a Qwen2-style decoder (pre-norm attention + gated MLP), so an adapter
is a short table: where the decoder layers are, the Linear groups in solve order, the scaling groups
(the module whose output feeds a set of Linears, for scale search and smoothing), and which input ids
mark image tokens. Modules are found by structure (the decoder layer list), never by name patterns, so
a vision tower can never be quantized by accident.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from tlq.models.moe import ExpertLayout

# Token kinds, stored per position with each calibration sample.
PROMPT, IMAGE, ANSWER, VIDEO = 0, 1, 2, 3
TOKEN_KIND_NAMES = ("prompt", "image", "answer", "video")


@dataclass(frozen=True)
class Block:
    """A part of the decoder layer by role: its module, its Linears, and the Linear whose output is the
    block's output (MBQ reads the gradient there; reports and scale searches name blocks through it)."""

    role: str  # "attention" | "mlp"
    module: str
    linears: tuple[str, ...]
    output: str | tuple[str, ...]  # several: an MoE block's output is the routed sum of its experts' outputs

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.output if isinstance(self.output, tuple) else (self.output,)


@dataclass(frozen=True)
class ScalingGroup:
    """`source` (a norm or a Linear inside the layer) feeds exactly the Linears in `targets`.

    A scale search scores each candidate by the output of `block`, the module the targets belong to
    (the attention for q,k,v; the MLP for gate,up; the Linear itself for o and down), as the AWQ paper
    does: an error in q or k matters only through what the attention makes of it. `output_linear` is
    the Linear whose output is the block's output (the block itself where that is no single Linear's: an MoE
    block's routed sum); its token weights weight the block's error.
    `mixes_tokens` says that the block combines tokens (attention), so it runs on whole samples with
    their own keyword arguments; a token-wise block (Linear, MLP) takes the targets' input as its only
    argument and runs on any subset of tokens.
    """

    source: str
    targets: tuple[str, ...]
    block: str
    output_linear: str
    mixes_tokens: bool = False
    # A norm source that multiplies by (offset + weight) (Gemma's RMSNorm: 1 + weight) folds 1/s as
    # weight -> (offset + weight) / s - offset.
    source_weight_offset: float = 0.0
    # Modules the source also feeds that stay FP (an MoE router): they take the same s into their input
    # columns, so the layer computes the same function, but are never quantized, scored or counted in the
    # weight statistics.
    folded_fp: tuple[str, ...] = ()
    # The module whose input is the group's input on every token, where the first target sees only some of
    # them (an MoE block's experts see their routed tokens; its router sees all). None: the first target.
    input_at: str | None = None
    # The block reads [batch, tokens, hidden] and nothing flatter (an MoE block): token-wise chunks are
    # handed to it as a batch of one.
    block_takes_batch: bool = False
    # The targets see only the tokens routed to them (an MoE expert): their input rows are those tokens, in
    # the order the expert received them, and each row's token weight is its token's (tlq.models.moe).
    routed: bool = False

    @property
    def folded(self) -> tuple[str, ...]:
        """Every module whose input columns take the scales when they are folded."""
        return self.targets + self.folded_fp


@dataclass(frozen=True)
class ModelAdapter:
    family: str
    model_types: tuple[str, ...]
    decoder_layers: str
    linear_groups: tuple[tuple[str, ...], ...]
    scaling_groups: tuple[ScalingGroup, ...]
    blocks: tuple[Block, ...]
    image_token_config_key: str = "image_token_id"
    # The config key of the video placeholder token, for families tlq calibrates on videos (frames); None: images only.
    video_token_config_key: str | None = None
    # The language-model head after the last decoder layer (the streamed importance backward starts there).
    final_norm: str = "model.language_model.norm"
    lm_head: str = "lm_head"
    # Linears whose inputs a tensor-parallel engine splits over the ranks (vLLM's RowParallelLinear).
    row_parallel: tuple[str, ...] = ("self_attn.o_proj", "mlp.down_proj")
    # Features the model adds to some decoder layers' outputs between layers (Qwen3-VL's DeepStack adds
    # visual features at the image positions after the first layers): the module whose call receives
    # them, and the names of its (positions mask, per-layer features) keyword arguments. They are
    # captured from the model's own forward with layer 0's inputs and replayed (tlq.activations).
    layer_injections: tuple[str, str, str] | None = None
    # Routed experts (MoE families): where they are; `bound_to(model)` spells out each expert's Linears.
    experts: ExpertLayout | None = None
    # Modules inside a decoder layer that stay FP but that a serving engine builds as Linears (an MoE
    # router): the export lists them in `ignore`.
    kept_fp: tuple[str, ...] = ()

    def bound_to(self, config) -> "ModelAdapter":
        """This adapter with every expert's Linears named (one solve group for all gate/up projections, one
        for all down projections); itself for dense families. Every decoder layer must be an MoE layer."""
        if self.experts is None:
            return self
        from tlq.errors import TlqError

        text = config.get_text_config()
        dense = list(getattr(text, "mlp_only_layers", None) or [])
        step = getattr(text, "decoder_sparse_step", 1)
        if dense or step != 1:
            raise TlqError(f"{self.family}: dense MLP layers among the MoE layers (mlp_only_layers={dense}, "
                           f"decoder_sparse_step={step}) are not supported yet: every decoder layer must be MoE")
        gate_up, down = self.experts.linear_groups(self.experts.count(config))
        attention = self.linear_groups[:2]
        block = self.experts.module.rpartition(".")[0]
        # The MoE block's norm feeds its router and every expert's gate and up projections: one scaling
        # group, scored on the whole block's output (routing included) and weighted by the importance of
        # that output; the router takes the scales unquantized, so the routing does not change.
        experts_group = ScalingGroup(self.experts.norm, gate_up, block=block, output_linear=block,
                                     folded_fp=self.kept_fp, input_at=self.kept_fp[0], block_takes_batch=True)
        return dataclasses.replace(
            self, linear_groups=attention + (gate_up, down),
            blocks=(self.blocks[0], Block("mlp", block, gate_up + down, output=down)),
            scaling_groups=self.scaling_groups + (experts_group,) + self.experts.down_groups(self.experts.count(config)),
            row_parallel=tuple(n for n in self.row_parallel if not n.startswith("mlp.")) + down,
            experts=self.experts)

    @property
    def scored_modules(self) -> tuple[str, ...]:
        """Modules whose output the gradient pass scores per token: every quantized Linear, and a scaling
        group's scored block where that is not one Linear (an MoE block's output is a routed sum)."""
        extra = tuple(dict.fromkeys(g.output_linear for g in self.scaling_groups
                                    if g.output_linear not in self.linear_names))
        return self.linear_names + extra

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(name for group in self.linear_groups for name in group)

    def block_of(self, linear: str) -> Block:
        """The block a decoder Linear (or the block itself, by its module name) belongs to."""
        for block in self.blocks:
            if linear in block.linears or linear == block.module:
                return block
        raise KeyError(f"{linear} is in no block of the {self.family} adapter")

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
        """Per position: IMAGE / VIDEO for image / video placeholder tokens, ANSWER where a label is set, else
        PROMPT."""
        kinds = torch.full_like(input_ids, PROMPT, dtype=torch.uint8)
        kinds[labels != -100] = ANSWER
        kinds[input_ids == self.image_token_id(model)] = IMAGE
        video = self.video_token_id(model)
        if video is not None:
            kinds[input_ids == video] = VIDEO
        return kinds

    def video_token_id(self, model: nn.Module) -> int | None:
        """The video placeholder token, where the family is calibrated on videos; else None."""
        if self.video_token_config_key is None:
            return None
        value = getattr(model.config, self.video_token_config_key, None)
        return None if value is None else int(value)


# The decoder block shared by Qwen2-VL, Qwen2.5-VL and LLaVA-OneVision (Qwen2 language model).
QWEN2_LINEAR_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
QWEN2_BLOCKS = (
    Block("attention", "self_attn", QWEN2_LINEAR_GROUPS[0] + QWEN2_LINEAR_GROUPS[1], output="self_attn.o_proj"),
    Block("mlp", "mlp", QWEN2_LINEAR_GROUPS[2] + QWEN2_LINEAR_GROUPS[3], output="mlp.down_proj"),
)
QWEN2_SCALING_GROUPS = (
    ScalingGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 block="self_attn", output_linear="self_attn.o_proj", mixes_tokens=True),
    # used only when the shapes match (no GQA)
    ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",), block="self_attn.o_proj", output_linear="self_attn.o_proj"),
    ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), block="mlp",
                 output_linear="mlp.down_proj"),
    ScalingGroup("mlp.up_proj", ("mlp.down_proj",), block="mlp.down_proj", output_linear="mlp.down_proj"),
)


# A decoder layer whose MLP is a block of routed experts: the attention's scaling groups here, and the MoE
# block's (norm -> router and every expert's gate/up) added once the expert count is known
# (ModelAdapter.bound_to). An expert's up -> down pair sees only its own tokens and is not rescaled (yet).
MOE_SCALING_GROUPS = QWEN2_SCALING_GROUPS[:2]


def qwen2_style(family: str, model_types: tuple[str, ...], **declared) -> ModelAdapter:
    """The adapter of a family whose decoder layer is Qwen2's (pre-norm attention with q/k/v/o, gated MLP):
    the shared tables, the decoder under `model.language_model`, and whatever the family declares apart."""
    tables = dict(decoder_layers="model.language_model.layers", linear_groups=QWEN2_LINEAR_GROUPS,
                  scaling_groups=QWEN2_SCALING_GROUPS, blocks=QWEN2_BLOCKS)
    return ModelAdapter(family=family, model_types=model_types, **{**tables, **declared})
