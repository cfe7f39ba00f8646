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


class _ItemErrors:
    """An error that is a sum of per-item parts (as the block objective's per-sample sum), with the
    `bounded` form the search uses: it stops adding once past `above` and counts the items it added."""

    def __init__(self, table: dict, bounded: bool = True) -> None:
        self.table, self.added = table, 0
        if not bounded:
            self.bounded = None

    def parts(self, scales: torch.Tensor) -> list[float]:
        return self.table[round(float(scales[0]), 6)]

    def __call__(self, scales: torch.Tensor) -> float:
        return self.bounded_sum(scales, None)

    def bounded(self, scales: torch.Tensor, above: float | None) -> float:
        return self.bounded_sum(scales, above)

    def bounded_sum(self, scales, above):
        total = 0.0
        for part in self.parts(scales):
            total += part
            self.added += 1
            if above is not None and total > above:
                break
        return total


def _full_search(magnitude, error, grid, weight, form, rescore=None, rescore_top=0):
    """The search spelled out: every candidate scored in full, sorted (ties: the earlier), the k best
    rescored in their order (ties: the earlier), the winner's error over no scaling's."""
    from tlq.quant.scaling import _trial_scales, _trials

    trials = _trials(grid, form, False)
    scored = sorted((error(_trial_scales(magnitude, a, k, weight)), i) for i, (a, k) in enumerate(trials))
    best = scored[0]
    if rescore is not None and rescore_top > 0:
        shortlist = sorted(scored[:rescore_top], key=lambda t: t[1])
        again = [rescore(_trial_scales(magnitude, *trials[i], weight)) for _, i in shortlist]
        best = shortlist[min(range(len(shortlist)), key=lambda j: (again[j], j))]
    baseline = next(e for e, i in scored if i == 0)
    alpha, kind = trials[best[1]]
    return _trial_scales(magnitude, alpha, kind, weight), {"alpha": alpha, "form": kind}, best[0] / max(baseline, 1e-30)


def test_bounded_scoring_picks_what_full_scoring_picks_with_fewer_items():
    """A candidate's sum may stop once it cannot make the shortlist, and with every candidate rescored only
    no scaling and the winner are scored by round to nearest: the winner, the ratio and the shortlist are
    those of scoring every candidate in full, ties included."""
    magnitude = torch.tensor([0.3, 1.0, 2.5, 7.0])
    weight = torch.tensor([0.5, 0.9, 0.2, 0.7])
    generator = torch.Generator().manual_seed(0)
    saved = 0
    for trial in range(40):
        for form in ("activation", "duo", "both"):
            keys = [round(float(_first(magnitude, a, k, weight)), 6) for a, k in _candidates(20, form)]
            parts = {}  # U-shaped errors over the grid, noisy parts, and exact ties in every fifth trial
            for position, key in enumerate(keys):
                level = 1.0 + 4.0 * ((position / len(keys)) - torch.rand((), generator=generator).item() * 0.6) ** 2
                if trial % 5 == 0 and position % 7 == 3:
                    level = 1.0
                parts[key] = [level / 8] * 8 if trial % 5 == 0 else (torch.rand(8, generator=generator) * level / 4).tolist()
            again = {key: torch.rand(8, generator=generator).tolist() for key in keys}
            for top in (0, 3, 100):
                bounded, full = _ItemErrors(parts), _ItemErrors(parts, bounded=False)
                got = search_scales(magnitude, bounded, 20, weight, form, rescore=_ItemErrors(again) if top else None,
                                    rescore_top=top)
                want = _full_search(magnitude, full, 20, weight, form, _ItemErrors(again, False) if top else None, top)
                assert torch.equal(got[0], want[0]) and got[1] == want[1] and got[2] == want[2], (trial, form, top)
                assert bounded.added <= full.added
                if top == 100:  # every candidate rescored: round to nearest only for no scaling and the winner
                    assert bounded.added <= 2 * 8
                saved += full.added - bounded.added
    assert saved > 0


def _candidates(grid, form):
    from tlq.quant.scaling import _trials
    return _trials(grid, form, False)


def _first(magnitude, alpha, kind, weight):
    from tlq.quant.scaling import _trial_scales
    return _trial_scales(magnitude, alpha, kind, weight)[0]
