"""Data-parallel calibration: wall time and per-rank memory for 1 vs N ranks (torchrun, gloo on CPU / NCCL on GPU).

    python benchmarks/scaling.py [--ranks 1,2] [--methods gptq,tlq] [--out benchmarks/results/scaling]

Builds a mid-size randomly initialised Qwen2-VL (text hidden 512, MLP 1024, 6 layers) under runs/, writes a
calibration split of --samples procedural images, then runs `torchrun --nproc-per-node N -m tlq quantize` for
each method and N. Reported: the command's wall time (process start-up included), rank 0's calibration
time (importance pass + layer loop, from tlq_recipe.json), and each rank's own peak RSS and activation
bytes. On a CPU machine the ranks share the cores, so the speed-up is bounded by the cores, not by tlq.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--methods", default="gptq,tlq")
    parser.add_argument("--scheme", default="W4A16")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scaling")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "scaling")
    args = parser.parse_args()

    from tlq.bench import run_measured
    from tlq.data.synthetic import SceneConfig, vocabulary, write_split
    from tlq.reference.checkpoint import ModelSize, build_tiny_checkpoint

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    size = ModelSize(hidden=512, intermediate=1024, layers=6, heads=8, kv_heads=4, vision_hidden=64, vision_layers=1,
                     vision_heads=2, patch=8, image_size=128)
    checkpoint = build_tiny_checkpoint("qwen2_vl", args.work / "model", words=vocabulary(), size=size, seed=0)
    calib = write_split(args.work / "calib", args.samples, seed=1, config=SceneConfig(questions_per_image=3),
                        name="calib")
    threads = max(1, (os.cpu_count() or 1) // max(int(n) for n in args.ranks.split(",")))
    rows = []
    for method in args.methods.split(","):
        for ranks in (int(n) for n in args.ranks.split(",")):
            out = args.work / f"out-{method}-{ranks}"
            argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
                    str(_free_port()), "-m", "tlq", "quantize", str(checkpoint), "--out", str(out), "--calib",
                    str(calib), "--images", str(calib.parent), "--method", method, "--scheme", args.scheme,
                    "--num-samples", str(args.samples), "--device", args.device, "--quiet"]
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            measured = run_measured(argv, f"{method} on {ranks} ranks", env=env)
            record = json.loads((out / "tlq_recipe.json").read_text())
            rows.append({"method": method, "ranks": ranks, "threads_per_rank": threads, **measured,
                         "calibration_seconds": record["calibration_seconds"],
                         "per_rank": [{"rank": r["rank"], "samples": r["samples"],
                                       "peak_rss_mib": round(r["peak_host_memory_bytes"] / 2**20, 1),
                                       "activation_mib": round(r["activation_bytes"] / 2**20, 2),
                                       "peak_device_mib": None if r["peak_device_memory_bytes"] is None
                                       else round(r["peak_device_memory_bytes"] / 2**20, 1)}
                                      for r in record["ranks"]]})
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    config = {"model": "qwen2_vl hidden 512, MLP 1024, 6 layers (random)", "samples": args.samples,
              "scheme": args.scheme, "device": args.device, "cpu_count": os.cpu_count(), "command": " ".join(sys.argv)}
    (args.out / "results.json").write_text(json.dumps({"config": config, "runs": rows}, indent=1) + "\n")
    base = {r["method"]: r for r in rows if r["ranks"] == 1}
    lines = [f"Data-parallel calibration, {config['model']}, {args.samples} samples, {args.scheme}, device "
             f"{args.device}, {os.cpu_count()} CPU cores (`python benchmarks/scaling.py`).", "",
             "| method | ranks | wall s | calibration s | speed-up (calibration) | per-rank peak RSS MiB | "
             "per-rank activations MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = base[r["method"]]["calibration_seconds"] / r["calibration_seconds"] if r["method"] in base else None
        lines.append(f"| {r['method']} | {r['ranks']} | {r['wall_seconds']} | {r['calibration_seconds']} | "
                     f"{'' if speed is None else f'{speed:.2f}x'} | "
                     f"{', '.join(str(p['peak_rss_mib']) for p in r['per_rank'])} | "
                     f"{', '.join(str(p['activation_mib']) for p in r['per_rank'])} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
