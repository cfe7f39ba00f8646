"""Where the gradient says the error matters: per-token importance laid back on the calibration images.

For a few calibration records of a calibration condition (`tlq synth --condition`), one backward pass of
the FP model (tlq.importance, Fisher score) gives each token's importance at every quantized Linear.
Each Linear's scores are normalised to mean 1 per sample (as the token weights are) and averaged over
all Linears, so a value of 1 is an average token. Image tokens are drawn on the image's merged-patch grid
(Qwen2-VL / Qwen2.5-VL: 2x2 patches per token), the text tokens as a strip below, on one log colour scale.

    .venv/bin/python benchmarks/importance_heatmaps.py --model models/reference/qwen2_vl-large \
        --calib runs/data/cond-background/calib.json --images runs/data/cond-background \
        --out benchmarks/results/qwen2_vl-large/importance_conditions/heatmap_background.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from tlq.api import prepare_samples
from tlq.data import load_records
from tlq.importance import compute_importance
from tlq.models import IMAGE, TOKEN_KIND_NAMES, load_model
from tlq.models.processing import load_processor
from tlq.recipe import Recipe

MERGE = 2  # Qwen2-VL merges 2x2 patches into one token


def mean_importance(importance, sample: int) -> torch.Tensor:
    """Per token: the mean over Linears of the Linear's score normalised to mean 1 over the sample."""
    rows = [scores[sample] / scores[sample].mean().clamp_min(1e-30) for scores in importance.scores.values()]
    return torch.stack(rows).mean(0)


def image_grids(sample, values: torch.Tensor) -> list[np.ndarray]:
    """The image tokens' values as one [h, w] array per image (order of the image_grid_thw rows)."""
    grids, position = [], 0
    image_positions = (sample.token_kinds == IMAGE).nonzero().squeeze(1)
    for t, h, w in sample.inputs["image_grid_thw"].tolist():
        count = t * (h // MERGE) * (w // MERGE)
        picked = values[image_positions[position:position + count]]
        grids.append(picked.reshape(t, h // MERGE, w // MERGE).mean(0).numpy())
        position += count
    return grids


def draw(records, samples, importance, tokenizer, out: Path, title: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from PIL import Image

    norm = LogNorm(vmin=0.05, vmax=20)
    columns = max(len(r.images) for r in records)
    fig, axes = plt.subplots(2 * len(records), columns, figsize=(max(8.0, 4.2 * columns), 5.2 * len(records)),
                             gridspec_kw={"height_ratios": [4, 1] * len(records)}, squeeze=False)
    summary = []
    for row, (record, sample) in enumerate(zip(records, samples)):
        values = mean_importance(importance, row)
        kinds = sample.token_kinds
        for k, (path, grid) in enumerate(zip(record.images, image_grids(sample, values))):
            ax = axes[2 * row, k]
            image = np.asarray(Image.open(path).convert("RGB"))
            ax.imshow(image)
            ax.imshow(np.clip(grid, 0.05, 20), cmap="magma", norm=norm, alpha=0.7,
                      extent=(0, image.shape[1], image.shape[0], 0), interpolation="nearest")
            ax.set_title(f"record {record.meta.get('id', row)}, image {k + 1}", fontsize=8)
            ax.axis("off")
        for k in range(len(record.images), columns):
            axes[2 * row, k].axis("off")
        strip = axes[2 * row + 1, 0]
        text = (kinds != IMAGE).nonzero().squeeze(1)
        words = tokenizer.convert_ids_to_tokens(sample.inputs["input_ids"][0, text].tolist())
        strip.imshow(np.clip(values[text].numpy()[None, :], 0.05, 20), cmap="magma", norm=norm, aspect="auto")
        strip.set_yticks([])
        strip.set_xticks(range(len(words)), words, rotation=90, fontsize=5)
        for k in range(1, columns):
            axes[2 * row + 1, k].axis("off")
        summary.append({TOKEN_KIND_NAMES[kind]: float(values[kinds == kind].mean())
                        for kind in range(len(TOKEN_KIND_NAMES)) if (kinds == kind).any()})
    fig.suptitle(title, fontsize=9)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="magma"), ax=axes.ravel().tolist(), shrink=0.3,
                 label="token importance (1 = average token)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return {"mean_importance_by_kind": summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--records", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="PNG path; a .json with the per-kind means goes beside it")
    args = parser.parse_args()
    model, adapter = load_model(args.model, dtype="float32")
    if not hasattr(model.config, "vision_config") or adapter.family not in ("qwen2_vl", "qwen2_5_vl"):
        raise SystemExit("heatmaps lay tokens on Qwen2-VL's merged-patch grid: use a qwen2_vl / qwen2_5_vl model")
    processor = load_processor(args.model)
    recipe = Recipe(num_samples=args.records, seed=args.seed)
    records = load_records(args.calib, args.images, recipe.num_samples, recipe.seed)
    samples = prepare_samples(model, adapter, processor, args.calib, args.images, recipe, records=records)
    importance = compute_importance(model, adapter, samples, "fisher", "cpu", streamed=False)
    condition = records[0].meta.get("condition", "standard")
    title = f"{Path(args.model).name}, calibration condition '{condition}':\nFisher token importance, mean over Linears"
    summary = draw(records, samples, importance, processor.tokenizer, Path(args.out), title)
    summary.update({"model": args.model, "calib": args.calib, "condition": condition, "seed": args.seed})
    Path(args.out).with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary["mean_importance_by_kind"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
