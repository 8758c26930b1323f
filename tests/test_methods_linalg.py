"""methods/linalg.py's primitives against plain torch.linalg on small random matrices."""

import pytest
import torch

from omnimerge.methods import linalg

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_blocks(monkeypatch):
    """Make the Gram accumulation split rows and columns at these small sizes (the large-matrix code path)."""
    monkeypatch.setattr(linalg, "GRAM_SPLIT_MIN", 16)
    monkeypatch.setattr(linalg, "GRAM_BLOCK_BYTES", 8 * 40 * 7)  # 7 columns of a 40-row float64 Gram at a time


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(40, 90), (90, 40), (3, 40, 25)])
@pytest.mark.parametrize("side", ["left", "right"])
def test_gram_is_the_product_and_exactly_symmetric(small_blocks, shape, side):
    a = torch.randn(shape, generator=gen(0), dtype=F64)
    expect = a @ a.mT if side == "left" else a.mT @ a
    g = linalg.gram(a, side=side)
    torch.testing.assert_close(g, expect, rtol=1e-12, atol=1e-12)
    assert torch.equal(g, g.mT)


def test_gram_in_float64_of_float32_equals_the_float64_product(small_blocks):
    a = torch.randn(40, 300, generator=gen(1))  # converted 7 columns at a time, never as a whole
    g = linalg.gram(a, dtype=F64)
    assert g.dtype == F64
    torch.testing.assert_close(g, a.double() @ a.double().mT, rtol=1e-13, atol=1e-12)


def test_gram_of_stacked_blocks_without_concatenating(small_blocks):
    parts = [torch.randn(2, m, 30, generator=gen(m), dtype=F64) for m in (7, 20, 13)]
    g = linalg.gram(parts)
    whole = torch.cat(parts, dim=-2)
    torch.testing.assert_close(g, whole @ whole.mT, rtol=1e-12, atol=1e-12)
    assert torch.equal(g, g.mT)
    with pytest.raises(ValueError, match="left"):
        linalg.gram(parts, side="right")


@pytest.mark.parametrize("shape", [(600, 520), (520, 700), (2, 520, 530)])
def test_spectrum_from_the_gram_matrix_equals_svdvals(shape):
    g = gen(2)
    a = torch.randn(shape, generator=g, dtype=F64) * torch.linspace(1, 1e-2, shape[-1], dtype=F64)
    s = linalg.spectrum(a)  # min(m, n) >= GRAM_MIN: the float64 Gram route
    torch.testing.assert_close(s, torch.linalg.svdvals(a), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(linalg.spectrum(a.float()), torch.linalg.svdvals(a).float(), rtol=1e-5, atol=1e-5)


def test_eigh_desc_orders_and_clamps():
    a = torch.randn(12, 5, generator=gen(3), dtype=F64)
    lam, w = linalg.eigh_desc(a @ a.mT)  # rank 5: seven eigenvalues round to ±1e-15
    assert torch.all(lam[:-1] >= lam[1:]) and torch.all(lam >= 0)
    torch.testing.assert_close((w * lam) @ w.mT, a @ a.mT, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lam[:5], torch.linalg.svdvals(a) ** 2, rtol=1e-10, atol=1e-10)


def test_randomized_iters_follows_the_gap():
    gap = torch.cat([torch.ones(10), torch.full((590,), 1e-4)], 0).double()
    assert linalg.randomized_iters(gap, 10, 600, 600) == 1  # (1e-4)^(2p+1) <= 1e-9: p = 1
    flat = torch.linspace(1, 0.9, 600)
    assert linalg.randomized_iters(flat, 10, 600, 600) is None  # no decay after k
    assert linalg.randomized_iters(gap, 200, 600, 600) is None  # 4k > min(m, n)


def test_top_svd_randomized_on_a_gap_and_exact_otherwise():
    g = gen(4)
    a = (torch.randn(200, 8, generator=g, dtype=F64) @ torch.randn(8, 150, generator=g, dtype=F64)
         + 1e-6 * torch.randn(200, 150, generator=g, dtype=F64))
    u, s, vh = linalg.top_svd(a, 8, generator=gen(5))
    assert u.shape == (200, 8) and vh.shape == (8, 150)
    torch.testing.assert_close(s, torch.linalg.svdvals(a)[:8], rtol=1e-10, atol=0)
    torch.testing.assert_close(u.mT @ u, torch.eye(8, dtype=F64), rtol=0, atol=1e-12)
    u2, s2, vh2 = linalg.top_svd(a, 8, generator=gen(5))
    assert torch.equal(u, u2)  # seeded
    u, s, vh = linalg.top_svd(a, 60)  # 4k > min(m, n): a full SVD
    torch.testing.assert_close(s, torch.linalg.svdvals(a)[:60])


def power_law(m, n, alpha, seed):
    """Singular values i^-alpha: no gap anywhere (a fixed-iteration randomized SVD is far off here)."""
    g = gen(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=F64))
    return (u * torch.arange(1, r + 1, dtype=F64) ** -alpha) @ v.T


@pytest.fixture
def gram_route(monkeypatch):
    """Send matrices with min(m, n) >= 16 down the Gram route; record which finisher ran."""
    monkeypatch.setattr(linalg, "GRAM_MIN", 16)
    routes = []
    top_svd = linalg.top_svd

    def spy(*a, **kw):
        routes.append(kw.get("iters"))
        return top_svd(*a, **kw)

    monkeypatch.setattr(linalg, "top_svd", spy)
    return routes


def rank_k(a, k):
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


@pytest.mark.parametrize("shape", [(80, 120), (120, 80)])
def test_leading_svd_randomized_only_where_the_spectrum_converges(gram_route, shape):
    g = gen(6)
    low = torch.randn(shape[0], 5, generator=g, dtype=F64) @ torch.randn(5, shape[1], generator=g, dtype=F64)
    gap = low + 1e-4 * torch.randn(shape, generator=g, dtype=F64)
    u, s, vh = linalg.leading_svd(gap, 5, generator=gen(7))
    assert len(gram_route) == 1 and gram_route[0] is not None  # randomized, with the prescribed iterations
    torch.testing.assert_close((u * s) @ vh, rank_k(gap, 5), rtol=0, atol=1e-9 * float(gap.norm()))
    slow = power_law(*shape, 0.5, seed=8)
    for k in (5, 40):  # small k without a gap, and 4k > min(m, n): the Gram eigenvectors
        gram_route.clear()
        u, s, vh = linalg.leading_svd(slow, k, generator=gen(7))
        assert gram_route == []
        assert u.shape == (shape[0], k) and vh.shape == (k, shape[1])
        torch.testing.assert_close(s, torch.linalg.svdvals(slow)[:k], rtol=1e-10, atol=0)
        torch.testing.assert_close(u.mT @ u, torch.eye(k, dtype=F64), rtol=0, atol=1e-10)
        torch.testing.assert_close((u * s) @ vh, rank_k(slow, k), rtol=0, atol=1e-10)


def test_leading_svd_zero_singular_values_get_zero_rows(gram_route):
    g = gen(9)
    a = torch.randn(30, 3, generator=g, dtype=F64) @ torch.randn(3, 40, generator=g, dtype=F64)  # rank 3
    u, s, vh = linalg.leading_svd(a, 10)
    assert torch.all(s[3:] == 0) and torch.all(vh[3:] == 0) and torch.isfinite(vh).all()
    torch.testing.assert_close((u * s) @ vh, a, rtol=0, atol=1e-10)
    u, s, vh = linalg.leading_svd(torch.zeros(30, 40, dtype=F64), 4)
    assert torch.all(s == 0) and torch.all(vh == 0)


def test_svd_retries_in_float64_where_float32_lapack_fails(monkeypatch):
    a = torch.randn(30, 20, generator=gen(10))
    plain = torch.linalg.svd

    def fails_in_float32(x, full_matrices=True):
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return plain(x, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", fails_in_float32)
    u, s, vh = linalg.svd(a)
    assert u.dtype == s.dtype == vh.dtype == torch.float32 and u.shape == (30, 20)
    torch.testing.assert_close((u * s) @ vh, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(120, 120), (100, 160)])
def test_polar_gram_is_accurate_on_ill_conditioned_float32(monkeypatch, shape):
    """σ_max/σ_min = 4e4 (above the float32 zero cut 1.2e-5): in float32 the product H a would be ~1e-4
    off; polar_gram switches to float64."""
    g = gen(11)
    r = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], r, generator=g, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], r, generator=g, dtype=F64))
    a = ((u * torch.logspace(0, -4.6, r, dtype=F64)) @ v.T).float()
    pu, _, pvh = torch.linalg.svd(a.double(), full_matrices=False)
    truth = pu @ pvh
    p, s = linalg.polar_gram(a)
    assert p.dtype == torch.float32
    assert float((p.double() - truth).norm() / truth.norm()) < 1e-5
    torch.testing.assert_close(s, torch.linalg.svdvals(a.double()), rtol=1e-3, atol=1e-9)
    monkeypatch.setattr(linalg, "POLAR_EPS_KAPPA", float("inf"))  # the product in float32: ~100x worse
    p32, _ = linalg.polar_gram(a)
    assert float((p32.double() - truth).norm() / truth.norm()) > 1e-5
