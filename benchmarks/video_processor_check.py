"""Does tlq's torchvision-free video path give what transformers' own video processors give?

Run in a venv that has torchvision (the serving check's .venv-vllm has it, and no tlq install):
    PYTHONPATH=src .venv-vllm/bin/python benchmarks/video_processor_check.py
For Qwen2-VL and Qwen3-VL video processors, at their hub defaults and at a tiny model's settings, on
synthetic frame sequences of several sizes and lengths, it compares tlq.models.video.FramesVideoProcessor
with the real processor: the grid (so the token count and layout), the patch tensor's shape, and how far
the pixel values are apart (PIL bicubic vs torchvision's antialiased bicubic resize). Then it renders one
chat with a video through the real Qwen2-VL / Qwen3-VL processors, once with their video processor and
once with tlq's, and compares the token ids. Writes benchmarks/results/video/{results.json,table.md}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "video"


def frames(count: int, height: int, width: int, seed: int):
    """Moving coloured squares on a textured background: content with edges, like real frames."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    out = []
    for t in range(count):
        img = base.copy()
        y, x = (7 * t) % max(height - 16, 1), (11 * t) % max(width - 16, 1)
        img[y:y + 16, x:x + 16] = (255, 32 * t % 255, 0)
        out.append(Image.fromarray(img))
    return out


SETTINGS = {  # label -> (real class name, constructor settings)
    "qwen2 hub defaults": ("Qwen2VLVideoProcessor", {}),
    "qwen2 tiny (patch 16, <= 64x64 px)": ("Qwen2VLVideoProcessor", {"patch_size": 16, "size": {
        "shortest_edge": 4 * 32 * 32, "longest_edge": 64 * 64}}),
    "qwen3 hub defaults": ("Qwen3VLVideoProcessor", {}),
    "qwen3 tiny (patch 16, <= 64x64 px)": ("Qwen3VLVideoProcessor", {"patch_size": 16, "size": {
        "shortest_edge": 4 * 32 * 32, "longest_edge": 64 * 64}}),
}
CLIPS = [(4, 64, 64), (6, 224, 320), (5, 480, 640)]  # frames, height, width (odd count: the last is repeated)


def compare_processors() -> list[dict]:
    import transformers

    from tlq.models.video import FramesVideoProcessor, frame_metadata

    rows = []
    for label, (name, settings) in SETTINGS.items():
        real = getattr(transformers, name)(**settings)
        ours = FramesVideoProcessor({**real.to_dict(), **settings}, "qwen3" if "Qwen3" in name else "qwen2")
        for count, height, width in CLIPS:
            clip = frames(count, height, width, seed=count)
            meta = [frame_metadata(count, 2.0)]
            want = real([clip], video_metadata=meta, do_sample_frames=False, return_tensors="pt")
            got = ours([clip], video_metadata=meta)
            a, b = want["pixel_values_videos"].float(), got["pixel_values_videos"].float()
            same_shape = tuple(a.shape) == tuple(b.shape)
            diff = (a - b).abs() if same_shape else None
            rows.append({"processor": label, "clip": f"{count} frames {height}x{width}",
                         "grid_real": want["video_grid_thw"].tolist(), "grid_tlq": got["video_grid_thw"].tolist(),
                         "same_grid": want["video_grid_thw"].tolist() == got["video_grid_thw"].tolist(),
                         "same_shape": same_shape,
                         "max_abs_diff": None if diff is None else round(float(diff.max()), 4),
                         "mean_abs_diff": None if diff is None else round(float(diff.mean()), 5),
                         "value_range": round(float(a.max() - a.min()), 3)})
    return rows


def compare_chat_tokens() -> list[dict]:
    """The real processor expanding a chat's <video> with its own video processor vs with tlq's."""
    import transformers

    from tlq.models.video import FramesVideoProcessor, frame_metadata
    from tlq.reference.tokenizer import build_tokenizer, chat_template

    tokenizer = build_tokenizer(["what", "moves", "?", "left"], "qwen")
    rows = []
    for name, video_name, style in (("Qwen2VLProcessor", "Qwen2VLVideoProcessor", "qwen2"),
                                    ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor", "qwen2"),
                                    ("Qwen3VLProcessor", "Qwen3VLVideoProcessor", "qwen3")):
        image = (transformers.Qwen2VLImageProcessor if hasattr(transformers, "Qwen2VLImageProcessor") else None)()
        video = getattr(transformers, video_name)()
        real = getattr(transformers, name)(image, tokenizer, video, chat_template=chat_template("qwen"))
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "what moves ?"}]}]
        text = real.apply_chat_template(messages, tokenize=False)
        clip = frames(6, 224, 320, seed=1)
        kwargs = dict(videos=[clip], video_metadata=[frame_metadata(6, 2.0)], do_sample_frames=False,
                      return_tensors="pt")
        want = real(text=[text], **kwargs)
        real.video_processor = FramesVideoProcessor(video.to_dict(), style)
        got = real(text=[text], **kwargs)
        rows.append({"processor": name, "tokens_real": int(want["input_ids"].shape[-1]),
                     "tokens_tlq": int(got["input_ids"].shape[-1]),
                     "same_input_ids": torch.equal(want["input_ids"], got["input_ids"]),
                     "same_keys": sorted(k for k in want if k != "video_metadata") ==
                                  sorted(k for k in got if k != "video_metadata"),
                     "same_second_per_grid_ts": str(want.get("second_per_grid_ts")) == str(got.get("second_per_grid_ts"))})
    return rows


def main() -> int:
    import transformers

    try:
        import torchvision
    except ImportError:
        sys.exit("this check compares with transformers' torchvision video processors: run it in a venv with "
                 "torchvision (e.g. .venv-vllm)")
    results = {"transformers": transformers.__version__, "torchvision": torchvision.__version__,
               "processors": compare_processors(), "chats": compare_chat_tokens()}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"transformers {results['transformers']}, torchvision {results['torchvision']}", "",
             "| processor | clip | grid (real) | grid (tlq) | same grid | max abs diff | mean abs diff | value range |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["processors"]:
        lines.append(f"| {r['processor']} | {r['clip']} | {r['grid_real']} | {r['grid_tlq']} | {r['same_grid']} | "
                     f"{r['max_abs_diff']} | {r['mean_abs_diff']} | {r['value_range']} |")
    lines += ["", "| processor (chat with one video) | tokens (real) | tokens (tlq) | same input ids | same keys | "
              "same second_per_grid_ts |", "|---|---|---|---|---|---|"]
    for r in results["chats"]:
        lines.append(f"| {r['processor']} | {r['tokens_real']} | {r['tokens_tlq']} | {r['same_input_ids']} | "
                     f"{r['same_keys']} | {r['same_second_per_grid_ts']} |")
    (OUT / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
