"""The methods users bring from mergekit: slerp, model_stock, breadcrumbs and della (with their TIES and
linear variants), defined as mergekit 0.1.5 computes them; where that differs from the paper, the
docstring says so (docs/mergekit.md has the full comparison).

τ_i = θ_i − θ_base. All of them act on the whole tensor (any ndim, 1-D included, as mergekit does),
so none needs a fallback; della ranks magnitudes within each row of the last dimension.
"""

from __future__ import annotations

import math

import torch

from ..errors import OmnimergeError
from .basic import _deltas, _l1_rescale, _lambda, _linear_combine, _per_model, _ties_combine
from .registry import MethodContext, Param, register

# --------------------------------------------------------------------------------------- slerp

_DOT_THRESHOLD = 0.9995  # |cos θ| above this: the vectors are (anti)colinear, interpolate linearly
_EPS = 1e-8  # a norm at or below this counts as zero (the vector is then not normalised)


def _slerp_coefficients(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[float, float, float | None]:
    """(c_a, c_b, θ) with slerp(a, b; t) = c_a·a + c_b·b; θ is None where the result is the linear lerp."""
    na, nb = a.norm(), b.norm()
    na = na if na > _EPS else torch.ones_like(na)
    nb = nb if nb > _EPS else torch.ones_like(nb)
    dot = float(((a / na) * (b / nb)).sum().clamp(-1.0, 1.0))
    if abs(dot) > _DOT_THRESHOLD:
        return 1.0 - t, t, None
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s, theta


@register(
    "slerp",
    params=(Param("t", float, 0.5, "interpolation factor: 0 gives the base, 1 the other model (values outside "
                  "[0, 1] extrapolate, as in mergekit)"),),
    needs_base=True, min_models=1, max_models=1,
    reference="Animating rotation with quaternion curves (Shoemake, 1985), as used by mergekit "
    "(Goddard et al., 2024, arXiv:2403.13257)",
    summary="Spherical interpolation from the base to the one model along the great circle through the two "
    "flattened tensors; linear interpolation when they are colinear.",
)
def slerp(base, models, ctx: MethodContext, t=0.5):
    """slerp(a, b; t) = sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b with cos θ = ⟨a/‖a‖, b/‖b‖⟩ over the whole
    tensor. Only the angle uses the normalised vectors: the coefficients multiply the original a and b, so the
    norm of the result interpolates between theirs. |cos θ| > 0.9995 → (1−t)·a + t·b."""
    a, b = base, models[0]
    work = torch.float64 if a.dtype == torch.float64 else torch.float32
    x, y = a.reshape(-1).to(work), b.reshape(-1).to(work)
    if x.numel() == 0:
        return a.clone()
    ca, cb, theta = _slerp_coefficients(x, y, float(t))
    ctx.info["slerp_angle_deg"] = None if theta is None else round(math.degrees(theta), 4)
    return (ca * x + cb * y).reshape(a.shape).to(a.dtype)


# --------------------------------------------------------------------------------- model stock


@register(
    "model_stock",
    params=(Param("filter_wise", bool, False, "one ratio per row (last dimension) instead of one per tensor"),),
    needs_base=True, min_models=2,
    reference="Model Stock: All we need is just a few fine-tuned models (Jang et al., 2024), arXiv:2403.19522",
    summary="Interpolate from the base towards the models' average by t = k·cos θ / (1 + (k−1)·cos θ), θ the "
    "mean pairwise angle between the task vectors.",
)
def model_stock(base, models, ctx: MethodContext, filter_wise=False):
    """cos θ is the mean over all pairs i < j of cos(τ_i, τ_j) (norm product clamped at 1e-6, cosine clamped
    to [−1, 1]); t = k cos θ / (1 + (k−1) cos θ), and t = 0 (the base) where |1 + (k−1) cos θ| < 1e-6;
    result = t·mean(θ_i) + (1 − t)·θ_base. The paper derives t for k models at one common angle; with k > 2
    mergekit (and so omnimerge) uses the mean of the pairwise cosines."""
    k = len(models)
    shape = base.shape
    rows = filter_wise and base.ndim >= 2
    flat = (lambda x: x.reshape(-1, shape[-1])) if rows else (lambda x: x.reshape(1, -1))
    b = flat(base)
    offsets = [flat(m) - b for m in models]
    norms = [o.norm(dim=-1) for o in offsets]
    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cos.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0))
    c = torch.stack(cos).mean(dim=0, keepdim=False).unsqueeze(-1)
    den = 1 + (k - 1) * c
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), k * c / torch.where(singular, torch.ones_like(den), den))
    avg = sum(flat(m) for m in models) / k
    ctx.info["model_stock_t"] = round(float(t.mean()), 6)
    return (t * avg + (1 - t) * b).reshape(shape)


# ---------------------------------------------------------- breadcrumbs and della (sparsify + merge)

_WEIGHT = Param("weight", float, 1.0, "weight of each model's task vector", per_model=True)
_LAMBDA = Param("lambda", float, 1.0, "scale of the merged task vector")


def _density(default: float, help: str) -> Param:
    return Param("density", float, default, help, minimum=0.0, maximum=1.0, exclusive_minimum=True, per_model=True)


def _normalize(default: bool) -> Param:
    return Param("normalize", bool, default, "divide by the sum of the weights (TIES variants: of the weights of "
                 "the models that agree with the elected sign)")


def _outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs mask: of n entries, drop the ⌊γn⌋ largest by magnitude and keep the next ⌊density·n⌋; when
    the two together exceed n the outlier cut shrinks first (mergekit's rule). density ≥ 1 keeps everything."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep_n, top = int(density * n), int(gamma * n)
    start = max(0, n - keep_n - top)
    order = torch.argsort(delta.abs().reshape(-1), stable=True)  # ascending
    keep = torch.zeros(n, dtype=torch.bool, device=delta.device)
    keep[order[start:start + keep_n]] = True
    return torch.where(keep.view(delta.shape), delta, 0)


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MagPrune's keep probabilities: within each row (the last dimension; a 1-D tensor is one row) the entries
    ranked by magnitude get density − ε (smallest) rising linearly to density + ε (largest)."""
    rows = delta.reshape(-1, delta.shape[-1]) if delta.ndim >= 2 else delta.reshape(1, -1)
    n = rows.shape[-1]
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=-1, stable=True), dim=-1).to(rows.dtype)
    frac = ranks / (n - 1) if n > 1 else torch.zeros_like(ranks)
    return ((density - epsilon) + 2 * epsilon * frac).reshape(delta.shape)


def _magprune(delta: torch.Tensor, density: float, epsilon: float, rescale: str, ctx: MethodContext,
              model: int) -> torch.Tensor:
    if density >= 1:
        return delta
    if not (0 < density - epsilon and density + epsilon < 1):
        raise OmnimergeError(
            f"{ctx.key}: della: density ± epsilon must lie inside (0, 1) (model {model}: density {density}, "
            f"epsilon {epsilon}); lower epsilon or move density away from 0 and 1"
        )
    probs = della_keep_probabilities(delta, density, epsilon)
    keep = torch.rand(delta.shape, generator=ctx.generator, device=ctx.generator.device).to(delta.device) < probs
    kept = torch.where(keep, delta, 0)
    if rescale == "inverse":
        return kept / probs
    if rescale == "l1":
        return _l1_rescale(kept, delta)
    return kept


def _gta(base, models, ctx, weight, lam, normalize, consensus, sparsify) -> torch.Tensor:
    """mergekit's generalised task arithmetic: sparsify each τ_i, weight, combine (TIES sign election and
    disjoint mean, or a sum), optionally normalise by the weights, scale by λ, add to the base."""
    w = _per_model(weight, len(models), "weight", ctx)
    taus = [sparsify(i, d) for i, d in enumerate(_deltas(base, models))]
    merged = _ties_combine(taus, w, normalize) if consensus else _linear_combine(taus, w, normalize)
    return base + lam * merged


_BC_REF = "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (Davari & Belilovsky, 2023), " \
          "arXiv:2312.06795"
_DELLA_REF = "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling (Deep et al., " \
             "2024), arXiv:2406.11617"
_BC_DENSITY = _density(0.9, "fraction of each task vector's entries kept (below the dropped outliers)")
_GAMMA = Param("gamma", float, 0.01, "fraction of each task vector's largest-magnitude entries dropped (outliers)",
               minimum=0.0, maximum=1.0, exclusive_maximum=True, per_model=True)
_BC_RESCALE = Param("rescale", str, "none", "after masking, match each task vector's L1 norm (l1) or not (none)",
                    choices=("none", "l1"))


def _breadcrumbs(base, models, ctx, density, gamma, weight, normalize, rescale, kw, consensus):
    lam = _lambda(kw)
    dens = _per_model(density, len(models), "density", ctx)
    gam = _per_model(gamma, len(models), "gamma", ctx)

    def sparsify(i, d):
        out = _outliers(d, dens[i], gam[i])
        return _l1_rescale(out, d) if rescale == "l1" and dens[i] < 1 else out

    return _gta(base, models, ctx, weight, lam, normalize, consensus, sparsify)


@register(
    "breadcrumbs", params=(_BC_DENSITY, _GAMMA, _WEIGHT, _LAMBDA, _normalize(False), _BC_RESCALE), needs_base=True,
    reference=_BC_REF,
    summary="Drop each task vector's largest-magnitude outliers (gamma) and keep the next density by magnitude, "
    "then task arithmetic.",
)
def breadcrumbs(base, models, ctx, density=0.9, gamma=0.01, weight=1.0, normalize=False, rescale="none", **kw):
    return _breadcrumbs(base, models, ctx, density, gamma, weight, normalize, rescale, kw, consensus=False)


@register(
    "breadcrumbs_ties", params=(_BC_DENSITY, _GAMMA, _WEIGHT, _LAMBDA, _normalize(False), _BC_RESCALE),
    needs_base=True, reference=_BC_REF + "; TIES-Merging (Yadav et al., 2023), arXiv:2306.01708",
    summary="The breadcrumbs mask, then TIES sign election over the weighted task vectors.",
)
def breadcrumbs_ties(base, models, ctx, density=0.9, gamma=0.01, weight=1.0, normalize=False, rescale="none", **kw):
    return _breadcrumbs(base, models, ctx, density, gamma, weight, normalize, rescale, kw, consensus=True)


_DELLA_DENSITY = _density(0.5, "mean keep probability of each task vector's entries")
_EPSILON = Param("epsilon", float, 0.15, "half-width of the keep probabilities: density − ε for the smallest "
                 "magnitude of a row up to density + ε for the largest", minimum=0.0, maximum=0.5,
                 exclusive_maximum=True, per_model=True)
_DELLA_RESCALE = Param("rescale", str, "l1", "how kept entries are rescaled: l1 (match the task vector's L1 norm, "
                       "mergekit), inverse (÷ each entry's keep probability, the paper), none",
                       choices=("l1", "inverse", "none"))


def _della(base, models, ctx, density, epsilon, weight, normalize, rescale, kw, consensus):
    lam = _lambda(kw)
    dens = _per_model(density, len(models), "density", ctx)
    eps = _per_model(epsilon, len(models), "epsilon", ctx)
    return _gta(base, models, ctx, weight, lam, normalize, consensus,
                lambda i, d: _magprune(d, dens[i], eps[i], rescale, ctx, i))


@register(
    "della", params=(_DELLA_DENSITY, _EPSILON, _WEIGHT, _LAMBDA, _normalize(True), _DELLA_RESCALE), needs_base=True,
    reference=_DELLA_REF,
    summary="MagPrune: drop task-vector entries at random with keep probabilities rising with magnitude rank, "
    "rescale, then TIES sign election and the disjoint mean.",
)
def della(base, models, ctx, density=0.5, epsilon=0.15, weight=1.0, normalize=True, rescale="l1", **kw):
    return _della(base, models, ctx, density, epsilon, weight, normalize, rescale, kw, consensus=True)


@register(
    "della_linear", params=(_DELLA_DENSITY, _EPSILON, _WEIGHT, _LAMBDA, _normalize(False), _DELLA_RESCALE),
    needs_base=True, reference=_DELLA_REF,
    summary="MagPrune drop-and-rescale of each task vector, then task arithmetic.",
)
def della_linear(base, models, ctx, density=0.5, epsilon=0.15, weight=1.0, normalize=False, rescale="l1", **kw):
    return _della(base, models, ctx, density, epsilon, weight, normalize, rescale, kw, consensus=False)
