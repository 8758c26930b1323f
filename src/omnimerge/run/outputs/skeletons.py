"""Several skeletons, one output each (modality merging): ``OUT/<label>/`` per skeleton.

Every merged tensor that the outputs share (same method, parameters and seed: the language
backbone, typically) is computed once and written to each output; each output's own tensors
(encoders, projector, ...) follow. The outputs appear together (built in one temporary folder
renamed into place) or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ...checkpoints.output import shard_filenames
from ...plan import Action, Job, Plan
from ..compute import compute, read_inputs
from ..stream import MergeResult
from .checkpoint import ShardWriter, tensor_report, write_side_files


@dataclass
class Step:
    """One tensor computed once and written to one or several outputs."""

    plan: Plan  # whose inputs it reads
    job: Job
    targets: list[tuple["Output", Job]]


@dataclass
class Output:
    """One skeleton's folder."""

    label: str
    plan: Plan
    report: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None
    writer: ShardWriter | None = None

    def open(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir()
        self.shards = self.plan.shards()
        self.names = shard_filenames(len(self.shards))
        self.shard_of = {j.out_key: self.names[s] for s, shard in enumerate(self.shards) for j in shard}
        self.writer = ShardWriter(folder, self.shards, self.names)


def _same_work(a: Job, b: Job) -> bool:
    return (a.action is b.action is Action.MERGE and a.rows is None and b.rows is None and a.shape == b.shape
            and a.method is b.method and a.params == b.params and a.seed == b.seed)


def plan_steps(outputs: list[Output]) -> list[Step]:
    """Merged tensors every output shares first (computed once), then each output's own tensors.

    Each output's jobs are reordered to match (the order of tensors in a safetensors file is free)."""
    first = outputs[0].plan
    by_canon = [{j.canonical: j for j in o.plan.jobs} for o in outputs]
    shared = [j.canonical for j in first.jobs
              if j.action is Action.MERGE and all(j.canonical in m and _same_work(j, m[j.canonical]) for m in by_canon)]
    steps = [Step(first, by_canon[0][c], [(o, m[c]) for o, m in zip(outputs, by_canon)]) for c in shared]
    done = set(shared)
    for o, m in zip(outputs, by_canon):
        own = [j for j in o.plan.jobs if j.canonical not in done]
        o.plan.jobs = [m[c] for c in shared] + own
        steps += [Step(o.plan, j, [(o, j)]) for j in own]
    return steps


class SkeletonsOutput:
    """The sink of a recipe with ``skeletons:``, from one plan per skeleton (``plan.build_plans``)."""

    def __init__(self, plans: dict[str, Plan]):
        self.outputs = [Output(label, plan) for label, plan in plans.items()]
        self._steps = plan_steps(self.outputs)
        self.protect = [p for plan in plans.values() for p in plan.input_folders()]
        self.total_bytes = self.space_bytes = sum(p.out_bytes for p in plans.values())
        self.total_tensors = sum(len(p.jobs) for p in plans.values())
        self.reductions: dict[str, Any] = {}

    # --- the folder
    def work(self) -> list[tuple[Plan, Job]]:
        return [(s.plan, s.job) for s in self._steps]

    def open(self, tmp: Path) -> None:
        for o in self.outputs:
            o.open(tmp / o.label)

    def finish(self, tmp: Path, seconds: float) -> None:
        shared = sum(len(s.targets) > 1 for s in self._steps)
        siblings = {o.label: str(o.plan.skeleton.path) for o in self.outputs}
        for o in self.outputs:
            write_side_files(o.plan, o.folder, o.shards, o.names, o.report, seconds,
                             extra={"modality_merge": {"outputs": siblings, "shared_tensors": shared}})

    def result(self, out: Path, seconds: float) -> dict[str, MergeResult]:
        return {o.label: MergeResult(out / o.label, o.plan, seconds, o.report) for o in self.outputs}

    # --- the loop
    def steps(self, device: str) -> list[Step]:
        return self._steps

    def read(self, step: Step) -> list[torch.Tensor]:
        return read_inputs(step.plan, step.job)

    def compute(self, step: Step, tensors: list[torch.Tensor], device: str) -> tuple[list[torch.Tensor], dict]:
        """The step's tensor for each target, computed once and cast to each target's dtype."""
        red = self.reductions.get(step.job.canonical)
        if len({j.out_dtype for _, j in step.targets}) == 1:  # step.job is the first target's job
            t, info = compute(step.plan, step.job, tensors, device, red)
            return [t] * len(step.targets), info
        # Outputs of different dtypes: compute in float64 (exact for every narrower result), cast for each.
        t, info = compute(step.plan, replace(step.job, out_dtype=torch.float64), tensors, device, red)
        return [t.to(j.out_dtype) for _, j in step.targets], info

    def write(self, step: Step, results) -> None:
        for (o, job), t in zip(step.targets, results[0]):
            o.writer.write(job, t)

    def record(self, step: Step, results, seconds: float) -> list[Job]:
        for o, job in step.targets:
            o.report[job.out_key] = tensor_report(o.plan, job, results[1], seconds, o.shard_of[job.out_key])
        return [job for _, job in step.targets]

    def close(self) -> None:
        for o in self.outputs:
            o.writer.close()

    def abort(self) -> None:
        for o in self.outputs:
            if o.writer is not None:
                o.writer.abort()
