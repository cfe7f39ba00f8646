"""Idefics3 and SmolVLM (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`): SigLIP-style
tower, pixel-shuffle connector, Llama decoder under `model.text_model`."""

from tlq.models.base import qwen2_style

ADAPTER = qwen2_style("idefics3", ("idefics3", "smolvlm"),
                      decoder_layers="model.text_model.layers",
                      final_norm="model.text_model.norm")
