"""Which skill a reference model lacks: first-answer-word accuracy per question type, on bare and full scenes.

    python -m tlq.reference.diagnose runs/models/qwen2_vl-large [--images 64] [--out skills.json]

Teacher-forced, one question per image, every image drawn so that the question type can be asked (a digit
is always drawn for "digit"). Bare scenes (4x4 cells, no background) separate reading an object from finding
it among background tokens; a type that fails on both points at the vision tower (how Qwen2-VL's slow shape
learning was found: models/reference/attempts/README.md).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from tlq.data.batching import collate
from tlq.data.synthetic import QUESTION_TYPES
from tlq.reference.train import TRAIN_SCENES, ZOOMED_SCENES, _sample

SCENES = {"bare": ZOOMED_SCENES, "full": TRAIN_SCENES}


def skill_accuracy(model, processor, images: int = 64, seed: int = 12345) -> dict[str, dict[str, float]]:
    """{scene: {question type: accuracy of the first answer token}} over `images` images per cell."""
    pad_id = processor.tokenizer.pad_token_id
    result: dict[str, dict[str, float]] = {}
    for scene_name, scenes in SCENES.items():
        result[scene_name] = {}
        for kind in QUESTION_TYPES:
            config = replace(scenes, always_ask=(kind,), questions_per_image=1,
                             digit_probability=1.0 if kind == "digit" else scenes.digit_probability)
            rng = np.random.default_rng(seed)
            inputs, labels = collate([_sample(rng, processor, config) for _ in range(images)], pad_id)
            with torch.no_grad():
                predicted = model(**inputs).logits[:, :-1].argmax(-1)
            target = labels[:, 1:]
            first = (target != -100).int().argmax(-1)  # position of each row's first answer token
            rows = torch.arange(target.shape[0])
            result[scene_name][kind] = round(float((predicted[rows, first] == target[rows, first]).float().mean()), 4)
    return result


def main(argv: list[str] | None = None) -> None:
    from tlq.models import load_model
    from tlq.models.processing import load_processor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--images", type=int, default=64, help="images per scene kind and question type")
    parser.add_argument("--out", type=Path, default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    model = load_model(args.model, dtype="float32")[0].eval()
    table = skill_accuracy(model, load_processor(args.model), args.images)
    for scene_name, row in table.items():
        print(f"{scene_name:5s} " + "  ".join(f"{kind} {acc:.3f}" for kind, acc in row.items()))
    if args.out:
        args.out.write_text(json.dumps({"model": str(args.model), "images": args.images, **table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
