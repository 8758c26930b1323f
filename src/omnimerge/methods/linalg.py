"""Linear-algebra primitives of the low-rank methods, each exact or checked against the exact route.

Decompositions
  ``svd``              the thin SVD, retried in float64 where float32 LAPACK fails to converge.
  ``gram``             a aᵀ or aᵀ a (or the Gram matrix of rows stacked from several blocks), exactly
                       symmetric, with only the upper block triangle multiplied; a float64 Gram matrix
                       of a float32 matrix is accumulated over column blocks, never from a float64 copy.
  ``eigh_desc``        eigenvalues (descending, ≥ 0) and eigenvectors of a symmetric PSD matrix.
  ``spectrum``         singular values: the float64 Gram matrix's eigenvalues for large matrices
                       (about 10x faster than ``svdvals`` on 3584×18944), else ``svdvals``.
Leading components
  ``top_svd``          the k leading singular triplets: a seeded randomized range finder (accurate only
                       where the spectrum falls off after k), or a full SVD.
  ``sketch_svd``       the randomized range finder itself, with a given number of iterations whatever
                       the spectrum (``asdf``'s opt-in ``solver: randomized``).
  ``sketch_eigh``      the leading eigenpairs of a symmetric PSD matrix by randomized subspace
                       iteration and Rayleigh–Ritz (``aswudi``'s ``solver: randomized``).
  ``randomized_iters`` the subspace iterations after which the randomized finder is accurate for a known
                       spectrum, or None where it would not converge within budget.
  ``leading_svd``      the k leading singular triplets whatever the spectrum: the Gram spectrum, then
                       ``top_svd`` where it converges, else the Gram matrix's eigenvectors.
  ``truncate``         the best rank-k approximation: exact spectrum from the Gram matrix, then the
                       randomized finder where the spectrum shows it converges, else a projection on the
                       Gram matrix's top-k eigenvectors.
Polar factors and inverse square roots
  ``zero_rtol``, ``inv_sqrt_weights``, ``psd_inv_sqrt``, ``polar_exact``, ``polar_gram``,
  ``two_block_inv_sqrt``, ``two_block_polar_weights``.

Eigen-decompositions of Gram matrices run in float64 unless stated: a Gram matrix squares the
condition number, and float32 eigenvectors of one are off by ~1e-2 near a rank cutoff (float64: ~1e-4
of the merged delta, the level of a float32 SVD). Products with the data stay in the data's dtype
where the factor they use is orthonormal (well conditioned), so rounding stays at the data's level.
Inputs are float32 or float64; ``gram``, ``spectrum``, ``eigh_desc`` and ``top_svd`` take batches
(…, m, n), the others one matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

GRAM_MIN = 512  # spectra (and truncations) go through the Gram matrix when min(m, n) is at least this
GRAM_BLOCK_BYTES = 64 << 20  # column block converted at a time while accumulating a Gram matrix in another dtype
GRAM_SPLIT_MIN = 1024  # Gram matrices of at least this size multiply only their upper block triangle ...
GRAM_SPLIT = 4  # ... in about this many row blocks: (b + 1)/2b of the flops of a plain product

POLAR_EPS_KAPPA = 1e-4  # polar_gram forms its product in float64 where ε·κ exceeds this (κ > 840 in float32)

RAND_TOL = 1e-9  # randomized only if (σ_{q+1}/σ_k)^(2p+1) <= RAND_TOL for some p <= RAND_MAX_ITERS
RAND_MAX_ITERS = 8
RAND_OVERSAMPLE = 16
RAND_COST = 8.0  # ... and its (2p+2)·2·m·n·q flops are at most RAND_COST·r³ (about an r×r eigh)
SKETCH_ITERS = 4  # solver: randomized — subspace iterations whatever the spectrum (scikit-learn's
# randomized_svd runs 4 when k ≥ 0.1·min(m, n), 7 below); docs/methods.md gives the measured errors


# ------------------------------------------------------------------------- Gram matrices, spectra


def _row_blocks(sizes: list[int]) -> list[tuple[int, int, int]]:
    """(part, start, stop) row blocks of stacked parts: each part split so that the whole has about
    GRAM_SPLIT blocks once it reaches GRAM_SPLIT_MIN rows."""
    total = sum(sizes)
    size = math.ceil(total / GRAM_SPLIT) if total >= GRAM_SPLIT_MIN else total
    blocks = []
    for p, rows in enumerate(sizes):
        pieces = max(1, math.ceil(rows / max(size, 1)))
        edges = [i * rows // pieces for i in range(pieces + 1)]
        blocks += [(p, edges[i], edges[i + 1]) for i in range(pieces) if edges[i + 1] > edges[i]]
    return blocks


def gram(a: torch.Tensor | Sequence[torch.Tensor], *, side: str = "left", dtype: torch.dtype | None = None
         ) -> torch.Tensor:
    """``a aᵀ`` (side ``left``) or ``aᵀ a`` (``right``) in ``dtype`` (default: a's), for a (…, m, n).

    ``a`` may also be a sequence of (…, m_i, n) blocks (side ``left``): the Gram matrix of their
    row-wise concatenation, without forming it (block (i, j) is a_i a_jᵀ). Exactly symmetric; for
    GRAM_SPLIT_MIN rows or more only the upper block triangle is multiplied, and a conversion to
    ``dtype`` happens one column block (GRAM_BLOCK_BYTES) at a time.
    """
    if isinstance(a, torch.Tensor):
        parts = [a if side == "left" else a.mT]
    else:
        if side != "left":
            raise ValueError("gram of stacked blocks takes side='left'")
        parts = list(a)
    lead, cols = parts[0].shape[:-2], parts[0].shape[-1]
    dtype = dtype or parts[0].dtype
    xs = [p.reshape(-1, p.shape[-2], cols) for p in parts]  # (B, m_i, n)
    batch = xs[0].shape[0]
    sizes = [x.shape[1] for x in xs]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    total = sum(sizes)
    blocks = _row_blocks(sizes)
    convert = any(x.dtype != dtype for x in xs)
    step = max(1, GRAM_BLOCK_BYTES // (max(total, 1) * torch.finfo(dtype).bits // 8)) if convert else max(cols, 1)
    g = torch.zeros((batch, total, total), dtype=dtype, device=xs[0].device)
    rows = [slice(offsets[p] + lo, offsets[p] + hi) for p, lo, hi in blocks]
    for c in range(0, cols, step):
        chunk = [x[..., c:c + step].to(dtype) for x in xs]
        pieces = [chunk[p][:, lo:hi] for p, lo, hi in blocks]
        for i, xi in enumerate(pieces):
            for j in range(i, len(pieces)):
                g[:, rows[i], rows[j]].baddbmm_(xi, pieces[j].mT)
    for i, ri in enumerate(rows):  # mirror: exactly symmetric
        d = g[:, ri, ri]
        d.copy_(d.triu() + d.triu(1).mT)
        for rj in rows[i + 1:]:
            g[:, rj, ri] = g[:, ri, rj].mT
    return g.reshape(*lead, total, total)


def svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD (U, S, Vh) of ``a`` (…, m, n). Where LAPACK's float32 divide-and-conquer SVD
    fails to converge (it does on some ill-conditioned matrices, e.g. a 448² concatenation of singular
    vectors with condition number 1.5e3), the SVD is taken in float64 and rounded back."""
    try:
        return torch.linalg.svd(a, full_matrices=False)
    except torch.linalg.LinAlgError:
        if a.dtype == torch.float64:
            raise
        return tuple(x.to(a.dtype) for x in torch.linalg.svd(a.double(), full_matrices=False))


def eigh_desc(g: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of a symmetric PSD matrix, in ``dtype``."""
    lam, w = torch.linalg.eigh(g.to(dtype))
    return lam.flip(-1).clamp_min(0), w.flip(-1)


def spectrum(a: torch.Tensor, *, exact: bool = False, gram_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Singular values of ``a`` (…, m, n) in descending order, in ``a``'s dtype.

    From the Gram matrix of the smaller side, formed in ``gram_dtype``, when min(m, n) >= GRAM_MIN (and
    not ``exact``): that squares the condition number, so singular values below about 1e-7·σ_1 are noise
    in float64 (about 3e-4·σ_1 in float32, the randomized route's cheaper spectrum); the rank rules look
    at the leading part of the spectrum.
    """
    m, n = a.shape[-2], a.shape[-1]
    if exact or min(m, n) < GRAM_MIN:
        return torch.linalg.svdvals(a)
    g = gram(a, side="left" if m <= n else "right", dtype=gram_dtype)
    return torch.linalg.eigvalsh(g).flip(-1).clamp_min(0).sqrt().to(a.dtype)


# ---------------------------------------------------------------------------- leading components


def _cpu_generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(0)
    if generator.device.type != "cpu":  # draw a CPU seed from it: results do not depend on the device
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
        return torch.Generator().manual_seed(seed)
    return generator


def top_svd(a: torch.Tensor, k: int, *, generator: torch.Generator | None = None, exact: bool = False,
            oversample: int = 16, iters: int = 3):
    """The k leading singular triplets (U (…, m, k), S (…, k), Vh (…, k, n)) of ``a``.

    Randomized when 4k <= min(m, n) and not ``exact``: a Gaussian test matrix drawn from
    ``generator`` (seeded per tensor by the run, so results are reproducible), ``iters``
    subspace iterations, then an exact SVD of the small projected matrix. Else a full SVD.
    """
    r = min(a.shape[-2], a.shape[-1])
    k = max(1, min(k, r))
    if exact or 4 * k > r:
        u, s, vh = svd(a)
        return u[..., :k], s[..., :k], vh[..., :k, :]
    return sketch_svd(a, k, iters=iters, oversample=oversample, generator=generator)


def sketch_svd(a: torch.Tensor, k: int, *, iters: int, oversample: int = RAND_OVERSAMPLE,
               generator: torch.Generator | None = None):
    """The k leading singular triplets of ``a`` (…, m, n) by a randomized range finder, whatever the
    spectrum: a Gaussian test matrix of q = k + ``oversample`` columns (from ``generator``), ``iters``
    subspace iterations re-orthonormalised by QR, an exact SVD of the projected q×n matrix. Its
    error falls like (σ_{q+1}/σ_k)^(2·iters+1) (Halko, Martinsson & Tropp 2011, §4.5, §10.4): small
    where the spectrum falls off after k, not where it is flat. A full SVD where q ≥ min(m, n).
    Cost: (2·iters + 2) products of ``a`` with an n×q or m×q matrix, in ``a``'s dtype.
    """
    m, n = a.shape[-2], a.shape[-1]
    r = min(m, n)
    k = max(1, min(k, r))
    q = min(k + oversample, r)
    if q >= r:
        u, s, vh = svd(a)
        return u[..., :k], s[..., :k], vh[..., :k, :]
    omega = torch.randn((*a.shape[:-2], n, q), generator=_cpu_generator(generator), dtype=a.dtype).to(a.device)
    basis, _ = torch.linalg.qr(a @ omega)
    for _ in range(iters):
        z, _ = torch.linalg.qr(a.mT @ basis)
        basis, _ = torch.linalg.qr(a @ z)
    ub, s, vh = svd(basis.mT @ a)
    return (basis @ ub)[..., :k], s[..., :k], vh[..., :k, :]


def sketch_eigh(mat: torch.Tensor, q: int, *, iters: int, generator: torch.Generator | None = None):
    """The q leading eigenpairs of a symmetric PSD ``mat`` (…, d, d), randomized: a Gaussian d×q start,
    ``iters`` float64 products with ``mat`` re-orthonormalised by QR, then Rayleigh–Ritz (a q×q
    float64 eigh). Returns (Ritz values (…, q) ascending, Ritz vectors (…, d, q)), float64. The k-th
    pair's error falls like (λ_{q+1}/λ_k)^iters; a full float64 eigh where q ≥ d.
    Cost: iters·2·d²·q multiply-adds and the QRs, instead of a d×d eigendecomposition.
    """
    d = mat.shape[-1]
    m64 = mat.double()
    if q >= d:
        return torch.linalg.eigh(m64)
    y = torch.randn((*mat.shape[:-2], d, q), generator=_cpu_generator(generator), dtype=torch.float64)
    y = y.to(mat.device)
    for _ in range(max(1, iters)):
        y = torch.linalg.qr(m64 @ y).Q
    mu, z = torch.linalg.eigh(y.mT @ m64 @ y)
    return mu, y @ z


def randomized_iters(s: torch.Tensor, k: int, m: int, n: int) -> int | None:
    """Subspace iterations p that make ``top_svd`` (oversample RAND_OVERSAMPLE) accurate for the
    descending spectrum ``s`` of an m×n matrix: (σ_{q+1}/σ_k)^(2p+1) <= RAND_TOL with p <= RAND_MAX_ITERS
    and a cost below RAND_COST·r³. None where no such p exists (no gap after k, or k large).

    The randomized finder is accurate only where the spectrum falls off after k: with a fixed 3
    iterations, the rank-k approximation was 15-86 % off (relative Frobenius error) on power-law
    spectra σ_i = i^-α, α <= 1, at the knee's k (2048², measured).
    """
    r = min(m, n)
    if 4 * k > r:
        return None
    q = min(k + RAND_OVERSAMPLE, r)
    sk = float(s[k - 1])
    if sk <= 0:
        return None
    rho = float(s[q]) / sk if q < r else 0.0
    if rho >= 1.0:
        return None
    p = 0 if rho == 0.0 else max(0, math.ceil((math.log(RAND_TOL) / math.log(rho) - 1) / 2))
    if p > RAND_MAX_ITERS or (2 * p + 2) * 2.0 * m * n * q > RAND_COST * float(r) ** 3:
        return None
    return p


def leading_svd(a: torch.Tensor, k: int, *, generator: torch.Generator | None = None, exact: bool = False):
    """The k leading singular triplets (U (m, k), S (k,), Vh (k, n)) of one matrix, accurate whatever
    its spectrum, in ``a``'s dtype.

    A full SVD when ``exact`` or min(m, n) < GRAM_MIN. Else the float64 Gram matrix of the smaller
    side: where 4k <= min(m, n), its eigenvalues first, and ``top_svd`` with the iterations
    ``randomized_iters`` prescribes where it converges; otherwise the Gram matrix's top-k
    eigenvectors give one side and one product the other (S V_kᵀ = U_kᵀ a, so no division by a
    singular value ≤ 1e-7·σ_1: such components get S = 0 and a zero row).
    """
    m, n = a.shape
    r = min(m, n)
    k = max(1, min(int(k), r))
    if exact or r < GRAM_MIN:
        u, s, vh = svd(a)
        return u[:, :k], s[:k], vh[:k]
    left = m <= n
    g = gram(a, side="left" if left else "right", dtype=torch.float64)
    if 4 * k <= r:
        s = torch.linalg.eigvalsh(g).flip(-1).clamp_min(0).sqrt()
        iters = randomized_iters(s, k, m, n)
        if iters is not None:
            return top_svd(a, k, generator=generator, oversample=RAND_OVERSAMPLE, iters=iters)
    lam, w = eigh_desc(g)
    del g
    s = lam[:k].sqrt()
    keep = s > 1e-7 * s[0] if float(s[0]) > 0 else torch.zeros_like(s, dtype=torch.bool)
    scale = torch.where(keep, 1.0 / torch.where(keep, s, 1.0), 0.0).to(a.dtype)
    wk = w[:, :k].to(a.dtype)
    other = (wk.mT @ a if left else (a @ wk).mT) * scale[:, None]  # V_kᵀ (k, n), or U_kᵀ (k, m)
    s = torch.where(keep, s, 0.0).to(a.dtype)
    return (wk, s, other) if left else (other.mT, s, wk.mT)


def project_top(a: torch.Tensor, vecs: torch.Tensor, k: int, left: bool) -> torch.Tensor:
    """``a`` projected on the span of the last k columns of ``vecs`` (eigh's ascending order), from the
    left (U_k U_kᵀ a) or the right (a V_k V_kᵀ); through the complement when k > half of them."""
    r = vecs.shape[-1]
    v = vecs.to(a.dtype)
    if k <= r - k:
        b = v[:, r - k:]
        return b @ (b.mT @ a) if left else (a @ b) @ b.mT
    c = v[:, : r - k]
    if c.shape[-1] == 0:
        return a.clone()
    return a - (c @ (c.mT @ a) if left else (a @ c) @ c.mT)


def _truncate_matrix(a, rank, generator, exact, randomized):
    m, n = a.shape
    r = min(m, n)
    pick = rank if callable(rank) else (lambda _s: int(rank))

    def clip(k):
        return max(1, min(int(k), r))

    if exact or r < GRAM_MIN:
        u, s, vh = svd(a)
        k = clip(pick(s))
        return (u[:, :k] * s[:k]) @ vh[:k], k
    left = m <= n
    if randomized:
        if callable(rank):  # the rule's spectrum from a Gram matrix in a's dtype
            s = spectrum(a, gram_dtype=a.dtype)
            k = clip(pick(s))
            if float(s[0]) == 0.0:
                return torch.zeros_like(a), k
        else:
            k = clip(rank)
        u, sv, vh = sketch_svd(a, k, iters=SKETCH_ITERS, generator=generator)
        return (u * sv) @ vh, k
    g = gram(a, side="left" if left else "right", dtype=torch.float64)
    vecs = None
    if not callable(rank) and 4 * clip(rank) > r:  # a known large k: the projection route for sure
        lam, vecs = torch.linalg.eigh(g)
        s = lam.flip(-1).clamp_min(0).sqrt()
    else:
        s = torch.linalg.eigvalsh(g).flip(-1).clamp_min(0).sqrt()  # the numbers `spectrum` gives, in float64
    k = clip(pick(s))
    if float(s[0]) == 0.0:
        return torch.zeros_like(a), k
    iters = None if vecs is not None else randomized_iters(s, k, m, n)
    if iters is not None:
        u, sv, vh = top_svd(a, k, generator=generator, oversample=RAND_OVERSAMPLE, iters=iters)
        return (u * sv) @ vh, k
    if vecs is None:
        _, vecs = torch.linalg.eigh(g)
    del g
    return project_top(a, vecs, k, left), k


def truncate(a: torch.Tensor, rank, *, generator: torch.Generator | None = None, exact: bool = False,
             randomized: bool = False):
    """The best rank-k approximation U_k S_k V_kᵀ of each matrix of ``a`` (…, m, n), in ``a``'s dtype.

    ``rank`` is an integer or a function of the descending singular values (a 1-D tensor) that
    returns k; k is clipped to [1, min(m, n)]. Returns (approximation, k): k is an int for a
    matrix, a list over the batch (row-major) for ndim > 2.

    Routes: ``exact`` or min(m, n) < GRAM_MIN: full SVD. Otherwise the spectrum from the float64
    Gram matrix, then ``top_svd`` where ``randomized_iters`` shows it converges, else the projection
    on the Gram matrix's top-k eigenvectors (``project_top``: no division by σ, so zero or tiny
    singular values are harmless; float64-accurate in the subspace). An integer ``rank`` with
    4k > min(m, n) goes straight to the eigendecomposition. ``randomized`` (opt-in, approximate): a
    rule's spectrum from a Gram matrix in ``a``'s dtype, then ``sketch_svd`` (SKETCH_ITERS iterations)
    whatever the spectrum.
    """
    if a.ndim < 2:
        raise ValueError(f"truncate needs a matrix or a batch of matrices, got shape {tuple(a.shape)}")
    if a.ndim == 2:
        return _truncate_matrix(a, rank, generator, exact, randomized)
    m, n = a.shape[-2], a.shape[-1]
    outs, ks = [], []
    for x in a.reshape(-1, m, n):
        t, k = _truncate_matrix(x, rank, generator, exact, randomized)
        outs.append(t)
        ks.append(k)
    return torch.stack(outs).reshape(a.shape), ks


# ------------------------------------------------------------ polar factors, inverse square roots


def zero_rtol(dtype: torch.dtype) -> float:
    """Singular values at or below ``zero_rtol · σ_max`` count as zero.

    100 ε of the dtype (1.2e-5 for float32: a float32 SVD reports the null singular values of an
    exactly rank-deficient matrix at about 1e-6 σ_max), but not below 1e-7, the resolution of a
    float64 Gram matrix's eigenvalues.
    """
    return max(100.0 * torch.finfo(dtype).eps, 1e-7)


def inv_sqrt_weights(lam: torch.Tensor, rtol: float) -> torch.Tensor:
    """λ^(-1/2) for the eigenvalues of a Gram matrix whose singular value √λ exceeds rtol·√λ_max, else 0."""
    lam = lam.clamp_min(0)
    if lam.numel() == 0:
        return lam
    keep = lam.sqrt() > rtol * lam.max().sqrt()
    return torch.where(keep, lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt(), torch.zeros_like(lam))


def psd_inv_sqrt(g: torch.Tensor, rtol: float) -> torch.Tensor:
    """The pseudo-inverse square root of a symmetric PSD matrix (float64); directions of
    singular value ≤ rtol·σ_max are left out."""
    lam, w = eigh_desc(g)
    return (w * inv_sqrt_weights(lam, rtol)) @ w.mT


def polar_exact(a: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """The polar factor P Qᵀ of a = P Σ Qᵀ (the closest matrix with orthonormal columns or rows) by a
    full SVD, leaving out directions whose singular value is ≤ rtol·σ_max (their singular vectors
    are arbitrary)."""
    if rtol is None:
        rtol = zero_rtol(a.dtype)
    u, s, vh = svd(a)
    if s.numel() == 0:
        return torch.zeros_like(a)
    keep = s > rtol * s[0]
    return u[:, keep] @ vh[keep]


def polar_gram(a: torch.Tensor, rtol: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The polar factor of ``a`` through the Gram matrix of its smaller side, and its singular values.

    With a aᵀ = W Λ Wᵀ (rows ≤ columns; Gram and eigh in float64): polar(a) = H a with
    H = W Λ^(-1/2) Wᵀ (one product with the big side). H and the product are in a's dtype while
    κ·ε <= POLAR_EPS_KAPPA (κ = σ_max/σ_min of the kept directions), else in float64: H's rounding
    is amplified by κ, and the float32 error was about 0.03·ε·κ (measured: 4e-6 at κ = 77, 1.8e-4 at
    κ = 1.3e5, 7.7e-3 at κ = 4.5e6 — a square sum of five task vectors; 5.7e-5 there in float64).
    Directions with σ ≤ rtol·σ_max are left out. Returns (polar factor in a's dtype, singular values descending in
    float64, min(m, n) of them).
    """
    if rtol is None:
        rtol = zero_rtol(a.dtype)
    wide = a.shape[-2] <= a.shape[-1]
    x = a if wide else a.mT
    lam, w = eigh_desc(gram(x, dtype=torch.float64))
    weights = inv_sqrt_weights(lam, rtol)
    kept = weights > 0
    kappa = float((lam[kept].max() / lam[kept].min()).sqrt()) if bool(kept.any()) else 1.0
    work = x.dtype if kappa * torch.finfo(x.dtype).eps <= POLAR_EPS_KAPPA else torch.float64
    wx = w.to(work)
    h = (wx * weights.to(work)) @ wx.mT
    p = (h @ x.to(work)).to(x.dtype)
    return (p if wide else p.mT), lam.sqrt()


def two_block_inv_sqrt(c: torch.Tensor, rtol: float) -> torch.Tensor:
    """(XᵀX)^(-1/2) for X = [X_1, X_2] with orthonormal columns in each block, from C = X_1ᵀ X_2 alone.

    XᵀX = I + E with E = [[0, C], [Cᵀ, 0]], whose eigenvalues are ±γ (γ: the singular values of C,
    cosines of the principal angles between the blocks) and 0. Split h(x) = (1 + x)^(-1/2) into its
    even part F(x²) and odd part x·G(x²); with φ(y) = (F(y) − 1)/y, and B = C Cᵀ (k_1 ≤ k_2):
    (XᵀX)^(-1/2) = [[F(B), G(B) C], [Cᵀ G(B), I + Cᵀ φ(B) C]]
    — one eigen-decomposition of the smaller block's size instead of one of k_1 + k_2 (about 8x fewer
    flops for equal blocks). An eigenvalue 1 ± γ whose square root is ≤ rtol·√λ_max is left out
    (pseudo-inverse), as in ``psd_inv_sqrt``. float64.
    """
    c = c.double()
    if c.shape[0] > c.shape[1]:
        h = two_block_inv_sqrt(c.mT, rtol)
        k2 = c.shape[1]
        return torch.cat([torch.cat([h[k2:, k2:], h[k2:, :k2]], 1), torch.cat([h[:k2, k2:], h[:k2, :k2]], 1)], 0)
    k1, k2 = c.shape
    lam, w = eigh_desc(c @ c.mT)
    y = lam.clamp(0, 1)
    gam = y.sqrt()
    lam_max = 1 + float(gam.max()) if gam.numel() else 1.0
    cut = rtol * rtol * lam_max

    def h(x):  # (1 + x)^(-1/2), 0 where 1 + x is a (numerically) zero eigenvalue
        z = 1 + x
        return torch.where(z > cut, z.clamp_min(max(cut, 1e-300)).rsqrt(), torch.zeros_like(z))

    plus, minus = h(gam), h(-gam)
    even = (plus + minus) / 2
    small = gam < 1e-3  # Taylor series where the divisions cancel (error below 1e-12)
    safe_g = torch.where(small, torch.ones_like(gam), gam)
    safe_y = torch.where(small, torch.ones_like(y), y)
    odd = torch.where(small, -0.5 - 0.3125 * y - 0.24609375 * y * y, (plus - minus) / 2 / safe_g)
    phi = torch.where(small, 0.375 + 0.2734375 * y + 0.2255859375 * y * y, (even - 1) / safe_y)
    f_b = (w * even) @ w.mT
    g_b = (w * odd) @ w.mT
    phi_b = (w * phi) @ w.mT
    out = torch.empty((k1 + k2, k1 + k2), dtype=torch.float64, device=c.device)
    out[:k1, :k1] = f_b
    out[:k1, k1:] = g_b @ c
    out[k1:, :k1] = out[:k1, k1:].mT
    out[k1:, k1:] = c.mT @ phi_b @ c
    out[k1:, k1:].diagonal().add_(1.0)
    return out


def _orthonormalising_factor(g: torch.Tensor, rtol: float) -> torch.Tensor:
    """W with X W orthonormal, for a Gram matrix g = XᵀX close to I: Cholesky's L^(-T) (cheap), or
    the pseudo-inverse square root where Cholesky fails."""
    g = g.double()
    l, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
        return torch.linalg.solve_triangular(l.mT, eye, upper=True)
    return psd_inv_sqrt(g, rtol)


def two_block_polar_weights(g11: torch.Tensor, g22: torch.Tensor, g12: torch.Tensor, rtol: float) -> torch.Tensor:
    """M with polar([X_1, X_2]) = [X_1, X_2] @ M, from the blocks of the Gram matrix XᵀX.

    The blocks are first made exactly orthonormal (X̃_i = X_i W_i, W_i from a Cholesky factor of
    G_ii: this removes the rounding that a float32 product leaves in them), then
    ``two_block_inv_sqrt`` of X̃_1ᵀ X̃_2 applies. For orthonormal blocks this is the polar factor;
    otherwise that of the re-orthonormalised blocks (X̃_i = polar(X_i) times a rotation within the
    block of the order of the rounding, which the caller's diagonal S does not amplify). float64.
    """
    w1 = _orthonormalising_factor(g11, rtol)
    w2 = _orthonormalising_factor(g22, rtol)
    h = two_block_inv_sqrt(w1.mT @ g12.double() @ w2, rtol)
    k1 = w1.shape[0]
    out = torch.empty_like(h)
    out[:k1] = w1 @ h[:k1]
    out[k1:] = w2 @ h[k1:]
    return out
