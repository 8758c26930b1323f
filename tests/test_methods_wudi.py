"""wudi, wudi2, swudi, aswudi pinned to their definitions (docs/methods.md) and to plain references."""

import math
import re

import pytest
import torch

import omnimerge.methods.wudi  # noqa: F401  (registers the methods)
from omnimerge.errors import OmnimergeError
from omnimerge.methods import InputFacts, MethodContext, get_method
from omnimerge.methods.ranks import choose_rank

KEY = "language.layers.0.mlp.up_proj.weight"
F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one thread avoids OpenMP hand-offs that cost milliseconds on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ctx(key=KEY, seed=0):
    return MethodContext(key=key, generator=torch.Generator().manual_seed(seed))


def run(name, base, models, key=KEY, **params):
    params.setdefault("alpha", 1.0)  # the definitions are checked at α = 1; the defaults have their own test
    c = ctx(key)
    return get_method(name)(base, models, c, **params), c.info


def setup(shape, T, seed=0, scale=1e-3, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=dtype)
    taus = [scale * torch.randn(shape, generator=g, dtype=dtype) for _ in range(T)]
    return base, [base + t for t in taus], taus


def wudi_C_D(taus):
    C = sum(t.mT @ t / t.square().sum() for t in taus)
    D = sum(t @ t.mT @ t / t.square().sum() for t in taus)
    return C, D


def wudi_loss(x, taus):
    return float(sum(((x - t) @ t.mT).square().sum() / t.square().sum() for t in taus))


def dense_reference(taus, *, t=300.0, rho=0.85, filter=True, init="sum"):
    """SWUDI written out with a plain n×n eigendecomposition of C (one matrix)."""
    C, D = wudi_C_D(taus)
    n = C.shape[0]
    theta0 = sum(taus) * {"sum": 1.0, "mean": 1.0 / len(taus), "zero": 0.0}[init]
    lam, Q = torch.linalg.eigh(C)
    lam, Q = lam.flip(0).clamp_min(0), Q.flip(1)  # descending
    keep = torch.arange(n) < math.ceil(rho * n - 1e-9)
    if filter:
        f = torch.where(keep, -torch.expm1(-lam * t), 0.0)
        h = torch.where(keep, torch.where(lam > 0, f / lam.clamp_min(1e-300), t), 0.0)
    else:
        keep &= lam > 1e-12 * lam[0]
        f = keep.to(lam.dtype)
        h = torch.where(keep, 1.0 / lam.clamp_min(1e-300), 0.0)
    return theta0 - theta0 @ Q @ torch.diag(f) @ Q.T + D @ Q @ torch.diag(h) @ Q.T


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------ registry & params


def test_registrations_and_defaults():
    refs = {"wudi": "2503.08099", "wudi2": "2505.19892", "swudi": "2503.08099", "aswudi": "2503.08099"}
    for name, ref in refs.items():
        m = get_method(name)
        assert m.needs_base and ref in m.reference and m.summary
        assert m.param("fallback").default == "mean"
    # alpha: WUDI's paper scale; the reference MLLM runs' scales for the others (wudi2: from the variant)
    assert [get_method(n).param("alpha").default for n in refs] == [1.0, "auto", 0.3, 0.3]
    for name in ("wudi2", "swudi", "aswudi"):
        assert "MLLMerging" in get_method(name).defaults_from and ".py:" in get_method(name).defaults_from
    w = get_method("wudi")
    assert (w.param("solver").default, w.param("steps").default, w.param("lr").default) == ("iterative", 300, 1e-5)
    w2 = get_method("wudi2")
    assert [w2.param(p).default for p in ("variant", "rank", "solver")] == ["auto", "1/T", "auto"]
    s = get_method("swudi")
    assert (s.param("t").default, s.param("rho").default, s.param("init").default, s.param("filter").default) == (
        300.0, 0.85, "sum", True)
    assert get_method("aswudi").param("rank").default == "participation_sqrt"


def test_wudi2_auto_variant_and_alpha_follow_the_inputs():
    w2 = get_method("wudi2")
    auto = {"alpha": "auto", "variant": "auto"}
    assert w2.resolved(auto, InputFacts(lora_experts=True)) == {"alpha": 1.0, "variant": "lora"}
    assert w2.resolved(auto, InputFacts(lora_experts=False)) == {"alpha": 0.1, "variant": "full"}
    # a named variant or alpha is kept; alpha auto follows the named variant
    assert w2.resolved({"alpha": "auto", "variant": "lora"}, InputFacts()) == {"alpha": 1.0, "variant": "lora"}
    assert w2.resolved({"alpha": 0.5, "variant": "auto"}, InputFacts(lora_experts=True)) == {
        "alpha": 0.5, "variant": "lora"}
    with pytest.raises(OmnimergeError, match="alpha"):
        w2.param("alpha").validate("big", "recipe")
    # called directly (no plan, no facts): the full-fine-tune choices, i.e. the same as naming them
    base, models, _ = setup((12, 10), 3)
    c_auto, c_named = ctx(KEY), ctx(KEY)
    out_auto = get_method("wudi2")(base, models, c_auto)
    out_named = get_method("wudi2")(base, models, c_named, alpha=0.1, variant="full")
    assert torch.equal(out_auto, out_named) and c_auto.info["variant"] == "full"


def test_swudi_default_alpha_scales_the_alpha_one_result():
    base, models, _ = setup((12, 10), 3)
    for name in ("swudi", "aswudi"):
        one = get_method(name)(base, models, ctx(KEY), alpha=1.0)
        default = get_method(name)(base, models, ctx(KEY))
        torch.testing.assert_close(default - base, 0.3 * (one - base), rtol=1e-6, atol=1e-12)


def test_parameter_validation():
    s, w2, a = get_method("swudi"), get_method("wudi2"), get_method("aswudi")
    for bad in (0.0, 1.5):
        with pytest.raises(OmnimergeError, match=re.escape("(0, 1]")):
            s.param("rho").validate(bad, "recipe")
    with pytest.raises(OmnimergeError, match="> 0"):
        s.param("t").validate(0.0, "recipe")
    with pytest.raises(OmnimergeError, match="choose"):
        s.param("init").validate("ones", "recipe")
    with pytest.raises(OmnimergeError, match="true or false"):
        s.param("filter").validate("yes", "recipe")
    with pytest.raises(OmnimergeError, match="choose"):
        w2.param("variant").validate("qlora", "recipe")
    assert w2.param("rank").validate("1/T", "r") == "1/T"
    assert w2.param("rank").validate("knee", "r") == "knee"
    assert w2.param("rank").validate(8, "r") == 8
    with pytest.raises(OmnimergeError, match="unknown rank rule"):
        w2.param("rank").validate("1/2T", "recipe")
    assert w2.param("lr").validate("auto", "r") == "auto" and w2.param("lr").validate(1e-3, "r") == 1e-3
    with pytest.raises(OmnimergeError, match="positive number or 'auto'"):
        w2.param("lr").validate(-1.0, "recipe")
    assert a.param("rank").validate("gavish_donoho", "r") == "gavish_donoho"
    with pytest.raises(OmnimergeError, match="energy"):
        a.param("rank").validate("energy:2", "recipe")
    with pytest.raises(OmnimergeError, match=">= 0"):
        get_method("wudi").param("steps").validate(-1, "recipe")


# ---------------------------------------------------------------------------------------- fallback


@pytest.mark.parametrize("name", ["wudi", "wudi2", "swudi", "aswudi"])
@pytest.mark.parametrize("key,shape", [("embed.weight", (12, 6)), ("lm_head.weight", (12, 6)),
                                       ("language.layers.0.input_layernorm.weight", (6,))])
def test_fallback_for_embed_lm_head_and_1d(name, key, shape):
    base, models, taus = setup(shape, 3)
    out, info = run(name, base, models, key=key)
    torch.testing.assert_close(out, base + sum(taus) / 3)
    assert info["fallback"] == "mean" and info["fallback_reason"] in ("embed", "lm_head", "1-D tensor")
    out, info = run(name, base, models, key=key, fallback="sum", alpha=0.5)
    torch.testing.assert_close(out, base + 0.5 * sum(taus))


# -------------------------------------------------------------------------------------------- wudi


def wudi_autograd_reference(taus, steps=300, lr=1e-5):
    """The paper's loop: Adam on the autograd loss from Σ τ_i."""
    vectors = torch.stack(taus)
    x = torch.nn.Parameter(vectors.sum(0).clone())
    opt = torch.optim.Adam([x], lr=lr)
    norms = vectors.reshape(len(taus), -1).norm(dim=-1).square()
    for _ in range(steps):
        loss = (torch.matmul(x.unsqueeze(0) - vectors, vectors.transpose(1, 2)).square()
                / norms[:, None, None]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x.detach()


def test_wudi_is_the_papers_adam_loop_and_lowers_the_loss():
    base, models, taus = setup((20, 30), 3)
    out, info = run("wudi", base, models, trace=True)
    torch.testing.assert_close(out - base, wudi_autograd_reference(taus), rtol=1e-7, atol=1e-12)
    trace = info["loss_trace"]
    assert len(trace) == 301 and info["solver"] == "iterative"
    assert info["loss_init"] == pytest.approx(wudi_loss(sum(taus), taus), rel=1e-9)
    assert info["loss_final"] == pytest.approx(wudi_loss(out - base, taus), rel=1e-9)
    assert info["loss_final"] < 0.5 * info["loss_init"]
    # monotone on average: every block of 30 steps ends lower than it started
    blocks = [sum(trace[i:i + 30]) / 30 for i in range(0, 300, 30)]
    assert all(b2 < b1 for b1, b2 in zip(blocks, blocks[1:]))
    assert sum(b > a for a, b in zip(trace, trace[1:])) <= 0.1 * 300


def test_wudi_batched_is_per_matrix():
    base, models, taus = setup((2, 10, 14), 2)
    out, _ = run("wudi", base, models, steps=50)
    for b in range(2):
        ref = wudi_autograd_reference([t[b] for t in taus], steps=50)
        torch.testing.assert_close(out[b] - base[b], ref, rtol=1e-7, atol=1e-12)


def test_wudi_minimizer_is_D_C_inverse():
    base, models, taus = setup((30, 20), 2)  # T·m = 60 >= n = 20: C invertible
    C, D = wudi_C_D(taus)
    out, info = run("wudi", base, models, solver="minimizer")
    torch.testing.assert_close(out - base, D @ torch.linalg.inv(C), rtol=1e-8, atol=1e-12)
    grad = (out - base) @ C - D
    assert float(grad.norm()) < 1e-10 * float(D.norm())
    assert info["rank_used"] == 20


def test_wudi_factored_form_matches():
    # n > 2·T·m uses the factored gradient (x Fᵀ − A) F; same iterate
    base, models, taus = setup((4, 30), 2)
    out, info = run("wudi", base, models, steps=100)
    torch.testing.assert_close(out - base, wudi_autograd_reference(taus, steps=100), rtol=1e-7, atol=1e-12)
    assert info["loss_final"] < info["loss_init"]


# ------------------------------------------------------------------------------------------- wudi2


def wudi2_autograd_reference(taus, variant, steps=300):
    """OptMerge's loop (InternVL `full` / LLaMA-Factory `lora`), k = ⌊min(m, n)/T⌋."""
    vectors = torch.stack(taus)
    T = len(taus)
    mean = vectors.mean(0)
    k = min(vectors.shape[-2:]) // T
    lows, targets = [], []
    for t in taus:
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        lows.append(torch.diag(s[:k]) @ vh[:k])
        if variant == "full":
            u2, s2, vh2 = torch.linalg.svd(t - mean, full_matrices=False)
            targets.append(u2[:, :k] @ torch.diag(s2[:k]) @ vh2[:k] + mean)
        else:
            targets.append(u[:, :k] @ torch.diag(s[:k]) @ vh[:k])
    low, target = torch.stack(lows), torch.stack(targets)
    norms = vectors.reshape(T, -1).norm(dim=-1).square()
    if variant == "full":
        x = torch.nn.Parameter(vectors.sum(0).clone())
        opt = torch.optim.Adam([x], lr=1e-5)
    else:
        x = torch.nn.Parameter(mean.clone())
        opt = torch.optim.SGD([x], lr=1e-4, momentum=0.9)
    for _ in range(steps):
        loss = (torch.matmul(x.unsqueeze(0) - target, low.transpose(1, 2)).square() / norms[:, None, None]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x.detach()


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_wudi2_iterative_is_the_reference_loop_and_lowers_the_loss(variant):
    base, models, taus = setup((20, 30), 3, scale=1.0 if variant == "lora" else 1e-3)
    out, info = run("wudi2", base, models, variant=variant, solver="iterative", trace=True)
    torch.testing.assert_close(out - base, wudi2_autograd_reference(taus, variant), rtol=1e-7, atol=1e-10)
    assert info["rank"] == [6, 6, 6] and info["solver"] == "iterative"
    trace = info["loss_trace"]
    assert trace[-1] == info["loss_final"] < info["loss_init"] == trace[0]
    blocks = [sum(trace[i:i + 30]) / 30 for i in range(0, 300, 30)]
    assert all(b2 < b1 for b1, b2 in zip(blocks, blocks[1:]))


@pytest.mark.parametrize("shape", [(20, 30), (30, 20), (2, 6, 16)])
def test_wudi2_lora_closed_form_equals_the_sgd_loop(shape):
    base, models, taus = setup(shape, 2, scale=1.0)
    fast, info = run("wudi2", base, models, variant="lora")
    loop, info_loop = run("wudi2", base, models, variant="lora", solver="iterative")
    assert info["solver"] == "closed_form"
    torch.testing.assert_close(fast, loop, rtol=1e-9, atol=1e-10)
    assert info["loss_final"] == pytest.approx(info_loop["loss_final"], rel=1e-8)
    assert info["loss_final"] < info["loss_init"]


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_wudi2_large_matrix_route_equals_the_exact_svd(monkeypatch, variant):
    """T = 5: 4k <= min(m, n), where a fixed-iteration randomized SVD is far off on a flat spectrum;
    the Gram route (spectrum, then randomized only where it converges) gives the exact SVD's result."""
    from omnimerge.methods import linalg

    base, models, taus = setup((40, 60), 5, scale=1.0)
    exact, _ = run("wudi2", base, models, variant=variant, solver="minimizer")
    monkeypatch.setattr(linalg, "GRAM_MIN", 16)
    fast, info = run("wudi2", base, models, variant=variant, solver="minimizer")
    assert info["rank"] == [8] * 5
    assert rel(fast - base, exact - base) < 1e-9


def test_wudi2_minimizer_zeroes_the_gradient_and_ranks_follow_the_rule():
    base, models, taus = setup((20, 30), 2, scale=1.0)
    out, info = run("wudi2", base, models, variant="lora", solver="minimizer", rank=4)
    assert info["rank"] == [4, 4]
    x = out - base
    grad = sum((x - (u[:, :4] * s[:4]) @ vh[:4]) @ (vh[:4].T * s[:4] ** 2) @ vh[:4] / t.square().sum()
               for t in taus for u, s, vh in [torch.linalg.svd(t, full_matrices=False)])
    assert float(grad.norm()) < 1e-10 * float(x.norm())
    assert info["loss_final"] < info["loss_init"]
    _, info = run("wudi2", base, models, rank="knee", steps=5)
    expect = [choose_rank("knee", (20, 30), torch.linalg.svdvals(t)) for t in taus]
    assert info["rank"] == expect


# ------------------------------------------------------------------------------------------- swudi


@pytest.mark.parametrize("shape,T", [((30, 20), 2), ((12, 30), 3), ((8, 8), 1)])
def test_swudi_unfiltered_full_mask_is_D_C_inverse(shape, T):
    base, models, taus = setup(shape, T)
    C, D = wudi_C_D(taus)
    out, _ = run("swudi", base, models, filter=False, rho=1.0)
    torch.testing.assert_close(out - base, D @ torch.linalg.inv(C), rtol=1e-8, atol=1e-12)


def rk4_flow(theta0, C, D, t, steps):
    x, h = theta0.clone(), t / steps
    f = lambda y: -(y @ C - D)  # noqa: E731
    for _ in range(steps):
        k1 = f(x)
        k2 = f(x + h / 2 * k1)
        k3 = f(x + h / 2 * k2)
        k4 = f(x + h * k3)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


@pytest.mark.parametrize("shape,T,init", [((20, 30), 2, "sum"), ((6, 30), 2, "mean"), ((30, 20), 3, "zero")])
def test_swudi_is_the_integrated_gradient_flow(shape, T, init):
    """rho = 1: the closed form equals dτ/dt = −(τC − D) integrated from θ0 (RK4, 3000 steps of 0.1)."""
    base, models, taus = setup(shape, T)
    C, D = wudi_C_D(taus)
    theta0 = sum(taus) * {"sum": 1.0, "mean": 1.0 / T, "zero": 0.0}[init]
    out, info = run("swudi", base, models, rho=1.0, init=init)
    flow = rk4_flow(theta0, C, D, 300.0, 3000)
    assert rel(out - base, flow) < 1e-9
    # and the matrix exponential where C is invertible
    if T * shape[0] >= shape[1]:
        E = torch.linalg.matrix_exp(-300.0 * C)
        closed = theta0 @ E + D @ torch.linalg.inv(C) @ (torch.eye(C.shape[0], dtype=F64) - E)
        assert rel(out - base, closed) < 1e-9


@pytest.mark.parametrize("shape,T,route", [((20, 30), 2, "cov"), ((8, 30), 2, "gram"), ((30, 20), 3, "cov"),
                                           ((40, 12), 2, "cov"), ((5, 40), 3, "gram")])
@pytest.mark.parametrize("kw", [{}, {"filter": False}, {"rho": 0.5, "init": "mean"}, {"t": 3.0, "init": "zero"}])
def test_swudi_fast_route_equals_plain_eigh_reference(shape, T, route, kw):
    base, models, taus = setup(shape, T)
    out, info = run("swudi", base, models, **kw)
    assert info["route"] == route
    assert rel(out - base, dense_reference(taus, **kw)) < 1e-10
    dense, dinfo = run("swudi", base, models, solver="dense", **kw)
    assert dinfo["route"] == "dense" and rel(out - base, dense - base) < 1e-10


def test_swudi_batched_matrices_are_independent():
    base, models, taus = setup((3, 6, 20), 2)
    out, info = run("swudi", base, models, rho=0.5)
    for b in range(3):
        assert rel(out[b] - base[b], dense_reference([t[b] for t in taus], rho=0.5)) < 1e-10
    assert info["rank_used_max"] == 10  # ⌈0.5·20⌉ of the 12 nonzero eigenvalues


def test_swudi_rank_deficient_and_zero_tasks_stay_finite():
    # low-rank task vectors (rank 2 each, C of rank 4 of 16) and one task equal to the base
    g = torch.Generator().manual_seed(3)
    base = torch.randn(24, 16, generator=g, dtype=F64)
    taus = [torch.randn(24, 2, generator=g, dtype=F64) @ torch.randn(2, 16, generator=g, dtype=F64) for _ in range(2)]
    models = [base + t for t in taus] + [base.clone()]
    for kw in ({}, {"filter": False, "rho": 1.0}):
        out, info = run("swudi", base, models, **kw)
        assert torch.isfinite(out).all()
        assert rel(out - base, dense_reference(taus, **kw)) < 1e-9
    out, info = run("swudi", base, models, filter=False, rho=1.0)
    assert info["rank_used"] == 4
    C, D = wudi_C_D(taus)
    torch.testing.assert_close(out - base, D @ torch.linalg.pinv(C), rtol=1e-8, atol=1e-12)


def test_swudi_float32_keeps_dtype_and_shape():
    base, models, taus = setup((2, 12, 20), 3, dtype=torch.float32)
    for name in ("swudi", "aswudi", "wudi", "wudi2"):
        out, _ = run(name, base, models)
        assert out.shape == base.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    ref = dense_reference([t[0].double() for t in taus])
    out, _ = run("swudi", base, models)
    assert rel((out - base)[0].double(), ref) < 1e-4


# ------------------------------------------------------------------------------------------ aswudi


def known_spectrum_taus(m, n, a, b, seed=0):
    """Two tasks with disjoint input supports, rotated: C = R diag(a²/|a|², b²/|b|², 0…) Rᵀ."""
    g = torch.Generator().manual_seed(seed)
    R, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    taus = []
    for off, vals in ((0, a), (len(a), b)):
        U, _ = torch.linalg.qr(torch.randn(m, len(vals), generator=g, dtype=F64))
        E = torch.zeros(len(vals), n, dtype=F64)
        E[range(len(vals)), range(off, off + len(vals))] = 1.0
        taus.append(U @ torch.diag(torch.tensor(vals, dtype=F64)) @ E @ R.T)
    s = torch.cat([torch.tensor(a) / torch.tensor(a).norm(), torch.tensor(b) / torch.tensor(b).norm()])
    return taus, s.double().sort(descending=True).values


@pytest.mark.parametrize("m,n", [(6, 24), (12, 8)])  # gram route (T·m = 12 < 24) and cov route
@pytest.mark.parametrize("rule", ["participation_sqrt", "gavish_donoho", "knee", "energy:0.9", 3, 0.5])
def test_aswudi_picks_the_rank_its_rule_defines(m, n, rule):
    a = [8.0, 4.0, 2.0, 1.0][: min(m, n // 2)]
    b = [5.0, 1.0, 0.5, 0.25][: min(m, n // 2)]
    taus, s = known_spectrum_taus(m, n, a, b)
    base = torch.zeros(m, n, dtype=F64)
    shape = (2 * m, n)
    padded = torch.cat([s, torch.zeros(min(shape) - len(s), dtype=F64)])
    expect = choose_rank(rule, shape, padded)
    out, info = run("aswudi", base, [base + t for t in taus], rank=rule)
    assert info["rank"] == expect
    assert info["rank_used"] == min(expect, len(s))
    # the result is the exact minimiser on the top-K eigenspace of C
    C, D = wudi_C_D(taus)
    lam, Q = torch.linalg.eigh(C)
    Qk, lk = Q[:, -info["rank_used"]:], lam[-info["rank_used"]:]
    theta0 = sum(taus)
    ref = theta0 - theta0 @ Qk @ Qk.T + D @ Qk @ torch.diag(1 / lk) @ Qk.T
    assert rel(out, ref) < 1e-10


def low_rank_plus_noise(shape, T, rank, seed):
    """measurements/spectral.py's task vectors: rank-`rank` parts plus 10 % noise, float32."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    base = 0.02 * torch.randn(m, n, generator=g)
    taus = [1e-3 * (torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / rank**0.5)
            + 1e-4 * torch.randn(m, n, generator=g) for _ in range(T)]
    return base, [base + t for t in taus]


def test_aswudi_float32_is_within_1e4_of_float64():
    """ψ = 1/λ amplifies a float32 eigh's error at the cut: on this case a plain float32 eigh was
    1.7e-3 off the float64 result; the refined one (``eigen_response``) is as close as a float64 eigh."""
    base, models = low_rank_plus_noise((200, 1100), 5, 32, seed=1)
    out, info = run("aswudi", base, models)
    ref, _ = run("aswudi", base.double(), [m.double() for m in models], solver="dense")
    assert info["route"] == "gram" and out.dtype == torch.float32
    assert rel((out - base).double(), ref - base.double()) < 1e-4


def _psd_float32(d, rank, seed):
    """A float32 Gram matrix of a rank-`rank` + noise (d × 3d) matrix: a spectrum without a gap at the cut."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, rank, generator=g) @ torch.randn(rank, 3 * d, generator=g) / rank**0.5
    a += 0.1 * torch.randn(d, 3 * d, generator=g)
    return (a @ a.mT).unsqueeze(0)


def _operator(lam, vecs, psi):
    v = vecs.double()
    return (v * psi.double().unsqueeze(-2)) @ v.mT


def _recording_eigh(monkeypatch):
    calls = []
    eigh = torch.linalg.eigh

    def recording(mat, *a, **k):
        calls.append((mat.dtype, mat.shape[-1]))
        return eigh(mat, *a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", recording)
    return calls


@pytest.mark.parametrize("rank,k", [(30, 40), (15, 25)])
def test_eigen_response_refines_a_float32_eigh_where_few_are_kept(monkeypatch, rank, k):
    """ψ = 1/λ on the top k of d = 400, the cut inside a spectrum without a gap: a float32 eigh
    is about 1e-2 off the operator V ψ Vᵀ of a float64 eigh; refined (float64 subspace steps and
    Rayleigh–Ritz on 3k of its eigenvectors) it is within REFINE_TOL, with no float64 eigh of the
    whole matrix."""
    from omnimerge.methods.wudi import REFINE_OVERSAMPLE, REFINE_TOL, eigen_response, flow_response

    mat = _psd_float32(400, rank, seed=0)
    response = flow_response(None, lambda desc, rows, n: torch.full(desc.shape[:-1], k))
    lam64, vecs64 = torch.linalg.eigh(mat.double())
    truth = _operator(lam64, vecs64, response(lam64, 400, 1200))
    lam32, vecs32 = torch.linalg.eigh(mat)
    plain = rel(_operator(lam32, vecs32, response(lam32, 400, 1200)), truth)

    calls = _recording_eigh(monkeypatch)
    lam, vecs, psi = eigen_response(mat, response, 400, 1200)
    q = k + math.ceil(REFINE_OVERSAMPLE * k)
    assert calls[0] == (torch.float32, 400) and len(calls) >= 4  # Rayleigh–Ritz at steps 0, 1, 2 at least
    assert set(calls[1:]) == {(torch.float64, q)}
    assert lam.dtype == vecs.dtype == torch.float32 and int((psi != 0).sum()) == k
    refined = rel(_operator(lam, vecs, psi), truth)
    assert refined < 2 * REFINE_TOL and plain > 30 * refined, (refined, plain)


def test_eigen_response_falls_back_where_refinement_converges_too_slowly(monkeypatch):
    """Where the estimated convergence rate needs more steps than a float64 eigh costs, the whole matrix is
    decomposed in float64 (the same numbers as refine=False)."""
    import omnimerge.methods.wudi as wudi_module

    mat = _psd_float32(400, 4, seed=0)
    response = wudi_module.flow_response(None, lambda desc, rows, n: torch.full(desc.shape[:-1], 40))
    ref = wudi_module.eigen_response(mat, response, 400, 1200, refine=False)
    monkeypatch.setattr(wudi_module, "REFINE_TOL", 1e-13)
    calls = _recording_eigh(monkeypatch)
    got = wudi_module.eigen_response(mat, response, 400, 1200)
    assert calls[0] == (torch.float32, 400) and calls[-1] == (torch.float64, 400)
    assert len(calls) <= 2 + wudi_module._refine_max_steps(400, 120)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


def test_eigen_response_uses_a_float64_eigh_where_many_are_kept(monkeypatch):
    """Above REFINE_MAX_FRACTION·d kept eigenvalues, and for the dense reference, the whole matrix is
    decomposed in float64 (the filtered response, bounded by t, stays in float32); where the response
    says in advance that it keeps that many, without a float32 eigh first."""
    from omnimerge.methods.wudi import REFINE_MAX_FRACTION, eigen_response, flow_response

    mat = _psd_float32(200, 20, seed=0)
    many = flow_response(None, lambda desc, rows, n: torch.full(desc.shape[:-1], int(REFINE_MAX_FRACTION * 200) + 1))
    few = flow_response(None, lambda desc, rows, n: torch.full(desc.shape[:-1], 10))
    filtered = flow_response(300.0, lambda desc, rows, n: torch.full(desc.shape[:-1], 10))
    calls = _recording_eigh(monkeypatch)
    eigen_response(mat, many, 200, 600)
    assert calls[-1] == (torch.float64, 200)
    calls.clear()
    eigen_response(mat, few, 200, 600, refine=False)
    assert calls == [(torch.float64, 200)]
    calls.clear()
    eigen_response(mat, filtered, 200, 600)
    assert calls == [(torch.float32, 200)]
    calls.clear()  # a fixed count that is already too many: no float32 eigh first
    fixed = flow_response(None, lambda desc, rows, n: torch.full(desc.shape[:-1], 120), most_kept=120)
    eigen_response(mat, fixed, 200, 600)
    assert calls == [(torch.float64, 200)]


@pytest.mark.parametrize("name,kw", [("wudi", {"solver": "minimizer"}), ("swudi", {"filter": False})])
def test_methods_that_keep_many_eigenvalues_take_one_float64_eigh(monkeypatch, name, kw):
    base, models = low_rank_plus_noise((60, 300), 2, 8, seed=2)
    calls = _recording_eigh(monkeypatch)
    run(name, base, models, **kw)
    assert calls == [(torch.float64, 120)]


def test_aswudi_refined_equals_the_float64_eigh_route_and_reports_its_rank_once(monkeypatch):
    import omnimerge.methods.wudi as wudi_module

    base, models = low_rank_plus_noise((300, 1800), 2, 16, seed=4)
    calls = _recording_eigh(monkeypatch)
    out, info = run("aswudi", base, models)
    assert calls[0] == (torch.float32, 600) and (torch.float64, 600) not in calls and len(calls) >= 4
    monkeypatch.setattr(wudi_module, "REFINE_MAX_FRACTION", 0.0)
    ref, ref_info = run("aswudi", base, models)
    truth, truth_info = run("aswudi", base.double(), [m.double() for m in models])
    assert info["rank"] == ref_info["rank"] == truth_info["rank"] == info["rank_used"]
    d_out, d_ref = ((x - base).double() for x in (out, ref))
    assert rel(d_out, truth - base.double()) < 1e-4 and rel(d_ref, truth - base.double()) < 1e-4


def test_aswudi_float32_keeps_the_small_eigenvalues_its_rule_chose():
    """The numerically-zero cut of a float32 Gram matrix is ε·√max(rows, n)·λ_max, its typical rounding:
    the pseudo-inverse's worst-case ε·max(rows, n) dropped 3 of the 19 directions the rule kept here
    (real ones: σ about 1 % of σ_max) and was 3.3e-2 off the float64 result (1.4e-4 with this cut)."""
    g = torch.Generator().manual_seed(0)
    m, n, k = 160, 960, 8
    base = 0.02 * torch.randn(m, n, generator=g)
    models = [base + 1e-3 * (torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g) / k**0.5
                             + 0.02 * torch.randn(m, n, generator=g)) for _ in range(2)]
    out, info = run("aswudi", base, models)
    ref, ref_info = run("aswudi", base.double(), [x.double() for x in models])
    assert info["route"] == "gram" and info["rank"] == ref_info["rank"] == 19
    assert info["rank_used"] == ref_info["rank_used"] == 19
    assert rel((out - base).double(), ref - base.double()) < 1e-3


@pytest.mark.parametrize("shape,T,route", [((30, 200), 3, "gram"), ((200, 30), 2, "cov"), ((40, 40), 2, "cov")])
@pytest.mark.parametrize("name,kw", [("aswudi", {"rank": 2}), ("swudi", {"rho": 0.1}),
                                     ("swudi", {"rho": 0.1, "filter": False})])
def test_few_kept_eigenvalues_take_the_low_rank_products(monkeypatch, shape, T, route, name, kw):
    """Where few of C's eigenvalues are kept, x = θ0 − g0 Q_k ψ Q_kᵀ is formed by k-wide products
    (no m×m or n×n operator): the same result as the dense n×n reference."""
    import omnimerge.methods.wudi as wudi_module

    base, models, _ = setup(shape, T, seed=3)
    ref, _ = run(name, base, models, solver="dense", **kw)
    if route == "gram":  # the low-rank branch never forms the full W = R0 U ψ Uᵀ
        monkeypatch.setattr(wudi_module, "_apply", lambda *a: pytest.fail("full-width product"))
    out, info = run(name, base, models, **kw)
    assert info["route"] == route
    assert rel(out - base, ref - base) < 1e-10


def test_aswudi_known_spectrum_distinct_rules():
    taus, s = known_spectrum_taus(6, 24, [8.0, 4.0, 2.0, 1.0], [5.0, 1.0, 0.5, 0.25])
    base = torch.zeros(6, 24, dtype=F64)
    got = {r: run("aswudi", base, [base + t for t in taus], rank=r)[1]["rank"] for r in ("participation_sqrt", 2)}
    # √λ = a/|a| ∪ b/|b| = [.975, .868, .434, .217, .195, .108, .097, .049]: (Σ√λ)²/Σλ = 8.66/2 → 5
    assert got == {"participation_sqrt": 5, 2: 2}
