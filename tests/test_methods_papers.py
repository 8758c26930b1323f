"""PCB-Merging, Localize-and-Stitch (dataless), WIDEN and LoRA-LEGO pinned to their definitions on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from omnimerge.errors import OmnimergeError
from omnimerge.methods import InputFacts, MethodContext, get_method
from omnimerge.methods.localize_stitch import REDUCTION
from omnimerge.methods.pcb import REDUCTION as PCB_REDUCTION, StreamedOrderStatistic
from omnimerge.methods.lora_lego import resolve_lora_lego, units

KEY = "language.layers.0.mlp.up_proj.weight"


def ctx(seed=0, key=KEY):
    return MethodContext(key=key, generator=torch.Generator().manual_seed(seed))


def run(name, base, models, seed=0, key=KEY, **params):
    return get_method(name)(base, models, ctx(seed, key), **params)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ PCB
def pcb_reference(taus: torch.Tensor, ratio: float, clip: float) -> torch.Tensor:
    """The authors' PCB_merge written out with sorts, as their code does (N × d task vectors)."""
    n, d = taus.shape

    def clamp_rows(x, lo_ratio, hi_ratio):
        s = torch.sort(x, dim=1).values
        return torch.clamp(x, s[:, int(d * lo_ratio)].unsqueeze(1), s[:, int(d * (1 - hi_ratio) - 1)].unsqueeze(1))

    def norm_rows(x):
        lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
        return (x - lo) / (hi - lo)

    mags = clamp_rows(taus.abs(), clip, clip)
    clipped = torch.sign(taus) * mags
    score = torch.exp(n * norm_rows(mags) ** 2) * torch.tanh(taus * taus.sum(dim=0))
    scale = norm_rows(clamp_rows(score, 1 - ratio, 0))
    return (clipped * scale).sum(dim=0) / torch.clamp(scale.sum(dim=0), min=1e-12)


@pytest.mark.parametrize("n,ratio,clip", [(2, 0.1, 1e-4), (3, 0.3, 0.05), (5, 0.5, 0.0)])
def test_pcb_is_the_authors_pcb_merge(n, ratio, clip):
    base = randn(20, 30, seed=1)
    taus = [randn(20, 30, seed=10 + i) for i in range(n)]
    out = run("pcb", base, [base + t for t in taus], density=ratio, clip=clip)
    want = base + 1.2 * pcb_reference(torch.stack([t.reshape(-1) for t in taus]), ratio, clip).reshape(20, 30)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-12)


def test_pcb_on_a_tensor_large_enough_for_the_selection_band():
    base = randn(600, 500, seed=32)  # 300,000 entries: quantiles by the sampled band, not kthvalue
    taus = [randn(600, 500, seed=320 + i) for i in range(2)]
    out = run("pcb", base, [base + t for t in taus], scope="per_tensor")
    want = base + 1.2 * pcb_reference(torch.stack([t.reshape(-1) for t in taus]), 0.1, 1e-4).reshape(600, 500)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-12)


def test_pcb_global_scope_spans_every_tensor():
    """Two tensors merged with the pre-pass's bounds equal the authors' PCB_merge on their concatenation."""
    b1, b2 = randn(8, 6, seed=30).float(), randn(40, seed=31).float()
    t1 = [randn(8, 6, seed=300 + i).float() * (1 + i) for i in range(3)]
    t2 = [randn(40, seed=310 + i).float() * 0.3 for i in range(3)]
    params = {"density": 0.2, "clip": 0.05, "scope": "global", "weight": 1.0, "lambda": 1.2}
    acc = PCB_REDUCTION.start(params)
    passes = 0
    while not acc.done:
        for b, ts in ((b1, t1), (b2, t2)):
            acc.feed(b, [b + t for t in ts], ctx(), params)
        acc.next_pass()
        passes += 1
    assert passes == 4  # float32: two 16-bit digits for the clip bounds, two for the floor
    method = get_method("pcb")
    c1, c2 = ctx(), ctx()
    c1.reduction = c2.reduction = acc.result()
    o1 = method(b1, [b1 + t for t in t1], c1, **params)
    o2 = method(b2, [b2 + t for t in t2], c2, **params)
    whole = torch.stack([torch.cat([x.reshape(-1), y]) for x, y in zip(t1, t2)]).double()
    want = torch.cat([b1.reshape(-1), b2]).double() + 1.2 * pcb_reference(whole, 0.2, 0.05)
    torch.testing.assert_close(torch.cat([o1.reshape(-1), o2]).double(), want, rtol=1e-5, atol=1e-6)
    # per tensor differs: each tensor keeps its own top 20 %
    per = method(b1, [b1 + t for t in t1], ctx(), **{**params, "scope": "per_tensor"})
    assert not torch.allclose(per, o1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_streamed_order_statistic_is_exact_for_signed_values(dtype):
    chunks = [torch.randn(300, generator=torch.Generator().manual_seed(i)).to(dtype) * 10 ** (i - 2)
              for i in range(4)]
    chunks.append(torch.tensor([0.0, -0.0, 0.0], dtype=dtype))
    values = torch.cat(chunks).double().sort().values
    for pos in (0, 1, 17, 600, 601, 1202):
        sel = StreamedOrderStatistic(lambda n, p=pos: p)
        while not sel.done:
            for c in chunks:
                sel.feed(c)
            sel.next_pass()
        assert sel.value == float(values[pos]), pos


def test_pcb_keeps_the_stated_fraction_of_each_task_vector():
    base = randn(10, 10, seed=2)
    taus = [randn(10, 10, seed=20 + i) for i in range(3)]
    c = ctx()
    get_method("pcb")(base, [base + t for t in taus], c, density=0.2, clip=0.0)
    # the reference clamps at the ⌊d(1 − ρ)⌋-th smallest score, which itself scores 0: d − 80 − 1 kept of 100
    assert c.info["kept"] == pytest.approx(19 / 100)


def test_pcb_one_model_no_drop_is_its_scaled_task_vector():
    base = randn(4, 5, seed=3)
    tau = randn(4, 5, seed=4)
    tau[0, 0] = 0.0  # the one entry whose balanced score is the row's minimum (dropped): it is 0 anyway
    out = run("pcb", base, [base + tau], density=1.0, clip=0.0, **{"lambda": 0.7})
    torch.testing.assert_close(out, base + 0.7 * tau, rtol=1e-12, atol=1e-12)


def test_pcb_clip_clamps_each_task_vectors_outliers():
    base = torch.zeros(100, dtype=torch.float64)
    tau = torch.linspace(0.01, 1.0, 100, dtype=torch.float64)
    tau[0] = 0.0
    out = run("pcb", base, [tau], density=1.0, clip=0.05, **{"lambda": 1.0})
    # magnitudes clamped to [5th, 94th] smallest (0-based) values
    torch.testing.assert_close(out[1:], tau[1:].clamp(float(tau[5]), float(tau[94])))


def test_pcb_zero_task_vector_does_not_dilute_the_others():
    base = randn(6, 6, seed=5)
    tau = randn(6, 6, seed=6)
    tau[0, 0] = 0.0
    out = run("pcb", base, [base + tau, base.clone()], density=1.0, clip=0.0, **{"lambda": 1.0})
    torch.testing.assert_close(out, base + tau, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(out).all()


def test_pcb_no_overflow_with_many_models():
    base = torch.zeros(50)
    models = [torch.randn(50, generator=torch.Generator().manual_seed(i)) * 1e-3 for i in range(100)]
    assert torch.isfinite(run("pcb", base, models)).all()  # exp(N·1) would overflow float32 at N = 100


# -------------------------------------------------------------------------------- Localize-and-Stitch
def test_localize_stitch_masks_have_the_stated_density():
    base = randn(40, 25, seed=7)
    models = [base + randn(40, 25, seed=70 + i) for i in range(3)]
    for scope in ("global", "per_tensor"):
        c = ctx()
        get_method("localize_stitch")(base, models, c, density=[0.1, 0.2, 0.05], scope=scope)
        assert c.info["density"] == [0.1, 0.2, 0.05]


def test_localize_stitch_by_hand():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    t1 = torch.tensor([4.0, 3.0, 0.1, 0.2])   # top 2: entries 0, 1
    t2 = torch.tensor([2.0, -0.1, 5.0, 0.3])  # top 2: entries 0, 2
    out = run("localize_stitch", base, [base + t1, base + t2], density=0.5)
    # entry 0: both masks -> mean (4 + 2)/2; entry 1: t1 only; entry 2: t2 only; entry 3: none
    torch.testing.assert_close(out, torch.tensor([1.0 + 3.0, 1.0 + 3.0, 1.0 + 5.0, 1.0]))


def test_localize_stitch_global_threshold_spans_every_tensor():
    """Two tensors merged with the pre-pass's thresholds equal one merge of their concatenation."""
    b1, b2 = randn(8, 6, seed=8), randn(30, seed=9)
    t1 = [randn(8, 6, seed=80 + i) * (1 + i) for i in range(2)]
    t2 = [randn(30, seed=90 + i) * 3 for i in range(2)]
    params = {"density": [0.1, 0.3], "scope": "global", "lambda": 1.0}
    acc = REDUCTION.start(params)
    while not acc.done:
        for b, ts in ((b1, t1), (b2, t2)):
            acc.feed(b, [b + t for t in ts], ctx(), params)
        acc.next_pass()
    thresholds = acc.result()
    method = get_method("localize_stitch")
    c1, c2 = ctx(), ctx()
    c1.reduction = c2.reduction = thresholds
    o1 = method(b1, [b1 + t for t in t1], c1, **params)
    o2 = method(b2, [b2 + t for t in t2], c2, **params)
    bc = torch.cat([b1.reshape(-1), b2])
    whole = method(bc, [bc + torch.cat([x.reshape(-1), y]) for x, y in zip(t1, t2)], ctx(), **params)
    torch.testing.assert_close(torch.cat([o1.reshape(-1), o2]), whole)


def test_localize_stitch_full_density_is_the_mean_task_vector():
    base = randn(5, 5, seed=10)
    taus = [randn(5, 5, seed=100 + i) for i in range(3)]
    out = run("localize_stitch", base, [base + t for t in taus], density=1.0)
    torch.testing.assert_close(out, base + sum(taus) / 3)


# ---------------------------------------------------------------------------------------------- WIDEN
def widen_by_hand(base, models, t=1.0, c=1.0):
    """The definition written out with loops over columns (2-D)."""
    n = base.shape[1]

    def significance(diffs):  # per model: rank / n (ascending, ties by position)
        out = []
        for row in diffs:
            order = sorted(range(n), key=lambda j: (float(row[j]), j))
            rank = [0.0] * n
            for pos, j in enumerate(order):
                rank[j] = pos / n
            out.append(rank)
        return torch.tensor(out, dtype=base.dtype)

    def scores(sig):
        soft = torch.softmax(sig, dim=0)
        mean = sig.mean(dim=1, keepdim=True)
        return torch.where(sig > mean * t, torch.full_like(soft, c), soft)

    dm, dd = [], []
    for m in models:
        dm.append([abs(float(m[:, j].norm() - base[:, j].norm())) for j in range(n)])
        cos = [float(m[:, j] @ base[:, j] / (m[:, j].norm() * base[:, j].norm())) for j in range(n)]
        dd.append([1.0 - x for x in cos])
    w = 0.5 * (scores(significance(dm)) + scores(significance(dd)))
    return base + sum(w[i][None, :] * (m - base) for i, m in enumerate(models))


@pytest.mark.parametrize("t,c", [(1.0, 1.0), (0.5, 0.8), (1.5, 2.0)])
def test_widen_is_its_definition(t, c):
    base = randn(6, 7, seed=11)
    models = [base + 0.3 * randn(6, 7, seed=110 + i) for i in range(3)]
    out = run("widen", base, models, above_average=t, calibration=c)
    torch.testing.assert_close(out, widen_by_hand(base, models, t, c))


def test_widen_identical_inputs_return_the_input():
    base = randn(5, 4, seed=12)
    torch.testing.assert_close(run("widen", base, [base.clone(), base.clone()]), base)
    v = randn(9, seed=13)
    torch.testing.assert_close(run("widen", v, [v.clone()]), v)


def test_widen_one_model_is_that_model():
    base = randn(5, 8, seed=14)
    model = base + randn(5, 8, seed=15)
    torch.testing.assert_close(run("widen", base, [model]), model)


def test_widen_embedding_columns_are_tokens():
    base = randn(10, 4, seed=16)  # vocab 10 × hidden 4
    models = [base + randn(10, 4, seed=160 + i) for i in range(2)]
    out = run("widen", base, models, key="embed.weight")
    want = run("widen", base.T, [m.T for m in models]).T
    torch.testing.assert_close(out, want)


def test_widen_vectors_by_hand():
    base = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
    t1 = torch.tensor([1.0, 0.1, 0.2], dtype=torch.float64)
    t2 = torch.tensor([0.5, 0.4, -0.1], dtype=torch.float64)
    out = run("widen", base, [t1, t2])
    sig = torch.stack([t1.abs(), t2.abs()])
    w = torch.softmax(sig, dim=0)
    w = torch.where(sig > sig.mean(dim=1, keepdim=True), torch.ones_like(w), w)
    torch.testing.assert_close(out, w[0] * t1 + w[1] * t2)
    # entry 0 is above its model's mean in both: both task vectors count whole
    assert float(out[0]) == pytest.approx(1.5)


# ------------------------------------------------------------------------------------------- LoRA-LEGO
def lora(m, n, r, seed):
    return randn(m, r, seed=seed) @ randn(r, n, seed=seed + 1)


def test_lora_lego_reproduces_a_single_lora():
    base = randn(12, 9, seed=17)
    delta = lora(12, 9, 3, seed=18)
    c = ctx()
    out = get_method("lora_lego")(base, [base + delta], c)
    torch.testing.assert_close(out, base + delta, rtol=1e-9, atol=1e-9)
    assert c.info == {"rank": 3, "units": 3}


def test_lora_lego_of_identical_loras_is_that_lora():
    base = randn(12, 9, seed=19)
    delta = lora(12, 9, 2, seed=20)
    out = run("lora_lego", base, [base + delta, base + delta, base + delta])
    torch.testing.assert_close(out, base + delta, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_lora_lego_output_rank_is_at_most_k(k):
    base = randn(16, 11, seed=21)
    models = [base + lora(16, 11, 3, seed=30 + 2 * i) for i in range(3)]
    c = ctx()
    out = get_method("lora_lego")(base, models, c, rank=k)
    assert torch.linalg.matrix_rank(out - base) <= k
    assert c.info == {"rank": k, "units": 9}


def test_lora_lego_with_k_above_the_units_is_the_concatenation():
    """Every unit its own cluster: the merged LoRA concatenates the LoRAs, its update is their sum
    (concatenation-summation equivalence), scaled by √(r̄/k') when the output is reweighted."""
    base = randn(10, 8, seed=22)
    deltas = [lora(10, 8, 2, seed=40), lora(10, 8, 3, seed=42)]
    models = [base + d for d in deltas]
    out = run("lora_lego", base, models, rank=10, reweight_output=False)
    torch.testing.assert_close(out, base + deltas[0] + deltas[1], rtol=1e-9, atol=1e-9)
    out = run("lora_lego", base, models, rank=10)
    torch.testing.assert_close(out, base + math.sqrt(2.5 / 5) * (deltas[0] + deltas[1]), rtol=1e-9, atol=1e-9)


def test_lora_lego_parameter_reweighting_keeps_the_mean_unit_norm():
    """One LoRA of rank 2 into k = 1: the centroid of its two units, rescaled to their mean norm."""
    base = torch.zeros(6, 5, dtype=torch.float64)
    delta = lora(6, 5, 2, seed=50)
    us = units(delta, "auto")
    assert us.shape == (2, 11)
    torch.testing.assert_close(us[:, 5:].T @ us[:, :5], delta)  # the units rebuild the update
    c = us.mean(dim=0)
    c = c * us.norm(dim=1).mean() / c.norm()
    want = math.sqrt(2 / 1) * torch.outer(c[5:], c[:5])
    torch.testing.assert_close(run("lora_lego", base, [delta], rank=1), want)
    plain = us.mean(dim=0)
    torch.testing.assert_close(run("lora_lego", base, [delta], rank=1, reweight_parameters=False,
                                   reweight_output=False), torch.outer(plain[5:], plain[:5]))


def test_lora_lego_units_have_a_sign_convention():
    delta = lora(7, 6, 2, seed=52)
    a = units(delta, "auto")
    b = units(-(-delta), "auto")
    torch.testing.assert_close(a, b)
    lead = a[:, :6].abs().argmax(dim=1)
    assert (a[torch.arange(2), lead] > 0).all()


def test_lora_lego_is_deterministic_and_vectors_take_the_mean():
    base = randn(20, 14, seed=23)
    models = [base + lora(20, 14, 4, seed=60 + 2 * i) for i in range(3)]
    a = run("lora_lego", base, models, seed=5)
    torch.testing.assert_close(a, run("lora_lego", base, models, seed=5), rtol=0, atol=0)
    v = randn(7, seed=24)
    vs = [v + randn(7, seed=240 + i) for i in range(2)]
    torch.testing.assert_close(run("lora_lego", v, vs), v + (vs[0] - v + vs[1] - v) / 2)


def test_lora_lego_refuses_full_fine_tunes_without_a_unit_rank():
    with pytest.raises(OmnimergeError, match="unit_rank"):
        resolve_lora_lego({"unit_rank": "auto"}, InputFacts(lora_experts=False))
    assert resolve_lora_lego({"unit_rank": "auto"}, InputFacts(lora_experts=True)) == {"unit_rank": "auto"}
    assert resolve_lora_lego({"unit_rank": 8}, InputFacts(lora_experts=False)) == {"unit_rank": 8}


def test_lora_lego_full_fine_tune_route_cuts_each_task_vector():
    base = randn(9, 9, seed=25)
    tau = randn(9, 9, seed=26)
    out = run("lora_lego", base, [base + tau], unit_rank=2)
    u, s, vh = torch.linalg.svd(tau)
    torch.testing.assert_close(out, base + (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("r", [5, 40])
def test_lora_lego_units_of_a_large_lora_come_from_a_sketch_and_match_the_svd(r):
    delta = lora(300, 260, r, seed=70)
    from omnimerge.methods.lora_lego import low_rank_svd

    found = low_rank_svd(delta, torch.Generator().manual_seed(0))
    assert found is not None and found[1].shape == (r,)
    u, s, vh = torch.linalg.svd(delta)
    torch.testing.assert_close(found[1], s[:r])
    us = units(delta, "auto", torch.Generator().manual_seed(0))
    a = vh[:r] * s[:r, None].sqrt()
    sign = torch.sign(a[torch.arange(r), a.abs().argmax(dim=1)])[:, None]
    want = torch.cat([a * sign, (u[:, :r] * s[:r].sqrt()).T * sign], dim=1)
    torch.testing.assert_close(us, want, rtol=1e-8, atol=1e-10)


def test_lora_lego_units_of_a_full_rank_update_fall_back_to_the_spectrum():
    from omnimerge.methods.lora_lego import low_rank_svd

    delta = randn(300, 260, seed=71)
    assert low_rank_svd(delta, torch.Generator().manual_seed(0)) is None
    assert units(delta, "auto").shape == (260, 560)
    assert units(delta, 7).shape == (7, 560)
