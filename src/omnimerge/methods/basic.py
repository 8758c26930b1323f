"""The classic methods: average, task arithmetic, TIES and DARE (linear / TIES).

τ_i = θ_i − θ_base. Every function takes ``(base, models, ctx, **params)`` and returns the merged
tensor; per-model parameters may be a list (one value per model) or a single scalar.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch

from ..errors import OmnimergeError
from . import linalg
from .ranks import RULE_DOC, check_rank_rule, choose_rank, needs_spectrum
from .registry import MethodContext, Param, register
from .selection import top_k_mask

_WEIGHT = Param("weight", float, 1.0, "weight of each model", per_model=True)
_WEIGHT_NONNEG = replace(_WEIGHT, minimum=0.0)
_LAMBDA = Param("lambda", float, 1.0, "scale of the merged task vector")
_DENSITY = Param(
    "density", float, 0.2, "fraction of each task vector's entries kept, by magnitude",
    minimum=0.0, maximum=1.0, exclusive_minimum=True, per_model=True,
)


def _check_rank_or_full(value):
    """``full`` (no truncation) or any rank rule (see ranks.check_rank_rule)."""
    return "full" if value == "full" else check_rank_rule(value)


_TA_RANK = Param(
    "rank", str, "full", "truncate the merged task vector Σ w_i τ_i of each matrix to this rank (before λ)",
    check=_check_rank_or_full, kind_text="rank rule", range_doc="full (no truncation), " + RULE_DOC,
)
_P = Param("p", float, 0.5, "DARE drop rate", minimum=0.0, maximum=1.0, exclusive_maximum=True, per_model=True)


def _normalize(default: bool, what: str) -> Param:
    return Param("normalize", bool, default, what)


_RESCALE_HELP = ("how kept entries are rescaled: inverse (÷ keep probability, the paper), l1 (match the task "
                 "vector's L1 norm, mergekit's `rescale: true`), none")
_DARE_RESCALE = Param("rescale", str, "inverse", _RESCALE_HELP, choices=("inverse", "l1", "none"))
_TIES_RESCALE = Param("rescale", str, "none", "after trimming, match each task vector's L1 norm (l1, mergekit's "
                      "`rescale: true`) or not (none)", choices=("none", "l1"))

_TA_REF = "Editing Models with Task Arithmetic (Ilharco et al., 2023), arXiv:2212.04089"
_TIES_REF = "TIES-Merging: Resolving Interference When Merging Models (Yadav et al., 2023), arXiv:2306.01708"
_DARE_REF = (
    "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch "
    "(Yu et al., 2024), arXiv:2311.03099"
)


# ---------------------------------------------------------------------------------------- helpers


def _per_model(value, n: int, name: str, ctx: MethodContext) -> list[float]:
    if n == 0:
        raise OmnimergeError(f"{ctx.key}: no models to merge")
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise OmnimergeError(f"{ctx.key}: parameter '{name}' has {len(values)} values for {n} models")
    return [float(v) for v in values]


def _lambda(kw: dict) -> float:
    lam = kw.pop("lambda", 1.0)
    if kw:
        raise TypeError(f"unexpected parameters: {', '.join(sorted(kw))}")
    return float(lam)


def _deltas(base: torch.Tensor, models: list[torch.Tensor]) -> list[torch.Tensor]:
    return [m - base for m in models]


def _weighted_sum(tensors: Iterable[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ w_i t_i from +0.0, in order; ``tensors`` may be a generator (one task vector alive at a time)."""
    out = None
    for t, w in zip(tensors, weights):
        if out is None:
            out = torch.zeros_like(t)
        out.add_(t, alpha=w)
    return out


def _trim(delta: torch.Tensor, density: float, inplace: bool = False) -> torch.Tensor:
    """Keep exactly k = int(density · numel) entries of largest magnitude, found by selection, not
    sorting (see selection.top_k_mask; ties at the k-th magnitude: the lowest flat indices are kept).
    ``inplace`` zeroes the others in ``delta`` itself."""
    n = delta.numel()
    k = int(density * n)
    if k >= n:
        return delta
    keep = top_k_mask(delta.abs(), k)
    # (a product, 3x faster than torch.where; dropped entries may be -0.0)
    return delta.mul_(keep) if inplace else delta * keep


def _linear_combine(taus: Iterable[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """Σ w_i τ_i, divided by Σ w_i when ``normalize`` (unless |Σ w_i| < 1e-8, mergekit's guard)."""
    out = _weighted_sum(taus, weights)
    total = sum(weights)
    if normalize and abs(total) >= 1e-8:
        out = out / total
    return out


def _l1_rescale(kept: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """``kept`` scaled so that its L1 norm is ``original``'s (unchanged if nothing was kept)."""
    norm = kept.abs().sum()
    if float(norm) == 0.0:
        return kept
    return kept * (original.abs().sum() / norm)


def _ties_combine(deltas: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    """Sign election on Σ w_i τ_i, then the weighted mean (``normalize``) or the weighted sum of the
    agreeing non-zero entries. The deltas are overwritten (no scratch tensors): pass fresh task vectors."""
    elected = _weighted_sum(deltas, weights).sign_().to(torch.int8)  # -1, 0, 1 in a quarter of the memory
    num = torch.zeros_like(deltas[0])
    den = torch.zeros_like(deltas[0]) if normalize else None
    for d, w in zip(deltas, weights):
        # d·s is |d| where d agrees with the elected sign s (≠ 0) and ≤ 0 elsewhere: clamped at 0 and
        # multiplied by s again it is d where d agrees, else ±0 — exact, as s is -1, 0 or 1
        d.mul_(elected).clamp_min_(0)
        if den is not None:
            den.add_(d > 0, alpha=w)
        num.add_(d.mul_(elected), alpha=w)  # num starts at +0.0: adding a -0.0 leaves +0.0
    if den is None:
        return num
    # where no model agrees, num is 0 (and den 0): divide by 1 there
    return num.div_(den.masked_fill_(den == 0, 1))


def _dare(deltas: Iterable[torch.Tensor], p: list[float], generator: torch.Generator,
          rescale: str = "inverse") -> list[torch.Tensor]:
    """Drop each entry of τ_i with probability p_i and rescale the rest (÷ (1 − p_i), to τ_i's L1 norm, or not);
    masks drawn in model order. ``deltas`` are overwritten (except with ``l1``, which needs the originals):
    pass fresh task vectors."""
    out = []
    for d, pi in zip(deltas, p):
        keep = torch.rand(d.shape, generator=generator, device=generator.device) >= pi
        if rescale == "l1":
            kept = d * keep.to(d.device)  # (3x faster than torch.where; dropped entries may be -0.0)
        else:  # in place: d is this function's own task vector (a fresh m - base)
            kept = d.mul_(keep.to(d.device))
        del keep
        if rescale == "inverse":
            kept.div_(1.0 - pi)
        elif rescale == "l1":
            kept = _l1_rescale(kept, d)
        out.append(kept)
    return out


# ---------------------------------------------------------------------------------------- methods


@register(
    "average", params=(_WEIGHT_NONNEG, _normalize(True, "divide by Σ w_i (false: the plain weighted sum Σ w_i θ_i)")),
    needs_base=False,
    reference="Model soups: averaging weights of multiple fine-tuned models improves accuracy "
    "without increasing inference time (Wortsman et al., 2022), arXiv:2203.05482",
    summary="Weighted mean of the models: Σ w_i θ_i / Σ w_i.",
)
def average(base, models, ctx, weight=1.0, normalize=True):
    w = _per_model(weight, len(models), "weight", ctx)
    if not normalize:
        return _weighted_sum(models, w)
    if sum(w) == 0:
        raise OmnimergeError(f"{ctx.key}: average: all weights are 0; give at least one model a positive weight")
    return _weighted_sum(models, w) / sum(w)


@register(
    "task_arithmetic", params=(_WEIGHT, _LAMBDA, _TA_RANK, _normalize(False, "divide Σ w_i τ_i by Σ w_i")),
    needs_base=True, models_as_read=True, reference=_TA_REF,
    summary="Base plus the scaled weighted sum of task vectors: θ_b + λ Σ w_i τ_i "
    "(optionally truncated to a rank per matrix).",
)
def task_arithmetic(base, models, ctx, weight=1.0, rank="full", normalize=False, **kw):
    lam = _lambda(kw)
    w = _per_model(weight, len(models), "weight", ctx)
    merged = _linear_combine((m - base for m in models), w, normalize)  # one task vector at a time
    if rank != "full" and merged.ndim >= 2:
        try:
            rule = check_rank_rule(rank)
        except ValueError as e:
            raise OmnimergeError(f"{ctx.key}: task_arithmetic: parameter 'rank': {e}") from None
        shape = merged.shape
        k_or_fn = (lambda s: choose_rank(rule, shape, s)) if needs_spectrum(rule) else choose_rank(rule, shape)
        merged, k = linalg.truncate(merged, k_or_fn, generator=ctx.generator)
        ctx.info["rank"] = k
    return base + lam * merged


@register(
    "ties", params=(_DENSITY, _WEIGHT_NONNEG, _LAMBDA,
                    _normalize(True, "the weighted disjoint mean (false: the weighted sum of the agreeing entries)"),
                    _TIES_RESCALE), needs_base=True, models_as_read=True, reference=_TIES_REF,
    summary="Trim each task vector to its top-density entries, elect signs, take the disjoint mean.",
)
def ties(base, models, ctx, density=0.2, weight=1.0, normalize=True, rescale="none", **kw):
    lam = _lambda(kw)
    w = _per_model(weight, len(models), "weight", ctx)
    dens = _per_model(density, len(models), "density", ctx)
    trimmed = []
    for m, k in zip(models, dens):  # one task vector at a time: each untrimmed copy is freed at once
        d = m - base
        trimmed.append(_l1_rescale(_trim(d, k), d) if rescale == "l1" else _trim(d, k, inplace=True))
    merged = _ties_combine(trimmed, w, normalize)
    del trimmed
    return merged.mul_(lam).add_(base)  # = base + λ·merged, without two more temporaries


@register(
    "dare_linear", params=(_P, _WEIGHT, _LAMBDA, _normalize(False, "divide Σ w_i τ̃_i by Σ w_i"), _DARE_RESCALE),
    needs_base=True, models_as_read=True, reference=_DARE_REF,
    summary="Randomly drop a fraction p of each task vector, rescale by 1/(1−p), then task arithmetic.",
)
def dare_linear(base, models, ctx, p=0.5, weight=1.0, normalize=False, rescale="inverse", **kw):
    lam = _lambda(kw)
    w = _per_model(weight, len(models), "weight", ctx)
    ps = _per_model(p, len(models), "p", ctx)
    taus = (m - base for m in models)  # one at a time: each undropped copy is freed at once
    return _linear_combine(_dare(taus, ps, ctx.generator, rescale), w, normalize).mul_(lam).add_(base)


@register(
    "dare_ties", params=(_P, replace(_DENSITY, default=1.0), _WEIGHT_NONNEG, _LAMBDA,
                         _normalize(True, "the weighted disjoint mean (false: the weighted sum of the agreeing "
                                    "entries, mergekit's default)"), _DARE_RESCALE),
    needs_base=True, models_as_read=True,
    reference=_DARE_REF + "; " + _TIES_REF,
    summary="DARE drop-and-rescale of each task vector, then TIES sign election and disjoint mean.",
)
def dare_ties(base, models, ctx, p=0.5, density=1.0, weight=1.0, normalize=True, rescale="inverse", **kw):
    lam = _lambda(kw)
    w = _per_model(weight, len(models), "weight", ctx)
    dens = _per_model(density, len(models), "density", ctx)
    ps = _per_model(p, len(models), "p", ctx)
    dropped = _dare((m - base for m in models), ps, ctx.generator, rescale)  # one task vector at a time
    merged = _ties_combine([_trim(d, k, inplace=True) for d, k in zip(dropped, dens)], w, normalize)
    del dropped
    return merged.mul_(lam).add_(base)  # = base + λ·merged, without two more temporaries
