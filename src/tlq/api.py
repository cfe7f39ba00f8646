"""The Python entry point: `tlq.quantize(model_dir, out_dir, calib=..., images=..., recipe=Recipe(...))`.

Validates everything the user gave before any heavy work (paths, scheme, model type, calibration file),
then loads, calibrates with the one layer loop, and exports atomically.
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tlq import faults
from tlq.activations import offload_activations, resolve_device
from tlq.data import Sample, build_samples, data_hash, load_records
from tlq.distributed import DEFAULT_TIMEOUT_S, SINGLE, Ranks, rank_device, ranks_from_environment, shutdown
from tlq.engine import CalibrationResult, check_recipe_fits, quantize_layers
from tlq.errors import RankFailure, TlqError
from tlq.export import check_exportable, export_compressed, export_streamed
from tlq.guards import check_disjoint, check_output_location, output_lock, remove_stale_siblings
from tlq.models import adapter_for, load_model, read_model_type
from tlq.models.weights import check_weight_files
from tlq.phases import PhaseClock
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
    check_videos_supported(adapter, records)
    samples = build_samples(records, processor, recipe.max_length)
    for sample in samples:
        sample.token_kinds = adapter.token_kinds(model, sample.inputs["input_ids"][0], sample.labels[0])
    return samples


def build_token_weights(model, adapter, samples: list[Sample], recipe: Recipe, ranks: Ranks = SINGLE,
                        work: WorkDir | None = None, layers=None):
    """The per-token weights the recipe's method calibrates with (None = uniform), and a summary.

    TLQ and MBQ share one forward + backward pass of the FP model over the calibration samples (each
    rank over its shard; the scores of all samples are gathered, so the token-level set is chosen
    globally). The weights are looked up with this rank's sample numbers. With a work directory the
    pass is kept there (rank 0 writes, every rank records its digest), or read back when a resumed run
    finds it whole.
    """
    from tlq.importance import GRADIENT_PASSES, compute_importance
    from tlq.weighting import WEIGHTINGS

    plan = recipe.plan()
    if plan.weighting == "uniform":
        return None, {"weighting": "uniform"}
    weighting = WEIGHTINGS.get(plan.weighting)
    importance = work.saved_importance() if work is not None else None
    if importance is None:
        importance = compute_importance(model, adapter, samples, recipe.importance_score,
                                        resolve_device(recipe.device), streamed=GRADIENT_PASSES[recipe.importance_pass],
                                        ranks=ranks, layers=layers)
        if work is not None:
            work.keep_importance(importance)
            faults.reached("importance-saved")
    lookup, details = weighting.build(importance, adapter, recipe,
                                      len(layers) if layers is not None else len(adapter.layers(model)))
    record: dict[str, Any] = {"weighting": plan.weighting, "fp_answer_loss": round(importance.loss, 5),
                              "gradient_pass": importance.gradient_pass,
                              "tokens_by_kind": importance.kept_summary(), **details}
    offset = ranks.shard(len(importance.token_kinds)).start
    if offset == 0:
        return lookup, record
    return (lambda layer, name, sample: lookup(layer, name, offset + sample)), record




@dataclass
class QuantizeJob:
    """Everything a quantize call was given, checked before any heavy work (tlq.guards for the paths)."""

    model_dir: Path
    out_dir: Path
    calib: Path
    images: Path | None
    recipe: Recipe
    scheme: Any
    records: list
    offload_dir: Path | None
    overwrite: bool


def check_videos_supported(adapter, records) -> None:
    """Refuse video records for a family tlq calibrates on images only, naming the ones with video."""
    video = next((r for r in records if r.videos), None)
    if video is not None and adapter.video_token_config_key is None:
        from tlq.models import ADAPTERS

        families = sorted({a.family for a in ADAPTERS.values() if a.video_token_config_key is not None})
        raise TlqError(f"record {video.line} has a video, but tlq calibrates {adapter.family} on images only "
                       f"(video calibration: {', '.join(families)}): drop the video records")


def check_job(model_dir, out_dir, calib, images, recipe: Recipe, overwrite: bool, offload_dir,
              confine_images: bool = True) -> QuantizeJob:
    """Every check that needs no model: options, device, paths, weight files, calibration records.

    The output (and its work folder) must not overlap any input, so `--overwrite` can only replace an
    earlier output; the weight files are parsed before transformers sees them.
    """
    scheme = recipe.resolved_scheme()
    check_recipe_fits(adapter_for(read_model_type(model_dir)), recipe.resolve())
    resolve_device(recipe.device)
    out_dir = Path(out_dir)
    check_output_location(out_dir)
    if offload_dir is not None and Path(offload_dir).exists() and not Path(offload_dir).is_dir():
        raise TlqError(f"--offload-dir {offload_dir} is a file: name a folder")
    inputs = {"the model folder": model_dir, "--calib": calib, "--images": images}
    outputs = {"--out": out_dir, "its work folder": work_dir_for(out_dir), "--offload-dir": offload_dir}
    check_disjoint(outputs, inputs)
    check_disjoint({"--out": out_dir}, {"--offload-dir": offload_dir})
    check_weight_files(model_dir)
    records = load_records(calib, images, recipe.num_samples, recipe.seed, confine=confine_images)
    check_disjoint(outputs, {f"calibration image {path}": path for r in records for path in r.files})
    check_videos_supported(adapter_for(read_model_type(model_dir)), records)
    return QuantizeJob(Path(model_dir), out_dir, Path(calib), None if images is None else Path(images), recipe,
                       scheme, records, None if offload_dir is None else Path(offload_dir), overwrite)


def quantize(model_dir: str | Path, out_dir: str | Path, calib: str | Path, images: str | Path | None = None,
             recipe: Recipe | None = None, overwrite: bool = False, progress: bool = True,
             dtype: str = "auto", trust_remote_code: bool = False, ranks: Ranks | None = None,
             resume: bool = True, dist_timeout_s: float = DEFAULT_TIMEOUT_S, lazy: bool = False,
             offload_dir: str | Path | None = None, confine_images: bool = True, tp: tuple[int, ...] = (),
             notify=None) -> QuantizeReport:
    """Calibrate the decoder of the VLM in `model_dir` and write a compressed-tensors checkpoint to `out_dir`.

    Under torchrun (WORLD_SIZE > 1) the samples are sharded over the ranks and rank 0 writes the output.
    With `resume`, finished layers are kept in `OUT.tlq-work/` until the output is written (rank 0
    removes them after writing), and the same call after a crash continues from there; a refusal
    (TlqError) removes a work folder this call created. With `lazy`, decoder layers are read from the
    checkpoint one at a time (host memory ~ one layer + activations) and the output is written layer by
    layer from the work directory. Image paths must lie under the image folder unless `confine_images`
    is off.
    """
    recipe = recipe or Recipe()
    if lazy and not resume:
        raise TlqError("--lazy keeps the calibrated layers in OUT.tlq-work/: drop --no-resume")
    job = check_job(model_dir, out_dir, calib, images, recipe, overwrite, offload_dir, confine_images)
    announce_serving(job, tp, notify)
    ranks = ranks or ranks_from_environment(recipe.device, dist_timeout_s)
    if len(job.records) < ranks.size:
        raise TlqError(f"{len(job.records)} calibration samples for {ranks.size} ranks: use more samples or fewer ranks")
    job.recipe = dataclasses.replace(recipe, device=rank_device(ranks, recipe.device))
    with output_lock(job.out_dir, enabled=ranks.main):
        if ranks.main:
            remove_stale_siblings(job.out_dir)
            _check_not_there(job.out_dir, job.overwrite)  # under the lock: a run may have finished meanwhile
        return _run(job, ranks, progress=progress, dtype=dtype, trust_remote_code=trust_remote_code,
                    resume=resume, lazy=lazy)


@dataclass
class Prepared:
    """What the named steps share after `prepare`: the model (without decoder layers when `layers` reads
    them lazily), its adapter, this rank's rendered samples."""

    model: Any
    adapter: Any
    samples: list[Sample]
    layers: Any = None  # tlq.models.lazy.LazyLayers, or None: the layers are resident in the model


def prepare(model_dir: Path, calib: Path, images: Path | None, records: list, recipe: Recipe, ranks: Ranks,
            clock: PhaseClock, dtype: str = "auto", trust_remote_code: bool = False,
            lazy: bool = False) -> Prepared:
    """Step 1 (shared by `tlq quantize` and `tlq importance`): load the model (eagerly, or its skeleton and
    lazy layers) and render this rank's shard of the records."""
    with clock("load"):
        if lazy:
            release_freed_memory_promptly()  # host memory is what --lazy is for
            model, adapter, layers = load_lazy(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        else:
            (model, adapter), layers = load_model(model_dir, dtype=dtype, trust_remote_code=trust_remote_code), None
        processor = load_processor(model_dir, trust_remote_code=trust_remote_code)
    shard = ranks.shard(len(records))
    with clock("samples"):
        samples = prepare_samples(model, adapter, processor, calib, images, recipe,
                                  records=records[shard.start:shard.stop])
    return Prepared(model, adapter, samples, layers)


def calibrate(job: QuantizeJob, prepared: Prepared, ranks: Ranks, clock: PhaseClock, work: WorkDir | None,
              progress: bool) -> tuple[CalibrationResult, dict[str, Any]]:
    """Step 2: the token weights of the method (the gradient pass for TLQ and MBQ), then the layer loop;
    returns the calibration and the run record (tlq_recipe.json)."""
    model, adapter, samples, layers = prepared.model, prepared.adapter, prepared.samples, prepared.layers
    with clock("importance"):
        weights, weighting_record = build_token_weights(model, adapter, samples, job.recipe, ranks, work, layers)
    calibration = quantize_layers(model, adapter, samples, job.recipe, token_weights=weights, progress=progress,
                                  ranks=ranks, layers=layers, callbacks=[work] if work is not None else [],
                                  release_sample_inputs=True)
    calibration.seconds += clock.seconds["importance"]
    clock.merge(calibration.phases)
    clock.peaks.update(calibration.rss_peaks)  # rises above the mark the loop started at
    record = _run_record(job, model, adapter, samples, calibration, weighting_record, ranks)
    # Seconds per phase (tlq.phases); `export` is filled in by the exporter just before it writes this.
    record["phase_seconds"] = {**clock.rounded(), "export": None}
    # The phases that raised the process's peak resident memory and the peak each left (MiB; the largest is
    # the run's peak; `export` is added by the exporter if writing raises it).
    record["phase_peak_rss_mib"] = clock.peaks_mib()
    return calibration, record


def _open_work(job: QuantizeJob, ranks: Ranks, dtype: str, resume: bool) -> WorkDir | None:
    if not resume:
        return None
    fingerprint = {"recipe": {k: v for k, v in job.recipe.to_dict().items() if k != "device"},
                   "model": str(job.model_dir.resolve()), "data_sha256": data_hash(job.records),
                   "ranks": ranks.size, "dtype": dtype, "tlq": package_versions()["tlq"]}
    return WorkDir(work_dir_for(job.out_dir), fingerprint, ranks)


def _run(job: QuantizeJob, ranks: Ranks, progress: bool, dtype: str, trust_remote_code: bool, resume: bool,
         lazy: bool) -> QuantizeReport:
    """prepare -> calibrate -> write (rank 0), with the work folder that makes it resumable."""
    start, clock = time.perf_counter(), PhaseClock()
    prepared = prepare(job.model_dir, job.calib, job.images, job.records, job.recipe, ranks, clock, dtype,
                       trust_remote_code, lazy)
    check_exportable(prepared.model, prepared.adapter, job.scheme,
                     prepared.layers.empty_layer(0) if prepared.layers is not None else None)
    work = _open_work(job, ranks, dtype, resume)
    with _removed_on_refusal(work, ranks), offload_folder(job.offload_dir, ranks) as spill, offload_activations(spill):
        if work is not None:
            work.open(len(prepared.layers) if prepared.layers is not None else
                      len(prepared.adapter.layers(prepared.model)))
        calibration, record = calibrate(job, prepared, ranks, clock, work, progress)
        # Only rank 0 writes. The process group ends first: compressed-tensors switches to a collective
        # compression path whenever torch.distributed is initialised.
        ranks.barrier()
        shutdown(ranks)
        if ranks.main:  # step 3: write
            _write_output(job, prepared.model, prepared.adapter, calibration, prepared.layers, work, record)
    return QuantizeReport(out_dir=job.out_dir, calibration=calibration, num_samples=len(job.records),
                          num_tokens=record["calibration"]["num_tokens"], seconds=time.perf_counter() - start)


def announce_serving(job: QuantizeJob, tp: tuple[int, ...], notify=None) -> None:
    """Say where the scheme runs and warn about engines that cannot run it; refuse a planned tensor-parallel
    size the group size does not divide (tlq.serving). Before any calibration."""
    from tlq.serving import check_tp, serving_lines, serving_shape

    in_features, row_parallel, experts = serving_shape(job.model_dir)
    check_tp(job.scheme, in_features, row_parallel, tuple(tp))
    line, warnings = serving_lines(job.scheme, in_features, row_parallel, experts)
    if notify is None:
        import logging

        logger = logging.getLogger("tlq")
        logger.info(line)
        for warning in warnings:
            logger.warning(warning)
        return
    notify(f"tlq: {line}", False)
    for warning in warnings:
        notify(f"tlq: warning: {warning}", True)


def _check_not_there(out_dir: Path, overwrite: bool) -> None:
    if (out_dir.exists() or out_dir.is_symlink()) and not overwrite:
        raise TlqError(f"output {out_dir} already exists: remove it or pass --overwrite")


@contextmanager
def _removed_on_refusal(work: WorkDir | None, ranks: Ranks):
    """A refusal (TlqError) is deterministic, so rerunning cannot resume it: remove a work folder this
    call created. An interruption or a crash keeps it for the rerun."""
    created = work is not None and not work.path.exists()
    try:
        yield
    except TlqError as exc:
        if created and ranks.main and not isinstance(exc, RankFailure):
            shutil.rmtree(work.path, ignore_errors=True)
        raise


@contextmanager
def offload_folder(offload_dir: Path | None, ranks: Ranks):
    """A fresh folder of this run's own under `--offload-dir` (removed at the end), or None."""
    if offload_dir is None:
        yield None
        return
    offload_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"tlq-activations-rank{ranks.rank}-", dir=offload_dir))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_record(job: QuantizeJob, model, adapter, samples, calibration: CalibrationResult, weighting_record,
                ranks: Ranks) -> dict[str, Any]:
    """tlq_recipe.json: what ran, on what, and what it measured."""
    local_tokens = sum(s.num_tokens for s in samples)
    num_tokens = int(ranks.sum(torch.tensor(local_tokens)))
    per_rank = ranks.gather_objects({
        "rank": ranks.rank, "samples": len(samples), "tokens": local_tokens,
        "activation_bytes": local_tokens * model.config.get_text_config().hidden_size
        * next(model.parameters()).element_size(),
        "peak_host_memory_bytes": peak_rss_bytes(),  # VmHWM: not inherited from a launcher
        "peak_device_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
    })
    record = {
        "recipe": job.recipe.to_dict(),
        "scheme": job.scheme.to_dict(),
        "model_type": model.config.model_type,
        "source_model": str(job.model_dir.resolve()),
        "calibration": {"file": str(job.calib), "num_samples": len(job.records), "num_tokens": num_tokens,
                        "data_sha256": data_hash(job.records)},
        "layer_relative_error": [round(r.relative_error, 6) for r in calibration.layers],
        "resumed_layers": sum(r.resumed for r in calibration.layers),
        "rescaled_groups": [r.rescaled for r in calibration.layers if r.rescaled],
        "token_weighting": weighting_record,
        "calibration_seconds": round(calibration.seconds, 3),
        "layer_seconds": [round(r.seconds, 3) for r in calibration.layers],
        "peak_device_memory_bytes": per_rank[0]["peak_device_memory_bytes"],
        "ranks": per_rank,
        "versions": package_versions(),
    }
    if adapter.experts is not None:  # MoE: calibration tokens per expert, per layer, and the RTN fallbacks
        record["experts"] = {
            "min_tokens": job.recipe.expert_min_tokens,
            "routed_tokens": {str(r.index): r.routed_tokens for r in calibration.layers},
            "rounded_to_nearest": {str(r.index): r.rounded_experts for r in calibration.layers if r.rounded_experts}}
    return record


def _write_output(job: QuantizeJob, model, adapter, calibration: CalibrationResult, layers, work, record) -> None:
    """Export; the work folder is retired together with the rename that makes the output appear."""
    retire = (work.path,) if work is not None else ()
    if layers is not None:
        def layer_state(index: int):
            state, grids, _ = work.layer_state(index)
            prefix = f"{adapter.decoder_layers}.{index}."
            return state, {name[len(prefix):]: q for name, q in grids.items()}

        export_streamed(model, adapter, job.scheme, layers, layer_state, job.out_dir, job.model_dir, record,
                        job.overwrite, retire)
    else:
        export_compressed(model, adapter, job.scheme, calibration.quantized, job.out_dir, source_dir=job.model_dir,
                          recipe_record=record, overwrite=job.overwrite, retire=retire)
