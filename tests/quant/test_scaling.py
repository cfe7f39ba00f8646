import torch
from torch import nn

from tlq.quant.scaling import apply_scales, candidate_scales, channel_magnitude, search_scales, weight_magnitude


def _group(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(300, 32) * torch.logspace(-1, 1, 32)
    targets = [nn.Linear(32, 16, bias=False), nn.Linear(32, 24, bias=False)]
    return x, targets


def test_search_returns_the_grid_minimum_and_never_loses_to_no_scaling():
    x, _ = _group()
    magnitude = channel_magnitude(x)
    target = candidate_scales(magnitude, 0.35)
    seen = []

    def error(scales):
        seen.append(scales)
        return float((scales - target).pow(2).sum())

    scales, choice, ratio = search_scales(magnitude, error, grid=20)
    assert len(seen) == 20 and torch.equal(seen[0], torch.ones_like(magnitude))
    assert choice == {"alpha": 0.35, "form": "activation"} and torch.equal(scales, target) and ratio <= 1.0
    # An error that no scaling improves keeps no scaling (ties keep the earlier candidate).
    assert search_scales(magnitude, lambda s: 1.0, grid=20)[1] == {"alpha": 0.0, "form": "none"}


def test_alpha_one_is_tried_only_when_asked():
    x, targets = _group(3)
    magnitude, weight = channel_magnitude(x), weight_magnitude(targets, 16)
    for form, w in (("activation", None), ("duo", weight)):
        target = candidate_scales(magnitude, 1.0, w)
        def error(scales):
            return float((scales - target).abs().sum())
        assert search_scales(magnitude, error, 20, w, form)[1]["alpha"] == 0.95  # the grid's default end
        scales, choice, _ = search_scales(magnitude, error, 20, w, form, alpha_one=True)
        assert choice == {"alpha": 1.0, "form": form} and torch.equal(scales, target)


def test_duo_candidates_divide_by_the_group_normalised_weight_magnitude():
    x, targets = _group(3)
    magnitude, weight = channel_magnitude(x), weight_magnitude(targets, 16)
    # per group of 16 input channels, every row's largest |w| is normalised to 1
    assert weight.shape == (32,) and float(weight.max()) <= 1.0
    rows = torch.cat([t.weight.detach().abs() for t in targets])
    expected = (rows.reshape(40, 2, 16) / rows.reshape(40, 2, 16).amax(-1, keepdim=True)).reshape(40, 32).mean(0)
    assert torch.allclose(weight, expected, atol=1e-5)
    target = candidate_scales(magnitude, 0.5, weight)
    scales, choice, _ = search_scales(magnitude, lambda s: float((s - target).abs().sum()), 20, weight, "both")
    assert choice == {"alpha": 0.5, "form": "duo"} and torch.equal(scales, target)


def test_candidate_scales_are_normalised_powers_of_the_magnitude():
    magnitude = torch.tensor([0.5, 1.0, 8.0])
    for alpha in (0.25, 0.5, 0.9):
        s = candidate_scales(magnitude, alpha)
        assert torch.allclose(s.max() * s.min(), torch.tensor(1.0))
        assert torch.allclose(s / s[0], (magnitude / magnitude[0]).pow(alpha))


def test_magnitude_counts_only_weighted_tokens():
    x, _ = _group(1)
    w = torch.ones(len(x))
    w[150:] = 0.0
    assert torch.allclose(channel_magnitude(x, w), channel_magnitude(x[:150]))
    assert torch.allclose(channel_magnitude(x, torch.ones(len(x))), channel_magnitude(x))


def test_folding_preserves_the_function():
    x, targets = _group(2)
    norm = nn.LayerNorm(32)
    nn.init.normal_(norm.weight)
    before = [t(norm(x)) for t in targets]
    scales = torch.rand(32) + 0.5
    apply_scales(norm, targets, scales)
    after = [t(norm(x)) for t in targets]
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-5)


def test_folding_into_a_norm_with_a_weight_offset_preserves_the_function():
    """Gemma's RMSNorm multiplies by (1 + weight): the fold keeps the offset outside the scale; folding as
    for a plain norm would not."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    x, targets = _group(2)
    norm = Gemma3RMSNorm(32)
    nn.init.normal_(norm.weight)
    with torch.no_grad():
        before = [t(norm(x)) for t in targets]
        scales = torch.rand(32) + 0.5
        plain = Gemma3RMSNorm(32)
        plain.weight.data = norm.weight.data.clone()
        apply_scales(plain, [nn.Linear(32, 4)], scales)
        apply_scales(norm, targets, scales, source_weight_offset=1.0)
        after = [t(norm(x)) for t in targets]
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(plain.weight, norm.weight, atol=1e-3)


def test_a_solver_that_reads_inputs_without_solve_given_is_refused_in_one_line():
    import pytest

    from tlq.errors import TlqError
    from tlq.quant.base import LinearSolver
    from tlq.recipe import parse_scheme

    class Statistics(LinearSolver):  # reads inputs, cannot solve from a Hessian
        pass

    with pytest.raises(TlqError, match="--scale-rescore-top 0"):
        Statistics.solve_given(torch.zeros(4, 8), torch.eye(8), parse_scheme("W4A16"))
