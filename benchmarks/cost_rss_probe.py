"""Where the memory `tlq plan` does not count goes: resident memory of one process after each step a
`tlq quantize` run takes before calibrating (imports, model load, processor and samples, one forward).

    .venv/bin/python benchmarks/cost_rss_probe.py runs/cost/curves/h512-l2-img256 [MORE ...] \
        [--calib runs/cost/curves/calib] [--samples 64] [--out benchmarks/results/cost/rss_probe]

Each checkpoint is probed in its own fresh interpreter (the curve points' checkpoints from
benchmarks/cost_curves.py). Writes results.json and table.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return round(int(line.split()[1]) / 1024, 1)
steps = [("python + torch", None)]
import torch
steps[0] = ("python + torch", rss())
import transformers, tlq.api, tlq.engine
steps.append(("transformers + tlq imports", rss()))
from tlq.api import prepare_samples
from tlq.models import load_model
from tlq.models.processing import load_processor
from tlq.recipe import Recipe
model_dir, calib, samples = sys.argv[1], sys.argv[2], int(sys.argv[3])
model, adapter = load_model(model_dir)
params = round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1)
steps.append(("model loaded", rss()))
processor = load_processor(model_dir)
prepared = prepare_samples(model, adapter, processor, f"{calib}/calib.json", calib, Recipe(num_samples=samples))
steps.append((f"processor + {samples} samples prepared", rss()))
inputs = round(sum(v.numel() * v.element_size() for s in prepared for v in s.inputs.values()) / 2**20, 1)
with torch.no_grad():
    model(**prepared[0].inputs)
steps.append(("one forward", rss()))
print(json.dumps({"steps": steps, "parameters_mib": params, "sample_inputs_mib": inputs}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--calib", type=Path, default=Path("runs/cost/curves/calib"))
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cost/rss_probe"))
    args = parser.parse_args()
    rows = []
    for model in args.models:
        proc = subprocess.run([sys.executable, "-c", PROBE, str(model), str(args.calib), str(args.samples)],
                              capture_output=True, text=True, check=True)
        rows.append({"model": model.name, **json.loads(proc.stdout.strip().splitlines()[-1])})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| checkpoint | parameters MiB | sample inputs MiB | " + " | ".join(s for s, _ in rows[0]["steps"]) + " |",
             "|---|---|---|" + "---|" * len(rows[0]["steps"])]
    for row in rows:
        lines.append(f"| {row['model']} | {row['parameters_mib']} | {row['sample_inputs_mib']} | "
                     + " | ".join(f"{v:.0f}" for _, v in row["steps"]) + " |")
    (args.out / "table.md").write_text("Resident MiB after each step (one fresh process per checkpoint).\n\n"
                                       + "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
