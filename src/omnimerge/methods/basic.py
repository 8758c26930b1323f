"""The classic methods: average, task arithmetic, TIES and DARE (linear / TIES).

τ_i = θ_i − θ_base. Every function takes ``(base, models, ctx, **params)`` and returns the merged
tensor; per-model parameters may be a list (one value per model) or a single scalar.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import OmnimergeError
from . import linalg
from .ranks import RULE_DOC, check_rank_rule, choose_rank, needs_spectrum
from .registry import MethodContext, Param, register

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
_P = Param("p", float, 0.5, "DARE drop rate", minimum=0.0, maximum=1.0, exclusive_maximum=True)

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


def _weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        out.add_(t, alpha=w)
    return out


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly k = int(density · numel) entries of largest magnitude (ties: torch.topk)."""
    n = delta.numel()
    k = int(density * n)
    if k >= n:
        return delta
    keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
    if k > 0:
        keep[delta.flatten().abs().topk(k, sorted=False).indices] = True
    return torch.where(keep.view(delta.shape), delta, 0)


def _ties_combine(deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Sign election on Σ w_i τ_i, then the weighted mean of the agreeing non-zero entries."""
    elected = torch.sign(_weighted_sum(deltas, weights))
    num = torch.zeros_like(deltas[0])
    den = torch.zeros_like(deltas[0])
    for d, w in zip(deltas, weights):
        agree = (torch.sign(d) == elected) & (d != 0)
        num.add_(torch.where(agree, d, 0), alpha=w)
        den.add_(agree.to(d.dtype), alpha=w)
    return torch.where(den != 0, num / torch.where(den != 0, den, 1), 0)


def _dare(deltas: list[torch.Tensor], p: float, generator: torch.Generator) -> list[torch.Tensor]:
    """Drop each entry with probability p and rescale the rest by 1/(1−p); masks drawn in model order."""
    out = []
    for d in deltas:
        keep = torch.rand(d.shape, generator=generator, device=generator.device) >= p
        out.append(torch.where(keep.to(d.device), d / (1.0 - p), 0))
    return out


# ---------------------------------------------------------------------------------------- methods


@register(
    "average", params=(_WEIGHT_NONNEG,), needs_base=False,
    reference="Model soups: averaging weights of multiple fine-tuned models improves accuracy "
    "without increasing inference time (Wortsman et al., 2022), arXiv:2203.05482",
    summary="Weighted mean of the models: Σ w_i θ_i / Σ w_i.",
)
def average(base, models, ctx, weight=1.0):
    w = _per_model(weight, len(models), "weight", ctx)
    if sum(w) == 0:
        raise OmnimergeError(f"{ctx.key}: average: all weights are 0; give at least one model a positive weight")
    return _weighted_sum(models, w) / sum(w)


@register(
    "task_arithmetic", params=(_WEIGHT, _LAMBDA, _TA_RANK), needs_base=True, reference=_TA_REF,
    summary="Base plus the scaled weighted sum of task vectors: θ_b + λ Σ w_i τ_i "
    "(optionally truncated to a rank per matrix).",
)
def task_arithmetic(base, models, ctx, weight=1.0, rank="full", **kw):
    lam = _lambda(kw)
    w = _per_model(weight, len(models), "weight", ctx)
    merged = _weighted_sum(_deltas(base, models), w)
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
    "ties", params=(_DENSITY, _WEIGHT_NONNEG, _LAMBDA), needs_base=True, reference=_TIES_REF,
    summary="Trim each task vector to its top-density entries, elect signs, take the disjoint mean.",
)
def ties(base, models, ctx, density=0.2, weight=1.0, **kw):
    lam = _lambda(kw)
    w = _per_model(weight, len(models), "weight", ctx)
    dens = _per_model(density, len(models), "density", ctx)
    trimmed = [_trim(d, k) for d, k in zip(_deltas(base, models), dens)]
    return base + lam * _ties_combine(trimmed, w)


@register(
    "dare_linear", params=(_P, _WEIGHT, _LAMBDA), needs_base=True, reference=_DARE_REF,
    summary="Randomly drop a fraction p of each task vector, rescale by 1/(1−p), then task arithmetic.",
)
def dare_linear(base, models, ctx, p=0.5, weight=1.0, **kw):
    lam = _lambda(kw)
    w = _per_model(weight, len(models), "weight", ctx)
    return base + lam * _weighted_sum(_dare(_deltas(base, models), p, ctx.generator), w)


@register(
    "dare_ties", params=(_P, replace(_DENSITY, default=1.0), _WEIGHT_NONNEG, _LAMBDA), needs_base=True,
    reference=_DARE_REF + "; " + _TIES_REF,
    summary="DARE drop-and-rescale of each task vector, then TIES sign election and disjoint mean.",
)
def dare_ties(base, models, ctx, p=0.5, density=1.0, weight=1.0, **kw):
    lam = _lambda(kw)
    w = _per_model(weight, len(models), "weight", ctx)
    dens = _per_model(density, len(models), "density", ctx)
    dropped = _dare(_deltas(base, models), p, ctx.generator)
    return base + lam * _ties_combine([_trim(d, k) for d, k in zip(dropped, dens)], w)
