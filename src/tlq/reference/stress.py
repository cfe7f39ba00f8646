"""Outlier variants: a documented stress transform that keeps the FP function and breaks naive PTQ.

Briefly trained small models have none of the outlier channels that make PTQ of real LLMs hard, so
round-to-nearest barely hurts them. For k channels per norm -> Linears scaling group (input_layernorm
-> q,k,v and post_attention_layernorm -> gate,up) this rescales
    weight outliers:     norm.weight[c] /= s,   W[:, c] *= s   (large weight columns: W-only schemes suffer)
    activation outliers: norm.weight[c] *= s,   W[:, c] /= s   (large activation channels: W*A8 suffers)
    both:                k channels of each kind, disjoint (real LLMs have both)
The product is unchanged, so the FP model computes the same function up to float rounding. The
variant's `tlq_stress.json` records kind, s, k, seed and the channels; it is a benchmark device, never
applied to a user's model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tlq.models import load_model
from tlq.models.processing import load_processor
from tlq.reference.checkpoint import save_checkpoint

STRESS_FILE = "tlq_stress.json"
KINDS = ("weight", "activation", "both")


@torch.no_grad()
def apply_outliers(model, adapter, kind: str, scale: float, channels: int, seed: int) -> dict:
    """Rescale `channels` random channels of every norm-fed group by `scale`; returns the record."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    generator = torch.Generator().manual_seed(seed)
    chosen: dict[str, dict[str, list[int]]] = {}
    kinds = ("weight", "activation") if kind == "both" else (kind,)
    for index, layer in enumerate(adapter.layers(model)):
        for group in adapter.scaling_groups:
            source = layer.get_submodule(group.source)
            if isinstance(source, torch.nn.Linear):
                continue  # only norm -> Linear groups: a norm's weight is a pure per-channel scale
            order = torch.randperm(source.weight.numel(), generator=generator)
            record = chosen.setdefault(f"{index}.{group.source}", {})
            for position, which in enumerate(kinds):
                picked = order[position * channels:(position + 1) * channels]
                factor = 1.0 / scale if which == "weight" else scale
                source.weight[picked] *= factor
                for target in group.folded:
                    layer.get_submodule(target).weight[:, picked] /= factor
                record[which] = sorted(picked.tolist())
    return {"kind": kind, "scale": scale, "channels_per_group": channels, "seed": seed, "channels": chosen}


def make_variant(model_dir: str | Path, out_dir: str | Path, kind: str, scale: float = 32.0, channels: int = 4,
                 seed: int = 0, overwrite: bool = False) -> Path:
    """Write the outlier variant of the checkpoint in `model_dir` to `out_dir` (atomically; an existing
    `out_dir` is replaced only with `overwrite`)."""
    from tlq.export import staged_output

    model, adapter = load_model(model_dir, dtype="float32")
    processor = load_processor(model_dir)
    record = apply_outliers(model, adapter, kind, scale, channels, seed)
    record["source"] = str(model_dir)
    out_dir = Path(out_dir)
    with staged_output(out_dir, overwrite, None, None) as staging:
        save_checkpoint(model, processor, staging)
        for extra in ("training.json",):
            if (Path(model_dir) / extra).is_file():
                shutil.copy2(Path(model_dir) / extra, staging / extra)
        (staging / STRESS_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return out_dir
