"""One output tensor exactly as the merge will write it, computed inside the statistics stage.

Stages that run the merged model before the merge (RegMean++: the model merged up to layer l) need the
plan's value of a tensor: the source's tensor for a copy, the method's result on the inputs for a merge,
cast to the output dtype (and back to float32 to run). This is ``run.compute``'s arithmetic for one job
(its reads, row realignment, dtype rules and cast), with the statistics the stage has just collected.
"""

from __future__ import annotations

import dataclasses

import torch

from ..plan import Action, Job, Plan
from ..run.compute import compute, read_inputs


@dataclasses.dataclass(frozen=True)
class _Given:
    """Statistics for one tensor, in the shape of a :class:`.stage.StatsSource`."""

    key: str
    stats: tuple

    def for_key(self, canonical: str) -> tuple:
        return self.stats if canonical == self.key else tuple({} for _ in self.stats)


def planned_value(plan: Plan, job: Job, stats: tuple[dict[str, torch.Tensor], ...] | None = None) -> torch.Tensor:
    """``job``'s output tensor, in float32 on the CPU; ``stats``: the method's statistics for this tensor
    (data-aware methods; default: the job's own statistics source when the stage already attached one, else
    none for any model). A method's global reduction (TIES' ``trim: global``) is taken over this tensor
    alone here."""
    if job.action is not Action.COPY and job.method.needs_calibration:
        if stats is not None:
            job = dataclasses.replace(job, stats=_Given(job.canonical, stats))
        elif job.stats is None:
            job = dataclasses.replace(job, stats=_Given(job.canonical, tuple({} for _ in plan.models)))
    out, _info = compute(plan, job, read_inputs(plan, job), "cpu")
    return out.float()
