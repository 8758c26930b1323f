"""average, task_arithmetic, ties, dare_linear, dare_ties pinned to their definitions."""

import re

import pytest
import torch

from omnimerge.errors import OmnimergeError
from omnimerge.methods import MethodContext, get_method
from omnimerge.methods.gta import MASK_CHUNK, dare_keep_mask, dare_uniforms, sign_consensus

KEY = "language.layers.0.mlp.up_proj.weight"
NAMES = ["average", "task_arithmetic", "ties", "dare_linear", "dare_ties"]


def ctx(seed=0):
    return MethodContext(key=KEY, generator=torch.Generator().manual_seed(seed))


def run(name, base, models, seed=0, **params):
    return get_method(name)(base, models, ctx(seed), **params)


def T(*values):
    return torch.tensor(values, dtype=torch.float32)


# Three task vectors of length 4 for TIES (density 0.5 → k = 2 entries each).
TIES_BASE = T(1.0, -1.0, 0.5, 2.0)
TIES_TAUS = [T(3.0, -1.0, 2.0, 0.5), T(1.0, 4.0, -6.0, 0.1), T(2.0, -3.0, 0.5, -0.2)]
TIES_MODELS = [TIES_BASE + t for t in TIES_TAUS]


# ------------------------------------------------------------------------------------ average


def test_average_weighted_by_hand():
    out = run("average", None, [T(1.0, 2.0), T(3.0, 6.0)], weight=[1.0, 3.0])
    # (1·1 + 3·3)/4 = 2.5, (1·2 + 3·6)/4 = 5
    torch.testing.assert_close(out, T(2.5, 5.0))


def test_average_of_identical_models_is_that_model():
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(run("average", None, [x, x.clone(), x.clone()]), x)


def test_average_scalar_weight_and_ignores_base():
    out = run("average", T(100.0, 100.0), [T(0.0, 2.0), T(2.0, 4.0)], weight=2.0)
    torch.testing.assert_close(out, T(1.0, 3.0))


def test_average_all_zero_weights_raise():
    with pytest.raises(OmnimergeError, match="all weights are 0"):
        run("average", None, [T(1.0), T(2.0)], weight=[0.0, 0.0])


# ------------------------------------------------------------------------------ task arithmetic


def test_task_arithmetic_by_hand():
    base = T(1.0, 2.0)
    models = [T(2.0, 2.0), T(1.0, 4.0)]  # τ = [1, 0], [0, 2]
    out = run("task_arithmetic", base, models, weight=[1.0, -0.5], **{"lambda": 2.0})
    # base + 2·([1, 0] − 0.5·[0, 2]) = [1, 2] + [2, −2]
    torch.testing.assert_close(out, T(3.0, 0.0))


def test_task_arithmetic_default_is_base_plus_sum_of_deltas():
    base = T(1.0, 1.0, 1.0)
    out = run("task_arithmetic", base, [T(2.0, 1.0, 0.0), T(1.0, 3.0, 1.0)])
    torch.testing.assert_close(out, T(2.0, 3.0, 0.0))


def test_task_arithmetic_lambda_zero_returns_base():
    g = torch.Generator().manual_seed(2)
    base, a, b = (torch.randn(4, 6, generator=g) for _ in range(3))
    torch.testing.assert_close(run("task_arithmetic", base, [a, b], **{"lambda": 0.0}), base)


def test_unknown_keyword_is_rejected():
    with pytest.raises(TypeError, match="alpha"):
        run("task_arithmetic", T(0.0), [T(1.0)], alpha=1.0)


# ------------------------------------------------------------------------------------------ ties


def test_ties_by_hand():
    # trimmed (top 2 by magnitude):  τ1 → [3, 0, 2, 0]   τ2 → [0, 4, −6, 0]   τ3 → [2, −3, 0, 0]
    # Σ trimmed = [5, 1, −4, 0]  → elected signs [+, +, −, 0]
    # disjoint mean: [(3+2)/2, 4 (τ3's −3 disagrees), −6 (τ1's 2 disagrees), 0 (no sign)]
    merged = T(2.5, 4.0, -6.0, 0.0)
    out = run("ties", TIES_BASE, TIES_MODELS, density=0.5)
    torch.testing.assert_close(out, TIES_BASE + merged)
    out = run("ties", TIES_BASE, TIES_MODELS, density=0.5, **{"lambda": 0.5})
    torch.testing.assert_close(out, TIES_BASE + 0.5 * merged)


def test_ties_weighted_by_hand():
    # weights [1, 2, 3]: w·trimmed = [3, 0, 2, 0], [0, 8, −12, 0], [6, −9, 0, 0]
    # Σ = [9, −1, −10, 0] → signs [+, −, −, 0]
    # entry 0: (3 + 6)/(1 + 3) = 2.25; entry 1: only τ3 agrees: −9/3 = −3;
    # entry 2: only τ2 agrees: −12/2 = −6; entry 3: 0
    out = run("ties", TIES_BASE, TIES_MODELS, density=0.5, weight=[1.0, 2.0, 3.0])
    torch.testing.assert_close(out, TIES_BASE + T(2.25, -3.0, -6.0, 0.0))


def test_ties_per_model_density_by_hand():
    # densities [0.25, 0.5, 1] → k = 1, 2, 4:
    # τ1 → [3, 0, 0, 0]   τ2 → [0, 4, −6, 0]   τ3 → [2, −3, 0.5, −0.2]
    # Σ = [5, 1, −5.5, −0.2] → signs [+, +, −, −]
    # means: [(3+2)/2, 4, −6, −0.2]
    out = run("ties", TIES_BASE, TIES_MODELS, density=[0.25, 0.5, 1.0])
    torch.testing.assert_close(out, TIES_BASE + T(2.5, 4.0, -6.0, -0.2))


def test_ties_keeps_exactly_k_entries_even_with_ties():
    out = run("ties", torch.zeros(10), [torch.ones(10)], density=0.5, trim="per_tensor")
    assert int((out != 0).sum()) == 5
    assert torch.all((out == 0) | (out == 1))
    # the global trim keeps every entry that reaches the threshold (as the paper's code: |τ| >= kth value)
    out = run("ties", torch.zeros(10), [torch.ones(10)], density=0.5, trim="global")
    torch.testing.assert_close(out, torch.ones(10))
    for trim in ("per_tensor", "global"):
        out = run("ties", torch.zeros(4), [torch.ones(4)], density=0.2, trim=trim)  # k = int(0.8) = 0 → keeps none
        torch.testing.assert_close(out, torch.zeros(4))


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.3, 0.0, 1e-30], [0.0, 0.0, 0.0], [1.0, -1.0, 0.5],
                                     [1e-45, 2.0, 0.7]])
def test_sign_consensus_bits_match_the_masked_fill_definition(weights):
    """The disjoint mean divides by 1 where no model agrees; its fast form (a clamp at the smallest positive
    weight, weights >= 0) gives the bits of the plain definition, zeros of either sign included."""
    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(4096, generator=g) * (torch.rand(4096, generator=g) > 0.3) for _ in range(3)]
    deltas[0][:64] = -0.0  # signed zeros
    elected = torch.zeros(4096)
    for d, w in zip(deltas, weights):
        elected.add_(d, alpha=w)
    elected = elected.sign()
    num, den = torch.zeros(4096), torch.zeros(4096)
    for d, w in zip(deltas, weights):  # the same operations in the same order, counting with a boolean mask
        agree = (d * elected).clamp_min(0)
        den.add_(agree > 0, alpha=w)
        num.add_(agree * elected, alpha=w)
    expect = num / den.masked_fill(den == 0, 1)
    got = sign_consensus([d.clone() for d in deltas], weights)
    assert torch.equal(got, expect) and torch.equal(got.signbit(), expect.signbit())


def test_ties_density_one_same_signs_is_mean_of_deltas():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 5, generator=g)
    taus = [torch.rand(6, 5, generator=g) + 0.1 for _ in range(3)]
    out = run("ties", base, [base + t for t in taus], density=1.0)
    torch.testing.assert_close(out, base + sum(taus) / 3)


def test_ties_3d_is_the_flattened_computation():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(2, 3, 4, generator=g)
    models = [torch.randn(2, 3, 4, generator=g) for _ in range(3)]
    out = run("ties", base, models, density=0.3)
    flat = run("ties", base.flatten(), [m.flatten() for m in models], density=0.3)
    assert out.shape == (2, 3, 4)
    torch.testing.assert_close(out.flatten(), flat)


# ------------------------------------------------------------------------------------------ dare


def test_dare_linear_p0_equals_task_arithmetic():
    g = torch.Generator().manual_seed(5)
    base, a, b = (torch.randn(8, 3, generator=g) for _ in range(3))
    params = dict(weight=[0.7, -0.3], **{"lambda": 1.5})
    torch.testing.assert_close(
        run("dare_linear", base, [a, b], p=0.0, **params), run("task_arithmetic", base, [a, b], **params)
    )


def test_dare_masks_are_keyed_by_seed_model_and_element():
    base = torch.zeros(3, 4)
    taus = [torch.full((3, 4), 2.0), torch.full((3, 4), -1.0)]
    keep = [dare_keep_mask((3, 4), 0.25, 7, i) for i in range(2)]  # the tensor's seed 7, model 0 and model 1
    expected = sum(torch.where(k, t / 0.75, 0.0) for k, t in zip(keep, taus))
    torch.testing.assert_close(run("dare_linear", base, taus, seed=7, p=0.25), expected)


def test_dare_draws_do_not_depend_on_the_slice_asked_for():
    n = 2 * MASK_CHUNK + 1000  # three chunks
    whole = dare_uniforms(n, 5, 1)
    assert whole.shape == (n,) and 0 <= float(whole.min()) and float(whole.max()) < 1
    for start, stop in [(0, 10), (MASK_CHUNK - 3, MASK_CHUNK + 5), (10, 2 * MASK_CHUNK + 7), (n - 1, n)]:
        assert torch.equal(dare_uniforms(stop - start, 5, 1, start), whole[start:stop])
    assert not torch.equal(dare_uniforms(100, 5, 2), whole[:100])  # another model: other draws
    assert not torch.equal(dare_uniforms(100, 6, 1), whole[:100])  # another tensor seed: other draws


@pytest.mark.parametrize("name,params", [("dare_linear", {"p": 0.4}), ("dare_ties", {"p": 0.3, "density": 1.0})])
def test_dare_on_a_row_block_is_the_block_of_the_whole_merge(name, params):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(40, 30, generator=g)
    models = [base + torch.randn(40, 30, generator=g) for _ in range(3)]
    whole = run(name, base, models, seed=4, **params)
    for start, stop in [(0, 7), (7, 25), (25, 40)]:
        c = MethodContext(key=KEY, generator=torch.Generator().manual_seed(4), offset=start * 30)
        part = get_method(name)(base[start:stop], [m[start:stop] for m in models], c, **params)
        assert torch.equal(part, whole[start:stop])


def test_dare_mask_rate_and_expectation_on_large_tensor():
    n, p = 200_000, 0.3
    out = run("dare_linear", torch.zeros(n), [torch.ones(n)], p=p)
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
    assert abs(out.mean().item() - 1.0) < 0.015  # E[mask · τ / (1−p)] = τ


def test_dare_masks_are_independent_across_models():
    x = torch.ones(1000)
    a = run("dare_linear", torch.zeros(1000), [x, x], weight=[1.0, 0.0])
    b = run("dare_linear", torch.zeros(1000), [x, x], weight=[0.0, 1.0])
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_same_seed_same_result_other_seed_differs(name):
    g = torch.Generator().manual_seed(6)
    base = torch.randn(16, 16, generator=g)
    models = [base + torch.randn(16, 16, generator=g).abs() for _ in range(2)]
    first = run(name, base, models, seed=11)
    assert torch.equal(first, run(name, base, models, seed=11))
    assert not torch.equal(first, run(name, base, models, seed=12))


def test_dare_ties_p0_equals_ties():
    for density in (1.0, 0.5):
        a = run("dare_ties", TIES_BASE, TIES_MODELS, p=0.0, density=density, weight=[1.0, 2.0, 3.0])
        b = run("ties", TIES_BASE, TIES_MODELS, density=density, weight=[1.0, 2.0, 3.0])
        torch.testing.assert_close(a, b)


def test_dare_ties_is_ties_on_dropped_deltas():
    base = torch.zeros(4)
    taus = TIES_TAUS
    dropped = [torch.where(dare_keep_mask((4,), 0.5, 9, i), t / 0.5, 0.0) for i, t in enumerate(taus)]
    expected = run("ties", base, dropped, density=1.0)
    torch.testing.assert_close(run("dare_ties", base, taus, seed=9, p=0.5), expected)


# ------------------------------------------------------------------------------- shapes & dtypes


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(7,), (4, 5), (2, 3, 4)])
def test_shapes_preserved(name, shape):
    g = torch.Generator().manual_seed(8)
    base = torch.randn(shape, generator=g)
    models = [torch.randn(shape, generator=g) for _ in range(3)]
    out = run(name, base, models)
    assert out.shape == torch.Size(shape) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_computes_in_given_dtype(name):
    base = torch.zeros(4, 4, dtype=torch.float64)
    models = [torch.ones(4, 4, dtype=torch.float64), torch.full((4, 4), 2.0, dtype=torch.float64)]
    assert run(name, base, models).dtype == torch.float64


def test_wrong_number_of_per_model_values_raises():
    with pytest.raises(OmnimergeError, match="3 values for 2 models"):
        run("task_arithmetic", T(0.0), [T(1.0), T(2.0)], weight=[1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------- registry & params


def test_registrations():
    expect_base = {"average": False, "task_arithmetic": True, "ties": True, "dare_linear": True, "dare_ties": True}
    arxiv = {"average": "2203.05482", "task_arithmetic": "2212.04089", "ties": "2306.01708",
             "dare_linear": "2311.03099", "dare_ties": "2311.03099"}
    for name in NAMES:
        m = get_method(name)
        assert m.needs_base is expect_base[name]
        assert arxiv[name] in m.reference and m.summary
        assert m.param("weight").per_model
    for name in NAMES[1:]:
        assert get_method(name).param("lambda").default == 1.0
    assert get_method("ties").param("density").default == 0.2
    assert get_method("ties").param("density").per_model
    assert get_method("dare_ties").param("density").default == 1.0
    assert get_method("dare_linear").param("p").default == 0.2  # MLLMerging's DEFAULT_HPARAMS
    assert "baseline_merging.py" in get_method("dare_linear").reference
    assert get_method("ties").param("trim").default == "global" and "model_merging.py" in get_method("ties").reference
    assert get_method("dare_ties").param("trim").default == "global"
    assert get_method("dare_linear").param("p").per_model  # mergekit sets DARE rates per model


def test_param_validation():
    density = get_method("ties").param("density")
    with pytest.raises(OmnimergeError, match=re.escape("(0, 1]")):
        density.validate(1.5, "recipe")
    with pytest.raises(OmnimergeError, match="recipe"):
        density.validate(0.0, "recipe")
    assert density.validate(1, "recipe") == 1.0
    with pytest.raises(OmnimergeError, match=re.escape("[0, 1)")):
        get_method("dare_linear").param("p").validate(1.0, "recipe")
    with pytest.raises(OmnimergeError, match=">= 0"):
        get_method("average").param("weight").validate(-1.0, "recipe")
    assert get_method("task_arithmetic").param("weight").validate(-1.0, "recipe") == -1.0


def test_unknown_method_and_param_raise():
    with pytest.raises(OmnimergeError, match="unknown method 'nope'"):
        get_method("nope")
    with pytest.raises(OmnimergeError, match="no parameter 'alpha'"):
        get_method("ties").param("alpha")
