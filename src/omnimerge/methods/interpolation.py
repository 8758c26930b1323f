"""Interpolation between models: slerp and model_stock, defined as mergekit 0.1.5 computes them; where
that differs from the paper, the docstring says so (docs/mergekit.md has the full comparison).
(Breadcrumbs and DELLA, mergekit's other methods, are variants of gta.py.)

Both act on the whole tensor (any ndim, 1-D included, as mergekit does), so neither needs a fallback.
"""

from __future__ import annotations

import math

import torch

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
def slerp(base, models, ctx: MethodContext, t):
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
def model_stock(base, models, ctx: MethodContext, filter_wise):
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
