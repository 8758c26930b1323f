"""tsv, iso_c, iso_cts pinned to their definitions (plain full-SVD references written here), and the
fast paths pinned to the exact ones."""

import re

import pytest
import torch

import omnimerge.methods.spectral as spectral
from omnimerge.errors import OmnimergeError
from omnimerge.methods import MethodContext, get_method

KEY = "language.layers.0.mlp.up_proj.weight"
NAMES = ["tsv", "iso_c", "iso_cts"]


def ctx(seed=0):
    return MethodContext(key=KEY, generator=torch.Generator().manual_seed(seed))


def run(name, base, models, seed=0, c=None, **params):
    return get_method(name)(base, models, c if c is not None else ctx(seed), **params)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def taus_for(shape, n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]


@pytest.fixture
def fast(monkeypatch):
    """Take the fast route on small matrices."""
    monkeypatch.setattr(spectral, "FAST_MIN", 8)


# --------------------------------------------------------------------------- plain references


def polar(a):
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh


def ref_tsv(taus):
    k = min(taus[0].shape) // len(taus)
    us, ss, vhs = [], [], []
    for t in taus:
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k])
    return polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vhs, 0))


def ref_iso_c(taus):
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    return s.mean() * u @ vh


def ref_iso_cts(taus, f=0.8):
    T, r = len(taus), min(taus[0].shape)
    kc = r - T * round((r - int(f * r)) / T)
    p = (r - kc) // T
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    uc = u[:, :kc]
    us, ss, vhs = [], [], []
    for t in taus:
        a, b, c = torch.linalg.svd(t - uc @ uc.T @ t, full_matrices=False)
        us.append(a[:, :p])
        ss.append(b[:p])
        vhs.append(c[:p])
    s_cat = torch.cat(ss + [s[:kc]])
    return s_cat.mean() * polar(torch.cat(us + [uc], 1)) @ polar(torch.cat(vhs + [vh[:kc]], 0))


REFS = {"tsv": ref_tsv, "iso_c": ref_iso_c, "iso_cts": ref_iso_cts}


# ------------------------------------------------------------------------ exact = definition


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(40, 60), (60, 40)])
@pytest.mark.parametrize("n", [2, 3])
def test_exact_path_is_the_definition(name, shape, n):
    taus = taus_for(shape, n, seed=n)
    base = torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    out = run(name, base, [base + t for t in taus], exact=True)
    torch.testing.assert_close(out - base, REFS[name](taus), rtol=0, atol=1e-10)
    # float32: the same within float32 rounding
    t32 = [t.float() for t in taus]
    out32 = run(name, torch.zeros(shape), t32, exact=True)
    assert rel(out32, REFS[name](t32)) < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_small_matrices_take_the_exact_path(name):
    taus = taus_for((40, 60), 2)
    c = ctx()
    out = run(name, torch.zeros(40, 60, dtype=torch.float64), taus, c=c)
    torch.testing.assert_close(out, REFS[name](taus), rtol=0, atol=1e-10)
    assert c.info["path"] == "exact"


def test_alpha_scales_the_merged_delta():
    base = torch.randn(30, 20, dtype=torch.float64)
    taus = taus_for((30, 20), 3)
    for name in NAMES:
        one = run(name, base, [base + t for t in taus]) - base
        half = run(name, base, [base + t for t in taus], alpha=0.5) - base
        torch.testing.assert_close(half, 0.5 * one)


# ------------------------------------------------------------------------- fast = exact


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(40, 60), (60, 40), (48, 48)])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_fast_path_equals_exact_path(fast, name, shape, n):
    # float64: the fast path is algebraically the definition, so agreement is to rounding
    taus = taus_for(shape, n, seed=10 + n)
    z = torch.zeros(shape, dtype=torch.float64)
    c = ctx()
    fast_out = run(name, z, taus, c=c)
    assert c.info["path"] == "fast"
    exact_out = run(name, z, taus, exact=True)
    assert rel(fast_out, exact_out) < 1e-8
    # float32: stated tolerance 1e-4 (relative Frobenius)
    t32 = [t.float() for t in taus]
    assert rel(run(name, z.float(), t32), run(name, z.float(), t32, exact=True)) < 1e-4


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("rank", [1.0, "knee", 7])
def test_tsv_fast_equals_exact_for_other_rank_rules(fast, n, rank):
    # rank 1.0 keeps every component of every task: more columns than dimensions (K = n·r > r)
    taus = taus_for((30, 50), n, seed=3)
    z = torch.zeros(30, 50, dtype=torch.float64)
    c_fast, c_exact = ctx(), ctx()
    a = run("tsv", z, taus, c=c_fast, rank=rank)
    b = run("tsv", z, taus, c=c_exact, rank=rank, exact=True)
    assert rel(a, b) < 1e-8
    assert c_fast.info["rank"] == c_exact.info["rank"]


@pytest.mark.parametrize("kind", ["gap", "flat"])
def test_tsv_small_rank_takes_the_randomized_finder_only_where_it_converges(fast, monkeypatch, kind):
    """k <= r·RANDOMIZED_FRACTION: the randomized SVD where the task's spectrum falls off after k (with
    the iterations it prescribes), else the Gram eigenvectors; either way the exact path's result."""
    monkeypatch.setattr(spectral, "RANDOMIZED_FRACTION", 0.25)
    calls = []
    top_svd = spectral.top_svd
    monkeypatch.setattr(spectral, "top_svd", lambda *a, **kw: calls.append(kw["iters"]) or top_svd(*a, **kw))
    g = torch.Generator().manual_seed(14)
    m, n, k = 48, 72, 4
    taus = []
    for _ in range(2):
        u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))
        s = (torch.cat([torch.full((k,), 10.0), torch.full((m - k,), 1e-3)]) if kind == "gap"
             else torch.arange(1, m + 1, dtype=torch.float64) ** -0.3)
        taus.append((u * s) @ v.T)
    z = torch.zeros(m, n, dtype=torch.float64)
    fast_out = run("tsv", z, taus, rank=k)
    assert (calls and all(p is not None for p in calls)) if kind == "gap" else calls == []
    assert rel(fast_out, run("tsv", z, taus, rank=k, exact=True)) < 1e-8


def test_fast_path_on_a_decaying_spectrum_float32(fast):
    # task vectors with a shared low-rank part and a power-law spectrum, like fine-tuning deltas
    g = torch.Generator().manual_seed(4)
    m, n, r0 = 64, 96, 32
    scale = torch.arange(1, r0 + 1, dtype=torch.float32) ** -1.0
    common = (torch.randn(m, r0, generator=g) * scale) @ torch.randn(r0, n, generator=g)
    taus = [0.5 * common + (torch.randn(m, r0, generator=g) * scale) @ torch.randn(r0, n, generator=g)
            + 0.05 * torch.randn(m, n, generator=g) for _ in range(3)]
    z = torch.zeros(m, n)
    for name in NAMES:
        assert rel(run(name, z, taus), run(name, z, taus, exact=True)) < 1e-4


# -------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("exact", [True, False])
def test_iso_c_has_one_repeated_singular_value_the_mean(fast, exact):
    taus = taus_for((40, 60), 3, seed=5)
    delta = run("iso_c", torch.zeros(40, 60, dtype=torch.float64), taus, exact=exact)
    s = torch.linalg.svdvals(delta)
    mean = torch.linalg.svdvals(sum(taus)).mean()
    torch.testing.assert_close(s, torch.full_like(s, float(mean)))


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("shape", [(40, 60), (60, 40)])
@pytest.mark.parametrize("n", [2, 3])
def test_tsv_result_has_the_tasks_leading_singular_values(fast, exact, shape, n):
    # merged = Ū diag(S) V̄ᵀ with Ū, V̄ orthonormal and S the tasks' leading singular values: so
    # the merged delta's singular values are exactly those S
    taus = taus_for(shape, n, seed=6)
    k = min(shape) // n
    delta = run("tsv", torch.zeros(shape, dtype=torch.float64), taus, exact=exact)
    expect = torch.cat([torch.linalg.svdvals(t)[:k] for t in taus]).sort(descending=True).values
    got = torch.linalg.svdvals(delta)
    torch.testing.assert_close(got[: n * k], expect, rtol=0, atol=1e-9)
    assert all(float(x) < 1e-9 for x in got[n * k:])


def test_tsv_of_identical_tasks_is_their_truncation(fast):
    # U = [U_k, U_k] is rank-deficient: its zero directions are left out, so the result is
    # U_k S_k V_kᵀ — on both paths (a plain SVD polar would add arbitrary directions)
    (t,) = taus_for((40, 60), 1, seed=7)
    u, s, vh = torch.linalg.svd(t, full_matrices=False)
    expect = u[:, :20] @ torch.diag(s[:20]) @ vh[:20]
    z = torch.zeros(40, 60, dtype=torch.float64)
    for exact in (True, False):
        torch.testing.assert_close(run("tsv", z, [t, t.clone()], exact=exact), expect)


def test_iso_c_rank_deficient_sum_leaves_out_null_directions(fast):
    g = torch.Generator().manual_seed(8)
    taus = [torch.randn(40, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 60, generator=g,
                                                                                dtype=torch.float64)
            for _ in range(2)]
    z = torch.zeros(40, 60, dtype=torch.float64)
    a, b = run("iso_c", z, taus), run("iso_c", z, taus, exact=True)
    assert rel(a, b) < 1e-6  # the Gram route sees the 34 zero singular values as ~1e-8·σ_1 in the mean
    s = torch.linalg.svdvals(a)
    assert int((s > 1e-8 * s[0]).sum()) == 6  # rank of Σ τ_i; singular value = mean over all 40
    torch.testing.assert_close(s[:6], torch.full((6,), float(torch.linalg.svdvals(sum(taus)).mean()),
                                                 dtype=torch.float64))


def test_iso_cts_with_f_one_is_iso_c(fast):
    taus = taus_for((40, 60), 3, seed=9)
    z = torch.zeros(40, 60, dtype=torch.float64)
    for exact in (True, False):
        c = ctx()
        torch.testing.assert_close(run("iso_cts", z, taus, c=c, common_fraction=1.0, exact=exact),
                                   run("iso_c", z, taus, exact=exact))
        assert c.info["common_rank"] == 40 and c.info["task_rank"] == 0


@pytest.mark.parametrize("r, n, f, expect", [
    (40, 3, 0.8, (31, 3)),     # ⌊32⌋; (40−32)/3 = 2.67 → 3; k_c = 40 − 9
    (40, 2, 0.8, (32, 4)),     # (40−32)/2 = 4
    (3584, 5, 0.8, (2869, 143)),  # ⌊2867.2⌋ = 2867; 717/5 = 143.4 → 143; 3584 − 715
    (3584, 2, 0.8, (2868, 358)),  # 717/2 = 358.5 → 358 (Python rounds halves to even)
    (10, 4, 0.8, (10, 0)),     # 2/4 = 0.5 → 0
    (11, 2, 0.0, (1, 5)),      # 11/2 = 5.5 → 6 would exceed r: ⌊11/2⌋ = 5
    (40, 3, 1.0, (40, 0)),
])
def test_iso_cts_common_rank_formula(r, n, f, expect):
    kc, p = spectral.iso_cts_ranks(r, n, f)
    assert (kc, p) == expect and kc + n * p == r


def test_iso_cts_records_ranks():
    c = ctx()
    run("iso_cts", torch.zeros(40, 60), taus_for((40, 60), 3, dtype=torch.float32), c=c)
    assert c.info["common_rank"] == 31 and c.info["task_rank"] == 3


# --------------------------------------------------------------------------- ranks and info


def test_tsv_rank_recorded():
    z = torch.zeros(40, 60, dtype=torch.float64)
    c = ctx()
    run("tsv", z, taus_for((40, 60), 3), c=c)
    assert c.info["rank"] == 13  # ⌊40 / 3⌋
    c = ctx()
    run("tsv", z, taus_for((40, 60), 2), c=c, rank=5)
    assert c.info["rank"] == 5
    c = ctx()
    run("tsv", z, taus_for((40, 60), 2), c=c, rank=0.25)
    assert c.info["rank"] == 10
    c = ctx()
    run("tsv", torch.zeros(2, 40, 60, dtype=torch.float64), taus_for((2, 40, 60), 2), c=c)
    assert c.info["rank"] == 20
    c = ctx()  # a spectral rule picks per task: one number if they agree, else the list
    run("tsv", z, taus_for((40, 60), 2), c=c, rank="energy:0.5")
    expect = [min(40, int(torch.searchsorted((torch.linalg.svdvals(t) ** 2).cumsum(0),
                                              0.5 * (t.norm() ** 2) * (1 - 1e-12))) + 1)
              for t in taus_for((40, 60), 2)]
    assert c.info["rank"] == (expect[0] if expect[0] == expect[1] else expect)


def test_tsv_rank_at_least_one_when_fewer_dimensions_than_tasks():
    z = torch.zeros(2, 30, dtype=torch.float64)
    c = ctx()
    out = run("tsv", z, taus_for((2, 30), 3), c=c)
    assert c.info["rank"] == 1 and torch.isfinite(out).all() and out.abs().sum() > 0


# ------------------------------------------------------------------ shapes, fallback, dtypes


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("exact", [True, False])
def test_batches_are_matrices_over_the_last_two_dims(fast, name, exact):
    taus = taus_for((3, 24, 36), 2, seed=11)
    base = torch.randn(3, 24, 36, dtype=torch.float64)
    out = run(name, base, [base + t for t in taus], exact=exact)
    assert out.shape == (3, 24, 36)
    for j in range(3):
        one = run(name, base[j], [base[j] + t[j] for t in taus], exact=exact)
        torch.testing.assert_close(out[j], one)


@pytest.mark.parametrize("name", NAMES)
def test_vectors_use_the_fallback(name):
    base = torch.tensor([1.0, 2.0, 3.0])
    models = [torch.tensor([2.0, 2.0, 5.0]), torch.tensor([1.0, 6.0, 3.0])]  # τ = [1, 0, 2], [0, 4, 0]
    c = ctx()
    torch.testing.assert_close(run(name, base, models, c=c), torch.tensor([1.5, 4.0, 4.0]))
    assert c.info == {"fallback": "mean"}
    torch.testing.assert_close(run(name, base, models, fallback="sum", alpha=0.5), torch.tensor([1.5, 4.0, 4.0]))
    torch.testing.assert_close(run(name, base, models, fallback="sum"), torch.tensor([2.0, 6.0, 5.0]))
    torch.testing.assert_close(run(name, torch.tensor(1.0), [torch.tensor(3.0), torch.tensor(5.0)]),
                               torch.tensor(4.0))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_and_shape_preserved(name, dtype):
    taus = taus_for((12, 20), 2, dtype=torch.float32)
    base = torch.zeros(12, 20, dtype=dtype)
    out = run(name, base, [t.to(dtype) for t in taus])
    assert out.dtype == dtype and out.shape == (12, 20) and torch.isfinite(out.float()).all()


# --------------------------------------------------------------------------- determinism


def test_tsv_randomized_path_is_seeded_and_close_to_exact(monkeypatch):
    monkeypatch.setattr(spectral, "FAST_MIN", 8)
    monkeypatch.setattr(spectral, "RANDOMIZED_FRACTION", 0.25)
    g = torch.Generator().manual_seed(12)
    m, n = 60, 80
    spectrum = torch.tensor([10.0, 8.0, 6.0] + [0.05] * 57, dtype=torch.float64)
    taus = []
    for _ in range(2):
        u, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))
        taus.append(u @ torch.diag(spectrum) @ v.T)
    z = torch.zeros(m, n, dtype=torch.float64)
    first = run("tsv", z, taus, seed=1, rank=3)
    assert torch.equal(first, run("tsv", z, taus, seed=1, rank=3))
    other = run("tsv", z, taus, seed=2, rank=3)
    assert not torch.equal(first, other)
    exact = run("tsv", z, taus, rank=3, exact=True)
    assert rel(first, exact) < 1e-8 and rel(other, exact) < 1e-8


@pytest.mark.parametrize("name", NAMES)
def test_same_inputs_same_bytes(fast, name):
    taus = taus_for((40, 60), 3, dtype=torch.float32)
    z = torch.zeros(40, 60)
    assert torch.equal(run(name, z, taus, seed=3), run(name, z, taus, seed=3))


# ----------------------------------------------------------------------- registry & params


def test_registrations():
    arxiv = {"tsv": "2412.00081", "iso_c": "2502.04959", "iso_cts": "2502.04959"}
    for name in NAMES:
        m = get_method(name)
        assert m.needs_base and arxiv[name] in m.reference and m.summary
        assert m.param("alpha").default == 1.0
        assert m.param("fallback").default == "mean"
        assert m.param("exact").default is False
    assert get_method("tsv").param("rank").default == "per_task"
    assert get_method("iso_cts").param("common_fraction").default == 0.8


def test_param_validation():
    rank = get_method("tsv").param("rank")
    assert rank.validate("per_task", "recipe") == "per_task"
    assert rank.validate(16, "recipe") == 16
    assert rank.validate(0.5, "recipe") == 0.5
    assert rank.validate("knee", "recipe") == "knee"
    with pytest.raises(OmnimergeError, match="recipe: parameter 'rank'"):
        rank.validate("per_model", "recipe")
    with pytest.raises(OmnimergeError, match=">= 1"):
        rank.validate(0, "recipe")
    assert "per_task" in rank.range_text()
    with pytest.raises(OmnimergeError, match=re.escape("[0, 1]")):
        get_method("iso_cts").param("common_fraction").validate(1.5, "recipe")
    with pytest.raises(OmnimergeError, match="choose one of mean, sum"):
        get_method("iso_c").param("fallback").validate("median", "recipe")
    with pytest.raises(OmnimergeError, match="true or false"):
        get_method("tsv").param("exact").validate("yes", "recipe")
    with pytest.raises(OmnimergeError, match="no parameter 'lambda'"):
        get_method("tsv").param("lambda")


def test_bad_values_at_call_time_raise():
    z = torch.zeros(4, 5)
    with pytest.raises(OmnimergeError, match="rank"):
        run("tsv", z, [z + 1], rank="nope")
    with pytest.raises(OmnimergeError, match="fallback"):
        run("iso_c", z, [z + 1], fallback="median")
    with pytest.raises(OmnimergeError, match="no models"):
        run("iso_c", z, [])
