"""The Python entry point: `tlq.quantize(model_dir, out_dir, calib=..., images=..., recipe=Recipe(...))`.

Validates everything the user gave before any heavy work (paths, scheme, model type, calibration file),
then loads, calibrates with the one layer loop, and exports atomically.
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tlq.activations import offload_activations
from tlq.data import Sample, build_samples, data_hash, load_records
from tlq.distributed import DEFAULT_TIMEOUT_S, SINGLE, Ranks, rank_device, ranks_from_environment, shutdown
from tlq.engine import CalibrationResult, quantize_layers
from tlq.errors import TlqError
from tlq.export import check_exportable, export_compressed, export_streamed
from tlq.models import adapter_for, load_model, read_model_type
from tlq.measure import peak_rss_bytes, release_freed_memory_promptly
from tlq.models.lazy import load_lazy
from tlq.models.processing import load_processor
from tlq.recipe import Recipe
from tlq.resume import WorkDir, work_dir_for


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


def build_token_weights(model, adapter, samples: list[Sample], recipe: Recipe, ranks: Ranks = SINGLE,
                        importance_file: Path | None = None, layers=None):
    """The per-token weights the recipe's method calibrates with (None = uniform), and a summary.

    TLQ and MBQ share one forward + backward pass of the FP model over the calibration samples (each
    rank over its shard; the scores of all samples are gathered, so the token-level set is chosen
    globally). The weights are looked up with this rank's sample numbers. With `importance_file` the
    pass is saved there (rank 0), or read back when a resumed run finds it.
    """
    from tlq.engine import resolve_device
    from tlq.importance import (GRADIENT_PASSES, TokenImportance, WeightingConfig, compute_importance, kept_tokens,
                                modality_ratios, modality_weights, token_weights)

    plan = recipe.plan()
    if plan.weighting == "uniform":
        if recipe.keep_ratio is not None or recipe.token_budget is not None:
            raise TlqError("a token budget selects tokens by importance: use it with --method tlq")
        return None, {"weighting": "uniform"}
    if importance_file is not None and importance_file.exists():
        importance = TokenImportance.load(importance_file)
    else:
        importance = compute_importance(model, adapter, samples, recipe.importance_score,
                                        resolve_device(recipe.device), streamed=GRADIENT_PASSES[recipe.importance_pass],
                                        ranks=ranks, layers=layers)
        if importance_file is not None and ranks.main:
            importance.save(importance_file)
    record: dict[str, Any] = {"weighting": plan.weighting, "fp_answer_loss": round(importance.loss, 5),
                              "gradient_pass": importance.gradient_pass,
                              "tokens_by_kind": importance.kept_summary()}
    if plan.weighting == "modality":
        ratios = modality_ratios(importance, adapter)
        record["image_weight_per_layer"] = {str(k): {p: round(v, 5) for p, v in r.items()} for k, r in ratios.items()}
        lookup = modality_weights(importance, adapter)
    else:
        config = WeightingConfig(floor=recipe.importance_floor, clip=recipe.importance_clip,
                                 keep_ratio=recipe.keep_ratio, token_budget=recipe.token_budget,
                                 min_share=recipe.min_kind_share)
        record["score"] = recipe.importance_score
        lookup = token_weights(importance, config)
        if recipe.keep_ratio is not None or recipe.token_budget is not None:
            last = len(adapter.layers(model)) - 1
            record["kept_tokens_by_kind"] = {
                f"{layer}.{name}": kept_tokens(importance, lookup, layer, name)
                for layer in (0, last) for name in ("self_attn.q_proj", "mlp.down_proj")}
    offset = ranks.shard(len(importance.token_kinds)).start
    if offset == 0:
        return lookup, record
    return (lambda layer, name, sample: lookup(layer, name, offset + sample)), record




def quantize(model_dir: str | Path, out_dir: str | Path, calib: str | Path, images: str | Path | None = None,
             recipe: Recipe | None = None, overwrite: bool = False, progress: bool = True,
             dtype: str = "auto", trust_remote_code: bool = False, ranks: Ranks | None = None,
             resume: bool = True, dist_timeout_s: float = DEFAULT_TIMEOUT_S, lazy: bool = False,
             offload_dir: str | Path | None = None) -> QuantizeReport:
    """Calibrate the decoder of the VLM in `model_dir` and write a compressed-tensors checkpoint to `out_dir`.

    Under torchrun (WORLD_SIZE > 1) the samples are sharded over the ranks and rank 0 writes the output.
    With `resume`, finished layers are kept in `OUT.tlq-work/` until the output is written (rank 0 removes them after writing), and the
    same call after a crash continues from there. With `lazy`, decoder layers are read from the
    checkpoint one at a time (host memory ~ one layer + activations) and the output is written layer by
    layer from the work directory.
    """
    start = time.perf_counter()
    recipe = recipe or Recipe()
    scheme = recipe.resolved_scheme()
    adapter = adapter_for(read_model_type(model_dir))
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise TlqError(f"output {out_dir} already exists: remove it or pass --overwrite")
    records = load_records(calib, images, recipe.num_samples, recipe.seed)
    ranks = ranks or ranks_from_environment(recipe.device, dist_timeout_s)
    if len(records) < ranks.size:
        raise TlqError(f"{len(records)} calibration samples for {ranks.size} ranks: use more samples or fewer ranks")
    recipe = dataclasses.replace(recipe, device=rank_device(ranks, recipe.device))
    layers = None
    if lazy:
        if not resume:
            raise TlqError("--lazy keeps the calibrated layers in OUT.tlq-work/: drop --no-resume")
        release_freed_memory_promptly()  # host memory is what --lazy is for
        model, adapter, layers = load_lazy(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        check_exportable(model, adapter, scheme, layers.empty_layer(0))
    else:
        model, adapter = load_model(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        check_exportable(model, adapter, scheme)
    processor = load_processor(model_dir, trust_remote_code=trust_remote_code)
    shard = ranks.shard(len(records))
    samples = prepare_samples(model, adapter, processor, calib, images, recipe, records=records[shard.start:shard.stop])
    work = None
    if resume:
        fingerprint = {"recipe": {k: v for k, v in recipe.to_dict().items() if k != "device"},
                       "model": str(Path(model_dir).resolve()), "data_sha256": data_hash(records),
                       "ranks": ranks.size, "dtype": dtype, "tlq": package_versions()["tlq"]}
        work = WorkDir(work_dir_for(out_dir), fingerprint, ranks)
        work.open()
    spill = None if offload_dir is None else Path(offload_dir) / f"rank{ranks.rank}"
    with offload_activations(spill):
        importance_start = time.perf_counter()
        weights, weighting_record = build_token_weights(model, adapter, samples, recipe, ranks,
                                                        work.importance_path if work is not None else None, layers)
        importance_seconds = time.perf_counter() - importance_start
        calibration = quantize_layers(model, adapter, samples, recipe, token_weights=weights, progress=progress,
                                      ranks=ranks, work=work, layers=layers)
    calibration.seconds += importance_seconds
    local_tokens = sum(s.num_tokens for s in samples)
    num_tokens = int(ranks.sum(torch.tensor(local_tokens)))
    per_rank = ranks.gather_objects({
        "rank": ranks.rank, "samples": len(samples), "tokens": local_tokens,
        "activation_bytes": local_tokens * model.config.get_text_config().hidden_size
        * next(model.parameters()).element_size(),
        "peak_host_memory_bytes": peak_rss_bytes(),  # VmHWM: not inherited from a launcher
        "peak_device_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    })
    record: dict[str, Any] = {
        "recipe": recipe.to_dict(),
        "scheme": scheme.to_dict(),
        "model_type": model.config.model_type,
        "source_model": str(Path(model_dir).resolve()),
        "calibration": {"file": str(calib), "num_samples": len(records), "num_tokens": num_tokens,
                        "data_sha256": data_hash(records)},
        "layer_relative_error": [round(r.relative_error, 6) for r in calibration.layers],
        "resumed_layers": sum(r.resumed for r in calibration.layers),
        "rescaled_groups": [r.rescaled for r in calibration.layers if r.rescaled],
        "token_weighting": weighting_record,
        "calibration_seconds": round(calibration.seconds, 3),
        "peak_device_memory_bytes": per_rank[0]["peak_device_memory_bytes"],
        "ranks": per_rank,
        "versions": package_versions(),
    }
    # Only rank 0 writes. The process group ends first: compressed-tensors switches to a collective
    # compression path whenever torch.distributed is initialised.
    ranks.barrier()
    shutdown(ranks)
    if ranks.main and layers is not None:
        def layer_state(index: int):
            state, grids, _ = work.layer_state(index)
            prefix = f"{adapter.decoder_layers}.{index}."
            return state, {name[len(prefix):]: q for name, q in grids.items()}

        export_streamed(model, adapter, scheme, layers, layer_state, out_dir, model_dir, record, overwrite)
    elif ranks.main:
        export_compressed(model, adapter, scheme, calibration.quantized, out_dir, source_dir=model_dir,
                          recipe_record=record, overwrite=overwrite)
    if ranks.main and work is not None:
        shutil.rmtree(work.path, ignore_errors=True)
    return QuantizeReport(out_dir=out_dir, calibration=calibration, num_samples=len(records),
                          num_tokens=num_tokens, seconds=time.perf_counter() - start)
