"""WIDEN: merging fine-tuned *and* pre-trained (continued pre-training) relatives of one base LLM by weight
disentanglement (Yu et al., 2024), as its authors' code runs it.

For a matrix W (out × in; a token embedding is transposed first, so that its columns are the tokens), each
column j splits into a magnitude m_j = ‖W[:, j]‖ and a direction W[:, j]/m_j. Per model i against the base:

* ΔM_i,j = |m_j(θ_i) − m_j(θ_base)| and ΔD_i,j = 1 − cos(θ_i[:, j], θ_base[:, j]);
* each is ranked within the model over the columns: significance s_i,j = rank_i(j)/n ∈ {0, 1/n, …, (n−1)/n}
  (ascending, ties by position);
* importance: softmax over the models of s_·,j, except that where s_i,j > t · mean_j(s_i,·) the score is set to
  the calibration value c (t = ``above_average``, c = ``calibration``);
* w_i,j = (importance of ΔM + importance of ΔD)/2, and θ = θ_base + Σ_i w_i,j τ_i[:, j].

Vectors (norms, biases) take the same importance computed from |τ_i| element-wise (not ranked) and
θ_base + Σ_i w_i ⊙ τ_i. Tensors of more than two dimensions are read as (shape[0], rest) matrices (omnimerge's
choice: the reference merges only Linear and Embedding weights).

**Scope: per tensor, as the reference.** The authors' ``widen_merging`` (yule-BUAA/MergeLLM,
``model_merging_methods/merging_methods.py``) ranks the columns of each parameter within that parameter; no
statistic crosses tensors, so the streaming engine computes exactly the reference's numbers. Column directions
are compared by cosine similarity of the columns themselves (the same as of the unit directions), with
``torch.cosine_similarity``'s ε, so a zero column gives ΔD = 1 instead of the reference's 0/0.

With one model and c = 1 every weight is 1 (softmax over one model is 1): the result is that model.
"""

from __future__ import annotations

import torch

from ..errors import OmnimergeError
from .registry import Param, register

_REF = ("Extend Model Merging from Fine-Tuned to Pre-Trained Large Language Models via Weight Disentanglement "
        "(Yu et al., 2024), arXiv:2408.03092; code: yule-BUAA/MergeLLM")
_DEFAULTS = ("yule-BUAA/MergeLLM @9178ef9: merge_llms.py lines 84-85 (--above_average_value_ratio 1.0, "
             "--score_calibration_value 1.0, also the README's runs); model_merging_methods/merging_methods.py "
             "lines 369-609 (widen_merging)")

ABOVE = Param("above_average", float, 1.0, "t: a significance above t × the model's mean significance gets the "
              "calibration score instead of its softmax share", minimum=0.0)
CALIBRATION = Param("calibration", float, 1.0, "c: the score of the significant entries (1: such an entry of "
                    "each model is added whole)")


def within_model_significance(diff: torch.Tensor) -> torch.Tensor:
    """Per row (model), each entry's rank among the row's entries (ascending, ties by position) divided by n."""
    n = diff.shape[1]
    order = torch.argsort(diff, dim=1, stable=True)
    ranks = torch.empty_like(diff)
    ranks.scatter_(1, order, (torch.arange(n, dtype=diff.dtype, device=diff.device) / n).expand_as(diff).contiguous())
    return ranks


def importance(significance: torch.Tensor, above_average: float, calibration: float) -> torch.Tensor:
    """Softmax over the models (rows), with the calibration score where a model's significance is above
    ``above_average`` times its mean."""
    scores = torch.softmax(significance, dim=0)
    mean = significance.mean(dim=1, keepdim=True)
    return torch.where(significance > mean * above_average, torch.full_like(scores, calibration), scores)


def column_differences(base: torch.Tensor, model: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ΔM, ΔD) of a model's matrix against the base's, one value per column."""
    dm = (model.norm(dim=0) - base.norm(dim=0)).abs()
    dd = 1.0 - torch.cosine_similarity(model, base, dim=0)
    return dm, dd


def _as_matrix(t: torch.Tensor, embedding: bool) -> torch.Tensor:
    m = t.reshape(t.shape[0], -1)
    return m.T if embedding else m


@register(
    "widen", params=(ABOVE, CALIBRATION), needs_base=True, min_models=1, reference=_REF, defaults_from=_DEFAULTS,
    summary="WIDEN: split each weight column into magnitude and direction, rank each model's changes of both "
            "against the base, weight its task vector per column by softmax importance (calibrated above the "
            "average), add to the base; for fine-tuned and continued-pre-trained relatives of one LLM.",
)
def widen(base, models, ctx, above_average, calibration):
    if base is None:
        raise OmnimergeError(f"{ctx.key}: widen needs a base model (the pre-trained LLM both relatives start from)")
    if base.ndim < 2:
        taus = torch.stack([m - base for m in models])
        w = importance(taus.abs().reshape(len(models), -1), above_average, calibration).reshape(taus.shape)
        return base + (w * taus).sum(dim=0)
    embedding = ctx.key.startswith("embed.")
    b = _as_matrix(base, embedding)
    ms = [_as_matrix(m, embedding) for m in models]
    diffs = [column_differences(b, m) for m in ms]
    dm = within_model_significance(torch.stack([d[0] for d in diffs]))
    dd = within_model_significance(torch.stack([d[1] for d in diffs]))
    w = 0.5 * (importance(dm, above_average, calibration) + importance(dd, above_average, calibration))
    merged = b + sum(w[i][None, :] * (m - b) for i, m in enumerate(ms))
    merged = merged.T if embedding else merged
    return merged.reshape(base.shape)
