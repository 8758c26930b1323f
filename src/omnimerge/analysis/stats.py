"""Per tensor: task-vector norms, pairwise cosines, sign conflicts and singular spectra.

Streams like a merge (the same loop, :func:`omnimerge.run.stream.stream`, with a statistics sink):
one tensor's inputs in memory at a time, read ahead on a thread.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import OmnimergeError
from ..families.align import layer_index
from ..methods.linalg import spectrum
from ..methods.ranks import check_rank_rule, choose_rank
from ..plan import Action, Job, Plan, build_plan
from ..recipe import load_recipe
from ..run.stream import stream
from .plots import write_plots

TOP_SINGULAR = 64  # singular values kept per task vector in the JSON


def tensor_stats(taus: list[torch.Tensor], *, rank_rule="knee", spectra: bool = True) -> dict[str, Any]:
    """Statistics of the task vectors of one tensor (all of one shape)."""
    flat = torch.stack([t.reshape(-1).float() for t in taus])
    norms = flat.norm(dim=1)
    unit = flat / norms.clamp_min(1e-30)[:, None]
    cos = (unit @ unit.T).clamp(-1, 1)
    signs = torch.sign(flat)
    nonzero = (signs != 0).sum(0)
    pos, neg = (signs > 0).sum(0), (signs < 0).sum(0)
    contested = nonzero >= 2
    conflict = ((pos > 0) & (neg > 0) & contested).sum() / contested.sum().clamp_min(1)
    out: dict[str, Any] = {
        "norms": [float(x) for x in norms],
        "cosine": [[round(float(x), 6) for x in row] for row in cos],
        "sign_conflict": float(conflict),
    }
    if spectra and taus[0].ndim == 2 and min(taus[0].shape) > 1:
        out["spectra"] = []
        for t in taus:
            s = spectrum(t.float())
            k = choose_rank(rank_rule, tuple(t.shape), s)
            energy = float((s[:k] ** 2).sum() / (s**2).sum().clamp_min(1e-30))
            out["spectra"].append({"rank": k, "energy_at_rank": energy,
                                   "singular_values": [float(x) for x in s[:TOP_SINGULAR]]})
    return out


class StatisticsOutput:
    """The streaming loop's sink for ``analyze``: each merged tensor's task vectors -> its statistics."""

    def __init__(self, plan: Plan, rank_rule, spectra: bool):
        self.plan, self.rank_rule, self.spectra = plan, rank_rule, spectra
        self.tensors: dict[str, Any] = {}

    def steps(self, device: str) -> list[Job]:
        return [j for j in self.plan.jobs if j.action is Action.MERGE and j.rows is None]

    def read(self, job: Job) -> list[torch.Tensor]:
        base = self.plan.base.read(job.canonical).float()
        return [m.read(job.canonical).float() - base for m in self.plan.models]

    def compute(self, job: Job, taus: list[torch.Tensor], device: str) -> dict[str, Any]:
        stats = tensor_stats(taus, rank_rule=self.rank_rule, spectra=self.spectra)
        stats.update(component=job.component, layer=layer_index(job.canonical), key=job.out_key,
                     shape=list(job.shape))
        return stats

    def write(self, job: Job, stats) -> None:
        pass

    def record(self, job: Job, stats: dict[str, Any], seconds: float) -> list[Job]:
        self.tensors[job.canonical] = stats
        return [job]

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def analyze(recipe, out: str | Path, *, rank_rule="knee", spectra: bool = True, relative_to=None,
            allow_pickle: bool = False, plots: bool = True) -> dict[str, Any]:
    """Analyse the task vectors of every tensor the recipe merges; write analysis.json (+ PNGs) to ``out``."""
    if isinstance(recipe, (str, Path)):
        relative_to = relative_to or Path(recipe).parent
        recipe = load_recipe(recipe)
    try:
        rank_rule = check_rank_rule(rank_rule)
    except ValueError as e:
        raise OmnimergeError(f"--rank-rule: {e}") from None
    plan = build_plan(recipe, relative_to=relative_to, allow_pickle=allow_pickle)
    if plan.base is None:
        raise OmnimergeError("analyze needs a `base:` in the recipe: task vectors are θ_i − θ_base")
    if plan.layers is not None or plan.vocabulary is not None:
        raise OmnimergeError("analyze compares whole models tensor by tensor; remove `slices:` and `tokenizer:` from "
                             "the recipe to analyze its models' task vectors")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sink = StatisticsOutput(plan, rank_rule, spectra)
    stream(sink)
    tensors = sink.tensors
    result = {
        "models": [m.name for m in plan.models],
        "base": plan.base.name,
        "rank_rule": rank_rule,
        "seconds": round(time.perf_counter() - t0, 3),
        "summary": summarize(tensors, len(plan.models)),
        "tensors": tensors,
    }
    (out / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    if plots:
        result["plots"] = [str(p) for p in write_plots(result, out)]
    return result


def summarize(tensors: dict[str, Any], n_models: int) -> dict[str, Any]:
    """Per component: mean norms per model, mean pairwise cosine, mean sign-conflict rate."""
    by_comp: dict[str, dict[str, Any]] = {}
    for stats in tensors.values():
        c = by_comp.setdefault(stats["component"], {"tensors": 0, "norm_sq": [0.0] * n_models, "cos": 0.0,
                                                    "conflict": 0.0})
        c["tensors"] += 1
        c["norm_sq"] = [a + b * b for a, b in zip(c["norm_sq"], stats["norms"])]
        cos = stats["cosine"]
        pairs = [cos[i][j] for i in range(n_models) for j in range(i + 1, n_models)]
        c["cos"] += sum(pairs) / len(pairs) if pairs else 1.0
        c["conflict"] += stats["sign_conflict"]
    return {comp: {"tensors": c["tensors"], "norm": [v**0.5 for v in c["norm_sq"]],
                   "mean_pairwise_cosine": c["cos"] / c["tensors"], "mean_sign_conflict": c["conflict"] / c["tensors"]}
            for comp, c in by_comp.items()}
