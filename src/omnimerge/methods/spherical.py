"""Merges on the sphere, as mergekit 0.1.5 defines them: ``nuslerp``, ``multislerp`` and ``karcher``.

Each one treats a tensor (or each row or column of it) as a point on a sphere: it averages directions
on the sphere and norms on their own. The defaults are mergekit 0.1.5's (the file and line of each are
in the method's ``defaults_from``); where mergekit's code computes something other than what its
reference describes, the function's docstring says so, and docs/mergekit.md has the comparison.

* ``nuslerp``: slerp between two models (or their task vectors, with a base), the interpolation
  factor from the two weights; over the whole tensor, its rows or its columns.
* ``multislerp``: the weighted mean of the unit vectors of any number of task vectors (or models),
  projected back on the sphere and scaled by the weighted mean norm.
* ``karcher``: the weighted Riemannian (Karcher) mean of the models' directions on the unit sphere,
  by fixed-point iteration, scaled by the weighted mean norm.

All three act on tensors of any shape (1-D included), so none needs a fallback.
"""

from __future__ import annotations

import torch

from ..errors import OmnimergeError
from .combine import WEIGHT, WEIGHT_NONNEG, per_model
from .registry import MethodContext, Param, register

MK = "mergekit 0.1.5, mergekit/merge_methods/"

# ------------------------------------------------------------------------------------------- nuslerp
_NU_EPS = 1e-8  # (1 − cos²θ) ≤ eps²: colinear, interpolate linearly (nuslerp.py, lines 21 and 39)
_NU_NORM_FLOOR = 1e-7  # a vector's norm is clamped at this before normalising (nuslerp.py, line 26)


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """slerp along the last dimension, t = 0 gives v0: sin((1−t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1 with
    cos θ = ⟨v0/‖v0‖, v1/‖v1‖⟩ (norms clamped at 1e-7, so a zero vector counts as orthogonal); where
    1 − cos²θ ≤ 1e-16 (parallel or antiparallel) the linear (1−t)·v0 + t·v1."""
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=_NU_NORM_FLOOR)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=_NU_NORM_FLOOR)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    del u0, u1
    colinear = (1 - cos.square()) <= _NU_EPS ** 2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * v0 + t * v1, spherical)


def nuslerp_factor(weights: list[float]) -> float:
    """t = w_1 / (w_0 + w_1): the second model's share; 0.5 when |w_0 + w_1| < 1e-6 (nuslerp.py, line 73)."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


@register(
    "nuslerp",
    params=(
        WEIGHT,
        Param("flatten", bool, True, "interpolate the whole tensor as one vector (false: each row, or each column "
              "with row_wise)"),
        Param("row_wise", bool, False, "with flatten: false, interpolate the vectors along the first dimension "
              "(the columns W[:, j] of a matrix) instead of the last (its rows W[i, :]); mergekit's "
              "nuslerp_row_wise"),
    ),
    needs_base=False, min_models=2, max_models=2,
    reference="mergekit's NuSLERP (Goddard et al., 2024, arXiv:2403.13257; mergekit/merge_methods/nuslerp.py)",
    summary="Spherical interpolation between two models (or, with a base, their task vectors) at t = w_2/(w_1+w_2), "
    "over the whole tensor, its rows or its columns.",
    defaults_from=MK + "nuslerp.py, lines 65-67 (weight required; nuslerp_row_wise false, nuslerp_flatten true); "
    "omnimerge's weight default 1 gives t = 0.5",
)
def nuslerp(base, models, ctx: MethodContext, weight, flatten, row_wise):
    """With a base: θ_b + slerp(τ_1, τ_2; t); without: slerp(θ_1, θ_2; t); t = w_2 / (w_1 + w_2).

    The vectors are the flattened tensor (``flatten``, the default), else each slice along the last
    dimension (the rows of a matrix), or with ``row_wise`` along the first (its columns: mergekit
    transposes the first and last dimensions, so its "rows" are the columns of an out×in weight)."""
    w = per_model(weight, len(models), "weight", ctx)
    t = nuslerp_factor(w)
    a, b = (models[0], models[1]) if base is None else (models[0] - base, models[1] - base)
    shape = a.shape
    if flatten or a.ndim == 0:
        out = nuslerp_vectors(t, a.reshape(-1), b.reshape(-1)).reshape(shape)
    elif row_wise:
        out = nuslerp_vectors(t, a.transpose(0, -1), b.transpose(0, -1)).transpose(0, -1)
    else:
        out = nuslerp_vectors(t, a, b)
    ctx.info["nuslerp_t"] = round(t, 6)
    return out.contiguous() if base is None else out.add_(base)


# ---------------------------------------------------------------------------------------- multislerp


@register(
    "multislerp",
    params=(
        WEIGHT,
        Param("normalize", bool, True, "divide the weights by their sum (mergekit's normalize_weights)"),
        Param("eps", float, 1e-8, "added to each norm before normalising; a weighted mean of unit vectors shorter "
              "than eps is not projected (the weighted sum is taken instead)", minimum=0.0),
    ),
    needs_base=False, min_models=1,
    reference="Multi-SLERP (C. Goddard, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea; "
    "mergekit/merge_methods/multislerp.py)",
    summary="The weighted mean direction of the task vectors (or models) on the unit sphere, scaled by their "
    "weighted mean norm.",
    defaults_from=MK + "multislerp.py, lines 23-25 (weight required; normalize_weights true, eps 1e-8)",
)
def multislerp(base, models, ctx: MethodContext, weight, normalize, eps):
    """x_i = τ_i (with a base) or θ_i, flattened; u_i = x_i / (‖x_i‖ + eps); m = Σ w_i u_i (w normalised to
    sum 1 with ``normalize``); result = m/‖m‖ · Σ w_i ‖x_i‖ (+ θ_base).

    mergekit describes a barycentric interpolation in the tangent space at m/‖m‖: it projects each u_i on
    that tangent space, takes the weighted sum of the projections and maps it back with the exponential
    map. That weighted sum is Σ w_i u_i − ⟨Σ w_i u_i, m̂⟩ m̂ = m − ‖m‖ m̂ = 0, so the exponential map
    returns m̂ itself (up to rounding; multislerp.py, lines 88-99): mergekit's multislerp is the normalised
    weighted mean of the unit vectors, which this computes directly. One model: the model's tensor
    (mergekit, line 49). Where ‖m‖ < eps (the directions cancel) the weighted sum Σ w_i x_i is taken
    (+ θ_base): mergekit does so for two models and stops with an error for more (lines 71-85)."""
    if len(models) == 1:
        return models[0].clone()
    w = per_model(weight, len(models), "weight", ctx)
    if normalize:
        total = sum(w)
        if total == 0:
            raise OmnimergeError(f"{ctx.key}: multislerp: the weights sum to 0 and normalize is true; change a "
                                 "weight or set normalize: false")
        w = [wi / total for wi in w]
    shape = models[0].shape
    xs = [(m if base is None else m - base).reshape(-1) for m in models]
    norms = [x.norm() for x in xs]
    mean = torch.zeros_like(xs[0])
    for x, n, wi in zip(xs, norms, w):
        mean.add_(x / (n + eps), alpha=wi)
    mean_norm = mean.norm()
    if mean_norm < eps:
        out = torch.zeros_like(xs[0])
        for x, wi in zip(xs, w):
            out.add_(x, alpha=wi)
        ctx.info["multislerp"] = "directions cancel: weighted sum"
    else:
        out = mean.div_(mean_norm).mul_(sum(wi * n for wi, n in zip(w, norms)))
    out = out.reshape(shape)
    return out if base is None else out.add_(base)


# ------------------------------------------------------------------------------------------- karcher


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float,
                 info: dict | None = None) -> torch.Tensor:
    """The weighted Karcher mean of the directions of ``tensors`` on the unit sphere, times Σ α_i ‖x_i‖
    (mergekit's ``karcher_merge_tensors``, karcher.py, lines 10-69).

    u_i = x_i/‖x_i‖; the points with ‖x_i‖ ≤ tol are left out of the mean (their α_i still count in the
    norm); start from the normalised weighted mean of the u_i (the first u_i if that is shorter than tol);
    then at most ``max_iter`` times: the tangent vector T = Σ α_i θ_i/sin θ_i · (u_i − cos θ_i · μ) over the
    points at angle θ_i ≥ tol from μ (α renormalised over the kept points), stop when ‖T‖ < tol, else
    μ ← cos‖T‖ · μ + sin‖T‖ · T/‖T‖, renormalised."""
    if len(tensors) == 1:
        return tensors[0].clone()
    shape = tensors[0].shape
    flat = [x.reshape(-1) for x in tensors]
    norms = [x.norm() for x in flat]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    a_sum = sum(alphas[i] for i in valid)
    alpha = [alphas[i] / a_sum for i in valid]
    units = [flat[i] / norms[i] for i in valid]
    mu = torch.zeros_like(units[0])
    for a, u in zip(alpha, units):
        mu.add_(u, alpha=a)
    mu_norm = mu.norm()
    mu = units[0].clone() if float(mu_norm) < tol else mu.div_(mu_norm)
    steps = 0
    for _ in range(max_iter):
        tangent = torch.zeros_like(mu)
        for a, u in zip(alpha, units):
            cos = torch.dot(mu, u).clamp(-1.0, 1.0)
            theta = torch.arccos(cos)
            if float(theta) < tol:
                continue
            tangent.add_((u - cos * mu) * (a * theta / torch.sin(theta)))
        t_norm = tangent.norm()
        if float(t_norm) < tol:
            break
        steps += 1
        mu = torch.cos(t_norm) * mu + torch.sin(t_norm) * (tangent / t_norm)
        n = mu.norm()
        if float(n) > tol:
            mu = mu / n
    if info is not None:
        info["karcher_steps"] = steps
    scale = sum(a * n for a, n in zip(alphas, norms))
    return (scale * mu).reshape(shape)


@register(
    "karcher",
    params=(
        WEIGHT_NONNEG,
        Param("max_iter", int, 10, "most fixed-point steps", minimum=0),
        Param("tol", float, 1e-5, "stop when the tangent step is shorter than this; also the norm below which a "
              "model is left out of the mean and the angle below which a point adds no step", minimum=0.0),
    ),
    needs_base=False, min_models=1,
    reference="Functionality-Oriented LLM Merging on the Fisher-Rao Manifold (Wang, Ye and Yin, 2026), "
    "arXiv:2603.04972, as mergekit implements it (mergekit/merge_methods/karcher.py)",
    summary="The weighted Riemannian (Karcher) mean of the models' directions on the unit sphere, scaled by the "
    "weighted mean of their norms.",
    defaults_from=MK + "karcher.py, lines 79-80 (max_iter 10, tol 1e-5) and 85 (equal weights: mergekit has no "
    "weight parameter)",
)
def karcher(base, models, ctx: MethodContext, weight, max_iter, tol):
    """Karcher mean of the models θ_i themselves (not task vectors; a base is not used, as in mergekit,
    where a listed base_model is one of the points). Weights default to equal, mergekit's only choice."""
    w = per_model(weight, len(models), "weight", ctx)
    total = sum(w)
    if total == 0:
        raise OmnimergeError(f"{ctx.key}: karcher: all weights are 0; give at least one model a positive weight")
    return karcher_mean(list(models), [wi / total for wi in w], max_iter, tol, ctx.info)
