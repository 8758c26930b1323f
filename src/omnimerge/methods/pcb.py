"""PCB-Merging: parameter competition balancing (Du et al., NeurIPS 2024), as its authors' code runs it.

τ_i = θ_i − θ_base, each flattened to a row of d entries; N models. For each model i:

1. **clip**: a_i = |τ_i| clamped to [its ⌊d·c⌋-th, its ⌊d(1 − c)⌋-th smallest value] (0-based, c = ``clip``);
   τ̂_i = sign(τ_i) · a_i;
2. **intra-balancing**: β_intra,i = exp(N · norm(a_i)²), norm = min-max over the row;
3. **inter-balancing**: β_inter,i = tanh(τ_i ⊙ Σ_j τ_j);
4. **drop**: β_i = β_intra,i ⊙ β_inter,i, clamped from below at its ⌊d(1 − ρ)⌋-th smallest value
   (ρ = ``density``, the kept fraction) and min-max normalised over the row: the entries at or below that
   value score 0 (dropped), the rest (0, 1];
5. **rescale**: merged = Σ_i w_i τ̂_i β_i / max(Σ_i β_i, 1e-12); θ_base + λ · merged.

This is the authors' ``PCB_merge`` (duguodong7/pcb-merging, ``pcb-merging.py``): the paper writes the
inter-balancing as Σ_j softmax(norm(τ_i ⊙ τ_j)), the code as tanh(τ_i ⊙ Σ_j τ_j); the code's form is
followed. Two numerical guards, which change nothing where the reference is finite: β_intra is computed as
exp(N · (norm² − 1)) (the same row up to a positive factor, which step 4's min-max normalisation removes;
exp(N·1) overflows float32 for N > 88), and a row with no spread (max = min, e.g. an all-zero task vector)
normalises to 0 instead of 0/0 — that model is left out of the weighted mean instead of making it NaN.

**Scope: per tensor.** The reference flattens the whole model into one row per task, so its clip
quantiles, its min-max normalisations and its kept fraction ρ are taken over every parameter at once;
omnimerge's streaming engine takes them over each tensor (each tensor keeps its own top ρ of scores). The
whole-model form would need two dependent global passes (the |τ| quantiles, then the score quantile and
maximum, which depend on the first), and it lets the tensors with the largest updates take the whole budget;
per tensor every weight matrix keeps the same fraction, as TIES's and DARE's per-tensor forms do.
"""

from __future__ import annotations

import torch

from ..errors import OmnimergeError
from .combine import WEIGHT, per_model, take_lambda
from .registry import Param, register

_REF = ("Parameter Competition Balancing for Model Merging (Du et al., NeurIPS 2024), arXiv:2410.02396; "
        "code: duguodong7/pcb-merging")
_DEFAULTS = ("duguodong7/pcb-merging @5897888, pcb-merging.py: PCB_merge(..., pcb_ratio=0.1) (line 31), clamp "
             "min_ratio=max_ratio=0.0001 (line 34), lams = [1.2]*n (line 52); scope per tensor (omnimerge's choice)")

DENSITY = Param("density", float, 0.1, "ρ: fraction of each task vector's entries kept, by balanced score "
                "(the reference's pcb_ratio)", minimum=0.0, maximum=1.0, exclusive_minimum=True)
CLIP = Param("clip", float, 1e-4, "fraction of each task vector's smallest and of its largest magnitudes "
             "clamped (to the quantiles) before balancing", minimum=0.0, maximum=0.5, exclusive_maximum=True)
LAMBDA = Param("lambda", float, 1.2, "scale of the merged task vector (the reference's lams)")


def _kth_smallest_rows(x: torch.Tensor, index: int) -> torch.Tensor:
    """The ``index``-th smallest (0-based) of each row of ``x`` (N, d), as (N, 1)."""
    index = min(max(index, 0), x.shape[1] - 1)
    return x.kthvalue(index + 1, dim=1, keepdim=True).values


def _minmax_rows_(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(x − lo)/(hi − lo) per row, in ``x``'s memory; 0 on a row with hi = lo."""
    span = hi - lo
    flat = span == 0
    return x.sub_(lo).div_(span.masked_fill_(flat, 1.0)).mul_(~flat)


def clip_magnitudes(taus: torch.Tensor, clip: float) -> torch.Tensor:
    """|τ_i| clamped per row to its ⌊d·c⌋-th and ⌊d(1 − c) − 1⌋-th smallest values (the reference's ``clamp``)."""
    d = taus.shape[1]
    mags = taus.abs()
    if clip <= 0:
        return mags
    lo = _kth_smallest_rows(mags, int(d * clip))
    hi = _kth_smallest_rows(mags, int(d * (1 - clip) - 1))
    return mags.clamp_(min=lo, max=hi)


def balancing_scores(taus: torch.Tensor, density: float, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ̂, β): the clipped task vectors and their balanced, dropped and normalised scores, both (N, d).
    ``taus`` is overwritten (it becomes τ̂): pass a stack of your own."""
    n, d = taus.shape
    mags = clip_magnitudes(taus, clip)
    scores = _minmax_rows_(mags.clone(), mags.min(dim=1, keepdim=True).values, mags.max(dim=1, keepdim=True).values)
    scores.square_().sub_(1.0).mul_(n).exp_()  # intra: exp(N·norm²) up to a per-row factor (see the module doc)
    scores.mul_(torch.tanh(taus * taus.sum(dim=0, keepdim=True)))  # × inter
    clipped = taus.sign_().mul_(mags)
    del mags
    floor = _kth_smallest_rows(scores, int(d * (1 - density)))
    top = scores.max(dim=1, keepdim=True).values
    return clipped, _minmax_rows_(scores.clamp_(min=floor), floor, top)


@register(
    "pcb", params=(DENSITY, CLIP, WEIGHT, LAMBDA), needs_base=True, min_models=1, reference=_REF,
    defaults_from=_DEFAULTS,
    summary="PCB-Merging: score each task-vector entry by intra-balancing (its own magnitude) × inter-balancing "
            "(agreement with the others), keep the top density of scores per task vector, and take the "
            "score-weighted mean of the clipped task vectors (per tensor).",
)
def pcb(base, models, ctx, density, clip, weight, **kw):
    lam = take_lambda(kw)
    w = per_model(weight, len(models), "weight", ctx)
    if base is None:
        raise OmnimergeError(f"{ctx.key}: pcb needs a base model (task vectors are θ_i − θ_base)")
    taus = torch.stack([(m - base).reshape(-1) for m in models])
    if taus.shape[1] == 0:
        return base.clone()
    clipped, scores = balancing_scores(taus, density, clip)
    weights = torch.tensor(w, dtype=taus.dtype, device=taus.device)[:, None]
    ctx.info["kept"] = round(float((scores > 0).float().mean()), 6)
    total = scores.sum(dim=0).clamp_min_(1e-12)
    merged = clipped.mul_(weights).mul_(scores).sum(dim=0).div_(total)
    return base + lam * merged.reshape(base.shape)
