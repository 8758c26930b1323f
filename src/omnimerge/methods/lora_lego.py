"""LoRA-LEGO (Zhao et al., ICLR 2025): LoRAs taken apart into rank-one "minimal semantic units" (MSUs),
clustered, and reassembled into one LoRA of rank k.

A LoRA update B A = Σ_j b_j a_jᵀ is a sum of rank-one units; unit j is the vector [a_j; b_j] (A's row j next to
B's column j). Units can be permuted (permutation invariance) and the units of several LoRAs concatenated into
one LoRA whose update is the sum of theirs (concatenation-summation equivalence). LoRA-LEGO pools the units of
all the LoRAs, groups them into k clusters by k-means, and takes each cluster's centroid as one unit of the
merged LoRA, which therefore has rank ≤ k. Two reweightings fix the scale: the *parameter* reweighting rescales
each centroid to the mean norm of its cluster's units (averaging units that are not parallel shrinks them:
"norm decay"), the *output* reweighting scales the merged update by √(r̄/k') (r̄: the experts' mean rank, k':
the merged rank), so that an update made of more units does not grow in variance with their number
("variance expansion"). θ_base + λ · B' A'.

**Which units.** The run hands a method dense tensors — a LoRA expert arrives as θ_base + (α/r)·B A, read by
``checkpoints/peft_reader.py`` — not the adapter's factors, so omnimerge takes the units of each expert's
update from its SVD: Δ_i = w_i τ_i = Σ_j σ_j u_j v_jᵀ, unit j = [√σ_j v_j; √σ_j u_j] (both halves carry the same
scale, as ``--as-lora``'s factors do), its sign fixed so that the largest-magnitude entry of its A half is
positive (u v ᵀ = (−u)(−v)ᵀ: without a convention, k-means would average opposite copies of one unit to zero).
A LoRA's update has exactly r such units (its numerical rank, ``unit_rank: auto``); they span the same row
and column spaces as the trained factors' units and are the canonical choice among the factorisations
B A = (B R)(R⁻¹ A), which the trained units are one arbitrary member of. The factors as trained are therefore
not what is clustered: the clusters are those of the SVD units.

**Full fine-tunes** have no units of their own: with ``unit_rank: auto`` the plan refuses them. Given a rank
rule (``unit_rank: 16``, ``knee``, ...), each full task vector is first cut to that many leading singular units
(the LoRA that ``omnimerge extract`` would write), and those are clustered.

Tensors that are not matrices (norms, biases) get the weighted mean of the task vectors.

What comes from the paper and what is omnimerge's: the units, the pooling, k-means with k clusters, centroids
as the merged units, and the two reweightings by name are the paper's (arXiv:2409.16167, sections 3-4; no
official code was available to compare with). The exact forms chosen here — the centroid rescaled to its
cluster's mean unit norm, the output scale √(r̄/k'), k-means++ seeding from the run's per-tensor generator and
at most ``iterations`` Lloyd steps, ``rank: auto`` = the largest expert rank, SVD units — are omnimerge's.
"""

from __future__ import annotations

import math

import torch

from ..errors import OmnimergeError
from .combine import LAMBDA, WEIGHT, per_model, take_lambda
from .linalg import leading_svd, spectrum
from .ranks import RULE_DOC, check_rank_rule, choose_rank
from .registry import InputFacts, MethodContext, Param, register

NUMERICAL_RTOL = 1e-5  # unit_rank auto: singular values above this fraction of σ_1 are units
SKETCH = 32  # unit_rank auto: first sketch width of the low-rank finder (doubled while the rank fills it)
SKETCH_MARGIN = 8  # the sketch must exceed the rank it finds by this many columns

_REF = ("Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to Extremes Through Rank-Wise "
        "Clustering (Zhao et al., ICLR 2025), arXiv:2409.16167")
_DEFAULTS = ("the paper (sections 3-4: MSUs, k-means into k clusters, parameter and output reweighting); no "
             "official code was found. omnimerge's choices: SVD units, rank auto = the largest expert rank, "
             "centroid norm = its cluster's mean unit norm, output × √(mean expert rank / merged rank), k-means++ "
             "seeding, 100 Lloyd iterations")


def _check_unit_rank(value):
    return "auto" if value == "auto" else check_rank_rule(value)


def _check_k(value):
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value) or value < 1:
        raise ValueError(f"must be auto or an integer >= 1, got {value!r}")
    return int(value)


UNIT_RANK = Param("unit_rank", str, "auto", "units taken from each expert's update: auto (its numerical rank: a "
                  "LoRA's r; LoRA experts only) or a rank rule (each task vector cut to that many singular units: "
                  "the route for full fine-tunes)", check=_check_unit_rank, kind_text="auto or rank rule",
                  range_doc="auto, " + RULE_DOC)
RANK = Param("rank", str, "auto", "k: clusters, the merged LoRA's rank (auto: the largest expert rank)",
             check=_check_k, kind_text="auto or integer", range_doc="auto, integer >= 1")
REWEIGHT_PARAMETERS = Param("reweight_parameters", bool, True, "rescale each centroid to its cluster's mean unit "
                            "norm (norm decay)")
REWEIGHT_OUTPUT = Param("reweight_output", bool, True, "scale the merged update by √(mean expert rank / merged "
                        "rank) (variance expansion)")
ITERATIONS = Param("iterations", int, 100, "most Lloyd iterations of k-means", minimum=1)


def resolve_lora_lego(params: dict, facts: InputFacts) -> dict:
    """Refuse full fine-tunes unless ``unit_rank`` says how to cut them into units."""
    if params["unit_rank"] == "auto" and not facts.lora_experts:
        raise OmnimergeError(
            "lora_lego merges LoRA adapters (it clusters their rank-one units), but not every model of this merge "
            "is a LoRA adapter; give LoRA adapter folders as models, or set `unit_rank:` to a rank rule (e.g. 16 "
            "or knee) to cut each full fine-tune's task vector into that many singular units first")
    return params


# ------------------------------------------------------------------------------------------- the units
def low_rank_svd(delta: torch.Tensor, generator: torch.Generator | None = None):
    """(U, S, Vh) of ``delta`` restricted to its singular values above NUMERICAL_RTOL·σ_1, found from a random
    sketch when its rank is low (a LoRA's update: exact, as the sketch then spans its whole column space,
    which the residual check confirms), or None when the sketch shows no low rank (up to min(m, n)/4)."""
    m, n = delta.shape
    q = SKETCH
    while 4 * q <= min(m, n):
        omega = torch.randn(n, q, generator=generator, dtype=delta.dtype,
                            device=generator.device if generator is not None else "cpu").to(delta.device)
        basis, _ = torch.linalg.qr(delta @ omega)
        small = basis.T @ delta
        ub, s, vh = torch.linalg.svd(small, full_matrices=False)
        k = int((s > NUMERICAL_RTOL * s[0]).sum()) if float(s[0]) > 0 else 0
        if k <= q - SKETCH_MARGIN and float((delta - basis @ small).norm()) <= NUMERICAL_RTOL * float(s[0]):
            return basis @ ub[:, :k], s[:k], vh[:k]
        q *= 2
    return None


def units(delta: torch.Tensor, unit_rank, generator: torch.Generator | None = None) -> torch.Tensor:
    """The rank-one units of one matrix update (m × n), as rows [a_j; b_j] of length n + m: B A = Σ_j b_j a_jᵀ."""
    m, n = delta.shape
    if float(delta.abs().max()) == 0:
        return delta.new_zeros((0, n + m))
    found = low_rank_svd(delta, generator) if unit_rank == "auto" else None
    if found is not None:
        u, sv, vh = found
    else:
        s = spectrum(delta)
        if unit_rank == "auto":
            r = int((s > NUMERICAL_RTOL * s[0]).sum())
        else:
            r = choose_rank(unit_rank, delta.shape, s)
        u, sv, vh = leading_svd(delta, r, generator=generator)
    keep = sv > 0
    root = sv[keep].sqrt()
    a = vh[keep] * root[:, None]
    b = u[:, keep].T * root[:, None]
    lead = a.abs().argmax(dim=1)
    sign = torch.sign(a[torch.arange(a.shape[0], device=a.device), lead])
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)[:, None]
    return torch.cat([a * sign, b * sign], dim=1)


# --------------------------------------------------------------------------------------------- k-means
def _draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    """An index drawn with probability ∝ ``weights`` (non-negative), from ``generator`` only."""
    total = float(weights.sum())
    x = float(torch.rand(1, generator=generator, device=generator.device)) * total
    cum = weights.double().cumsum(0)
    return min(int(torch.searchsorted(cum, torch.tensor([x], dtype=cum.dtype, device=cum.device), right=True)),
               weights.numel() - 1)


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 100) -> torch.Tensor:
    """Cluster labels (M,) of the rows of ``x`` (M × D) into at most k clusters: k-means++ seeding, then Lloyd
    steps until no label changes (or ``iterations``). With M ≤ k every row is its own cluster."""
    n_rows = x.shape[0]
    if n_rows <= k:
        return torch.arange(n_rows, device=x.device)
    centers = [x[_draw(torch.ones(n_rows, dtype=x.dtype, device=x.device), generator)]]
    d2 = (x - centers[0]).square().sum(dim=1)
    for _ in range(1, k):
        if float(d2.sum()) <= 0:  # fewer distinct rows than k
            break
        centers.append(x[_draw(d2, generator)])
        d2 = torch.minimum(d2, (x - centers[-1]).square().sum(dim=1))
    c = torch.stack(centers)
    labels = None
    for _ in range(iterations):
        new = torch.cdist(x, c).argmin(dim=1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        for j in range(c.shape[0]):
            members = labels == j
            if bool(members.any()):
                c[j] = x[members].mean(dim=0)
    return labels


def assemble(pool: torch.Tensor, labels: torch.Tensor, n: int, reweight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(B' (m × k'), A' (k' × n)) from the centroids of the non-empty clusters of ``pool``'s units."""
    cents = []
    for j in torch.unique(labels):
        members = pool[labels == j]
        c = members.mean(dim=0)
        if reweight:
            norm = c.norm()
            if float(norm) > 0:
                c = c * (members.norm(dim=1).mean() / norm)
        cents.append(c)
    cents = torch.stack(cents)
    return cents[:, n:].T, cents[:, :n]


# ------------------------------------------------------------------------------------------ the method
def lego_update(deltas: list[torch.Tensor], ctx: MethodContext, unit_rank, rank, reweight_parameters: bool,
                reweight_output: bool, iterations: int) -> torch.Tensor:
    """The merged update B' A' (times the output reweighting) of the matrix updates ``deltas``."""
    m, n = deltas[0].shape
    per_expert = [units(d, unit_rank, ctx.generator) for d in deltas]
    ranks = [u.shape[0] for u in per_expert if u.shape[0] > 0]
    if not ranks:
        return torch.zeros_like(deltas[0])
    pool = torch.cat(per_expert)
    k = max(ranks) if rank == "auto" else int(rank)
    labels = kmeans(pool, k, ctx.generator, iterations)
    b, a = assemble(pool, labels, n, reweight_parameters)
    merged = b @ a
    if reweight_output:
        merged = merged * math.sqrt(sum(ranks) / len(ranks) / a.shape[0])
    ctx.info["rank"] = a.shape[0]
    ctx.info["units"] = pool.shape[0]
    return merged


@register(
    "lora_lego", params=(RANK, UNIT_RANK, REWEIGHT_PARAMETERS, REWEIGHT_OUTPUT, ITERATIONS, WEIGHT, LAMBDA),
    needs_base=True, min_models=1, reference=_REF, defaults_from=_DEFAULTS, resolve=resolve_lora_lego,
    summary="LoRA-LEGO: pool the rank-one units of the experts' LoRA updates, k-means them into k clusters, "
            "rebuild one LoRA of rank ≤ k from the (norm-reweighted) centroids; LoRA experts (full fine-tunes "
            "with unit_rank set).",
)
def lora_lego(base, models, ctx, rank, unit_rank, reweight_parameters, reweight_output, iterations, weight, **kw):
    lam = take_lambda(kw)
    w = per_model(weight, len(models), "weight", ctx)
    if base is None:
        raise OmnimergeError(f"{ctx.key}: lora_lego needs the base model the LoRA adapters were trained on")
    if base.ndim != 2:
        ctx.info["fallback"] = "mean"
        return base + lam * sum(wi * (m - base) for wi, m in zip(w, models)) / len(models)
    deltas = [wi * (m - base) for wi, m in zip(w, models)]
    return base + lam * lego_update(deltas, ctx, unit_rank, rank, reweight_parameters, reweight_output, iterations)
