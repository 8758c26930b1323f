"""PCB-Merging: parameter competition balancing (Du et al., NeurIPS 2024), as its authors' code runs it.

τ_i = θ_i − θ_base, each flattened to a row of d entries; N models. For each model i:

1. **clip**: a_i = |τ_i| clamped to [its ⌊d·c⌋-th, its ⌊d(1 − c) − 1⌋-th smallest value] (0-based,
   c = ``clip``); τ̂_i = sign(τ_i) · a_i;
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

**Scope: global by default, as the reference.** The reference flattens the whole model into one row per task,
so its clip quantiles, its min-max normalisations and its kept fraction ρ span every parameter at once;
``scope: global`` computes exactly those whole-model quantities before the merge, in streaming passes over the
inputs (:data:`REDUCTION`: two passes resolve each task vector's clip bounds of |τ_i| to the last bit, two more,
which need them, the drop's floor and the largest balanced score; then the merge pass — five reads of the
inputs in all, memory independent of the model's size). ``scope: per_tensor`` takes them over each tensor
instead (one read): every weight matrix then keeps the same fraction ρ, as TIES's and DARE's per-tensor forms
do, where the global form lets the tensors with the largest updates take most of the budget. Called directly
on one tensor, the method takes them over that tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import OmnimergeError
from .combine import WEIGHT, per_model, take_lambda
from .registry import MethodContext, Param, Reduction, register
from .selection import kth_largest

_REF = ("Parameter Competition Balancing for Model Merging (Du et al., NeurIPS 2024), arXiv:2410.02396; "
        "code: duguodong7/pcb-merging")
_DEFAULTS = ("duguodong7/pcb-merging @5897888, pcb-merging.py: PCB_merge(..., pcb_ratio=0.1) (line 31), clamp "
             "min_ratio=max_ratio=0.0001 (line 34), lams = [1.2]*n (line 52); one flattened row per task "
             "(scope global), lines 31-44")

DENSITY = Param("density", float, 0.1, "ρ: fraction of each task vector's entries kept, by balanced score "
                "(the reference's pcb_ratio)", minimum=0.0, maximum=1.0, exclusive_minimum=True)
CLIP = Param("clip", float, 1e-4, "fraction of each task vector's smallest and of its largest magnitudes "
             "clamped (to the quantiles) before balancing", minimum=0.0, maximum=0.5, exclusive_maximum=True)
LAMBDA = Param("lambda", float, 1.2, "scale of the merged task vector (the reference's lams)")
SCOPE = Param("scope", str, "global", "where the clip quantiles, the normalisations and the kept fraction are "
              "taken: global (over every tensor the method merges, per task vector: the reference) or per_tensor",
              choices=("global", "per_tensor"))


def _kth_smallest_rows(x: torch.Tensor, index: int) -> torch.Tensor:
    """The ``index``-th smallest (0-based) of each row of ``x`` (N, d), as (N, 1); exact, by selection."""
    d = x.shape[1]
    index = min(max(index, 0), d - 1)
    return torch.stack([kth_largest(row, d - index) for row in x])[:, None]


def _minmax_rows_(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(x − lo)/(hi − lo) per row, in ``x``'s memory; 0 on a row with hi = lo."""
    span = hi - lo
    flat = span == 0
    return x.sub_(lo).div_(span.masked_fill_(flat, 1.0)).mul_(~flat)


def _positions(d: int, density: float, clip: float) -> tuple[int, int, int]:
    """0-based ascending positions, among d entries, of the clip's lower and upper bounds and of the drop's floor."""
    last = max(d - 1, 0)
    return (min(int(d * clip), last), min(max(int(d * (1 - clip) - 1), 0), last),
            min(int(d * (1 - density)), last))


def _column(values, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]


def raw_scores(taus: torch.Tensor, mags: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Intra- × inter-balancing of each entry, from the clipped magnitudes and their bounds lo, hi (N, 1)."""
    scores = _minmax_rows_(mags.clone(), lo, hi)
    scores.square_().sub_(1.0).mul_(taus.shape[0]).exp_()  # intra: exp(N·norm²) up to a factor (module doc)
    return scores.mul_(torch.tanh(taus * taus.sum(dim=0, keepdim=True)))  # × inter


def balancing_scores(taus: torch.Tensor, density: float, clip: float, bounds=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(τ̂, β): the clipped task vectors and their balanced, dropped and normalised scores, both (N, d).

    ``bounds``: per model (lo, hi, floor, top) taken over every tensor of the merge (``scope: global``: the clip
    bounds, the drop's floor and the largest score); None takes them over ``taus``. ``taus`` is overwritten
    (it becomes τ̂): pass a stack of your own."""
    mags = taus.abs()
    if bounds is None:
        i_lo, i_hi, i_floor = _positions(taus.shape[1], density, clip)
        lo, hi = _kth_smallest_rows(mags, i_lo), _kth_smallest_rows(mags, i_hi)
    else:
        lo, hi = _column([b[0] for b in bounds], taus), _column([b[1] for b in bounds], taus)
    mags.clamp_(min=lo, max=hi)
    scores = raw_scores(taus, mags, lo, hi)
    clipped = taus.sign_().mul_(mags)
    del mags
    if bounds is None:
        floor, top = _kth_smallest_rows(scores, i_floor), scores.max(dim=1, keepdim=True).values
    else:
        floor, top = _column([b[2] for b in bounds], scores), _column([b[3] for b in bounds], scores)
    return clipped, _minmax_rows_(scores.clamp_(min=floor), floor, top)


# ---------------------------------------------------------------------------- the global scope's pre-pass
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64}
_DIGIT = 16


class StreamedOrderStatistic:
    """The exact value at one ascending position (0-based, ``position(N)`` of the N values fed) of floats of any
    sign that arrive in chunks, over 16-bit-digit passes (two for float32): a float's bit pattern, its magnitude
    bits flipped when negative, orders as a signed integer like the float; each pass histograms the next digit
    of the patterns that share the digits fixed so far."""

    def __init__(self, position):
        self.position = position
        self.n = 0
        self.rank: int | None = None
        self.prefix = 0
        self.resolved = 0
        self.bits: int | None = None
        self.hist: torch.Tensor | None = None
        self.value: float | None = None

    @property
    def done(self) -> bool:
        return self.value is not None

    def _keys(self, values: torch.Tensor) -> torch.Tensor:
        p = values.reshape(-1).contiguous().view(_INT_VIEW[values.dtype]).to(torch.int64)
        return torch.where(p < 0, p ^ ((1 << (self.bits - 1)) - 1), p)

    def feed(self, values: torch.Tensor) -> None:
        if self.done:
            return
        if self.bits is None:
            self.dtype, self.bits = values.dtype, torch.finfo(values.dtype).bits
        elif values.dtype != self.dtype:
            raise ValueError(f"every chunk must be {self.dtype}, got {values.dtype}")
        if self.resolved == 0:
            self.n += values.numel()
        keys = self._keys(values)
        shift = self.bits - self.resolved - _DIGIT
        if self.resolved == 0:
            digits = (keys >> shift) + (1 << (_DIGIT - 1))  # the signed top digit, offset to 0 … 2^16 − 1
        else:
            digits = (keys[(keys >> (shift + _DIGIT)) == self.prefix] >> shift) & ((1 << _DIGIT) - 1)
        counts = torch.bincount(digits.cpu(), minlength=1 << _DIGIT)
        self.hist = counts if self.hist is None else self.hist.add_(counts)

    def next_pass(self) -> None:
        if self.done:
            return
        if self.rank is None:
            if self.n == 0:
                self.value = 0.0
                return
            self.rank = min(max(self.position(self.n), 0), self.n - 1)
        cum = self.hist.cumsum(0)
        digit = int(torch.searchsorted(cum, torch.tensor(self.rank), right=True))
        self.rank -= int(cum[digit - 1]) if digit > 0 else 0
        top = self.resolved == 0
        self.prefix = digit - (1 << (_DIGIT - 1)) if top else (self.prefix << _DIGIT) | digit
        self.resolved += _DIGIT
        self.hist = None
        if self.resolved == self.bits:
            key = self.prefix if self.prefix >= 0 else self.prefix ^ ((1 << (self.bits - 1)) - 1)
            pattern = torch.tensor([key], dtype=torch.int64).to(_INT_VIEW[self.dtype])
            self.value = float(pattern.view(self.dtype)[0])


def _group(params: dict) -> tuple | None:
    return (float(params["density"]), float(params["clip"])) if params.get("scope") == "global" else None


@dataclass
class _Bounds:
    """Per model, over every tensor of the group: the clip's bounds of |τ_i| (first), then the drop's floor
    and the largest of the balanced scores (which need the bounds)."""

    density: float
    clip: float

    def __post_init__(self):
        self.stage = 0
        self.sel: list[list[StreamedOrderStatistic]] | None = None
        self.bounds: list[tuple[float, float]] = []
        self.top: list[float] = []

    @property
    def done(self) -> bool:
        return self.stage == 2

    def _select(self, n_models: int, which: tuple[int, ...]) -> list[list[StreamedOrderStatistic]]:
        return [[StreamedOrderStatistic(lambda d, w=w: _positions(d, self.density, self.clip)[w]) for w in which]
                for _ in range(n_models)]

    def feed(self, base, models, ctx: MethodContext, params: dict) -> None:
        if self.done:
            return
        taus = torch.stack([(m - base).reshape(-1) for m in models])
        if self.sel is None:
            self.sel = self._select(len(models), (0, 1))
            self.top = [-math.inf] * len(models)
        if self.stage == 0:
            mags = taus.abs()
            for i, (lo, hi) in enumerate(self.sel):
                lo.feed(mags[i])
                hi.feed(mags[i])
            return
        lo = _column([b[0] for b in self.bounds], taus)
        hi = _column([b[1] for b in self.bounds], taus)
        scores = raw_scores(taus, taus.abs().clamp_(min=lo, max=hi), lo, hi)
        for i, (floor,) in enumerate(self.sel):
            floor.feed(scores[i])
            self.top[i] = max(self.top[i], float(scores[i].max()))

    def next_pass(self) -> None:
        for row in self.sel or []:
            for s in row:
                s.next_pass()
        if self.sel is not None and all(s.done for row in self.sel for s in row):
            if self.stage == 0:
                self.bounds = [(lo.value, hi.value) for lo, hi in self.sel]
                self.sel = self._select(len(self.sel), (2,))
            self.stage += 1

    def result(self) -> list[tuple[float, float, float, float]]:
        return [(lo, hi, floor.value, top) for (lo, hi), (floor,), top in zip(self.bounds, self.sel, self.top)]


REDUCTION = Reduction(group=_group, start=lambda params: _Bounds(*_group(params)))


@register(
    "pcb", params=(DENSITY, CLIP, SCOPE, WEIGHT, LAMBDA), needs_base=True, min_models=1, reference=_REF,
    defaults_from=_DEFAULTS, reduction=REDUCTION,
    summary="PCB-Merging: score each task-vector entry by intra-balancing (its own magnitude) × inter-balancing "
            "(agreement with the others), keep the top density of scores per task vector, and take the "
            "score-weighted mean of the clipped task vectors (quantiles over the whole model by default).",
)
def pcb(base, models, ctx, density, clip, scope, weight, **kw):
    lam = take_lambda(kw)
    w = per_model(weight, len(models), "weight", ctx)
    if base is None:
        raise OmnimergeError(f"{ctx.key}: pcb needs a base model (task vectors are θ_i − θ_base)")
    taus = torch.stack([(m - base).reshape(-1) for m in models])
    if taus.shape[1] == 0:
        return base.clone()
    bounds = ctx.reduction if scope == "global" else None
    clipped, scores = balancing_scores(taus, density, clip, bounds)
    weights = torch.tensor(w, dtype=taus.dtype, device=taus.device)[:, None]
    ctx.info["kept"] = round(float((scores > 0).float().mean()), 6)
    total = scores.sum(dim=0).clamp_min_(1e-12)
    merged = clipped.mul_(weights).mul_(scores).sum(dim=0).div_(total)
    return base + lam * merged.reshape(base.shape)
