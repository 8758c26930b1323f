"""One job's inputs read and merged: the arithmetic of a run, without threads, files or progress.

On a GPU, consecutive small merges are computed as one step (:func:`group_steps`): their inputs
cross in one copy per dtype and their results come back in one copy, with one synchronisation,
instead of a few small copies and synchronisations per tensor (norms and biases are most of a
model's tensors).
"""

from __future__ import annotations

from typing import Any

import torch

from ..checkpoints.checkpoint import check_finite
from ..errors import OmnimergeError
from ..methods import MethodContext
from ..plan import Action, Job, Plan

SMALL_TENSOR = 1 << 20  # output bytes up to which a merge joins a GPU batch
BATCH_BYTES = 64 << 20  # input + output bytes of one batch, at most


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``. A sum is NaN/Inf whenever an entry is, and one reduction is ~20x cheaper
    than ``isfinite(t).all()``; only a sum that overflowed needs the entry-wise check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_input(m, key: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` (read from input ``m`` under ``key``), or an error naming the file if it holds NaN/Inf."""
    if t.is_floating_point() and not all_finite(t):
        bad = int((~torch.isfinite(t)).sum())
        raise OmnimergeError(
            f"{m.describe(key)} holds {bad} NaN/Inf value(s); the model is broken — fix or "
            "re-download it, or keep this component from the skeleton"
        )
    return t


def read_inputs(plan: Plan, job: Job) -> list[torch.Tensor]:
    """A job's input tensors as read: the source's (copy), or the base and models' (+ the skeleton's
    full tensor when only some rows merge). A model's NaN/Inf is an error naming the file."""
    if job.action is Action.COPY:  # kept tensors: the same rule, unless the recipe copies them as they are
        key = job.source_key or job.canonical
        t = job.source.read(key)
        if t.is_floating_point() and not all_finite(t):
            check_finite(t, job.source.describe(key), kept=True, allowed=bool(plan.recipe.copy_nonfinite))
        return [t]
    tensors = [check_input(m, key, m.read(key)) for m, key in plan.job_reads(job)]
    if job.align is not None:  # token rows realigned to the output vocabulary
        tensors = job.align(tensors)
    if job.rows is not None:
        tensors.append(plan.skeleton.read(job.canonical))
    return tensors


def read_step(plan: Plan, step: list[Job]) -> list[list[torch.Tensor]]:
    return [read_inputs(plan, j) for j in step]


def compute_inputs(plan: Plan, job: Job, tensors: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    """A merge job's inputs on ``device`` in the compute dtype — but the models stay in their read dtype
    where the method takes them so (``Method.models_as_read``) and that dtype promotes to the compute
    dtype (so that keeping it is exact). The base (position 0) is always converted."""
    cd = plan.compute_dtype
    as_read = plan.job_has_base(job) and job.method.models_as_read

    def keep(i: int, t: torch.Tensor) -> bool:
        return as_read and i > 0 and t.is_floating_point() and torch.promote_types(t.dtype, cd) == cd

    return [t.to(device=device) if keep(i, t) else t.to(device=device, dtype=cd) for i, t in enumerate(tensors)]


def call_method(plan: Plan, job: Job, xs: list[torch.Tensor], device: str, reduction: Any,
                offset: int = 0) -> tuple[torch.Tensor, dict]:
    """The method on a job's compute inputs (``offset``: the flat index of their first element in the whole
    tensor, for a row block); returns the merged tensor and the method's report facts."""
    with_base = plan.job_has_base(job)
    base = xs[0] if with_base else None
    models = xs[1:] if with_base else xs
    stats = job.stats.for_key(job.canonical) if job.stats is not None else None  # data-aware methods
    ctx = MethodContext(job.canonical, torch.Generator(device=device).manual_seed(job.seed), reduction=reduction,
                        stats=stats, offset=offset)
    out = job.method(base, models, ctx, **job.params)
    return out, ctx.info


def nan_error(job: Job) -> OmnimergeError:
    return OmnimergeError(f"method '{job.method.name}' produced NaN/Inf for '{job.out_key}'; check its parameters")


def compute(plan: Plan, job: Job, tensors: list[torch.Tensor], device: str,
            reduction: Any = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """One job's output tensor (on the CPU, in the job's dtype) and facts for the report.
    ``reduction``: the pre-pass result for this job (see stream.prepass)."""
    if job.action is Action.COPY:
        t = tensors[0]
        return (t if t.dtype == job.out_dtype else t.to(job.out_dtype)), {}
    full = tensors.pop() if job.rows is not None else None
    xs = compute_inputs(plan, job, tensors, device)
    if job.rows is not None:
        xs = [x[: job.rows] for x in xs]
    out, facts = call_method(plan, job, xs, device, reduction)
    if not all_finite(out):
        raise nan_error(job)
    info = dict(facts)
    info["norm"] = float(out.float().norm())
    if plan.job_has_base(job):
        info["delta_norm"] = float((out - xs[0]).float().norm())
    out = out.to(job.out_dtype).cpu()
    if full is not None:
        full = full.to(job.out_dtype)
        full[: job.rows] = out
        out = full
    return out, info


def group_steps(plan: Plan, jobs: list[Job], device: str) -> list[list[Job]]:
    """``jobs`` in order, grouped into the steps computed together (one job each on the CPU)."""
    if device == "cpu":
        return [[j] for j in jobs]
    steps: list[list[Job]] = []
    size, batching = 0, False
    for j in jobs:
        small = j.action is Action.MERGE and j.rows is None and j.nbytes <= SMALL_TENSOR
        cost = j.nbytes * (len(plan.job_reads(j)) + 1)
        if small and batching and size + cost <= BATCH_BYTES:
            steps[-1].append(j)
            size += cost
        else:
            steps.append([j])
            size, batching = cost, small
    return steps


def _moved(tensors: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    """``tensors`` on ``device``, moved in one copy per dtype (packed flat, then split into views)."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = torch.cat([tensors[i].reshape(-1) for i in idx]).to(device)
        for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = part.view(tensors[i].shape)
    return out


def compute_many(plan: Plan, jobs: list[Job], inputs: list[list[torch.Tensor]], device: str,
                 reductions: dict[str, Any] | None = None) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """``compute`` for each job of a step (see :func:`group_steps`); the same results, one transfer each way.
    ``reductions``: the pre-pass results by canonical key."""
    red = reductions or {}
    if len(jobs) == 1:
        if device == "cpu" and jobs[0].action is Action.MERGE:  # let the read dtype's copies go before the merge
            inputs[0][:] = compute_inputs(plan, jobs[0], inputs[0], device)
        return [compute(plan, jobs[0], inputs[0], device, red.get(jobs[0].canonical))]
    moved = iter(_moved([t for ts in inputs for t in ts], device))
    outs, stats, infos = [], [], []
    for job, ts in zip(jobs, inputs):
        xs = [next(moved).to(plan.compute_dtype) for _ in ts]
        out, facts = call_method(plan, job, xs, device, red.get(job.canonical))
        o = out.float()
        delta = (out - xs[0]).float().norm() if plan.job_has_base(job) else o.new_zeros(())
        stats.append(torch.stack([torch.isfinite(o).all().float(), o.norm(), delta]))
        outs.append(out.to(job.out_dtype))
        infos.append(dict(facts))
    facts = torch.stack(stats).cpu().tolist()  # the one synchronisation
    results = []
    for job, out, (finite, norm, delta), info in zip(jobs, _moved(outs, "cpu"), facts, infos):
        if not finite:
            raise nan_error(job)
        info["norm"] = norm
        if plan.job_has_base(job):
            info["delta_norm"] = delta
        results.append((out, info))
    return results
