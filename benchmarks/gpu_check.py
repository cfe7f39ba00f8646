"""The GPU check, prepared: one run that fits in about 8 minutes on one H200 machine that starts bare and
reaches no registry (run it through benchmarks/gpu_check.sh, which also finds tlq's missing wheels).

  1. the environment: torch, CUDA, the device, and what is missing (compressed-tensors is not in that
     image: benchmarks/gpu_wheels.sh fetches it and its needs as wheels here, to carry as .whl/);
  2. the CUDA-marked tests (tests/test_cuda.py: the checkpoint on CUDA equals the CPU one);
  3. a random checkpoint of Qwen2-VL-7B's decoder shape (hidden 3584, MLP 18944, 28 heads, 4 KV heads;
     --layers of them, a small vision tower), bfloat16, quantized with GPTQ and TLQ at W4A16 on the
     device: seconds per layer, peak device memory, and `tlq plan`'s estimate of it;
  4. results.json and table.md in --out (default runs/gpu_check; $OUT/gpu_check on the device machine).
`--dry-run` does all of it on the CPU with a tiny shape, so the script cannot rot (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # ModelSize fields
    "7b": dict(hidden=3584, intermediate=18944, heads=28, kv_heads=4, vision_hidden=128, vision_layers=1,
               vision_heads=2, patch=14, image_size=224),
    "tiny": dict(hidden=128, intermediate=256, heads=4, kv_heads=2, vision_hidden=32, vision_layers=1, vision_heads=2,
                 patch=8, image_size=64),
}


def environment() -> dict:
    found = {"python": sys.version.split()[0]}
    try:
        import torch

        found.update(torch=torch.__version__, cuda=torch.cuda.is_available(),
                     device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except ImportError:
        found["torch"] = None
    for name in ("transformers", "compressed_tensors", "safetensors", "PIL"):
        try:
            found[name] = getattr(__import__(name), "__version__", "present")
        except ImportError:
            found[name] = None
    found["missing"] = [k for k in ("torch", "transformers", "compressed_tensors", "safetensors", "PIL") if not found[k]]
    return found


def build_checkpoint(folder: Path, shape: str, layers: int) -> Path:
    import torch

    from tlq.data.synthetic import vocabulary
    from tlq.reference.checkpoint import ModelSize, build_model_and_processor, save_checkpoint

    if (folder / "config.json").is_file():
        return folder
    model, processor = build_model_and_processor("qwen2_vl", vocabulary(), ModelSize(layers=layers, **SHAPES[shape]))
    with torch.no_grad():  # real checkpoints' scale: default init of a 3584-wide layer is too large for bf16 runs
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.02)
    model.to(torch.bfloat16)
    return save_checkpoint(model, processor, folder)


def run_method(checkpoint: Path, data: Path, method: str, device: str, samples: int, out: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tlq", "quantize", str(checkpoint), "--out", str(out), "--calib",
                           str(data / "calib.json"), "--images", str(data), "--method", method, "--scheme", "W4A16",
                           "--dtype", "bfloat16", "--device", device, "--num-samples", str(samples), "--quiet",
                           "--overwrite"], capture_output=True, text=True, timeout=1200)
    row = {"method": method, "exit": proc.returncode, "wall_seconds": round(time.perf_counter() - start, 1)}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        return row
    record = json.loads((out / "tlq_recipe.json").read_text())
    row.update(calibration_seconds=record["calibration_seconds"], layer_seconds=record.get("layer_seconds"),
               peak_device_memory_bytes=record["peak_device_memory_bytes"],
               peak_host_memory_bytes=record["ranks"][0]["peak_host_memory_bytes"],
               tokens=record["calibration"]["num_tokens"])
    return row


def plan_estimate(checkpoint: Path, samples: int, tokens: int) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tlq", "plan", str(checkpoint), "--samples", str(samples),
                           "--tokens-per-sample", str(max(tokens, 1)), "--device-memory", "139GiB", "--json"],
                          capture_output=True, text=True, timeout=300)
    return json.loads(proc.stdout) if proc.returncode == 0 else {"error": proc.stderr.strip()[-300:]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shape: checks the script, measures nothing")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=32)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    results = {"dry_run": args.dry_run, "environment": env, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    write = lambda: (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")  # noqa: E731
    if env["missing"] or (not args.dry_run and not env.get("cuda")):
        results["error"] = (f"missing: {', '.join(env['missing'])} (run benchmarks/gpu_wheels.sh on the machine that "
                            f"has a registry and carry .whl/)" if env["missing"] else "no CUDA device")
        write()
        print(results["error"], file=sys.stderr)
        return 2
    device, shape = ("cpu", "tiny") if args.dry_run else ("cuda", "7b")
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                            str(ROOT / "tests" / "test_cuda.py")], capture_output=True, text=True, timeout=600)
    results["cuda_tests"] = {"exit": tests.returncode, "tail": tests.stdout.strip().splitlines()[-1:]}
    write()
    from tlq.data.synthetic import SceneConfig, write_split

    work = args.out / "work"
    checkpoint = build_checkpoint(work / f"qwen2_vl-{shape}-{args.layers}layers", shape, args.layers)
    data = work / "data"
    if not (data / "calib.json").is_file():
        write_split(data, args.samples, seed=11, config=SceneConfig(questions_per_image=3), name="calib")
    results["shape"] = {"name": shape, "layers": args.layers, **SHAPES[shape]}
    results["methods"] = []
    for method in ("gptq", "tlq"):
        results["methods"].append(run_method(checkpoint, data, method, device, args.samples, work / f"out-{method}"))
        write()
    tokens = next((m["tokens"] for m in results["methods"] if "tokens" in m), 0) // max(args.samples, 1)
    plan = plan_estimate(checkpoint, args.samples, tokens)
    peak_gib = plan.get("device_gib", {}).get("peak")
    results["plan_device_peak_bytes"] = None if peak_gib is None else int(peak_gib * 2**30)
    results["plan"] = plan
    write()
    lines = [f"GPU check ({'dry run, CPU' if args.dry_run else env.get('device')}), Qwen2-VL {shape} decoder x "
             f"{args.layers} layers, W4A16, {args.samples} samples", "",
             "| method | exit | wall s | calibration s | s per layer | peak device GiB | plan's device GiB |",
             "|---|---|---|---|---|---|---|"]
    for m in results["methods"]:
        per_layer = (sum(m["layer_seconds"]) / len(m["layer_seconds"])) if m.get("layer_seconds") else None
        peak = m.get("peak_device_memory_bytes")
        planned = results["plan_device_peak_bytes"]
        lines.append(f"| {m['method']} | {m['exit']} | {m['wall_seconds']} | {m.get('calibration_seconds', '-')} | "
                     f"{'-' if per_layer is None else round(per_layer, 2)} | "
                     f"{'-' if not peak else round(peak / 2**30, 2)} | {'-' if not planned else round(planned / 2**30, 2)} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(m["exit"] == 0 for m in results["methods"]) else 1


if __name__ == "__main__":
    sys.exit(main())
