"""Entry-selective merges, as mergekit 0.1.5 defines them: ``arcee_fusion``, ``nearswap``, ``sce``, ``ram``
and ``ramplus_tl``.

Each decides, entry by entry, how much of each task vector τ_i = θ_i − θ_base reaches the result:

* ``arcee_fusion``: keep the entries of one model whose importance (|τ| times the row's KL divergence) is
  an outlier (≥ median + 1.5 IQR); the others stay the base's.
* ``nearswap``: move each entry of the base towards the model by at most t (all the way where they are
  closer than t).
* ``sce``: select the entries where the task vectors vary most, weight each task vector by its mean
  square, erase the entries whose sign disagrees with the elected one, and take the weighted mean.
* ``ram``, ``ramplus_tl``: entries changed by one model only keep that change (RAM+ scales it up by the
  model's share of shared entries); entries changed by several are averaged.

The defaults are mergekit 0.1.5's (the file and line of each are in the method's ``defaults_from``).
All five act entry by entry or row by row on tensors of any shape, so none needs a fallback.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import MethodContext, Param, register
from .selection import kth_largest, top_k_mask

MK = "mergekit 0.1.5, mergekit/merge_methods/"

# -------------------------------------------------------------------------------------- arcee_fusion
_KL_EPS = 1e-8  # added to both softmax distributions (arcee_fusion.py, line 50)


def fusion_importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ − θ_b| times KL(softmax(θ) ‖ softmax(θ_b)) of the entry's row (the last dimension; a 1-D tensor
    is one row), each distribution + 1e-8 (arcee_fusion.py, lines 47-54)."""
    if model.ndim == 0:
        model, base = model.reshape(1), base.reshape(1)
    p = F.softmax(model, dim=-1) + _KL_EPS
    q = F.softmax(base, dim=-1) + _KL_EPS
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (model - base).abs() * kl


def order_statistic(values: torch.Tensor, q: float) -> torch.Tensor:
    """The entry at position ⌊q·(n − 1)⌋ of ``values`` sorted ascending (no interpolation), exactly."""
    n = values.numel()
    index = int(q * (n - 1))
    return kth_largest(values, n - index)


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """median + 1.5 · (Q3 − Q1) of the importance scores (arcee_fusion.py, lines 36-40)."""
    q1, median, q3 = (order_statistic(importance, q) for q in (0.25, 0.5, 0.75))
    return median + 1.5 * (q3 - q1)


@register(
    "arcee_fusion", params=(), needs_base=True, min_models=1, max_models=1,
    reference="Arcee Fusion (Arcee AI, https://arcee.ai; mergekit/merge_methods/arcee_fusion.py)",
    summary="Take the model's entries whose importance |τ|·KL(row) is an outlier (≥ median + 1.5 IQR); keep the "
    "base elsewhere.",
    defaults_from=MK + "arcee_fusion.py (no parameters)",
)
def arcee_fusion(base, models, ctx: MethodContext):
    """θ_b + τ ⊙ [importance ≥ median + 1.5·(Q3 − Q1)], importance = |τ| · KL(softmax(θ) ‖ softmax(θ_b)) per
    row. The quartiles are the sorted scores at ⌊q(n−1)⌋, as mergekit takes them; mergekit estimates them
    from 10⁶ entries drawn with replacement when a tensor has more (arcee_fusion.py, lines 21-29),
    omnimerge takes them exactly from every entry (the same below 10⁶ entries)."""
    model = models[0]
    importance = fusion_importance(model, base).reshape(model.shape)
    threshold = fusion_threshold(importance)
    keep = importance >= threshold
    ctx.info["arcee_fusion_kept"] = round(float(keep.float().mean()), 6)
    return base + (model - base) * keep


# ------------------------------------------------------------------------------------------ nearswap
_NEARSWAP_FLOOR = 1e-6  # |θ − θ_b| is clamped at this before dividing (nearswap.py, line 31)


@register(
    "nearswap",
    params=(Param("t", float, 1e-4, "distance within which an entry takes the model's value; farther entries move "
                  "towards it by t (mergekit requires it; the default is the reference model's "
                  "QuartetAnemoi-70B-t0.0001)", minimum=0.0),),
    needs_base=True, min_models=1, max_models=1,
    reference="NearSwap (alchemonaut, https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001; "
    "mergekit/merge_methods/nearswap.py)",
    summary="Interpolate each entry from the base to the model by w = clamp(t / |θ − θ_b|, 0, 1): entries closer "
    "than t are swapped, the others move by t.",
    defaults_from=MK + "nearswap.py, line 26 (t required, no default); omnimerge's 1e-4 is the t of the method's "
    "reference model (alchemonaut/QuartetAnemoi-70B-t0.0001)",
)
def nearswap(base, models, ctx: MethodContext, t):
    """w = clamp(t / max(|θ − θ_b|, 1e-6), 0, 1); result = w·θ + (1 − w)·θ_b."""
    model = models[0]
    w = (t / (model - base).abs().clamp(min=_NEARSWAP_FLOOR)).clamp(0, 1)
    return w * model + (1 - w) * base


# ----------------------------------------------------------------------------------------------- sce
_SCE_WEIGHT_FLOOR = 1e-6  # Σ_i mean(τ_i²) below this: equal weights (sce.py, lines 51-54)
_SCE_DEN_FLOOR = 1e-6  # the per-entry sum of agreeing weights is clamped at this (sce.py, line 45)


def sce_select(taus: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask of the entries with the largest variance over the task vectors (population variance): the top
    k = ⌊fraction · #(variance ≠ 0)⌋ (sce.py, lines 58-76; ties at the k-th variance by position)."""
    if fraction >= 1:
        return torch.ones_like(taus[0], dtype=torch.bool)
    if fraction <= 0:
        return torch.zeros_like(taus[0], dtype=torch.bool)
    var = taus.var(dim=0, unbiased=False)
    k = int(int(var.count_nonzero()) * fraction)
    return top_k_mask(var, k)


def sce_weights(taus: torch.Tensor) -> torch.Tensor:
    """η_i = mean(τ_i²) / Σ_j mean(τ_j²); equal weights when that sum is below 1e-6 (sce.py, lines 50-55)."""
    ms = taus.square().reshape(taus.shape[0], -1).mean(dim=1)
    total = float(ms.sum())
    if abs(total) < _SCE_WEIGHT_FLOOR:
        return torch.full_like(ms, 1.0 / ms.numel())
    return ms / total


def elected_sign_agreement(taus: torch.Tensor) -> torch.Tensor:
    """Mask of the entries whose sign is the elected one, sign(Σ_i τ_i) with a zero sum electing + (mergekit's
    get_mask with method sum, generalized_task_arithmetic.py, lines 148-172); zero entries never agree."""
    elected = torch.where(taus.sum(dim=0) >= 0, 1.0, -1.0).to(taus.dtype)
    return taus.sign() == elected


@register(
    "sce",
    params=(Param("select_topk", float, 1.0, "fraction of the entries kept: those where the task vectors' variance "
                  "is largest (1: all)", minimum=0.0, maximum=1.0),),
    needs_base=True, min_models=1,
    reference="FuseChat: Knowledge Fusion of Chat Models (Wan et al., 2024), arXiv:2408.07990, SCE (select, "
    "calculate, erase) as mergekit implements it (mergekit/merge_methods/sce.py)",
    summary="Select the entries where the task vectors vary most, weight each task vector by its mean square, "
    "erase sign conflicts, take the weighted mean of the agreeing entries.",
    defaults_from=MK + "sce.py, line 24 (select_topk 1.0)",
)
def sce(base, models, ctx: MethodContext, select_topk):
    """τ̂_i = τ_i ⊙ S (S: the top ``select_topk`` entries by variance over i); η_i = mean(τ̂_i²)/Σ_j mean(τ̂_j²)
    (equal if that sum < 1e-6); a_i = [sign τ̂_i = sign(Σ_j τ̂_j)], a zero sum electing +;
    θ_b + Σ_i η_i a_i τ̂_i / max(Σ_i η_i a_i, 1e-6), per entry.

    Note mergekit's absolute floor: with rms(τ) below about 1e-3 (Σ mean(τ²) < 1e-6, common for
    fine-tunes of large models) the weights are equal, not by magnitude; omnimerge keeps that rule."""
    taus = torch.stack([m - base for m in models])
    if select_topk < 1:
        taus.mul_(sce_select(taus, select_topk))
    agree = elected_sign_agreement(taus)
    eta = sce_weights(taus).view(-1, *([1] * base.ndim))
    w = eta * agree
    merged = (taus * w).sum(dim=0) / w.sum(dim=0).clamp(min=_SCE_DEN_FLOOR)
    ctx.info["sce_weights"] = [round(float(e), 6) for e in eta.reshape(-1)]
    return base + merged


# ------------------------------------------------------------------------------------ ram, ramplus_tl
RAM_REF = ("Behavior Knowledge Merge in Reinforced Agentic Models (Yuan et al., 2026), arXiv:2601.13572, as "
           "mergekit implements it (mergekit/merge_methods/ram.py)")
RAM_EPSILON = Param("epsilon", float, 1e-5, "an entry counts as changed by a model where |τ_i| > epsilon",
                    minimum=0.0)


def ram_masks(taus: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(changed, count): changed[i] = |τ_i| > ε; count = how many models change each entry (ram.py, lines
    161-186)."""
    changed = taus.abs() > epsilon
    return changed, changed.sum(dim=0)


def ram_combine(taus: torch.Tensor, changed: torch.Tensor, count: torch.Tensor,
                unique_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i τ_i·[changed_i] · (s_i where count = 1; 1/count where count > 1): unique changes kept (scaled by
    s_i), shared ones averaged over the models that change them."""
    kept = taus * changed
    shared = kept * (count > 1) / count.clamp(min=1)
    unique = kept * (count == 1)
    if unique_scale is not None:
        unique = unique * unique_scale.view(-1, *([1] * (taus.ndim - 1)))
    return (unique + shared).sum(dim=0)


@register(
    "ram", params=(RAM_EPSILON,), needs_base=True, min_models=1, reference=RAM_REF,
    summary="Reinforced Agent Merging: an entry changed by one model keeps that change; entries changed by "
    "several take the mean of their changes.",
    defaults_from=MK + "ram.py, line 98 (epsilon 1e-5)",
)
def ram(base, models, ctx: MethodContext, epsilon):
    """θ_b + Σ_i τ_i [|τ_i| > ε] / c, c = #{j : |τ_j| > ε} for each entry (τ_i itself where c = 1)."""
    taus = torch.stack([m - base for m in models])
    changed, count = ram_masks(taus, epsilon)
    return base + ram_combine(taus, changed, count)


@register(
    "ramplus_tl",
    params=(
        Param("r", float, 0.1, "strength of the rescaling of each model's unique entries"),
        Param("alpha", float, 0.2, "cap on the overlap ratio ρ_i in λ_i = 1 + r · clamp(ρ_i, 0, alpha)"),
        RAM_EPSILON,
    ),
    needs_base=True, min_models=1, reference=RAM_REF,
    summary="RAM+ with the overlap ratio of each model counted within each tensor: unique entries scaled by "
    "1 + r·clamp(shared/unique, 0, alpha), shared entries averaged.",
    defaults_from=MK + "ram.py, lines 130-132 (r 0.1, alpha 0.2, epsilon 1e-5)",
)
def ramplus_tl(base, models, ctx: MethodContext, r, alpha, epsilon):
    """As ``ram``, with model i's unique entries scaled by λ_i = 1 + r · clamp(ρ_i, 0, alpha), where ρ_i =
    (# entries model i changes that others change too) / max(# entries only model i changes, ε), counted in
    this tensor ("tensor-local", mergekit's ``ramplus_tl``; ram.py, lines 147-158)."""
    taus = torch.stack([m - base for m in models])
    changed, count = ram_masks(taus, epsilon)
    flat, n = changed.reshape(len(models), -1), count.reshape(1, -1)
    shared = (flat & (n > 1)).sum(dim=1)
    unique = (flat & (n == 1)).sum(dim=1)
    rho = torch.where(shared == 0, 0.0, shared / unique.clamp(min=epsilon))  # (ε = 0, nothing changed: 0, not NaN)
    lam = (1 + r * rho.clamp(min=0, max=alpha)).to(taus.dtype)
    ctx.info["ramplus_lambda"] = [round(float(x), 6) for x in lam]
    return base + ram_combine(taus, changed, count, lam)
