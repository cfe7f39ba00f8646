"""Every family through the scale-search method: scales folded into its norms and Linears (Gemma's
(1 + weight) norms, Idefics3's `text_model`, ...) keep the model's function, so at 8 bits TLQ's reloaded
checkpoint stays close to the FP logits and closer than round-to-nearest."""

from __future__ import annotations

import pytest
import torch

from tlq.api import prepare_samples, quantize
from tlq.compat import load_quantized
from tlq.models import load_model
from tlq.models.processing import load_processor
from tlq.recipe import Recipe
from tlq.reference.checkpoint import FAMILIES


def _logit_error(out, samples, reference) -> float:
    model = load_quantized(out).eval()
    with torch.no_grad():
        return max(float((model(**s.inputs).logits - r).norm() / r.norm()) for s, r in zip(samples, reference))


@pytest.mark.parametrize("family", FAMILIES)
def test_scale_search_keeps_every_family_close_to_fp(family, tiny_checkpoints, calib_split, tmp_path):
    model, adapter = load_model(tiny_checkpoints[family])
    samples = prepare_samples(model, adapter, load_processor(tiny_checkpoints[family]), *calib_split,
                              Recipe(num_samples=2))
    with torch.no_grad():
        reference = [model(**s.inputs).logits for s in samples]
    errors = {}
    for method in ("rtn", "tlq"):
        out = quantize(tiny_checkpoints[family], tmp_path / method, *calib_split,
                       Recipe(method=method, scheme="W8A16-g32", num_samples=3), progress=False).out_dir
        errors[method] = _logit_error(out, samples, reference)
    assert errors["tlq"] < 0.03 and errors["tlq"] < errors["rtn"], errors
