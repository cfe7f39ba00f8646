"""Round trip: what tlq writes, transformers reloads, and it computes what tlq simulated."""

import json

import pytest
import torch
from torch import nn

from tlq.api import prepare_samples
from tlq.compat import load_quantized
from tlq.activations import install_model_activation_quant
from tlq.engine import quantize_layers
from tlq.export import RECIPE_FILE, export_compressed
from tlq.models import load_model
from tlq.models.processing import load_processor
from tlq.recipe import Recipe
from tlq.reference.checkpoint import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("scheme", ["W4A16-g32", "W4A8"])
def test_reloaded_checkpoint_matches_fake_quant(tiny_checkpoints, calib_split, tmp_path, family, method, scheme):
    checkpoint = tiny_checkpoints[family]
    recipe = Recipe(method=method, scheme=scheme, num_samples=3)
    model, adapter = load_model(checkpoint)
    processor = load_processor(checkpoint)
    samples = prepare_samples(model, adapter, processor, *calib_split, recipe)
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    result = quantize_layers(model, adapter, samples, recipe, progress=False)
    hooks = install_model_activation_quant(model, adapter, recipe.resolved_scheme())
    with torch.no_grad():
        expected = [model(**s.inputs).logits for s in samples]
    for h in hooks:
        h.remove()
    out = export_compressed(model, adapter, recipe.resolved_scheme(), result.quantized, tmp_path / "out",
                            source_dir=checkpoint, recipe_record={"recipe": recipe.to_dict()})
    assert (out / "processor_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / RECIPE_FILE).read_text())["recipe"]["method"] == method
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == ("int-quantized" if "A8" in scheme else "pack-quantized")
    assert "lm_head" in config["ignore"]

    reloaded = load_quantized(out)
    processor2 = load_processor(out)
    assert type(processor2) is type(processor)
    with torch.no_grad():
        for sample, want in zip(samples, expected):
            got = reloaded(**sample.inputs).logits
            assert ((got - want).norm() / want.norm()) < 1e-3
    quantized_names = set(adapter.quantized_linear_names(reloaded))
    for name, module in reloaded.named_modules():
        if isinstance(module, nn.Linear) and name not in quantized_names:
            assert getattr(module, "quantization_scheme", None) is None, name
            assert torch.equal(module.weight, original[name]), name


def test_activation_quant_is_live_after_reload(tiny_checkpoints, calib_split, tmp_path):
    """A W4A8 checkpoint must quantize activations at run time, not only weights."""
    checkpoint = tiny_checkpoints["qwen2_vl"]
    recipe = Recipe(method="rtn", scheme="W4A8", num_samples=2)
    model, adapter = load_model(checkpoint)
    samples = prepare_samples(model, adapter, load_processor(checkpoint), *calib_split, recipe)
    result = quantize_layers(model, adapter, samples, recipe, progress=False)
    with torch.no_grad():
        weights_only = model(**samples[0].inputs).logits
    out = export_compressed(model, adapter, recipe.resolved_scheme(), result.quantized, tmp_path / "o", checkpoint)
    with torch.no_grad():
        got = load_quantized(out)(**samples[0].inputs).logits
    assert not torch.allclose(got, weights_only, rtol=0, atol=1e-7)


def test_existing_output_is_refused(tiny_checkpoints, tmp_path):
    from tlq.errors import TlqError

    model, adapter = load_model(tiny_checkpoints["qwen2_vl"])
    (tmp_path / "out").mkdir()
    with pytest.raises(TlqError, match="already exists"):
        export_compressed(model, adapter, Recipe().resolved_scheme(), {}, tmp_path / "out", tiny_checkpoints["qwen2_vl"])
