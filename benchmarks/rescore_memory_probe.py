"""The memory of AWQ + GPTQ's rescoring, piece by piece: the peak resident memory of building a Linear's input
Hessian from its rows (tlq.rescale._input_hessian) and of solving one scale candidate with GPTQ on it
(tlq.rescale._solved_by), each in units of one float32 in x in matrix, against what `tlq plan` counts
(tlq.plan._scale_search_bytes: the Hessian kept, 4 in^2 bytes, plus the larger of a candidate's solve, 8 in^2,
and its forwards). Peaks are the process's VmHWM, reset before each piece (/proc/self/clear_refs), so Linux only.
It runs inside the allocator setting the layer loop's rescale phase has (tlq.measure.freed_memory_returned_promptly:
blocks of 1 MiB or more are memory-mapped, so freed ones go back to the OS).

    .venv/bin/python benchmarks/rescore_memory_probe.py [--tokens 8960] [--width 8960] [--rows 1536] [--repeats 2]

Writes benchmarks/results/cost/rescore_probe/{results.json,table.md}. Defaults: the 2B shape's down projection
(1536 x 8960) and the rows 32 samples of ~280 tokens give it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results" / "cost" / "rescore_probe"


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _peak_above(fn) -> tuple[int, int, object]:
    """(peak above the resident memory before, resident after minus before, fn's result)."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    result = fn()
    return _status("VmHWM") - before, _status("VmRSS") - before, result


def main() -> int:
    from tlq.measure import freed_memory_returned_promptly
    from tlq.recipe import Recipe

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8960)
    parser.add_argument("--width", type=int, default=8960)
    parser.add_argument("--rows", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.manual_seed(0)
    unit = args.width * args.width * 4  # one float32 in x in matrix
    config = Recipe(method="awq_gptq").resolve().gptq  # AWQ + GPTQ's own GPTQ knobs (act-order on)
    with freed_memory_returned_promptly():
        rows = [_pieces(args, unit, config, repeat) for repeat in range(args.repeats)]
    result = {"tokens": args.tokens, "width": args.width, "rows": args.rows, "unit_bytes": unit,
              "plan_units": {"hessian_kept": 1.0, "solve": 2.0, "build_below": 3.0}, "repeats": rows}
    _write(args, unit, result)
    return 0


def _pieces(args, unit: int, config, repeat: int) -> dict:
    from tlq.distributed import Ranks
    from tlq.quant.base import solver_class
    from tlq.recipe import parse_scheme
    from tlq.rescale import _input_hessian, _solved_by

    x = torch.randn(args.tokens, args.width)
    weight = torch.randn(args.rows, args.width) * 0.02
    build_peak, build_left, hessian = _peak_above(lambda: _input_hessian(x, None, Ranks()))
    quantize = _solved_by(solver_class("gptq"), config, parse_scheme("W4A16"), [hessian])
    scales = torch.rand(args.width) + 0.5
    solves = []
    for _ in range(2):
        scaled = (weight * scales).contiguous()
        peak, left, solved = _peak_above(lambda: quantize(scaled, scales, 0))
        solves.append({"peak_above": peak / unit, "left": left / unit})
        del solved
    return {"repeat": repeat, "build_peak_above_rows": build_peak / unit, "build_left": build_left / unit,
            "solves": solves}


def _write(args, unit: int, result: dict) -> None:
    rows = result["repeats"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"Rescoring memory, {args.rows} x {args.width} Linear, {args.tokens} rows; unit = one float32 "
             f"{args.width} x {args.width} matrix ({unit / 2**20:.0f} MiB). `tlq plan` counts the kept Hessian (1) plus "
             "a solve (2), and takes the build (its peak) to be at most their sum (3).", "",
             "| repeat | build: peak above the rows | build: left resident | solve 1: peak above | solve 2: peak above |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['repeat']} | {r['build_peak_above_rows']:.2f} | {r['build_left']:.2f} | "
                     f"{r['solves'][0]['peak_above']:.2f} | {r['solves'][1]['peak_above']:.2f} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
