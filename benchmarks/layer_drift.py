"""How far a grown model's layer copies moved apart: for each decoder Linear of copy c of a grown layer, the
relative distance ||W_c - W_first|| / ||W_first|| to the first copy of its group (tlq.reference.train's
`deepen_state` made them equal up to the residual writers' shared 1/k scale).

    .venv/bin/python benchmarks/layer_drift.py models/reference/qwen2_vl-deep --copies 3 \
        --out benchmarks/results/qwen2_vl-deep/layer_drift

Writes results.json and table.md (min-max over groups and copies, per Linear role).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file

from tlq.models import adapter_for, read_model_type


def drift(model_dir: Path, copies: int) -> dict[str, list[float]]:
    """{Linear role: relative distances of every later copy to its group's first copy}."""
    state = load_file(str(model_dir / "model.safetensors"))
    adapter = adapter_for(read_model_type(model_dir))
    # The checkpoint may store the decoder under another prefix than the module tree's (the hub layout).
    first_role = f".0.{adapter.linear_names[0]}.weight"
    prefix = next(k[:-len(first_role)] for k in state if k.endswith(first_role) and ".layers" in k)
    layers = 1 + max(int(k[len(prefix) + 1:].split(".")[0]) for k in state if k.startswith(prefix + "."))
    out: dict[str, list[float]] = {}
    for role in adapter.linear_names:
        for first in range(0, layers, copies):
            base = state[f"{prefix}.{first}.{role}.weight"].float()
            for later in range(first + 1, first + copies):
                other = state[f"{prefix}.{later}.{role}.weight"].float()
                out.setdefault(role, []).append(round(float((other - base).norm() / base.norm()), 4))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--copies", type=int, required=True, help="copies per grown layer (deep / shallow depth)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = drift(args.model_dir, args.copies)
    lines = [f"Relative distance of each later copy to the first copy of its group ({args.model_dir}, "
             f"{args.copies} copies per grown layer):", "", "| Linear | min | max |", "|---|---|---|"]
    lines += [f"| {role} | {min(v):.2f} | {max(v):.2f} |" for role, v in result.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"model": str(args.model_dir), "copies": args.copies,
                                                       "relative_distance": result}, indent=1) + "\n")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
