"""What a run holds from one decoder layer to the next: resident memory and live tensors at each layer's
start and end, in one `tlq quantize` process (the layer loop's own calibrate_layer, wrapped).

    .venv/bin/python benchmarks/layer_memory_probe.py runs/cost/2b-4l/model --calib runs/cost/2b-4l/data \
        --method tlq --samples 32 --out benchmarks/results/cost/layer_memory_probe

At each point: RSS (MiB), the bytes of every live tensor (each storage counted once) and the ten (dtype,
shape) kinds holding the most; at a layer's end also the peak RSS within that layer (VmHWM, reset at its
start, so the run's own phase peaks in tlq_recipe.json are not meaningful here). With --phases, every
phase of the layer loop (tlq.phases.PhaseClock) also gives its RSS at start and end and its own peak, which
says whether a phase needs its memory only while it runs or leaves it resident for the next one.
--stop-after N ends the run after N layers (nothing is written but the probe's results). A kind that grows
by the same amount at every layer end is something the loop keeps per layer; RSS growing while live
tensors stay flat is the allocator's.
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


def heap_mib() -> dict:
    """glibc's own account (mallinfo2, all arenas): bytes in its heaps in use and free, and in blocks it
    mapped on their own; {} elsewhere. RSS far above in-use + mapped is freed memory the heaps keep."""
    import ctypes
    import ctypes.util

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    return {"heap_in_use_mib": round(info.uordblks / 2**20, 1), "heap_free_mib": round(info.fordblks / 2**20, 1),
            "mapped_blocks_mib": round(info.hblkhd / 2**20, 1)}


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
    parser.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                        help="a Recipe knob beside the method's defaults, e.g. weighting=importance (repeatable)")
    parser.add_argument("--phases", action="store_true", help="also RSS at each phase's start and end and its peak")
    parser.add_argument("--stop-after", type=int, default=None, metavar="N", help="stop after N layers")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cost" / "layer_memory_probe")
    args = parser.parse_args()

    import tlq.engine as engine
    from tlq.api import quantize
    from tlq.measure import peak_rss_bytes
    from tlq.recipe import Recipe

    points: list[dict] = []
    phase_points: list[dict] = []
    layer_peak = [0]  # the layer's high-water mark carried across the phases' resets (bytes)
    original = engine.calibrate_layer

    def observed(layer, index, *rest, **kwargs):
        gc.collect()
        points.append({"layer": index, "at": "start", "rss_mib": rss_mib(), **census()})
        reset_peak()
        layer_peak[0] = 0
        result = original(layer, index, *rest, **kwargs)
        # the layer's own peak, read before the census allocates
        peak = round(max(layer_peak[0], peak_rss_bytes()) / 2**20, 1)
        gc.collect()
        points.append({"layer": index, "at": "end", "rss_mib": rss_mib(), "layer_peak_rss_mib": peak, **census()})
        print(json.dumps({k: v for k, v in points[-1].items() if k != "largest_kinds"}), flush=True)
        if args.stop_after is not None and index + 1 >= args.stop_after:
            raise _Stopped
        return result

    from tlq.phases import PhaseClock

    timed = PhaseClock.__call__
    engine.calibrate_layer = observed
    if args.phases:
        PhaseClock.__call__ = _observed_phases(timed, phase_points, layer_peak, points)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            quantize(args.model, Path(tmp) / "out", args.calib / "calib.json", args.calib,
                     recipe=Recipe(method=args.method, num_samples=args.samples, device="cpu",
                                   group_size=args.group_size, **_knobs(args.set)),
                     progress=False, resume=False)
    except _Stopped:
        pass
    finally:  # the process may go on (the test suite): the loop's own functions back
        engine.calibrate_layer, PhaseClock.__call__ = original, timed
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"model": str(args.model), "method": args.method, "knobs": _knobs(args.set), "samples": args.samples,
              "stopped_after_layers": args.stop_after, "points": points, "phases": phase_points}
    (args.out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"{args.method} {' '.join(args.set)}, {args.samples} samples, {args.model}", "",
             "| layer | at | RSS MiB | peak within the layer MiB | live tensors MiB | three largest kinds (dtype shape: MiB) |",
             "|---|---|---|---|---|---|"]
    for p in points:
        kinds = "; ".join(f"{k['dtype']} {tuple(k['shape'])}: {k['mib']}" for k in p["largest_kinds"][:3])
        lines.append(f"| {p['layer']} | {p['at']} | {p['rss_mib']} | {p.get('layer_peak_rss_mib', '')} | "
                     f"{p['live_tensors_mib']} | {kinds} |")
    if phase_points:
        lines += ["", "| layer | phase | RSS at start MiB | RSS at end MiB | peak within the phase MiB | seconds | "
                  "heap in use / free MiB at the end | mapped blocks MiB |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {p['layer']} | {p['phase']} | {p['start_rss_mib']} | {p['end_rss_mib']} | {p['peak_rss_mib']} | "
                  f"{p['seconds']} | {p.get('heap_in_use_mib', '')} / {p.get('heap_free_mib', '')} | "
                  f"{p.get('mapped_blocks_mib', '')} |" for p in phase_points]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _knobs(settings: list[str]) -> dict:
    """--set KNOB=VALUE pairs, each value read as JSON where it parses (numbers, true/false), else a string."""
    knobs = {}
    for setting in settings:
        knob, _, value = setting.partition("=")
        try:
            knobs[knob] = json.loads(value)
        except json.JSONDecodeError:
            knobs[knob] = value
    return knobs


class _Stopped(BaseException):  # not an Exception: nothing in tlq may take it for a failure to report
    """--stop-after reached: the run ends here, its output unwritten."""


def _observed_phases(timed, phase_points: list[dict], layer_peak: list[int], points: list[dict]):
    """PhaseClock.__call__ (`timed`) wrapped: each phase's RSS at its start and end and its own peak (VmHWM
    reset at its start; the mark reached before the reset is carried into the layer's peak)."""
    import time
    from contextlib import contextmanager

    from tlq.measure import peak_rss_bytes

    @contextmanager
    def observed(clock, name):
        layer_peak[0] = max(layer_peak[0], peak_rss_bytes())
        start_rss, start = rss_mib(), time.perf_counter()
        reset_peak()
        with timed(clock, name):
            yield
        peak = peak_rss_bytes()
        layer_peak[0] = max(layer_peak[0], peak)
        layer = points[-1]["layer"] if points and points[-1]["at"] == "start" else None
        phase_points.append({"layer": layer, "phase": name, "start_rss_mib": start_rss, "end_rss_mib": rss_mib(),
                             "peak_rss_mib": round(peak / 2**20, 1),
                             "seconds": round(time.perf_counter() - start, 1), **heap_mib()})
        print(json.dumps(phase_points[-1]), flush=True)

    return observed


if __name__ == "__main__":
    raise SystemExit(main())
