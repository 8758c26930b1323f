"""WUDI and its relatives: data-free merging that lets the task vectors undo their own interference.

Methods: ``wudi`` (WUDI, Cheng et al. 2025), ``wudi2`` (WUDI v2 from OptMerge, Wei et al. 2025),
``swudi`` and ``aswudi`` (omnimerge's closed-form spectral solution of the WUDI objective).

Notation, per matrix (tensors of ndim > 2 are batches of matrices over the last two dimensions,
and every quantity below is per batch element): τ_i = θ_i − θ_base (m×n), ν_i = ‖τ_i‖_F,
M_i = τ_i/ν_i, C = Σ M_iᵀM_i (n×n), D = Σ τ_i M_iᵀM_i (m×n). Tasks with τ_i = 0 carry no
information and are left out of C and D (their term is 0/0 otherwise). The WUDI loss

    L(x) = Σ_i ‖(x − τ_i) τ_iᵀ‖²_F / ν_i²  =  ‖x Fᵀ − A‖²_F,     ∇L = 2(x C − D),
    F = [M_1; …; M_T]  (T·m × n),   A = [τ_1 M_1ᵀ, …, τ_T M_Tᵀ]  (m × T·m),  C = FᵀF,  D = A F,

is a linear least-squares problem. WUDI v2's loss has the same form with F = [S_ik V_ikᵀ/ν_i]
(the rank-k projectors) and A = [Ť_i V_ik S_ik/ν_i] (Ť_i the rank-k targets).

Solvers
-------
* ``iterative`` (the reference): the papers' optimizer loops (Adam lr 1e-5 / SGD lr 1e-4 with
  momentum 0.9, 300 steps) on the analytic gradient 2(xC − D) — the same gradient autograd gives —
  through ``torch.optim``. A step costs m·n·min(n, 2·T·m) multiply-adds (C precomputed when
  n ≤ 2·rows(F), else the factored form (xFᵀ − A)F, whose residual is then also the exact loss).
* Spectral closed forms. Gradient flow dx/dt = −(xC − D) from θ0, SGD with momentum, and plain
  gradient descent are all linear in x, so after any time t or N steps
        x = θ0 − g0 Q diag(ψ(λ)) Qᵀ,       g0 = θ0C − D,  C = Q Λ Qᵀ,
  with a scalar response ψ: (1 − e^{−λt})/λ for the flow (SWUDI's filter divided by λ; the
  mask sets it to 0 outside the kept eigenvalues; 1/λ without the filter), and a 300-step scalar
  recurrence for SGD with momentum (so WUDI v2 ``lora``'s 300-step iterate is computed exactly,
  without the loop). Adam is element-wise nonlinear and has no such form.
  The eigenproblem is solved in the smaller of two spaces:
    - ``cov`` (n×n): C itself, when n is the smaller dimension;
    - ``gram`` (r×r, r = rows of F, e.g. T·m): G = F Fᵀ = U Λ Uᵀ has C's nonzero eigenvalues,
      Q = Fᵀ U Λ^{-1/2}, and x = θ0 − (θ0Fᵀ − A) U diag(ψ) Uᵀ F — no division by λ at all.
      For WUDI, θ0Fᵀ and A are blocks of G, so after G the only large products are the T final
      m×m×n ones.
  A route is picked by a flop model (eigh cost ≈ 10·d³ against the products). ``dense`` is the
  plain n×n eigendecomposition of C with D formed explicitly, kept as the reference.
* Eigenvalues that are numerically zero: without the exponential filter (ψ = 1/λ) eigenvalues at
  or below ε·√max(n, r)·λ_max (ε of the compute dtype: the typical rounding error of a Gram matrix
  formed in that dtype) are excluded. With the filter, ψ uses its limit ψ(0) = t (computed as
  t·(−expm1(−λt))/(λt)), so nothing is excluded and nothing divides by zero. Both agree with the
  exact answer: in exact arithmetic g0 (and D) have no component along C's null space, so those
  directions contribute nothing either way.
* Precision: C and G are formed in the data's dtype (``linalg.gram``: the upper block triangle only).
  Without the filter (ψ = 1/λ) a float32 eigh is not accurate enough (1/λ amplifies its error in
  the eigenvectors at the cut: 1e-3 to 7e-3 of the merged delta measured): ``eigen_response``
  refines a float32 eigh in float64 where few eigenvalues are kept (aswudi's rules), else runs the
  eigh in float64. With the filter ψ ≤ t, and float32 is accurate (≤ 1e-4).
* Mask (``swudi``): keep the top K = ⌈ρ·n⌉ of C's n eigenvalues; in the ``gram`` route that is the
  top min(K, r) of G's. ``aswudi``: K from a rank rule applied to the √eigenvalues (= singular
  values of F, length min(r, n)), with the rule seeing F's shape (r, n): an integer caps at
  min(r, n), a ratio is of min(r, n), Gavish–Donoho uses β = min(r, n)/max(r, n).

Defaults
--------
* ``wudi``: ``solver: iterative`` (Adam has no closed form, and its 300-step iterate from Σ τ_i is
  far from the minimiser); ``solver: minimizer`` is the exact minimiser D C⁺ in seconds.
* ``wudi2``: ``solver: auto`` — ``full`` runs the Adam loop, ``lora`` computes the 300-step
  SGD-momentum iterate exactly in closed form (tested equal to the loop). ``rank: 1/T`` is the
  paper's k = ⌊min(m, n)/T⌋ (a token of this method's rank grammar: a ratio 1/T would depend on T
  and round badly); any other rank rule applies per task to the singular values of τ_i. Targets
  and projectors use ``linalg.leading_svd`` (exact SVD for small matrices; else the Gram spectrum,
  then a randomized finder where that spectrum shows it converges, else the Gram eigenvectors).
* ``swudi`` / ``aswudi``: ``solver: fast``; ``dense`` is the n×n reference. ``aswudi`` also takes
  ``solver: randomized`` (opt-in, approximate): its rank rules keep few eigenvalues, whose vectors a
  randomized subspace iteration finds without the full eigendecomposition (measured 1.4–2.2× faster
  and 2–4 % off the float64 result on random low-rank + noise task vectors, whose spectra are flat
  at the cut: docs/methods.md). ``swudi`` keeps ⌈ρn⌉
  (85 %) of them: a randomized finder for that many costs more than the eigendecomposition, so it
  has no such route.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import OmnimergeError
from .linalg import RAND_OVERSAMPLE, SKETCH_ITERS, gram, leading_svd, sketch_eigh, spectrum
from .ranks import RULE_DOC, check_rank_rule, choose_rank, needs_spectrum
from .registry import InputFacts, MethodContext, Param, register

_WUDI_REF = (
    "Whoever Started the Interference Should End It: Guiding Data-Free Model Merging via Task Vectors "
    "(Cheng et al., ICML 2025), arXiv:2503.08099"
)
_OPT_REF = (
    "Unifying Multimodal Large Language Model Capabilities and Modalities via Model Merging "
    "(Wei et al., 2025; OptMerge / WUDI v2), arXiv:2505.19892"
)
# Where the MLLM defaults come from: WalkerWorldPeace/MLLMerging (the OptMerge authors' code), LLaMA-Factory/.
_WUDI2_DEFAULTS = (
    "variant and alpha from the inputs, as the reference MLLM runs: LoRA experts (Qwen2-VL) -> variant lora, "
    "SGD lr 1e-4 momentum 0.9 from the mean, alpha 1.0 (MLLMerging LLaMA-Factory/run_merge_wudi2.py:6 and :164); "
    "full fine-tunes (InternVL2.5) -> variant full, Adam lr 1e-5 from the sum, alpha 0.1 "
    "(LLaMA-Factory/run_merge_wudi2_internvl.py:6 and :166)"
)
_SWUDI_DEFAULTS = (
    "alpha 0.3: the reference MLLM runs, where 1.0 'collapses MLLM outputs' (MLLMerging "
    "LLaMA-Factory/run_merge_internvl.py:20-21 and :56-57); t 300, rho 0.85 for LLM/VLM deltas, init sum, "
    "rank rule participation_sqrt (LLaMA-Factory/swudi_aswudi.py:81-83, :236-242; run_merge_internvl.py)"
)
_SWUDI_REF = (
    "omnimerge's closed-form spectral solution of the WUDI objective (gradient flow on the WUDI loss "
    "in closed form), after " + _WUDI_REF
)

# --------------------------------------------------------------------------------------- params

_ALPHA = Param("alpha", float, 1.0, "scale of the merged task vector: θ_base + alpha · τ_merged")
# swudi / aswudi: the reference MLLM runs' scale (sum-initialised flows overshoot at 1.0 on MLLM deltas)
_SPECTRAL_ALPHA = Param("alpha", float, 0.3, "scale of the merged task vector: θ_base + alpha · τ_merged "
                                             "(0.3: the reference MLLM runs; 1.0 collapses MLLM outputs)")
_FALLBACK = Param(
    "fallback", str, "mean", "what 1-D tensors and embed / lm_head get: the mean or the sum of the task vectors",
    choices=("mean", "sum"),
)
_STEPS = Param("steps", int, 300, "optimizer steps (solver: iterative)", minimum=0)
_TRACE = Param("trace", bool, False, "record the loss before every step in the report (loss_trace; debugging)")
_INIT = Param("init", str, "sum", "θ0, where the gradient flow starts: Σ τ_i, their mean, or 0",
              choices=("sum", "mean", "zero"))
_SPECTRAL_SOLVER = Param(
    "solver", str, "fast",
    "fast: eigendecomposition in the smaller of the input (n×n) and task-Gram (T·m×T·m) spaces; "
    "dense: the plain n×n eigendecomposition of C (reference)",
    choices=("fast", "dense"),
)
_ASWUDI_SOLVER = Param(
    "solver", str, "fast",
    "fast: eigendecomposition in the smaller of the input (n×n) and task-Gram (T·m×T·m) spaces; "
    "dense: the plain n×n eigendecomposition of C (reference); randomized: C's spectrum from a float32 "
    "eigvalsh, its kept eigenvectors by randomized subspace iteration (4 steps), approximate (opt-in)",
    choices=("fast", "dense", "randomized"),
)


def _check_lr(value):
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a positive number or 'auto', got {value!r}")
    return float(value)


def _check_alpha_or_auto(value):
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"must be a finite number or 'auto', got {value!r}")
    return float(value)


WUDI2_AUTO_ALPHA = {"full": 0.1, "lora": 1.0}  # the reference runs' scales per variant (see _WUDI2_DEFAULTS)


def resolve_wudi2(params: dict, facts: InputFacts) -> dict:
    """wudi2's ``auto`` values, once per merge: ``variant`` lora when every expert is a LoRA adapter, else
    full; ``alpha`` the reference run's scale for that variant."""
    if params.get("variant", "auto") == "auto":
        params["variant"] = "lora" if facts.lora_experts else "full"
    if params.get("alpha", "auto") == "auto":
        params["alpha"] = WUDI2_AUTO_ALPHA[params["variant"]]
    return params


def _check_wudi2_rank(value):
    if value == "1/T":
        return value
    return check_rank_rule(value)


# ---------------------------------------------------------------------------------- shared parts


def _fallback_reason(base: torch.Tensor, ctx: MethodContext) -> str | None:
    if base.ndim < 2:
        return f"{base.ndim}-D tensor"
    component = ctx.key.split(".", 1)[0]
    if component in ("embed", "lm_head"):
        return component
    return None


def _prepare(base, models, ctx: MethodContext, name: str):
    if base is None:
        raise OmnimergeError(f"{ctx.key}: {name} needs a base model (task vectors are θ_i − θ_base)")
    if not models:
        raise OmnimergeError(f"{ctx.key}: no models to merge")
    return [m - base for m in models]


def _fallback(base, taus, how: str, alpha: float, ctx: MethodContext, reason: str) -> torch.Tensor:
    total = torch.stack(taus).sum(0)
    if how == "mean":
        total = total / len(taus)
    ctx.info["fallback"] = how
    ctx.info["fallback_reason"] = reason
    return base + alpha * total


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _as_batch(taus: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Size, torch.dtype]:
    """(…, m, n) tensors → (B, m, n) in a dtype the eigensolvers accept."""
    shape = taus[0].shape
    dtype = _work_dtype(taus[0])
    return [t.to(dtype).reshape(-1, shape[-2], shape[-1]) for t in taus], shape, dtype


def _norms(taus: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """ν_i (B, 1, 1) and 1/ν_i (0 where τ_i = 0) for each task."""
    nus, invs = [], []
    for t in taus:
        nu = torch.linalg.vector_norm(t, dim=(-2, -1), keepdim=True)
        nus.append(nu)
        invs.append(torch.where(nu > 0, 1.0 / torch.where(nu > 0, nu, 1.0), 0.0))
    return nus, invs


def _sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    out = tensors[0].clone()
    for t in tensors[1:]:
        out += t
    return out


def _init_scale(init: str, T: int) -> float:
    return {"sum": 1.0, "mean": 1.0 / T, "zero": 0.0}[init]


def _batch_stat(ctx: MethodContext, name: str, values: torch.Tensor | list[int]) -> None:
    """Record an integer per matrix: the value for a 2-D tensor, min/max/mean for a batch."""
    vals = [int(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]
    if len(vals) == 1:
        ctx.info[name] = vals[0]
    else:
        ctx.info[name + "_min"] = min(vals)
        ctx.info[name + "_max"] = max(vals)
        ctx.info[name + "_mean"] = round(sum(vals) / len(vals), 3)


# ------------------------------------------------------------------------------ spectral response

# A response builder maps C's eigenvalues (ascending, (B, d)), the number of rows of F and the number
# of columns n to ψ (B, d): the scalar that multiplies each eigen-direction of g0 (see module doc).
Response = Callable[[torch.Tensor, int, int], torch.Tensor]


def _top_mask(lam: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """For ascending ``lam`` (B, d): True on the top ``keep`` (B,) entries of each row."""
    d = lam.shape[-1]
    from_top = torch.arange(d - 1, -1, -1, device=lam.device)
    return from_top.unsqueeze(0) < keep.to(lam.device).unsqueeze(-1)


def _zero_tol(lam: torch.Tensor, rows: int, n: int) -> torch.Tensor:
    """Eigenvalues at or below this (B, 1) are numerically zero for a Gram/covariance of F (rows×n)
    formed in ``lam``'s dtype: ε·√max(rows, n)·λ_max, the typical size of its rounding error.

    Not the pseudo-inverse's ε·max(rows, n) (a worst-case bound, and one meant for singular values):
    applied to eigenvalues of a float32 Gram matrix it is 2e-3·λ_max for 1536×8960 and T = 2 and cut
    real directions (σ down to 5 % of σ_max) that a rank rule had kept — aswudi was then 4-6 % off
    the float64 result; with this cut 1e-5 to 7e-5 (measurements/spectral.py's 2B shapes)."""
    eps = torch.finfo(lam.dtype).eps
    return eps * math.sqrt(max(rows, n)) * lam[..., -1:].clamp_min(0)


def flow_response(t: float | None, keep: Callable[[torch.Tensor, int, int], torch.Tensor],
                  most_kept: float | None = None) -> Response:
    """Gradient flow for time t (None: t → ∞, i.e. 1/λ) on the eigenvalues that ``keep`` selects.

    ``keep(lam_desc, rows, n)`` returns how many of C's top eigenvalues to keep, per matrix.
    ``most_kept``: how many ``keep`` asks for whatever the spectrum (a fixed count, ``math.inf`` for
    all), None where a rule chooses it; ``eigen_response`` then knows in advance whether few are kept.
    """

    def response(lam: torch.Tensor, rows: int, n: int) -> torch.Tensor:
        lam = lam.clamp_min(0)
        desc = lam.flip(-1)[..., : min(rows, n, lam.shape[-1])]
        mask = _top_mask(lam, keep(desc, rows, n))
        if t is None:
            mask &= lam > _zero_tol(lam, rows, n)
            return torch.where(mask, 1.0 / torch.where(mask, lam, 1.0), 0.0)
        tiny = torch.finfo(lam.dtype).tiny
        z = (lam * t).clamp_min(tiny)
        return torch.where(mask, t * (-torch.expm1(-z)) / z, 0.0)

    response.divides = t is None
    response.most_kept = most_kept
    return response


def sgd_response(lr: float, momentum: float, steps: int) -> Response:
    """ψ after ``steps`` of torch.optim.SGD(lr, momentum) on a loss with gradient 2(xC − D), from θ0.

    In an eigen-direction with eigenvalue λ: buffer b ← μ b + 2(1 − λψ), ψ ← ψ + lr·b (b_0 = ψ_0 = 0),
    which is torch's SGD (dampening 0, no Nesterov) written in the coordinates x = θ0 − g0 Q ψ Qᵀ.
    """

    def response(lam: torch.Tensor, rows: int, n: int) -> torch.Tensor:
        lam = lam.clamp_min(0)
        psi = torch.zeros_like(lam)
        buf = torch.zeros_like(lam)
        for _ in range(steps):
            buf = momentum * buf + 2.0 * (1.0 - lam * psi)
            psi = psi + lr * buf
        return psi

    return response


REFINE_MAX_FRACTION = 1 / 6  # refine a float32 eigh when the kept eigenvalues are at most this fraction of d
REFINE_OVERSAMPLE = 2.0  # ... in a subspace of (1 + this)·k leading float32 eigenvectors (at most d/2)
REFINE_TOL = 1e-4  # converged when V_k ψ V_kᵀ is estimated within this of its limit (relative Frobenius)
_EIGH64_SPARE = 3.8  # float64 multiply-adds per d³ that a float64 eigh costs beyond a float32 one (6.3 vs 2.5)


def _refine_max_steps(d: int, q: int) -> int:
    """Subspace steps (2·d·q·(d + q) float64 multiply-adds each: M Y, QR, Yᵀ M Y) that cost no more than
    the float64 eigh they replace, after the float32 eigh (measured on 2048² and 3584²)."""
    return int(_EIGH64_SPARE * d**3 // (2 * d * q * (d + q)))


def _inverse_operator_change(y0, w0, y1, w1) -> float:
    """max over the batch of ‖A_1 − A_0‖_F / ‖A_1‖_F for A = Y diag(w) Yᵀ (orthonormal Y, w > 0), from
    k×k products only: ‖A‖² = Σ w², tr(A_0 A_1) = ‖diag(√w_0) Y_0ᵀ Y_1 diag(√w_1)‖²."""
    cross = (w0.sqrt().unsqueeze(-1) * (y0.mT @ y1) * w1.sqrt().unsqueeze(-2)).square().sum((-2, -1))
    n0, n1 = w0.square().sum(-1), w1.square().sum(-1)
    return float(((n0 + n1 - 2 * cross).clamp_min(0) / n1).sqrt().max())


def _refine_leading(mat: torch.Tensor, vecs: torch.Tensor, k: int, q: int):
    """Float64 subspace steps with Rayleigh–Ritz on the q leading columns of ``vecs`` (a float32 eigh
    of ``mat``) until the inverse operator on the top k, V_k diag(1/λ_k) V_kᵀ, is stable to REFINE_TOL.
    Returns (Ritz values (B, q) ascending, Ritz vectors (B, d, q)) in float64, or None where the
    estimated convergence rate would need more steps than a float64 eigh costs (``_refine_max_steps``)."""
    max_steps = _refine_max_steps(mat.shape[-1], q)
    if max_steps < 3:  # convergence is judged from three Rayleigh–Ritz results
        return None
    m64 = mat.double()
    y = torch.linalg.qr(vecs[..., -q:].double()).Q
    my = m64 @ y
    prev, change = None, None
    for step in range(max_steps):  # step 0: Rayleigh–Ritz on the float32 basis itself; one M Y per step
        if step:
            y = torch.linalg.qr(my).Q
            my = m64 @ y
        mu, z = torch.linalg.eigh(y.mT @ my)
        if bool((mu[..., -k:] <= 0).any()):
            return None
        top = (y @ z[..., -k:], 1.0 / mu[..., -k:])
        if prev is not None:
            last, change = change, _inverse_operator_change(*prev, *top)
            if last is not None:  # linear convergence at rate ρ: the error left is about change·ρ/(1 − ρ)
                rate = change / last if last > 0 else 0.0
                if rate >= 1:
                    return None
                if change * rate <= REFINE_TOL * (1 - rate):
                    return mu, y @ z
                more = math.log(REFINE_TOL * (1 - rate) / (change * rate)) / math.log(rate) if rate > 0 else 1
                if step + 1 + more > max_steps:  # too slow: the float64 eigh is cheaper
                    return None
        prev = top
    return None


def eigen_response(mat: torch.Tensor, response: Response, rows: int, n: int, *, refine: bool = True,
                   sketch: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(λ ascending, eigenvectors, ψ(λ)) of a symmetric matrix (B, d, d), λ and vectors in its dtype.

    The filtered response (ψ ≤ t) is accurate from a float32 eigh. Where the response divides by λ
    (no filter: ψ = 1/λ) a float32 eigh gets the eigenvectors of the kept eigenvalues wrong by about
    ε·λ_max/gap at the cut, which 1/λ amplifies (measured: 1e-3 to 7e-3 of the merged delta for
    aswudi on the 2B shapes; 1e-5 with a float64 eigh of the same float32 matrix). Two ways to
    float64 accuracy:

    * few kept eigenvalues (k ≤ REFINE_MAX_FRACTION·d, e.g. aswudi's rank rules): the float32 eigh,
      then float64 subspace steps with Rayleigh–Ritz on its (1 + REFINE_OVERSAMPLE)·k leading
      eigenvectors, Y ← qr(M Y), Yᵀ M Y = Z Μ Zᵀ, Y ← Y Z, until the result's operator
      V_k diag(1/λ_k) V_kᵀ is within REFINE_TOL of its limit, estimated from the last two changes
      and their ratio (linear convergence; ``_refine_leading``). The float32
      basis misses the true leading k by directions beyond q, which each step damps by λ_j/λ_k; the
      small float64 eigh separates the directions at the cut as well as a full one. The Ritz pairs
      replace the top q; ψ is then taken again (the rule sees the refined eigenvalues at the top, the
      float32 ones below: a rank rule is asked twice and its last answer counts) and must keep the
      same k. Where convergence would cost more steps than the float64 eigh (a flat spectrum well
      beyond the cut), or k changes:
    * a float64 eigh of the whole matrix — also always with ``refine=False`` (the ``dense`` reference),
      and without the float32 eigh first where the response's ``most_kept`` is already too many
      (swudi's fixed ⌈ρn⌉, the WUDI minimisers' all).

    Measured (aswudi, T = 2, against the float64 definition): the 7B down-projection's 7168² Gram
    matrix 30.8 s instead of 58.2 s, error 4.35e-5 against 4.34e-5; 2B shapes 1.2e-5 to 1.8e-5, as
    with the float64 eigh. Where the spectrum beyond the cut is flat (the 18944×3584 shape: rate
    0.63 per step) the estimate calls for more steps than the float64 eigh costs and it falls back.

    ``sketch`` (a generator; ``solver: randomized``, opt-in): the eigenvalues from an eigvalsh in the
    matrix's dtype (no vectors), the response's k from them, then the top q = 2k (k + 16 at least)
    eigenpairs by ``linalg.sketch_eigh`` (SKETCH_ITERS float64 steps from a Gaussian start) in place
    of the top q; the other columns of the returned vectors are 0 (ψ is 0 there). Approximate: no
    convergence test. Falls back to the route above where k is 0 or q reaches d.
    """
    if sketch is not None:
        lam = torch.linalg.eigvalsh(mat)
        d = mat.shape[-1]
        k = _kept_columns(response(lam, rows, n))
        q = min(d, k + max(RAND_OVERSAMPLE, k))
        if 0 < k and q < d:
            mu, y = sketch_eigh(mat, q, iters=SKETCH_ITERS, generator=sketch)
            lam = lam.clone()
            lam[..., -q:] = mu.to(lam.dtype)
            vecs = mat.new_zeros(mat.shape)
            vecs[..., -q:] = y.to(vecs.dtype)
            psi = response(lam, rows, n)
            if _kept_columns(psi) <= q:
                return lam, vecs, psi
    if not getattr(response, "divides", False) or mat.dtype == torch.float64:
        lam, vecs = torch.linalg.eigh(mat)
        return lam, vecs, response(lam, rows, n)
    d = mat.shape[-1]
    most = getattr(response, "most_kept", None)
    if refine and (most is None or min(most, d) <= REFINE_MAX_FRACTION * d):
        lam, vecs = torch.linalg.eigh(mat)
        k = _kept_columns(response(lam, rows, n))
        q = min(d, k + max(16, math.ceil(REFINE_OVERSAMPLE * k)))
        refined = _refine_leading(mat, vecs, k, q) if 0 < k <= REFINE_MAX_FRACTION * d and q < d else None
        if refined is not None:
            mu, y = refined
            lam, vecs = lam.clone(), vecs.clone()
            lam[..., -q:] = mu.to(lam.dtype)
            vecs[..., -q:] = y.to(vecs.dtype)
            psi = response(lam, rows, n)
            if _kept_columns(psi) == k:
                return lam, vecs, psi
    lam, vecs = torch.linalg.eigh(mat.double())
    lam, vecs = lam.to(mat.dtype), vecs.to(mat.dtype)
    return lam, vecs, response(lam, rows, n)


def _kept_columns(psi: torch.Tensor) -> int:
    """Number of trailing (largest-eigenvalue) columns with a nonzero response in any batch element."""
    nz = (psi != 0).any(0)
    if not bool(nz.any()):
        return 0
    first = int(torch.nonzero(nz)[0])
    return psi.shape[-1] - first


def _apply(vecs: torch.Tensor, psi: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """left @ V diag(ψ) Vᵀ, using only the columns of V where ψ can be nonzero."""
    k = _kept_columns(psi)
    if k == 0:
        return left.new_zeros((*left.shape[:-1], vecs.shape[-2]))
    v = vecs[..., -k:]
    return ((left @ v) * psi[..., -k:].unsqueeze(-2)) @ v.mT


# ---------------------------------------------------------------------- WUDI spectral solutions

_EIGH_COST = 6.0  # multiply-add equivalents per d³ of a float32 eigendecomposition with vectors (measured: 3584²)
_SYM = 0.625  # a Gram matrix multiplies only its upper block triangle (linalg.gram)


def _wudi_route(m: int, n: int, T: int) -> str:
    r = T * m
    cov = _EIGH_COST * n**3 + _SYM * T * m * n * n + T * m * n * n + (T + 2) * n**3
    in_gram = _EIGH_COST * r**3 + _SYM * r * r * n + 2 * m * r * r + m * r * n
    return "cov" if cov <= in_gram else "gram"


def wudi_spectral(taus: list[torch.Tensor], c: float, response: Response, route: str = "auto",
                  sketch: torch.Generator | None = None):
    """θ0 − g0 Q ψ(Λ) Qᵀ for the WUDI loss, θ0 = c Σ τ_i; ``taus`` are (B, m, n).

    Returns (merged task vector (B, m, n), facts). ``route``: auto, cov, gram or dense. ``sketch``: a
    generator for ``eigen_response``'s randomized eigenvectors (not with ``dense``).
    """
    T = len(taus)
    B, m, n = taus[0].shape
    r = T * m
    if route == "auto":
        route = _wudi_route(m, n, T)
    nus, invs = _norms(taus)
    theta0 = _sum(taus).mul_(c)
    if route == "gram":
        G = gram(taus)  # block (i, j) = τ_i τ_jᵀ, upper block triangle only; then scaled to M_i M_jᵀ
        for i in range(T):
            for j in range(T):
                G[:, i * m:(i + 1) * m, j * m:(j + 1) * m] *= invs[i] * invs[j]
        # R0 = θ0 Fᵀ − A: column block j is Σ_i c ν_i G_ij − ν_j G_jj.
        R0 = sum(c * nus[i] * G[:, i * m:(i + 1) * m, :] for i in range(T))
        for j in range(T):
            R0[:, :, j * m:(j + 1) * m] -= nus[j] * G[:, j * m:(j + 1) * m, j * m:(j + 1) * m]
        lam, U, psi = eigen_response(G, response, r, n, sketch=sketch)
        del G
        out = theta0
        k = _kept_columns(psi)
        if (T + 1) * k < T * m:  # few eigenvalues kept: x = θ0 − (R0 U_k ψ)(U_kᵀ F), k-wide products only
            v = U[..., r - k:]
            L = (R0 @ v) * psi[..., r - k:].unsqueeze(-2)  # (B, m, k)
            del U, R0
            Z = sum(torch.bmm(v[:, j * m:(j + 1) * m].mT * invs[j], taus[j]) for j in range(T))  # U_kᵀ F (B, k, n)
            out.baddbmm_(L, Z, alpha=-1.0)
            return out, {"route": "gram", "eig_dim": r}, lam, psi
        W = _apply(U, psi, R0)  # (B, m, r); x = θ0 − W F
        del U, R0
        for j in range(T):
            out.baddbmm_(W[:, :, j * m:(j + 1) * m] * invs[j], taus[j], alpha=-1.0)
        return out, {"route": "gram", "eig_dim": r}, lam, psi
    if route == "cov" and m >= n:
        S = [gram(t, side="right").mul_(inv * inv) for t, inv in zip(taus, invs)]  # C_i = M_iᵀ M_i
        C = sum(S)
        lam, Q, psi = eigen_response(C, response, r, n, sketch=sketch)
        k = _kept_columns(psi)
        q, p = Q[..., n - k:], psi[..., n - k:].unsqueeze(-2)
        pl = p * lam[..., n - k:].clamp_min(0).unsqueeze(-2)  # λψ on the kept eigenvalues
        out = theta0
        if 4 * k <= n:  # few kept: τ_i (C_i P − c CP) = τ_i (C_i q ψ − c q λψ) qᵀ, k-wide products
            del Q
            for t, Si in zip(taus, S):
                a = (Si @ q) * p - c * (q * pl)  # (B, n, k)
                out.baddbmm_(t @ a, q.mT)
            return out, {"route": "cov", "eig_dim": n}, lam, psi
        P = (q * p) @ q.mT  # Q ψ Qᵀ
        CP = (q * pl) @ q.mT  # C Q ψ Qᵀ
        del Q, q
        # x = Σ_i τ_i X_i with X_i = c(I − CP) + C_i P, i.e. θ0 + Σ_i τ_i (C_i P − c CP)
        for t, Si in zip(taus, S):
            out.baddbmm_(t, torch.baddbmm(CP, Si, P, beta=-c))
        return out, {"route": "cov", "eig_dim": n}, lam, psi
    # cov with m < n, or the dense reference: form C and D explicitly.
    C = taus[0].new_zeros(B, n, n)
    D = torch.zeros_like(taus[0])
    for t, inv in zip(taus, invs):
        C += gram(t, side="right").mul_(inv * inv)
        D += ((t @ t.mT) @ t if m < n else t @ (t.mT @ t)) * (inv * inv)
    lam, Q, psi = eigen_response(C, response, r, n, refine=route != "dense",
                                 sketch=sketch if route != "dense" else None)
    if route == "dense":
        # The textbook formula: τ = θ0 − θ0 Q diag(f) Qᵀ + D Q diag(f/λ) Qᵀ, f = λψ.
        f = (psi * lam.clamp_min(0)).unsqueeze(-2)
        out = theta0 - ((theta0 @ Q) * f) @ Q.mT + ((D @ Q) * psi.unsqueeze(-2)) @ Q.mT
        return out, {"route": "dense", "eig_dim": n}, lam, psi
    g0 = theta0 @ C - D
    return theta0 - _apply(Q, psi, g0), {"route": "cov", "eig_dim": n}, lam, psi


def general_spectral(theta0: torch.Tensor, F: torch.Tensor, A: torch.Tensor, response: Response):
    """θ0 − g0 Q ψ(Λ) Qᵀ for the loss ‖x Fᵀ − A‖² (F (B, r, n), A (B, m, r)), any θ0."""
    r, n = F.shape[-2], F.shape[-1]
    if r < n:
        lam, U, psi = eigen_response(F @ F.mT, response, r, n)
        R0 = theta0 @ F.mT - A
        return theta0 - _apply(U, psi, R0) @ F, lam, psi
    C = F.mT @ F
    lam, Q, psi = eigen_response(C, response, r, n)
    g0 = theta0 @ C - A @ F
    return theta0 - _apply(Q, psi, g0), lam, psi


# ------------------------------------------------------------------------------- iterative solver


class _Quadratic:
    """L(x) = ‖x Fᵀ − A‖²: its half-gradient xC − D and value, in the cheaper of two forms."""

    def __init__(self, *, C=None, D=None, c0=None, F=None, A=None):
        self.C, self.D, self.c0, self.F, self.A = C, D, c0, F, A

    def half_grad_and_loss(self, x: torch.Tensor, want_loss: bool = True) -> tuple[torch.Tensor, float | None]:
        """(x C − D, L(x) or None); the loss comes almost free from the gradient's products."""
        if self.C is not None:
            h = torch.baddbmm(self.D, x, self.C, beta=-1.0)  # x C − D
            if not want_loss:
                return h, None
            return h, float((h - self.D).double().mul(x.double()).sum() + self.c0)  # <xC − 2D, x> + c0
        R = x @ self.F.mT - self.A
        return R @ self.F, float(R.double().square().sum()) if want_loss else None


def _iterate(x0: torch.Tensor, quad: _Quadratic, steps: int, make_opt, ctx: MethodContext, trace: bool):
    x = x0.clone()
    opt = make_opt([x])
    losses = []
    for step in range(steps):
        h, loss = quad.half_grad_and_loss(x, want_loss=trace or step == 0)
        losses.append(loss)
        x.grad = h.mul_(2.0)
        opt.step()
        x.grad = None
    final = quad.half_grad_and_loss(x)[1]
    losses.append(final)  # with steps = 0 this is also the initial loss
    ctx.info["loss_init"] = losses[0]
    ctx.info["loss_final"] = final
    if trace:
        ctx.info["loss_trace"] = losses
    return x


def _wudi_quadratic(taus: list[torch.Tensor]) -> _Quadratic:
    T = len(taus)
    B, m, n = taus[0].shape
    _, invs = _norms(taus)
    if n <= 2 * T * m:  # precompute C (n×n): a step costs m·n² instead of 2·m·T·m·n
        C = taus[0].new_zeros(B, n, n)
        D = torch.zeros_like(taus[0])
        c0 = 0.0
        for t, inv in zip(taus, invs):
            S = gram(t, side="right")
            C += S * (inv * inv)
            D += ((t @ t.mT) @ t if m < n else t @ S) * (inv * inv)
            c0 += float((S.double().square().sum((-2, -1)) * (inv * inv).double().flatten()).sum())
        return _Quadratic(C=C, D=D, c0=c0)
    F = torch.cat([t * inv for t, inv in zip(taus, invs)], dim=-2)
    A = torch.cat([(t @ t.mT) * inv for t, inv in zip(taus, invs)], dim=-1)
    return _Quadratic(F=F, A=A)


def _factored_quadratic(F: torch.Tensor, A: torch.Tensor) -> _Quadratic:
    r, n = F.shape[-2], F.shape[-1]
    if n <= 2 * r:
        return _Quadratic(C=F.mT @ F, D=A @ F, c0=float(A.double().square().sum()))
    return _Quadratic(F=F, A=A)


def _exact_loss(x: torch.Tensor, F: torch.Tensor, A: torch.Tensor) -> float:
    return float((x @ F.mT - A).double().square().sum())


# ---------------------------------------------------------------------------------------- methods


@register(
    "wudi",
    params=(
        _ALPHA,
        Param("solver", str, "iterative",
              "iterative: Adam from Σ τ_i as in the paper (the default, the paper's result); "
              "minimizer: the loss's exact minimum-norm minimiser D C⁺ (what the flow reaches as t → ∞), "
              "in closed form",
              choices=("iterative", "minimizer")),
        _STEPS,
        Param("lr", float, 1e-5, "Adam learning rate", minimum=0.0, exclusive_minimum=True),
        _TRACE,
        _FALLBACK,
    ),
    needs_base=True, reference=_WUDI_REF,
    summary="Minimise Σ_i ‖(τ_m − τ_i) τ_iᵀ‖²/‖τ_i‖² per matrix: Adam from Σ τ_i, lr 1e-5, 300 steps.",
)
def wudi(base, models, ctx, alpha, solver, steps, lr, trace, fallback):
    taus = _prepare(base, models, ctx, "wudi")
    reason = _fallback_reason(base, ctx)
    if reason:
        return _fallback(base, taus, fallback, alpha, ctx, reason)
    batch, shape, dtype = _as_batch(taus)
    ctx.info["solver"] = solver
    if solver == "minimizer":
        merged, facts, lam, psi = wudi_spectral(batch, 1.0, flow_response(None, _keep_all, math.inf))
        ctx.info.update(facts)
        _batch_stat(ctx, "rank_used", (psi != 0).sum(-1))
    else:
        quad = _wudi_quadratic(batch)
        merged = _iterate(_sum(batch), quad, steps, lambda p: torch.optim.Adam(p, lr=lr), ctx, trace)
        ctx.info.update(steps=steps, lr=lr)
    return base + alpha * merged.reshape(shape).to(base.dtype)


def _leading(t: torch.Tensor, k: int, generator):
    """``linalg.leading_svd`` of each matrix of a batch (B, m, n): U (B, m, k), S (B, k), Vh (B, k, n)."""
    parts = [leading_svd(x, k, generator=generator) for x in t]
    return tuple(torch.stack(p) for p in zip(*parts))


def _keep_all(desc: torch.Tensor, rows: int, n: int) -> torch.Tensor:
    return torch.full(desc.shape[:-1], desc.shape[-1], dtype=torch.long)


@register(
    "wudi2",
    params=(
        Param("alpha", str, "auto", "scale of the merged task vector: θ_base + alpha · τ_merged (auto: 0.1 for "
              "variant full, 1.0 for lora, as the reference runs)",
              check=_check_alpha_or_auto, kind_text="float or auto", range_doc="a number, or auto"),
        Param("variant", str, "auto",
              "full: targets rank-k(τ_i − τ̄) + τ̄, Adam from Σ τ_i; "
              "lora: targets rank-k(τ_i), SGD with momentum from τ̄; "
              "auto: lora when every expert is a LoRA adapter, else full (name it for LoRAs merged into full "
              "checkpoints)",
              choices=("auto", "full", "lora")),
        Param("rank", str, "1/T", "rank k of the targets and projectors (a rank rule, or 1/T: ⌊min(m, n)/T⌋)",
              check=_check_wudi2_rank, kind_text="rank rule",
              range_doc=RULE_DOC + ", or 1/T (⌊min(m, n)/T⌋, T = number of models; the default)"),
        Param("solver", str, "auto",
              "auto: the variant's optimizer result by the fastest exact route (full: the Adam loop; lora: the "
              "300-step SGD-momentum iterate in closed form); iterative: always the loop; minimizer: the loss's "
              "exact minimiser (closed form)",
              choices=("auto", "iterative", "minimizer")),
        _STEPS,
        Param("lr", str, "auto", "learning rate (auto: 1e-5 for full / Adam, 1e-4 for lora / SGD)",
              check=_check_lr, kind_text="float or auto", range_doc="> 0, or auto"),
        Param("momentum", float, 0.9, "SGD momentum (variant lora)", minimum=0.0, maximum=1.0,
              exclusive_maximum=True),
        _TRACE,
        _FALLBACK,
    ),
    needs_base=True, reference=_OPT_REF, resolve=resolve_wudi2, defaults_from=_WUDI2_DEFAULTS,
    summary="WUDI v2 (OptMerge): WUDI's objective on rank-k targets and projectors P_i = S_k V_kᵀ.",
)
def wudi2(base, models, ctx, alpha, variant, rank, solver, steps, lr, momentum, trace, fallback):
    # called without a plan (no facts about the inputs): auto means the full-fine-tune choices
    resolved = resolve_wudi2({"alpha": alpha, "variant": variant}, InputFacts())
    alpha, variant = resolved["alpha"], resolved["variant"]
    taus = _prepare(base, models, ctx, "wudi2")
    reason = _fallback_reason(base, ctx)
    if reason:
        return _fallback(base, taus, fallback, alpha, ctx, reason)
    batch, shape, dtype = _as_batch(taus)
    T = len(batch)
    B, m, n = batch[0].shape
    r = min(m, n)
    # ranks, per task and matrix
    ks = []
    for t in batch:
        if rank == "1/T":
            ks.append(torch.full((B,), max(1, r // T), dtype=torch.long))
        elif needs_spectrum(rank):
            s = spectrum(t)
            ks.append(torch.tensor([choose_rank(rank, (m, n), s[b]) for b in range(B)], dtype=torch.long))
        else:
            ks.append(torch.full((B,), choose_rank(rank, (m, n)), dtype=torch.long))
    nus, invs = _norms(batch)
    mean = torch.stack(batch).mean(0)
    Fs, As = [], []
    for t, k, inv in zip(batch, ks, invs):
        kmax = int(k.max())
        mask = (torch.arange(kmax).unsqueeze(0) < k.unsqueeze(-1)).to(t.device, t.dtype)  # (B, kmax)
        u, s, vh = _leading(t, kmax, ctx.generator)
        s = s * mask
        P = s.unsqueeze(-1) * vh  # projector S_k V_kᵀ (B, k, n)
        if variant == "lora":
            AT = u * (s * s).unsqueeze(-2)  # Ť V S = U S² for Ť = U S Vᵀ
        else:
            u2, s2, vh2 = _leading(t - mean, kmax, ctx.generator)
            target = (u2 * (s2 * mask).unsqueeze(-2)) @ vh2 + mean
            AT = target @ P.mT
        Fs.append(P * inv)
        As.append(AT * inv)
    F = torch.cat(Fs, dim=-2)
    A = torch.cat(As, dim=-1)
    del Fs, As
    rate = (1e-5 if variant == "full" else 1e-4) if lr == "auto" else lr
    x0 = _sum(batch) if variant == "full" else mean
    route = solver
    if solver == "auto":
        route = "closed_form" if variant == "lora" else "iterative"
    ctx.info.update(variant=variant, solver=route)
    ranks = torch.stack(ks, dim=-1)  # (B, T)
    ctx.info["rank"] = ranks[0].tolist() if B == 1 else {"min": int(ranks.min()), "max": int(ranks.max())}
    if route == "iterative":
        quad = _factored_quadratic(F, A)
        if variant == "full":
            make = lambda p: torch.optim.Adam(p, lr=rate)  # noqa: E731
        else:
            make = lambda p: torch.optim.SGD(p, lr=rate, momentum=momentum)  # noqa: E731
        merged = _iterate(x0, quad, steps, make, ctx, trace)
        ctx.info.update(steps=steps, lr=rate)
    else:
        if route == "closed_form":
            response = sgd_response(rate, momentum, steps)
            ctx.info.update(steps=steps, lr=rate, momentum=momentum)
        else:
            response = flow_response(None, _keep_all, math.inf)
        ctx.info["loss_init"] = _exact_loss(x0, F, A)
        merged, _, _ = general_spectral(x0, F, A, response)
        ctx.info["loss_final"] = _exact_loss(merged, F, A)
    return base + alpha * merged.reshape(shape).to(base.dtype)


@register(
    "swudi",
    params=(
        _SPECTRAL_ALPHA,
        Param("t", float, 300.0, "flow time of the filter f(λ) = 1 − e^(−λt)",
              minimum=0.0, exclusive_minimum=True),
        Param("rho", float, 0.85, "fraction of C's n eigenvalues kept (the top ⌈ρ·n⌉)", minimum=0.0, maximum=1.0,
              exclusive_minimum=True),
        _INIT,
        Param("filter", bool, True, "apply the exponential filter (false: f = the mask; the exact minimiser "
                                    "on the kept eigenspace)"),
        _SPECTRAL_SOLVER,
        _FALLBACK,
    ),
    needs_base=True, reference=_SWUDI_REF, defaults_from=_SWUDI_DEFAULTS,
    summary="WUDI's gradient flow in closed form: τ = θ0 − θ0 Q f Qᵀ + D Q (f/λ) Qᵀ, "
            "f = (1 − e^(−λt))·top-⌈ρn⌉ mask.",
)
def swudi(base, models, ctx, alpha, t, rho, init, filter, solver, fallback):
    taus = _prepare(base, models, ctx, "swudi")
    reason = _fallback_reason(base, ctx)
    if reason:
        return _fallback(base, taus, fallback, alpha, ctx, reason)
    batch, shape, dtype = _as_batch(taus)
    n = shape[-1]
    K = max(1, math.ceil(rho * n - 1e-9))

    def keep(desc, rows, nn):
        return torch.full(desc.shape[:-1], K, dtype=torch.long)

    response = flow_response(t if filter else None, keep, K)
    merged, facts, lam, psi = wudi_spectral(batch, _init_scale(init, len(batch)), response,
                                            "dense" if solver == "dense" else "auto")
    ctx.info.update(facts)
    ctx.info["K"] = K
    _batch_stat(ctx, "rank_used", (psi != 0).sum(-1))
    return base + alpha * merged.reshape(shape).to(base.dtype)


@register(
    "aswudi",
    params=(
        _SPECTRAL_ALPHA,
        Param("rank", str, "participation_sqrt",
              "rank rule on the √eigenvalues of C choosing K per tensor (gavish_donoho suits full fine-tunes)",
              check=check_rank_rule, kind_text="rank rule", range_doc=RULE_DOC),
        _INIT,
        _ASWUDI_SOLVER,
        _FALLBACK,
    ),
    needs_base=True, reference=_SWUDI_REF, defaults_from=_SWUDI_DEFAULTS,
    summary="swudi without the filter, K chosen per tensor by a rank rule on C's spectrum "
            "(the minimiser on the top-K eigenspace).",
)
def aswudi(base, models, ctx, alpha, rank, init, solver, fallback):
    taus = _prepare(base, models, ctx, "aswudi")
    reason = _fallback_reason(base, ctx)
    if reason:
        return _fallback(base, taus, fallback, alpha, ctx, reason)
    batch, shape, dtype = _as_batch(taus)
    chosen: list[int] = []

    def keep(desc, rows, n):
        s = desc.clamp_min(0).sqrt().cpu()
        ks = [choose_rank(rank, (rows, n), s[b]) for b in range(s.shape[0])]
        chosen[:] = ks  # asked again after a refinement (eigen_response): the last answer counts
        return torch.tensor(ks, dtype=torch.long)

    merged, facts, lam, psi = wudi_spectral(batch, _init_scale(init, len(batch)), flow_response(None, keep),
                                            "dense" if solver == "dense" else "auto",
                                            sketch=ctx.generator if solver == "randomized" else None)
    ctx.info.update(facts)
    if solver == "randomized":
        ctx.info["solver"] = "randomized"
    _batch_stat(ctx, "rank", chosen)
    _batch_stat(ctx, "rank_used", (psi != 0).sum(-1))
    return base + alpha * merged.reshape(shape).to(base.dtype)
