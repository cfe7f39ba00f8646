"""Loading a checkpoint's processor where transformers lacks what it would use (tlq.models.processing)."""

from __future__ import annotations

import pytest
import transformers

from tlq.errors import TlqError
from tlq.models.processing import _image_processor, _load_processor

# What transformers 5.17 raises for AutoImageProcessor without torchvision: the reason starts on line 2.
NO_TORCHVISION = ImportError("\nAutoImageProcessor requires the Torchvision library but it was not found in your "
                             "environment.\nPlease note that you may need to restart your runtime.")


def _without_auto_image_processor(monkeypatch):
    def refuse(*args, **kwargs):
        raise NO_TORCHVISION
    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", refuse)


def test_without_auto_image_processor_the_pil_class_of_the_checkpoints_type_is_loaded(tiny_checkpoints, monkeypatch):
    _without_auto_image_processor(monkeypatch)
    config = {"image_processor": {"image_processor_type": "Qwen2VLImageProcessor"}}
    processor = _image_processor(str(tiny_checkpoints["qwen2_vl"]), config)
    assert type(processor).__name__ == "Qwen2VLImageProcessorPil"
    whole = _load_processor(str(tiny_checkpoints["qwen2_vl"]), trust_remote_code=False)
    assert type(whole.image_processor).__name__ == "Qwen2VLImageProcessorPil"


def test_an_import_error_without_a_pil_class_is_one_line_that_names_the_missing_library(tiny_checkpoints, tmp_path,
                                                                                         monkeypatch):
    import json
    import shutil

    _without_auto_image_processor(monkeypatch)
    folder = shutil.copytree(tiny_checkpoints["qwen2_vl"], tmp_path / "model")
    config = json.loads((folder / "processor_config.json").read_text())
    config["image_processor"]["image_processor_type"] = "NoSuchImageProcessor"  # no PIL class to fall back to
    (folder / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(TlqError, match=r"image processor of .*: AutoImageProcessor requires the Torchvision library"):
        _load_processor(str(folder), trust_remote_code=False)
