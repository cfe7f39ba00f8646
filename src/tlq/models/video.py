"""Videos given as frames, for the Qwen-VL families: what tlq hands the processor, with or without torchvision.

A calibration video is a list of frames (image files) sampled from the clip at `fps` frames per second.
Where torchvision is installed, transformers' own video processor turns them into `pixel_values_videos`
and `video_grid_thw` (tlq passes the frames with their metadata and asks it not to resample them). Without
torchvision that processor cannot be built, and `FramesVideoProcessor` stands in for it: the same size
rule (transformers' `smart_resize` of the family), PIL bicubic resizing (the PIL image processors'
resampling, not torchvision's), the same rescale and normalisation, and the same temporal x spatial patch
layout, so the token counts and the layout the model sees are the processor's. Its pixels differ from
torchvision's resize by resampling noise only (benchmarks/video_processor_check.py measures both on the
same frames in a venv that has torchvision).
"""

from __future__ import annotations

import math

import numpy as np
import torch

DEFAULT_FPS = 2.0  # Qwen's video processors sample 2 frames per second

# processor class -> the rule its video processor sizes frames by
VIDEO_STYLES = {"Qwen2VLProcessor": "qwen2", "Qwen2_5_VLProcessor": "qwen2", "Qwen3VLProcessor": "qwen3"}


def _qwen2_size(num_frames: int, height: int, width: int, factor: int, min_pixels: int, max_pixels: int):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    return smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def _qwen3_size(num_frames: int, height: int, width: int, factor: int, min_pixels: int, max_pixels: int,
                temporal: int = 2):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    return smart_resize(num_frames, height, width, temporal_factor=temporal, factor=factor, min_pixels=min_pixels,
                        max_pixels=max_pixels)


def frame_metadata(num_frames: int, fps: float):
    """transformers' VideoMetadata for frames already sampled at `fps`: every frame kept, in order."""
    from transformers.video_utils import VideoMetadata

    return VideoMetadata(total_num_frames=num_frames, fps=float(fps), frames_indices=list(range(num_frames)))


class FramesVideoProcessor:
    """A torchvision-free stand-in for transformers' Qwen2-VL / Qwen3-VL video processor (see the module)."""

    def __init__(self, settings: dict, style: str) -> None:
        size = settings.get("size") or {}
        self.min_pixels = int(settings.get("min_pixels") or size.get("shortest_edge") or 128 * 28 * 28)
        self.max_pixels = int(settings.get("max_pixels") or size.get("longest_edge") or 768 * 28 * 28)
        self.patch_size = int(settings.get("patch_size", 14))
        self.temporal_patch_size = int(settings.get("temporal_patch_size", 2))
        self.merge_size = int(settings.get("merge_size", 2))
        self.rescale_factor = float(settings.get("rescale_factor", 1 / 255))
        self.image_mean = np.asarray(settings.get("image_mean", (0.48145466, 0.4578275, 0.40821073)), np.float32)
        self.image_std = np.asarray(settings.get("image_std", (0.26862954, 0.26130258, 0.27577711)), np.float32)
        self.do_rescale = settings.get("do_rescale", True)
        self.do_normalize = settings.get("do_normalize", True)
        self.style = style
        # what processors read from a video processor while rendering chats
        self.num_frames, self.fps, self.do_sample_frames = None, DEFAULT_FPS, False

    def _target_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        factor = self.patch_size * self.merge_size
        if self.style == "qwen3":
            return _qwen3_size(num_frames, height, width, factor, self.min_pixels, self.max_pixels,
                               self.temporal_patch_size)
        return _qwen2_size(num_frames, height, width, factor, self.min_pixels, self.max_pixels)

    def _pixels(self, frames: list) -> np.ndarray:
        """[T, C, H, W] float32: every frame resized to the video's one size, rescaled and normalised."""
        from PIL import Image

        width, height = frames[0].size
        new_h, new_w = self._target_size(len(frames), height, width)
        out = []
        for frame in frames:
            array = np.asarray(frame.convert("RGB").resize((new_w, new_h), resample=Image.BICUBIC), np.float32)
            if self.do_rescale:
                array = array * self.rescale_factor
            if self.do_normalize:
                array = (array - self.image_mean) / self.image_std
            out.append(array.transpose(2, 0, 1))
        return np.stack(out)

    def patchify(self, video: np.ndarray) -> tuple[torch.Tensor, list[int]]:
        """[T, C, H, W] -> ([grid_t * grid_h * grid_w, C * temporal * patch^2], [grid_t, grid_h, grid_w]) in the
        processor's order: temporal groups, then 2x2 merge windows row by row, then the patches inside."""
        t, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -video.shape[0] % t:  # the last frame repeated, as the processor does
            video = np.concatenate([video, np.repeat(video[-1:], pad, axis=0)])
        frames, channels, height, width = video.shape
        grid_t, grid_h, grid_w = frames // t, height // p, width // p
        patches = video.reshape(grid_t, t, channels, grid_h // m, m, p, grid_w // m, m, p)
        patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        flat = patches.reshape(grid_t * grid_h * grid_w, channels * t * p * p)
        return torch.from_numpy(np.ascontiguousarray(flat)), [grid_t, grid_h, grid_w]

    def __call__(self, videos, video_metadata=None, **kwargs):
        from transformers.image_processing_utils import BatchFeature

        videos = [list(video) for video in videos]
        metadata = list(video_metadata) if video_metadata else [frame_metadata(len(v), DEFAULT_FPS) for v in videos]
        patches, grids = [], []
        for video in videos:
            flat, grid = self.patchify(self._pixels(video))
            patches.append(flat)
            grids.append(grid)
        return BatchFeature({"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids),
                             "video_metadata": metadata})

    def get_num_of_video_patches(self, num_frames: int, height: int, width: int, videos_kwargs=None) -> int:
        new_h, new_w = self._target_size(num_frames, height, width)
        return math.ceil(num_frames / self.temporal_patch_size) * (new_h // self.patch_size) * (new_w // self.patch_size)


__all__ = ["DEFAULT_FPS", "FramesVideoProcessor", "VIDEO_STYLES", "frame_metadata"]
