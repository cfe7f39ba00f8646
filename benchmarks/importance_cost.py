"""What TLQ's gradient pass costs, against one plain forward + backward over the same calibration samples.

    python benchmarks/importance_cost.py [--model models/reference/qwen2_vl-small] [--samples 128]

Issue 4 allows TLQ's importance pass at most one extra forward + backward over the calibration set. Timed
here, each the median of --repeats runs, on the same samples and device: a forward alone (no autograd), a
forward + backward of the answer loss with frozen parameters (what "one forward + backward" costs), the
full-autograd importance pass (`--importance-pass full`) and the streamed one (default; one layer on the
device, each layer recomputed in the backward). Writes results.json and table.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "reference" / "qwen2_vl-small")
    parser.add_argument("--calib", type=Path, default=ROOT / "runs" / "data" / "vqa" / "calib.json")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "importance_cost")
    args = parser.parse_args()

    from tlq.api import prepare_samples
    from tlq.activations import to_device
    from tlq.importance import compute_importance
    from tlq.models import load_model
    from tlq.models.processing import load_processor
    from tlq.recipe import Recipe

    if not args.calib.exists():
        sys.exit(f"{args.calib} does not exist: run `tlq synth --out {args.calib.parent}` first")
    model, adapter = load_model(args.model, dtype="float32")
    model.eval().requires_grad_(False)
    recipe = Recipe(method="tlq", num_samples=args.samples)
    samples = prepare_samples(model, adapter, load_processor(args.model), args.calib, args.calib.parent, recipe)
    device = torch.device("cpu")

    def forward() -> None:
        with torch.no_grad():
            for s in samples:
                model(**to_device(s.inputs, device), labels=s.labels, use_cache=False)

    def forward_backward() -> None:
        leaf = lambda module, inputs, output: output.detach().requires_grad_(True)  # noqa: E731
        handle = model.get_input_embeddings().register_forward_hook(leaf)
        try:
            with torch.enable_grad():
                for s in samples:
                    model(**to_device(s.inputs, device), labels=s.labels, use_cache=False).loss.backward()
        finally:
            handle.remove()

    rows = {
        "forward": _median_seconds(forward, args.repeats),
        "forward + backward": _median_seconds(forward_backward, args.repeats),
        "importance, full pass": _median_seconds(
            lambda: compute_importance(model, adapter, samples, "fisher", device, streamed=False), args.repeats),
        "importance, streamed pass": _median_seconds(
            lambda: compute_importance(model, adapter, samples, "fisher", device, streamed=True), args.repeats),
    }
    base = rows["forward + backward"]
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"model": str(args.model), "samples": len(samples), "tokens": sum(s.num_tokens for s in samples),
              "threads": torch.get_num_threads(), "repeats": args.repeats, "command": " ".join(sys.argv),
              "seconds": {k: round(v, 3) for k, v in rows.items()},
              "relative_to_forward_backward": {k: round(v / base, 3) for k, v in rows.items()}}
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"TLQ gradient pass against one forward + backward: {args.model.name}, {len(samples)} calibration "
             f"samples, CPU, {torch.get_num_threads()} threads, median of {args.repeats} "
             f"(`python benchmarks/importance_cost.py`).", "",
             "| pass | seconds | x forward + backward |", "|---|---|---|"]
    lines += [f"| {k} | {v:.2f} | {v / base:.2f} |" for k, v in rows.items()]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
