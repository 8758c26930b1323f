"""Row blocks: a large tensor merged a block of rows at a time, so that memory follows a block, not a tensor.

A method that declares itself element-wise (``Method.elementwise``: each output element depends only on
the same element of its inputs — or on the row along the last dimension that holds it, which a block holds
whole — and on its pre-pass reduction) may merge a tensor in pieces. A merge
job whose tensor is larger than ``BLOCK_ABOVE`` bytes in the compute dtype is then cut into blocks of
about ``BLOCK_BYTES`` (whole rows of the first dimension): each block's rows are read from every input,
merged, cast and appended to the output file, and the next block's are read meanwhile. The bytes are
those of the whole-tensor merge: the method sees the same values element by element, draws its
randomness by element index (``MethodContext.offset``), and takes any quantity over the whole tensor
(TIES's per-tensor threshold, Breadcrumbs' rank cuts, the norms of slerp, Model Stock and an L1 rescale)
from the pre-pass. Rows past ``Job.rows`` (vocabularies of different
sizes) are the skeleton's, copied block by block.

The report's ``norm`` and ``delta_norm`` of a blocked tensor are the square roots of the sums of the
blocks' squared norms: equal to the whole tensor's up to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..plan import Action, Job, Plan
from .compute import all_finite, call_method, check_input, compute_inputs, nan_error

BLOCK_BYTES = 16 << 20  # a block's size in the compute dtype (at least one row)
BLOCK_ABOVE = 64 << 20  # tensors larger than this in the compute dtype are merged in blocks


@dataclass(frozen=True)
class Block:
    """Rows ``start:stop`` of a job's output tensor: merged, or (``merge`` False) copied from the skeleton."""

    job: Job
    start: int
    stop: int
    merge: bool = True

    @property
    def offset(self) -> int:
        """The flat index of the block's first element in the whole tensor."""
        return self.start * math.prod(self.job.shape[1:])

    @property
    def last(self) -> bool:
        return self.stop == self.job.shape[0]


def compute_bytes(plan: Plan, job: Job) -> int:
    return math.prod(job.shape) * torch.empty((), dtype=plan.compute_dtype).element_size()


def blockable(plan: Plan, job: Job) -> bool:
    """Whether ``job`` is merged in row blocks: a large tensor of ≥ 2 dimensions, merged by a method that is
    element-wise with the job's parameters (and needs no calibration statistics, and no realigned rows)."""
    return (job.action is Action.MERGE and len(job.shape) >= 2 and job.shape[0] > 1 and job.stats is None
            and job.align is None  # rows realigned to another vocabulary need whole tensors
            and job.method.blockable(job.params) and compute_bytes(plan, job) > BLOCK_ABOVE)


def blocks(plan: Plan, job: Job) -> list[Block]:
    """``job``'s row blocks, in order: the merged rows, then the skeleton's rows past ``job.rows``."""
    row = compute_bytes(plan, job) // job.shape[0]
    per = max(1, BLOCK_BYTES // max(row, 1))
    merged = job.shape[0] if job.rows is None else job.rows
    out = [Block(job, s, min(s + per, merged)) for s in range(0, merged, per)]
    return out + [Block(job, s, min(s + per, job.shape[0]), merge=False) for s in range(merged, job.shape[0], per)]


def read_block(plan: Plan, block: Block) -> list[torch.Tensor]:
    """The block's rows of every input (of the skeleton for a copied block); NaN/Inf is an error naming the file."""
    job = block.job
    if not block.merge:
        return [plan.skeleton.read_rows(job.canonical, block.start, block.stop)]
    return [check_input(m, key, m.read_rows(key, block.start, block.stop)) for m, key in plan.job_reads(job)]


def compute_block(plan: Plan, block: Block, tensors: list[torch.Tensor], device: str,
                  reduction: Any = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """The block's output rows (on the CPU, in the job's dtype) and its report facts: the method's, and
    ``norm_sq`` / ``delta_norm_sq`` (see the module doc). ``tensors`` is emptied (its memory let go)."""
    job = block.job
    if not block.merge:
        t = tensors.pop()
        return (t if t.dtype == job.out_dtype else t.to(job.out_dtype)), {}
    xs = compute_inputs(plan, job, tensors, device)
    tensors.clear()  # the read dtype's copies go before the merge
    out, facts = call_method(plan, job, xs, device, reduction, block.offset)
    if not all_finite(out):
        raise nan_error(job)
    info = dict(facts)
    info["norm_sq"] = float(out.float().norm()) ** 2
    if plan.job_has_base(job):
        info["delta_norm_sq"] = float((out - xs[0]).float().norm()) ** 2
    return out.to(job.out_dtype).cpu(), info


class BlockedReport:
    """Gathers a blocked tensor's facts block by block; ``add`` returns the tensor's facts after its last block."""

    def __init__(self):
        self.facts: dict[str, Any] = {}
        self.sums: dict[str, float] = {}
        self.seconds = 0.0
        self.count = 0

    def add(self, block: Block, info: dict[str, Any], seconds: float) -> tuple[dict[str, Any], float] | None:
        for k, v in info.items():
            if k.endswith("_sq"):
                self.sums[k] = self.sums.get(k, 0.0) + v
            else:
                self.facts[k] = v
        self.seconds += seconds
        self.count += 1
        if not block.last:
            return None
        facts = dict(self.facts)
        for k, v in self.sums.items():
            facts[k.removesuffix("_sq")] = math.sqrt(v)
        facts["row_blocks"] = self.count
        done = facts, self.seconds
        self.facts, self.sums, self.seconds, self.count = {}, {}, 0.0, 0
        return done
