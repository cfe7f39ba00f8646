"""The scale search's error curves: every candidate of every group scored in full, and what a search that
scores fewer candidates would have picked from them.

    .venv/bin/python benchmarks/scale_search_curves.py --out benchmarks/results/scale_search_curves

Each cell quantizes a model once with the bound off (every candidate's block error summed to its end) and
records, per scaling group, the candidates (alpha, form) and their errors in the order `search_scales`
lists them. From those curves it replays search strategies that score a subset of the grid (`STRATEGIES`)
and reports how often each picks the full grid's winner, how much larger the error of its pick is when it
does not, and the share of the candidates it scores. Round-to-nearest scoring only (AWQ, MBQ, TLQ; AWQ +
GPTQ rescores after its solver, whose candidates are not recorded here).

Models: the trained reference VLMs with the outliers their tables use (as benchmarks/scale_search_bound.py:
weight outliers s = 32 for W3A16, activation outliers s = 256 for W4A8), 128 records of the tables'
calibration pool, seed 0; and optionally the random-weight 2B shape of benchmarks/cost.py (`--cost-model`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from scale_search_bound import DATA, SCHEMES, cell_arguments, tlq, variant  # noqa: E402

MODELS = ("qwen2_vl-large", "llava_onevision-large", "qwen3_vl-small", "qwen2_vl-deep")
METHODS = ("awq", "mbq", "tlq")


def record_curves(folder: Path, data: Path, out: Path, method: str, scheme: str, samples: int) -> list[dict]:
    """Quantize once with every candidate scored in full; returns one curve per searched group, in order."""
    import tlq.quant.scaling as scaling
    from tlq.api import quantize
    from tlq.recipe import Recipe

    curves: list[dict] = []
    shipped_trials, shipped_least = scaling._trials, scaling._least_errors
    current: dict = {}

    def trials(grid, form, alpha_one):
        current["trials"] = shipped_trials(grid, form, alpha_one)
        return current["trials"]

    def least_errors(error, scales, order, keep):
        errors = {index: float(error(scales[index]())) for index in range(len(scales))}
        curves.append({"trials": [list(t) for t in current["trials"]], "errors": [errors[i] for i in range(len(scales))]})
        return {index: errors[index] for index in order}

    scaling._trials, scaling._least_errors = trials, least_errors
    try:
        quantize(folder, out, data / "calib.json", data,
                 Recipe(method=method, scheme=scheme, num_samples=samples, seed=0), progress=False, resume=False)
    finally:
        scaling._trials, scaling._least_errors = shipped_trials, shipped_least
    record = json.loads((out / "tlq_recipe.json").read_text())
    groups = [group for layer in record["rescaled_groups"] for group in layer if "block_runs" in group]
    for curve, group in zip(curves, groups):
        curve.update(layer_block=group["block"], source=group["source"], picked=[group["alpha"], group["form"]])
    return curves


# A strategy: (trials, score) -> the index it picks, where score(i) returns candidate i's error (and counts it).

def full_grid(trials, score):
    return min(range(len(trials)), key=lambda i: (score(i), i))


def local_refine(stride: int):
    """Per form: every `stride`-th alpha, then halving the step around the best so far, down to 1 (a
    search that trusts the curve to have one basin along alpha per form)."""
    def strategy(trials, score):
        best = 0
        for kind in ("activation", "duo"):
            positions = [i for i, (_, k) in enumerate(trials) if k == kind]
            if not positions:
                continue
            scored = {p: score(positions[p]) for p in range(0, len(positions), stride)}
            step = stride
            while step > 1:
                step //= 2
                centre = min(scored, key=lambda p: (scored[p], p))
                for p in (centre - step, centre + step):
                    if 0 <= p < len(positions) and p not in scored:
                        scored[p] = score(positions[p])
            winner = min(scored, key=lambda p: (scored[p], p))
            if (scored[winner], positions[winner]) < (score(best), best):
                best = positions[winner]
        return best
    return strategy


STRATEGIES = {"full grid": full_grid, "stride 4, refine": local_refine(4), "stride 8, refine": local_refine(8),
              "stride 2, refine": local_refine(2)}


def replay(curve: dict, strategy) -> dict:
    errors, seen = curve["errors"], set()

    def score(index):
        seen.add(index)
        return errors[index]

    pick = strategy([tuple(t) for t in curve["trials"]], score)
    best = min(range(len(errors)), key=lambda i: (errors[i], i))
    return {"same": pick == best, "excess": errors[pick] / max(errors[best], 1e-30) - 1.0,
            "scored": len(seen) / len(errors)}


def summarise(cells: list[dict]) -> list[dict]:
    rows = []
    for name, strategy in STRATEGIES.items():
        results = [replay(curve, strategy) for cell in cells for curve in cell["curves"]]
        misses = [r["excess"] for r in results if not r["same"]]
        rows.append({"strategy": name, "groups": len(results), "same_pick": sum(r["same"] for r in results),
                     "largest_excess": max(misses, default=0.0),
                     "mean_excess_of_misses": sum(misses) / len(misses) if misses else 0.0,
                     "scored_share": sum(r["scored"] for r in results) / max(len(results), 1)})
    return rows


def table(rows: list[dict], cells: list[dict]) -> str:
    lines = [f"Scale search strategies replayed on {sum(len(c['curves']) for c in cells)} recorded groups "
             f"({len(cells)} cells: {', '.join(sorted({c['model'] for c in cells}))}).", "",
             "| strategy | same pick as the full grid | error of the pick over the best, when not (largest / mean) "
             "| candidates scored |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['same_pick']} / {r['groups']} | "
                     f"{100 * r['largest_excess']:.2f}% / {100 * r['mean_excess_of_misses']:.2f}% | "
                     f"{100 * r['scored_share']:.0f}% |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cell_arguments(parser, MODELS, METHODS)
    parser.add_argument("--cost-model", default=None,
                        help="a benchmarks/cost.py work folder (runs/cost/2b-1l): its model and data, TLQ W4A16")
    parser.add_argument("--cost-samples", type=int, default=32)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if not (DATA / "calib.json").exists():
        tlq("synth", "--out", str(DATA), "--calib", "512", "--test", "1000")
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in filter(None, args.models.split(",")):
            for scheme in args.schemes.split(","):
                folder = variant(model, *SCHEMES[scheme])
                for method in args.methods.split(","):
                    out = Path(tmp) / f"{model}-{scheme}-{method}"
                    cells.append({"model": model, "variant": folder.name, "scheme": scheme, "method": method,
                                  "curves": record_curves(folder, DATA, out, method, scheme, 128)})
                    print(model, scheme, method, len(cells[-1]["curves"]), "groups", flush=True)
        if args.cost_model:
            work = Path(args.cost_model)
            out = Path(tmp) / "cost-model"
            cells.append({"model": f"random 2B widths ({work.name})", "variant": None, "scheme": "W4A16",
                          "method": "tlq", "samples": args.cost_samples,
                          "curves": record_curves(work / "model", work / "data", out, "tlq", "W4A16",
                                                  args.cost_samples)})
    rows = summarise(cells)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"strategies": rows, "cells": cells}, indent=1) + "\n")
    (out / "table.md").write_text(table(rows, cells))
    print(table(rows, cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
