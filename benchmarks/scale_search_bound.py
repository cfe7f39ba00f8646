"""How much of the scale search's work the bound saves, and that it changes nothing: each cell is quantized
twice in this process, once as shipped (a candidate's per-sample sum stops once it cannot make the
shortlist: tlq.quant.scaling.search_scales) and once with every candidate scored in full, and the two
outputs are compared byte for byte.

    .venv/bin/python benchmarks/scale_search_bound.py --out benchmarks/results/scale_search_bound/coarse_to_fine
    .venv/bin/python benchmarks/scale_search_bound.py --grid-order --out benchmarks/results/scale_search_bound/grid_order

Models: the trained reference VLMs with the outliers their tables use (`tlq stress`: weight outliers s = 32
for weight-only schemes, activation outliers s = 256 for W4A8; 4 channels), calibrated on 128 records of
the tables' calibration pool (`tlq synth`, seed 1). Per cell: the block forwards the searches ran against
those full scoring runs (tlq_recipe.json `rescaled_groups`: `block_runs` / `block_runs_full`), per group
kind (the block the group feeds), and the rescale phase's seconds of both runs (each run alone; at these
widths the search is a few seconds, so the time ratio is rough; the forwards' share is the machine-free
number).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("qwen2_vl-large", "llava_onevision-large", "qwen3_vl-small", "qwen2_vl-deep")
METHODS = ("awq", "mbq", "tlq", "awq_gptq")
SCHEMES = {"W3A16": ("weight", 32), "W4A8": ("activation", 256)}
DATA = ROOT / "runs/data/vqa"


def tlq(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "tlq", *args], check=True, cwd=ROOT)


def variant(model: str, kind: str, scale: int) -> Path:
    """The model with planted outliers, as benchmarks/reference.sh makes it."""
    folder = ROOT / "runs/variants" / f"{model}-{kind}-s{scale}"
    if not (folder / "config.json").exists():
        tlq("stress", str(ROOT / "models/reference" / model), "--out", str(folder), "--kind", kind,
            "--scale", str(scale), "--channels", "4", "--overwrite")
    return folder


def quantize(folder: Path, out: Path, method: str, scheme: str, bounded: bool) -> dict:
    """One run in this process (bounded: as shipped; else every candidate's sum runs to its end)."""
    import tlq.rescale as rescale
    from tlq.api import quantize as run
    from tlq.recipe import Recipe

    shipped = rescale._BlockObjective.bounded
    if not bounded:
        rescale._BlockObjective.bounded = lambda self, scales, above: shipped(self, scales, None)
    try:
        run(folder, out, DATA / "calib.json", DATA, Recipe(method=method, scheme=scheme, num_samples=128, seed=0),
            progress=False, resume=False)
    finally:
        rescale._BlockObjective.bounded = shipped
    return json.loads((out / "tlq_recipe.json").read_text())


def forwards(record: dict) -> dict[str, list[int]]:
    """Block forwards run and of full scoring, summed per block the groups feed (over layers)."""
    runs: dict[str, list[int]] = {}
    for layer in record["rescaled_groups"]:
        for group in layer:
            if "block_runs" in group:
                total = runs.setdefault(group["block"], [0, 0])
                total[0] += group["block_runs"]
                total[1] += group["block_runs_full"]
    return runs


def same_outputs(a: Path, b: Path) -> bool:
    files = sorted(p.name for p in a.iterdir() if p.suffix == ".safetensors")
    return bool(files) and files == sorted(p.name for p in b.iterdir() if p.suffix == ".safetensors") and all(
        filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def cell(model: str, scheme: str, method: str, tmp: Path) -> dict:
    kind, scale = SCHEMES[scheme]
    folder = variant(model, kind, scale)
    outs = {mode: tmp / f"{model}-{scheme}-{method}-{mode}" for mode in ("bounded", "full")}
    records = {mode: quantize(folder, outs[mode], method, scheme, mode == "bounded") for mode in outs}
    runs = forwards(records["bounded"])
    assert forwards(records["full"]) == {b: [n, n] for b, (_, n) in runs.items()}, "full scoring ran every forward"
    return {"model": model, "variant": folder.name, "scheme": scheme, "method": method,
            "identical": same_outputs(outs["bounded"], outs["full"]),
            "block_runs": {b: r[0] for b, r in runs.items()}, "block_runs_full": {b: r[1] for b, r in runs.items()},
            "rescale_seconds": {mode: records[mode]["phase_seconds"]["rescale"] for mode in outs}}


def table(rows: list[dict]) -> str:
    blocks = sorted({b for r in rows for b in r["block_runs"]})
    lines = ["Share of the scale search's block forwards run with the bound (1.00 = every candidate scored in full), "
             "per block the groups feed; outputs compared byte for byte with full scoring.", "",
             "| model | scheme | method | " + " | ".join(blocks) + " | all | rescale s (bounded / full) | outputs |",
             "|---|---|---|" + "---|" * len(blocks) + "---|---|---|"]
    for r in rows:
        shares = [f"{r['block_runs'][b] / r['block_runs_full'][b]:.2f}" if b in r["block_runs"] else "" for b in blocks]
        total = sum(r["block_runs"].values()) / max(sum(r["block_runs_full"].values()), 1)
        seconds = r["rescale_seconds"]
        lines.append(f"| {r['model']} | {r['scheme']} | {r['method']} | " + " | ".join(shares) +
                     f" | **{total:.2f}** | {seconds['bounded']:.1f} / {seconds['full']:.1f} | "
                     f"{'identical' if r['identical'] else 'DIFFER'} |")
    return "\n".join(lines) + "\n"


def cell_arguments(parser: argparse.ArgumentParser, models=MODELS, methods=METHODS) -> None:
    """The flags that narrow the cells (comma lists): models, methods, schemes."""
    parser.add_argument("--models", default=",".join(models))
    parser.add_argument("--methods", default=",".join(methods))
    parser.add_argument("--schemes", default=",".join(SCHEMES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cell_arguments(parser)
    parser.add_argument("--grid-order", action="store_true",
                        help="score the candidates in the grid's order instead of coarse to fine (for comparison)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.grid_order:
        import tlq.quant.scaling as scaling
        scaling._coarse_to_fine = lambda trials: list(range(len(trials)))
    if not (DATA / "calib.json").exists():
        tlq("synth", "--out", str(DATA), "--calib", "512", "--test", "1000")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            for scheme in args.schemes.split(","):
                for method in args.methods.split(","):
                    rows.append(cell(model, scheme, method, Path(tmp)))
                    print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch
    (out / "results.json").write_text(json.dumps({"cells": rows, "order": "grid" if args.grid_order else "coarse to fine",
                                                  "torch": torch.__version__}, indent=1) + "\n")
    (out / "table.md").write_text(table(rows))
    print(table(rows))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
