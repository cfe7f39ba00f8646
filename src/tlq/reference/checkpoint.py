"""Build real Hugging Face checkpoint folders of each supported family, at any (small) size.

Used by the tests (tiny random models), by `tlq demo` before training, and by the reference-model
trainer: config + safetensors + tokenizer + processor + chat template, loadable offline with
`AutoModelForImageTextToText` and `AutoProcessor` (or tlq's no-torchvision processor fallback).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from tlq.models.processing import save_processor, videoless_processor
from tlq.reference.tokenizer import build_tokenizer

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision")


@dataclass(frozen=True)
class ModelSize:
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vision_hidden: int = 32
    vision_layers: int = 1
    vision_heads: int = 2
    patch: int = 8
    image_size: int = 32  # pixels per side the processor resizes every image to


def _text_config(size: ModelSize, vocab_size: int, **extra) -> dict:
    return dict(hidden_size=size.hidden, intermediate_size=size.intermediate, num_hidden_layers=size.layers,
                num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, vocab_size=vocab_size,
                max_position_embeddings=4096, bos_token_id=None, tie_word_embeddings=False, **extra)


def build_model_and_processor(family: str, words: Iterable[str], size: ModelSize = ModelSize(), seed: int = 0):
    """A randomly initialised model of `family` and its processor (not saved)."""
    import transformers as tf
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    style = "llava" if family == "llava_onevision" else "qwen"
    tokenizer = build_tokenizer(words, style)
    ids = tokenizer.convert_tokens_to_ids
    vocab_size = len(tokenizer)
    eos, pad = ids("<|im_end|>"), ids("<pad>")
    torch.manual_seed(seed)
    if family == "llava_onevision":
        pixels = size.image_size
        config = tf.LlavaOnevisionConfig(
            text_config=dict(model_type="qwen2", eos_token_id=eos, pad_token_id=pad,
                             **_text_config(size, vocab_size)),
            vision_config=dict(model_type="siglip_vision_model", hidden_size=size.vision_hidden,
                               intermediate_size=2 * size.vision_hidden, num_hidden_layers=size.vision_layers,
                               num_attention_heads=size.vision_heads, image_size=pixels, patch_size=size.patch),
            image_token_id=ids("<image>"), video_token_id=ids("<video>"), vision_feature_select_strategy="full",
            vision_feature_layer=-1, image_grid_pinpoints=[[pixels, pixels]], vision_aspect_ratio="anyres_max_1",
            tie_word_embeddings=False,
        )
        model = tf.LlavaOnevisionForConditionalGeneration(config)
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": pixels, "width": pixels}, crop_size={"height": pixels, "width": pixels},
            image_grid_pinpoints=[[pixels, pixels]])
        processor = videoless_processor(
            tf.LlavaOnevisionProcessor, image_processor, tokenizer, chat_template=tokenizer.chat_template,
            num_image_tokens=(pixels // size.patch) ** 2, vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_1")
    else:
        half = size.hidden // size.heads // 2
        mrope = [half - 2 * (half // 3), half // 3, half // 3]
        text = _text_config(size, vocab_size, eos_token_id=eos, pad_token_id=pad,
                            rope_scaling={"type": "mrope", "mrope_section": mrope})
        vision = dict(depth=size.vision_layers, num_heads=size.vision_heads, patch_size=size.patch,
                      spatial_merge_size=2, in_channels=3, temporal_patch_size=2)
        markers = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                       vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
        if family == "qwen2_vl":
            vision.update(embed_dim=size.vision_hidden, hidden_size=size.hidden, mlp_ratio=2)
            config = tf.Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **markers)
            model = tf.Qwen2VLForConditionalGeneration(config)
            processor_class = tf.Qwen2VLProcessor
        elif family == "qwen3_vl":
            # Qwen3 decoder (q/k norms, interleaved M-RoPE) and a ViT whose DeepStack mergers feed the first
            # decoder layers: one per ViT layer here, so every tiny model exercises the replay.
            text.update(head_dim=size.hidden // size.heads,
                        rope_scaling={"rope_type": "default", "mrope_section": mrope, "mrope_interleaved": True})
            vision.update(hidden_size=size.vision_hidden, out_hidden_size=size.hidden,
                          intermediate_size=2 * size.vision_hidden, num_position_embeddings=64,
                          deepstack_visual_indexes=list(range(min(size.vision_layers + 1, size.layers))))
            if size.vision_layers < 2:
                vision.update(depth=2)
            config = tf.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **markers)
            model = tf.Qwen3VLForConditionalGeneration(config)
            processor_class = tf.Qwen3VLProcessor
        else:
            vision.update(hidden_size=size.vision_hidden, out_hidden_size=size.hidden,
                          intermediate_size=2 * size.vision_hidden, window_size=4 * size.patch,
                          fullatt_block_indexes=[size.vision_layers - 1])
            config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                                         **markers)
            model = tf.Qwen2_5_VLForConditionalGeneration(config)
            processor_class = tf.Qwen2_5_VLProcessor
        # Native dynamic resolution, as in real Qwen2-VL: an image keeps its size (one token per
        # 2x2 patches) between a 2x2-token minimum and image_size^2 pixels.
        token_side = 2 * size.patch
        image_processor = Qwen2VLImageProcessorPil(patch_size=size.patch, merge_size=2, temporal_patch_size=2,
                                                   min_pixels=4 * token_side * token_side,
                                                   max_pixels=size.image_size * size.image_size)
        processor = videoless_processor(processor_class, image_processor, tokenizer,
                                        chat_template=tokenizer.chat_template)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = None
    model.eval()
    return model, processor


# transformers 5 saves some towers under its own module names, which real hub checkpoints (and vLLM's
# loaders) do not use: LLaVA-OneVision's SigLIP tower is stored as `vision_tower.vision_model.*` on the
# hub. The reference checkpoints are written the way the hub writes them, so what tlq reads and writes
# here is what it meets in the wild.
HUB_NAMES = {"llava_onevision": ((r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),)}


def save_checkpoint(model, processor, out_dir: str | Path) -> Path:
    """save_pretrained with hub tensor names and a complete processor config."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    save_processor(processor, out_dir)
    _rename_tensors(out_dir, HUB_NAMES.get(model.config.model_type, ()))
    return out_dir


def _rename_tensors(folder: Path, renames) -> None:
    import json
    import re

    from safetensors.torch import load_file, save_file

    if not renames:
        return
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    mapping = {}
    for name in files:
        tensors = load_file(str(folder / name))
        renamed = {}
        for key, value in tensors.items():
            new = key
            for pattern, replacement in renames:
                new = re.sub(pattern, replacement, new)
            renamed[new] = value
            mapping[key] = new
        save_file(renamed, str(folder / name), metadata={"format": "pt"})
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {mapping.get(k, k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def build_tiny_checkpoint(family: str, out_dir: str | Path, words: Iterable[str] = (), size: ModelSize = ModelSize(),
                          seed: int = 0) -> Path:
    """Write a randomly initialised checkpoint of `family` to `out_dir`."""
    model, processor = build_model_and_processor(family, words, size, seed)
    return save_checkpoint(model, processor, out_dir)
