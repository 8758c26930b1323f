"""asdf pinned to its definition, its fast route against the exact one, and task_arithmetic's `rank`."""

import pytest
import torch

import omnimerge.methods.asdf  # noqa: F401  (registers asdf)
from omnimerge.errors import OmnimergeError
from omnimerge.methods import MethodContext, get_method, linalg
from omnimerge.methods.ranks import knee

KEY = "language.layers.0.mlp.up_proj.weight"
FAST_TOL = 1e-4  # relative Frobenius error of the merged delta, fast route vs exact (measured ~1e-6)


def ctx(key=KEY, seed=0):
    return MethodContext(key=key, generator=torch.Generator().manual_seed(seed))


def run(name, base, models, c=None, **params):
    return get_method(name)(base, models, c if c is not None else ctx(), **params)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def gen(seed):
    return torch.Generator().manual_seed(seed)


def low_rank(m, n, r, noise=1e-3, seed=0):
    g = gen(seed)
    return torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) + noise * torch.randn(m, n, generator=g)


def power_law(m, n, alpha, seed=0):
    """A matrix with singular values i^-alpha (a slowly decaying spectrum: no gap after the knee)."""
    g = gen(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    s = torch.arange(1, r + 1, dtype=torch.float64) ** -alpha
    return ((u * s) @ v.T).float()


def truncated(delta, k=None):
    """Definition: the rank-k SVD truncation (k = knee of the spectrum unless given), in float64."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = knee(s) if k is None else k
    return ((u[:, :k] * s[:k]) @ vh[:k]).float(), k


@pytest.fixture
def small_gram(monkeypatch):
    """Send matrices with min(m, n) >= 32 down the fast route (Gram spectrum, randomized or projection)."""
    monkeypatch.setattr(linalg, "GRAM_MIN", 32)
    routes = []
    top_svd, project = linalg.top_svd, linalg.project_top

    def spy_top(*a, **kw):
        routes.append(("randomized", kw.get("iters")))
        return top_svd(*a, **kw)

    def spy_project(*a, **kw):
        routes.append(("projection", None))
        return project(*a, **kw)

    monkeypatch.setattr(linalg, "top_svd", spy_top)
    monkeypatch.setattr(linalg, "project_top", spy_project)
    return routes


# ------------------------------------------------------------------------------------ definition


def test_registration():
    m = get_method("asdf")
    assert m.needs_base and "YOYO" in m.reference and m.summary
    assert m.param("rank").default == "knee" and m.param("rank").per_model
    assert m.param("weight").per_model and m.param("weight").default == 1.0
    assert m.param("exact").default is False


@pytest.mark.parametrize("shape,r", [((12, 9), 3), ((9, 14), 2), ((40, 24), 5)])
def test_asdf_is_text_plus_knee_truncated_delta(shape, r):
    t = torch.randn(*shape, generator=gen(1))
    v = t + low_rank(*shape, r, seed=2)
    c = ctx()
    out = run("asdf", t, [v], c)
    want, k = truncated(v - t)
    assert k == r and c.info["rank"] == r
    torch.testing.assert_close(out, t + want, rtol=1e-5, atol=1e-5)


def test_asdf_rank_rule_param():
    t = torch.randn(20, 16, generator=gen(3))
    v = t + torch.randn(20, 16, generator=gen(4))
    for rule, k in ((3, 3), (0.5, 8), (100, 16)):
        c = ctx()
        out = run("asdf", t, [v], c, rank=rule)
        assert c.info["rank"] == k
        torch.testing.assert_close(out, t + truncated(v - t, k)[0], rtol=1e-5, atol=1e-5)
    c = ctx()
    run("asdf", t, [v], c, rank="stable_rank")
    s = torch.linalg.svdvals((v - t).double())
    assert c.info["rank"] == int(torch.ceil((s * s).sum() / s[0] ** 2 - 1e-9))


@pytest.mark.parametrize("key", ["embed.weight", "lm_head.weight", "language.embed_tokens.weight"])
def test_embed_and_lm_head_take_the_expert(key):
    t, v = torch.randn(30, 8, generator=gen(5)), torch.randn(30, 8, generator=gen(6))
    c = ctx(key)
    assert torch.equal(run("asdf", t, [v], c), v)
    assert "rank" not in c.info and "embed" in c.info["kept"]


def test_several_models_fallback_is_the_weighted_mean():
    t, v1, v2 = (torch.randn(10, 4, generator=gen(i)) for i in range(3))
    out = run("asdf", t, [v1, v2], ctx("lm_head.weight"), weight=[1.0, 3.0])
    torch.testing.assert_close(out, (v1 + 3 * v2) / 4)
    with pytest.raises(OmnimergeError, match="all weights are 0"):
        run("asdf", t, [v1, v2], ctx("lm_head.weight"), weight=[0.0, 0.0])


def test_shape_mismatch_takes_the_expert():
    t, v = torch.randn(4, 5, generator=gen(7)), torch.randn(6, 5, generator=gen(8))
    c = ctx()
    assert torch.equal(run("asdf", t, [v], c), v)
    assert "shape" in c.info["kept"]


def test_one_dimensional_tensors_take_the_expert():
    t, v = torch.randn(7, generator=gen(9)), torch.randn(7, generator=gen(10))
    assert torch.equal(run("asdf", t, [v], ctx("language.layers.0.input_layernorm.weight")), v)
    assert torch.equal(run("asdf", torch.tensor(1.0), [torch.tensor(2.0)], ctx()), torch.tensor(2.0))


def test_several_models_sum_their_own_truncations_with_weights():
    t = torch.randn(24, 18, generator=gen(11))
    v1, v2 = t + low_rank(24, 18, 2, seed=12), t + low_rank(24, 18, 4, seed=13)
    c = ctx()
    out = run("asdf", t, [v1, v2], c, weight=[0.5, 2.0])
    want = t + 0.5 * truncated(v1 - t)[0] + 2.0 * truncated(v2 - t)[0]
    assert c.info["ranks"] == [2, 4] and "rank" not in c.info
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    c = ctx()  # a rule per model
    out = run("asdf", t, [v1, v2], c, rank=[1, "knee"])
    assert c.info["ranks"] == [1, 4]
    torch.testing.assert_close(out, t + truncated(v1 - t, 1)[0] + truncated(v2 - t)[0], rtol=1e-5, atol=1e-5)


def test_batch_of_matrices_has_a_rank_each():
    t = torch.randn(3, 20, 16, generator=gen(14))
    delta = torch.stack([low_rank(20, 16, r, seed=20 + r) for r in (2, 4, 6)])
    c = ctx("language.layers.0.mlp.experts.gate_up_proj")
    out = run("asdf", t, [t + delta], c)
    assert c.info["rank"] == [2, 4, 6]
    want = torch.stack([t[i] + truncated(delta[i])[0] for i in range(3)])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out4 = run("asdf", t.reshape(1, 3, 20, 16), [(t + delta).reshape(1, 3, 20, 16)], c := ctx())
    assert c.info["rank"] == [2, 4, 6]
    torch.testing.assert_close(out4.reshape(3, 20, 16), want, rtol=1e-5, atol=1e-5)


def test_bad_rank_is_an_error_in_direct_calls():
    t = torch.zeros(4, 4)
    with pytest.raises(OmnimergeError, match="parameter 'rank'"):
        run("asdf", t, [t + 1], rank="kne")
    with pytest.raises(OmnimergeError, match="2 values for 1 models"):
        run("asdf", t, [t + 1], weight=[1.0, 2.0])


def test_identical_models_give_the_base():
    t = torch.randn(40, 36, generator=gen(15))
    torch.testing.assert_close(run("asdf", t, [t.clone()]), t)


# ------------------------------------------------------------------------------ fast vs exact


@pytest.mark.parametrize("shape", [(96, 160), (160, 96)])
def test_fast_route_randomized_matches_exact_on_low_rank_plus_noise(small_gram, shape):
    t = torch.randn(*shape, generator=gen(16))
    v = t + low_rank(*shape, 6, noise=1e-2, seed=17)
    cf, ce = ctx(), ctx()
    fast, exact = run("asdf", t, [v], cf), run("asdf", t, [v], ce, exact=True)
    assert small_gram and small_gram[0][0] == "randomized"  # the spectrum showed a gap: randomized finder
    assert cf.info["rank"] == ce.info["rank"] == 6
    assert rel(fast - t, exact - t) < FAST_TOL


@pytest.mark.parametrize("shape,alpha", [((96, 160), 0.5), ((160, 96), 1.0), ((128, 128), 0.3)])
def test_fast_route_projection_matches_exact_on_slow_decay(small_gram, shape, alpha):
    t = torch.randn(*shape, generator=gen(18))
    v = t + power_law(*shape, alpha, seed=19)
    cf, ce = ctx(), ctx()
    fast, exact = run("asdf", t, [v], cf), run("asdf", t, [v], ce, exact=True)
    assert small_gram == [("projection", None)]  # no gap after the knee: the Gram eigenvectors
    assert cf.info["rank"] == ce.info["rank"]
    assert rel(fast - t, exact - t) < FAST_TOL


def test_fast_route_large_rank_uses_the_projection(small_gram):
    t = torch.randn(64, 80, generator=gen(20))
    v = t + torch.randn(64, 80, generator=gen(21))
    fast, exact = run("asdf", t, [v], ctx(), rank=0.75), run("asdf", t, [v], ctx(), exact=True, rank=0.75)
    assert small_gram == [("projection", None)]  # 4k > min(m, n), and k > r/2: the complement is projected out
    assert rel(fast - t, exact - t) < FAST_TOL


def test_fast_route_is_reproducible(small_gram):
    t = torch.randn(96, 160, generator=gen(22))
    v = t + low_rank(96, 160, 6, noise=1e-2, seed=23)
    assert torch.equal(run("asdf", t, [v], ctx(seed=5)), run("asdf", t, [v], ctx(seed=5)))


def test_fast_route_zero_delta_and_integer_ranks(small_gram):
    t = torch.randn(48, 40, generator=gen(24))
    c = ctx()
    torch.testing.assert_close(run("asdf", t, [t.clone()], c), t)
    assert c.info["rank"] == 1 and small_gram == []  # Δ = 0: nothing to decompose
    v = t + power_law(48, 40, 0.5, seed=25)
    for rule in (3, 30):  # small k without a gap, and a known large k (straight to the eigenvectors)
        small_gram.clear()
        c = ctx()
        fast = run("asdf", t, [v], c, rank=rule)
        assert c.info["rank"] == rule and small_gram == [("projection", None)]
        assert rel(fast - t, truncated(v - t, rule)[0]) < FAST_TOL


def test_truncate_rejects_vectors():
    with pytest.raises(ValueError, match="matrix"):
        linalg.truncate(torch.ones(3), 1)


# ----------------------------------------------------------------------- task_arithmetic's rank


def test_task_arithmetic_rank_truncates_the_merged_task_vector():
    g = gen(30)
    base = torch.randn(10, 8, generator=g)
    models = [base + torch.randn(10, 8, generator=g) for _ in range(3)]
    w, lam = [1.0, -0.5, 2.0], 0.7
    merged = sum(wi * (m - base) for wi, m in zip(w, models))
    c = ctx()
    out = run("task_arithmetic", base, models, c, weight=w, rank=2, **{"lambda": lam})
    assert c.info["rank"] == 2
    torch.testing.assert_close(out, base + lam * truncated(merged, 2)[0], rtol=1e-5, atol=1e-5)
    c = ctx()
    run("task_arithmetic", base, models, c, weight=w, rank="knee")
    assert c.info["rank"] == knee(torch.linalg.svdvals(merged.double()))


def test_task_arithmetic_default_rank_is_the_old_result():
    g = gen(31)
    base = torch.randn(10, 8, generator=g)
    models = [base + torch.randn(10, 8, generator=g) for _ in range(2)]
    assert get_method("task_arithmetic").param("rank").default == "full"
    c = ctx()
    out = run("task_arithmetic", base, models, c, weight=[0.3, 1.2], **{"lambda": 1.5})
    old = torch.zeros_like(base)  # the implementation before `rank` existed
    old.add_(models[0] - base, alpha=0.3)
    old.add_(models[1] - base, alpha=1.2)
    assert torch.equal(out, base + 1.5 * old)
    assert "rank" not in c.info
    assert torch.equal(out, run("task_arithmetic", base, models, weight=[0.3, 1.2], rank="full", **{"lambda": 1.5}))


def test_task_arithmetic_rank_on_a_batch_and_the_fast_route(small_gram):
    g = gen(34)
    base = torch.randn(2, 40, 64, generator=g)
    models = [base + torch.randn(2, 40, 64, generator=g) for _ in range(2)]
    merged = models[0] - base + models[1] - base
    c = ctx()
    out = run("task_arithmetic", base, models, c, rank=0.5)
    assert c.info["rank"] == [20, 20] and small_gram == [("projection", None)] * 2
    want = torch.stack([truncated(merged[i], 20)[0] for i in range(2)])
    assert rel(out - base, want) < FAST_TOL


def test_task_arithmetic_rank_leaves_vectors_alone():
    base, m = torch.randn(6, generator=gen(32)), torch.randn(6, generator=gen(33))
    c = ctx()
    torch.testing.assert_close(run("task_arithmetic", base, [m], c, rank=1), m)
    assert "rank" not in c.info


def test_task_arithmetic_rank_param_validation():
    p = get_method("task_arithmetic").param("rank")
    assert p.validate("full", "recipe") == "full"
    assert p.validate("knee", "recipe") == "knee" and p.validate(4, "recipe") == 4
    assert p.validate(2.0, "recipe") == 2
    for bad in ("kne", 0, True, "energy:0"):
        with pytest.raises(OmnimergeError, match="parameter 'rank'"):
            p.validate(bad, "recipe")
