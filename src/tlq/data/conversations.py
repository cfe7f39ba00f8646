"""Calibration and evaluation data in the ShareGPT4V / LLaVA conversation format.

A file is a JSON list, or JSONL, of records
    {"image": "relative/path.png" | [paths], "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                              {"from": "gpt", "value": "..."}, ...]}
with image paths relative to an image folder. A record may hold videos, as frames already sampled from the
clip: "video": [frame paths] (one video), [[frame paths], ...] (several) or "a/folder" (its image files in
name order), "fps": the frames' rate (default 2), and a "<video>" placeholder per video. Records are rendered with the model's own chat template;
labels cover the assistant turns only (the answer tokens, their end-of-turn token included).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tlq.errors import TlqError
from tlq.guards import resolved

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"
_PLACEHOLDER = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Record:
    """One conversation: image files, videos (frame files) and chat messages in the Hugging Face content-list
    format."""

    images: list[Path]
    messages: list[dict[str, Any]]
    line: int  # 1-based position in the source file, for error messages
    meta: dict[str, Any] = field(default_factory=dict)  # other fields of the row (id, question types, ...)
    videos: list[list[Path]] = field(default_factory=list)
    fps: float = 2.0  # the rate the video frames were sampled at

    @property
    def files(self) -> list[Path]:
        """Every image and frame file the record reads."""
        return self.images + [frame for video in self.videos for frame in video]


@dataclass
class Sample:
    """A rendered record: the model's forward inputs (batch of 1), labels and per-token kinds."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor
    token_kinds: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))

    @property
    def num_tokens(self) -> int:
        return int(self.inputs["input_ids"].shape[-1])

    def release_model_inputs(self) -> None:
        """Drop the forward inputs other than the token ids (pixel values, grids, masks) once the layer
        loop has captured what they produce: they stay resident otherwise (1.5 MiB per sample of a
        256-token image; benchmarks/results/cost/rss_probe)."""
        self.inputs = {"input_ids": self.inputs["input_ids"]}


def read_records_file(path: str | Path) -> list[dict[str, Any]]:
    """Parse a JSON list or JSONL file, with one-line errors for every way it can be unusable."""
    path = Path(path)
    if not path.is_file():
        raise TlqError(f"calibration file {path} does not exist: pass a ShareGPT4V-style JSON or JSONL file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TlqError(f"cannot read calibration file {path}: {exc}") from None
    if not text.strip():
        raise TlqError(f"calibration file {path} is empty: it needs at least one conversation record")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TlqError(f"calibration file {path} is not valid JSON ({exc})") from None
        except RecursionError:
            raise TlqError(f"calibration file {path} is nested too deeply to be conversation records") from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise TlqError(f"{path} line {number} is not valid JSON ({exc.msg})") from None
                except RecursionError:
                    raise TlqError(f"{path} line {number} is nested too deeply to be a conversation record") from None
    if not rows:
        raise TlqError(f"calibration file {path} has no records: it needs at least one conversation")
    return rows


def _to_messages(row: dict[str, Any], num_images: int, where: str, num_videos: int = 0) -> list[dict[str, Any]]:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise TlqError(f"{where}: missing 'conversations' list of {{'from', 'value'}} turns")
    messages, placed, videos = [], 0, 0
    for turn in turns:
        role = _ROLES.get(str(turn.get("from", "")).lower()) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise TlqError(f"{where}: each turn needs 'from' (human/gpt/system) and a string 'value'")
        pieces = _PLACEHOLDER.split(turn["value"])
        content: list[dict[str, Any]] = []
        for piece in pieces:
            if piece in (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER):
                content.append({"type": "image" if piece == IMAGE_PLACEHOLDER else "video"})
                placed, videos = placed + (piece == IMAGE_PLACEHOLDER), videos + (piece == VIDEO_PLACEHOLDER)
                continue
            piece = piece.strip() if len(pieces) > 1 else piece
            if piece:
                content.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": content})
    if videos != num_videos:
        raise TlqError(f"{where}: {videos} '<video>' placeholders for {num_videos} videos")
    if placed == 0 and num_images:
        # LLaVA-style files sometimes omit the placeholder: the images go before the first user text.
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"][:0] = [{"type": "image"}] * num_images
        placed = num_images
    if placed != num_images:
        raise TlqError(f"{where}: {placed} '<image>' placeholders for {num_images} images")
    if not any(m["role"] == "assistant" for m in messages):
        raise TlqError(f"{where}: no assistant ('gpt') turn to calibrate on")
    return messages


def _image_paths(row: dict[str, Any], base: Path, where: str, confine: bool) -> list[Path]:
    """The record's image files, checked before anything opens them: a string or a list of strings,
    each resolving (symlinks followed) inside the image folder unless `confine` is off."""
    names = row.get("image", [])
    names = [names] if isinstance(names, str) else names
    if names is None:
        names = []
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise TlqError(f"{where}: 'image' must be a path or a list of paths, got {json.dumps(row.get('image'))[:60]}")
    root = resolved(base)
    return [_checked_file(name, base, root, where, confine, "image") for name in names]


def _checked_file(name: str, base: Path, root: Path, where: str, confine: bool, what: str) -> Path:
    """`base / name`, refused unless it is a file inside the image folder (`confine`: symlinks followed)."""
    path = base / name
    if confine and not _inside(resolved(path), root):
        raise TlqError(f"{where}: {what} {name!r} resolves outside the image folder {base}: move it there, "
                       f"or pass --allow-outside-images if you trust this file")
    if not path.is_file():
        raise TlqError(f"{where}: {what} {path} is missing: fix the path or the --images folder")
    return path


def _video_frames(row: dict[str, Any], base: Path, where: str, confine: bool) -> list[list[Path]]:
    """The record's videos, each a list of frame files checked like images: from a list of frame paths, a
    list of such lists, or a folder of frames (its image files in name order)."""
    value = row.get("video")
    if value is None:
        return []
    root = resolved(base)
    if isinstance(value, str):
        if Path(value).suffix.lower() not in ("",) + FRAME_SUFFIXES:
            raise TlqError(f"{where}: video {value!r} is a file tlq does not decode: extract its frames (e.g. 2 per "
                           f"second) and list them, or name the folder holding them")
        folder = base / value
        if confine and not _inside(resolved(folder), root):
            raise TlqError(f"{where}: video folder {value!r} resolves outside the image folder {base}")
        if not folder.is_dir():
            raise TlqError(f"{where}: video folder {folder} is missing: fix the path or the --images folder")
        value = [[str(p.relative_to(base)) for p in sorted(folder.iterdir()) if p.suffix.lower() in FRAME_SUFFIXES]]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, list) and all(isinstance(f, str) and f for f in v)
                                              for v in value):
        raise TlqError(f"{where}: 'video' must be a folder of frames, a list of frame paths or a list of such "
                       f"lists, got {json.dumps(row.get('video'))[:60]}")
    for video in value:
        if len(video) < 2:
            raise TlqError(f"{where}: a video needs at least 2 frames, got {len(video)}")
    return [[_checked_file(f, base, root, where, confine, "video frame") for f in video] for video in value]


def _fps(row: dict[str, Any], where: str) -> float:
    fps = row.get("fps", 2.0)
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < 1000:
        raise TlqError(f"{where}: 'fps' must be a positive number of frames per second, got {json.dumps(fps)[:40]}")
    return float(fps)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def load_records(path: str | Path, images_dir: str | Path | None, num_samples: int | None = None,
                 seed: int = 0, confine: bool = True) -> list[Record]:
    """Read and validate a conversation file; choose `num_samples` records deterministically by `seed`.

    Image paths are relative to `images_dir` (default: the file's folder) and must stay inside it
    (`confine`), so a record cannot make tlq read /etc/passwd or follow a symlink out of the folder.
    """
    rows = read_records_file(path)
    base = Path(images_dir) if images_dir is not None else Path(path).parent
    if images_dir is not None and not base.is_dir():
        raise TlqError(f"image folder {base} does not exist: pass --images DIR holding the calibration images")
    records = []
    for number, row in enumerate(rows, 1):
        where = f"{path} record {number}"
        if not isinstance(row, dict):
            raise TlqError(f"{where}: expected an object with 'image' and 'conversations'")
        images = _image_paths(row, base, where, confine)
        videos = _video_frames(row, base, where, confine)
        meta = {k: v for k, v in row.items() if k not in ("image", "video", "fps", "conversations")}
        records.append(Record(images=images, messages=_to_messages(row, len(images), where, len(videos)), line=number,
                              meta=meta, videos=videos, fps=_fps(row, where)))
    if num_samples is not None and num_samples < len(records):
        chosen = sorted(random.Random(seed).sample(range(len(records)), num_samples))
        records = [records[i] for i in chosen]
    return records


def data_hash(records: list[Record]) -> str:
    """sha256 over the chosen records' messages and image bytes: identifies the calibration set."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record.messages, sort_keys=True).encode())
        for image in record.files:
            digest.update(image.read_bytes())
    return digest.hexdigest()


# Calibration images are resized to a few hundred tokens anyway; a larger image is a mistake or a
# decompression bomb (a tiny PNG that expands to gigabytes). PIL's own limit only warns below 2x.
MAX_IMAGE_PIXELS = 64_000_000
MAX_ASPECT_RATIO = 200  # Qwen2-VL's image processor refuses more


def _open_images(paths: list[Path]):
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise TlqError(f"image {path} is {width}x{height} pixels, more than {MAX_IMAGE_PIXELS:,}: "
                                   f"resize it (calibration needs a few hundred image tokens)")
                if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                    raise TlqError(f"image {path} is {width}x{height}, an aspect ratio over {MAX_ASPECT_RATIO}: "
                                   f"crop or pad it (VLM processors refuse such images)")
                images.append(image.convert("RGB"))
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as exc:
            raise TlqError(f"cannot read image {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return images


def _image_token_runs(ids: torch.Tensor, image_token_id: int | None) -> list[int]:
    """Lengths of the maximal runs of consecutive image tokens, in order."""
    if image_token_id is None:
        return []
    runs, current = [], 0
    for is_image in (ids == image_token_id).tolist():
        if is_image:
            current += 1
        elif current:
            runs.append(current)
            current = 0
    if current:
        runs.append(current)
    return runs


def _count_images(messages: list[dict[str, Any]], kind: str = "image") -> int:
    return sum(part.get("type") == kind for m in messages for part in m["content"])


def _video_inputs(videos: list, fps: float) -> dict[str, Any]:
    """The processor's video arguments for frames already sampled at `fps`: not resampled, timed by fps."""
    if not videos:
        return {}
    from tlq.models.video import frame_metadata

    return {"videos": videos, "video_metadata": [frame_metadata(len(v), fps) for v in videos],
            "do_sample_frames": False}


def render_sample(record: Record, processor, max_length: int | None = None) -> Sample | None:
    """Tokenize one record with the processor's chat template; labels on assistant turns only.

    Returns None when truncation to `max_length` would cut through an image (the model needs every
    image token it was given features for).
    """
    videos = [_open_images(video) for video in record.videos]
    return render_messages(record.messages, _open_images(record.images), processor, max_length, videos, record.fps)


def render_messages(messages: list[dict[str, Any]], images: list, processor, max_length: int | None = None,
                    videos: list | None = None, fps: float = 2.0) -> Sample | None:
    """`render_sample` for messages and already-opened PIL images (and videos: lists of PIL frames)."""
    videos = videos or []

    def render(prefix, generation_prompt: bool) -> str:
        return processor.apply_chat_template(prefix, tokenize=False, add_generation_prompt=generation_prompt)

    def encode(prefix, generation_prompt: bool) -> dict[str, torch.Tensor]:
        used = images[:_count_images(prefix)]
        clips = _video_inputs(videos[:_count_images(prefix, "video")], fps)
        return processor(text=[render(prefix, generation_prompt)], images=used or None, return_tensors="pt", **clips)

    inputs = encode(messages, False)
    input_ids = inputs["input_ids"]
    # Where each answer starts and ends: the token count of the conversation up to it. The processor
    # only expands each image placeholder into that image's run of image tokens, so the count is the
    # tokenizer's count plus the runs' extra length; verified on the full text, else fall back to
    # running the processor on every prefix.
    runs = _image_token_runs(input_ids[0], getattr(processor, "image_token_id", None))
    tokenizer = processor.tokenizer
    fast = not videos and len(runs) == len(images) and (
        len(tokenizer(render(messages, False))["input_ids"]) + sum(r - 1 for r in runs) == input_ids.shape[-1])

    def prefix_length(prefix, generation_prompt: bool) -> int:
        if fast:
            extra = sum(r - 1 for r in runs[:_count_images(prefix)])
            return len(tokenizer(render(prefix, generation_prompt))["input_ids"]) + extra
        return encode(prefix, generation_prompt)["input_ids"].shape[-1]

    labels = torch.full_like(input_ids, -100)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = prefix_length(messages[:turn], True)
        end = prefix_length(messages[:turn + 1], False)
        labels[:, start:end] = input_ids[:, start:end]
    length = input_ids.shape[-1]
    if max_length is not None and length > max_length:
        vision = [getattr(processor, name, None) for name in ("image_token_id", "video_token_id")]
        if any(i is not None and (input_ids[0, max_length:] == i).any() for i in vision):
            return None
        inputs = {k: (v[:, :max_length] if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[-1] == length
                      and not k.startswith("pixel_values") else v) for k, v in inputs.items()}
        labels = labels[:, :max_length]
    return Sample(inputs=dict(inputs), labels=labels)


def _render_checked(record: Record, processor, max_length: int | None) -> Sample | None:
    """render_sample, with a processor's or chat template's refusal of this record as one line."""
    from jinja2.exceptions import TemplateError

    try:
        return render_sample(record, processor, max_length)
    except TlqError:
        raise
    except TemplateError as exc:
        raise TlqError(f"record {record.line}: the model's chat template fails ({exc}): fix chat_template.jinja") from None
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TlqError(f"record {record.line}: the processor cannot render it ({reason[:200]})") from None


def build_samples(records: list[Record], processor, max_length: int | None = None) -> list[Sample]:
    samples = [s for s in (_render_checked(r, processor, max_length) for r in records) if s is not None]
    if not samples:
        raise TlqError(f"no calibration sample fits in --max-length {max_length} without cutting an image: raise it")
    return samples
