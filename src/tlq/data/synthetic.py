"""A procedural image-question dataset with the token statistics that make VLM calibration hard.

Each image is a canvas of CELL x CELL pixel cells, one cell per image token of the reference models.
A small scene (coloured shapes, sometimes a seven-segment digit) occupies a few cells at a random place;
the rest is textured background. So image tokens outnumber text tokens, most of them are background,
and each answer depends on a handful of them, as with real VLM inputs. Everything is drawn with numpy
(no fonts), deterministically from a seed, and written in the same ShareGPT4V JSON + PNG layout that
users give tlq, so generating a split also exercises the calibration loader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlq.errors import TlqError

CELL = 16
COLORS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (235, 215, 40),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "cross")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
QUESTION_TYPES = ("color", "shape", "count", "exists", "digit")
_TEMPLATES = {
    "color": "what color is the {shape} ?",
    "shape": "what shape is the {color} object ?",
    "count": "how many shapes are there ?",
    "exists": "is there a {color} {shape} ?",
    "digit": "which digit is shown ?",
}
# Seven-segment digits: segments a b c d e f g.
_SEGMENTS = {0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd", 6: "afgedc", 7: "abc",
             8: "abcdefg", 9: "abcfgd"}


def vocabulary() -> list[str]:
    """Every word the dataset's questions and answers use (for the reference tokenizer)."""
    words: list[str] = []
    for template in _TEMPLATES.values():
        words += [w for w in template.split() if not w.startswith("{")]
    words += list(COLORS) + list(SHAPES) + list(NUMBER_WORDS) + ["yes", "no", "object"]
    return sorted(set(words))


@dataclass(frozen=True)
class SceneConfig:
    grid: int = 8  # canvas is grid x grid cells
    scene: int = 4  # the objects live in a scene x scene block of cells
    max_objects: int = 4
    digit_probability: float = 0.5
    questions_per_image: int = 1
    one_per_type: bool = True  # False: any mix of the candidate questions (more supervision per image)
    always_ask: tuple[str, ...] = ()  # question types asked whenever the image allows them (training mixes)


def _draw_shape(canvas: np.ndarray, y: int, x: int, shape: str, color: tuple[int, int, int]) -> None:
    yy, xx = np.mgrid[0:CELL, 0:CELL]
    c = (CELL - 1) / 2
    if shape == "circle":
        mask = (yy - c) ** 2 + (xx - c) ** 2 <= (CELL * 0.42) ** 2
    elif shape == "square":
        mask = (abs(yy - c) <= CELL * 0.36) & (abs(xx - c) <= CELL * 0.36)
    elif shape == "triangle":
        mask = (yy >= 2) & (yy <= CELL - 3) & (abs(xx - c) <= (yy - 1) * 0.5)
    else:  # cross
        mask = ((abs(yy - c) <= CELL * 0.14) | (abs(xx - c) <= CELL * 0.14)) & (abs(yy - c) <= CELL * 0.44) & (
            abs(xx - c) <= CELL * 0.44)
    region = canvas[y:y + CELL, x:x + CELL]
    region[mask] = color


def _draw_digit(canvas: np.ndarray, y: int, x: int, digit: int) -> None:
    """A seven-segment digit filling a 2 x 2 block of cells (a digit is too fine for one 16 px token)."""
    h, w, t = 2 * CELL - 6, CELL - 2, 4
    top, left = y + 3, x + (2 * CELL - w) // 2
    boxes = {
        "a": (0, 0, t, w), "g": (h // 2 - 1, 0, t, w), "d": (h - t, 0, t, w),
        "f": (0, 0, h // 2, t), "b": (0, w - t, h // 2, t), "e": (h // 2, 0, h // 2, t), "c": (h // 2, w - t, h // 2, t),
    }
    for segment in _SEGMENTS[digit]:
        dy, dx, hh, ww = boxes[segment]
        canvas[top + dy:top + dy + hh, left + dx:left + dx + ww] = (250, 250, 250)


def make_example(rng: np.random.Generator, config: SceneConfig = SceneConfig()) -> tuple[np.ndarray, list[dict]]:
    """One image (H x W x 3 uint8) and its question/answer pairs: [{'type', 'question', 'answer'}]."""
    size = config.grid * CELL
    base = rng.integers(20, 70, size=3)
    canvas = (base + rng.normal(0, 6, size=(size, size, 3))).clip(0, 255).astype(np.uint8)
    top, left = rng.integers(0, config.grid - config.scene + 1, size=2)
    free = list(range(config.scene * config.scene))
    digit = None
    if rng.random() < config.digit_probability:
        dy, dx = (int(v) for v in rng.integers(0, config.scene - 1, size=2))
        digit = int(rng.integers(0, 10))
        _draw_digit(canvas, (top + dy) * CELL, (left + dx) * CELL, digit)
        block = {(dy + a) * config.scene + dx + b for a in (0, 1) for b in (0, 1)}
        free = [c for c in free if c not in block]
    cells = rng.permutation(free)
    count = int(rng.integers(1, config.max_objects + 1))
    objects = []
    for k in range(count):
        cy, cx = divmod(int(cells[k]), config.scene)
        color = str(rng.choice(list(COLORS)))
        shape = str(rng.choice(SHAPES))
        objects.append((color, shape))
        _draw_shape(canvas, (top + cy) * CELL, (left + cx) * CELL, shape, COLORS[color])

    candidates: list[dict] = []
    shapes = [s for _, s in objects]
    colors = [c for c, _ in objects]
    for color, shape in objects:
        if shapes.count(shape) == 1:
            candidates.append({"type": "color", "question": _TEMPLATES["color"].format(shape=shape), "answer": color})
        if colors.count(color) == 1:
            candidates.append({"type": "shape", "question": _TEMPLATES["shape"].format(color=color), "answer": shape})
    candidates.append({"type": "count", "question": _TEMPLATES["count"], "answer": NUMBER_WORDS[count]})
    if rng.random() < 0.5:
        color, shape = objects[int(rng.integers(0, count))]
        answer = "yes"
    else:
        while True:
            color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
            if (color, shape) not in objects:
                break
        answer = "no"
    candidates.append({"type": "exists", "question": _TEMPLATES["exists"].format(color=color, shape=shape),
                       "answer": answer})
    if digit is not None:
        candidates.append({"type": "digit", "question": _TEMPLATES["digit"], "answer": NUMBER_WORDS[digit]})
    if not config.one_per_type:
        order = sorted(rng.permutation(len(candidates)).tolist(),
                       key=lambda i: candidates[i]["type"] not in config.always_ask)
        return canvas, [candidates[int(i)] for i in order[:config.questions_per_image]]
    # Spread question types: at most one question of each type per image.
    by_type: dict[str, list[dict]] = {}
    for qa in candidates:
        by_type.setdefault(qa["type"], []).append(qa)
    types = list(by_type)
    rng.shuffle(types)
    chosen = [by_type[t][int(rng.integers(0, len(by_type[t])))] for t in types[:config.questions_per_image]]
    return canvas, chosen


def to_record(image_name: str | list[str], qas: list[dict], record_id: str, video: bool = False) -> dict[str, Any]:
    """A record of one image, several images, or (`video`) one video whose frames are `image_name`."""
    conversations = []
    placeholders = "<video>\n" if video else "<image>\n" * (len(image_name) if isinstance(image_name, list) else 1)
    for i, qa in enumerate(qas):
        conversations.append({"from": "human", "value": (placeholders if i == 0 else "") + qa["question"]})
        conversations.append({"from": "gpt", "value": qa["answer"]})
    media = {"video": image_name, "fps": VIDEO_FPS} if video else {"image": image_name}
    return {"id": record_id, **media, "conversations": conversations, "types": [qa["type"] for qa in qas]}


# Calibration conditions (`tlq synth --condition`): where token importance should matter, because most
# tokens carry nothing the answer needs. The test and validation splits are always "standard".
CONDITIONS = {
    "standard": "the 4x4-cell scene on an 8x8-cell canvas (the reference models' training distribution)",
    "background": "the 4x4-cell scene on a 16x16-cell canvas: 4x the image tokens, 15/16 of them background",
    "padded": "the standard 8x8-cell image centred on a black 16x16-cell canvas (letterboxing): 3/4 padding",
    "multi_image": "two images per record, an unrelated one first; the question is about the second",
    "long_prompt": "five unrelated questions (about 30 words) before the one that is answered",
    "video": "a 4-frame clip at 2 frames per second: the standard image drifting half a cell per frame (a video "
             "record, for the Qwen-VL families)",
}
VIDEO_FRAMES, VIDEO_FPS = 4, 2
_PADDING = 4  # cells of black on each side of a padded canvas


def _condition_example(rng: np.random.Generator, condition: str) -> tuple[list[np.ndarray], list[dict]]:
    if condition == "background":
        canvas, qas = make_example(rng, SceneConfig(grid=16))
        return [canvas], qas
    canvas, qas = make_example(rng)
    if condition == "padded":
        border = _PADDING * CELL
        padded = np.zeros((canvas.shape[0] + 2 * border, canvas.shape[1] + 2 * border, 3), dtype=np.uint8)
        padded[border:-border, border:-border] = canvas
        return [padded], qas
    if condition == "multi_image":
        distractor, _ = make_example(rng)
        return [distractor, canvas], qas
    if condition == "video":  # the canvas rolls sideways: the scene moves, the background wraps around
        return [np.roll(canvas, k * CELL // 2, axis=1) for k in range(VIDEO_FRAMES)], qas
    if condition == "long_prompt":
        filler = [make_example(rng)[1][0]["question"] for _ in range(5)]
        return [canvas], [{**qas[0], "question": " ".join(filler + [qas[0]["question"]])}] + qas[1:]
    return [canvas], qas


def write_split(out_dir: str | Path, num_images: int, seed: int, config: SceneConfig = SceneConfig(),
                name: str = "data", condition: str = "standard") -> Path:
    """Write `num_images` records' images under out_dir/images/ and out_dir/{name}.json; returns the JSON path.

    Image file names carry the seed, so splits made from different seeds never share an image file.
    A `condition` other than standard draws its records as CONDITIONS describes (the default config).
    """
    from PIL import Image

    if condition not in CONDITIONS:
        raise TlqError(f"unknown condition {condition!r}: use one of {', '.join(CONDITIONS)}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(num_images):
        if condition == "standard":
            canvas, qas = make_example(rng, config)
            canvases = [canvas]
        else:
            canvases, qas = _condition_example(rng, condition)
        names = [f"images/s{seed}_{i:05d}" + (f"_{k}" if len(canvases) > 1 else "") + ".png"
                 for k in range(len(canvases))]
        for image_name, canvas in zip(names, canvases):
            Image.fromarray(canvas).save(out_dir / image_name)
        records.append(to_record(names[0] if len(names) == 1 else names, qas, f"s{seed}_{i:05d}",
                                 video=condition == "video"))
        if condition != "standard":
            records[-1]["condition"] = condition
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path


# Seeds of the on-disk splits. Training draws fresh examples from its own seed and validates on
# seed 999 (tlq.reference.train); calibration and test never share a seed, so never an image.
# The validation split is for choosing options (defaults, budgets); the test split only reports.
SPLIT_SEEDS = {"calib": 1, "test": 2, "val": 3}


def write_splits(out_dir: str | Path, calib: int = 512, test: int = 1000, val: int = 0,
                 condition: str = "standard") -> dict[str, Path]:
    """The calibration pool (drawn under `condition`), the held-out test split and (val > 0) a validation
    split (both standard), one question per record."""
    return {name: write_split(out_dir, count, SPLIT_SEEDS[name], name=name,
                              condition=condition if name == "calib" else "standard")
            for name, count in (("calib", calib), ("test", test), ("val", val)) if count > 0}
