"""What the task-vector methods share: per-model values, weighted sums, λ, and their parameters.

τ_i = θ_i − θ_base. Per-model parameters may be a list (one value per model) or a single scalar.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch

from ..errors import OmnimergeError
from .registry import MethodContext, Param

WEIGHT = Param("weight", float, 1.0, "weight of each model", per_model=True)
WEIGHT_NONNEG = replace(WEIGHT, minimum=0.0)
LAMBDA = Param("lambda", float, 1.0, "scale of the merged task vector")


def normalize_param(default: bool, what: str) -> Param:
    return Param("normalize", bool, default, what)


def per_model(value, n: int, name: str, ctx: MethodContext) -> list[float]:
    """``value`` as one float per model (a scalar is repeated), or an error naming the tensor."""
    if n == 0:
        raise OmnimergeError(f"{ctx.key}: no models to merge")
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise OmnimergeError(f"{ctx.key}: parameter '{name}' has {len(values)} values for {n} models")
    return [float(v) for v in values]


def take_lambda(params: dict) -> float:
    """Pop ``lambda`` (a Python keyword, so it travels in ``**params``) from ``params``."""
    return float(params.pop("lambda"))


def weighted_sum(tensors: Iterable[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ w_i t_i from +0.0, in order; ``tensors`` may be a generator (one task vector alive at a time)."""
    out = None
    for t, w in zip(tensors, weights):
        if out is None:
            out = torch.zeros_like(t)
        out.add_(t, alpha=w)
    return out


def linear_combine(taus: Iterable[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """Σ w_i τ_i, divided by Σ w_i when ``normalize`` (unless |Σ w_i| < 1e-8, mergekit's guard)."""
    out = weighted_sum(taus, weights)
    total = sum(weights)
    if normalize and abs(total) >= 1e-8:
        out = out / total
    return out


def l1_rescale(kept: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """``kept`` scaled so that its L1 norm is ``original``'s (unchanged if nothing was kept)."""
    norm = kept.abs().sum()
    if float(norm) == 0.0:
        return kept
    return kept * (original.abs().sum() / norm)


def scale_and_add(merged: torch.Tensor, lam: float, base: torch.Tensor) -> torch.Tensor:
    """base + λ·merged, in ``merged``'s memory (no two more temporaries): pass a tensor of your own."""
    return merged.mul_(lam).add_(base)
