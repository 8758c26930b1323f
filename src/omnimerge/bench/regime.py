"""How big the zoo's task vectors are: the regime a merging method sees.

Real fine-tunes are small perturbations of their base (the DARE paper: supervised fine-tuning deltas
of LMs "typically within 0.002" per element, on weights whose rms is about 0.02). The benchmark only
says something about real merges when its experts sit in that regime, so it measures, per setting,
over the language backbone's matrices (the tensors every capability merge changes):

- ``median_rel_norm`` / ``max_rel_norm``: ‖τ‖_F / ‖θ_base‖_F per matrix and expert (LoRA experts as
  their folded-in B·A·α/r), median and maximum over all of them;
- ``rms_tau``: the largest per-expert root mean square of τ over all its language-matrix elements;
- ``cosine``: pairwise cosine similarity of the experts' flattened task vectors.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

__all__ = ["language_matrices", "task_vector_stats"]


def language_matrices(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The two-dimensional tensors of the language backbone's decoder layers (not the vision tower,
    not embeddings or lm_head, which the bench's experts never train)."""
    return {k: v for k, v in state.items() if v.ndim == 2 and ".layers." in k and "visual" not in k}


def _state(folder_or_model) -> dict[str, torch.Tensor]:
    if isinstance(folder_or_model, (str, Path)):
        from .model import load_model

        folder_or_model = load_model(folder_or_model)
    return {k: v.detach().float() for k, v in folder_or_model.state_dict().items()}


def task_vector_stats(base, experts: dict) -> dict:
    """Statistics of the experts' task vectors against ``base`` (folders or models; LoRA adapter
    folders are folded in): ``{median_rel_norm, max_rel_norm, rms_tau, cosine: {a: {b: c}},
    experts: {name: {median_rel_norm, max_rel_norm, rms_tau}}}``."""
    base_m = language_matrices(_state(base))
    if not base_m:
        raise ValueError("no language-backbone matrices (names with '.layers.') in the base")
    rels_all: list[float] = []
    per: dict[str, dict] = {}
    flat: dict[str, torch.Tensor] = {}
    for name, folder in experts.items():
        mats = language_matrices(_state(folder))
        missing = sorted(set(base_m) - set(mats))
        if missing:
            raise ValueError(f"expert {name!r} lacks {missing[0]} (and {len(missing) - 1} more) of the base")
        rels, sq, n, parts = [], 0.0, 0, []
        for key, b in base_m.items():
            tau = mats[key] - b
            rels.append(float(tau.norm() / b.norm()))
            sq += float((tau.double() ** 2).sum())
            n += tau.numel()
            parts.append(tau.flatten())
        rels_all += rels
        flat[name] = torch.cat(parts)
        per[name] = {"median_rel_norm": float(torch.tensor(rels).median()), "max_rel_norm": max(rels),
                     "rms_tau": math.sqrt(sq / n)}
    names = list(flat)
    cosine = {a: {b: float(torch.nn.functional.cosine_similarity(flat[a], flat[b], dim=0)) for b in names if b != a}
              for a in names}
    return {"median_rel_norm": float(torch.tensor(rels_all).median()), "max_rel_norm": max(rels_all),
            "rms_tau": max(p["rms_tau"] for p in per.values()), "cosine": cosine, "experts": per}
