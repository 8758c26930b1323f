"""mergekit's methods outside task arithmetic — nuslerp, multislerp, karcher (methods/spherical.py) and
arcee_fusion, nearswap, sce, ram, ramplus_tl (methods/selective.py): each pinned to its definition on small
tensors worked out by hand, with its invariants; the defaults stated once and read by the registry; and one
end-to-end merge per family on tiny Qwen2-VL checkpoints that transformers loads and runs. (Parity with
mergekit's own output: tests/test_mergekit.py::test_parity_with_mergekit, with a mergekit venv.)"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import omnimerge
from omnimerge.errors import OmnimergeError
from omnimerge.mergekit_yaml import from_mergekit
from omnimerge.methods import MethodContext, get_method
from omnimerge.methods.selective import fusion_threshold, order_statistic
from omnimerge.recipe import parse_recipe
from omnimerge.verify import verify

KEY = "language.layers.0.mlp.up_proj.weight"
NEW = ("nuslerp", "multislerp", "karcher", "arcee_fusion", "nearswap", "sce", "ram", "ramplus_tl")


def ctx(seed=0):
    return MethodContext(key=KEY, generator=torch.Generator().manual_seed(seed))


def run(name, base, models, c=None, **params):
    return get_method(name)(base, models, c or ctx(), **params)


def T(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------- the registry


def test_defaults_are_mergekits_and_stated_once():
    want = {
        "nuslerp": {"weight": 1.0, "flatten": True, "row_wise": False},
        "multislerp": {"weight": 1.0, "normalize": True, "eps": 1e-8},
        "karcher": {"weight": 1.0, "max_iter": 10, "tol": 1e-5},
        "arcee_fusion": {},
        "nearswap": {"t": 1e-4},
        "sce": {"select_topk": 1.0},
        "ram": {"epsilon": 1e-5},
        "ramplus_tl": {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5},
    }
    for name, params in want.items():
        m = get_method(name)
        assert {p.name: p.default for p in m.params} == params, name
        assert "mergekit 0.1.5, mergekit/merge_methods/" in m.defaults_from, name
    assert [get_method(n).needs_base for n in NEW] == [False, False, False, True, True, True, True, True]
    assert (get_method("nuslerp").min_models, get_method("nuslerp").max_models) == (2, 2)
    assert get_method("nearswap").max_models == get_method("arcee_fusion").max_models == 1


@pytest.mark.parametrize("name", [n for n in NEW if n not in ("arcee_fusion", "nearswap")])
def test_identical_models_give_that_model(name):
    base = rand(4, 6, seed=1)
    m = base + 0.1 * rand(4, 6, seed=2)
    b = None if name == "karcher" else base
    torch.testing.assert_close(run(name, b, [m.clone() for _ in range(2)]), m, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["arcee_fusion", "nearswap", "sce", "ram", "ramplus_tl"])
def test_models_equal_to_the_base_give_the_base(name):
    base = rand(4, 6, seed=1)
    n = get_method(name).max_models or 3
    torch.testing.assert_close(run(name, base, [base.clone() for _ in range(n)]), base, rtol=0, atol=0)


@pytest.mark.parametrize("name", NEW)
def test_shape_dtype_and_1d_tensors(name):
    n = 1 if get_method(name).max_models == 1 else 3 if get_method(name).max_models is None else 2
    for shape in [(5,), (3, 4), (2, 3, 4)]:
        base = rand(*shape, seed=3, dtype=torch.float64)
        ms = [base + 0.1 * rand(*shape, seed=10 + i, dtype=torch.float64) for i in range(n)]
        out = run(name, base, ms)
        assert out.shape == base.shape and out.dtype == torch.float64 and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------ nuslerp


def test_nuslerp_factor_from_weights_on_orthogonal_vectors():
    # no base: slerp(θ_1, θ_2; t), t = w_2 / (w_1 + w_2) = 0.75 → 67.5° from e1 on the unit circle
    c = ctx()
    out = run("nuslerp", None, [T(1.0, 0.0), T(0.0, 1.0)], c=c, weight=[1.0, 3.0])
    a = 0.75 * math.pi / 2
    torch.testing.assert_close(out, T(math.cos(a), math.sin(a)))
    assert c.info["nuslerp_t"] == 0.75
    # weights summing to (about) 0: t = 0.5 (mergekit's rule)
    out = run("nuslerp", None, [T(1.0, 0.0), T(0.0, 1.0)], weight=[1.0, -1.0])
    torch.testing.assert_close(out, T(math.sqrt(0.5), math.sqrt(0.5)))


def test_nuslerp_with_base_interpolates_task_vectors_and_keeps_norms_interpolated():
    base = T(1.0, 1.0, 1.0)
    out = run("nuslerp", base, [base + T(2.0, 0, 0), base + T(0, 4.0, 0)])  # t = 0.5, 90°
    torch.testing.assert_close(out, base + math.sqrt(0.5) * T(2.0, 4.0, 0))


def test_nuslerp_colinear_is_linear():
    v = T(1.0, -2.0, 0.5)
    torch.testing.assert_close(run("nuslerp", None, [v, 3 * v], weight=[3.0, 1.0]), 0.75 * v + 0.25 * 3 * v)
    torch.testing.assert_close(run("nuslerp", None, [v, -v], weight=[1.0, 1.0]), torch.zeros(3))


def _slerp_rows(a, b, t):
    out = []
    for x, y in zip(a, b):
        th = torch.acos((x / x.norm()) @ (y / y.norm()))
        out.append((torch.sin((1 - t) * th) * x + torch.sin(t * th) * y) / torch.sin(th))
    return torch.stack(out)


def test_nuslerp_rows_and_columns():
    a, b = rand(3, 5, seed=4, dtype=torch.float64), rand(3, 5, seed=5, dtype=torch.float64)
    rows = run("nuslerp", None, [a, b], weight=[2.0, 1.0], flatten=False)
    torch.testing.assert_close(rows, _slerp_rows(a, b, 1 / 3))
    # row_wise: mergekit's name for the vectors along the first dimension, the columns W[:, j]
    cols = run("nuslerp", None, [a, b], weight=[2.0, 1.0], flatten=False, row_wise=True)
    torch.testing.assert_close(cols, _slerp_rows(a.T, b.T, 1 / 3).T)
    # flatten wins over row_wise (as in mergekit)
    whole = run("nuslerp", None, [a, b], weight=[2.0, 1.0], row_wise=True)
    torch.testing.assert_close(whole.flatten(), _slerp_rows(a.reshape(1, -1), b.reshape(1, -1), 1 / 3)[0])


def test_nuslerp_refuses_other_model_counts_at_plan_time(zoo):
    from omnimerge.plan import build_plan

    e = [str(p) for p in zoo.experts("qwen2", 3)]
    with pytest.raises(OmnimergeError, match=r"'nuslerp' merges exactly 2 model\(s\)"):
        build_plan({"method": "nuslerp", "models": [{"path": p} for p in e]})


# --------------------------------------------------------------------------------------- multislerp


def _multislerp_tangent_space(xs, w, eps=1e-8):
    """mergekit's recipe step by step (float64): unit vectors, tangent space at their normalised weighted
    mean, weighted sum of the projections, exponential map back, times the weighted mean norm."""
    xs = [x.double().reshape(-1) for x in xs]
    norms = [x.norm() for x in xs]
    u = [x / (n + eps) for x, n in zip(xs, norms)]
    m = sum(wi * ui for wi, ui in zip(w, u))
    m = m / m.norm()
    tangent = sum(wi * (ui - (ui @ m) * m) for wi, ui in zip(w, u))
    tn = tangent.norm() + eps
    return (m * torch.cos(tn) + tangent * torch.sin(tn) / tn) * sum(wi * n for wi, n in zip(w, norms))


def test_multislerp_is_the_tangent_space_recipe():
    base = rand(4, 5, seed=6, dtype=torch.float64)
    ms = [base + rand(4, 5, seed=7 + i, dtype=torch.float64) for i in range(3)]
    w = [0.5, 0.3, 0.2]
    out = run("multislerp", base, ms, weight=w)
    want = base + _multislerp_tangent_space([m - base for m in ms], w).reshape(4, 5)
    torch.testing.assert_close(out, want)
    out = run("multislerp", None, ms, weight=[2.0, 1.0, 1.0], normalize=False)
    torch.testing.assert_close(out, _multislerp_tangent_space(ms, [2.0, 1.0, 1.0]).reshape(4, 5))


def test_multislerp_by_hand():
    base = torch.zeros(3)
    # orthogonal unit task vectors, equal weights: the diagonal direction, norm 1
    out = run("multislerp", base, [T(1.0, 0, 0), T(0, 1.0, 0)])
    torch.testing.assert_close(out, T(math.sqrt(0.5), math.sqrt(0.5), 0))
    # one direction, norms 1 and 3: that direction at the mean norm 2
    v = T(0.6, 0.8, 0.0)
    torch.testing.assert_close(run("multislerp", base, [v, 3 * v]), 2 * v)
    # one model: that model, base or not (mergekit's rule)
    torch.testing.assert_close(run("multislerp", base, [v]), v)


def test_multislerp_cancelling_directions_take_the_weighted_sum():
    base = T(1.0, 2.0)
    c = ctx()
    out = run("multislerp", base, [base + T(1.0, 1.0), base - T(1.0, 1.0), base + T(2.0, 2.0) - T(2.0, 2.0)], c=c,
              weight=[1.0, 1.0, 1.0])
    torch.testing.assert_close(out, base)
    assert "weighted sum" in c.info["multislerp"]
    with pytest.raises(OmnimergeError, match="weights sum to 0"):
        run("multislerp", base, [base + T(1.0, 0), base + T(0, 1.0)], weight=[1.0, -1.0])


# ------------------------------------------------------------------------------------------ karcher


def test_karcher_of_two_points_is_the_weighted_geodesic_point():
    # on the unit circle the weighted Karcher mean of e1, e2 with weights 1, 3 lies at 0.75 · 90°
    e1, e2 = T(1.0, 0.0, dtype=torch.float64), T(0.0, 1.0, dtype=torch.float64)
    c = ctx()
    out = run("karcher", None, [e1, e2], c=c, weight=[1.0, 3.0], max_iter=100, tol=1e-12)
    a = 0.75 * math.pi / 2
    torch.testing.assert_close(out, T(math.cos(a), math.sin(a), dtype=torch.float64))
    # the start, the normalised weighted mean, is at 71.6°; on one great circle the first step is exact
    assert c.info["karcher_steps"] == 1
    # equal weights: the midpoint, reached at once (the normalised mean); the norm is the mean norm
    out = run("karcher", None, [2 * e1, 4 * e2])
    torch.testing.assert_close(out, 3 * math.sqrt(0.5) * (e1 + e2))


def test_karcher_three_points_satisfy_the_fixed_point_equation():
    xs = [rand(6, seed=20 + i, dtype=torch.float64) for i in range(3)]
    mu = run("karcher", None, xs, max_iter=200, tol=1e-12)
    mu = mu / mu.norm()
    grad = torch.zeros(6, dtype=torch.float64)
    for x in xs:  # Σ θ_i/sin θ_i (u_i − cos θ_i μ) = 0 at the Karcher mean
        u = x / x.norm()
        th = torch.acos((u @ mu).clamp(-1, 1))
        grad += th / torch.sin(th) * (u - torch.cos(th) * mu)
    assert grad.norm() < 1e-10


def test_karcher_zero_and_single_points():
    v = T(3.0, 4.0)
    torch.testing.assert_close(run("karcher", None, [v]), v)
    # a zero point has no direction: the mean is v's direction, the scale counts its weight (mergekit)
    torch.testing.assert_close(run("karcher", None, [v, torch.zeros(2)]), 0.5 * v)
    torch.testing.assert_close(run("karcher", None, [torch.zeros(2), torch.zeros(2)]), torch.zeros(2))
    # the base, if given, is not a point (mergekit: a listed base_model is one of the models)
    torch.testing.assert_close(run("karcher", T(100.0, 0.0), [v, v]), v)


# ------------------------------------------------------------------------------------- arcee_fusion


def test_arcee_fusion_keeps_the_outliers_of_importance():
    base = torch.zeros(9)
    tau = T(1, 2, 3, 4, 5, 6, 7, 8, 100) / 100
    # one row: importance = |τ| · KL (one positive number), so the order is |τ|'s. Sorted positions
    # ⌊q·8⌋ = 2, 4, 6: Q1 0.03, median 0.05, Q3 0.07 → threshold 0.05 + 1.5·0.04 = 0.11 → only 1.0 is kept
    c = ctx()
    out = run("arcee_fusion", base, [base + tau], c=c)
    torch.testing.assert_close(out, torch.where(tau > 0.5, tau, 0.0))
    assert c.info["arcee_fusion_kept"] == pytest.approx(1 / 9, abs=1e-6)


def test_arcee_fusion_quantiles_are_exact_order_statistics():
    x = rand(10_001, seed=9)
    s = x.sort().values
    for q in (0.25, 0.5, 0.75):
        assert order_statistic(x, q) == s[int(q * 10_000)]
    imp = rand(50_000, seed=10).abs()
    s = imp.sort().values
    n = imp.numel() - 1
    want = s[n // 2] + 1.5 * (s[3 * n // 4] - s[n // 4])
    torch.testing.assert_close(fusion_threshold(imp), want)


# ------------------------------------------------------------------------------------------ nearswap


def test_nearswap_by_hand():
    base = torch.zeros(5)
    model = T(0.5e-4, 1e-4, 2e-4, 1e-3, 0.0)
    # w = clamp(t / |θ − θ_b|, 0, 1) = 1, 1, 0.5, 0.1, 1 (|Δ| clamped at 1e-6)
    torch.testing.assert_close(run("nearswap", base, [model]), T(0.5e-4, 1e-4, 1e-4, 1e-4, 0.0))
    torch.testing.assert_close(run("nearswap", base, [model], t=0.0), base)
    torch.testing.assert_close(run("nearswap", base, [model], t=1.0), model)


# ----------------------------------------------------------------------------------------------- sce


def test_sce_by_hand():
    base = torch.zeros(4)
    t1, t2 = T(1.0, -2.0, 3.0, 0.0), T(-3.0, 1.0, 1.0, 0.0)
    # η ∝ mean square: 14/4, 11/4 → 0.56, 0.44. Elected sign of τ1 + τ2 = (−2, −1, 4, 0): −, −, +, + (0 elects +).
    # Agreeing: e0 τ2, e1 τ1, e2 both, e3 none (zeros never agree) → −3, −2, 0.56·3 + 0.44·1, 0
    c = ctx()
    out = run("sce", base, [t1, t2], c=c)
    torch.testing.assert_close(out, T(-3.0, -2.0, 0.56 * 3 + 0.44 * 1, 0.0))
    assert c.info["sce_weights"] == [0.56, 0.44]
    # a zero sum elects +: only the positive entry stays
    torch.testing.assert_close(run("sce", torch.zeros(1), [T(2.0), T(-2.0)]), T(2.0))


def test_sce_small_task_vectors_get_equal_weights():
    # Σ mean(τ²) < 1e-6 (mergekit's absolute floor): η = 1/2 each, whatever the magnitudes
    base = torch.zeros(4)
    t1, t2 = 1e-4 * T(1.0, -2.0, 3.0, 0.0), 1e-4 * T(-3.0, 1.0, 1.0, 0.0)
    torch.testing.assert_close(run("sce", base, [t1, t2]), 1e-4 * T(-3.0, -2.0, 2.0, 0.0))


def test_sce_select_topk_keeps_the_highest_variance_entries():
    base = torch.zeros(5)
    t1, t2 = T(1.0, 1.0, 4.0, 0.0, 2.0), T(1.0, -1.0, 0.0, 0.0, 1.0)
    # variance over the two: 0, 1, 4, 0, 0.25 → 3 non-zero, select_topk 0.7 → k = 2: entries 1 and 2
    out = run("sce", base, [t1, t2], select_topk=0.7)
    # kept τ: (0, 1, 4, 0, 0), (0, −1, 0, 0, 0); η ∝ 17/5, 1/5 → 17/18, 1/18; sum (0, 0, 4, 0, 0) elects +
    torch.testing.assert_close(out, T(0.0, 1.0, 4.0, 0.0, 0.0))
    torch.testing.assert_close(run("sce", base, [t1, t2], select_topk=0.0), base)


# ----------------------------------------------------------------------------------- ram, ramplus_tl


def test_ram_averages_shared_entries_and_keeps_unique_ones():
    base = T(1.0, 1.0, 1.0, 1.0)
    t1, t2 = T(1.0, 0.0, 2.0, 5e-6), T(3.0, 0.0, 0.0, -5e-6)  # |τ| ≤ ε = 1e-5 counts as unchanged
    out = run("ram", base, [base + t1, base + t2])
    torch.testing.assert_close(out, base + T(2.0, 0.0, 2.0, 0.0))
    torch.testing.assert_close(run("ram", base, [base + t1, base + t2], epsilon=0.0), base + T(2.0, 0, 2.0, 0))


def test_ramplus_tl_scales_unique_entries_by_the_overlap_ratio():
    base = torch.zeros(4)
    t1, t2 = T(1.0, 0.0, 2.0, 0.0), T(3.0, 0.0, 0.0, 0.0)
    # model 1: 1 shared, 1 unique → ρ = 1; model 2: 1 shared, 0 unique → ρ = 1/ε, capped
    c = ctx()
    out = run("ramplus_tl", base, [t1, t2], c=c)  # λ = 1 + 0.1 · min(ρ, 0.2) = 1.02
    torch.testing.assert_close(out, T(2.0, 0.0, 2.04, 0.0))
    assert c.info["ramplus_lambda"] == [1.02, 1.02]
    out = run("ramplus_tl", base, [t1, t2], r=1.0, alpha=2.0)  # λ_1 = 1 + min(1, 2) = 2
    torch.testing.assert_close(out, T(2.0, 0.0, 4.0, 0.0))
    # r = 0: plain RAM
    torch.testing.assert_close(run("ramplus_tl", base, [t1, t2], r=0.0), run("ram", base, [t1, t2]))


def test_ramplus_tl_a_model_that_changes_nothing_is_not_nan():
    base = torch.zeros(3)
    out = run("ramplus_tl", base, [T(1.0, 0, 0), torch.zeros(3)], epsilon=0.0)
    torch.testing.assert_close(out, T(1.0, 0, 0))


# --------------------------------------------------------------------------- from mergekit's YAML


def mk(text):
    return from_mergekit(yaml.safe_load(text), "recipe")


@pytest.mark.parametrize("method,params", [
    ("nuslerp", {"flatten": True, "row_wise": False}),
    ("multislerp", {"normalize": True, "eps": 1e-8}),
    ("sce", {"select_topk": 1.0}),
    ("ram", {"epsilon": 1e-5}),
    ("ramplus_tl", {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}),
])
def test_mergekit_defaults_are_written_out(method, params):
    r = mk(f"merge_method: {method}\nbase_model: b\nmodels:\n - {{model: b}}\n"
           " - {model: x, parameters: {weight: 1}}\n - {model: y, parameters: {weight: 2}}")
    assert r["method"] == method and r["parameters"] == params and r["base"] == "b"
    names = [m["path"] for m in r["models"]]
    assert names == ["x", "y"]  # the base is the base, not a model
    parse_recipe(r)


def test_nuslerp_and_multislerp_take_a_base_only_when_given():
    r = mk("merge_method: nuslerp\nmodels:\n - {model: x, parameters: {weight: 0.3}}\n"
           " - {model: y, parameters: {weight: 0.7}}\nparameters: {nuslerp_flatten: false, nuslerp_row_wise: true}")
    assert "base" not in r and r["skeleton"] == "x"
    assert r["models"] == [{"path": "x", "weight": 0.3}, {"path": "y", "weight": 0.7}]
    assert r["parameters"] == {"flatten": False, "row_wise": True}
    r = mk("merge_method: multislerp\nbase_model: b\nmodels:\n - {model: x, parameters: {weight: 1}}\n"
           "parameters: {normalize_weights: false, eps: 1e-6}")
    assert r["base"] == "b" and r["models"] == [{"path": "x", "weight": 1.0}]
    assert r["parameters"] == {"normalize": False, "eps": 1e-6}
    with pytest.raises(OmnimergeError, match=r"needs `weight` for every model"):
        mk("merge_method: multislerp\nmodels: [{model: x}, {model: y}]")


def test_karcher_counts_the_base_as_a_point_and_ignores_weights(caplog):
    with caplog.at_level(logging.WARNING, logger="omnimerge.mergekit"):
        r = mk("merge_method: karcher\nbase_model: b\nmodels:\n - {model: x, parameters: {weight: 3}}\n"
               " - {model: y}\nparameters: {max_iter: 20}")
    assert "base" not in r and r["skeleton"] == "b"
    assert r["models"] == [{"path": "x"}, {"path": "y"}, {"path": "b"}]  # mergekit adds the base as an input
    assert r["parameters"] == {"max_iter": 20, "tol": 1e-5}
    assert "mergekit's `karcher` has no parameter 'weight'; ignored" in caplog.text
    parse_recipe(r)


def test_single_model_methods_and_required_t():
    r = mk("merge_method: nearswap\nbase_model: b\nmodels: [{model: b}, {model: x}]\nparameters: {t: 0.001}")
    assert r["method"] == "nearswap" and r["parameters"] == {"t": 0.001} and r["models"] == [{"path": "x"}]
    r = mk("merge_method: arcee_fusion\nbase_model: b\nmodels: [{model: x}]")
    assert r["parameters"] == {} and r["base"] == "b"
    with pytest.raises(OmnimergeError, match=r"exactly 1 model\(s\) besides base_model, got 2"):
        mk("merge_method: arcee_fusion\nbase_model: b\nmodels: [{model: x}, {model: y}]")


# ------------------------------------------------------------------------- end to end, per family


def weights(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def test_spherical_family_from_a_mergekit_yaml_end_to_end(zoo, tmp_path):
    """multislerp with a base, from mergekit's YAML: every tensor is mergekit's tangent-space recipe (computed
    here in float64), and transformers loads and runs the output."""
    base, experts = zoo.base("qwen2_vl"), zoo.experts("qwen2_vl", 3)
    w = [0.5, 0.3, 0.2]
    cfg = tmp_path / "multislerp.yml"
    cfg.write_text("merge_method: multislerp\nbase_model: " + str(base) + "\nmodels:\n"
                   + "".join(f"  - model: {e}\n    parameters: {{weight: {wi}}}\n" for e, wi in zip(experts, w))
                   + "dtype: float32\n")
    out = tmp_path / "out"
    res = omnimerge.merge(cfg, out)
    assert res.plan.recipe.method == "multislerp"
    got, b, es = weights(out), weights(base), [weights(e) for e in experts]
    assert set(got) == set(b)
    n_moved = 0
    for key, t in got.items():
        taus = [e[key].double() - b[key].double() for e in es]
        if all(float(x.norm()) == 0 for x in taus):  # untouched by the experts (vision, embeddings)
            torch.testing.assert_close(t, b[key], rtol=0, atol=0)
            continue
        want = b[key].double() + _multislerp_tangent_space(taus, w).reshape(t.shape)
        torch.testing.assert_close(t.double(), want, rtol=1e-5, atol=1e-6, msg=key)
        n_moved += 1
    assert n_moved > 10
    check = verify(out)
    assert check.ok, check.checks


def _sparse_copy(base, expert, out, seed, keep):
    """``expert`` with each entry of its task vector kept with probability ``keep`` (the rest: the base's)."""
    import shutil

    shutil.copytree(expert, out)
    g = torch.Generator().manual_seed(seed)
    b = weights(base)
    for f in sorted(out.glob("*.safetensors")):
        ts = load_file(str(f))
        for k in sorted(ts):
            ts[k] = torch.where(torch.rand(ts[k].shape, generator=g) < keep, ts[k], b[k]).contiguous()
        save_file(ts, str(f), metadata={"format": "pt"})
    return out


def test_selective_family_ram_end_to_end(zoo, tmp_path):
    """ramplus_tl on sparse experts (an omnimerge recipe): each language tensor is checked against the
    definition computed here, and transformers loads and runs the output."""
    base = zoo.base("qwen2_vl")
    experts = [_sparse_copy(base, e, tmp_path / f"sparse{i}", seed=i, keep=0.4)
               for i, e in enumerate(zoo.experts("qwen2_vl", 3))]
    out = tmp_path / "out"
    omnimerge.merge({"method": "ramplus_tl", "base": str(base), "parameters": {"r": 0.5, "alpha": 0.4},
                     "models": [{"path": str(e)} for e in experts]}, out)
    got, b, es = weights(out), weights(base), [weights(e) for e in experts]
    n_lang = 0
    for key, t in got.items():
        if not key.startswith("model.layers."):
            assert torch.equal(t, b[key]), key  # omnimerge's default: only the language backbone is merged
            continue
        taus = torch.stack([e[key] - b[key] for e in es])
        changed = taus.abs() > 1e-5
        count = changed.sum(0)
        shared = (changed & (count > 1)).flatten(1).sum(1).double()
        unique = (changed & (count == 1)).flatten(1).sum(1).double()
        lam = 1 + 0.5 * (shared / unique.clamp(min=1e-5)).clamp(0, 0.4)
        want = b[key].clone()
        for i in range(3):
            uniq = changed[i] & (count == 1)
            both = changed[i] & (count > 1)
            want += torch.where(uniq, taus[i] * lam[i].float(), 0) + torch.where(both, taus[i] / count.clamp(min=1), 0)
        torch.testing.assert_close(t, want, rtol=1e-6, atol=1e-7, msg=key)
        n_lang += 1
    assert n_lang > 10
    check = verify(out)
    assert check.ok, check.checks
