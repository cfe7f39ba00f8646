import json

import torch

from tlq.api import prepare_samples
from tlq.models import load_model
from tlq.models.processing import load_processor
from tlq.recipe import Recipe
from tlq.reference.stress import STRESS_FILE, make_variant


def test_outlier_variants_compute_the_same_function(tiny_checkpoints, calib_split, tmp_path):
    source = tiny_checkpoints["qwen2_vl"]
    model, adapter = load_model(source)
    samples = prepare_samples(model, adapter, load_processor(source), *calib_split, Recipe(num_samples=3))
    with torch.no_grad():
        expected = [model(**s.inputs).logits for s in samples]
    for kind in ("weight", "activation", "both"):
        variant = make_variant(source, tmp_path / kind, kind, scale=32.0, channels=4, seed=1)
        record = json.loads((variant / STRESS_FILE).read_text())
        assert record["kind"] == kind and record["scale"] == 32.0 and record["channels_per_group"] == 4
        stressed, _ = load_model(variant)
        q_proj = adapter.layers(stressed)[0].self_attn.q_proj.weight
        original = adapter.layers(model)[0].self_attn.q_proj.weight
        ratio = (q_proj.abs().amax(0) / original.abs().amax(0))
        for which, expected_ratio in (("weight", 32.0), ("activation", 1 / 32.0)):
            channels = record["channels"]["0.input_layernorm"].get(which)
            if kind in (which, "both"):
                assert torch.allclose(ratio[channels], torch.full((4,), expected_ratio), rtol=1e-5)
            else:
                assert channels is None
        with torch.no_grad():
            for sample, want in zip(samples, expected):
                got = stressed(**sample.inputs).logits
                assert (got - want).norm() / want.norm() < 1e-5
