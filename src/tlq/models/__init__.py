"""Model adapters (one short file per family) and loading of local checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

from tlq.errors import TlqError
from tlq.models import llava_onevision, qwen2_5_vl, qwen2_vl
from tlq.models.base import ANSWER, IMAGE, PROMPT, TOKEN_KIND_NAMES, ModelAdapter, ScalingGroup

ADAPTERS: dict[str, ModelAdapter] = {
    model_type: module.ADAPTER
    for module in (qwen2_vl, qwen2_5_vl, llava_onevision)
    for model_type in module.ADAPTER.model_types
}
SUPPORTED_MODEL_TYPES = tuple(sorted(ADAPTERS))


def read_model_type(model_dir: str | Path) -> str:
    """The `model_type` of a local checkpoint directory, with a one-line error for every bad case."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise TlqError(f"model directory {model_dir} does not exist: pass a local Hugging Face checkpoint folder")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise TlqError(f"{model_dir} has no config.json: pass a Hugging Face checkpoint folder (config + safetensors)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TlqError(f"cannot read {config_path}: {exc}") from None
    return str(config.get("model_type", ""))


def adapter_for(model_type: str) -> ModelAdapter:
    if model_type not in ADAPTERS:
        raise TlqError(
            f"unsupported architecture {model_type!r}: tlq supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return ADAPTERS[model_type]


def load_model(model_dir: str | Path, dtype: str = "auto", trust_remote_code: bool = False):
    """Load a supported VLM from a local directory (never from a hub) with its adapter."""
    adapter = adapter_for(read_model_type(model_dir))
    from transformers import AutoModelForImageTextToText

    import torch

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            str(model_dir), dtype=torch_dtype, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise TlqError(f"cannot load the model in {model_dir}: {str(exc).splitlines()[0]}") from None
    model.eval()
    model.requires_grad_(False)
    return model, adapter


__all__ = [
    "ADAPTERS", "ANSWER", "IMAGE", "PROMPT", "SUPPORTED_MODEL_TYPES", "TOKEN_KIND_NAMES", "ModelAdapter",
    "ScalingGroup", "adapter_for", "load_model", "read_model_type",
]
