"""Spectral merges: TSV, Iso-C and Iso-CTS (docs/methods.md), each with an exact and a fast path.

τ_i = θ_i − θ_base; every result is θ_base + α · merged. Matrices are (m, n) = (out, in); tensors of
ndim > 2 are batches of matrices over the last two dimensions; tensors of ndim < 2 take the
``fallback`` (mean or sum of the τ_i). r = min(m, n).

* ``tsv``     per task τ_i = U_i S_i V_iᵀ, keep the k leading components, concatenate U = [U_1k … U_Tk],
              S, V, replace U and V by their polar factors, merged = U diag(S) Vᵀ.
* ``iso_c``   Σ τ_i = U S Vᵀ, merged = mean(S) · U Vᵀ (mean over all r singular values).
* ``iso_cts`` the top k_c = r − T·round((r − ⌊f r⌋)/T) directions of Σ τ_i; each task: remove that
              common left space from τ_i, keep its top (r − k_c)/T directions; concatenate with the
              common ones, polar-orthogonalise U and V, every singular value = the mean of the
              concatenated ones.

**Exact path** (``exact: true``, and every matrix with min(m, n) < ``FAST_MIN``): full SVDs, as the
papers' code does. **Fast path** (default for larger matrices), no full SVD, and the same numbers:
algebraically identical (float64 inputs agree to ~1e-10), and on float32 data within about 1e-4
relative (Frobenius; measured 1e-5 to 3e-4). Where the definition itself is ill-conditioned (TSV /
Iso-CTS with nearly parallel task subspaces, whose polar step amplifies rounding) the float32 exact
path is no closer to the float64 truth than the fast one.

* a spectrum and its singular vectors come from the Gram matrix of the *smaller* side
  (``linalg.gram`` and ``eigh`` in float64: a float32 eigh of a Gram matrix is not accurate near a
  rank cutoff); the other side's vectors follow by one product, V = τᵀ U S⁻¹;
* a polar factor of X with orthonormal blocks is X (XᵀX)^(-1/2) from the eigen-decomposition of the
  small Gram matrix XᵀX, never an SVD of X; with two blocks (TSV with T = 2) from the principal
  angles between them, one eigen-decomposition of half the size (``linalg.two_block_inv_sqrt``);
  the last polar factor is folded into the final product, so the big side is touched by matrix
  products only;
* Iso-C's mean(S) is the mean of the square roots of the Gram eigenvalues (no second decomposition);
* Iso-CTS (m ≤ n): the complement of the common space is spanned by the remaining Gram eigenvectors
  W_r, so each task's SVD is that of the small (r − k_c) × n matrix W_rᵀ τ_i, and the task block of U
  is W_r times the polar factor of a small matrix;
* TSV with a small rank (k ≤ r·``RANDOMIZED_FRACTION``) where the task's spectrum (the Gram
  matrix's eigenvalues) shows that it converges (``linalg.randomized_iters``): a seeded randomized
  SVD (``linalg.top_svd``, the per-tensor generator of the run) instead of the eigenvectors. A fixed
  number of iterations is not enough: on slowly decaying spectra it was 15-86 % off.

**Zero singular values.** Singular vectors of a zero singular value are arbitrary (a full SVD returns
whatever LAPACK completes the basis with), and in TSV / Iso-CTS they would rotate the other tasks'
directions through the polar step. Both paths therefore leave out components of the data (τ_i,
Σ τ_i, the projected τ_i) whose singular value is ≤ ``DATA_RTOL`` = 1e-7 times the largest (the
resolution of a float64 Gram matrix's eigenvalues), and directions of the concatenated factors whose
singular value is ≤ ``linalg.zero_rtol`` (1.2e-5 for float32: duplicated directions, e.g. identical
experts) — a partial isometry instead of an arbitrary completion. On inputs of full numerical rank
this changes nothing; on exactly rank-deficient ones the result is the well-defined one (TSV of T
identical task vectors is their rank-k truncation) — except that a float32 SVD reports exact zeros
as ~1e-6·σ_1, so there the exact path keeps LAPACK's arbitrary directions. Means of singular values
(Iso-C, Iso-CTS) still count the zeros.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch

from ..errors import OmnimergeError
from .linalg import (RAND_OVERSAMPLE, eigh_desc, gram, polar_exact, polar_gram, psd_inv_sqrt, randomized_iters,
                     svd, top_svd, two_block_polar_weights, zero_rtol)
from .ranks import RULE_DOC, check_rank_rule, choose_rank, needs_spectrum, rank_param
from .registry import MethodContext, Param, register

FAST_MIN = 256  # the fast path is taken when min(m, n) >= FAST_MIN (and exact is false)
RANDOMIZED_FRACTION = 1 / 16  # TSV: try the randomized per-task SVD when k <= r * this (and it converges)
DATA_RTOL = 1e-7  # singular values of the data (τ_i, Σ τ_i) at or below DATA_RTOL·σ_1 count as zero
TASK_GRAM_DTYPE = torch.float64  # TSV per-task Gram matrices
TASK_EIGH_DTYPE = torch.float64  # TSV per-task eigen-decompositions

_TSV_REF = (
    "Task Singular Vectors: Reducing Task Interference in Model Merging (Gargiulo et al., CVPR 2025), "
    "arXiv:2412.00081"
)
_ISO_REF = (
    "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces "
    "(Marczak et al., ICML 2025), arXiv:2502.04959"
)

PER_TASK = "per_task"


def _check_tsv_rank(value):
    if value == PER_TASK:
        return value
    return check_rank_rule(value)


_ALPHA = Param("alpha", float, 1.0, "scale of the merged task vector: θ_base + α · merged")
_EXACT = Param("exact", bool, False, "use the reference path (full SVDs) instead of the fast one")
_FALLBACK = Param(
    "fallback", str, "mean", "what tensors that are not matrices (ndim < 2) get: mean or sum of the τ_i",
    choices=("mean", "sum"),
)
_TSV_RANK = replace(
    rank_param("rank", default=PER_TASK,
               help="components kept per task; per_task = ⌊min(m, n)/T⌋ (the paper's), else a rank rule "
                    "applied to each task's spectrum"),
    check=_check_tsv_rank, range_doc=f"{PER_TASK} (⌊min(m, n)/T⌋), " + RULE_DOC,
)
_COMMON_FRACTION = Param(
    "common_fraction", float, 0.8, "f: the common space keeps about f·min(m, n) directions of Σ τ_i",
    minimum=0.0, maximum=1.0,
)


# ---------------------------------------------------------------------------------------- helpers


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _merge(base, models, ctx: MethodContext, alpha: float, fallback: str,
           matrix_fn: Callable[[list[torch.Tensor], int], torch.Tensor]) -> torch.Tensor:
    """θ_base + α · merged, with ``matrix_fn(taus, index)`` on each matrix of a (batch of) matrices."""
    if base is None:
        raise OmnimergeError(f"{ctx.key}: this method needs a base model")
    if not models:
        raise OmnimergeError(f"{ctx.key}: no models to merge")
    if fallback not in ("mean", "sum"):
        raise OmnimergeError(f"{ctx.key}: parameter 'fallback' = {fallback!r} is not allowed; choose mean or sum")
    dt = _compute_dtype(base)
    b = base.to(dt)
    taus = [m.to(dt) - b for m in models]
    if base.ndim < 2:
        merged = torch.stack(taus).sum(0)
        if fallback == "mean":
            merged = merged / len(taus)
        ctx.info["fallback"] = fallback
    else:
        m, n = base.shape[-2], base.shape[-1]
        flat = [t.reshape(-1, m, n) for t in taus]
        merged = torch.stack([matrix_fn([t[j] for t in flat], j) for j in range(flat[0].shape[0])])
        merged = merged.reshape(base.shape)
    return (b + alpha * merged).to(base.dtype)


def _fast(shape, exact: bool) -> bool:
    return not exact and min(shape[-2], shape[-1]) >= FAST_MIN


def _summarise(values: list) -> object:
    """One number when every matrix (and task) agrees, else the list (per matrix of a batch)."""
    flat = [v for vs in values for v in (vs if isinstance(vs, list) else [vs])]
    if flat and all(v == flat[0] for v in flat):
        return flat[0]
    return values[0] if len(values) == 1 else values


def _left_polar(u: torch.Tensor, rtol: float) -> torch.Tensor:
    """Polar factor of a float64 matrix through its smaller Gram matrix (pseudo-inverse square root)."""
    if u.shape[-1] <= u.shape[-2]:
        return u @ psd_inv_sqrt(gram(u, side="right"), rtol)
    return psd_inv_sqrt(gram(u, side="left"), rtol) @ u


# -------------------------------------------------------------------------------------------- TSV


def tsv_rank(rule, shape: tuple[int, ...], n_tasks: int, s: torch.Tensor | None = None) -> int:
    """Components TSV keeps of one task: per_task → max(1, ⌊min(m, n)/T⌋), else the rank rule."""
    if rule == PER_TASK:
        return max(1, min(shape[-2], shape[-1]) // n_tasks)
    return choose_rank(rule, shape, s)


def _task_svd(x: torch.Tensor, rule, n_tasks: int, fast: bool, generator):
    """Leading components of one task: (U (m, k) float64 on the fast path, S (k,), Vh (k, n), k).

    Components with a zero singular value (≤ DATA_RTOL·σ_1) are left out; k is the rule's rank.
    """
    r = min(x.shape)
    if not fast:
        u, s, vh = svd(x)
        k = tsv_rank(rule, x.shape, n_tasks, s)
        keep = s[:k] > DATA_RTOL * s[0]
        return u[:, :k][:, keep], s[:k][keep], vh[:k][keep], k
    # Gram route on the smaller side (the caller makes m <= n).
    g = gram(x, dtype=TASK_GRAM_DTYPE)
    s_all = None
    if rule != PER_TASK and needs_spectrum(rule):  # per_task's k = ⌊r/T⌋ needs no spectrum
        s_all = torch.linalg.eigvalsh(g.double()).flip(-1).clamp_min(0).sqrt()
        k = tsv_rank(rule, x.shape, n_tasks, s_all.to(x.dtype))
    else:
        k = tsv_rank(rule, x.shape, n_tasks)
    if k <= r * RANDOMIZED_FRACTION:  # a small k: the randomized finder, where the spectrum shows it converges
        if s_all is None:
            s_all = torch.linalg.eigvalsh(g.double()).flip(-1).clamp_min(0).sqrt()
        iters = randomized_iters(s_all, k, *x.shape)
        if iters is not None:
            u, s, vh = top_svd(x, k, generator=generator, oversample=RAND_OVERSAMPLE, iters=iters)
            keep = s > DATA_RTOL * s[0]
            return u[:, keep].double(), s[keep], vh[keep], k
    lam, w = eigh_desc(g, dtype=TASK_EIGH_DTYPE)
    del g
    lam, w = lam.double(), w.double()
    s_all = lam.sqrt()
    s = s_all[:k]
    keep = s > DATA_RTOL * s_all[0]
    u, s = w[:, :k][:, keep], s[keep]
    vh = u.to(x.dtype).mT @ x
    vh /= s.to(x.dtype)[:, None]
    return u, s.to(x.dtype), vh, k


def _tsv_parts(taus: list[torch.Tensor], rank, fast: bool, generator, rtol: float):
    """TSV of one matrix with m <= n: (Ū (m, K) orthonormalised, S (K,), Bi, Vh (K, n), ranks).

    The orthonormalised right factor is Bi @ Vh (fast path: Bi = (Vh Vhᵀ)^(-1/2), float64, left to
    the caller to fold into the last product), or Vh itself with Bi = None (exact path).
    """
    us, ss, vhs, ranks = [], [], [], []
    for x in taus:
        u, s, vh, k = _task_svd(x, rank, len(taus), fast, generator)
        us.append(u)
        ss.append(s)
        vhs.append(vh)
        ranks.append(k)
    u, s, vh = torch.cat(us, 1), torch.cat(ss), torch.cat(vhs, 0)
    if not fast:
        return polar_exact(u, rtol), s, None, polar_exact(vh, rtol), ranks
    if len(us) == 2:  # two blocks: the polar factors from the principal angles between them
        u1, u2 = us[0].double(), us[1].double()
        mu = two_block_polar_weights(gram(u1, side="right"), gram(u2, side="right"), u1.mT @ u2, rtol)
        v1, v2 = vhs
        mv = two_block_polar_weights(gram(v1, dtype=torch.float64), gram(v2, dtype=torch.float64),
                                     v1.double() @ v2.double().mT, rtol)
        return u.double() @ mu, s, mv.mT, vh, ranks
    ubar = _left_polar(u.double(), rtol)
    if vh.shape[0] <= vh.shape[1]:
        bi = psd_inv_sqrt(gram(vh, dtype=torch.float64), rtol)
    else:  # more components than columns: orthonormalise from the right instead (rare)
        vh = (vh.double() @ psd_inv_sqrt(gram(vh, side="right", dtype=torch.float64), rtol)).to(vh.dtype)
        bi = None
    return ubar, s, bi, vh, ranks


def _tsv_matrix(taus, rank, exact: bool, ctx: MethodContext, ranks_out: list) -> torch.Tensor:
    dt = taus[0].dtype
    flip = taus[0].shape[-2] > taus[0].shape[-1]
    if flip:  # TSV is symmetric under transposition; work with m <= n
        taus = [t.mT for t in taus]
    fast = _fast(taus[0].shape, exact)
    ubar, s, bi, vh, ranks = _tsv_parts(taus, rank, fast, ctx.generator, zero_rtol(dt))
    ranks_out.append(ranks)
    left = ubar * s.to(ubar.dtype)
    if bi is not None:
        left = left @ bi
    merged = left.to(dt) @ vh
    return merged.mT if flip else merged


@register(
    "tsv", params=(_TSV_RANK, _ALPHA, _FALLBACK, _EXACT), needs_base=True, reference=_TSV_REF,
    summary="Task Singular Vectors: per-task top-k SVD components, concatenated and decorrelated by polar "
            "factors (TSV-Merge).",
)
def tsv(base, models, ctx, rank, alpha, fallback, exact):
    """TSV-Merge. ``rank`` defaults to ``per_task``: k = ⌊min(m, n)/T⌋ for each of the T tasks, the
    paper's choice, so that the T blocks fill the r = min(m, n) dimensions (at least 1 when r < T).
    That needs T, which a rank rule does not know, hence a named value rather than a rule; any rank
    rule (integer, ratio, knee, …) is also accepted and then applied to each task's own spectrum (the
    tasks may then keep different k). ``ctx.info["rank"]`` is k (or the per-task / per-matrix list).
    """
    try:
        rank = _check_tsv_rank(rank)
    except ValueError as e:
        raise OmnimergeError(f"{ctx.key}: tsv: parameter 'rank': {e}") from None
    ranks: list = []
    out = _merge(base, models, ctx, alpha, fallback, lambda taus, j: _tsv_matrix(taus, rank, exact, ctx, ranks))
    if ranks:
        ctx.info["rank"] = _summarise(ranks)
        ctx.info["path"] = "exact" if not _fast(base.shape, exact) else "fast"
    return out


# ------------------------------------------------------------------------------------------ Iso-C


def _iso_c_matrix(taus, exact: bool) -> torch.Tensor:
    total = torch.stack(taus).sum(0)
    if not _fast(total.shape, exact):
        u, s, vh = svd(total)
        keep = s > DATA_RTOL * s[0]
        return s.mean() * (u[:, keep] @ vh[keep])
    p, s = polar_gram(total, DATA_RTOL)
    return s.mean().to(p.dtype) * p


@register(
    "iso_c", params=(_ALPHA, _FALLBACK, _EXACT), needs_base=True, reference=_ISO_REF,
    summary="Iso-C: the polar factor of Σ τ_i with every singular value set to their mean (an isotropic "
            "spectrum).",
)
def iso_c(base, models, ctx, alpha, fallback, exact):
    """Iso-C: Σ τ_i = U S Vᵀ, merged = mean(S) · U Vᵀ; the mean runs over all min(m, n) values."""
    out = _merge(base, models, ctx, alpha, fallback, lambda taus, j: _iso_c_matrix(taus, exact))
    if base.ndim >= 2:
        ctx.info["path"] = "exact" if not _fast(base.shape, exact) else "fast"
    return out


# ---------------------------------------------------------------------------------------- Iso-CTS


def iso_cts_ranks(r: int, n_tasks: int, common_fraction: float) -> tuple[int, int]:
    """(k_c, p): the common rank and each task's rank, k_c + T·p = r.

    k_c = r − T·round((r − ⌊f r⌋)/T), computed as the paper's code does (``int(r·f)`` and Python's
    round, which rounds halves to even). Where T·p would exceed r (f near 0), p = ⌊r/T⌋.
    """
    floor_fr = int(r * common_fraction)
    p = round((r - floor_fr) / n_tasks)
    if n_tasks * p > r:
        p = r // n_tasks
    return r - n_tasks * p, p


def _iso_cts_exact(taus, kc: int, p: int, rtol: float) -> torch.Tensor:
    total = torch.stack(taus).sum(0)
    u, s, vh = svd(total)
    sc = s[:kc]
    keep = sc > DATA_RTOL * s[0]
    uc, vhc = u[:, :kc][:, keep], vh[:kc][keep]
    us, ss, vhs = [], [], []
    for t in taus if p > 0 else []:
        w = t - uc @ (uc.mT @ t)
        ut, st, vht = svd(w)
        keep = st[:p] > DATA_RTOL * st[0]
        us.append(ut[:, :p][:, keep])
        vhs.append(vht[:p][keep])
        ss.append(st[:p])
    s_cat = torch.cat(ss + [sc])
    u_cat = torch.cat(us + [uc], 1)
    vh_cat = torch.cat(vhs + [vhc], 0)
    return s_cat.mean() * (polar_exact(u_cat, rtol) @ polar_exact(vh_cat, rtol))


def _top_components(lam: torch.Tensor, count: int, rtol: float, s_max) -> torch.Tensor:
    """Indices among the first ``count`` eigenvalues whose singular value is above rtol·s_max."""
    s = lam[:count].sqrt()
    return torch.nonzero(s > rtol * s_max).flatten()


def _iso_cts_fast(taus, kc: int, p: int, rtol: float) -> torch.Tensor:
    dt = taus[0].dtype
    m, n = taus[0].shape
    total = torch.stack(taus).sum(0)
    f64 = torch.float64
    if m <= n:
        # Common space from the left Gram matrix; its complement is spanned by the other eigenvectors.
        lam, w = eigh_desc(gram(total, dtype=f64))
        s_max = lam[0].sqrt() if lam.numel() else 0.0
        s_common = lam[:kc].sqrt()
        kept = _top_components(lam, kc, DATA_RTOL, s_max)
        uc = w[:, kept]
        vhc = uc.to(dt).mT @ total
        vhc /= s_common[kept].to(dt)[:, None]
        rest = torch.ones(m, dtype=torch.bool, device=w.device)
        rest[kept] = False
        w_rest = w[:, rest]  # complement of the (non-zero) common directions
        es, ss, vhs = [], [], []
        for t in taus if p > 0 else []:
            z = w_rest.to(dt).mT @ t  # coordinates of τ_i − U_c U_cᵀ τ_i in the complement basis
            lt, e = eigh_desc(gram(z, dtype=f64))
            ss.append(lt[:p].sqrt())
            kt = _top_components(lt, p, DATA_RTOL, lt[0].sqrt() if lt.numel() else 0.0)
            e = e[:, kt]
            vh = e.to(dt).mT @ z
            vh /= lt[kt].sqrt().to(dt)[:, None]
            es.append(e)
            vhs.append(vh)
        u_task = w_rest @ _left_polar(torch.cat(es, 1), rtol) if es else w.new_zeros((m, 0))
        u_bar = torch.cat([u_task, uc], 1)
        s_cat = torch.cat(ss + [s_common])
        vh_cat = torch.cat(vhs + [vhc], 0)
        left = u_bar @ psd_inv_sqrt(gram(vh_cat, dtype=f64), rtol)
        return s_cat.mean().to(dt) * (left.to(dt) @ vh_cat)
    # m > n: the common left space lives in the larger dimension; Gram matrices on the right side.
    lam, v = eigh_desc(gram(total, side="right", dtype=f64))
    s_max = lam[0].sqrt() if lam.numel() else 0.0
    s_common = lam[:kc].sqrt()
    kept = _top_components(lam, kc, DATA_RTOL, s_max)
    vc = v[:, kept]
    uc = total @ vc.to(dt)
    uc /= s_common[kept].to(dt)
    us, ss, vs = [], [], []
    for t in taus if p > 0 else []:
        wt = t - uc @ (uc.mT @ t)
        lt, vt = eigh_desc(gram(wt, side="right", dtype=f64))
        ss.append(lt[:p].sqrt())
        kt = _top_components(lt, p, DATA_RTOL, lt[0].sqrt() if lt.numel() else 0.0)
        vt = vt[:, kt]
        ut = wt @ vt.to(dt)
        ut /= lt[kt].sqrt().to(dt)
        us.append(ut)
        vs.append(vt)
    u_task = _left_polar(torch.cat(us, 1).double(), rtol) if us else v.new_zeros((m, 0))
    u_bar = torch.cat([u_task, uc.double()], 1)
    v_cat = torch.cat(vs + [vc], 1)
    v_bar = _left_polar(v_cat, rtol)
    s_cat = torch.cat(ss + [s_common])
    return s_cat.mean().to(dt) * (u_bar.to(dt) @ v_bar.to(dt).mT)


def _iso_cts_matrix(taus, common_fraction: float, exact: bool, splits: list) -> torch.Tensor:
    r = min(taus[0].shape)
    kc, p = iso_cts_ranks(r, len(taus), common_fraction)
    splits.append((kc, p))
    rtol = zero_rtol(taus[0].dtype)
    if not _fast(taus[0].shape, exact):
        return _iso_cts_exact(taus, kc, p, rtol)
    return _iso_cts_fast(taus, kc, p, rtol)


@register(
    "iso_cts", params=(_COMMON_FRACTION, _ALPHA, _FALLBACK, _EXACT), needs_base=True, reference=_ISO_REF,
    summary="Iso-CTS: Iso-C on a common subspace of Σ τ_i plus each task's own leading directions outside it.",
)
def iso_cts(base, models, ctx, common_fraction, alpha, fallback, exact):
    """Iso-CTS. ``ctx.info``: ``common_rank`` k_c and ``task_rank`` (r − k_c)/T (per matrix if they differ)."""
    splits: list = []
    out = _merge(base, models, ctx, alpha, fallback,
                 lambda taus, j: _iso_cts_matrix(taus, float(common_fraction), exact, splits))
    if splits:
        ctx.info["common_rank"] = _summarise([kc for kc, _ in splits])
        ctx.info["task_rank"] = _summarise([p for _, p in splits])
        ctx.info["path"] = "exact" if not _fast(base.shape, exact) else "fast"
    return out
