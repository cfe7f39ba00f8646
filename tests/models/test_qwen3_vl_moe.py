"""Qwen3-VL-MoE: experts as Linears, each calibrated on the tokens routed to it, a stated fallback for
experts that get too few, per-expert names in the output, and a reload that computes what tlq simulated."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForImageTextToText

from tlq.api import prepare_samples, quantize
from tlq.compat import load_quantized
from tlq.data.synthetic import vocabulary
from tlq.engine import quantize_layers
from tlq.errors import TlqError
from tlq.export import export_compressed
from tlq.importance import compute_importance
from tlq.models import load_model
from tlq.models.lazy import CheckpointTensors
from tlq.models.moe import RoutedExperts, routed_rows
from tlq.models.processing import load_processor
from tlq.quant import fake_quant_weight
from tlq.recipe import Recipe
from tlq.reference.checkpoint import ModelSize, build_model_and_processor, save_checkpoint

DEAD = (6, 7)  # experts the router below never chooses


@pytest.fixture(scope="module")
def starved(tmp_path_factory):
    """A tiny Qwen3-VL-MoE (8 experts, top 2) whose router can never choose experts 6 and 7: experts 0-5
    are three pairs with opposite router rows (w, -w), so every token has at least one positive logit
    per pair, while experts 6 and 7 have logit 0."""
    model, processor = build_model_and_processor("qwen3_vl_moe", vocabulary(), ModelSize(image_size=64), seed=5)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            router = layer.mlp.gate.weight
            for pair in range(3):
                router[2 * pair + 1] = -router[2 * pair]
            router[list(DEAD)] = 0.0
    return save_checkpoint(model, processor, tmp_path_factory.mktemp("moe") / "starved")


def test_routed_experts_compute_what_the_fused_experts_compute(tiny_checkpoints, calib_split):
    folder = tiny_checkpoints["qwen3_vl_moe"]
    fused = AutoModelForImageTextToText.from_pretrained(str(folder)).eval()  # reads the hub layout [E, H, 2I]
    model, adapter = load_model(folder)
    experts = adapter.layers(model)[0].get_submodule(adapter.experts.module)
    assert isinstance(experts, RoutedExperts) and len(experts) == model.config.text_config.num_experts
    gate_up = fused.model.language_model.layers[0].mlp.experts.gate_up_proj
    half = gate_up.shape[1] // 2
    assert torch.equal(experts[3].gate_proj.weight, gate_up[3, :half])
    assert torch.equal(experts[3].up_proj.weight, gate_up[3, half:])
    samples = prepare_samples(model, adapter, load_processor(folder), *calib_split, Recipe(num_samples=2))
    with torch.no_grad():
        for sample in samples:
            want, got = fused(**sample.inputs).logits, model(**sample.inputs).logits
            assert torch.allclose(got, want, rtol=0, atol=1e-5)


def test_each_expert_sees_exactly_its_routed_tokens():
    torch.manual_seed(0)
    experts = RoutedExperts(count=4, hidden=8, intermediate=16, act_fn=torch.nn.functional.silu)
    hidden = torch.randn(10, 8)
    top_k = torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0], [2, 1], [0, 1], [1, 2], [2, 0], [0, 1]])
    weights = torch.rand(10, 2)
    seen = {}
    for e, expert in enumerate(experts):
        expert.gate_proj.register_forward_pre_hook(lambda m, args, e=e: seen.__setitem__(e, (args[0], routed_rows(m))))
    out = experts(hidden, top_k, weights)
    for e in range(4):
        rows = torch.where((top_k == e).any(-1))[0]
        inputs, (routed, tokens) = seen[e]
        assert tokens == 10 and torch.equal(routed, rows) and torch.equal(inputs.reshape(-1, 8), hidden[rows])
    assert seen[3][0].numel() == 0  # a chosen-by-nobody expert is still called, with no rows
    manual = torch.zeros_like(hidden)
    for t in range(10):
        for k in range(2):
            manual[t] += weights[t, k] * experts[int(top_k[t, k])](hidden[t:t + 1])[0]
    assert torch.allclose(out, manual, atol=1e-6)


def test_the_moe_block_scales_fold_into_the_router_too(tiny_checkpoints, calib_split):
    """The MoE block's scaling group folds 1/s into its norm and s into every expert's gate/up and into the
    router, which stays FP: the model computes the same function and routes every token the same way.
    Without the router in the fold, the routing (and the output) would change."""
    from tlq.quant.scaling import apply_scales

    folder = tiny_checkpoints["qwen3_vl_moe"]
    model, adapter = load_model(folder)
    group = next(g for g in adapter.scaling_groups if g.block == "mlp")
    assert group.source == "post_attention_layernorm" and group.folded_fp == ("mlp.gate",)
    assert len(group.targets) == 2 * model.config.text_config.num_experts
    samples = prepare_samples(model, adapter, load_processor(folder), *calib_split, Recipe(num_samples=2))
    scales = torch.rand(model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0)) * 4 + 0.25

    def run(m):
        chosen = []
        routers = [layer.mlp.gate for layer in adapter.layers(m)]
        handles = [r.register_forward_hook(lambda mod, a, out: chosen.append(out[2].sort(-1).values)) for r in routers]
        with torch.no_grad():
            logits = [m(**s.inputs).logits for s in samples]
        for h in handles:
            h.remove()
        return logits, chosen

    want, routes = run(model)
    for folded in (group.folded, group.targets):
        changed = copy.deepcopy(model)
        for layer in adapter.layers(changed):
            apply_scales(layer.get_submodule(group.source), [layer.get_submodule(t) for t in folded], scales)
        got, got_routes = run(changed)
        same = all(torch.equal(a, b) for a, b in zip(routes, got_routes)) and \
            all(torch.allclose(a, b, rtol=0, atol=1e-4) for a, b in zip(want, got))
        assert same == (folded == group.folded)


def test_each_expert_rescales_its_down_input_on_its_routed_tokens(starved, calib_split, tmp_path):
    """Every expert has an up -> down scaling group scored on the rows routed to it, weighted by those
    tokens' importance. The captured rows are exactly the expert's routed inputs; an expert routed too few
    tokens (the dead ones: none) is left unscaled, and its Linears rounded to nearest of the FP weights;
    the others are searched; the run exports and reloads computing what tlq simulated."""
    from tlq.activations import capture_layer_inputs
    from tlq.group_data import capture_routed

    model, adapter = load_model(starved)
    count = model.config.text_config.num_experts
    routed = [g for g in adapter.scaling_groups if g.routed]
    assert [(g.source, g.targets) for g in routed] == [
        (f"mlp.experts.{e}.up_proj", (f"mlp.experts.{e}.down_proj",)) for e in range(count)]
    recipe = Recipe(method="tlq", scheme="W4A16-g32", num_samples=3, expert_min_tokens=8)
    samples = prepare_samples(model, adapter, load_processor(starved), *calib_split, recipe)
    # the capture: expert 1's down inputs, each row weighted by its token's weight (zeros dropped)
    layer = adapter.layers(model)[0]
    inputs = capture_layer_inputs(model, adapter, samples, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    weights = [torch.rand(s.num_tokens, generator=generator) * (torch.rand(s.num_tokens, generator=generator) > 0.3)
               for s in samples]
    seen = []
    handle = layer.mlp.experts[1].down_proj.register_forward_pre_hook(
        lambda m, args: seen.append((args[0].reshape(-1, args[0].shape[-1]).clone(), routed_rows(m)[0].clone())))
    with torch.no_grad():
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
            layer(hidden, **kwargs)
    handle.remove()
    want_w = torch.cat([w[rows] for w, (_, rows) in zip(weights, seen)])
    want_x = torch.cat([x for x, _ in seen])[want_w > 0]
    from tlq.distributed import SINGLE

    data, kept = capture_routed(layer, routed[1], inputs, torch.device("cpu"), weights, 1 << 30, 0, 0, SINGLE)
    assert torch.equal(data.x[0], want_x) and torch.equal(kept[0], want_w[want_w > 0]) and data.tokens == len(want_x) > 0
    # the run: dead experts skipped and rounded to nearest, live ones searched; export and reload
    from tlq.weighting import token_weights

    fp = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    importance = token_weights(compute_importance(model, adapter, samples))
    result = quantize_layers(model, adapter, samples, recipe, token_weights=importance, progress=False)
    rescaled = [r for report in result.layers for r in report.rescaled if ".experts." in r["source"]]
    assert len(rescaled) == count * len(result.layers)
    for r in rescaled:
        dead = int(r["source"].split(".")[2]) in DEAD
        assert ("skipped" in r) == (r["tokens"] < 8) and (not dead or (r["tokens"] == 0 and "skipped" in r))
    assert sum("skipped" not in r for r in rescaled) >= 4 and any(r.get("alpha") for r in rescaled)
    scheme = recipe.resolved_scheme()
    for e in DEAD:
        name = f"{adapter.decoder_layers}.0.mlp.experts.{e}.down_proj"
        assert torch.equal(result.quantized[name].weight, fake_quant_weight(fp[name], scheme).weight)
    with torch.no_grad():
        expected = [model(**s.inputs).logits for s in samples]
    out = export_compressed(model, adapter, scheme, result.quantized, tmp_path / "out", source_dir=starved)
    reloaded = load_quantized(out).eval()
    with torch.no_grad():
        for sample, want in zip(samples, expected):
            assert float((reloaded(**sample.inputs).logits - want).norm() / want.norm()) < 1e-3


def test_tlq_scores_the_moe_block_output(tiny_checkpoints, calib_split):
    """The gradient pass scores the MoE block's output (the routed sum) per token, which weights its group's
    scale search; unlike an expert's own scores it is nonzero on tokens not routed to that expert (every token
    but the last of a sample, where no loss flows back)."""
    folder = tiny_checkpoints["qwen3_vl_moe"]
    model, adapter = load_model(folder)
    samples = prepare_samples(model, adapter, load_processor(folder), *calib_split, Recipe(num_samples=2))
    importance = compute_importance(model, adapter, samples)
    block = torch.cat(importance.scores["0.mlp"])
    expert = torch.cat(importance.scores["0.mlp.experts.0.down_proj"])
    assert (block > 0).float().mean() > 0.9 and ((expert == 0) & (block > 0)).any()


def test_starved_experts_are_rounded_reported_and_reload(starved, calib_split, tmp_path):
    # TLQ without its scale search (backend gptq), so that the fallback can be compared with RTN of the FP
    # weights (the search would rescale the experts first).
    recipe = Recipe(method="tlq", scheme="W4A16-g32", num_samples=3, backend="gptq")
    out = quantize(starved, tmp_path / "out", *calib_split, recipe, progress=False).out_dir
    record = json.loads((out / "tlq_recipe.json").read_text())["experts"]
    model, adapter = load_model(starved)
    samples = prepare_samples(model, adapter, load_processor(starved), *calib_split, recipe)
    tokens = sum(s.num_tokens for s in samples)
    top_k = model.config.text_config.num_experts_per_tok
    for layer, counts in record["routed_tokens"].items():
        assert sum(counts.values()) == top_k * tokens  # every routed (token, expert) pair is counted once
        assert all(counts[f"mlp.experts.{e}"] == 0 for e in DEAD)
        starved_here = sorted(name for name, n in counts.items() if n < record["min_tokens"])
        assert record["rounded_to_nearest"][layer] == starved_here and len(starved_here) >= len(DEAD)
    # The same calibration in memory: the fallback is round-to-nearest of the FP weights, exactly; the
    # experts with enough tokens were solved (GPTQ moves them off the RTN grid points).
    fp = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    result = quantize_layers(model, adapter, samples, recipe, token_weights=None, progress=False)
    assert [r.rounded_experts for r in result.layers] == [record["rounded_to_nearest"][str(i)]
                                                           for i in range(len(result.layers))]
    scheme = recipe.resolved_scheme()
    for index, report in enumerate(result.layers):
        for e in range(model.config.text_config.num_experts):
            name = f"{adapter.decoder_layers}.{index}.mlp.experts.{e}.gate_proj"
            rtn = fake_quant_weight(fp[name], scheme).weight
            rounded = f"mlp.experts.{e}" in report.rounded_experts
            assert torch.equal(result.quantized[name].weight, rtn) == rounded, (index, e)
    # Exported with one Linear per expert (vLLM's names), the router FP; reloaded, it computes what tlq
    # simulated.
    with torch.no_grad():
        expected = [model(**s.inputs).logits for s in samples]
    again = export_compressed(model, adapter, scheme, result.quantized, tmp_path / "again", source_dir=starved)
    config = json.loads((again / "config.json").read_text())["quantization_config"]
    assert "model.language_model.layers.0.mlp.gate" in config["ignore"]
    keys = set(CheckpointTensors(again).keys())
    assert "model.language_model.layers.1.mlp.experts.7.down_proj.weight_packed" in keys
    assert "model.language_model.layers.1.mlp.gate.weight" in keys
    assert not any(k.endswith("experts.gate_up_proj") for k in keys)
    reloaded = load_quantized(again).eval()
    with torch.no_grad():
        for sample, want in zip(samples, expected):
            assert float((reloaded(**sample.inputs).logits - want).norm() / want.norm()) < 1e-3


def test_without_the_fallback_a_starved_expert_would_be_zeroed(starved, calib_split):
    """Why the fallback exists: GPTQ on an expert that saw no token has an all-zero Hessian."""
    model, adapter = load_model(starved)
    recipe = Recipe(method="gptq", scheme="W4A16-g32", num_samples=2, expert_min_tokens=0)
    samples = prepare_samples(model, adapter, load_processor(starved), *calib_split, recipe)
    result = quantize_layers(model, adapter, samples, recipe, progress=False)
    assert all(not r.rounded_experts for r in result.layers)
    for e in DEAD:
        assert result.quantized[f"{adapter.decoder_layers}.0.mlp.experts.{e}.down_proj"].weight.abs().max() == 0


def test_importance_follows_the_routed_tokens(starved, calib_split):
    model, adapter = load_model(starved)
    samples = prepare_samples(model, adapter, load_processor(starved), *calib_split, Recipe(num_samples=2))
    routed: dict[tuple[int, int], list[torch.Tensor]] = {}
    handles = [layer.mlp.experts[e].down_proj.register_forward_pre_hook(
        lambda m, args, key=(i, e): routed.setdefault(key, []).append(routed_rows(m)[0].clone()))
        for i, layer in enumerate(adapter.layers(model)) for e in range(len(layer.mlp.experts))]
    with torch.no_grad():
        for sample in samples:
            model(**sample.inputs)
    for handle in handles:
        handle.remove()
    importance = compute_importance(model, adapter, samples, "fisher", streamed=True)
    for (layer, e), per_sample in routed.items():
        for sample, rows in enumerate(per_sample):
            score = importance.scores[f"{layer}.mlp.experts.{e}.down_proj"][sample]
            outside = torch.ones_like(score, dtype=torch.bool)
            outside[rows] = False
            assert score[outside].abs().max() == 0 if outside.any() else True
            if e in DEAD:
                assert len(rows) == 0 and score.abs().max() == 0


def test_moe_refusals(starved, calib_split, tmp_path):
    with pytest.raises(TlqError, match="asymmetric target is not supported for routed experts"):
        quantize(starved, tmp_path / "out", *calib_split, Recipe(target="asymmetric", num_samples=2), progress=False)
    assert not (tmp_path / "out").exists()
