"""Passthrough: one model's tensor, optionally scaled. The method of layer stacking (``slices:``), where
each output layer comes from one layer of one model; mergekit's ``passthrough``."""

from __future__ import annotations

from .registry import MethodContext, Param, register


@register(
    "passthrough",
    params=(Param("scale", float, 1.0, "multiply the tensor by this (mergekit's `scale`; e.g. 0 or 0.5 on the "
                  "o_proj/down_proj of duplicated layers)", per_model=True),),
    needs_base=False, min_models=1, max_models=1,
    reference="mergekit's passthrough (Goddard et al., 2024, arXiv:2403.13257), used for layer stacking "
    "(\"frankenmerges\", e.g. SOLAR's depth up-scaling, arXiv:2312.15166)",
    summary="The one model's tensor, times `scale`: with `slices:`, layer ranges of several models stacked "
    "into one deeper (or shallower) model.",
)
def passthrough(base, models, ctx: MethodContext, scale):
    """θ · scale for the one model θ (scale 1: the tensor itself)."""
    (m,), (s,) = models, scale
    return m.clone() if s == 1.0 else m * s
