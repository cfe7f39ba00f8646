"""The scale search scores what the deployed model computes: the block the group feeds, after folding."""

import copy
import dataclasses

import pytest
import torch

from tlq.activations import LayerStreams, capture_layer_inputs, install_activation_quant, layer_output, run_layer
from tlq.api import prepare_samples
from tlq.models import load_model
from tlq.models.moe import routed_rows
from tlq.models.processing import load_processor
from tlq.quant.primitives import fake_quant_weight
from tlq.recipe import Recipe
from tlq.reference.stress import apply_outliers
from tlq.context import RunContext
from tlq.rescale import rescale_layer

CPU = torch.device("cpu")


def _block_error(layer, inputs, group, scheme, fp_outputs, weights=None):
    """Run the whole layer with only the group's targets quantized (and, under W*A8, their inputs);
    the token-weighted squared error of the block's output against `fp_outputs`."""
    layer = copy.deepcopy(layer)
    targets = [layer.get_submodule(t) for t in group.targets]
    for t in targets:
        t.weight.data = fake_quant_weight(t.weight.data, scheme).weight.to(t.weight.dtype)
    hooks = install_activation_quant(targets, scheme)
    outputs = _block_outputs(layer, inputs, group)
    for h in hooks:
        h.remove()
    total = 0.0
    for i, (out, ref) in enumerate(zip(outputs, fp_outputs)):
        per_token = (out - ref).pow(2).mean(-1)
        total += float((per_token * (weights[i] if weights else 1.0)).sum())
    return total


def _block_outputs(layer, inputs, group):
    """The block's output per sample, one row per token: an expert's routed rows are put back at their
    tokens' positions (zero elsewhere), so the error lines up with per-token weights."""
    outputs = []

    def hook(module, args, out):
        out = layer_output(out).reshape(-1, layer_output(out).shape[-1]).float()
        routing = routed_rows(module)
        if routing is not None:
            out = torch.zeros(routing[1], out.shape[-1]).index_copy_(0, routing[0], out)
        outputs.append(out)

    handle = layer.get_submodule(group.block).register_forward_hook(hook)
    with torch.no_grad():
        for _ in run_layer(layer, inputs, CPU):
            pass
    handle.remove()
    return outputs


@pytest.mark.parametrize("family,scheme,weighted", [("qwen2_vl", "W3A16-g32", False), ("qwen2_vl", "W4A8", False),
                                                    ("qwen2_vl", "W3A16-g32", True),
                                                    ("qwen3_vl_moe", "W3A16-g32", True), ("qwen3_vl_moe", "W4A8", False)])
def test_chosen_scales_lower_the_deployed_block_error_by_the_reported_ratio(tiny_checkpoints, calib_split,
                                                                            family, scheme, weighted):
    """For the MoE family the norm -> router + experts group is scored on the routed block's output, and
    each expert's up -> down group on its down projection over the tokens routed to it."""
    recipe = Recipe(method="awq", scheme=scheme, num_samples=4)
    model, adapter = load_model(tiny_checkpoints[family])
    apply_outliers(model, adapter, "weight" if scheme.endswith("g32") else "activation", 16.0, 2, seed=0)
    samples = prepare_samples(model, adapter, load_processor(tiny_checkpoints[family]), *calib_split, recipe)
    inputs = capture_layer_inputs(model, adapter, samples, CPU)
    layer = adapter.layers(model)[0]
    generator = torch.Generator().manual_seed(1)
    table = {}
    for i, s in enumerate(samples):  # random positive weights with some tokens dropped (a token-level set)
        w = torch.rand(s.num_tokens, generator=generator) * (torch.rand(s.num_tokens, generator=generator) > 0.3)
        table[i] = w
    token_weights = (lambda index, name, sample: table[sample]) if weighted else None
    weights = [table[i] for i in range(len(samples))] if weighted else None
    resolved = recipe.resolved_scheme()
    chosen, experts = [], 0
    recipe = dataclasses.replace(recipe, expert_min_tokens=16)  # the tiny model routes few tokens per expert
    for group in adapter.scaling_groups:  # one group at a time, so that no later fold touches its targets
        single = dataclasses.replace(adapter, scaling_groups=(group,))
        scaled_layer = copy.deepcopy(layer)
        records = rescale_layer(scaled_layer, 0, LayerStreams(inputs), RunContext.of(recipe, single, CPU, token_weights=token_weights))
        if not records:
            continue  # the group does not apply (v -> o under GQA)
        if "skipped" in records[0]:  # an expert routed too few tokens keeps its weights unscaled
            assert group.routed and records[0]["tokens"] < 16
            assert torch.equal(scaled_layer.get_submodule(group.source).weight, layer.get_submodule(group.source).weight)
            continue
        experts += group.routed
        chosen.append(records[0]["alpha"])
        fp = _block_outputs(layer, inputs, group)
        unscaled = _block_error(layer, inputs, group, resolved, fp, weights)
        scaled = _block_error(scaled_layer, inputs, group, resolved, fp, weights)
        # alpha = 0 is a candidate, so the chosen scales never make the deployed block worse...
        assert scaled <= unscaled * (1 + 1e-5), (group.source, scaled, unscaled)
        # ...and the search measured exactly this (folded norm, quantized targets, whole layer).
        assert records[0]["loss_ratio"] == pytest.approx(scaled / unscaled, rel=1e-4), group.source
    assert any(alpha > 0 for alpha in chosen)
    if adapter.experts is None:
        assert len(chosen) >= 3
    else:  # the attention's norm group, the MoE block's and the experts' (v -> o does not apply under GQA)
        assert [g.block for g in adapter.scaling_groups if not g.routed][-1] == "mlp"
        assert experts >= 4 and len(chosen) == 2 + experts


def test_token_wise_groups_capture_the_drawn_rows_in_the_draws_order(tiny_checkpoints, calib_split):
    """Capturing only the subsample gives what capturing every kept row and drawing from them gives: the same
    rows in the same order, and the channel magnitude of all kept rows."""
    from tlq.distributed import SINGLE
    from tlq.quant.scaling import channel_magnitude
    from tlq.group_data import Keep, capture, concatenated, kept_magnitude, plan_subsample

    recipe = Recipe(method="awq", scheme="W4A16-g32", num_samples=4)
    model, adapter = load_model(tiny_checkpoints["qwen2_vl"])
    samples = prepare_samples(model, adapter, load_processor(tiny_checkpoints["qwen2_vl"]), *calib_split, recipe)
    inputs = capture_layer_inputs(model, adapter, samples, CPU)
    layer, group = adapter.layers(model)[0], next(g for g in adapter.scaling_groups if g.source == "mlp.up_proj")
    generator = torch.Generator().manual_seed(0)
    weights = [torch.rand(len(s.token_kinds), generator=generator) * (torch.rand(len(s.token_kinds), generator=generator) > 0.3)
               for s in samples]
    rows = [(w > 0).nonzero().squeeze(1) for w in weights]
    kept = [w[w > 0] for w in weights]
    counts = [len(r) for r in rows]
    everything = plan_subsample(counts, 10**9, seed=0, index=0, ranks=SINGLE)
    full = concatenated(capture(layer, group, inputs, CPU, rows, Keep(), everything, kept).x)
    plan = plan_subsample(counts, 37, seed=0, index=0, ranks=SINGLE)
    drawn = capture(layer, group, inputs, CPU, rows, Keep(), plan, kept)
    drawn.sample = plan
    assert len(full) == sum(counts) > 37 and plan.tokens == 37
    assert torch.equal(drawn.x[0], full[plan.local])  # the drawn rows, in the draw's order
    assert torch.equal(kept_magnitude(drawn, torch.cat(kept), SINGLE), channel_magnitude(full, torch.cat(kept)))


def _solved_block_error(layer, inputs, group, recipe, fp_outputs):
    """The group's block error with its targets GPTQ-solved on the Hessian of the inputs the (folded) layer
    itself gives them, found here from the layer's own forward, not from the search's rescaled Hessian."""
    from tlq.quant.gptq import gptq_quantize

    layer = copy.deepcopy(layer)
    targets = [layer.get_submodule(t) for t in group.targets]
    seen = []
    handle = targets[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for _ in run_layer(layer, inputs, CPU):
            pass
    handle.remove()
    x = torch.cat(seen).float()
    for t in targets:
        t.weight.data = gptq_quantize(t.weight.data, x.t() @ x, recipe.resolved_scheme(),
                                      act_order=recipe.act_order_resolved).weight.to(t.weight.dtype)
    return sum(float((out - ref).pow(2).mean(-1).sum()) for out, ref in zip(_block_outputs(layer, inputs, group), fp_outputs))


def _weight_outlier_layer(tiny_checkpoints, calib_split, method):
    """The tiny Qwen2-VL with weight outliers, W3A16 g32, every token scored: (adapter, recipe, samples, layer-0
    inputs, layer 0)."""
    model, adapter = load_model(tiny_checkpoints["qwen2_vl"])
    apply_outliers(model, adapter, "weight", 16.0, 2, seed=0)
    base = Recipe(method=method, scheme="W3A16-g32", num_samples=4, scale_max_tokens=1 << 20)
    samples = prepare_samples(model, adapter, load_processor(tiny_checkpoints["qwen2_vl"]), *calib_split, base)
    return adapter, base, samples, capture_layer_inputs(model, adapter, samples, CPU), adapter.layers(model)[0]


def _picks(records):
    """The records without the count of block forwards run (rescoring k = 1 runs its one candidate again)."""
    return [{k: v for k, v in r.items() if not k.startswith("block_runs")} for r in records]


def test_rescoring_the_shortlist_after_gptq_never_leaves_gptq_a_worse_block(tiny_checkpoints, calib_split):
    """--scale-rescore-top k: the k candidates of least round-to-nearest error are scored again with the
    targets solved by GPTQ. With every candidate on the shortlist the pick's block error after GPTQ is at
    most that of the round-to-nearest pick (which is on it); with k = 1 the pick is the round-to-nearest one."""
    adapter, base, samples, inputs, layer = _weight_outlier_layer(tiny_checkpoints, calib_split, "awq_gptq")
    improved = 0
    for group in adapter.scaling_groups:
        single = dataclasses.replace(adapter, scaling_groups=(group,))
        layers, records = {}, {}
        for k in (0, 1, 100):
            layers[k] = copy.deepcopy(layer)
            run = RunContext.of(dataclasses.replace(base, scale_rescore_top=k), single, CPU)
            records[k] = rescale_layer(layers[k], 0, LayerStreams(inputs), run)
        if not records[0]:
            continue  # v -> o under GQA
        assert _picks(records[1]) == _picks(records[0]) and all(torch.equal(a, b) for a, b in
                                                 zip(layers[1].state_dict().values(), layers[0].state_dict().values()))
        fp = _block_outputs(layer, inputs, group)
        rtn_pick = _solved_block_error(layers[0], inputs, group, base, fp)
        rescored_pick = _solved_block_error(layers[100], inputs, group, base, fp)
        assert rescored_pick <= rtn_pick * (1 + 1e-4), (group.source, rescored_pick, rtn_pick)
        improved += rescored_pick < rtn_pick * 0.99
    assert improved >= 1  # on this model the round-to-nearest pick is not GPTQ's best for some group


def test_rescoring_solves_each_target_on_its_own_token_weights(tiny_checkpoints, calib_split):
    """Under TLQ each Linear's GPTQ weights its tokens by that Linear's importance, so the rescoring solves
    each target on the scored rows weighted by the target's own token weights: the weights it reads are
    those, and its pick is never worse after such solves than the round-to-nearest pick."""
    from tlq.group_data import group_data
    from tlq.rescale import TRANSFORMS
    from tlq.quant.gptq import gptq_quantize

    adapter, base, samples, inputs, layer = _weight_outlier_layer(tiny_checkpoints, calib_split, "tlq")
    generator = torch.Generator().manual_seed(3)
    table = {}

    def token_weights(index, name, sample):
        if (name, sample) not in table:
            n = samples[sample].num_tokens
            table[name, sample] = torch.rand(n, generator=generator) * (torch.rand(n, generator=generator) > 0.3)
        return table[name, sample]

    group = adapter.scaling_groups[0]  # the attention's norm -> q, k, v, weighted by o_proj's importance
    single = dataclasses.replace(adapter, scaling_groups=(group,))

    def run(k):
        return RunContext.of(dataclasses.replace(base, scale_rescore_top=k), single, CPU, token_weights=token_weights)

    data, _, kept = group_data(layer, group, LayerStreams(inputs), run(100), 0, TRANSFORMS.get("scale_search"))
    rows = [(token_weights(0, group.output_linear, i) > 0).nonzero().squeeze(1) for i in range(len(samples))]
    for target, got in zip(group.targets, data.target_weights):
        assert torch.equal(got, torch.cat([token_weights(0, target, i)[r] for i, r in enumerate(rows)]))
    assert not torch.equal(data.target_weights[0], data.target_weights[1])
    # the rescoring's solve of target p is GPTQ on H_p / (s s^T), H_p = sum_t w_p,t x_t x_t^T over the scored rows
    from tlq.distributed import SINGLE
    from tlq.rescale import _BlockObjective, _GroupContext, _solver_rescore

    scheme = base.resolved_scheme()
    x = torch.cat(data.x).float()
    targets = [layer.get_submodule(t) for t in group.targets]
    ctx = _GroupContext(layer, 0, run(100).config, scheme, CPU, SINGLE)
    objective = _BlockObjective(layer.get_submodule(group.block), targets, [], scheme, "mse", CPU, SINGLE)
    rescored = _solver_rescore(ctx, objective, x, torch.cat(kept), data.target_weights)
    scales = torch.rand(x.shape[1], generator=generator) + 0.5
    for position, (target, w) in enumerate(zip(targets, data.target_weights)):
        scaled = target.weight.data * scales[None, :]
        hessian = ((x * w[:, None]).t() @ x) / (scales[:, None] * scales[None, :])
        want = gptq_quantize(scaled, hessian, scheme, act_order=base.act_order_resolved).weight
        assert torch.allclose(rescored.quantize(scaled, scales, position), want, atol=1e-5), target

    def solved_error(scaled_layer):
        scaled_layer = copy.deepcopy(scaled_layer)
        seen = []
        handle = scaled_layer.get_submodule(group.targets[0]).register_forward_pre_hook(
            lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
        with torch.no_grad():
            for _ in run_layer(scaled_layer, inputs, CPU):
                pass
        handle.remove()
        x = torch.cat([s[r] for s, r in zip(seen, rows)]).float()
        for target in group.targets:
            w = torch.cat([token_weights(0, target, i)[r] for i, r in enumerate(rows)])
            linear = scaled_layer.get_submodule(target)
            linear.weight.data = gptq_quantize(linear.weight.data, (x * w[:, None]).t() @ x, base.resolved_scheme(),
                                               act_order=base.act_order_resolved).weight.to(linear.weight.dtype)
        outputs = _block_outputs(scaled_layer, inputs, group)
        return sum(float(((o - f)[r].pow(2).mean(-1) * token_weights(0, group.output_linear, i)[r]).sum())
                   for i, (o, f, r) in enumerate(zip(outputs, fp, rows)))

    fp = _block_outputs(layer, inputs, group)
    picks = {}
    for k in (0, 100):
        picks[k] = copy.deepcopy(layer)
        rescale_layer(picks[k], 0, LayerStreams(inputs), run(k))
    assert solved_error(picks[100]) <= solved_error(picks[0]) * (1 + 1e-4)


def test_the_attention_groups_input_rows_are_kept_only_for_the_rescoring(tiny_checkpoints, calib_split):
    """The attention's search replays its calls and reads its targets' input rows only for their channel
    magnitude (summed as they pass) and, with --scale-rescore-top, for the GPTQ rescoring's Hessians: without
    the rescoring no row is kept (one copy of the layer's inputs less at the search's peak), and the
    magnitude is that of the rows a rescoring capture keeps."""
    from tlq.distributed import SINGLE
    from tlq.group_data import group_data, kept_magnitude
    from tlq.quant.scaling import channel_magnitude
    from tlq.rescale import TRANSFORMS

    adapter, base, samples, inputs, layer = _weight_outlier_layer(tiny_checkpoints, calib_split, "tlq")
    generator = torch.Generator().manual_seed(5)
    weights = {i: torch.rand(s.num_tokens, generator=generator) * (torch.rand(s.num_tokens, generator=generator) > 0.4)
               for i, s in enumerate(samples)}
    group = adapter.scaling_groups[0]
    assert group.mixes_tokens

    def captured(k):
        run = RunContext.of(dataclasses.replace(base, scale_rescore_top=k), adapter, CPU,
                            token_weights=lambda index, name, sample: weights[sample])
        data, _, kept = group_data(layer, group, LayerStreams(inputs), run, 0, TRANSFORMS.get("scale_search"))
        return data, torch.cat(kept)

    plain, w = captured(0)
    rescoring, _ = captured(4)
    assert plain.x == [] and len(plain.calls) == len(plain.outputs) == len(samples)
    rows = torch.cat(rescoring.x)
    assert len(rows) == int((w > 0).sum()) < sum(s.num_tokens for s in samples)
    assert torch.allclose(kept_magnitude(plain, w, SINGLE), channel_magnitude(rows, w), rtol=1e-6)
    assert torch.equal(kept_magnitude(plain, w, SINGLE), kept_magnitude(rescoring, w, SINGLE))


@pytest.mark.parametrize("method,rescore_top,weighted", [("awq", None, False), ("tlq", None, True),
                                                         ("awq_gptq", None, False), ("awq_gptq", 3, False)])
def test_a_candidate_stops_once_it_cannot_win_and_the_layer_is_the_same(tiny_checkpoints, calib_split, monkeypatch,
                                                                        method, rescore_top, weighted):
    """The search stops a candidate's per-sample sum once it is past the shortlist's bound: the folded layer
    is bit for bit the one full scoring gives (and so are the picks), with fewer block forwards."""
    import tlq.rescale as rescale

    adapter, base, samples, inputs, layer = _weight_outlier_layer(tiny_checkpoints, calib_split, method)
    recipe = dataclasses.replace(base, scale_rescore_top=rescore_top, scale_max_tokens=64)  # token-wise: chunks
    generator = torch.Generator().manual_seed(5)
    table = {i: torch.rand(s.num_tokens, generator=generator) * (torch.rand(s.num_tokens, generator=generator) > 0.3)
             for i, s in enumerate(samples)}
    token_weights = (lambda index, name, sample: table[sample]) if weighted else None
    monkeypatch.setattr(rescale, "CHUNK", 16)  # several chunks per token-wise block, so those can stop early too

    def rescaled():
        scaled = copy.deepcopy(layer)
        run = RunContext.of(recipe, adapter, CPU, token_weights=token_weights)
        return scaled, rescale_layer(scaled, 0, LayerStreams(inputs), run)

    bounded_layer, bounded = rescaled()
    full_score = rescale._BlockObjective.bounded
    monkeypatch.setattr(rescale._BlockObjective, "bounded", lambda self, scales, above: full_score(self, scales, None))
    full_layer, full = rescaled()
    assert _picks(bounded) == _picks(full) and len(full) >= 3
    assert all(torch.equal(a, b) for a, b in zip(bounded_layer.state_dict().values(), full_layer.state_dict().values()))
    assert all(r["block_runs_full"] == f["block_runs_full"] == f["block_runs"] for r, f in zip(bounded, full))
    assert all(r["block_runs"] <= r["block_runs_full"] for r in bounded)
    assert sum(r["block_runs"] for r in bounded) < sum(r["block_runs_full"] for r in bounded)


def test_no_tensor_of_the_search_outlives_it(tiny_checkpoints, calib_split):
    """After a layer's rescaling with the bounded search (candidates stopped part-way), no tensor it made
    is left alive: the live tensors are those of before, plus none."""
    import gc

    adapter, base, samples, inputs, layer = _weight_outlier_layer(tiny_checkpoints, calib_split, "tlq")
    scaled = copy.deepcopy(layer)

    def live_bytes():
        gc.collect()
        return sum(t.numel() * t.element_size() for t in gc.get_objects() if torch.is_tensor(t))

    before = live_bytes()
    records = rescale_layer(scaled, 0, LayerStreams(inputs), RunContext.of(base, adapter, CPU))
    assert sum(r["block_runs"] for r in records) < sum(r["block_runs_full"] for r in records)  # it did stop early
    assert live_bytes() == before
