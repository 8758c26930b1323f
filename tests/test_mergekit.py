"""mergekit compatibility: slerp, model_stock, breadcrumbs, della pinned to hand-computed values; mergekit's
weighting conventions in the shared methods; the translation of mergekit YAML field by field; an end-to-end
merge from a mergekit YAML on tiny Qwen2-VL experts that transformers loads and runs; and (only where a
mergekit venv is given in OMNIMERGE_MERGEKIT_VENV) parity with mergekit itself."""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import omnimerge
from omnimerge.errors import OmnimergeError
from omnimerge.mergekit_yaml import filter_regex, from_mergekit
from omnimerge.methods import MethodContext, get_method
from omnimerge.methods.gta import dare_uniforms, della_keep_probabilities
from omnimerge.plan import build_plan, resolve_params
from omnimerge.recipe import load_recipe, parse_recipe, pick
from omnimerge.verify import verify

KEY = "language.layers.0.mlp.up_proj.weight"


def ctx(seed=0):
    return MethodContext(key=KEY, generator=torch.Generator().manual_seed(seed))


def run(name, base, models, seed=0, c=None, **params):
    return get_method(name)(base, models, c or ctx(seed), **params)


def T(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


# ------------------------------------------------------------------------------------------ slerp


def test_slerp_endpoints_are_the_inputs():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    torch.testing.assert_close(run("slerp", a, [b], t=0.0), a, rtol=0, atol=1e-6)
    torch.testing.assert_close(run("slerp", a, [b], t=1.0), b, rtol=0, atol=1e-6)


def test_slerp_orthogonal_unit_vectors_follow_the_arc():
    a, b = T(1.0, 0.0), T(0.0, 1.0)
    half = run("slerp", a, [b], t=0.5)
    torch.testing.assert_close(half, T(math.sqrt(0.5), math.sqrt(0.5)))  # 45°, norm 1
    third = run("slerp", a, [b], t=1 / 3)
    torch.testing.assert_close(third, T(math.cos(math.pi / 6), math.sin(math.pi / 6)))  # 30°


def test_slerp_uses_the_unnormalised_vectors():
    # θ = 90° from the normalised vectors; the coefficients sin(45°) multiply the original a and b
    c = ctx()
    out = run("slerp", T(2.0, 0.0), [T(0.0, 3.0)], c=c, t=0.5)
    torch.testing.assert_close(out, T(2 * math.sqrt(0.5), 3 * math.sqrt(0.5)))
    assert c.info["slerp_angle_deg"] == pytest.approx(90.0)


def test_slerp_colinear_and_antipodal_fall_back_to_lerp():
    a = T(1.0, 2.0, -1.0)
    c = ctx()
    torch.testing.assert_close(run("slerp", a, [2.5 * a], c=c, t=0.3), 0.7 * a + 0.3 * 2.5 * a)
    assert c.info["slerp_angle_deg"] is None
    torch.testing.assert_close(run("slerp", a, [-a], t=0.25), 0.75 * a - 0.25 * a)


def test_slerp_threshold_at_cos_09995():
    # cos θ just above 0.9995 → lerp; just below → slerp (which differs from lerp in norm)
    def pair(cos):
        return T(1.0, 0.0), T(cos, math.sqrt(1 - cos * cos))

    a, b = pair(0.9996)
    torch.testing.assert_close(run("slerp", a, [b], t=0.5), 0.5 * a + 0.5 * b)
    a, b = pair(0.99)
    out = run("slerp", a, [b], t=0.5)
    assert out.norm().item() == pytest.approx(1.0, abs=1e-6)  # on the unit circle
    assert (0.5 * a + 0.5 * b).norm().item() < 0.9976


def test_slerp_zero_base_counts_as_orthogonal():
    # a zero vector is not normalised: cos θ = 0, θ = 90°, result = sin(tπ/2)·b (mergekit's rule)
    b = T(3.0, -4.0)
    torch.testing.assert_close(run("slerp", torch.zeros(2), [b], t=0.5), math.sin(math.pi / 4) * b)


def test_slerp_matrix_is_the_flattened_computation_and_keeps_dtype():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    out = run("slerp", a, [b], t=0.3)
    flat = run("slerp", a.flatten(), [b.flatten()], t=0.3)
    assert out.dtype == torch.float64 and out.shape == a.shape
    torch.testing.assert_close(out.flatten(), flat)
    x, y = a.flatten() / a.norm(), b.flatten() / b.norm()
    th = torch.acos((x * y).sum())
    want = torch.sin(0.7 * th) / torch.sin(th) * a + torch.sin(0.3 * th) / torch.sin(th) * b
    torch.testing.assert_close(out, want)


# ------------------------------------------------------------------------------------ model stock


def test_model_stock_ratio_for_known_cosine():
    base = T(1.0, 1.0)
    taus = [T(1.0, 0.0), T(0.5, math.sqrt(3) / 2)]  # cos = 0.5, k = 2 → t = 2·0.5 / (1 + 0.5) = 2/3
    c = ctx()
    out = run("model_stock", base, [base + t for t in taus], c=c)
    torch.testing.assert_close(out, base + (2 / 3) * (taus[0] + taus[1]) / 2)
    assert c.info["model_stock_t"] == pytest.approx(2 / 3, abs=1e-6)


def test_model_stock_three_models_mean_pairwise_cosine():
    base = torch.zeros(3)
    taus = [T(1.0, 0.0, 0.0), T(0.0, 2.0, 0.0), T(1.0, 1.0, 0.0)]  # cosines 0, 1/√2, 1/√2
    cos = (0 + 2 / math.sqrt(2)) / 3
    t = 3 * cos / (1 + 2 * cos)
    out = run("model_stock", base, taus)
    torch.testing.assert_close(out, t * sum(taus) / 3)


def test_model_stock_orthogonal_gives_base_identical_gives_average_opposite_gives_base():
    base = T(1.0, -1.0, 2.0)
    torch.testing.assert_close(run("model_stock", base, [base + T(1.0, 0, 0), base + T(0, 1.0, 0)]), base)
    m = [base + T(0.5, 0.5, 0.5), base + T(1.0, 1.0, 1.0)]  # cos = 1 → t = 1
    torch.testing.assert_close(run("model_stock", base, m), (m[0] + m[1]) / 2)
    # cos = −1, k = 2: 1 + (k−1)cos = 0 → t = 0 (the base), not a division by zero
    torch.testing.assert_close(run("model_stock", base, [base + T(1.0, 2, 3), base - T(1.0, 2, 3)]), base)


def test_model_stock_filter_wise_ratio_per_row():
    base = torch.zeros(2, 2)
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [0.5, math.sqrt(3) / 2]])  # row cosines 0 and 0.5
    out = run("model_stock", base, [a, b], filter_wise=True)
    want = torch.stack([0 * (a[0] + b[0]) / 2, (2 / 3) * (a[1] + b[1]) / 2])
    torch.testing.assert_close(out, want)
    whole = run("model_stock", base, [a, b])  # one ratio: cos over the flattened tensors
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    torch.testing.assert_close(whole, (2 * cos / (1 + cos)) * (a + b) / 2)


# ------------------------------------------------------------------------------------ breadcrumbs

TAU = T(0.1, -5.0, 0.3, 2.0, -0.05, 0.7, -1.0, 0.2, 3.0, 0.4)


def test_breadcrumbs_mask_by_hand():
    # n = 10, density 0.5, gamma 0.2: drop the 2 largest (|−5|, 3), keep the next 5, drop the 3 smallest
    out = run("breadcrumbs", torch.zeros(10), [TAU], density=0.5, gamma=0.2)
    torch.testing.assert_close(out, T(0, 0, 0.3, 2.0, 0, 0.7, -1.0, 0, 0, 0.4))


def test_breadcrumbs_outlier_cut_shrinks_when_density_plus_gamma_exceed_one():
    # density 0.9 keeps 9; gamma 0.2 would drop 2 → only the largest (|−5|) goes
    out = run("breadcrumbs", torch.zeros(10), [TAU], density=0.9, gamma=0.2)
    torch.testing.assert_close(out, torch.where(TAU.abs() == 5.0, 0.0, TAU))
    # density 1 keeps everything, outliers included
    torch.testing.assert_close(run("breadcrumbs", torch.zeros(10), [TAU], density=1.0, gamma=0.2), TAU)


def test_breadcrumbs_rescale_weights_normalize_lambda():
    base = torch.ones(10)
    masked = T(0, 0, 0.3, 2.0, 0, 0.7, -1.0, 0, 0, 0.4)
    l1 = masked * (TAU.abs().sum() / masked.abs().sum())
    out = run("breadcrumbs", base, [base + TAU], density=0.5, gamma=0.2, rescale="l1")
    torch.testing.assert_close(out, base + l1)
    assert (out - base).abs().sum().item() == pytest.approx(TAU.abs().sum().item(), rel=1e-6)
    two = run("breadcrumbs", base, [base + TAU, base + 2 * TAU], density=0.5, gamma=0.2, weight=[0.5, 0.25],
              normalize=True, **{"lambda": 2.0})
    # Σ w τ̂ / Σ w = (0.5·m + 0.25·2m) / 0.75 = (4/3)·m; × λ = 2
    torch.testing.assert_close(two, base + 2 * (4 / 3) * masked)


def test_breadcrumbs_ties_elects_signs():
    base = torch.zeros(4)
    t1, t2 = T(1.0, -2.0, 3.0, 0.5), T(-3.0, 1.0, 1.0, 0.5)
    # density 1: no masking. Σ τ = [−2, −1, 4, 1] → signs −, −, +, +; agreeing: t2[0], t1[1], both, both
    out = run("breadcrumbs_ties", base, [t1, t2], density=1.0, gamma=0.0)
    torch.testing.assert_close(out, T(-3.0, -2.0, 4.0, 1.0))  # normalize false (mergekit): the sum
    out = run("breadcrumbs_ties", base, [t1, t2], density=1.0, gamma=0.0, normalize=True)
    torch.testing.assert_close(out, T(-3.0, -2.0, 2.0, 0.5))  # the disjoint mean


# ------------------------------------------------------------------------------------------ della


def test_della_keep_probabilities_by_rank():
    tau = T(0.1, -0.4, 0.3, 0.2, -0.5)  # magnitude ranks 0, 3, 2, 1, 4 → density − ε + 2ε·rank/4
    torch.testing.assert_close(della_keep_probabilities(tau, 0.5, 0.1), T(0.4, 0.55, 0.5, 0.45, 0.6))
    rows = torch.stack([tau, -tau.flip(0)])  # ranked within each row
    p = della_keep_probabilities(rows, 0.5, 0.1)
    torch.testing.assert_close(p[1], T(0.4, 0.55, 0.5, 0.45, 0.6).flip(0))


def test_della_masks_are_the_element_keyed_draws_and_rescaled():
    """The draws are DARE's, keyed by (the tensor's seed, the model, the element): dare_uniforms."""
    tau = T(0.1, -0.4, 0.3, 0.2, -0.5, 0.05, 0.6, -0.25)
    probs = della_keep_probabilities(tau, 0.5, 0.2)
    keep = dare_uniforms(8, 4, 0) < probs
    kept = torch.where(keep, tau, 0.0)
    out = run("della_linear", torch.zeros(8), [tau], seed=4, density=0.5, epsilon=0.2, rescale="none")
    torch.testing.assert_close(out, kept)
    inv = run("della_linear", torch.zeros(8), [tau], seed=4, density=0.5, epsilon=0.2, rescale="inverse")
    torch.testing.assert_close(inv, kept / probs)
    l1 = run("della_linear", torch.zeros(8), [tau], seed=4, density=0.5, epsilon=0.2)  # rescale l1 (mergekit)
    torch.testing.assert_close(l1, kept * tau.abs().sum() / kept.abs().sum())


def test_della_inverse_rescale_is_unbiased():
    tau = T(0.1, -0.4, 0.3, 0.2, -0.5)
    n = 3000
    mean = sum(run("della_linear", torch.zeros(5), [tau], seed=s, density=0.5, epsilon=0.1, rescale="inverse")
               for s in range(n)) / n
    torch.testing.assert_close(mean, tau, rtol=0, atol=0.04)  # ≥ 4 standard errors


def test_della_keep_rate_rises_with_magnitude():
    g = torch.Generator().manual_seed(5)
    tau = torch.randn(64, 512, generator=g)
    out = run("della_linear", torch.zeros_like(tau), [tau], seed=1, density=0.6, epsilon=0.2, rescale="none")
    kept = out != 0
    assert kept.float().mean().item() == pytest.approx(0.6, abs=0.01)
    order = tau.abs().argsort(dim=1)
    small = kept.gather(1, order[:, :50]).float().mean().item()  # keep probability ≈ 0.4
    large = kept.gather(1, order[:, -50:]).float().mean().item()  # ≈ 0.8
    assert small == pytest.approx(0.41, abs=0.03) and large == pytest.approx(0.79, abs=0.03)


def test_della_with_density_one_is_ties_without_trimming():
    g = torch.Generator().manual_seed(6)
    base = torch.randn(5, 4, generator=g)
    ms = [base + torch.randn(5, 4, generator=g) for _ in range(3)]
    w = [0.2, 0.5, 0.3]
    torch.testing.assert_close(run("della", base, ms, density=1.0, weight=w),
                               run("ties", base, ms, density=1.0, weight=w))
    torch.testing.assert_close(run("della_linear", base, ms, density=1.0, weight=w),
                               run("task_arithmetic", base, ms, weight=w))


def test_della_density_epsilon_outside_unit_interval_is_refused():
    with pytest.raises(OmnimergeError, match=r"density ± epsilon must lie inside \(0, 1\)"):
        run("della", torch.zeros(4), [torch.ones(4)], density=0.9, epsilon=0.2)


# ------------------------------------------------------------- mergekit's conventions, shared methods


def test_task_arithmetic_normalize_divides_by_weight_sum():
    base, models = T(1.0, 2.0), [T(2.0, 2.0), T(1.0, 4.0)]  # τ = [1, 0], [0, 2]
    out = run("task_arithmetic", base, models, weight=[1.0, 3.0], normalize=True, **{"lambda": 2.0})
    torch.testing.assert_close(out, base + 2.0 * T(1.0, 6.0) / 4.0)
    # |Σ w| < 1e-8: no division (mergekit's guard)
    torch.testing.assert_close(run("task_arithmetic", base, models, weight=[1.0, -1.0], normalize=True),
                               base + T(1.0, -2.0))


def test_average_without_normalize_is_the_weighted_sum():
    torch.testing.assert_close(run("average", None, [T(1.0, 2.0), T(3.0, 6.0)], weight=[1.0, 0.5], normalize=False),
                               T(2.5, 5.0))


def test_ties_unnormalized_and_l1_rescale():
    base = torch.zeros(4)
    t1, t2 = T(1.0, -2.0, 3.0, 0.5), T(-3.0, 1.0, 1.0, 0.5)
    out = run("ties", base, [t1, t2], density=1.0, weight=[1.0, 2.0], normalize=False)
    # Σ w τ = [−5, 0, 5, 1.5]; sign 0 elects nothing (mergekit would elect +: see docs/mergekit.md)
    torch.testing.assert_close(out, T(-6.0, 0.0, 5.0, 1.5))
    # density 0.5 keeps 2 of 4; rescale l1 restores each trimmed τ's L1 norm
    out = run("ties", base, [t1], density=0.5, rescale="l1")
    torch.testing.assert_close(out, T(0.0, -2.0, 3.0, 0.0) * (6.5 / 5.0))


def test_dare_rescale_options_and_per_model_rates():
    tau = torch.arange(1.0, 9.0)
    from omnimerge.methods.gta import dare_keep_mask

    keep1 = dare_keep_mask((8,), 0.25, 2, 0)  # the tensor's seed 2, model 0
    keep2 = dare_keep_mask((8,), 0.5, 2, 1)
    k1, k2 = torch.where(keep1, tau, 0.0), torch.where(keep2, 2 * tau, 0.0)
    z = torch.zeros(8)
    out = run("dare_linear", z, [tau, 2 * tau], seed=2, p=[0.25, 0.5], rescale="none")
    torch.testing.assert_close(out, k1 + k2)
    out = run("dare_linear", z, [tau, 2 * tau], seed=2, p=[0.25, 0.5])  # inverse (the paper)
    torch.testing.assert_close(out, k1 / 0.75 + k2 / 0.5)
    out = run("dare_linear", z, [tau, 2 * tau], seed=2, p=[0.25, 0.5], rescale="l1", normalize=True,
              weight=[1.0, 3.0])
    l1 = [k1 * tau.abs().sum() / k1.abs().sum(), k2 * (2 * tau).abs().sum() / k2.abs().sum()]
    torch.testing.assert_close(out, (l1[0] + 3 * l1[1]) / 4)


def test_model_counts_are_checked_at_plan_time(zoo):
    base = str(zoo.base("qwen2"))
    e = [str(p) for p in zoo.experts("qwen2", 2)]
    with pytest.raises(OmnimergeError, match=r"'slerp' merges exactly 1 model\(s\) besides the base"):
        build_plan({"method": "slerp", "base": base, "models": [{"path": p} for p in e]})
    with pytest.raises(OmnimergeError, match=r"'model_stock' merges at least 2"):
        build_plan({"method": "model_stock", "base": base, "models": [{"path": e[0]}]})


# ----------------------------------------------------------------------------- translation: fields


def mk(text: str, source="recipe"):
    return from_mergekit(yaml.safe_load(text), source)


def test_dare_ties_translation_field_by_field():
    r = mk("""
models:
  - model: org/base
  - model: org/a
    parameters: {density: 0.53, weight: 0.4}
  - model: org/b
    parameters: {density: 0.25, weight: 0.3}
merge_method: dare_ties
base_model: org/base
parameters: {int8_mask: true}
dtype: bfloat16
""")
    assert r["method"] == "dare_ties" and r["base"] == "org/base" and r["skeleton"] == "org/base"
    assert [m["path"] for m in r["models"]] == ["org/a", "org/b"]  # the base's task vector is skipped
    assert r["models"][0] == {"path": "org/a", "p": pytest.approx(0.47), "weight": 0.4}
    assert r["models"][1]["p"] == 0.75
    # mergekit's defaults for dare_ties, written out: density 1 (p 0), no normalising, L1 rescale
    assert r["parameters"] == {"trim": "per_tensor", "p": 0.0, "lambda": 1.0, "normalize": False, "rescale": "l1"}
    assert r["components"] == {c: "merge" for c in
                               ("language", "embed", "lm_head", "vision", "projector", "audio", "other")}
    assert r["dtype"] == "float32" and r["out_dtype"] == "bfloat16"  # computed in float32, written as dtype
    assert "tokenizer_source" not in r
    parse_recipe(r)


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"lambda": 1.0, "normalize": False}),
    ("ties", {"trim": "per_tensor", "density": 1.0, "lambda": 1.0, "normalize": True, "rescale": "none"}),
    ("dare_linear", {"p": 0.0, "lambda": 1.0, "normalize": False, "rescale": "l1"}),
    ("breadcrumbs", {"density": 1.0, "lambda": 1.0, "normalize": False, "rescale": "none", "gamma": 0.01}),
    ("breadcrumbs_ties", {"density": 1.0, "lambda": 1.0, "normalize": False, "rescale": "none", "gamma": 0.01}),
    ("della", {"density": 1.0, "lambda": 1.0, "normalize": True, "rescale": "l1", "epsilon": 0.15}),
    ("della_linear", {"density": 1.0, "lambda": 1.0, "normalize": False, "rescale": "l1", "epsilon": 0.15}),
])
def test_mergekit_defaults_per_method(method, params):
    r = mk(f"""
merge_method: {method}
base_model: b
models: [{{model: x, parameters: {{weight: 1}}}}]
""")
    assert r["method"] == method and r["parameters"] == params
    assert r["models"] == [{"path": "x", "weight": 1.0}]


def test_linear_is_average_with_base_added_and_normalize():
    r = mk("""
merge_method: linear
base_model: b
models:
  - {model: x, parameters: {weight: 2}}
parameters: {weight: 0.5, normalize: false}
out_dtype: float16
""")
    assert r["method"] == "average" and "base" not in r and r["skeleton"] == "b"
    assert r["models"] == [{"path": "x", "weight": 2.0}, {"path": "b"}]  # mergekit adds the base as an input
    assert r["parameters"] == {"weight": 0.5, "normalize": False}
    assert r["dtype"] == "float32" and r["out_dtype"] == "float16"
    with pytest.raises(OmnimergeError, match=r"base_model \('b'\): mergekit's `linear` needs `weight` for every"):
        mk("merge_method: linear\nbase_model: b\nmodels: [{model: x, parameters: {weight: 1}}]")


def test_linear_ignores_density_with_a_note(caplog):
    with caplog.at_level(logging.WARNING, logger="omnimerge.mergekit"):
        r = mk("merge_method: linear\nmodels:\n - {model: x, parameters: {weight: 1, density: 0.5}}\n"
               " - {model: y, parameters: {weight: 1}}")
    assert r["models"] == [{"path": "x", "weight": 1.0}, {"path": "y", "weight": 1.0}]
    assert "models[0].parameters.density" in caplog.text and "ignored" in caplog.text
    assert r["skeleton"] == "x"


def test_per_model_global_parameter_and_base_parameters_are_noted(caplog):
    with caplog.at_level(logging.WARNING, logger="omnimerge.mergekit"):
        r = mk("merge_method: slerp\nbase_model: a\nmodels:\n - {model: a, parameters: {weight: 1}}\n"
               " - {model: b, parameters: {t: 0.9}}\nparameters: {t: 0.2}")
    assert r["models"] == [{"path": "b"}] and r["parameters"] == {"t": 0.2}
    assert "'t' is a global parameter of mergekit's `slerp`" in caplog.text
    assert "models[0]: the parameters of the base model are ignored" in caplog.text


def test_errors_name_the_file_and_a_lora_first_model_gives_its_base_as_skeleton():
    with pytest.raises(OmnimergeError, match=r"^cfg.yml \(mergekit format\): models\[0\] \('a'\)"):
        from_mergekit({"merge_method": "linear", "models": [{"model": "a"}]}, "cfg.yml")
    r = mk("merge_method: linear\nmodels: [{model: 'org/m+lora', parameters: {weight: 1}}]")
    assert r["skeleton"] == "org/m" and r["models"][0]["lora_base"] == "org/m"


def test_slerp_filters_and_precedence():
    r = mk("""
merge_method: slerp
base_model: a
models: [{model: a}, {model: b}]
parameters:
  t:
    - filter: self_attn
      value: 0.25
    - filter: mlp
      value: 0.75
    - value: 0.5
""")
    assert r["method"] == "slerp" and r["base"] == "a" and [m["path"] for m in r["models"]] == ["b"]
    t = r["parameters"]["t"]
    rec = parse_recipe(r)
    for key, want in [("language.layers.0.self_attn.q_proj.weight", 0.25), ("language.layers.1.mlp.up_proj.weight",
                      0.75), ("language.norm.weight", 0.5), ("embed.weight", 0.5)]:
        assert pick(rec.parameters["t"], key) == want, key
    assert t[-1] == {"filter": None, "value": 0.5}


def test_required_t_and_filter_fallthrough_to_the_default():
    with pytest.raises(OmnimergeError, match="parameters.t: mergekit's `slerp` needs it"):
        mk("merge_method: slerp\nbase_model: a\nmodels: [{model: b}]")
    # a global density list without a catch-all falls through to mergekit's default (1), not ours (0.2)
    r = mk("""
merge_method: ties
base_model: a
models: [{model: b, parameters: {weight: 1, density: [{filter: mlp, value: 0.3}]}}]
parameters: {density: [{filter: self_attn, value: 0.6}]}
""")
    rec = parse_recipe(r)
    method = get_method("ties")
    for key, want in [("language.layers.0.mlp.up_proj.weight", 0.3), ("language.layers.0.self_attn.q_proj.weight",
                      0.6), ("language.norm.weight", 1.0)]:
        assert resolve_params(method, key, rec.models, {}, rec.parameters)["density"] == [want], key


def test_gradient_expands_over_layers(zoo):
    base = zoo.base("qwen2", num_layers=5)
    r = mk(f"""
merge_method: slerp
base_model: {base}
models: [{{model: {base}}}, {{model: other}}]
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - value: [1, 0]
""")
    rec = parse_recipe(r)
    # 5 layers: t_i = i/4; value at t: interpolate the list at t·(n−1)
    sa = [0.0, 0.5, 0.3, 0.7, 1.0]
    for i in range(5):
        assert pick(rec.parameters["t"], f"language.layers.{i}.self_attn.o_proj.weight") == pytest.approx(sa[i])
        assert pick(rec.parameters["t"], f"language.layers.{i}.mlp.up_proj.weight") == pytest.approx(1 - i / 4)
    assert pick(rec.parameters["t"], "embed.weight") == 1.0  # outside the layers: t = 0 → the first value
    assert pick(rec.parameters["t"], "language.norm.weight") == 1.0


def test_gradient_interpolates_between_points(zoo):
    base = zoo.base("qwen2", num_layers=4)
    r = mk(f"merge_method: ties\nbase_model: {base}\nmodels: [{{model: x, parameters: {{weight: [0, 1]}}}}]")
    w = r["models"][0]["weight"]
    rec = parse_recipe(r)
    got = [pick(rec.models[0].parameters["weight"], f"language.layers.{i}.mlp.up_proj.weight") for i in range(4)]
    assert got == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert isinstance(w, list)


@pytest.mark.parametrize("f,matches,misses", [
    ("self_attn", ["language.layers.3.self_attn.q_proj.weight"], ["language.layers.3.mlp.up_proj.weight"]),
    ("layers.1.", ["language.layers.1.mlp.up_proj.weight"], ["language.layers.10.mlp.up_proj.weight", "embed.weight"]),
    ("embed_tokens", ["embed.weight"], ["lm_head.weight", "language.layers.0.mlp.up_proj.weight"]),
    ("norm", ["language.norm.weight", "language.layers.0.input_layernorm.weight"], ["lm_head.weight"]),
    ("model.", ["embed.weight", "language.norm.weight", "language.layers.2.mlp.up_proj.weight"], ["lm_head.weight"]),
    ("lm_head", ["lm_head.weight"], ["embed.weight"]),
])
def test_filters_match_what_mergekit_names_match(f, matches, misses):
    rx = filter_regex(f)
    for k in matches:
        assert re.search(rx, k), (f, k)
    for k in misses:
        assert not re.search(rx, k), (f, k)
    assert filter_regex("*") is None and filter_regex("mlp") == "mlp"


def test_model_stock_lora_reference_tokenizer_source_and_chat_template(caplog):
    with caplog.at_level(logging.WARNING, logger="omnimerge.mergekit"):
        r = mk("""
merge_method: model_stock
base_model: base
models: [{model: base}, {model: x}, {model: "base+adapters/y"}]
parameters: {filter_wise: true}
tokenizer_source: base
chat_template: auto
""")
    assert r["method"] == "model_stock" and r["parameters"] == {"filter_wise": True}
    assert r["models"] == [{"path": "x"}, {"path": "adapters/y", "lora_base": "base", "name": "base+adapters/y"}]
    # mergekit realigns the embeddings to the tokenizer it names: our `tokenizer:` (not a plain file copy)
    assert r["tokenizer"] == {"source": "base", "base": "base"} and "tokenizer_source" not in r
    assert "chat_template" in caplog.text
    parse_recipe(r)


def test_full_range_slice_is_models(zoo):
    base, e1 = zoo.base("qwen2"), zoo.expert("qwen2", 1)
    r = mk(f"""
slices:
  - sources:
      - {{model: {base}, layer_range: [0, 2]}}
      - {{model: {e1}, layer_range: [0, 2], parameters: {{weight: 0.3}}}}
    parameters: {{lambda: 0.5}}
merge_method: task_arithmetic
base_model: {base}
parameters: {{lambda: 2.0, weight: 1.0}}
""")
    assert r["models"] == [{"path": str(e1), "weight": 0.3}]
    assert r["parameters"] == {"weight": 1.0, "lambda": 0.5, "normalize": False}  # the slice's wins


@pytest.mark.parametrize("text,words", [
    ("merge_method: frobnicate\nmodels: [{model: a}]", ["merge_method 'frobnicate' is not supported", "nuslerp"]),
    ("merge_method: nuslerp\nmodels: [{model: a, parameters: {weight: 1}}]", ["exactly 2 model(s)", "got 1"]),
    ("merge_method: nearswap\nbase_model: a\nmodels: [{model: b}]", ["parameters.t", "needs it"]),
    ("merge_method: arcee_fusion\nmodels: [{model: b}]", ["`arcee_fusion` needs `base_model:`"]),
    ("merge_method: karcher\nmodels: [{model: b}]\nparameters: {max_iter: 2.5}", ["expected an integer"]),
    ("merge_method: nusleep\nmodels: [{model: a}]", ["merge_method 'nusleep' is not supported", "slerp"]),
    ("merge_method: linear\nmodels: [{model: a}]\nbogus: 1", ["unknown field(s) bogus"]),
    ("merge_method: linear\nmodels: [{model: a}]\nskeleton: a", ["omnimerge's own fields cannot be mixed"]),
    ("merge_method: linear\nmodules: {text: {}}", ["unknown module(s) text"]),
    ("merge_method: linear\nmodules: {text_decoder: {}}", ["modules.text_decoder: expected {models: [...]}"]),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ntokenizer_source: 'a+b'",
     ["tokenizer_source: 'a+b'"]),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\nchat_template: chatml",
     ["chat_template", "tokenizer_config.json"]),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ntokenizer: {source: base}\n"
     "tokenizer_source: base", ["give `tokenizer_source` or `tokenizer`, not both"]),
    ("merge_method: linear\nmodels: [{model: a}]", ["models[0] ('a')", "needs `weight`"]),
    ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]", ["`ties` needs `base_model:`"]),
    ("merge_method: slerp\nbase_model: a\nmodels: [{model: b}, {model: c}]\nparameters: {t: 0.5}",
     ["exactly 1 model(s) besides base_model, got 2"]),
    ("merge_method: model_stock\nbase_model: a\nmodels: [{model: b}]", ["at least 2"]),
    ("merge_method: ties\nbase_model: a\nmodels: [{model: b, parameters: {weight: 1, desnity: 0.5}}]",
     ["models[0].parameters.desnity: not a parameter of mergekit's `ties`"]),
    ("merge_method: ties\nbase_model: a\nmodels: [{model: b, parameters: {weight: 1}}]\nparameters: {lamda: 2}",
     ["parameters.lamda"]),
    ("merge_method: ties\nbase_model: a\nmodels: [{model: b, parameters: {weight: 1}}]\nparameters: {normalize: 1}",
     ["parameters.normalize: expected true or false"]),
    ("merge_method: dare_ties\nbase_model: a\nmodels: [{model: b, parameters: {weight: 1, density: 1.5}}]",
     ["density (the fraction kept) must be in (0, 1]"]),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}, {model: a, parameters: {weight: 1}}]",
     ["listed more than once"]),
    ("merge_method: ties\nbase_model: a+l\nmodels: [{model: b, parameters: {weight: 1}}]", ["base_model: 'a+l'"]),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ndtype: int8", ["dtype: 'int8'"]),
    ("merge_method: linear\nmodels: [{model: a, extra: 1}]", ["models[0]: unknown field(s) extra"]),
    ("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [0, 2]}, "
     "{model: b, layer_range: [0, 3]}]}]", ["slices[0]: every source of a slice must span the same number"]),
    ("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [2, 2]}]}]",
     ["slices[0].sources[0].layer_range: [2, 2]"]),
    ("merge_method: passthrough\nmodels: [{model: a}]\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}]",
     ["exactly one of `models:`, `slices:` and `modules:`"]),
])
def test_unsupported_fields_are_refused_by_name(text, words):
    with pytest.raises(OmnimergeError) as e:
        mk(text)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


# ------------------------------------------------------------------- end to end: a mergekit YAML file


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def test_mergekit_yaml_merges_tiny_qwen2_vl_end_to_end(zoo, tmp_path):
    base, e1 = zoo.base("qwen2_vl"), zoo.expert("qwen2_vl", 1)
    (tmp_path / "models").mkdir()
    for p in (base, e1):
        (tmp_path / "models" / p.name).symlink_to(p)
    cfg = tmp_path / "slerp.yml"  # relative paths: resolved beside the YAML
    cfg.write_text(f"""
slices:
  - sources:
      - model: models/{base.name}
        layer_range: [0, 2]
      - model: models/{e1.name}
        layer_range: [0, 2]
merge_method: slerp
base_model: models/{base.name}
parameters:
  t:
    - filter: self_attn
      value: [0, 1]
    - filter: mlp
      value: [1, 0]
    - value: 0.5
dtype: float32
out_dtype: bfloat16
""")
    out = tmp_path / "out"
    res = omnimerge.merge(cfg, out)
    assert res.plan.recipe.method == "slerp" and res.plan.skeleton.path == base.resolve()
    got, a, b = weights(out), weights(base), weights(e1)
    assert set(got) == set(a)

    def slerp(x, y, t):
        x, y = x.double().flatten(), y.double().flatten()
        d = (x / max(x.norm(), 1e-8)) @ (y / max(y.norm(), 1e-8))  # a zero vector is not normalised
        if d.abs() > 0.9995:
            return (1 - t) * x + t * y
        th = torch.acos(d)
        return (torch.sin((1 - t) * th) * x + torch.sin(t * th) * y) / torch.sin(th)

    n_layer = 0
    for key, t in got.items():
        assert t.dtype == torch.bfloat16
        m = re.match(r"model\.layers\.(\d)\.", key)
        tt = 0.5
        if m and "self_attn" in key:
            tt, n_layer = float(m.group(1)), n_layer + 1  # gradient [0, 1] over 2 layers: t = 0, 1
        elif m and "mlp" in key:
            tt = 1.0 - float(m.group(1))
        want = slerp(a[key], b[key], tt).reshape(a[key].shape)
        torch.testing.assert_close(t.double(), want, rtol=2 ** -8, atol=1e-7, msg=key)  # bf16 rounding
    assert n_layer > 0
    check = verify(out)
    assert check.ok, check.checks


def test_mergekit_yaml_della_and_ties_through_the_cli(zoo, tmp_path, capsys):
    from omnimerge.cli import main

    base = zoo.base("qwen2_vl")
    experts = zoo.experts("qwen2_vl", 3)
    for method, extra in [("della", "epsilon: 0.1"), ("ties", "")]:
        cfg = tmp_path / f"{method}.yml"
        models = "\n".join(f"  - model: {e}\n    parameters: {{weight: {w}, density: 0.5}}"
                           for e, w in zip(experts, (0.5, 0.3, 0.2)))
        cfg.write_text(f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {base}\n{models}\n"
                       f"parameters:\n  lambda: 0.9\n  {extra}\n")
        out = tmp_path / method
        assert main(["merge", str(cfg), "-o", str(out), "--no-progress"]) == 0
        assert verify(out).ok
        recipe = yaml.safe_load((out / "omnimerge.yaml").read_text())
        assert recipe["method"] == method and recipe["parameters"]["lambda"] == 0.9
        assert len(recipe["models"]) == 3  # the base is the base, not an expert
    got, b = weights(tmp_path / "ties"), weights(base)
    es = [weights(e) for e in experts]
    key = "model.layers.0.mlp.up_proj.weight"
    taus = [e[key] - b[key] for e in es]
    k = int(0.5 * taus[0].numel())
    trimmed = [torch.where(t.abs() >= t.abs().flatten().kthvalue(t.numel() - k + 1).values, t, 0) for t in taus]
    w = [0.5, 0.3, 0.2]
    s = torch.sign(sum(wi * t for wi, t in zip(w, trimmed)))
    agree = [(torch.sign(t) == s) & (t != 0) for t in trimmed]
    num = sum(wi * torch.where(a, t, 0) for wi, a, t in zip(w, agree, trimmed))
    den = sum(wi * a.float() for wi, a in zip(w, agree))
    want = b[key] + 0.9 * torch.where(den > 0, num / den.clamp(min=1e-12), 0)
    torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-6)


def test_load_recipe_reads_a_mergekit_file(tmp_path):
    p = tmp_path / "mk.yml"
    p.write_text("merge_method: task_arithmetic\nbase_model: b\nmodels: [{model: x, parameters: {weight: 0.5}}]\n")
    r = load_recipe(p)
    assert r.method == "task_arithmetic" and r.base == "b" and r.models[0].parameters == {"weight": 0.5}


# ------------------------------------------------------------------- parity with mergekit (optional)


@pytest.mark.skipif(not os.environ.get("OMNIMERGE_MERGEKIT_VENV"),
                    reason="set OMNIMERGE_MERGEKIT_VENV to a venv with mergekit 0.1.5 to compare with mergekit")
def test_parity_with_mergekit(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "mergekit_parity", Path(__file__).parent.parent / "measurements" / "mergekit_parity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.run(tmp_path, Path(os.environ["OMNIMERGE_MERGEKIT_VENV"]))
    for r in rows:
        assert r["ok"], r
