"""One output tensor exactly as the merge will write it, computed inside the statistics stage.

Stages that run the merged model before the merge (RegMean++: the model merged up to layer l) need the
plan's value of a tensor: the source's tensor for a copy, the method's result on the inputs for a merge,
cast to the output dtype (and back to float32 to run). This is the arithmetic of ``run.compute`` for one
job, without the run's threads, devices and report.
"""

from __future__ import annotations

import torch

from ..methods import MethodContext
from ..plan import Action, Job, Plan


def planned_value(plan: Plan, job: Job, stats: tuple[dict[str, torch.Tensor], ...] | None = None) -> torch.Tensor:
    """``job``'s output tensor, in float32 on the CPU; ``stats``: the method's statistics for this tensor
    (data-aware methods; default: the job's own statistics source when the stage already attached one, else
    none for any model). A method's global reduction (TIES' ``trim: global``) is taken over this tensor
    alone here."""
    if job.action is Action.COPY:
        return job.source.read(job.canonical).to(job.out_dtype).float()
    if stats is None and job.method.needs_calibration:
        stats = job.stats.for_key(job.canonical) if job.stats is not None else tuple({} for _ in plan.models)
    xs = [m.read(job.canonical).to(plan.compute_dtype) for m in plan.inputs()]
    full = plan.skeleton.read(job.canonical).to(job.out_dtype) if job.rows is not None else None
    if job.rows is not None:
        xs = [x[: job.rows] for x in xs]
    base = xs[0] if plan.base is not None else None
    models = xs[1:] if plan.base is not None else xs
    ctx = MethodContext(job.canonical, torch.Generator().manual_seed(job.seed), stats=stats)
    out = job.method(base, models, ctx, **job.params).to(job.out_dtype)
    if full is not None:
        full[: job.rows] = out
        out = full
    return out.float()
