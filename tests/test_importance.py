import pytest
import torch

from tlq.api import build_token_weights, prepare_samples
from tlq.engine import quantize_layers
from tlq.importance import TokenImportance, compute_importance
from tlq.weighting import WeightingConfig, modality_ratios, modality_weights, select_tokens, token_weights
from tlq.models import ANSWER, IMAGE, PROMPT, load_model
from tlq.models.processing import load_processor
from tlq.recipe import Recipe


def _setup(checkpoint, calib_split, n=2):
    model, adapter = load_model(checkpoint)
    samples = prepare_samples(model, adapter, load_processor(checkpoint), *calib_split, Recipe(num_samples=n))
    return model, adapter, samples


def test_fisher_score_matches_finite_differences(tiny_checkpoints, calib_split):
    """score_t = mean_o (dL/dy_{t,o})^2 at the Linear's own output, checked channel by channel."""
    model, adapter, samples = _setup(tiny_checkpoints["qwen2_vl"], calib_split, n=1)
    sample = samples[0]
    importance = compute_importance(model, adapter, [sample])
    answer = int((sample.labels[0] != -100).nonzero()[0])
    image = int((sample.token_kinds == IMAGE).nonzero()[0])
    eps, pairs = 1e-2, []
    for layer_index, name in ((0, "self_attn.v_proj"), (1, "self_attn.k_proj")):
        linear = adapter.layers(model)[layer_index].get_submodule(name)
        for t in (image, answer - 1):
            grads = []
            for o in range(linear.out_features):
                losses = []
                for sign in (1.0, -1.0):
                    def bump(module, args, output, o=o, sign=sign):
                        output = output.clone()
                        output[0, t, o] += sign * eps
                        return output

                    handle = linear.register_forward_hook(bump)
                    with torch.no_grad():
                        losses.append(float(model(**sample.inputs, labels=sample.labels).loss))
                    handle.remove()
                grads.append((losses[0] - losses[1]) / (2 * eps))
            finite_difference = torch.tensor(grads).pow(2).mean()
            score = importance.scores[f"{layer_index}.{name}"][0][t]
            pairs.append((float(score), float(finite_difference), (layer_index, name, t)))
    # Float32 finite differences resolve about 1e-3 of the largest score; below that both are ~0.
    floor = 1e-3 * max(fd for _, fd, _ in pairs)
    for score, fd, where in pairs:
        assert abs(score - fd) <= 0.05 * fd + floor, where
    assert sum(fd > floor for _, fd, _ in pairs) >= 2


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "llava_onevision", "gemma3"])  # DeepStack;
# routed experts; layer kinds
def test_streamed_backward_matches_full_autograd(family, tiny_checkpoints, calib_split):
    """One layer resident at a time gives the per-token gradients of autograd through the whole model."""
    model, adapter, samples = _setup(tiny_checkpoints[family], calib_split, n=2)
    for score in ("fisher", "gx", "layer_output"):
        full = compute_importance(model, adapter, samples, score, streamed=False)
        streamed = compute_importance(model, adapter, samples, score, streamed=True)
        assert abs(full.loss - streamed.loss) <= 1e-6 * abs(full.loss)
        for store in ("scores", "abs_grad"):
            reference, candidate = getattr(full, store), getattr(streamed, store)
            assert sorted(reference) == sorted(candidate) and len(reference) == 2 * len(adapter.scored_modules)
            for key in reference:
                for a, b in zip(reference[key], candidate[key], strict=True):
                    assert a.shape == b.shape, (score, key)
                    if a.abs().max() == 0:  # an expert no token of this sample was routed to
                        assert adapter.experts is not None and b.abs().max() == 0, (score, key)
                        continue
                    assert float((a - b).norm() / a.norm()) < 1e-4, (score, store, key)


def test_selection_respects_budget_and_minimum_share():
    torch.manual_seed(0)
    kinds = torch.tensor([IMAGE] * 80 + [PROMPT] * 15 + [ANSWER] * 5)
    score = torch.rand(100)
    score[kinds == IMAGE] *= 0.01  # image tokens would all lose without a quota
    keep = select_tokens(score, kinds, budget=20, min_share=0.2)
    assert int(keep.sum()) == 20
    assert int((keep & (kinds == IMAGE)).sum()) >= 4
    assert int((keep & (kinds == ANSWER)).sum()) == 4  # 5 answer tokens, all high: min quota, then by score
    # Ties broken by the tie-break score.
    flat = torch.ones(10)
    kinds10 = torch.zeros(10, dtype=torch.long)
    tie = torch.arange(10.0)
    assert select_tokens(flat, kinds10, 3, 0.0, tie).nonzero().squeeze(1).tolist() == [7, 8, 9]


def _toy_importance():
    kinds = [torch.tensor([PROMPT, IMAGE, IMAGE, ANSWER, ANSWER]), torch.tensor([IMAGE, PROMPT, ANSWER])]
    scores = {"0.self_attn.q_proj": [torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0]), torch.tensor([1.0, 1.0, 1.0])]}
    abs_grad = {
        "0.self_attn.o_proj": [torch.tensor([9.0, 1.0, 3.0, 4.0, 4.0]), torch.tensor([2.0, 9.0, 4.0])],
        "0.mlp.down_proj": [torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0]), torch.tensor([1.0, 0.0, 2.0])],
        "1.self_attn.o_proj": [torch.tensor([0.0, 8.0, 8.0, 2.0, 2.0]), torch.tensor([8.0, 0.0, 2.0])],
        "1.mlp.down_proj": [torch.tensor([0.0, 0.1, 0.1, 2.0, 2.0]), torch.tensor([0.1, 0.0, 2.0])],
        "2.self_attn.o_proj": [torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0]), torch.tensor([1.0, 0.0, 1.0])],
        "2.mlp.down_proj": [torch.tensor([0.0, 3.0, 3.0, 2.0, 2.0]), torch.tensor([3.0, 0.0, 2.0])],
    }
    return TokenImportance(scores, abs_grad, kinds)


def test_weights_are_normalised_per_sample_and_floored():
    lookup = token_weights(_toy_importance(), WeightingConfig(floor=0.1))
    w0 = lookup(0, "self_attn.q_proj", 0)
    assert torch.allclose(w0.mean(), torch.tensor(1.0))
    assert torch.allclose(w0, 0.1 + 0.9 * torch.tensor([1.0, 2, 3, 4, 10]) / 4.0)
    assert torch.allclose(lookup(0, "self_attn.q_proj", 1), torch.ones(3))
    clipped = token_weights(_toy_importance(), WeightingConfig(floor=0.0, clip=2.0))(0, "self_attn.q_proj", 0)
    assert clipped.max() == 2.0


def test_mbq_ratio_uses_image_and_answer_tokens_with_median_floor():
    from tlq.models import ADAPTERS

    importance = _toy_importance()
    ratios = modality_ratios(importance, ADAPTERS["qwen2_vl"])
    # layer 0 attention: image |g| = (1 + 3 + 2) / 3 = 2, answer = (4 + 4 + 4) / 3 = 4 -> 0.5; prompt ignored.
    raw_attention = {0: 0.5, 1: 8.0 / 2.0, 2: 1.0}
    median = sorted(raw_attention.values())[1]
    for layer, rho in raw_attention.items():
        assert abs(ratios[layer]["attention"] - max(rho, median)) < 1e-6
    raw_mlp = {0: 0.5, 1: 0.05, 2: 1.5}
    assert abs(ratios[1]["mlp"] - 0.5) < 1e-6  # floored at the median

    lookup = modality_weights(importance, ADAPTERS["qwen2_vl"])
    w = lookup(1, "self_attn.q_proj", 0)
    assert w.tolist() == [0.0, 4.0, 4.0, 1.0, 1.0]
    assert lookup(2, "mlp.up_proj", 1).tolist() == [1.5, 0.0, 1.0]
    assert raw_mlp[2] == 1.5


def test_tlq_with_floor_one_is_plain_gptq(tiny_checkpoints, calib_split):
    results = {}
    for method in ("gptq", "tlq"):
        recipe = Recipe(method=method, scheme="W3A16-g32", num_samples=3, importance_floor=1.0, backend="gptq")
        model, adapter, samples = _setup(tiny_checkpoints["qwen2_vl"], calib_split, n=3)
        weights, _ = build_token_weights(model, adapter, samples, recipe)
        results[method] = quantize_layers(model, adapter, samples, recipe, token_weights=weights, progress=False)
    for name, q in results["gptq"].quantized.items():
        assert torch.allclose(q.weight, results["tlq"].quantized[name].weight, atol=1e-6), name


def test_recipe_chooses_the_gradient_pass(tiny_checkpoints, calib_split, monkeypatch):
    """--importance-pass full (1 forward + 1 backward) and streamed give the same token weights."""
    import tlq.importance as importance_module

    used = []
    for name in ("_full_backward", "_streamed_backward"):
        original = getattr(importance_module, name)
        monkeypatch.setattr(importance_module, name,
                            lambda *a, _f=original, _n=name, **k: used.append(_n) or _f(*a, **k))
    lookups = {}
    for gradient_pass in ("full", "streamed"):
        recipe = Recipe(method="tlq", scheme="W4A8", num_samples=3, importance_pass=gradient_pass)
        model, adapter, samples = _setup(tiny_checkpoints["qwen2_vl"], calib_split, n=3)
        lookups[gradient_pass], _ = build_token_weights(model, adapter, samples, recipe)
    for name in ("self_attn.k_proj", "mlp.down_proj"):
        for sample in range(3):
            a, b = lookups["full"](1, name, sample), lookups["streamed"](1, name, sample)
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (name, sample)
    assert used == ["_full_backward", "_streamed_backward"]


def test_importance_file_round_trip(tiny_checkpoints, calib_split, tmp_path):
    model, adapter, samples = _setup(tiny_checkpoints["llava_onevision"], calib_split, n=2)
    importance = compute_importance(model, adapter, samples)
    importance.save(tmp_path / "imp.safetensors")
    loaded = TokenImportance.load(tmp_path / "imp.safetensors")
    assert set(loaded.scores) == {f"{i}.{n}" for i in range(2) for n in adapter.linear_names}
    for key, values in importance.scores.items():
        for a, b in zip(values, loaded.scores[key]):
            assert torch.equal(a, b)
    assert [k.tolist() for k in loaded.token_kinds] == [k.tolist() for k in importance.token_kinds]
    assert loaded.kept_summary()["image"] > loaded.kept_summary()["answer"] > 0


def test_auto_takes_the_full_pass_when_it_fits(tiny_checkpoints, calib_split):
    from tlq.importance import full_pass_fits

    model, adapter, samples = _setup(tiny_checkpoints["qwen2_vl"], calib_split, n=2)
    assert full_pass_fits(model, adapter, samples, torch.device("cpu"))  # a tiny model always fits
    lazy_layers = type("Lazy", (), {"lazy": True})()
    assert not full_pass_fits(model, adapter, samples, torch.device("cpu"), lazy_layers)
    recipe = Recipe(method="tlq", scheme="W4A8", num_samples=2)
    _, record = build_token_weights(model, adapter, samples, recipe)
    assert recipe.importance_pass == "auto" and record["gradient_pass"] == "full"


@pytest.mark.parametrize("score", ["fisher", "gx"])
@pytest.mark.parametrize("streamed", [False, True])
def test_the_gradient_pass_leaves_no_activations_behind(tiny_checkpoints, calib_split, score, streamed):
    """Nothing that took part in autograd outlives the pass, not even as cyclic garbage waiting for
    the collector (a hook closure that reached its own tensor once kept every sample's activations)."""
    import gc

    model, adapter, samples = _setup(tiny_checkpoints["qwen2_vl"], calib_split)
    gc.collect()
    gc.disable()
    try:
        compute_importance(model, adapter, samples, score, streamed=streamed)
        leftovers = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.requires_grad]
    finally:
        gc.enable()
    assert leftovers == []
