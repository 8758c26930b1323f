"""Localize-and-Stitch, dataless variant (He et al., 2024): sparse regions of each task vector, stitched.

τ_i = θ_i − θ_base. **Localize**: model i's mask γ_i keeps the entries of τ_i whose magnitude reaches its
k-th largest, k = ⌊density · N⌋ (N: τ_i's entries over every tensor the method merges, ``scope: global``, the
reference; or over this tensor, ``scope: per_tensor``). **Stitch**: where several masks overlap, each of them
counts 1/(number of masks there): merged = Σ_i γ_i / max(Σ_j γ_j, 1) ⊙ τ_i, and θ_base + λ · merged (λ = 1 is
the paper's; omnimerge adds λ so that the method scales like the others).

The dataless variant replaces the data-driven mask search by the top-k magnitudes of each task vector; the
reference (the authors' code, yifei-he/Localize-and-Stitch, ``localize_utils.py``: ``Localizer.create_basepatch`` and
``Stitcher.get_average_masks``) takes one threshold per task over all the parameters it merges, as
``scope: global`` does here (the run computes it exactly in streaming passes before the merge, as TIES's
global trim). One detail differs: the reference keeps |τ| > the k-th largest magnitude (strictly, k − 1
entries when they are distinct); omnimerge keeps |τ| ≥ it, so a mask has exactly the stated density.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import OmnimergeError
from .combine import LAMBDA, per_model, take_lambda
from .gta import magnitude_threshold
from .registry import MethodContext, Param, Reduction, register
from .selection import StreamedKthLargest, top_k_mask

_REF = ("Localize-and-Stitch: Efficient Model Merging via Sparse Task Arithmetic (He et al., 2024), "
        "arXiv:2408.13656; dataless variant; code: yifei-he/Localize-and-Stitch")
_DEFAULTS = ("yifei-he/Localize-and-Stitch @8b8ea46: language/main_dataless_localize_stitch.py line 43 "
             "(graft_args.sparsity = 5e-2, the language models' setting; the vision script sets 0.1, line 50); "
             "one threshold over all merged parameters, localize_utils.py lines 78-96 "
             "(create_basepatch); masks averaged where they overlap, lines 273-296 (get_average_masks)")

DENSITY = Param("density", float, 0.05, "fraction of each task vector's entries localised (kept), by magnitude",
                minimum=0.0, maximum=1.0, exclusive_minimum=True, per_model=True)
SCOPE = Param("scope", str, "global", "where each task vector's top density is taken: global (one magnitude "
              "threshold per task vector over every tensor the method merges, the reference) or per_tensor",
              choices=("global", "per_tensor"))


def localize(tau: torch.Tensor, density: float, threshold: float | None = None) -> torch.Tensor:
    """The boolean mask of τ's localised region: |τ| ≥ ``threshold`` (the global scope's), or, without one,
    exactly the ⌊density · n⌋ largest magnitudes of this tensor."""
    if threshold is None:
        return top_k_mask(tau.abs(), int(density * tau.numel()))
    if threshold == float("inf"):
        return torch.zeros_like(tau, dtype=torch.bool)
    return tau.abs() >= threshold


def stitch(taus: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """Σ_i γ_i ⊙ τ_i / max(Σ_j γ_j, 1): each entry is the mean of the task vectors that localised it."""
    count = torch.zeros_like(taus[0])
    merged = torch.zeros_like(taus[0])
    for t, m in zip(taus, masks):
        count.add_(m)
        merged.add_(t * m)
    return merged.div_(count.clamp_min_(1))


# --------------------------------------------------------------------------- the global scope's pre-pass
def _group(params: dict) -> tuple | None:
    if params.get("scope") != "global":
        return None
    dens = params["density"] if isinstance(params["density"], list) else [params["density"]]
    return tuple(dens)


@dataclass
class _Thresholds:
    """Per task vector, the exact k-th largest magnitude over every tensor of the group."""

    densities: tuple[float, ...]

    def __post_init__(self):
        self.select = [StreamedKthLargest(d) for d in self.densities]

    @property
    def done(self) -> bool:
        return all(s.done for s in self.select)

    def feed(self, base, models, ctx: MethodContext, params: dict) -> None:
        if len(models) != len(self.select):
            raise OmnimergeError(f"{ctx.key}: {len(models)} models, but {len(self.select)} densities")
        for s, m in zip(self.select, models):
            s.feed((m - base).abs_())

    def next_pass(self) -> None:
        for s in self.select:
            s.next_pass()

    def result(self) -> list[float]:
        return [s.threshold for s in self.select]


REDUCTION = Reduction(group=_group, start=lambda params: _Thresholds(_group(params)))


@register(
    "localize_stitch", params=(DENSITY, SCOPE, LAMBDA), needs_base=True, min_models=1, reference=_REF,
    defaults_from=_DEFAULTS, reduction=REDUCTION, models_as_read=True,
    summary="Localize-and-Stitch (dataless): keep each task vector's top density of magnitudes (one threshold "
            "over the whole model), average the task vectors where their regions overlap, add to the base.",
)
def localize_stitch(base, models, ctx, density, scope, **kw):
    lam = take_lambda(kw)
    dens = per_model(density, len(models), "density", ctx)
    taus = [m - base for m in models]
    if scope == "global":
        thresholds = ctx.reduction if ctx.reduction is not None else \
            [magnitude_threshold(t, d) for t, d in zip(taus, dens)]
        masks = [localize(t, d, th) for t, d, th in zip(taus, dens, thresholds)]
    else:
        masks = [localize(t, d) for t, d in zip(taus, dens)]
    ctx.info["density"] = [round(float(m.float().mean()), 6) for m in masks]
    return base + lam * stitch(taus, masks)
