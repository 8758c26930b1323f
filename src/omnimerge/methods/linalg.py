"""Linear-algebra building blocks for the low-rank methods, with fast paths that keep exactness.

* ``spectrum``: singular values, from the smaller Gram matrix's eigenvalues (float64) for large
  matrices — about 10x faster than ``svdvals`` on 3584x18944 on 2 CPU cores — else ``svdvals``.
* ``top_svd``: the k leading singular triplets, by a seeded randomized range finder with power
  iterations when k is small against min(m, n), else by a full SVD.
* ``polar``: the orthonormal polar factor.
All accept batches (..., m, n). Inputs are expected in float32/float64.
"""

from __future__ import annotations

import torch

GRAM_MIN = 512  # use the Gram route for spectra when min(m, n) is at least this


def spectrum(a: torch.Tensor, *, exact: bool = False) -> torch.Tensor:
    """Singular values of ``a`` in descending order, in ``a``'s dtype.

    The Gram route squares the condition number, so singular values below about 1e-7·σ_1 (in
    float64) are noise; the rank rules only look at the leading part of the spectrum.
    """
    m, n = a.shape[-2], a.shape[-1]
    if exact or min(m, n) < GRAM_MIN:
        return torch.linalg.svdvals(a)
    a64 = a.double()
    g = a64 @ a64.mT if m <= n else a64.mT @ a64
    ev = torch.linalg.eigvalsh(g).flip(-1).clamp_min(0)
    return ev.sqrt().to(a.dtype)


def _randomized(a: torch.Tensor, k: int, generator: torch.Generator | None, oversample: int, iters: int):
    m, n = a.shape[-2], a.shape[-1]
    q = min(k + oversample, min(m, n))
    omega = torch.randn((*a.shape[:-2], n, q), generator=generator, dtype=a.dtype, device="cpu").to(a.device)
    y = a @ omega
    basis, _ = torch.linalg.qr(y)
    for _ in range(iters):
        z, _ = torch.linalg.qr(a.mT @ basis)
        basis, _ = torch.linalg.qr(a @ z)
    b = basis.mT @ a  # (q, n)
    ub, s, vh = torch.linalg.svd(b, full_matrices=False)
    u = basis @ ub
    return u[..., :k], s[..., :k], vh[..., :k, :]


def top_svd(a: torch.Tensor, k: int, *, generator: torch.Generator | None = None, exact: bool = False,
            oversample: int = 16, iters: int = 3):
    """The k leading singular triplets (U (…, m, k), S (…, k), Vh (…, k, n)) of ``a``.

    Randomized when 4k <= min(m, n) and not ``exact``: a Gaussian test matrix drawn from
    ``generator`` (seeded per tensor by the engine, so results are reproducible), ``iters``
    subspace iterations, then an exact SVD of the small projected matrix.
    """
    r = min(a.shape[-2], a.shape[-1])
    k = max(1, min(k, r))
    if exact or 4 * k > r:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[..., :k], s[..., :k], vh[..., :k, :]
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    elif generator.device.type != "cpu":
        generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator,
                                                                    device=generator.device).item()))
    return _randomized(a, k, generator, oversample, iters)


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthonormal factor P Qᵀ of a = P Σ Qᵀ (the closest matrix with orthonormal columns/rows)."""
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh


# ------------------------------------------------------------------------------------------------
# Rank-k truncation with a checked fast route (added for `asdf` and `task_arithmetic`'s `rank`).
#
# The randomized range finder of `top_svd` is accurate only where the spectrum falls off after k:
# with its defaults (oversample 16, 3 iterations) the rank-k approximation was 15-86 % off (relative
# Frobenius error) on power-law spectra σ_i = i^-α, α <= 1, at the knee's k (2048², measured).
# `truncate` therefore takes the exact spectrum from the Gram matrix, uses the randomized finder
# only when that spectrum shows it converges (with enough iterations, at a cost below an
# eigendecomposition), and otherwise takes the top-k eigenvectors of the same Gram matrix and
# projects: A_k = U_k U_kᵀ A (or A V_k V_kᵀ). The projection needs no division by σ, so zero or
# tiny singular values are harmless, and it is float64-accurate in the subspace.

import math  # noqa: E402  (kept in this section)

RAND_TOL = 1e-9  # randomized only if (σ_{q+1}/σ_k)^(2p+1) <= RAND_TOL for some p <= RAND_MAX_ITERS
RAND_MAX_ITERS = 8
RAND_OVERSAMPLE = 16
RAND_COST = 8.0  # ... and its (2p+2)·2·m·n·q flops are at most RAND_COST·r³ (about an r×r eigh)
GRAM_BLOCK_BYTES = 64 << 20  # float64 block of the long side used while accumulating the Gram


def _trunc_gram(a: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The float64 Gram matrix of the smaller side of a 2-D ``a``: (A Aᵀ, True) when m <= n, else
    (Aᵀ A, False). Accumulated over blocks of the long side (the extra memory stays small) and, for
    min(m, n) >= 1024, only over the upper block triangle (4 row blocks: 5/8 of the flops), then mirrored."""
    m, n = a.shape
    left = m <= n
    r, long = (m, n) if left else (n, m)
    step = max(1, GRAM_BLOCK_BYTES // (8 * r))
    nb = 4 if r >= 1024 else 1
    e = [i * r // nb for i in range(nb + 1)]
    g = torch.zeros((r, r), dtype=torch.float64, device=a.device)
    for c in range(0, long, step):
        blk = (a[:, c:c + step] if left else a[c:c + step].mT).double()  # (r, step)
        for i in range(nb):
            for j in range(i, nb):
                g[e[i]:e[i + 1], e[j]:e[j + 1]].addmm_(blk[e[i]:e[i + 1]], blk[e[j]:e[j + 1]].mT)
    g = torch.triu(g) + torch.triu(g, 1).mT  # exactly symmetric
    return g, left


def _trunc_rand_iters(s: torch.Tensor, k: int, m: int, n: int) -> int | None:
    """Subspace iterations that make the randomized finder converge for this spectrum, or None."""
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


def _trunc_project(a: torch.Tensor, vecs: torch.Tensor, k: int, left: bool) -> torch.Tensor:
    """A projected on the span of the last k columns of ``vecs`` (eigh's order: ascending)."""
    r = vecs.shape[-1]
    v = vecs.to(a.dtype)
    if k <= r - k:
        b = v[:, r - k:]
        return b @ (b.mT @ a) if left else (a @ b) @ b.mT
    c = v[:, : r - k]
    if c.shape[-1] == 0:
        return a.clone()
    return a - (c @ (c.mT @ a) if left else (a @ c) @ c.mT)


def _trunc_matrix(a, rank, generator, exact):
    m, n = a.shape
    r = min(m, n)
    pick = rank if callable(rank) else (lambda _s: int(rank))

    def clip(k):
        return max(1, min(int(k), r))

    if exact or r < GRAM_MIN:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        k = clip(pick(s))
        return (u[:, :k] * s[:k]) @ vh[:k], k
    g, left = _trunc_gram(a)
    vecs = None
    if not callable(rank) and 4 * clip(rank) > r:  # a known large k: the projection route for sure
        lam, vecs = torch.linalg.eigh(g)
        s = lam.flip(-1).clamp_min(0).sqrt()
    else:
        s = torch.linalg.eigvalsh(g).flip(-1).clamp_min(0).sqrt()  # the numbers `spectrum` gives, in float64
    k = clip(pick(s))
    if float(s[0]) == 0.0:
        return torch.zeros_like(a), k
    iters = None if vecs is not None else _trunc_rand_iters(s, k, m, n)
    if iters is not None:
        u, sv, vh = top_svd(a, k, generator=generator, oversample=RAND_OVERSAMPLE, iters=iters)
        return (u * sv) @ vh, k
    if vecs is None:
        _, vecs = torch.linalg.eigh(g)
    del g
    return _trunc_project(a, vecs, k, left), k


def truncate(a: torch.Tensor, rank, *, generator: torch.Generator | None = None, exact: bool = False):
    """The best rank-k approximation U_k S_k V_kᵀ of each matrix of ``a`` (…, m, n), in ``a``'s dtype.

    ``rank`` is an integer or a function of the descending singular values (a 1-D tensor) that
    returns k; k is clipped to [1, min(m, n)]. Returns (approximation, k): k is an int for a
    matrix, a list over the batch (row-major) for ndim > 2.

    Routes: ``exact`` or min(m, n) < GRAM_MIN: full SVD. Otherwise the spectrum from the float64
    Gram matrix, then the randomized finder when the spectrum shows it converges (see
    ``_trunc_rand_iters``), else the projection on the Gram matrix's top-k eigenvectors (an integer
    ``rank`` with 4k > min(m, n) goes straight to the eigendecomposition).
    """
    if a.ndim < 2:
        raise ValueError(f"truncate needs a matrix or a batch of matrices, got shape {tuple(a.shape)}")
    if a.ndim == 2:
        return _trunc_matrix(a, rank, generator, exact)
    m, n = a.shape[-2], a.shape[-1]
    outs, ks = [], []
    for x in a.reshape(-1, m, n):
        t, k = _trunc_matrix(x, rank, generator, exact)
        outs.append(t)
        ks.append(k)
    return torch.stack(outs).reshape(a.shape), ks


# ================================================================================================
# Gram-route building blocks for the spectral merges (methods/spectral.py: TSV, Iso-C, Iso-CTS).
# Added after the functions above, which keep their behaviour. Everything here takes one matrix
# (m, n); callers loop over batches.
#
# Eigen-decompositions of Gram matrices run in float64: a Gram matrix squares the condition number,
# and float32 eigenvectors of one are off by ~1e-2 near a rank cutoff (float64: ~1e-4 of the merged
# delta, the level of a float32 SVD). Products with the data stay in the data's dtype where the
# factor they use is orthonormal (well conditioned), so rounding stays at the data's own level.
# ================================================================================================


def zero_rtol(dtype: torch.dtype) -> float:
    """Singular values at or below ``zero_rtol · σ_max`` count as zero.

    100 ε of the dtype (1.2e-5 for float32: a float32 SVD reports the null singular values of an
    exactly rank-deficient matrix at about 1e-6 σ_max), but not below 1e-7, the resolution of a
    float64 Gram matrix's eigenvalues.
    """
    return max(100.0 * torch.finfo(dtype).eps, 1e-7)


def gram(a: torch.Tensor, *, side: str = "left", dtype: torch.dtype | None = None, blocks: int = 4) -> torch.Tensor:
    """``a aᵀ`` (side ``left``) or ``aᵀ a`` (``right``), computed in ``dtype`` (default: a's).

    Symmetric by construction: for large results only the block upper triangle is multiplied
    (``blocks`` row blocks: (b + 1) / 2b of the flops of a plain product) and mirrored.
    """
    x = a if side == "left" else a.mT
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    m = x.shape[-2]
    if blocks <= 1 or m < 1024:
        g = x @ x.mT
        return (g + g.mT) / 2
    edges = [i * m // blocks for i in range(blocks + 1)]
    g = torch.empty((m, m), dtype=x.dtype, device=x.device)
    for i in range(blocks):
        xi = x[edges[i]:edges[i + 1]]
        for j in range(i, blocks):
            blk = xi @ x[edges[j]:edges[j + 1]].mT
            if i == j:
                blk = (blk + blk.mT) / 2
            g[edges[i]:edges[i + 1], edges[j]:edges[j + 1]] = blk
            if j > i:
                g[edges[j]:edges[j + 1], edges[i]:edges[i + 1]] = blk.mT
    return g


def eigh_desc(g: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of a symmetric PSD matrix, in ``dtype``."""
    lam, w = torch.linalg.eigh(g.to(dtype))
    return lam.flip(-1).clamp_min(0), w.flip(-1)


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
    """The polar factor P Qᵀ of a = P Σ Qᵀ by a full SVD, leaving out directions whose singular
    value is ≤ rtol·σ_max (their singular vectors are arbitrary). Equals ``polar`` on full-rank input."""
    if rtol is None:
        rtol = zero_rtol(a.dtype)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    if s.numel() == 0:
        return torch.zeros_like(a)
    keep = s > rtol * s[0]
    return u[:, keep] @ vh[keep]


def polar_gram(a: torch.Tensor, rtol: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The polar factor of ``a`` through the Gram matrix of its smaller side, and its singular values.

    With a aᵀ = W Λ Wᵀ (rows ≤ columns; Gram and eigh in float64): polar(a) = H a with
    H = W Λ^(-1/2) Wᵀ, formed and applied in a's dtype (one product with the big side). The error is
    that of the data's own precision amplified by σ_1/σ_j in direction j, as with an SVD; measured on
    float32 matrices with σ_1/σ_min up to 6e5: 3e-4 relative (Frobenius). Directions with
    σ ≤ rtol·σ_max are left out. Returns (polar factor in a's dtype, singular values descending in
    float64, min(m, n) of them).
    """
    if rtol is None:
        rtol = zero_rtol(a.dtype)
    wide = a.shape[-2] <= a.shape[-1]
    x = a if wide else a.mT
    lam, w = eigh_desc(gram(x, dtype=torch.float64))
    wx = w.to(x.dtype)
    h = (wx * inv_sqrt_weights(lam, rtol).to(x.dtype)) @ wx.mT
    p = h @ x
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
