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

from tlq.models.processing import processor_class, save_processor, videoless_processor
from tlq.reference.tokenizer import build_tokenizer

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_onevision", "llava_next", "idefics3", "smolvlm",
            "mistral3", "internvl", "gemma3")


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
    # MoE families: routed experts per layer, experts per token, each expert's MLP width (not equal to
    # hidden or hidden / 2, so the fused tensors' stored orientation is unambiguous).
    experts: int = 8
    experts_per_token: int = 2
    expert_intermediate: int = 128


def _text_config(size: ModelSize, vocab_size: int, **extra) -> dict:
    return dict(hidden_size=size.hidden, intermediate_size=size.intermediate, num_hidden_layers=size.layers,
                num_attention_heads=size.heads, num_key_value_heads=size.kv_heads, vocab_size=vocab_size,
                max_position_embeddings=4096, bos_token_id=None, tie_word_embeddings=False, **extra)


def build_model_and_processor(family: str, words: Iterable[str], size: ModelSize = ModelSize(), seed: int = 0):
    """A randomly initialised model of `family` and its processor (not saved)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    style, build = _BUILDERS[family]
    tokenizer = build_tokenizer(words, style)
    ids = tokenizer.convert_tokens_to_ids
    eos, pad = ids("<|im_end|>"), ids("<pad>")
    torch.manual_seed(seed)
    model, processor = build(_Parts(size, tokenizer, ids, eos, pad))
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = None
    model.eval()
    return model, processor


@dataclass(frozen=True)
class _Parts:
    """What every family's builder starts from."""

    size: ModelSize
    tokenizer: object
    ids: object  # token -> id
    eos: int
    pad: int

    def text(self, model_type: str, **extra) -> dict:
        return dict(model_type=model_type, eos_token_id=self.eos, pad_token_id=self.pad,
                    **_text_config(self.size, len(self.tokenizer), **extra))

    def vision(self, model_type: str, **extra) -> dict:
        size = self.size
        return {**dict(model_type=model_type, hidden_size=size.vision_hidden, intermediate_size=2 * size.vision_hidden,
                       num_hidden_layers=size.vision_layers, num_attention_heads=size.vision_heads,
                       image_size=size.image_size, patch_size=size.patch), **extra}


def _llava_onevision(parts: _Parts):
    import transformers as tf
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    size, ids, pixels = parts.size, parts.ids, parts.size.image_size
    config = tf.LlavaOnevisionConfig(
        text_config=parts.text("qwen2"), vision_config=parts.vision("siglip_vision_model"),
        image_token_id=ids("<image>"), video_token_id=ids("<video>"), vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=[[pixels, pixels]], vision_aspect_ratio="anyres_max_1",
        tie_word_embeddings=False,
    )
    model = tf.LlavaOnevisionForConditionalGeneration(config)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": pixels, "width": pixels}, crop_size={"height": pixels, "width": pixels},
        image_grid_pinpoints=[[pixels, pixels]])
    processor = videoless_processor(
        tf.LlavaOnevisionProcessor, image_processor, parts.tokenizer, chat_template=parts.tokenizer.chat_template,
        num_image_tokens=(pixels // size.patch) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_1")
    return model, processor


def _qwen(family: str):
    def build(parts: _Parts):
        import transformers as tf
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        size, ids = parts.size, parts.ids
        half = size.hidden // size.heads // 2
        mrope = [half - 2 * (half // 3), half // 3, half // 3]
        text = _text_config(size, len(parts.tokenizer), eos_token_id=parts.eos, pad_token_id=parts.pad,
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
        elif family in ("qwen3_vl", "qwen3_vl_moe"):
            # Qwen3 decoder (q/k norms, interleaved M-RoPE) and a ViT whose DeepStack mergers feed the first
            # decoder layers: one per ViT layer here, so every tiny model exercises the replay.
            text.update(head_dim=size.hidden // size.heads,
                        rope_scaling={"rope_type": "default", "mrope_section": mrope, "mrope_interleaved": True})
            vision.update(hidden_size=size.vision_hidden, out_hidden_size=size.hidden,
                          intermediate_size=2 * size.vision_hidden, num_position_embeddings=64,
                          deepstack_visual_indexes=list(range(min(size.vision_layers + 1, size.layers))))
            if size.vision_layers < 2:
                vision.update(depth=2)
            if family == "qwen3_vl_moe":
                if size.expert_intermediate in (size.hidden, size.hidden // 2):
                    raise ValueError("expert_intermediate equal to hidden or hidden / 2 makes the stored expert "
                                     "tensors square: transformers could not tell their orientation")
                # norm_topk_prob: the hub configs carry it (vLLM reads it); transformers always renormalises.
                text.update(num_experts=size.experts, num_experts_per_tok=size.experts_per_token,
                            moe_intermediate_size=size.expert_intermediate, decoder_sparse_step=1,
                            norm_topk_prob=True)
                config = tf.Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                                             **markers)
                model = tf.Qwen3VLMoeForConditionalGeneration(config)
            else:
                config = tf.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                                          **markers)
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
        processor = videoless_processor(processor_class, image_processor, parts.tokenizer,
                                        chat_template=parts.tokenizer.chat_template)
        return model, processor

    return build


def _llava_next(parts: _Parts):
    """LLaVA-NeXT (v1.6): CLIP tower, anyres tiles + base image with newline tokens, Llama decoder."""
    import transformers as tf
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    pixels, patch = parts.size.image_size, parts.size.patch
    config = tf.LlavaNextConfig(
        text_config=parts.text("llama"), vision_config=parts.vision("clip_vision_model"),
        image_token_index=parts.ids("<image>"), vision_feature_select_strategy="default", vision_feature_layer=-1,
        image_grid_pinpoints=[[pixels, pixels]], image_seq_length=(pixels // patch) ** 2, tie_word_embeddings=False)
    model = tf.LlavaNextForConditionalGeneration(config)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": pixels},
                                                 crop_size={"height": pixels, "width": pixels},
                                                 image_grid_pinpoints=[[pixels, pixels]])
    processor = tf.LlavaNextProcessor(image_processor, parts.tokenizer, patch_size=patch,
                                      vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                      chat_template=parts.tokenizer.chat_template)
    return model, processor


def _idefics(family: str):
    """Idefics3 and SmolVLM: SigLIP-style tower, pixel-shuffle connector, Llama decoder (no image splitting)."""

    def build(parts: _Parts):
        import transformers as tf

        pixels, patch = parts.size.image_size, parts.size.patch
        image_seq_len = (pixels // patch) ** 2 // 4
        common = dict(text_config=parts.text("llama"), image_token_id=parts.ids("<image>"), scale_factor=2,
                      tie_word_embeddings=False)
        sizes = dict(do_image_splitting=False, size={"longest_edge": pixels}, max_image_size={"longest_edge": pixels})
        if family == "idefics3":
            from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

            config = tf.Idefics3Config(vision_config=parts.vision("idefics3_vision"), **common)
            model = tf.Idefics3ForConditionalGeneration(config)
            processor = tf.Idefics3Processor(Idefics3ImageProcessorPil(**sizes), parts.tokenizer,
                                             image_seq_len=image_seq_len, chat_template=parts.tokenizer.chat_template)
        else:
            from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

            config = tf.SmolVLMConfig(vision_config=parts.vision("smolvlm_vision"), **common)
            model = tf.SmolVLMForConditionalGeneration(config)
            processor = videoless_processor(tf.SmolVLMProcessor, SmolVLMImageProcessorPil(**sizes), parts.tokenizer,
                                            chat_template=parts.tokenizer.chat_template, image_seq_len=image_seq_len)
        return model, processor

    return build


def _mistral3(parts: _Parts):
    """Mistral 3 (Mistral-Small-3.1): Pixtral tower with [IMG_BREAK]/[IMG_END] rows, patch merger, Mistral decoder."""
    import transformers as tf
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    pixels, patch = parts.size.image_size, parts.size.patch
    vision = parts.vision("pixtral", head_dim=parts.size.vision_hidden // parts.size.vision_heads)
    config = tf.Mistral3Config(text_config=parts.text("mistral", head_dim=parts.size.hidden // parts.size.heads),
                               vision_config=vision, image_token_index=parts.ids("[IMG]"), spatial_merge_size=2,
                               vision_feature_layer=-1, tie_word_embeddings=False)
    model = tf.Mistral3ForConditionalGeneration(config)
    image_processor = PixtralImageProcessorPil(size={"longest_edge": pixels}, patch_size={"height": patch, "width": patch})
    processor = processor_class("PixtralProcessor")(image_processor, parts.tokenizer, patch_size=patch,
                                                    spatial_merge_size=2, chat_template=parts.tokenizer.chat_template)
    return model, processor


def _internvl(parts: _Parts):
    """InternVL 3 (transformers' class): InternViT, pixel-shuffle MLP projector, Qwen2 decoder (one tile)."""
    import transformers as tf
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    pixels, patch = parts.size.image_size, parts.size.patch
    image_seq_length = (pixels // patch) ** 2 // 4
    # Layer scale 1 (transformers' default 0.1 damps a random tower's layers to near-identity).
    vision = parts.vision("internvl_vision", image_size=[pixels, pixels], patch_size=[patch, patch],
                          layer_scale_init_value=1.0)
    config = tf.InternVLConfig(text_config=parts.text("qwen2"), vision_config=vision,
                               image_token_id=parts.ids("<IMG_CONTEXT>"), image_seq_length=image_seq_length,
                               downsample_ratio=0.5, vision_feature_layer=-1, tie_word_embeddings=False)
    model = tf.InternVLForConditionalGeneration(config)
    image_processor = GotOcr2ImageProcessorPil(size={"height": pixels, "width": pixels}, crop_to_patches=False)
    processor = videoless_processor(tf.InternVLProcessor, image_processor, parts.tokenizer,
                                    chat_template=parts.tokenizer.chat_template, image_seq_length=image_seq_length)
    return model, processor


def _gemma3(parts: _Parts):
    """Gemma 3: SigLIP tower, pooled projector, Gemma 3 decoder with sliding-window and global layers
    (the window is shorter than a sample here, so the two kinds really differ) and bidirectional
    attention over each image's tokens."""
    import transformers as tf
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    size, ids, pixels = parts.size, parts.ids, parts.size.image_size
    tokens_per_image = ((pixels // size.patch) // 2) ** 2
    kinds = ["sliding_attention", "full_attention"] * (size.layers // 2) + ["sliding_attention"] * (size.layers % 2)
    text = parts.text("gemma3_text", head_dim=size.hidden // size.heads, query_pre_attn_scalar=size.hidden // size.heads,
                      sliding_window=16, layer_types=kinds)
    config = tf.Gemma3Config(text_config=text, vision_config=parts.vision("siglip_vision_model"),
                             mm_tokens_per_image=tokens_per_image, boi_token_index=ids("<start_of_image>"),
                             eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"),
                             tie_word_embeddings=False)
    model = tf.Gemma3ForConditionalGeneration(config)
    # transformers initialises the projection to zeros: a random model would then never see its images (and
    # a serving check could not tell a wrongly loaded tower). A trained model's projection is dense.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=size.vision_hidden ** -0.5)
    image_processor = Gemma3ImageProcessorPil(size={"height": pixels, "width": pixels})
    processor = tf.Gemma3Processor(image_processor, parts.tokenizer, chat_template=parts.tokenizer.chat_template,
                                   image_seq_length=tokens_per_image)
    return model, processor


# family -> (tokenizer style, builder)
_BUILDERS = {
    "qwen2_vl": ("qwen", _qwen("qwen2_vl")),
    "qwen2_5_vl": ("qwen", _qwen("qwen2_5_vl")),
    "qwen3_vl": ("qwen", _qwen("qwen3_vl")),
    "qwen3_vl_moe": ("qwen", _qwen("qwen3_vl_moe")),
    "llava_onevision": ("llava", _llava_onevision),
    "llava_next": ("llava", _llava_next),
    "idefics3": ("idefics", _idefics("idefics3")),
    "smolvlm": ("idefics", _idefics("smolvlm")),
    "mistral3": ("pixtral", _mistral3),
    "internvl": ("internvl", _internvl),
    "gemma3": ("gemma", _gemma3),
}


# transformers 5 saves some towers under its own module names, which real hub checkpoints (and vLLM's
# loaders) do not use: LLaVA-OneVision's SigLIP tower is stored as `vision_tower.vision_model.*` on the
# hub (as are Gemma 3's SigLIP and LLaVA-NeXT's CLIP towers). The reference checkpoints are written the way
# the hub writes them, so what tlq reads and writes here is what it meets in the wild.
_SIGLIP_OR_CLIP_TOWER = ((r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),)
HUB_NAMES = {"llava_onevision": _SIGLIP_OR_CLIP_TOWER, "llava_next": _SIGLIP_OR_CLIP_TOWER, "gemma3": _SIGLIP_OR_CLIP_TOWER}
# Qwen3-VL-MoE's hub checkpoints store the fused experts as [E, H, 2I] and [E, I, H]; transformers 5 holds
# (and saves) them transposed and transposes hub tensors when it loads them. vLLM reads the hub layout.
HUB_TRANSPOSED = {"qwen3_vl_moe": r"\.mlp\.experts\.(gate_up|down)_proj$"}


def save_checkpoint(model, processor, out_dir: str | Path) -> Path:
    """save_pretrained with hub tensor names and a complete processor config."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    save_processor(processor, out_dir)
    model_type = model.config.model_type
    _rename_tensors(out_dir, HUB_NAMES.get(model_type, ()), HUB_TRANSPOSED.get(model_type))
    return out_dir


def _rename_tensors(folder: Path, renames, transposed: str | None = None) -> None:
    """Store tensors under hub names (`renames`: (pattern, replacement) pairs) and in hub orientation
    (`transposed`: a pattern of names whose last two dimensions are swapped)."""
    import json
    import re

    from safetensors.torch import load_file, save_file

    if not renames and not transposed:
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
            if transposed and re.search(transposed, key):
                value = value.transpose(-1, -2).contiguous()
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
