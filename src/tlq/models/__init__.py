"""Model adapters (one short file per family) and loading of local checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

from tlq.errors import TlqError, one_line
from tlq.models import (gemma3, idefics3, internvl, llava_next, llava_onevision, mistral3, qwen2_5_vl, qwen2_vl,
                        qwen3_vl, qwen3_vl_moe)
from tlq.models.weights import check_finite_parameters, check_loading_info, check_weight_files
from tlq.models.base import ANSWER, IMAGE, PROMPT, TOKEN_KIND_NAMES, VIDEO, ModelAdapter, ScalingGroup

ADAPTERS: dict[str, ModelAdapter] = {
    model_type: module.ADAPTER
    for module in (qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe, llava_onevision, llava_next, idefics3, mistral3,
                   internvl, gemma3)
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
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0]
        raise TlqError(f"cannot read {config_path} ({reason}): restore the checkpoint's config.json") from None
    if not isinstance(config, dict):
        raise TlqError(f"{config_path} is a JSON {type(config).__name__}, not an object: restore the checkpoint's config.json")
    model_type = config.get("model_type", "")
    if not isinstance(model_type, str):
        raise TlqError(f"{config_path}: model_type is {model_type!r}, not a name: restore the checkpoint's config.json")
    return model_type


def adapter_for(model_type: str) -> ModelAdapter:
    if model_type not in ADAPTERS:
        raise TlqError(
            f"unsupported architecture {model_type!r}: tlq supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return ADAPTERS[model_type]


def load_model(model_dir: str | Path, dtype: str = "auto", trust_remote_code: bool = False):
    """Load a supported VLM from a local directory (never from a hub, never a pickle) with its adapter.

    The weight files are checked before transformers reads them, and the load must fill the model
    exactly: no tensor missing, none left over, every shape as config.json says (tlq.models.weights).
    """
    adapter = adapter_for(read_model_type(model_dir))
    check_weight_files(model_dir)
    model, info = from_pretrained_checked(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    check_loading_info(model_dir, info)
    check_finite_parameters(model, model_dir)
    adapter = with_expert_linears(model, adapter)
    model.eval()
    model.requires_grad_(False)
    return model, adapter


def with_expert_linears(model, adapter: ModelAdapter) -> ModelAdapter:
    """For an MoE family: the fused experts become one MLP of Linears per expert (tlq.models.moe) and the
    adapter names them; a dense family's model and adapter are returned as they are."""
    if adapter.experts is None:
        return adapter
    from tlq.models.moe import unfuse_experts

    bound = adapter.bound_to(model.config)  # refuses unsupported layouts before anything changes
    unfuse_experts(adapter.layers(model), adapter.experts)
    return bound


def from_pretrained_checked(model_dir: str | Path, dtype: str = "auto", trust_remote_code: bool = False,
                            config=None):
    """`AutoModelForImageTextToText.from_pretrained` of local safetensors, with its loading info; any
    failure of the files or config.json is one line."""
    import torch
    from transformers import AutoModelForImageTextToText

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    extra = {} if config is None else {"config": config}
    try:
        return AutoModelForImageTextToText.from_pretrained(
            str(model_dir), dtype=torch_dtype, local_files_only=True, trust_remote_code=trust_remote_code,
            use_safetensors=True, output_loading_info=True, ignore_mismatched_sizes=True, **extra)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - config validation, safetensors and torch raise many types
        raise TlqError(f"cannot load the model in {model_dir}: {one_line(exc)}") from None


def load_config(model_dir: str | Path, trust_remote_code: bool = False):
    """transformers' config of a local checkpoint, with a one-line error when config.json is inconsistent."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001
        raise TlqError(f"cannot read the config of {model_dir}: {one_line(exc)}") from None


__all__ = [
    "ADAPTERS", "ANSWER", "IMAGE", "PROMPT", "SUPPORTED_MODEL_TYPES", "TOKEN_KIND_NAMES", "VIDEO", "ModelAdapter",
    "ScalingGroup", "adapter_for", "from_pretrained_checked", "load_config", "load_model", "read_model_type",
    "with_expert_linears",
]
