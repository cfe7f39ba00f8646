"""The Python entry point: `tlq.quantize(model_dir, out_dir, calib=..., images=..., recipe=Recipe(...))`.

Validates everything the user gave before any heavy work (paths, scheme, model type, calibration file),
then loads, calibrates with the one layer loop, and exports atomically.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tlq.data import Sample, build_samples, data_hash, load_records
from tlq.engine import CalibrationResult, quantize_layers
from tlq.errors import TlqError
from tlq.export import check_exportable, export_compressed
from tlq.models import adapter_for, load_model, read_model_type
from tlq.models.processing import load_processor
from tlq.recipe import Recipe


@dataclass
class QuantizeReport:
    out_dir: Path
    calibration: CalibrationResult
    num_samples: int
    num_tokens: int
    seconds: float


def package_versions() -> dict[str, str]:
    import compressed_tensors
    import transformers

    import tlq

    return {"tlq": tlq.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "compressed_tensors": compressed_tensors.__version__, "python": platform.python_version()}


def prepare_samples(model, adapter, processor, calib: str | Path, images: str | Path | None, recipe: Recipe,
                    records=None) -> list[Sample]:
    """Render the chosen calibration records and tag every token as image / prompt / answer."""
    records = records if records is not None else load_records(calib, images, recipe.num_samples, recipe.seed)
    samples = build_samples(records, processor, recipe.max_length)
    for sample in samples:
        sample.token_kinds = adapter.token_kinds(model, sample.inputs["input_ids"][0], sample.labels[0])
    return samples


def build_token_weights(model, adapter, samples: list[Sample], recipe: Recipe):
    """The per-token weights the recipe's method calibrates with (None = uniform), and a summary.

    TLQ and MBQ share one forward + backward pass of the FP model over the calibration samples.
    """
    from tlq.engine import resolve_device
    from tlq.importance import (WeightingConfig, compute_importance, kept_tokens, modality_ratios,
                                modality_weights, token_weights)

    plan = recipe.plan()
    if plan.weighting == "uniform":
        if recipe.keep_ratio is not None or recipe.token_budget is not None:
            raise TlqError("a token budget selects tokens by importance: use it with --method tlq")
        return None, {"weighting": "uniform"}
    importance = compute_importance(model, adapter, samples, recipe.importance_score, resolve_device(recipe.device))
    record: dict[str, Any] = {"weighting": plan.weighting, "fp_answer_loss": round(importance.loss, 5),
                              "tokens_by_kind": importance.kept_summary()}
    if plan.weighting == "modality":
        ratios = modality_ratios(importance, adapter)
        record["image_weight_per_layer"] = {str(k): {p: round(v, 5) for p, v in r.items()} for k, r in ratios.items()}
        return modality_weights(importance, adapter), record
    config = WeightingConfig(floor=recipe.importance_floor, clip=recipe.importance_clip, keep_ratio=recipe.keep_ratio,
                             token_budget=recipe.token_budget, min_share=recipe.min_kind_share)
    record["score"] = recipe.importance_score
    lookup = token_weights(importance, config)
    if recipe.keep_ratio is not None or recipe.token_budget is not None:
        last = len(adapter.layers(model)) - 1
        record["kept_tokens_by_kind"] = {
            f"{layer}.{name}": kept_tokens(importance, lookup, layer, name)
            for layer in (0, last) for name in ("self_attn.q_proj", "mlp.down_proj")}
    return lookup, record


def quantize(model_dir: str | Path, out_dir: str | Path, calib: str | Path, images: str | Path | None = None,
             recipe: Recipe | None = None, overwrite: bool = False, progress: bool = True,
             dtype: str = "auto", trust_remote_code: bool = False) -> QuantizeReport:
    """Calibrate the decoder of the VLM in `model_dir` and write a compressed-tensors checkpoint to `out_dir`."""
    start = time.perf_counter()
    recipe = recipe or Recipe()
    scheme = recipe.resolved_scheme()
    adapter = adapter_for(read_model_type(model_dir))
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise TlqError(f"output {out_dir} already exists: remove it or pass --overwrite")
    records = load_records(calib, images, recipe.num_samples, recipe.seed)
    model, adapter = load_model(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    check_exportable(model, adapter, scheme)
    processor = load_processor(model_dir, trust_remote_code=trust_remote_code)
    samples = prepare_samples(model, adapter, processor, calib, images, recipe, records=records)
    importance_start = time.perf_counter()
    weights, weighting_record = build_token_weights(model, adapter, samples, recipe)
    importance_seconds = time.perf_counter() - importance_start
    calibration = quantize_layers(model, adapter, samples, recipe, token_weights=weights, progress=progress)
    calibration.seconds += importance_seconds
    record: dict[str, Any] = {
        "recipe": recipe.to_dict(),
        "scheme": scheme.to_dict(),
        "model_type": model.config.model_type,
        "source_model": str(Path(model_dir).resolve()),
        "calibration": {"file": str(calib), "num_samples": len(samples),
                        "num_tokens": sum(s.num_tokens for s in samples), "data_sha256": data_hash(records)},
        "layer_relative_error": [round(r.relative_error, 6) for r in calibration.layers],
        "rescaled_groups": [r.rescaled for r in calibration.layers if r.rescaled],
        "token_weighting": weighting_record,
        "calibration_seconds": round(calibration.seconds, 3),
        "peak_device_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "versions": package_versions(),
    }
    export_compressed(model, adapter, scheme, calibration.quantized, out_dir, source_dir=model_dir,
                      recipe_record=record, overwrite=overwrite)
    return QuantizeReport(out_dir=out_dir, calibration=calibration, num_samples=len(samples),
                          num_tokens=record["calibration"]["num_tokens"], seconds=time.perf_counter() - start)
