"""Lazy layer loading: quantize a >= 2 GB Qwen2-VL-architecture checkpoint with host memory far below its size.

    python benchmarks/lazy_memory.py [--layers 28] [--out benchmarks/results/lazy_memory]

Builds a randomly initialised Qwen2VLForConditionalGeneration (text hidden 2048, MLP 4096, float32; the
word-level reference tokenizer) under runs/, then runs `tlq quantize --lazy` (GPTQ, W4A16, 4 calibration
samples) and, for contrast, the same command with the model loaded whole, each as a child process whose
own peak RSS is read from wait4. Writes results.json and table.md; the checkpoint is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_checkpoint(folder: Path, layers: int) -> int:
    import torch

    from tlq.data.synthetic import vocabulary
    from tlq.reference.checkpoint import ModelSize, build_model_and_processor, save_checkpoint

    size = ModelSize(hidden=2048, intermediate=4096, layers=layers, heads=16, kv_heads=4, vision_hidden=64,
                     vision_layers=1, vision_heads=2, patch=8, image_size=64)
    torch.manual_seed(0)
    model, processor = build_model_and_processor("qwen2_vl", vocabulary(), size, seed=0)
    save_checkpoint(model, processor, folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lazy_memory")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "lazy_memory")
    parser.add_argument("--skip-eager", action="store_true", help="only the lazy run")
    args = parser.parse_args()

    from tlq.bench import run_measured
    from tlq.data.synthetic import SceneConfig, write_split

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    checkpoint = args.work / "qwen2_vl-2gb"
    size_bytes = build_checkpoint(checkpoint, args.layers)
    calib = write_split(args.work / "calib", 4, seed=11, config=SceneConfig(grid=4, scene=3, questions_per_image=2),
                        name="calib")
    rows = []
    for mode in ["lazy"] + ([] if args.skip_eager else ["eager"]):
        out = args.work / f"out-{mode}"
        argv = [sys.executable, "-m", "tlq", "quantize", str(checkpoint), "--out", str(out), "--calib", str(calib),
                "--images", str(calib.parent), "--method", "gptq", "--scheme", "W4A16", "--num-samples", "4",
                "--device", "cpu", "--quiet"] + (["--lazy"] if mode == "lazy" else [])
        measured = run_measured(argv, f"quantize ({mode})")
        out_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        rows.append({"mode": mode, **measured, "checkpoint_bytes": size_bytes, "output_bytes": out_bytes,
                     "peak_rss_share_of_checkpoint": round(measured["peak_rss_mib"] * 2**20 / size_bytes, 3)})
        print(json.dumps(rows[-1]), flush=True)
        write_results(args, size_bytes, rows)  # after each mode, so a stopped run keeps what it measured
    shutil.rmtree(args.work, ignore_errors=True)


def write_results(args: argparse.Namespace, size_bytes: int, rows: list[dict]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    config = {"layers": args.layers, "hidden": 2048, "intermediate": 4096, "dtype": "float32",
              "method": "gptq", "scheme": "W4A16", "samples": 4, "command": " ".join(sys.argv),
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    (args.out / "results.json").write_text(json.dumps({"config": config, "runs": rows}, indent=1) + "\n")
    lines = [f"Lazy layers on a {size_bytes / 2**30:.2f} GiB Qwen2-VL-architecture checkpoint ({args.layers} layers, "
             f"hidden 2048, float32), GPTQ W4A16, 4 samples, CPU (`python benchmarks/lazy_memory.py`). Peak RSS is "
             f"the quantize process's own (tlq.measure); wall time depends on what else ran on the machine.", "",
             "| mode | wall s | peak RSS MiB | peak RSS / checkpoint |", "|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['wall_seconds']} | {r['peak_rss_mib']} | {r['peak_rss_share_of_checkpoint']:.1%} |"
              for r in rows]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
