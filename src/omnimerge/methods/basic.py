"""The two classic linear methods: average and task arithmetic (TIES, DARE and their kin: gta.py).

τ_i = θ_i − θ_base. Every function takes ``(base, models, ctx, **params)`` (every parameter given:
the registry fills in the defaults) and returns the merged tensor.
"""

from __future__ import annotations

from ..errors import OmnimergeError
from . import linalg
from .combine import LAMBDA, WEIGHT, WEIGHT_NONNEG, linear_combine, normalize_param, per_model, take_lambda, weighted_sum
from .ranks import RULE_DOC, check_rank_rule, choose_rank, needs_spectrum
from .registry import Param, register


def _check_rank_or_full(value):
    """``full`` (no truncation) or any rank rule (see ranks.check_rank_rule)."""
    return "full" if value == "full" else check_rank_rule(value)


TA_RANK = Param(
    "rank", str, "full", "truncate the merged task vector Σ w_i τ_i of each matrix to this rank (before λ)",
    check=_check_rank_or_full, kind_text="rank rule", range_doc="full (no truncation), " + RULE_DOC,
)
TA_REF = "Editing Models with Task Arithmetic (Ilharco et al., 2023), arXiv:2212.04089"


# ---------------------------------------------------------------------------------------- methods
@register(
    "average", params=(WEIGHT_NONNEG, normalize_param(True, "divide by Σ w_i (false: the plain weighted sum Σ w_i θ_i)")),
    needs_base=False, elementwise=True,
    reference="Model soups: averaging weights of multiple fine-tuned models improves accuracy "
    "without increasing inference time (Wortsman et al., 2022), arXiv:2203.05482",
    summary="Weighted mean of the models: Σ w_i θ_i / Σ w_i.",
)
def average(base, models, ctx, weight, normalize):
    w = per_model(weight, len(models), "weight", ctx)
    if not normalize:
        return weighted_sum(models, w)
    if sum(w) == 0:
        raise OmnimergeError(f"{ctx.key}: average: all weights are 0; give at least one model a positive weight")
    return weighted_sum(models, w) / sum(w)


@register(
    "task_arithmetic", params=(WEIGHT, LAMBDA, TA_RANK, normalize_param(False, "divide Σ w_i τ_i by Σ w_i")),
    needs_base=True, models_as_read=True, reference=TA_REF, elementwise=lambda params: params["rank"] == "full",
    summary="Base plus the scaled weighted sum of task vectors: θ_b + λ Σ w_i τ_i "
    "(optionally truncated to a rank per matrix).",
)
def task_arithmetic(base, models, ctx, weight, rank, normalize, **kw):
    lam = take_lambda(kw)
    w = per_model(weight, len(models), "weight", ctx)
    merged = linear_combine((m - base for m in models), w, normalize)  # one task vector at a time
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
