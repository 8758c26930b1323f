"""ASDF: the SVD-knee low-rank delta of a vision-language model onto a text LLM.

base = the text LLM T, models = the VLM(s) V. Per aligned tensor:

* the canonical key contains ``embed`` or ``lm_head``, the shapes differ, or Δ = V − T has ndim < 2:
  the result is the expert's tensor V (several models: Σ w_i V_i / Σ w_i);
* else Δ_i = V_i − T is truncated to its k_i leading singular directions, k_i by the rank rule
  (``rank``, per model, default ``knee``), and merged = T + Σ w_i U_k S_k V_kᵀ (one model, w = 1:
  T + U_k S_k V_kᵀ). Tensors of ndim > 2 are batches of matrices, each with its own k.

The rank goes to report.json: ``rank`` (one model) or ``ranks`` (one entry per model); an entry is
a list for a batch. ``exact: true`` takes a full SVD per matrix; the default fast route
(``linalg.truncate``) gives the same result to float precision (see tests/test_methods_asdf.py);
``solver: randomized`` is faster and approximate (docs/methods.md gives its measured error).
"""

from __future__ import annotations

import torch

from ..errors import OmnimergeError
from . import linalg
from .ranks import check_rank_rule, choose_rank, needs_spectrum, rank_param
from .registry import MethodContext, Param, register

REFERENCE = "Qwen3-VL-4B-Instruct-YOYO (model card), SVD-knee low-rank delta merge"

_RANK = rank_param("rank", "knee", "rank rule for each model's delta (each model may have its own)", per_model=True)
_WEIGHT = Param("weight", float, 1.0, "weight of each model's truncated delta (and of its tensor where V is kept)",
                minimum=0.0, per_model=True)
_EXACT = Param("exact", bool, False, "full SVD per matrix instead of the fast route (same result, slower)")
_SOLVER = Param(
    "solver", str, "fast",
    "fast: the truncation to float precision; randomized: the rank rule on a float32 spectrum and a randomized "
    "range finder with 4 subspace iterations, approximate (opt-in)",
    choices=("fast", "randomized"),
)


def _per_model(value, n: int, name: str, ctx: MethodContext) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise OmnimergeError(f"{ctx.key}: parameter '{name}' has {len(values)} values for {n} models")
    return values


def rank_arg(rule, shape):
    """What ``linalg.truncate`` takes for a rule: k itself, or a function of the singular values."""
    if needs_spectrum(rule):
        return lambda s: choose_rank(rule, shape, s)
    return choose_rank(rule, shape)


def _keeps_expert(base: torch.Tensor, models: list[torch.Tensor], key: str) -> str | None:
    if "embed" in key or "lm_head" in key:
        return "embed/lm_head"
    if any(m.shape != base.shape for m in models):
        return "shape"
    if base.ndim < 2:
        return "ndim<2"
    return None


@register(
    "asdf", params=(_RANK, _WEIGHT, _EXACT, _SOLVER), needs_base=True, reference=REFERENCE,
    summary="VLM onto text LLM: T + rank-k(knee) SVD truncation of V − T; embed, lm_head, 1-D and "
    "mismatched tensors are taken from V.",
)
def asdf(base, models, ctx, rank, weight, exact, solver="fast"):
    n = len(models)
    if solver not in ("fast", "randomized"):
        raise OmnimergeError(f"{ctx.key}: asdf: parameter 'solver' = {solver!r} is not allowed; choose fast or "
                             "randomized")
    if solver == "randomized" and exact:
        raise OmnimergeError(f"{ctx.key}: asdf: 'exact: true' and 'solver: randomized' exclude each other; drop one "
                             "of them")
    randomized = solver == "randomized"
    if n == 0:
        raise OmnimergeError(f"{ctx.key}: asdf: no models to merge")
    w = [float(x) for x in _per_model(weight, n, "weight", ctx)]
    try:
        rules = [check_rank_rule(x) for x in _per_model(rank, n, "rank", ctx)]
    except ValueError as e:
        raise OmnimergeError(f"{ctx.key}: asdf: parameter 'rank': {e}") from None

    reason = _keeps_expert(base, models, ctx.key)
    if reason is not None:
        ctx.info["kept"] = f"model ({reason})"
        if n == 1:
            return models[0]
        if any(m.shape != models[0].shape for m in models[1:]):
            raise OmnimergeError(f"{ctx.key}: asdf: the models' shapes differ "
                                 f"({', '.join(str(tuple(m.shape)) for m in models)}); cannot combine them")
        if sum(w) == 0:
            raise OmnimergeError(f"{ctx.key}: asdf: all weights are 0; give at least one model a positive weight")
        out = torch.zeros_like(models[0])
        for m, wi in zip(models, w):
            out.add_(m, alpha=wi)
        return out / sum(w)

    out = base.clone()
    ks = []
    for m, wi, rule in zip(models, w, rules):
        low, k = linalg.truncate(m - base, rank_arg(rule, base.shape), generator=ctx.generator, exact=bool(exact),
                                 randomized=randomized)
        out.add_(low, alpha=wi)
        ks.append(k)
    if n == 1:
        ctx.info["rank"] = ks[0]
    else:
        ctx.info["ranks"] = ks
    return out
