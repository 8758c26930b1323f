"""Data-aware methods against their definitions on small random tensors."""

from __future__ import annotations

import pytest
import torch

from omnimerge.errors import OmnimergeError
from omnimerge.methods import MethodContext, get_method
from omnimerge.methods.data_aware import regmean_solve, regmean_solve_rows, regularized_gram

regmean = get_method("regmean")  # called through the registry: parameters not given take their defaults
fisher = get_method("fisher")

F64 = torch.float64


def ctx(stats):
    return MethodContext(key="language.layers.0.mlp.down_proj.weight", generator=torch.Generator(), stats=stats)


def problem(T=3, out=5, n=7, rows=(40, 30, 50), seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(out, n, generator=g, dtype=F64) for _ in range(T)]
    xs = [torch.randn(r, n, generator=g, dtype=F64) @ torch.randn(n, n, generator=g, dtype=F64) for r in rows[:T]]
    return ws, xs


def test_regmean_at_alpha_one_is_the_least_squares_merge():
    """W minimises Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖² / N_i: compare with a stacked least-squares solve."""
    ws, xs = problem()
    grams = [x.T @ x / len(x) for x in xs]
    got = regmean(None, ws, ctx(tuple({"gram": gm} for gm in grams)), alpha=1.0)
    a = torch.cat([x / len(x) ** 0.5 for x in xs])
    b = torch.cat([x @ w.T / len(x) ** 0.5 for x, w in zip(xs, ws)])
    want = torch.linalg.lstsq(a, b).solution.T
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    # the gradient of the objective vanishes there
    grad = sum((got - w) @ (x.T @ x) / len(x) for w, x in zip(ws, xs))
    assert grad.abs().max() < 1e-9


def test_regmean_hand_checkable_cases():
    ws, xs = problem()
    grams = [x.T @ x / len(x) for x in xs]
    # identical models: the model itself, whatever the Grams
    same = regmean(None, [ws[0]] * 3, ctx(tuple({"gram": gm} for gm in grams)), alpha=0.5)
    torch.testing.assert_close(same, ws[0])
    # equal Grams: the plain mean
    eq = regmean(None, ws, ctx(tuple({"gram": grams[0]} for _ in ws)), alpha=0.7)
    torch.testing.assert_close(eq, torch.stack(ws).mean(0))
    # alpha 0: diagonal Grams, a per-input-feature weighted mean of the columns
    diag = regmean(None, ws, ctx(tuple({"gram": gm} for gm in grams)), alpha=0.0)
    d = torch.stack([gm.diagonal() for gm in grams])  # (T, n)
    torch.testing.assert_close(diag, (torch.stack(ws) * d[:, None, :]).sum(0) / d.sum(0))


def test_regularized_gram_scales_off_diagonals_only():
    gm = torch.tensor([[4.0, 2.0], [2.0, 9.0]], dtype=F64)
    torch.testing.assert_close(regularized_gram(gm, 0.25), torch.tensor([[4.0, 0.5], [0.5, 9.0]], dtype=F64))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_regmean_input_rows_route_equals_the_gram_route(alpha):
    """Few tokens on a wide layer: the Woodbury route on the input rows gives the Gram route's W."""
    ws, xs = problem(out=6, n=40, rows=(9, 12, 7))
    grams = [x.T @ x / len(x) for x in xs]
    want = regmean_solve(ws, grams, alpha)
    torch.testing.assert_close(regmean_solve_rows(ws, xs, alpha), want, rtol=1e-8, atol=1e-10)
    info_ctx = ctx(tuple({"inputs": x} for x in xs))
    torch.testing.assert_close(regmean(None, ws, info_ctx, alpha=alpha), want, rtol=1e-8, atol=1e-10)
    assert info_ctx.info["regmean"] == "input rows (Woodbury)"


def test_regmean_unseen_features_take_the_mean_column():
    ws, xs = problem()
    for x in xs:
        x[:, 2] = 0.0  # no sample ever activates input feature 2
    grams = [x.T @ x / len(x) for x in xs]
    for stats in (tuple({"gram": gm} for gm in grams), tuple({"inputs": x} for x in xs)):
        got = regmean(None, ws, ctx(stats), alpha=0.9)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got[:, 2], torch.stack(ws).mean(0)[:, 2])


def test_regmean_without_statistics():
    ws, xs = problem()
    bias = [torch.randn(5, dtype=F64) for _ in ws]
    c = ctx(({}, {}, {}))
    torch.testing.assert_close(regmean(None, bias, c), torch.stack(bias).mean(0))
    assert "mean" in c.info["regmean"]
    with pytest.raises(OmnimergeError, match="calibration"):
        regmean(None, ws, ctx(None))
    with pytest.raises(OmnimergeError, match="no input statistics"):
        regmean(None, ws, ctx(({"gram": xs[0].T @ xs[0]}, {}, {})))
    with pytest.raises(OmnimergeError, match="another model"):
        regmean(None, ws, ctx(tuple({"gram": torch.eye(3, dtype=F64)} for _ in ws)))


def test_fisher_is_the_fisher_weighted_mean():
    g = torch.Generator().manual_seed(1)
    ms = [torch.randn(4, 3, generator=g, dtype=F64) for _ in range(3)]
    fs = [torch.rand(4, 3, generator=g, dtype=F64) for _ in range(3)]
    stats = tuple({"fisher": f} for f in fs)
    got = fisher(None, ms, ctx(stats), normalize=False, epsilon=1e-12)
    want = sum(f * m for f, m in zip(fs, ms)) / sum(fs)
    torch.testing.assert_close(got, want)
    # it minimises Σ_i F_i (θ − θ_i)²: the derivative vanishes there (up to the ε added to F)
    assert (sum(f * (got - m) for f, m in zip(fs, ms))).abs().max() < 1e-10
    # one model with all the Fisher mass wins
    big = tuple({"fisher": torch.full((4, 3), 1e6 if i == 1 else 1.0, dtype=F64)} for i in range(3))
    torch.testing.assert_close(fisher(None, ms, ctx(big), normalize=False), ms[1], rtol=1e-5, atol=1e-5)
    # weights: a zero weight removes a model
    w0 = fisher(None, ms, ctx(stats), weight=[1.0, 0.0, 1.0], normalize=False, epsilon=1e-12)
    torch.testing.assert_close(w0, (fs[0] * ms[0] + fs[2] * ms[2]) / (fs[0] + fs[2]))


def test_fisher_normalize_divides_by_each_models_fisher_norm():
    g = torch.Generator().manual_seed(2)
    ms = [torch.randn(4, 3, generator=g, dtype=F64) for _ in range(2)]
    f = torch.rand(4, 3, generator=g, dtype=F64)
    # the same Fisher shape, scaled 1000x in model 1: normalized, the two count alike (the plain mean)
    stats = ({"fisher": f, "fisher_norm": torch.tensor(1.0)}, {"fisher": 1000 * f, "fisher_norm": torch.tensor(1000.0)})
    torch.testing.assert_close(fisher(None, ms, ctx(stats), epsilon=1e-12), (ms[0] + ms[1]) / 2)
    with pytest.raises(OmnimergeError, match="fisher_norm"):
        fisher(None, ms, ctx(({"fisher": f}, {"fisher": f})))
