"""Interpolation between models: slerp and model_stock, defined as mergekit 0.1.5 computes them; where
that differs from the paper, the docstring says so (docs/mergekit.md has the full comparison).
(Breadcrumbs and DELLA, mergekit's other methods, are variants of gta.py.)

Both act on the whole tensor (any ndim, 1-D included, as mergekit does), so neither needs a fallback.
Their sums over the tensor (norms, dot products) are float64 sums in a fixed order (methods.rowsums): the
same bits whether the tensor is merged whole or in row blocks, where a per-tensor pre-pass
(:class:`GramRows`) computes them and each block's merge is then element-wise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .registry import MethodContext, Param, Reduction, register
from .rowsums import RowSums, dot_row_sums, first_row, total


# ------------------------------------------------------------------------------- the per-tensor sums
def gram_rows(vectors: list[torch.Tensor]) -> torch.Tensor:
    """The row sums (rows along the last dimension, methods.rowsums) of v_i · v_j for every pair i <= j, in the
    order (0,0), (0,1), .., (0,n-1), (1,1), ..: a float64 tensor [pairs, rows]."""
    return torch.stack([dot_row_sums(vectors[i], vectors[j])
                        for i in range(len(vectors)) for j in range(i, len(vectors))])


def _pair(i: int, j: int, n: int) -> int:
    """The index of the pair (i, j), i <= j, in :func:`gram_rows`'s order."""
    return i * n - i * (i - 1) // 2 + (j - i)


@dataclass
class GramRows:
    """A per-tensor pre-pass for a tensor merged in row blocks: :func:`gram_rows` of ``vectors(base, models)``,
    gathered block by block (one pass)."""

    vectors: Callable[[torch.Tensor, list[torch.Tensor]], list[torch.Tensor]]
    done: bool = False
    sums: RowSums = field(default_factory=RowSums)

    def feed(self, base, models, ctx: MethodContext, params: dict) -> None:
        vs = self.vectors(base, models)
        self.sums.add("gram", first_row(vs[0], ctx.offset), gram_rows(vs).T)

    def next_pass(self) -> None:
        self.done = True

    def result(self) -> torch.Tensor:
        return self.sums.rows("gram").T.contiguous()


def _gram_reduction(vectors) -> Reduction:
    return Reduction(group=lambda params: None, start=lambda params: GramRows(vectors), when_blocked=lambda params: True)

# --------------------------------------------------------------------------------------- slerp

_DOT_THRESHOLD = 0.9995  # |cos θ| above this: the vectors are (anti)colinear, interpolate linearly
_EPS = 1e-8  # a norm at or below this counts as zero (the vector is then not normalised)


def _slerp_work(base: torch.Tensor, models: list[torch.Tensor]) -> list[torch.Tensor]:
    """slerp's two vectors in its working dtype (float64 inputs stay float64, others are float32)."""
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    return [base.to(work), models[0].to(work)]


def _slerp_coefficients(gram: torch.Tensor, t: float) -> tuple[float, float, float | None]:
    """(c_a, c_b, θ) with slerp(a, b; t) = c_a·a + c_b·b from ``gram`` (:func:`gram_rows` of a and b: the row
    sums of a·a, a·b, b·b); θ is None where the result is the linear lerp."""
    aa, ab, bb = (total(g) for g in gram)
    na, nb = math.sqrt(aa), math.sqrt(bb)
    na = na if na > _EPS else 1.0
    nb = nb if nb > _EPS else 1.0
    dot = min(1.0, max(-1.0, ab / (na * nb)))
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
    reduction=_gram_reduction(_slerp_work), elementwise=True,
)
def slerp(base, models, ctx: MethodContext, t):
    """slerp(a, b; t) = sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b with cos θ = ⟨a/‖a‖, b/‖b‖⟩ over the whole
    tensor. Only the angle uses the normalised vectors: the coefficients multiply the original a and b, so the
    norm of the result interpolates between theirs. |cos θ| > 0.9995 → (1−t)·a + t·b. ‖a‖², ‖b‖² and ⟨a, b⟩
    are block-independent float64 sums (see the module doc); a row block takes them from the pre-pass."""
    a = base
    x, y = _slerp_work(base, models)
    if x.numel() == 0:
        return a.clone()
    gram = ctx.reduction if ctx.reduction is not None else gram_rows([x, y])
    ca, cb, theta = _slerp_coefficients(gram, float(t))
    ctx.info["slerp_angle_deg"] = None if theta is None else round(math.degrees(theta), 4)
    return (ca * x + cb * y).to(a.dtype)


# --------------------------------------------------------------------------------- model stock


@register(
    "model_stock",
    params=(Param("filter_wise", bool, False, "one ratio per row (last dimension) instead of one per tensor"),),
    needs_base=True, min_models=2,
    reference="Model Stock: All we need is just a few fine-tuned models (Jang et al., 2024), arXiv:2403.19522",
    summary="Interpolate from the base towards the models' average by t = k·cos θ / (1 + (k−1)·cos θ), θ the "
    "mean pairwise angle between the task vectors.",
    reduction=_gram_reduction(lambda base, models: [m - base for m in models]), elementwise=True,
)
def model_stock(base, models, ctx: MethodContext, filter_wise):
    """cos θ is the mean over all pairs i < j of cos(τ_i, τ_j) (norm product clamped at 1e-6, cosine clamped
    to [−1, 1]); t = k cos θ / (1 + (k−1) cos θ), and t = 0 (the base) where |1 + (k−1) cos θ| < 1e-6;
    result = t·mean(θ_i) + (1 − t)·θ_base. The paper derives t for k models at one common angle; with k > 2
    mergekit (and so omnimerge) uses the mean of the pairwise cosines. The norms and dot products are
    block-independent float64 sums (per row along the last dimension with ``filter_wise``; see the module
    doc), t is computed in float64 and rounded to the tensor's dtype; a row block takes the sums from the
    pre-pass."""
    k = len(models)
    shape = base.shape
    rows = filter_wise and base.ndim >= 2
    flat = (lambda x: x.reshape(-1, shape[-1])) if rows else (lambda x: x.reshape(1, -1))
    gram = ctx.reduction if ctx.reduction is not None else gram_rows([m - base for m in models])
    if not rows:
        gram = torch.tensor([[total(g)] for g in gram], dtype=torch.float64)
    norms = [gram[_pair(i, i, k)].sqrt() for i in range(k)]
    c = torch.zeros_like(norms[0])
    for i in range(k):
        for j in range(i + 1, k):
            c += (gram[_pair(i, j, k)] / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0)
    c /= k * (k - 1) // 2
    den = 1 + (k - 1) * c
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), k * c / torch.where(singular, torch.ones_like(den), den))
    ctx.info["model_stock_t"] = round(float(t.mean()), 6)
    if rows:  # this block's rows (all of them for a whole tensor)
        start = first_row(base, ctx.offset)
        t = t[start:start + flat(base).shape[0]]
    t = t.to(device=base.device, dtype=base.dtype).unsqueeze(-1)
    b = flat(base)
    avg = sum(flat(m) for m in models) / k
    return (t * avg + (1 - t) * b).reshape(shape)
