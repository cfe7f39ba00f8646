"""Does rescaling the MoE block's input (norm -> router + every expert's gate/up) help? A side-by-side on tiny
random Qwen3-VL-MoE checkpoints (8 experts, top 2), the only MoE models this machine can build.

    .venv/bin/python benchmarks/moe_rescale.py --out benchmarks/results/moe_rescale

For each model seed, method and scheme: the checkpoint with outliers planted in every norm-fed group
(`tlq stress`'s transform: activation outliers for W4A8, weight outliers for weight-only schemes, s = 32,
2 channels), calibrated in memory on synthetic records with the MoE block's scaling group (tlq's adapter) and
without it (the attention's groups only, as before), then run fake-quantized as deployed (W4A8: per-token
int8 inputs). The score is the relative L2 error of the logits against the FP model on the calibration
samples (random models have no answers to score). The two runs differ only in that group.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

CELLS = (("smoothquant", "W4A8"), ("awq", "W4A8"), ("tlq", "W4A8"), ("awq", "W3A16-g32"), ("tlq", "W3A16-g32"))


def logit_error(folder: Path, calib: Path, method: str, scheme: str, moe_group: bool) -> float:
    from tlq.activations import install_activation_quant
    from tlq.api import prepare_samples
    from tlq.engine import quantize_layers
    from tlq.importance import compute_importance
    from tlq.models import load_model
    from tlq.models.processing import load_processor
    from tlq.recipe import Recipe
    from tlq.reference.stress import apply_outliers
    from tlq.weighting import token_weights

    model, adapter = load_model(folder)
    apply_outliers(model, adapter, "activation" if scheme.endswith("A8") else "weight", 32.0, 2, seed=0)
    recipe = Recipe(method=method, scheme=scheme, num_samples=8)
    samples = prepare_samples(model, adapter, load_processor(folder), calib, calib.parent, recipe)
    with torch.no_grad():
        want = [model(**s.inputs).logits for s in samples]
    if not moe_group:
        adapter = dataclasses.replace(adapter, scaling_groups=adapter.scaling_groups[:-1])
    weights = token_weights(compute_importance(model, adapter, samples)) if method == "tlq" else None
    result = quantize_layers(model, adapter, samples, recipe, token_weights=weights, progress=False)
    for name, quantized in result.quantized.items():
        model.get_submodule(name).weight.data = quantized.weight
    install_activation_quant([model.get_submodule(n) for n in result.quantized], recipe.resolved_scheme())
    with torch.no_grad():
        got = [model(**s.inputs).logits for s in samples]
    return sum(float((g - w).norm() / w.norm()) for g, w in zip(got, want)) / len(want)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="tiny model seeds")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    from tlq.data.synthetic import SceneConfig, vocabulary, write_split
    from tlq.reference.checkpoint import ModelSize, build_tiny_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        calib = write_split(root / "calib", 8, seed=11, config=SceneConfig(grid=4, scene=3, questions_per_image=3),
                            name="calib")
        for seed in (int(s) for s in args.seeds.split(",")):
            folder = build_tiny_checkpoint("qwen3_vl_moe", root / f"moe{seed}", words=vocabulary(),
                                           size=ModelSize(image_size=64), seed=seed)
            for method, scheme in CELLS:
                row = {"seed": seed, "method": method, "scheme": scheme,
                       "with_moe_group": logit_error(folder, Path(calib), method, scheme, True),
                       "attention_only": logit_error(folder, Path(calib), method, scheme, False)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"cells": rows, "torch": torch.__version__}, indent=1) + "\n")
    lines = ["Relative logit error against FP (mean over the calibration samples), tiny random Qwen3-VL-MoE, "
             "outliers s = 32; lower is better.", "",
             "| method | scheme | seed | MoE block rescaled | attention only | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['scheme']} | {r['seed']} | {r['with_moe_group']:.4f} | "
                     f"{r['attention_only']:.4f} | {r['with_moe_group'] / r['attention_only']:.2f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
