"""What a run holds from one decoder layer to the next: resident memory and live tensors at each layer's
start and end, in one `tlq quantize` process (the layer loop's own calibrate_layer, wrapped).

    .venv/bin/python benchmarks/layer_memory_probe.py runs/cost/2b-4l/model --calib runs/cost/2b-4l/data \
        --method tlq --samples 32 --out benchmarks/results/cost/layer_memory_probe

At each point: RSS (MiB), the bytes of every live tensor (each storage counted once) and the ten (dtype,
shape) kinds holding the most; at a layer's end also the peak RSS within that layer (VmHWM, reset at its
start, so the run's own phase peaks in tlq_recipe.json are not meaningful here). A kind that grows by the same amount at every layer end is
something the loop keeps per layer; RSS growing while live tensors stay flat is the allocator's.
Writes results.json and table.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def rss_mib() -> float:
    """Resident memory now (VmRSS)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def reset_peak() -> None:
    """Start a new high-water mark (Linux: writing 5 to clear_refs resets VmHWM to the current RSS)."""
    Path("/proc/self/clear_refs").write_text("5")


def census() -> dict:
    """Live tensors by (dtype, shape), each storage once (views share their base's bytes)."""
    import torch

    seen: set[int] = set()
    kinds: Counter = Counter()
    with warnings.catch_warnings():  # isinstance on deprecated module proxies (torch.distributed.reduce_op) warns
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        try:
            if obj.device.type != "cpu":
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - tensors without a storage (meta, sparse)
            continue
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        kinds[(str(obj.dtype).removeprefix("torch."), tuple(obj.shape))] += storage.nbytes()
    total = sum(kinds.values())
    top = [{"dtype": d, "shape": list(s), "mib": round(b / 2**20, 1)} for (d, s), b in kinds.most_common(10)]
    return {"live_tensors_mib": round(total / 2**20, 1), "largest_kinds": top}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--calib", type=Path, required=True, help="folder with calib.json and its images")
    parser.add_argument("--method", default="tlq")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--group-size", type=int, default=None, help="override the scheme's group (tiny models)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cost" / "layer_memory_probe")
    args = parser.parse_args()

    import tlq.engine as engine
    from tlq.api import quantize
    from tlq.measure import peak_rss_bytes
    from tlq.recipe import Recipe

    points: list[dict] = []
    original = engine.calibrate_layer

    def observed(layer, index, *rest, **kwargs):
        gc.collect()
        points.append({"layer": index, "at": "start", "rss_mib": rss_mib(), **census()})
        reset_peak()
        result = original(layer, index, *rest, **kwargs)
        peak = round(peak_rss_bytes() / 2**20, 1)  # the layer's own peak, read before the census allocates
        gc.collect()
        points.append({"layer": index, "at": "end", "rss_mib": rss_mib(), "layer_peak_rss_mib": peak, **census()})
        print(json.dumps({k: v for k, v in points[-1].items() if k != "largest_kinds"}), flush=True)
        return result

    engine.calibrate_layer = observed
    with tempfile.TemporaryDirectory() as tmp:
        quantize(args.model, Path(tmp) / "out", args.calib / "calib.json", args.calib,
                 recipe=Recipe(method=args.method, num_samples=args.samples, device="cpu", group_size=args.group_size),
                 progress=False, resume=False)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"model": str(args.model), "method": args.method, "samples": args.samples, "points": points}
    (args.out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"{args.method}, {args.samples} samples, {args.model}", "",
             "| layer | at | RSS MiB | peak within the layer MiB | live tensors MiB | three largest kinds (dtype shape: MiB) |",
             "|---|---|---|---|---|---|"]
    for p in points:
        kinds = "; ".join(f"{k['dtype']} {tuple(k['shape'])}: {k['mib']}" for k in p["largest_kinds"][:3])
        lines.append(f"| {p['layer']} | {p['at']} | {p['rss_mib']} | {p.get('layer_peak_rss_mib', '')} | "
                     f"{p['live_tensors_mib']} | {kinds} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
