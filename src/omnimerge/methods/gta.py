"""Generalised task arithmetic: sparsification × consensus × scale, as mergekit composes its methods.

Every method here is one row of :data:`VARIANTS`: each task vector τ_i = θ_i − θ_base is sparsified
(``magnitude``: TIES's trim to the top ``density`` by magnitude; ``random``: DARE's Bernoulli drop;
``random+magnitude``: both, DARE first; ``outliers``: Breadcrumbs; ``magprune``: DELLA), the
sparsified τ̂_i are combined (``sign``: TIES's sign election and disjoint mean; ``sum``: the
weighted sum), optionally normalised by the weights, scaled by λ and added to the base. Adding a
variant is adding a row; its parameters are declared once, with their defaults, in its row.

τ_i are consumed one at a time where the combination allows it (``sum``), and overwritten in place
where they are this module's own copies (no scratch tensors). Randomness comes from ``ctx.generator``
only, drawn in model order.

TIES's magnitude trim has a scope (``trim``): ``global`` (the default) keeps, of each task vector,
the entries whose magnitude reaches the k-th largest over *every* tensor the method merges,
k = int(density · N) — the TIES paper and its InternVL reference code (MLLMerging,
InternVL/internvl_chat/model_merging.py, ``ties_merging``, which flattens all merged parameters
into one vector and takes one ``kthvalue``); ``per_tensor`` keeps exactly int(density · n) entries of
each tensor (MLLMerging's Qwen2-VL code, LLaMA-Factory/baseline_merging.py, and mergekit). The
global threshold is computed exactly before the merge, in streaming passes over the inputs (see
:data:`TRIM_REDUCTION`); a method called directly on tensors takes the threshold over the tensor
it is given.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ..errors import OmnimergeError
from .combine import (LAMBDA, WEIGHT, WEIGHT_NONNEG, l1_rescale, linear_combine, normalize_param, per_model,
                      scale_and_add, take_lambda)
from .registry import MethodContext, Param, Reduction, register
from .rowsums import RowSums, first_row, row_sums, tensor_sum
from .selection import (RankCut, StreamedKthLargest, StreamedRankCut, just_below, kth_largest, top_k_cut,
                        top_k_mask)

TIES_REF = "TIES-Merging: Resolving Interference When Merging Models (Yadav et al., 2023), arXiv:2306.01708"
DARE_REF = (
    "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch "
    "(Yu et al., 2024), arXiv:2311.03099; default p = 0.2 from MLLMerging (WalkerWorldPeace/MLLMerging, "
    "LLaMA-Factory/baseline_merging.py, DEFAULT_HPARAMS: dare_weight_mask_rate=0.2)"
)
BC_REF = "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (Davari & Belilovsky, 2023), " \
         "arXiv:2312.06795"
DELLA_REF = "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling (Deep et al., " \
            "2024), arXiv:2406.11617"
TIES_TRIM_REF = ("; trim: global as the paper and MLLMerging's InternVL code (InternVL/internvl_chat/"
                 "model_merging.py, ties_merging)")


# ------------------------------------------------------------------------------------- parameters
def _density(default: float, help: str) -> Param:
    return Param("density", float, default, help, minimum=0.0, maximum=1.0, exclusive_minimum=True, per_model=True)


DENSITY = _density(0.2, "fraction of each task vector's entries kept, by magnitude")
TRIM = Param("trim", str, "global", "scope of the magnitude trim: global (one threshold per task vector over every "
             "tensor the method merges, the TIES paper) or per_tensor (each tensor keeps its own top density)",
             choices=("global", "per_tensor"))
P = Param("p", float, 0.2, "DARE drop rate (0.2: MLLMerging's DEFAULT_HPARAMS)", minimum=0.0, maximum=1.0,
          exclusive_maximum=True, per_model=True)
_RESCALE_HELP = ("how kept entries are rescaled: inverse (÷ keep probability, the paper), l1 (match the task "
                 "vector's L1 norm, mergekit's `rescale: true`), none")
DARE_RESCALE = Param("rescale", str, "inverse", _RESCALE_HELP, choices=("inverse", "l1", "none"))
TIES_RESCALE = Param("rescale", str, "none", "after trimming, match each task vector's L1 norm (l1, mergekit's "
                     "`rescale: true`) or not (none)", choices=("none", "l1"))
GAMMA = Param("gamma", float, 0.01, "fraction of each task vector's largest-magnitude entries dropped (outliers)",
              minimum=0.0, maximum=1.0, exclusive_maximum=True, per_model=True)
BC_DENSITY = _density(0.9, "fraction of each task vector's entries kept (below the dropped outliers)")
BC_RESCALE = Param("rescale", str, "none", "after masking, match each task vector's L1 norm (l1) or not (none)",
                   choices=("none", "l1"))
DELLA_DENSITY = _density(0.5, "mean keep probability of each task vector's entries")
EPSILON = Param("epsilon", float, 0.15, "half-width of the keep probabilities: density − ε for the smallest "
                "magnitude of a row up to density + ε for the largest", minimum=0.0, maximum=0.5,
                exclusive_maximum=True, per_model=True)
DELLA_RESCALE = Param("rescale", str, "l1", "how kept entries are rescaled: l1 (match the task vector's L1 norm, "
                      "mergekit), inverse (÷ each entry's keep probability, the paper), none",
                      choices=("l1", "inverse", "none"))
WEIGHT_TA = replace(WEIGHT, help="weight of each model's task vector")


# ---------------------------------------------------------------------------------- sparsification
def trim_per_tensor(delta: torch.Tensor, density: float, inplace: bool = False) -> torch.Tensor:
    """Keep exactly k = int(density · numel) entries of largest magnitude, found by selection, not
    sorting (see selection.top_k_mask; ties at the k-th magnitude: the lowest flat indices are kept).
    ``inplace`` zeroes the others in ``delta`` itself."""
    n = delta.numel()
    k = int(density * n)
    if k >= n:
        return delta
    keep = top_k_mask(delta.abs(), k)
    # (a product, 3x faster than torch.where; dropped entries may be -0.0)
    return delta.mul_(keep) if inplace else delta * keep


def magnitude_threshold(delta: torch.Tensor, density: float) -> float:
    """The global trim's threshold over ``delta`` alone: its k-th largest magnitude, k = int(density · n)
    (+inf when k = 0: nothing kept; 0 when k = n: everything kept)."""
    n = delta.numel()
    k = int(density * n)
    if k <= 0:
        return float("inf")
    if k >= n:
        return 0.0
    return float(kth_largest(delta.abs(), k))


def trim_at(delta: torch.Tensor, threshold: float, inplace: bool = False) -> torch.Tensor:
    """Keep the entries of magnitude ≥ ``threshold`` (every entry tied at it is kept)."""
    if threshold <= 0:
        return delta
    keep = delta.abs() >= threshold
    return delta.mul_(keep) if inplace else delta * keep


MASK_CHUNK = 1 << 20  # elements per counter-keyed stream of DARE's uniforms


def _chunk_seed(seed: int, model: int, chunk: int) -> int:
    digest = hashlib.blake2b(f"dare:{seed}:{model}:{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def dare_uniforms(numel: int, seed: int, model: int, offset: int = 0) -> torch.Tensor:
    """DARE's uniform draws in [0, 1) for the elements ``offset .. offset + numel`` (flat indices) of one
    model's task vector of a tensor whose seed is ``seed``: element j's draw depends on (seed, model, j)
    only, whatever slice of the tensor is asked for. The elements are cut into chunks of ``MASK_CHUNK``;
    chunk c is the start of a stream from a generator seeded with a hash of (seed, model, c) (a
    counter-based generator in chunks: a row block draws only the chunks it overlaps)."""
    parts = []
    end = offset + numel
    c = offset // MASK_CHUNK
    while c * MASK_CHUNK < end:
        lo, hi = max(offset, c * MASK_CHUNK) - c * MASK_CHUNK, min(end, (c + 1) * MASK_CHUNK) - c * MASK_CHUNK
        g = torch.Generator(device="cpu").manual_seed(_chunk_seed(seed, model, c))
        parts.append(torch.rand(hi, generator=g)[lo:])  # (a prefix of the chunk's stream: the same draws)
        c += 1
    return parts[0] if len(parts) == 1 else torch.cat(parts) if parts else torch.empty(0)


def dare_keep_mask(shape, p: float, seed: int, model: int, offset: int = 0) -> torch.Tensor:
    """DARE's keep mask (True with probability 1 − p) for a block of ``shape`` starting at flat index
    ``offset`` of the tensor (see :func:`dare_uniforms`), compared chunk by chunk (no float copy of it all)."""
    n = 1
    for s in shape:
        n *= s
    keep = torch.empty(n, dtype=torch.bool)
    done = 0
    while done < n:
        j = offset + done
        step = min(n - done, MASK_CHUNK - j % MASK_CHUNK)
        torch.ge(dare_uniforms(step, seed, model, j), p, out=keep[done:done + step])
        done += step
    return keep.view(tuple(shape))


def dare(d: torch.Tensor, p: float, seed: int, model: int, offset: int = 0, rescale: str = "inverse") -> torch.Tensor:
    """Drop each entry of τ with probability p and rescale the rest (÷ (1 − p), to τ's L1 norm, or not).
    The mask is :func:`dare_keep_mask`'s for (``seed``, ``model``, ``offset``). ``d`` is overwritten
    (except with ``l1``, which needs the original): pass a fresh task vector."""
    keep = dare_keep_mask(d.shape, p, seed, model, offset).to(d.device)
    if rescale == "l1":
        kept = d * keep  # (3x faster than torch.where; dropped entries may be -0.0)
    else:
        kept = d.mul_(keep)
    del keep
    if rescale == "inverse":
        kept.div_(1.0 - p)
    elif rescale == "l1":
        kept = l1_rescale(kept, d)
    return kept


def outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
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


@dataclass(frozen=True)
class OutlierCut:
    """Breadcrumbs' mask of one task vector merged in row blocks, from the pre-pass: the entries of rank
    ``lower`` .. ``upper`` − 1 in the stable ascending order of magnitudes (:class:`selection.RankCut` each),
    and with ``rescale: l1`` the L1 norms of the task vector and of its kept entries (block-independent sums)."""

    lower: RankCut
    upper: RankCut
    l1: tuple[float, float] | None = None


def outlier_bounds(n: int, density: float, gamma: float) -> tuple[int, int]:
    """The ranks (ascending magnitude) that :func:`outliers` keeps: ``start .. start + keep_n``."""
    keep_n, top = int(density * n), int(gamma * n)
    start = max(0, n - keep_n - top)
    return start, start + keep_n


def outliers_by_cut(delta: torch.Tensor, cut: OutlierCut, offset: int) -> torch.Tensor:
    """:func:`outliers` on the row block of ``delta`` at flat ``offset``: the same entries kept, the same bits."""
    mag = delta.abs()
    keep = cut.upper.mask(mag, offset).logical_and_(cut.lower.mask(mag, offset).logical_not_())
    return torch.where(keep, delta, 0)


def l1_scale(kept: torch.Tensor, norms: tuple[float, float]) -> torch.Tensor:
    """``kept`` times ‖τ‖₁ / ‖kept‖₁ (``norms``, from :func:`l1_norms`); unchanged when nothing was kept."""
    original, now = norms
    return kept if now == 0.0 else kept * (original / now)


def l1_norms(delta: torch.Tensor, kept: torch.Tensor) -> tuple[float, float]:
    """‖τ‖₁ and ‖kept‖₁ as block-independent float64 sums (methods.rowsums): the L1 rescale of Breadcrumbs and
    DELLA, whose factor is then the same whether the tensor is merged whole or in row blocks."""
    return tensor_sum(delta, torch.abs), tensor_sum(kept, torch.abs)


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MagPrune's keep probabilities: within each row (the last dimension; a 1-D tensor is one row) the entries
    ranked by magnitude get density − ε (smallest) rising linearly to density + ε (largest)."""
    rows = delta.reshape(-1, delta.shape[-1]) if delta.ndim >= 2 else delta.reshape(1, -1)
    n = rows.shape[-1]
    out = torch.empty_like(rows)
    per = max(1, PROB_ROWS // max(n, 1))  # rows at a time: the sorts' int64 temporaries stay small
    for s in range(0, rows.shape[0], per):
        ranks = torch.argsort(torch.argsort(rows[s:s + per].abs(), dim=-1, stable=True), dim=-1).to(rows.dtype)
        frac = ranks / (n - 1) if n > 1 else torch.zeros_like(ranks)
        out[s:s + per] = (density - epsilon) + 2 * epsilon * frac
    return out.reshape(delta.shape)


PROB_ROWS = 1 << 20  # elements (whole rows) ranked at a time by della_keep_probabilities (the same values)


def magprune(delta: torch.Tensor, density: float, epsilon: float, rescale: str, ctx: MethodContext,
             model: int) -> torch.Tensor:
    if density >= 1:
        return delta
    if not (0 < density - epsilon and density + epsilon < 1):
        raise OmnimergeError(
            f"{ctx.key}: della: density ± epsilon must lie inside (0, 1) (model {model}: density {density}, "
            f"epsilon {epsilon}); lower epsilon or move density away from 0 and 1"
        )
    kept, probs = magprune_kept(delta, density, epsilon, ctx, model)
    if rescale == "inverse":
        return kept / probs
    if rescale == "l1":  # the norms of the whole tensor: from the pre-pass for a row block
        return l1_scale(kept, ctx.reduction[model] if ctx.reduction is not None else l1_norms(delta, kept))
    return kept


def magprune_kept(delta: torch.Tensor, density: float, epsilon: float, ctx: MethodContext,
                  model: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MagPrune's kept entries (the others +0) and keep probabilities. The draws are keyed by element index
    (:func:`dare_uniforms` for the tensor's seed, the model and ``ctx.offset``): a row block draws what the
    whole tensor draws for its elements."""
    probs = della_keep_probabilities(delta, density, epsilon)
    u = dare_uniforms(delta.numel(), ctx.generator.initial_seed(), model, ctx.offset).view(delta.shape)
    keep = u.to(delta.device) < probs
    del u
    return torch.where(keep, delta, 0), probs


@dataclass(frozen=True)
class TrimCut:
    """``trim: per_tensor`` for a tensor merged in row blocks: the tensor's exact k-th largest magnitude
    (``threshold``), how many of the entries equal to it are kept (``ties``, the first ones by flat index;
    None: all of them), and by block offset, how many such entries come before the block."""

    threshold: float
    ties: int | None = None
    ties_before: dict[int, int] = field(default_factory=dict)


def cut_mask(mag: torch.Tensor, cut: TrimCut, offset: int) -> torch.Tensor:
    """Which entries of the block at flat ``offset`` (magnitudes ``mag``) the per-tensor trim keeps."""
    if cut.ties is None:
        return mag >= cut.threshold
    keep = mag > cut.threshold
    left = cut.ties - cut.ties_before.get(offset, 0)
    if left > 0:
        equal = (mag.reshape(-1) == cut.threshold).nonzero().squeeze(1)[:left]
        keep.view(-1)[equal] = True
    return keep


def trim_by_cut(delta: torch.Tensor, cut: TrimCut, offset: int) -> torch.Tensor:
    """Keep, of the block of ``delta`` at flat ``offset``, the entries that the per-tensor trim keeps (in place)."""
    if cut.threshold <= 0:
        return delta
    return delta.mul_(cut_mask(delta.abs(), cut, offset))


def _magnitude(d: torch.Tensor, i: int, prm: dict, ctx: MethodContext) -> torch.Tensor:
    """TIES's trim of τ_i (its scope per ``trim``; ``rescale: l1`` keeps τ_i's L1 norm)."""
    density = prm["density"][i]
    if prm.get("trim", "per_tensor") == "global":
        t = ctx.reduction[i] if ctx.reduction is not None else magnitude_threshold(d, density)
        return l1_rescale(trim_at(d, t), d) if prm["rescale"] == "l1" else trim_at(d, t, inplace=True)
    if ctx.reduction is not None:  # a row block of the tensor: its cut was found in the pre-pass
        return trim_by_cut(d, ctx.reduction[i], ctx.offset)
    return l1_rescale(trim_per_tensor(d, density), d) if prm["rescale"] == "l1" else \
        trim_per_tensor(d, density, inplace=True)


def _random(d: torch.Tensor, i: int, prm: dict, ctx: MethodContext) -> torch.Tensor:
    return dare(d, prm["p"][i], ctx.generator.initial_seed(), i, ctx.offset, prm["rescale"])


def _random_magnitude(d: torch.Tensor, i: int, prm: dict, ctx: MethodContext) -> torch.Tensor:
    """DARE, then TIES's trim of what it kept (the trim never rescales: ``rescale`` is DARE's)."""
    return _magnitude(_random(d, i, prm, ctx), i, {**prm, "rescale": "none"}, ctx)


def _outliers(d: torch.Tensor, i: int, prm: dict, ctx: MethodContext) -> torch.Tensor:
    """Breadcrumbs' mask of τ_i (a row block's from the pre-pass's cut); ``rescale: l1`` keeps τ_i's L1 norm,
    summed block-independently (:func:`l1_norms`)."""
    if prm["density"][i] >= 1:
        return d
    if ctx.reduction is not None:  # a row block of the tensor: its cut was found in the pre-pass
        cut = ctx.reduction[i]
        out = outliers_by_cut(d, cut, ctx.offset)
        return l1_scale(out, cut.l1) if prm["rescale"] == "l1" else out
    out = outliers(d, prm["density"][i], prm["gamma"][i])
    return l1_scale(out, l1_norms(d, out)) if prm["rescale"] == "l1" else out


def _magprune(d: torch.Tensor, i: int, prm: dict, ctx: MethodContext) -> torch.Tensor:
    return magprune(d, prm["density"][i], prm["epsilon"][i], prm["rescale"], ctx, i)


SPARSIFIERS: dict[str, Callable[[torch.Tensor, int, dict, MethodContext], torch.Tensor]] = {
    "magnitude": _magnitude, "random": _random, "random+magnitude": _random_magnitude,
    "outliers": _outliers, "magprune": _magprune,
}


# ------------------------------------------------------------------------------------------ consensus
def sign_consensus(deltas: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    """Sign election on Σ w_i τ_i, then the weighted mean (``normalize``) or the weighted sum of the
    agreeing non-zero entries. The deltas are overwritten (no scratch tensors): pass fresh task vectors."""
    elected = linear_combine(deltas, weights, False).sign_().to(torch.int8)  # -1, 0, 1 in a quarter of the memory
    num = torch.zeros_like(deltas[0])
    den = torch.zeros_like(deltas[0]) if normalize else None
    for d, w in zip(deltas, weights):
        # d·s is |d| where d agrees with the elected sign s (≠ 0) and ≤ 0 elsewhere: clamped at 0 and
        # multiplied by s again it is d where d agrees, else ±0 — exact, as s is -1, 0 or 1
        d.mul_(elected).clamp_min_(0)
        if den is not None:
            den.add_(d.sign(), alpha=w)  # d >= 0 here: sign is 1 or 0 (~7x faster than adding a bool mask)
        num.add_(d.mul_(elected), alpha=w)  # num starts at +0.0: adding a -0.0 leaves +0.0
    if den is None:
        return num
    # where no model agrees, num is +0 (and den 0): divide by 1 there. With weights >= 0 every nonzero den is
    # at least the smallest positive weight (in den's dtype), so clamping at it changes only the zeros, and
    # +0 / c = +0 / 1: the same bits as a masked fill, without a boolean pass (10x slower than a float one)
    floor = _smallest_positive_weight(tuple(weights), den.dtype)
    if floor is not None:
        return num.div_(den.clamp_min_(floor))
    return num.div_(den.masked_fill_(den == 0, 1))


@functools.lru_cache(maxsize=64)
def _smallest_positive_weight(weights: tuple[float, ...], dtype: torch.dtype) -> float | None:
    """The smallest positive weight as ``dtype`` rounds it, or None when a weight is negative or none is
    positive there (then the disjoint mean fills its zero denominators instead). Cached: the element-wise
    pipeline asks once per piece with the same weights."""
    positive = [float(torch.tensor(w, dtype=dtype)) for w in weights if w > 0]
    if min(weights) < 0 or not positive or min(positive) <= 0:
        return None
    return min(positive)


# ------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One method of the family: how each τ_i is sparsified, how they are combined, its parameters."""

    sparsify: str | None  # a key of SPARSIFIERS, or None
    consensus: bool  # TIES's sign election and disjoint mean (else the weighted sum)
    params: tuple[Param, ...]
    reference: str
    summary: str


def _normalize(default: bool, consensus: bool) -> Param:
    return normalize_param(default, "the weighted disjoint mean (false: the weighted sum of the agreeing entries)"
                           if consensus else "divide the weighted sum of the sparsified τ_i by Σ w_i")


VARIANTS: dict[str, Variant] = {
    "ties": Variant("magnitude", True, (DENSITY, WEIGHT_NONNEG, LAMBDA, _normalize(True, True), TIES_RESCALE, TRIM),
                    TIES_REF + TIES_TRIM_REF,
                    "Trim each task vector to its top-density entries (one magnitude threshold per task vector "
                    "over the whole model by default), elect signs, take the disjoint mean."),
    "dare_linear": Variant("random", False, (P, WEIGHT, LAMBDA, _normalize(False, False), DARE_RESCALE), DARE_REF,
                           "Randomly drop a fraction p of each task vector, rescale by 1/(1−p), then task "
                           "arithmetic."),
    "dare_ties": Variant("random+magnitude", True,
                         (P, replace(DENSITY, default=1.0), WEIGHT_NONNEG, LAMBDA, _normalize(True, True),
                          DARE_RESCALE, TRIM),
                         DARE_REF + "; " + TIES_REF,
                         "DARE drop-and-rescale of each task vector, then TIES sign election and disjoint mean."),
    "breadcrumbs": Variant("outliers", False, (BC_DENSITY, GAMMA, WEIGHT_TA, LAMBDA, _normalize(False, False),
                                               BC_RESCALE), BC_REF,
                           "Drop each task vector's largest-magnitude outliers (gamma) and keep the next density "
                           "by magnitude, then task arithmetic."),
    "breadcrumbs_ties": Variant("outliers", True, (BC_DENSITY, GAMMA, WEIGHT_TA, LAMBDA, _normalize(False, True),
                                                   BC_RESCALE),
                                BC_REF + "; TIES-Merging (Yadav et al., 2023), arXiv:2306.01708",
                                "The breadcrumbs mask, then TIES sign election over the weighted task vectors."),
    "della": Variant("magprune", True, (DELLA_DENSITY, EPSILON, WEIGHT_TA, LAMBDA, _normalize(True, True),
                                        DELLA_RESCALE), DELLA_REF,
                     "MagPrune: drop task-vector entries at random with keep probabilities rising with magnitude "
                     "rank, rescale, then TIES sign election and the disjoint mean."),
    "della_linear": Variant("magprune", False, (DELLA_DENSITY, EPSILON, WEIGHT_TA, LAMBDA, _normalize(False, False),
                                                DELLA_RESCALE), DELLA_REF,
                            "MagPrune drop-and-rescale of each task vector, then task arithmetic."),
}


def _per_model_params(variant: Variant, models: list, ctx: MethodContext, params: dict) -> dict:
    return {p.name: per_model(params[p.name], len(models), p.name, ctx) if p.per_model else params[p.name]
            for p in variant.params if p.name not in ("weight", "lambda")}


def _sparsified(base, models, ctx: MethodContext, variant: Variant, prm: dict) -> Iterator[torch.Tensor]:
    """τ̂_i, one at a time (each τ_i = m − base a fresh tensor, freed once sparsified)."""
    fn = SPARSIFIERS[variant.sparsify] if variant.sparsify else None
    for i, m in enumerate(models):
        d = m - base
        yield fn(d, i, prm, ctx) if fn else d


PIECE = 1 << 17  # elements per piece of the element-wise pipeline (its temporaries stay in the CPU's cache)


class PieceTrim:
    """A magnitude trim of a task vector applied piece by piece without a mask of the whole tensor: keep the
    entries whose magnitude is above ``above``, and those at the flat indices ``extra`` (ascending, or None).

    ``hardshrink`` does the comparison and the zeroing in one float pass: torch's kernels on boolean masks
    (``abs() >= t``, then a multiply by the mask) are 5-10x slower per element. Its zeros are +0 where a
    mask's product gives ±0, which the sign election and disjoint mean that follow every trim of the piece
    pipeline cannot tell apart (tested bit for bit)."""

    def __init__(self, above: float, extra: torch.Tensor | None, numel: int):
        self.above, self.extra = above, extra
        # where each piece's extra indices start in ``extra`` (one searchsorted for the whole tensor)
        self.starts = None if extra is None else torch.searchsorted(
            extra, torch.arange(0, numel + PIECE, PIECE, device=extra.device)).tolist()

    @classmethod
    def at_least(cls, threshold: float, dtype: torch.dtype, numel: int) -> "PieceTrim | None":
        """Keep magnitudes >= ``threshold``, as :func:`trim_at` does; None where ``dtype`` needs the mask route."""
        below = just_below(threshold, dtype)
        return None if below is None else cls(below, None, numel)

    def __call__(self, d: torch.Tensor, start: int) -> torch.Tensor:
        kept = torch.nn.functional.hardshrink(d, self.above) if self.above >= 0 else d
        if self.extra is not None:
            piece = start // PIECE
            lo, hi = self.starts[piece], self.starts[piece + 1]
            if hi > lo:
                j = self.extra[lo:hi] - start
                kept[j] = d[j]
        return kept


def _piece_rules(base, models, ctx: MethodContext, variant: Variant, prm: dict) -> list[tuple] | None:
    """Per model, what an element-wise sparsification does to each piece of τ_i: (DARE's keep mask of the
    whole tensor or None, then the trim: None, a :class:`PieceTrim`, a magnitude threshold or a keep mask of
    the whole tensor).
    None when the variant is not element-wise with these parameters (``rescale: l1``, Breadcrumbs, DELLA).
    The masks that need the whole τ_i (a per-tensor top-k) are found here, one task vector at a time."""
    if variant.sparsify not in ("random", "magnitude", "random+magnitude") or prm.get("rescale") == "l1":
        return None
    random = variant.sparsify in ("random", "random+magnitude")
    seed = ctx.generator.initial_seed()
    rules = []
    for i, m in enumerate(models):
        drop = dare_keep_mask(base.shape, prm["p"][i], seed, i, ctx.offset).to(base.device) if random else None
        trim = None
        density = prm["density"][i] if variant.sparsify != "random" else 1.0
        if density < 1:
            glob = prm.get("trim", "per_tensor") == "global"
            if glob and ctx.reduction is not None:
                trim = ctx.reduction[i]
            else:
                d = m - base
                if drop is not None:
                    d.mul_(drop)
                    if prm["rescale"] == "inverse":
                        d.div_(1.0 - prm["p"][i])
                if glob:
                    trim = magnitude_threshold(d, density)
                elif ctx.reduction is not None:  # a row block of a tensor trimmed per tensor
                    trim = cut_mask(d.abs_(), ctx.reduction[i], ctx.offset)
                else:
                    trim = PieceTrim(*top_k_cut(d.abs_(), int(density * d.numel())), d.numel())
                del d
        if isinstance(trim, float) and trim > 0:  # a threshold: kept at least, in one float pass where it can be
            trim = PieceTrim.at_least(trim, torch.promote_types(m.dtype, base.dtype), base.numel()) or trim
        rules.append((drop, trim))
    return rules


def _in_pieces(base, models, rules, variant: Variant, prm: dict, w: list[float], normalize: bool,
               lam: float) -> torch.Tensor:
    """The merge computed ``PIECE`` elements at a time: per piece, each τ_i = m_i − base, its drop and
    trim (``rules``), the combination, λ and the base — the same operations on each element as the
    whole-tensor path, so the same bits, with every temporary a piece instead of a tensor."""
    out = torch.empty(base.shape, dtype=torch.promote_types(models[0].dtype, base.dtype), device=base.device)
    flat_out, flat_base = out.view(-1), base.reshape(-1)
    flat_models = [m.reshape(-1) for m in models]
    flat_rules = [(None if drop is None else drop.view(-1),
                   trim.view(-1) if isinstance(trim, torch.Tensor) else trim) for drop, trim in rules]
    for s in range(0, flat_base.numel(), PIECE):
        b = flat_base[s:s + PIECE]
        taus = []
        for i, (m, (drop, trim)) in enumerate(zip(flat_models, flat_rules)):
            d = m[s:s + PIECE] - b
            if drop is not None:
                d.mul_(drop[s:s + PIECE])
                if prm["rescale"] == "inverse":
                    d.div_(1.0 - prm["p"][i])
            if isinstance(trim, PieceTrim):
                d = trim(d, s)
            elif isinstance(trim, torch.Tensor):
                d.mul_(trim[s:s + PIECE])
            elif trim is not None:
                d = trim_at(d, trim, inplace=True)
            taus.append(d)
        merged = sign_consensus(taus, w, normalize) if variant.consensus else linear_combine(taus, w, normalize)
        flat_out[s:s + PIECE] = scale_and_add(merged, lam, b)
    return out


def general_task_arithmetic(base, models, ctx: MethodContext, variant: Variant, **params) -> torch.Tensor:
    """θ_base + λ · combine(w_i, sparsify(τ_i)), as ``variant`` says. Element-wise variants run in pieces
    (:func:`_in_pieces`) on tensors larger than one piece: the same bits, a fraction of the memory traffic."""
    lam = take_lambda(params)
    w = per_model(params.pop("weight"), len(models), "weight", ctx)
    prm = _per_model_params(variant, models, ctx, params)
    if base.numel() > PIECE:
        rules = _piece_rules(base, models, ctx, variant, prm)
        if rules is not None:
            return _in_pieces(base, models, rules, variant, prm, w, params["normalize"], lam)
    taus: Iterable[torch.Tensor] = _sparsified(base, models, ctx, variant, prm)
    if variant.consensus:
        merged = sign_consensus(list(taus), w, params["normalize"])
    else:
        merged = linear_combine(taus, w, params["normalize"])
    return scale_and_add(merged, lam, base)


# --------------------------------------------------------------------------- the trim's pre-pass
def _densities(params: dict) -> tuple[float, ...]:
    return tuple(params["density"] if isinstance(params["density"], list) else [params["density"]])


def _trim_group(params: dict) -> tuple | None:
    """Tensors that share the global trim's thresholds: those with the same densities."""
    if params.get("trim") != "global":
        return None
    dens = _densities(params)
    return None if all(d >= 1 for d in dens) else dens


def _trims_per_tensor(params: dict) -> bool:
    """A row-blocked tensor needs its own pre-pass: ``trim: per_tensor`` with a density below 1."""
    return params.get("trim") == "per_tensor" and not all(d >= 1 for d in _densities(params))


@dataclass
class _TrimThresholds:
    """Per task vector, the exact k-th largest magnitude over every tensor of the group: a threshold
    (``trim: global``), or a :class:`TrimCut` (``trim: per_tensor``, the group being one tensor's row
    blocks)."""

    variant: Variant
    densities: tuple[float, ...]
    per_tensor: bool = False

    def __post_init__(self):
        self.select = [StreamedKthLargest(d, exact_count=self.per_tensor) for d in self.densities]

    @property
    def done(self) -> bool:
        return all(s.done for s in self.select)

    def feed(self, base, models, ctx: MethodContext, params: dict) -> None:
        prm = _per_model_params(self.variant, models, ctx, dict(params))
        random = self.variant.sparsify == "random+magnitude"
        for i, m in enumerate(models):
            if self.select[i].done:
                continue
            d = m - base
            if random:  # what precedes the trim: DARE's drop
                d = _random(d, i, prm, ctx)
            self.select[i].feed(d.abs_(), ctx.offset)

    def next_pass(self) -> None:
        for s in self.select:
            s.next_pass()

    def result(self) -> list:
        if not self.per_tensor:
            return [s.threshold for s in self.select]
        return [TrimCut(s.threshold, s.ties, dict(s.ties_before)) for s in self.select]


def _trim_reduction(variant: Variant) -> Reduction:
    def start(params: dict) -> _TrimThresholds:
        per_tensor = params.get("trim") == "per_tensor"
        return _TrimThresholds(variant, _densities(params) if per_tensor else _trim_group(params), per_tensor)

    return Reduction(group=_trim_group, start=start, when_blocked=_trims_per_tensor)


# ------------------------------------------------- Breadcrumbs' and DELLA's per-tensor pre-pass (row blocks)
def _sparsifies(params: dict) -> bool:
    return not all(d >= 1 for d in _densities(params))


@dataclass
class _OutlierCuts:
    """Breadcrumbs on a tensor merged in row blocks: per task vector, the ranks its mask keeps as two exact
    :class:`selection.StreamedRankCut` (passes over the blocks, 2 for float32), then with ``rescale: l1`` one
    more pass for the L1 norms of τ_i and of its kept entries."""

    variant: Variant
    params: dict

    def __post_init__(self):
        self.cuts: list[tuple[StreamedRankCut, StreamedRankCut] | None] = []
        self.l1 = self.params.get("rescale") == "l1"
        self.sums = RowSums()
        self.summed = False

    def _start(self, models, ctx: MethodContext) -> dict:
        prm = _per_model_params(self.variant, models, ctx, dict(self.params))
        if not self.cuts:
            for dens, gamma in zip(prm["density"], prm["gamma"]):
                if dens >= 1:
                    self.cuts.append(None)
                    continue
                self.cuts.append(tuple(StreamedRankCut(lambda n, d=dens, g=gamma, side=side:
                                                       outlier_bounds(n, d, g)[side]) for side in (0, 1)))
        return prm

    def _cuts_found(self) -> bool:
        return all(c is None or c[1].done and c[0].done for c in self.cuts)

    @property
    def done(self) -> bool:
        return bool(self.cuts) and self._cuts_found() and (not self.l1 or self.summed)

    def _cut(self, i: int) -> OutlierCut:
        lower, upper = self.cuts[i]
        return OutlierCut(lower.cut, upper.cut)

    def feed(self, base, models, ctx: MethodContext, params: dict) -> None:
        self._start(models, ctx)
        cutting = not self._cuts_found()
        for i, m in enumerate(models):
            if self.cuts[i] is None:
                continue
            d = m - base
            if cutting:
                mag = d.abs_()
                for c in self.cuts[i]:
                    c.feed(mag, ctx.offset)
            else:  # the L1 pass
                row = first_row(d, ctx.offset)
                self.sums.add(f"tau{i}", row, row_sums(d, torch.abs))
                self.sums.add(f"kept{i}", row, row_sums(outliers_by_cut(d, self._cut(i), ctx.offset), torch.abs))

    def next_pass(self) -> None:
        if self._cuts_found():
            self.summed = True
            return
        for c in self.cuts:
            if c is not None:
                c[0].next_pass()
                c[1].next_pass()

    def result(self) -> list:
        out = []
        for i, c in enumerate(self.cuts):
            if c is None:
                out.append(None)
                continue
            l1 = (self.sums.total(f"tau{i}"), self.sums.total(f"kept{i}")) if self.l1 else None
            out.append(replace(self._cut(i), l1=l1))
        return out


@dataclass
class _MagpruneNorms:
    """DELLA with ``rescale: l1`` on a tensor merged in row blocks: per task vector, the L1 norms of τ_i and
    of MagPrune's kept entries (one pass; the draws are keyed by element, so the pre-pass draws what the
    merge will)."""

    variant: Variant
    params: dict
    done: bool = False

    def __post_init__(self):
        self.sums = RowSums()
        self.count = 0

    def feed(self, base, models, ctx: MethodContext, params: dict) -> None:
        prm = _per_model_params(self.variant, models, ctx, dict(self.params))
        self.count = len(models)
        for i, m in enumerate(models):
            if prm["density"][i] >= 1:
                continue
            d = m - base
            kept, _ = magprune_kept(d, prm["density"][i], prm["epsilon"][i], ctx, i)
            row = first_row(d, ctx.offset)
            self.sums.add(f"tau{i}", row, row_sums(d, torch.abs))
            self.sums.add(f"kept{i}", row, row_sums(kept, torch.abs))

    def next_pass(self) -> None:
        self.done = True

    def result(self) -> list:
        return [(self.sums.total(f"tau{i}"), self.sums.total(f"kept{i}")) if f"tau{i}" in self.sums.parts else None
                for i in range(self.count)]


def _outlier_reduction(variant: Variant) -> Reduction:
    return Reduction(group=lambda params: None, start=lambda params: _OutlierCuts(variant, dict(params)),
                     when_blocked=_sparsifies)


def _magprune_reduction(variant: Variant) -> Reduction:
    return Reduction(group=lambda params: None, start=lambda params: _MagpruneNorms(variant, dict(params)),
                     when_blocked=lambda params: params.get("rescale") == "l1" and _sparsifies(params))


# ------------------------------------------------------------------------------------------ registry
def _register(name: str, variant: Variant) -> None:
    def fn(base, models, ctx, **params):
        return general_task_arithmetic(base, models, ctx, variant, **params)

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = variant.summary
    has_trim = any(p.name == "trim" for p in variant.params)
    reduction = (_trim_reduction(variant) if has_trim else _outlier_reduction(variant)
                 if variant.sparsify == "outliers" else _magprune_reduction(variant)
                 if variant.sparsify == "magprune" else None)
    register(name, params=variant.params, needs_base=True, reference=variant.reference, summary=variant.summary,
             models_as_read=variant.sparsify in ("magnitude", "random", "random+magnitude"),
             reduction=reduction, elementwise=_elementwise(variant))(fn)


def _elementwise(variant: Variant):
    """When a variant may run over row blocks: its sparsification is element-wise given a per-tensor pre-pass
    (TIES's threshold, Breadcrumbs' rank cuts, DELLA's L1 norms; DELLA's keep probabilities rank the entries
    of a row along the last dimension, which a row block holds whole), its randomness keyed by element; TIES
    and DARE not with ``rescale: l1`` (a norm of the whole tensor after the trim, not in their pre-pass)."""
    if variant.sparsify in ("outliers", "magprune"):
        return lambda params: True
    return lambda params: params.get("rescale", "none") != "l1"


for _name, _variant in VARIANTS.items():
    _register(_name, _variant)
