import torch
from torch import nn

from tlq.quant.scaling import apply_scales, search_scales
from tlq.recipe import parse_scheme


def _group(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(300, 32) * torch.logspace(-1, 1, 32)
    targets = [nn.Linear(32, 16, bias=False), nn.Linear(32, 24, bias=False)]
    return x, targets


def test_uniform_weights_equal_unweighted_search():
    x, targets = _group()
    for scheme in (parse_scheme("W3A16-g32"), parse_scheme("W4A8")):
        plain = search_scales(x, targets, scheme)
        weighted = search_scales(x, targets, scheme, weights=torch.ones(len(x)))
        assert torch.equal(plain[0], weighted[0]) and plain[1] == weighted[1]
        assert plain[2] <= 1.0  # never worse than no scaling (alpha = 0 is in the grid)


def test_zero_weight_tokens_do_not_count():
    x, targets = _group(1)
    w = torch.ones(len(x))
    w[150:] = 0.0
    scheme = parse_scheme("W3A16-g32")
    assert torch.equal(search_scales(x, targets, scheme, weights=w)[0],
                       search_scales(x[:150], targets, scheme, weights=torch.ones(150))[0])


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
