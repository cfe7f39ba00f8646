"""`tlq demo`: the whole job on the bundled reference VLM, in a few minutes on two CPU cores.

Writes the procedural calibration / test splits, benchmarks every method at W3A16 and W4A8 on the
bundled model (one seed, quantized checkpoints kept), then the weight-only methods at W3A16 on its
weight-outlier variant (the stress case where calibration matters). Prints the tables and where
everything is.
"""

from __future__ import annotations

from pathlib import Path

from tlq.bench import BenchConfig, markdown_table, run_bench
from tlq.data.synthetic import write_splits

DEMO_METHODS = ("rtn", "gptq", "awq", "smoothquant", "mbq", "tlq")  # the published methods, one each
REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED = REPO_ROOT / "models" / "reference" / "qwen2_vl-small"


def _model(out: Path) -> Path:
    if (BUNDLED / "config.json").is_file():
        return BUNDLED
    # Installed without the repository's models folder: fall back to an untrained tiny model, whose
    # accuracy numbers mean nothing but which exercises the same path end to end.
    from tlq.data.synthetic import vocabulary
    from tlq.reference.checkpoint import ModelSize, build_tiny_checkpoint

    print(f"bundled model {BUNDLED} not found: using an untrained tiny Qwen2-VL (accuracy is meaningless)")
    path = out / "models" / "tiny-qwen2_vl"
    if not (path / "config.json").is_file():
        build_tiny_checkpoint("qwen2_vl", path, words=vocabulary(), size=ModelSize(image_size=128))
    return path


def run_demo(out: Path, device: str = "auto", quick: bool = False) -> None:
    from tlq.reference.stress import make_variant

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not (data / "test.json").is_file():
        write_splits(data, calib=256, test=300 if not quick else 60)
    model = _model(out)
    variant = out / "models" / f"{model.name}-weight-outliers"
    if not (variant / "config.json").is_file():
        make_variant(model, variant, "weight", scale=32.0, channels=4, seed=0, overwrite=True)
    runs = (("as trained", model, list(DEMO_METHODS), ["W3A16", "W4A8"]),
            ("weight-outlier variant", variant, [m for m in DEMO_METHODS if m != "smoothquant"], ["W3A16"]))
    for name, model_dir, methods, schemes in runs:
        cfg = BenchConfig(model_dir=str(model_dir), calib=str(data / "calib.json"),
                          eval_data=str(data / "test.json"), calib_images=str(data), eval_images=str(data),
                          out_dir=str(out / "bench" / Path(model_dir).name), methods=methods,
                          schemes=schemes, seeds=[0], num_samples=32 if quick else 128,
                          device=device, keep_checkpoints=True)
        print(f"\n== {Path(model_dir).name} ({name}) ==", flush=True)
        results = run_bench(cfg)
        print(markdown_table(results))
    print(f"quantized checkpoints: {out / 'bench' / '*' / 'checkpoints'}")
    print(f"tables and charts:     {out / 'bench' / '*' / 'table.md'}, chart.png")
