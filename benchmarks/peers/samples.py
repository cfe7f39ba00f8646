"""Write tlq's calibration samples as safetensors, so that a peer in its own venv calibrates on exactly them.

    .venv/bin/python benchmarks/peers/samples.py --model DIR --calib FILE --images DIR --num-samples 128 \
        --seed 0 --out FILE.safetensors

The records are drawn as `tlq quantize` draws them (tlq.data.load_records with the same count and
seed) and rendered by the model's processor and chat template; each sample's tensors are stored as
"{index}/{name}" (input_ids, attention_mask, pixel_values, image_grid_thw or image_sizes, ..., labels).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def write_samples(model: str, calib: str, images: str, num_samples: int, seed: int, out: str | Path,
                  max_length: int | None = None) -> Path:
    from safetensors.torch import save_file

    from tlq.data import build_samples, load_records
    from tlq.guards import atomic_file
    from tlq.models.processing import load_processor
    from tlq.recipe import Recipe

    recipe = Recipe(num_samples=num_samples, seed=seed)
    records = load_records(calib, images, recipe.num_samples, recipe.seed)
    samples = build_samples(records, load_processor(model), max_length or recipe.max_length)
    tensors = {}
    for i, sample in enumerate(samples):
        for name, value in sample.inputs.items():
            tensors[f"{i}/{name}"] = value.contiguous()
        tensors[f"{i}/labels"] = sample.labels.contiguous()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as staged:
        save_file(tensors, str(staged), metadata={"samples": str(len(samples)), "seed": str(seed), "calib": calib})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    print(write_samples(args.model, args.calib, args.images, args.num_samples, args.seed, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
