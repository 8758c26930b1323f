"""The opt-in randomized route (``solver: randomized`` on asdf and aswudi) and its primitives.

The route is approximate by design: where the spectrum falls off after the kept components it
agrees with the exact route to rounding (checked on exactly low-rank inputs), elsewhere its error
falls with the subspace iterations (checked as an invariant: never better than the best rank-k
approximation, closer with more iterations). measurements/spectral.py states its error on
realistic shapes.
"""

import pytest
import torch

from omnimerge.errors import OmnimergeError
from omnimerge.methods import MethodContext, get_method, linalg

F64 = torch.float64
KEY = "language.layers.0.mlp.up_proj.weight"


def gen(seed):
    return torch.Generator().manual_seed(seed)


def ctx(seed=0):
    return MethodContext(key=KEY, generator=gen(seed))


def rel(a, b):
    return float((a - b).norm() / b.norm())


def low_rank(m, n, r, seed, dtype=F64, noise=0.0):
    g = gen(seed)
    a = torch.randn(m, r, generator=g, dtype=dtype) @ torch.randn(r, n, generator=g, dtype=dtype)
    return a + noise * torch.randn(m, n, generator=g, dtype=dtype)


def power_law(m, n, alpha, seed):
    g = gen(seed)
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64)).Q
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=F64)).Q
    return (u * torch.arange(1, r + 1, dtype=F64) ** -alpha) @ v.T


def best_rank_k(a, k):
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


# ------------------------------------------------------------------------------------ primitives


def test_sketch_svd_is_exact_where_the_spectrum_ends_after_k():
    a = low_rank(120, 200, 7, seed=1)
    u, s, vh = linalg.sketch_svd(a, 7, iters=0, generator=gen(0))
    assert u.shape == (120, 7) and s.shape == (7,) and vh.shape == (7, 200)
    torch.testing.assert_close(s, torch.linalg.svdvals(a)[:7], rtol=1e-10, atol=0)
    assert rel((u * s) @ vh, a) < 1e-12
    torch.testing.assert_close(u.T @ u, torch.eye(7, dtype=F64), rtol=0, atol=1e-12)


def test_sketch_svd_error_never_beats_eckart_young_and_falls_with_iterations():
    a = power_law(150, 220, 0.5, seed=2)  # no gap: the hard case
    k = 20
    best = float((a - best_rank_k(a, k)).norm())
    errors = []
    for iters in (0, 1, 4):
        u, s, vh = linalg.sketch_svd(a, k, iters=iters, generator=gen(3))
        errors.append(float((a - (u * s) @ vh).norm()))
    assert all(e >= best * (1 - 1e-12) for e in errors)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1.01 * best  # 4 iterations: within 1 % of the optimum here


def test_sketch_svd_is_reproducible_and_takes_a_full_svd_when_q_reaches_r():
    a = power_law(60, 90, 1.0, seed=4)
    first, second = (linalg.sketch_svd(a, 10, iters=2, generator=gen(5)) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    u, s, vh = linalg.sketch_svd(a, 50, iters=2, generator=gen(5))  # q = 66 >= 60: full SVD
    torch.testing.assert_close((u * s) @ vh, best_rank_k(a, 50), rtol=0, atol=1e-12)


def test_sketch_eigh_finds_the_leading_eigenpairs():
    g = gen(6)
    d, q = 120, 24
    qmat = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64)).Q
    lam = torch.cat([torch.linspace(10.0, 5.0, 12, dtype=F64), torch.full((d - 12,), 1e-3, dtype=F64)])
    mat = (qmat * lam) @ qmat.T
    mu, y = linalg.sketch_eigh(mat, q, iters=4, generator=gen(7))
    assert mu.shape == (q,) and y.shape == (d, q) and bool((mu[1:] >= mu[:-1]).all())  # ascending
    torch.testing.assert_close(mu[-12:], lam[:12].flip(0), rtol=1e-10, atol=0)
    top = qmat[:, :12]
    torch.testing.assert_close(y[:, -12:] @ y[:, -12:].T, top @ top.T, rtol=0, atol=1e-10)  # the same subspace
    full_mu, _ = linalg.sketch_eigh(mat, d, iters=4, generator=gen(7))  # q = d: a plain eigh
    torch.testing.assert_close(full_mu, torch.linalg.eigh(mat).eigenvalues, rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------ methods


@pytest.fixture
def fast(monkeypatch):
    """Send small matrices down the fast (and randomized) routes."""
    monkeypatch.setattr(linalg, "GRAM_MIN", 32)


def test_asdf_randomized_on_low_rank_plus_noise(fast):
    t = torch.randn(96, 160, generator=gen(30))
    v = t + low_rank(96, 160, 6, seed=31, dtype=torch.float32, noise=1e-2)
    cr, ce = ctx(), ctx()
    randomized = get_method("asdf")(t, [v], cr, solver="randomized")
    exact = get_method("asdf")(t, [v], ce, exact=True)
    assert cr.info["rank"] == ce.info["rank"] == 6
    assert rel(randomized - t, exact - t) < 1e-5
    integer = get_method("asdf")(t, [v], ctx(), rank=6, solver="randomized")
    assert rel(integer - t, exact - t) < 1e-5


def test_aswudi_randomized_equals_the_fast_route_where_c_has_a_gap():
    m, n = 64, 200  # gram route: T·m = 128 < 200, C of rank 16
    base = torch.randn(m, n, generator=gen(40), dtype=F64)
    models = [base + 1e-3 * low_rank(m, n, 8, seed=41 + i) for i in range(2)]
    cr, cf = ctx(), ctx()
    randomized = get_method("aswudi")(base, models, cr, rank=16, alpha=1.0, solver="randomized")
    reference = get_method("aswudi")(base, models, cf, rank=16, alpha=1.0)
    assert cr.info["solver"] == "randomized" and cr.info["rank_used"] == cf.info["rank_used"] == 16
    assert rel(randomized - base, reference - base) < 1e-8


def test_aswudi_randomized_on_noisy_float32_tasks_is_within_a_percent():
    g = gen(50)
    m, n, T = 200, 1100, 5
    base = 0.02 * torch.randn(m, n, generator=g)
    models = [base + 1e-3 * (torch.randn(m, 32, generator=g) @ torch.randn(32, n, generator=g) / 32**0.5)
              + 1e-4 * torch.randn(m, n, generator=g) for _ in range(T)]
    cr = ctx()
    randomized = get_method("aswudi")(base, models, cr, solver="randomized")
    truth = get_method("aswudi")(base.double(), [x.double() for x in models], ctx(), solver="dense")
    assert randomized.dtype == torch.float32
    assert rel((randomized - base).double(), truth - base.double()) < 1e-2  # measured 5.5e-3 (fast: 6.5e-6)


def test_randomized_and_exact_exclude_each_other():
    base = torch.zeros(8, 8)
    models = [torch.randn(8, 8, generator=gen(60))]
    with pytest.raises(OmnimergeError, match="'exact: true' and 'solver: randomized' exclude each other"):
        get_method("asdf")(base, models, ctx(), exact=True, solver="randomized")


def test_solver_choices():
    for name in ("asdf", "aswudi"):
        assert "randomized" in get_method(name).param("solver").choices
        assert get_method(name).param("solver").default != "randomized"  # the exact route stays the default
    # swudi keeps 85 % of C's eigenvalues: a randomized finder would cost more than the eigendecomposition
    with pytest.raises(OmnimergeError, match="is not allowed"):
        get_method("swudi").param("solver").validate("randomized", "recipe")
    # tsv keeps ⌊r/T⌋ components per task, into a flat noise spectrum: measured 36-55 % off and no faster
    assert "solver" not in {p.name for p in get_method("tsv").params}
