import torch

from tlq.quant.primitives import fake_quant_activation, fake_quant_weight
from tlq.recipe import parse_scheme


def test_weights_land_on_their_grid():
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    for name in ("W3A16", "W4A16", "W4A8", "W8A8", "W2A16"):
        scheme = parse_scheme(name)
        q = fake_quant_weight(w, scheme)
        group = scheme.group_for(256)
        codes = q.weight.reshape(16, -1, group) / q.scale.unsqueeze(-1) + q.zero_point.unsqueeze(-1)
        assert torch.allclose(codes, codes.round(), atol=1e-3), name
        lo, hi = scheme.weight_qrange
        assert codes.round().min() >= lo and codes.round().max() <= hi
        assert q.scale.shape == (16, 256 // group)
        if scheme.symmetric:
            assert (q.zero_point == 0).all()
        # RTN error is bounded by half a step for values inside the range.
        err = (q.weight - w).abs().reshape(16, -1, group)
        assert (err <= q.scale.unsqueeze(-1) * 1.01).all()


def test_more_bits_less_error():
    torch.manual_seed(0)
    w = torch.randn(32, 128)
    errors = [(fake_quant_weight(w, parse_scheme(f"W{b}A16")).weight - w).norm() for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)


def test_activation_quant_is_per_token():
    x = torch.tensor([[1.0, -0.5, 0.25], [100.0, 3.0, -50.0]])
    q = fake_quant_activation(x)
    # Each token keeps its own max exactly up to int8 rounding; a large token does not crush a small one.
    assert torch.allclose(q[0], x[0], rtol=0.01, atol=0.01)
    assert torch.allclose(q[1], x[1], rtol=0.01, atol=0.5)
    assert torch.equal(fake_quant_activation(torch.zeros(2, 3)), torch.zeros(2, 3))


def test_mse_grid_never_has_more_error_than_minmax_and_stays_on_a_valid_grid():
    import dataclasses

    from tlq.quant.primitives import MSE_NORM

    torch.manual_seed(0)
    weight = torch.randn(64, 256) * torch.rand(64, 1) * 3
    weight[0, 5] = 40.0  # an outlier: shrinking the range pays off for the rest of its group
    for name in ("W3A16", "W4A16-g64"):
        for symmetric in (True, False):
            scheme = parse_scheme(name, symmetric=symmetric)
            minmax = fake_quant_weight(weight, scheme)
            mse = fake_quant_weight(weight, dataclasses.replace(scheme, grid="mse"))
            group = scheme.group_for(256)

            def group_error(q):
                return (q.weight - weight).abs().pow(MSE_NORM).reshape(64, -1, group).sum(-1)

            assert (group_error(mse) <= group_error(minmax) * (1 + 1e-6)).all()
            assert (group_error(mse) < group_error(minmax)).any()
            # every value is a code of its own group's grid
            codes = mse.weight.reshape(64, -1, group) / mse.scale.float()[..., None] + mse.zero_point[..., None]
            assert torch.allclose(codes, codes.round(), atol=1e-3)
