"""Does rescaling the MoE layer's inputs help: the block's (norm -> router + every expert's gate/up) and each
expert's own (up -> down)? A side-by-side on tiny random Qwen3-VL-MoE checkpoints (8 experts, top 2), the
only MoE models this machine can build.

    .venv/bin/python benchmarks/moe_rescale.py --out benchmarks/results/moe_rescale

For each model seed, method and scheme: the checkpoint with outliers planted in every norm-fed group
(`tlq stress`'s transform: activation outliers for W4A8, weight outliers for weight-only schemes, s = 32,
2 channels) and, likewise, in 2 channels of every expert's down-projection input (up's rows x s, down's
columns / s: the same function), calibrated in memory on synthetic records three ways: the attention's
groups only; with the MoE block's group; with the block's and every expert's up -> down group (tlq's
adapter). Each is then run fake-quantized as deployed (W4A8: per-token int8 inputs). The score is the
relative L2 error of the logits against the FP model on the calibration samples (random models have no
answers to score). The runs differ only in their scaling groups.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

SAMPLES = 32  # about 250 routed tokens per expert: most experts pass the default --expert-min-tokens 64
CELLS = (("smoothquant", "W4A8"), ("awq", "W4A8"), ("tlq", "W4A8"), ("awq", "W3A16-g32"), ("tlq", "W3A16-g32"))


GROUPS = ("attention_only", "with_moe_group", "with_expert_groups")


def plant_expert_outliers(model, adapter, kind: str, scale: float, channels: int, seed: int) -> None:
    """`channels` random channels of every expert's down-projection input scaled by `scale` (activation
    outliers) or 1 / `scale` (weight outliers in down's columns), folded so that the model is unchanged."""
    generator = torch.Generator().manual_seed(seed)
    factor = scale if kind == "activation" else 1.0 / scale
    with torch.no_grad():
        for layer in adapter.layers(model):
            for expert in layer.get_submodule(adapter.experts.module):
                picked = torch.randperm(expert.up_proj.out_features, generator=generator)[:channels]
                expert.up_proj.weight[picked] *= factor
                expert.down_proj.weight[:, picked] /= factor


def logit_error(folder: Path, calib: Path, method: str, scheme: str, groups: str) -> float:
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
    kind = "activation" if scheme.endswith("A8") else "weight"
    apply_outliers(model, adapter, kind, 32.0, 2, seed=0)
    plant_expert_outliers(model, adapter, kind, 32.0, 2, seed=0)
    recipe = Recipe(method=method, scheme=scheme, num_samples=SAMPLES)
    samples = prepare_samples(model, adapter, load_processor(folder), calib, calib.parent, recipe)
    with torch.no_grad():
        want = [model(**s.inputs).logits for s in samples]
    dense = tuple(g for g in adapter.scaling_groups if not g.routed)
    kept = {"attention_only": dense[:-1], "with_moe_group": dense,
            "with_expert_groups": adapter.scaling_groups}[groups]
    adapter = dataclasses.replace(adapter, scaling_groups=kept)
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
        calib = write_split(root / "calib", SAMPLES, seed=11, config=SceneConfig(grid=4, scene=3, questions_per_image=3),
                            name="calib")
        for seed in (int(s) for s in args.seeds.split(",")):
            folder = build_tiny_checkpoint("qwen3_vl_moe", root / f"moe{seed}", words=vocabulary(),
                                           size=ModelSize(image_size=64), seed=seed)
            for method, scheme in CELLS:
                row = {"seed": seed, "method": method, "scheme": scheme,
                       **{groups: logit_error(folder, Path(calib), method, scheme, groups) for groups in GROUPS}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"cells": rows, "torch": torch.__version__}, indent=1) + "\n")
    lines = ["Relative logit error against FP (mean over the calibration samples), tiny random Qwen3-VL-MoE, "
             "outliers s = 32 in the norm-fed groups and the experts' down inputs; lower is better.", "",
             "| method | scheme | seed | attention only | + MoE block | + experts' up -> down | block / attention "
             "| experts / block |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b, e = (r[g] for g in GROUPS)
        lines.append(f"| {r['method']} | {r['scheme']} | {r['seed']} | {a:.4f} | {b:.4f} | {e:.4f} | "
                     f"{b / a:.2f} | {e / b:.2f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
