"""A word-level tokenizer and chat template for tlq's own small VLMs, built offline.

The special tokens are the ones the real families use (Qwen's <|im_start|>/<|im_end|> turns, its vision
markers, LLaVA's <image>), so the stock processors expand image placeholders exactly as for real models.
"""

from __future__ import annotations

from typing import Iterable

SPECIAL_TOKENS = (
    "<pad>", "<unk>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<image>", "<video>",
)
ROLE_WORDS = ("system", "user", "assistant")

# Qwen-style turns; `image_markup` is what one image becomes in the text before the processor expands it.
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}IMAGE_MARKUP{% elif part['type'] == 'video' %}VIDEO_MARKUP"
    "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_MARKUP = {"qwen": "<|vision_start|><|image_pad|><|vision_end|>", "llava": "<image>", "idefics": "<image>",
                "pixtral": "[IMG]", "internvl": "<IMG_CONTEXT>", "gemma": "<start_of_image>"}

# Each family's own image markers, added after the shared vocabulary (so the older styles keep their ids),
# and the named ones its processor reads from the tokenizer (`tokenizer.boi_token`, ...).
STYLE_TOKENS = {
    "idefics": ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>"),
    "pixtral": ("[IMG]", "[IMG_BREAK]", "[IMG_END]"),
    "internvl": ("<img>", "</img>", "<IMG_CONTEXT>"),
    # Gemma's processor puts "\n\n" around each image, and vLLM's looks up the newline runs as tokens.
    "gemma": ("<start_of_image>", "<end_of_image>", "<image_soft_token>", "\n", "\n\n", "\n\n\n", "\n\n\n\n"),
}
NAMED_TOKENS = {
    "internvl": {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                 "video_token": "<video>"},
    "gemma": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
}


# What one video becomes, for the families tlq calibrates on videos (the others' templates write nothing).
VIDEO_MARKUP = {"qwen": "<|vision_start|><|video_pad|><|vision_end|>"}


def chat_template(style: str) -> str:
    return _CHAT_TEMPLATE.replace("IMAGE_MARKUP", IMAGE_MARKUP[style]).replace("VIDEO_MARKUP", VIDEO_MARKUP.get(style, ""))


def build_tokenizer(words: Iterable[str], style: str):
    """A PreTrainedTokenizerFast over `words` (split on whitespace and punctuation) plus the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    extra = STYLE_TOKENS.get(style, ())
    for token in (*SPECIAL_TOKENS, *ROLE_WORDS, *words, *extra):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>",
        additional_special_tokens=list(SPECIAL_TOKENS[2:]) + list(extra), **NAMED_TOKENS.get(style, {}),
    )
    tokenizer.chat_template = chat_template(style)
    return tokenizer
