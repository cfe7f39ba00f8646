"""Per-rank memory plan of `tlq quantize` for the published Qwen2-VL and LLaVA-OneVision configs.

    python benchmarks/plan_table.py [--out benchmarks/results/plan]

Reads tests/fixtures/configs/*/config.json (shapes only, built on the meta device) and writes plan.json and
plan.md: 128 samples x 1024 tokens, bfloat16, lazy layers, on 1, 2, 4 and 8 devices of 24 GiB.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tlq.plan import model_shape, parse_size, plan_memory

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "plan")
    parser.add_argument("--device-memory", default="24GiB")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--tokens-per-sample", type=int, default=1024)
    args = parser.parse_args()
    plans = []
    for folder in sorted((ROOT / "tests" / "fixtures" / "configs").iterdir()):
        if (folder / "config.json").exists():
            shape = model_shape(folder)
            plans += [plan_memory(shape, n, parse_size(args.device_memory), args.samples, args.tokens_per_sample,
                                  lazy=True) for n in (1, 2, 4, 8)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "plan.json").write_text(json.dumps(plans, indent=1) + "\n")
    lines = [f"`tlq plan`: {args.samples} samples x {args.tokens_per_sample} tokens, bfloat16, devices of "
             f"{args.device_memory}, --lazy; GiB per rank (`python benchmarks/plan_table.py`).", "",
             "| model | params (B) | devices | device: layer | Hessians | solve | device peak | fits | "
             "host: act. cache | host: grad-pass inputs | host: weights |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in plans:
        d, h = p["device_gib"], p["host_gib"]
        lines.append(f"| {p['model']} | {p['params_b']} | {p['devices']} | {d['decoder_layer']} | "
                     f"{d['hessians_largest_group']} | {d['solve_buffers']} | {d['peak']} | "
                     f"{'yes' if p['fits'] else 'no'} | {h['layer_input_cache']} | {h['gradient_pass_inputs']} | "
                     f"{h['model_weights']} |")
    lines += ["", "Planned with --lazy: host weights are per rank, everything outside the decoder plus one layer "
              "(without --lazy each rank holds the whole checkpoint)."]
    (args.out / "plan.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
