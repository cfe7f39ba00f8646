"""Load a VLM's processor from a local directory, with a fallback that needs no torchvision.

transformers 5.x builds the stock Qwen2-VL and LLaVA-OneVision processors with a video processor that
imports torchvision; where torchvision is missing (the CPU torch wheel we pin has none that imports),
`AutoProcessor` fails or silently returns the bare tokenizer. The fallback builds the same processor
class from its image processor (PIL backend) and tokenizer only; images are all tlq calibrates on.
"""

from __future__ import annotations

import functools
import inspect
import json
import types
from pathlib import Path

from tlq.errors import TlqError, one_line
from tlq.models.video import VIDEO_STYLES, FramesVideoProcessor


@functools.lru_cache(maxsize=None)
def _videoless(processor_class: type) -> type:
    """A subclass of a stock processor whose constructor takes no video processor."""

    class VideolessProcessor(processor_class):
        # SmolVLM's apply_chat_template reads the video defaults (frames, fps) even for image-only chats.
        video_processor = types.SimpleNamespace(num_frames=None, fps=None)

        @classmethod
        def get_attributes(cls):
            return [name for name in super().get_attributes() if name != "video_processor"]

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            kwargs.pop("video_processor", None)
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    # Saving keeps only attributes named in __init__'s signature: show the stock one, less the video part.
    stock = inspect.signature(processor_class.__init__)
    VideolessProcessor.__init__.__signature__ = stock.replace(
        parameters=[p for name, p in stock.parameters.items() if name != "video_processor"])
    VideolessProcessor.__name__ = VideolessProcessor.__qualname__ = processor_class.__name__
    return VideolessProcessor


# The video processor each processor class is built with, and the image-processor settings a video
# processor shares (a hub checkpoint's single preprocessor config served both in the past).
VIDEO_PROCESSORS = {"Qwen2VLProcessor": "Qwen2VLVideoProcessor", "Qwen2_5_VLProcessor": "Qwen2VLVideoProcessor",
                    "Qwen3VLProcessor": "Qwen3VLVideoProcessor", "LlavaOnevisionProcessor": "LlavaOnevisionVideoProcessor",
                    "SmolVLMProcessor": "SmolVLMVideoProcessor", "InternVLProcessor": "InternVLVideoProcessor"}
_SHARED_WITH_VIDEO = ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std",
                      "resample", "rescale_factor", "size", "patch_size", "temporal_patch_size", "merge_size",
                      "min_pixels", "max_pixels")


def complete_processor_config(config: dict) -> dict:
    """processor_config.json with every sub-processor its class loads: transformers (with torchvision)
    and vLLM build the stock processor, video processor included, and fail when its section is missing.
    The videoless processor tlq uses without torchvision saves no such section; this adds it from the
    image processor's settings."""
    video_type = VIDEO_PROCESSORS.get(config.get("processor_class", ""))
    image = config.get("image_processor")
    if video_type is None or "video_processor" in config or not isinstance(image, dict):
        return config
    video = {k: v for k, v in image.items() if k in _SHARED_WITH_VIDEO}
    video["video_processor_type"] = video_type
    return {**config, "video_processor": video}


def save_processor(processor, folder: str | Path) -> None:
    """`processor.save_pretrained`, with a complete processor_config.json."""
    processor.save_pretrained(folder)
    path = Path(folder) / "processor_config.json"
    if path.is_file():
        path.write_text(json.dumps(complete_processor_config(json.loads(path.read_text())), indent=2,
                                   sort_keys=True) + "\n")


def processor_class(name: str) -> type | None:
    """transformers' processor class `name`, also where only its torchvision import stands in the way.

    transformers 5 refuses PixtralProcessor (Mistral 3) without torchvision only because its module imports
    one size helper from the torchvision image processor; the PIL image processor has the same function.
    Without torchvision, that module is stood in for by one exposing the PIL helper (it fails to import
    there anyway), and the real processor class is imported.
    """
    import importlib
    import importlib.util
    import sys

    import transformers

    if name != "PixtralProcessor" or importlib.util.find_spec("torchvision") is not None:
        return getattr(transformers, name, None)
    fast = "transformers.models.pixtral.image_processing_pixtral"
    if fast not in sys.modules:
        pil = importlib.import_module("transformers.models.pixtral.image_processing_pil_pixtral")
        stand_in = types.ModuleType(fast, "PIL stand-in: torchvision is not installed")
        stand_in.get_resize_output_image_size = pil.get_resize_output_image_size
        sys.modules[fast] = stand_in
    return importlib.import_module("transformers.models.pixtral.processing_pixtral").PixtralProcessor


def videoless_processor(processor_class: type, image_processor, tokenizer, chat_template=None,
                        video_settings: dict | None = None, **kwargs):
    """Construct `processor_class` (e.g. Qwen2VLProcessor) without transformers' video processor (it needs
    torchvision). The Qwen-VL processors get tlq.models.video's frames processor instead, set up from
    `video_settings` (the saved `video_processor` section) over the image processor's shared settings."""
    processor = _videoless(processor_class)(image_processor, tokenizer, chat_template=chat_template, **kwargs)
    style = VIDEO_STYLES.get(processor_class.__name__)
    if style is not None:
        shared = {k: v for k, v in image_processor.to_dict().items() if k in _SHARED_WITH_VIDEO}
        processor.video_processor = FramesVideoProcessor({**shared, **(video_settings or {})}, style)
    return processor


# Any one of these is a tokenizer transformers can build; without them AutoTokenizer returns an empty one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "tokenizer.tiktoken")


def load_processor(model_dir: str | Path, trust_remote_code: bool = False):
    """AutoProcessor when it works here; otherwise the stock class built from image processor + tokenizer.

    Either way the processor must have a chat template: calibration records are rendered with it.
    """
    if not any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES):
        raise TlqError(f"{model_dir} has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...): copy the tokenizer "
                       f"files from the original checkpoint")
    processor = _load_processor(str(model_dir), trust_remote_code)
    image_token = getattr(processor, "image_token", None)
    tokenizer = processor.tokenizer
    if image_token is not None and tokenizer.convert_tokens_to_ids(image_token) in (None, tokenizer.unk_token_id):
        raise TlqError(f"the tokenizer in {model_dir} does not know the image token {image_token!r}: "
                       f"copy the tokenizer files from the original checkpoint")
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
    if not template:
        raise TlqError(f"{model_dir} has no chat template (chat_template.jinja or in tokenizer_config.json): "
                       f"copy it from the original checkpoint")
    return processor


def _image_processor(model_dir: str, config: dict):
    """The checkpoint's image processor. Some transformers 5 releases (5.17: benchmarks/gpu_image_rehearsal.sh)
    offer AutoImageProcessor only with torchvision installed (without it the class is a placeholder that
    raises ImportError); their PIL-backed classes (`<image_processor_type>Pil`) load without it, as 5.24's
    AutoImageProcessor does by itself."""
    import transformers

    try:
        return transformers.AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
    except ImportError:
        settings = config.get("image_processor")
        name = settings.get("image_processor_type") if isinstance(settings, dict) else None
        pil = getattr(transformers, f"{name}Pil", None) if isinstance(name, str) and name.isidentifier() else None
        if pil is None:
            raise
        return pil.from_pretrained(model_dir, local_files_only=True)


def _load_processor(model_dir: str, trust_remote_code: bool):
    from transformers import AutoProcessor, AutoTokenizer
    from transformers.processing_utils import ProcessorMixin

    try:
        processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
        if isinstance(processor, ProcessorMixin) and getattr(processor, "image_processor", None) is not None:
            return processor
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception:  # noqa: BLE001 - missing torchvision and broken side files fail in many ways; retried below
        pass
    config_path = Path(model_dir) / "processor_config.json"
    if not config_path.is_file():
        raise TlqError(f"{model_dir} has no processor_config.json: save the model's processor with it")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise TlqError(f"cannot read {config_path} ({type(exc).__name__}): restore it from the original checkpoint") from None
    class_name = config.get("processor_class", "") if isinstance(config, dict) else ""
    stock = processor_class(str(class_name))
    if stock is None or not isinstance(stock, type) or not issubclass(stock, ProcessorMixin):
        raise TlqError(f"unknown processor class {class_name!r} in {config_path}: restore it from the original checkpoint")
    try:
        image_processor = _image_processor(model_dir, config)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - a missing or broken tokenizer raises many types
        # transformers' import errors begin with an empty line ("\nAutoImageProcessor requires the Torchvision
        # library ...": transformers 5.17 without torchvision); one_line takes the first line with words
        raise TlqError(f"cannot load the tokenizer or image processor of {model_dir}: {one_line(exc, 200)}") from None
    extra = {k: v for k, v in config.items() if k not in ("processor_class", "image_processor", "video_processor")}
    chat_template = None
    template_path = Path(model_dir) / "chat_template.jinja"
    if template_path.is_file():
        chat_template = template_path.read_text()
    try:
        if "video_processor" not in inspect.signature(stock.__init__).parameters:
            return stock(image_processor, tokenizer, chat_template=chat_template, **extra)
        video = config.get("video_processor")
        return videoless_processor(stock, image_processor, tokenizer, chat_template=chat_template,
                                   video_settings=video if isinstance(video, dict) else None, **extra)
    except (TypeError, ValueError) as exc:
        raise TlqError(f"cannot build the processor from {config_path}: {str(exc).splitlines()[0][:200]}") from None
    except ImportError as exc:  # e.g. SmolVLM's processor needs num2words
        lines = [line for line in str(exc).splitlines() if line.strip()]
        raise TlqError(f"cannot build the processor of {model_dir}: {lines[0][:200] if lines else exc}") from None
