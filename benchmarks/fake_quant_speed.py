"""Time tlq's weight fake quantization (in place on one float32 copy) against the out-of-place expression it
replaced, on Linear shapes of the 2B and 7B models, and check both give the same values.

    .venv/bin/python benchmarks/fake_quant_speed.py --out benchmarks/results/cost/fake_quant_speed
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from tlq.quant import primitives
from tlq.recipe import parse_scheme

SHAPES = {"2B down (1536 x 8960)": (1536, 8960), "2B gate/up (8960 x 1536)": (8960, 1536),
          "7B down (3584 x 18944)": (3584, 18944)}


def out_of_place(w, scale, zero, bits):
    """The expression quant_dequant used before (one temporary per operation)."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = scale.float()
    q = torch.clamp(torch.round(w.float() / scale + zero), qmin, qmax)
    return (q - zero) * scale


def seconds(fn, weight, scheme, repeats: int) -> float:
    fn(weight, scheme)
    start = time.perf_counter()
    for _ in range(repeats):
        fn(weight, scheme)
    return (time.perf_counter() - start) / repeats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    scheme, rows = parse_scheme("W4A16"), []
    in_place = primitives.quant_dequant
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        weight = torch.randn(*shape)
        new = primitives.fake_quant_weight(weight, scheme).weight
        new_s = seconds(primitives.fake_quant_weight, weight, scheme, args.repeats)
        primitives.quant_dequant = out_of_place
        try:
            old = primitives.fake_quant_weight(weight, scheme).weight
            old_s = seconds(primitives.fake_quant_weight, weight, scheme, args.repeats)
        finally:
            primitives.quant_dequant = in_place
        rows.append({"shape": name, "out_of_place_ms": round(old_s * 1e3, 1), "in_place_ms": round(new_s * 1e3, 1),
                     "speedup": round(old_s / new_s, 2), "identical": bool(torch.equal(old, new))})
        print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"threads": torch.get_num_threads(), "load_average": os.getloadavg()[0], "repeats": args.repeats}
    (args.out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    lines = [f"W4A16 round-to-nearest fake quantization, float32, {meta['threads']} threads, "
             f"{args.repeats} repeats, load {meta['load_average']:.2f}.", "",
             "| weight | out of place ms | in place ms | speed-up | same values |", "|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['out_of_place_ms']} | {r['in_place_ms']} | {r['speedup']}x | {r['identical']} |"
              for r in rows]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
