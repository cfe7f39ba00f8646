import torch

from tlq.quant.gptq import GPTQ, gptq_quantize
from tlq.quant.primitives import fake_quant_weight
from tlq.recipe import Recipe, parse_scheme


def _correlated_inputs(n=512, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5
    scales = torch.logspace(-1, 1, d)
    return (torch.randn(n, d, generator=g) * scales) @ mix + 0.1 * torch.randn(n, d, generator=g)


def _solve(weight, x, recipe, token_weights=None):
    solver = GPTQ(weight, recipe.resolved_scheme(), recipe.resolve().gptq)
    solver.observe(x, token_weights)
    return solver


def test_gptq_beats_rtn_on_output_error():
    torch.manual_seed(0)
    x = _correlated_inputs()
    w = torch.randn(32, 64)
    for scheme in ("W3A16-g32", "W4A8", "W2A16-g32"):
        recipe = Recipe(scheme=scheme)
        gptq = _solve(w, x, recipe).solve().weight
        rtn = fake_quant_weight(w, recipe.resolved_scheme()).weight
        err_gptq = (x @ (w - gptq).T).pow(2).mean()
        err_rtn = (x @ (w - rtn).T).pow(2).mean()
        assert err_gptq < 0.8 * err_rtn, scheme


def test_uniform_token_weights_give_plain_gptq():
    x, w, recipe = _correlated_inputs(), torch.randn(16, 64), Recipe(scheme="W3A16-g32")
    plain = _solve(w, x, recipe)
    ones = _solve(w, x, recipe, torch.ones(x.shape[0]))
    assert torch.allclose(plain.hessian(), ones.hessian(), rtol=1e-6)
    assert torch.equal(plain.solve().weight, ones.solve().weight)


def test_zero_weight_removes_a_token():
    x, w, recipe = _correlated_inputs(), torch.randn(16, 64), Recipe(scheme="W3A16-g32")
    weights = torch.ones(x.shape[0])
    weights[::3] = 0.0
    kept = x[weights > 0]
    weighted = _solve(w, x, recipe, weights)
    subset = _solve(w, kept, recipe)
    # Same sum of outer products; only the token count (a global scale, invisible to GPTQ) differs.
    for h_weighted, h_subset in zip(weighted.statistics()[:-1], subset.statistics()[:-1]):  # the sums
        assert torch.allclose(h_weighted, h_subset, rtol=1e-5, atol=1e-4)
    assert torch.allclose(weighted.solve().weight, subset.solve().weight, atol=1e-6)


def test_token_weights_change_what_is_protected():
    # Two populations of tokens live in different input directions; up-weighting one of them must
    # lower the error on that population.
    torch.manual_seed(1)
    a = torch.zeros(256, 64)
    a[:, :32] = torch.randn(256, 32)
    b = torch.zeros(256, 64)
    b[:, 32:] = torch.randn(256, 32)
    b[:, :32] = 0.3 * torch.randn(256, 32)
    x = torch.cat([a, b])
    w = torch.randn(16, 64)
    recipe = Recipe(scheme="W2A16-g64")
    favour_b = torch.cat([torch.full((256,), 0.01), torch.ones(256)])
    q_uniform = _solve(w, x, recipe).solve().weight
    q_b = _solve(w, x, recipe, favour_b).solve().weight
    err = lambda q: (b @ (w - q).T).pow(2).mean()  # noqa: E731
    assert err(q_b) < err(q_uniform)


def test_act_order_static_groups_and_dead_inputs():
    x = _correlated_inputs()
    x[:, 5] = 0.0  # an input that never fires
    w = torch.randn(16, 64)
    scheme = parse_scheme("W4A16-g32")
    h = 2 * x.T @ x / x.shape[0]
    q = gptq_quantize(w, h, scheme, act_order=True)
    assert (q.weight[:, 5] == 0).all()
    # Static groups: codes are integers on the (unpermuted) group grid.
    codes = q.weight.reshape(16, 2, 32) / q.scale.unsqueeze(-1) + q.zero_point.unsqueeze(-1)
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    plain = gptq_quantize(w, h, scheme)
    err = lambda qw: (x @ (w - qw).T).pow(2).mean()  # noqa: E731
    assert err(q.weight) < 1.5 * err(plain.weight)


def test_upper_block_gram_sums_give_the_full_symmetric_product():
    # Wider than one Gram block (and not a multiple of it): the row blocks on and above the diagonal,
    # assembled, give x^T x, exactly symmetric.
    from tlq.quant.gptq import GRAM_BLOCK, add_gram_upper, assemble_gram, gram_blocks

    columns = GRAM_BLOCK * 2 + 77
    x = _correlated_inputs(n=96, d=columns)
    gram = [torch.zeros(stop - start, columns - start, dtype=torch.float64) for start, stop in gram_blocks(columns)]
    add_gram_upper(gram, x)
    add_gram_upper(gram, 2 * x)
    total = assemble_gram(gram, 2.0, 5.0)
    expected = (x.double().t() @ x.double()) * 2.0
    assert len(gram) == 3 and sum(g.numel() for g in gram) < 0.75 * columns ** 2
    assert torch.equal(total, total.t())
    assert torch.allclose(total.double(), expected, rtol=1e-5, atol=1e-3)


def test_solving_from_wide_gram_sums_matches_solving_the_matrix():
    # The solver builds H from its block sums inside the solve; the result equals handing the matrix.
    x = _correlated_inputs(n=256, d=1152)
    w, recipe = torch.randn(8, 1152), Recipe(scheme="W4A16")
    solver = _solve(w, x, recipe)
    hessian = solver.hessian()
    assert torch.equal(hessian, hessian.t())
    expected = gptq_quantize(w, hessian, recipe.resolved_scheme(), recipe.dampening, recipe.block_size)
    assert torch.equal(solver.solve().weight, expected.weight)


def test_a_damping_retry_frees_the_failed_matrix_before_building_the_next():
    """Handed over in a list, the first H is referenced by nobody once its factorisation fails, so a retry
    never holds two in x in matrices; the factor is the one the retry's damping gives."""
    import weakref

    from tlq.quant.gptq import _inverse_cholesky

    # Eigenvalues 0.975 and -0.025, mean diagonal 0.475: not positive definite at 1% damping (+0.00475),
    # positive definite at 10% (+0.0475).
    base = torch.tensor([[0.475, 0.5], [0.5, 0.475]], dtype=torch.float64)
    first = base.clone()
    alive_at_rebuild = []
    first_ref = weakref.ref(first)
    handed = [first]
    del first

    def rebuild():
        alive_at_rebuild.append(first_ref() is not None)
        return base.clone()

    factor = _inverse_cholesky(handed, 0.01, rebuild=rebuild)
    assert handed == [] and alive_at_rebuild == [False]
    damped = base + 0.1 * 0.475 * torch.eye(2, dtype=torch.float64)
    torch.testing.assert_close(factor.t() @ factor, torch.linalg.inv(damped))
