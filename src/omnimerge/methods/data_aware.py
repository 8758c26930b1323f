"""Data-aware methods: merges weighted by statistics of a few unlabeled calibration samples per model.

The statistics come from a stage that runs each model on its own samples before the merge; a method
here sees them as ``ctx.stats`` (one mapping per model, see :mod:`.registry`) and stays a pure function
of tensors and statistics.

* ``regmean`` (Jin et al., ICLR 2023): for a linear layer W (out × in, ``y = x Wᵀ``) with input Gram
  G_i = X_iᵀX_i / N_i on model i's samples, the W minimising Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖² is
  W = (Σ_i W_i G_i)(Σ_i G_i)⁻¹. The Grams are regularised by scaling their off-diagonal entries by
  ``alpha``: G̃_i = alpha·G_i + (1 − alpha)·diag(G_i). Two exact routes: the in × in solve, and, when a
  model's statistics are its N_i input rows X_i with N_i < in (a wide layer seen on few tokens), the
  Woodbury identity on Σ G̃_i = D + ZᵀZ (D diagonal, Z the stacked √(alpha/N_i)·X_i), which never forms
  an in × in matrix.
* ``fisher`` (Matena & Raffel, NeurIPS 2022): θ = Σ_i c_i F̂_i θ_i / Σ_i c_i F̂_i element-wise, with
  F̂_i = F_i + ε the diagonal Fisher of model i (the mean squared gradient of the log-likelihood of the
  model's own sampled predictions) and c_i the model's weight, optionally divided by the L2 norm of its
  whole Fisher (``fisher_norm``), so that models whose Fishers differ in scale count alike.
"""

from __future__ import annotations

import torch

from ..errors import OmnimergeError
from .registry import MethodContext, Param, register

_REGMEAN_REF = (
    "Dataless Knowledge Fusion by Merging Weights of Language Models (Jin et al., ICLR 2023), "
    "arXiv:2212.09849"
)
_REGMEAN_PP_REF = (
    "RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for Model Merging "
    "(Nguyen et al., 2025), arXiv:2508.03121"
)
_REGMEAN_PP_DEFAULTS = (
    "alpha 0.95: FusionBench's RegMean++ (tanganke/fusion_bench config/method/regmean_plusplus/"
    "clip_regmean_plusplus.yaml:11); tensors without input statistics take the models' mean "
    "(fusion_bench/method/regmean_plusplus/regmean_plusplus.py:136-137)"
)
_FISHER_REF = "Merging Models with Fisher-Weighted Averaging (Matena & Raffel, NeurIPS 2022), arXiv:2111.09832"
_REGMEAN_DEFAULTS = (
    "alpha 0.9 (off-diagonal scale; no reference file runs 0.9: FusionBench runs 0.95 on CLIP and 0.6 on GPT-2 "
    "(tanganke/fusion_bench config/method/regmean/clip_regmean.yaml:11, gpt2_regmean.yaml:10)); "
    "tensors without input statistics take the models' mean, as FusionBench does "
    "(fusion_bench/method/regmean/regmean.py:116-118)"
)
_ADAMERGING_REF = (
    "AdaMerging: Adaptive Model Merging for Multi-Task Learning (Yang et al., ICLR 2024), arXiv:2310.02575"
)
_ADAMERGING_DEFAULTS = (
    "granularity layer, init 0.3, Adam lr 1e-3, 1000 steps: FusionBench's layer-wise AdaMerging "
    "(tanganke/fusion_bench config/method/adamerging/clip.yaml:7-9, :19)"
)
_EXPERT_REF = (
    "Expert Merging: Model Merging with Unsupervised Expert Alignment and Importance-Guided Layer Chunking "
    "(Zhang et al., 2025), arXiv:2509.25712"
)
_EXPERT_DEFAULTS = (
    "Littleor/ExpertMerging InternVL/model_merging.py command-line defaults: init 0.1 (:1685, passed as the "
    "coefficients' init at :1359), lr 0.5 (:1736), 1 epoch (:1727), temperature 1.0 (:1731), sparsity_reg_weight 5 "
    "(:1764), hidden_states_weight 1.0 (:1778), no hidden-state layers (:1772); one coefficient per merged "
    "matrix (global_utils/expert_merging_base.py:165, coefficient size 1); AdamW with weight decay 1e-5 "
    "(InternVL/parametric_task_vector_model.py:144-149), cosine warm restarts T_0 50, floor 0.1 lr (:152-154), "
    "gradient clipping 1.0 (global_utils/expert_merging_base.py:662-666); 5 samples per task (model_merging.py:1715)"
)
_FISHER_DEFAULTS = (
    "normalize true, epsilon 1e-6: FusionBench's fisher_merging "
    "(tanganke/fusion_bench config/method/fisher_merging/fisher_merging.yaml:5, :7)"
)


def _stats(ctx: MethodContext, n: int, method: str) -> tuple[dict, ...]:
    stats = ctx.stats
    if stats is None or len(stats) != n:
        raise OmnimergeError(
            f"{ctx.key}: '{method}' needs calibration statistics for each of its {n} models; give every model "
            "a `calibration:` file in the recipe"
        )
    return stats


def regularized_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha·G + (1 − alpha)·diag(G): the off-diagonal entries scaled by alpha."""
    out = gram * alpha
    out.diagonal().add_(gram.diagonal(), alpha=1.0 - alpha)
    return out


def regmean_solve(weights: list[torch.Tensor], grams: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """W = (Σ W_i G̃_i)(Σ G̃_i)⁻¹ for weights (out × in) and Grams (in × in), in float64. Input features that
    no model ever saw (zero total diagonal) take the models' mean column."""
    g = [regularized_gram(x.double(), alpha) for x in grams]
    dead = sum(x.diagonal() for x in g) <= 0
    if dead.any():
        for x in g:
            x.diagonal()[dead] = 1.0
    total = sum(g)
    rhs = sum(w.double() @ x for w, x in zip(weights, g))
    # W total = rhs, total symmetric positive definite: solve totalᵀ Wᵀ = rhsᵀ
    try:
        chol = torch.linalg.cholesky(total)
        return torch.cholesky_solve(rhs.T, chol).T
    except RuntimeError:  # singular (alpha = 1 on rank-deficient inputs): the least-squares solution
        return torch.linalg.lstsq(total, rhs.T).solution.T


def regmean_solve_rows(weights: list[torch.Tensor], inputs: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """The same W from the input rows X_i (N_i × in, G_i = X_iᵀX_i / N_i) without forming in × in matrices:
    Σ G̃_i = D + ZᵀZ with D = (1 − alpha)·diag(Σ G_i) and Z the stacked √(alpha/N_i)·X_i, inverted by
    Woodbury. Needs alpha < 1 (D invertible on the seen features)."""
    if not alpha < 1.0:
        raise ValueError("the input-rows route needs alpha < 1")
    xs = [x.double() for x in inputs]
    ws = [w.double() for w in weights]
    diags = [(x * x).sum(0) / x.shape[0] for x in xs]
    d = (1.0 - alpha) * sum(diags)
    dead = d <= 0
    # features no model saw: identity Grams there (the mean column), as in regmean_solve
    d_each = [(1.0 - alpha) * g for g in diags]
    if dead.any():
        for g in d_each:
            g[dead] = 1.0
        d = sum(d_each)
    # rhs = Σ W_i (D_i + (alpha/N_i) X_iᵀ X_i)
    rhs = sum(w * g for w, g in zip(ws, d_each))
    for w, x in zip(ws, xs):
        rhs = rhs + (alpha / x.shape[0]) * ((w @ x.T) @ x)
    z = torch.cat([x * (alpha / x.shape[0]) ** 0.5 for x in xs])  # (N, in)
    dinv = 1.0 / d
    zd = z * dinv  # Z D⁻¹
    small = torch.eye(z.shape[0], dtype=z.dtype) + zd @ z.T  # I + Z D⁻¹ Zᵀ
    rd = rhs * dinv  # rhs D⁻¹
    return rd - torch.linalg.solve(small, (rd @ z.T).T).T @ zd


def _register_regmean(name: str, alpha: float, statistic: str, reference: str, defaults_from: str,
                      summary: str) -> None:
    """RegMean and RegMean++: the same solve over the Grams of one ``statistic`` each."""
    def merge(base, models, ctx, alpha):
        return _regmean(models, ctx, alpha, name)

    merge.__name__ = merge.__qualname__ = name
    register(name, params=(Param("alpha", float, alpha, "scale of the Grams' off-diagonal entries (1: the plain "
                                 "least-squares merge; smaller: closer to a per-feature weighted average)",
                                 minimum=0.0, maximum=1.0),),
             needs_base=False, reference=reference, defaults_from=defaults_from, calibration=(statistic,),
             summary=summary)(merge)


_register_regmean(
    "regmean", 0.9, "gram", _REGMEAN_REF, _REGMEAN_DEFAULTS,
    "Per linear layer W = (Σ W_i G̃_i)(Σ G̃_i)⁻¹, G_i the Gram of the layer's inputs on model i's samples "
    "(off-diagonals × alpha); other tensors: the mean.")
_register_regmean(
    "regmean_plusplus", 0.95, "merged_gram", _REGMEAN_PP_REF, _REGMEAN_PP_DEFAULTS,
    "RegMean with each layer's input Grams taken from the model merged so far (layers merged in order): "
    "model i's layer l runs on the merged layers 0..l-1's hidden states of its samples.")


def _regmean(models, ctx, alpha, method):
    stats = _stats(ctx, len(models), method)
    have = [("gram" in s) or ("inputs" in s) for s in stats]
    if models[0].ndim != 2 or not any(have):
        ctx.info[method] = "mean (no input statistics for this tensor)"
        return torch.stack(models).mean(0)
    if not all(have):
        missing = [i for i, h in enumerate(have) if not h]
        raise OmnimergeError(f"{ctx.key}: models {missing} have no input statistics for this layer while others do; "
                             "collect the statistics of every model with the same settings")
    n = models[0].shape[1]
    for i, s in enumerate(stats):
        x = s.get("gram", s.get("inputs"))
        if x.shape[-1] != n:
            raise OmnimergeError(f"{ctx.key}: model {i}'s input statistics are {tuple(x.shape)} wide, the weight "
                                 f"takes {n} inputs; the statistics belong to another model")
    if alpha < 1.0 and all("inputs" in s for s in stats):
        merged = regmean_solve_rows(models, [s["inputs"] for s in stats], alpha)
        ctx.info[method] = "input rows (Woodbury)"
    else:
        grams = [s["gram"] if "gram" in s else (s["inputs"].double().T @ s["inputs"].double()) / len(s["inputs"])
                 for s in stats]
        merged = regmean_solve(models, grams, alpha)
        ctx.info[method] = "gram"
    return merged.to(models[0].dtype)


@register(
    "fisher",
    params=(
        Param("weight", float, 1.0, "weight of each model", minimum=0.0, per_model=True),
        Param("normalize", bool, True, "divide each model's Fisher by its L2 norm over all merged tensors"),
        Param("epsilon", float, 1e-6, "added to every Fisher entry (no division by zero where all are 0)",
              minimum=0.0, exclusive_minimum=True),
    ),
    needs_base=False, reference=_FISHER_REF, defaults_from=_FISHER_DEFAULTS, calibration=("fisher",),
    summary="Element-wise Σ c_i F_i θ_i / Σ c_i F_i with F_i each model's diagonal Fisher on its own samples.",
)
def fisher(base, models, ctx, weight, normalize, epsilon):
    stats = _stats(ctx, len(models), "fisher")
    weights = weight if isinstance(weight, list) else [weight] * len(models)
    if not all("fisher" in s for s in stats):
        ctx.info["fisher"] = "weighted mean (no Fisher for this tensor)"
        total = sum(weights)
        return sum(w * m for w, m in zip(weights, models)) / total
    coeffs = list(weights)
    if normalize:
        norms = [float(s["fisher_norm"]) if "fisher_norm" in s else None for s in stats]
        if any(v is None for v in norms):
            raise OmnimergeError(f"{ctx.key}: 'fisher' with normalize needs each model's Fisher norm; the "
                                 "statistics stage records it (fisher_norm)")
        inv = [1.0 / (v + epsilon) for v in norms]
        coeffs = [c * i / sum(inv) for c, i in zip(coeffs, inv)]
    num = torch.zeros_like(models[0], dtype=torch.float64)
    den = torch.zeros_like(num)
    for c, m, s in zip(coeffs, models, stats):
        f = s["fisher"].double() + epsilon
        if f.shape != m.shape:
            raise OmnimergeError(f"{ctx.key}: a Fisher of shape {tuple(f.shape)} for a tensor of shape "
                                 f"{tuple(m.shape)}; the statistics belong to another model")
        num += c * f * m.double()
        den += c * f
    return (num / den).to(models[0].dtype)


@register(
    "adamerging",
    params=(
        Param("granularity", str, "layer", "one coefficient per model for each decoder layer (layer) or for the "
              "whole model (task)", choices=("layer", "task")),
        Param("init", float, 0.3, "the coefficients' starting value (and the value of tensors they do not cover)"),
        Param("lr", float, 1e-3, "Adam learning rate of the coefficients", minimum=0.0, exclusive_minimum=True),
        Param("steps", int, 1000, "optimisation steps (each takes one batch of every model's samples)",
              minimum=0),
    ),
    needs_base=True, reference=_ADAMERGING_REF, defaults_from=_ADAMERGING_DEFAULTS, calibration=("coefficient",),
    summary="θ_base + Σ_i λ_i τ_i with layer-wise λ learned to minimise the merged model's prediction entropy "
            "on every model's unlabeled samples.",
)
def adamerging(base, models, ctx, granularity, init, lr, steps):
    stats = _stats(ctx, len(models), "adamerging")
    return _coefficient_merge(base, models, ctx, stats, init)


def _coefficient_merge(base, models, ctx, stats, init):
    """θ_base + Σ_i c_i τ_i with each model's learned coefficient for this tensor (else ``init``)."""
    if all("coefficient" in s for s in stats):
        coeffs = [float(s["coefficient"]) for s in stats]
        ctx.info["coefficients"] = coeffs
    else:
        coeffs = [init] * len(models)
        ctx.info["coefficients"] = f"init {init} (not a parameter the coefficients were learned for)"
    out = base.clone()
    for c, m in zip(coeffs, models):
        out += c * (m - base)
    return out


def _hidden_layers(value):
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text is None:
        raise ValueError(f"must be a string (none, all, or indices like '4,8'), got {value!r}")
    if text in ("none", "all"):
        return text
    try:
        indices = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"must be none, all, or comma-separated indices like '4,8', got {value!r}") from None
    if any(i < 0 for i in indices):
        raise ValueError(f"indices must be non-negative, got {value!r}")
    return ",".join(map(str, indices))


@register(
    "expert_merging",
    params=(
        Param("granularity", str, "tensor", "one coefficient per model for each merged matrix (tensor), each decoder "
              "layer (layer) or the whole model (task)", choices=("tensor", "layer", "task")),
        Param("init", float, 0.1, "the coefficients' start (and the value of tensors without one)",
              minimum=0.0, maximum=1.0, exclusive_minimum=True, exclusive_maximum=True),
        Param("lr", float, 0.5, "AdamW learning rate of the coefficients' logits", minimum=0.0, exclusive_minimum=True),
        Param("epochs", int, 1, "passes over the samples (a step takes one batch of every model)", minimum=0),
        Param("temperature", float, 1.0, "temperature of the logit alignment", minimum=0.0, exclusive_minimum=True),
        Param("reg_weight", float, 5.0, "weight of the regulariser Σ|λ − init| / groups", minimum=0.0),
        Param("hidden_weight", float, 1.0, "weight of the hidden-state alignment", minimum=0.0),
        Param("hidden_layers", str, "none", "hidden states to align: none, all, or indices into the model's "
              "hidden states (0: embeddings, i: after decoder layer i), e.g. '4,8,12'", check=_hidden_layers,
              kind_text="str", range_doc="none, all, or indices like '4,8,12'"),
    ),
    needs_base=True, reference=_EXPERT_REF, defaults_from=_EXPERT_DEFAULTS, calibration=("expert_coefficient",),
    summary="θ_base + Σ_i λ_i τ_i with λ_i in (0, 1) learned per merged matrix so that the merged model's logits "
            "(and hidden states) match each expert's on the expert's own unlabeled samples.",
)
def expert_merging(base, models, ctx, granularity, init, lr, epochs, temperature, reg_weight, hidden_weight,
                   hidden_layers):
    stats = _stats(ctx, len(models), "expert_merging")
    return _coefficient_merge(base, models, ctx, stats, init)
