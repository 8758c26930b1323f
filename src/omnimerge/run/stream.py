"""The one streaming loop of every run, and the output folder around it.

Peak memory is a few tensors (the inputs of the step being computed, those of the next one being
read ahead, and the result being written), never a whole model.

An output is a :class:`Sink`: it says which steps to run and how to read, compute and write one
step; :func:`stream` runs them — the inputs of the next step are read on one thread while this one
is computed, and a result is written on another while the next is computed. :func:`write_output`
puts a sink's files into an output folder atomically: the CUDA check, the allocator's settings, the
space check, the progress bar, the disk-full message, and an executor (local threads or Ray) that
runs the loop.

Before the loop, :func:`prepass` computes the global reductions that a method declares (e.g. TIES's
one magnitude threshold per task vector over every tensor it trims): streaming passes over the
same inputs, whose result each tensor's merge receives.
"""

from __future__ import annotations

import errno
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Protocol

import torch

from ..checkpoints.output import OutputFolder
from ..errors import OmnimergeError
from ..methods import MethodContext
from ..plan import Action, Job, Plan
from .blocks import Block, blockable, blocks, read_block
from .compute import compute_inputs, read_inputs
from .memory import give_memory_back, keep_freed_memory_for_reuse
from .options import RunOptions
from .progress import ProgressBar, progress_enabled


@dataclass
class MergeResult:
    out: Path | None
    plan: Plan
    seconds: float
    report: dict[str, Any] | None
    adapter: dict[str, Any] | None = None  # --as-lora / extract: the adapter's summary (report.json "lora")
    url: str | None = None  # --push-to-hub: the Hub repo it was uploaded to


class Sink(Protocol):
    """An output of the streaming loop. ``read`` runs on the reader thread, ``write`` on the writer
    thread (in step order), the others on the caller's."""

    def steps(self, device: str) -> list[Any]:
        """The steps to run, in order (a step is whatever the sink's other methods take)."""

    def read(self, step) -> Any:
        """The step's inputs."""

    def compute(self, step, inputs, device: str) -> Any:
        """The step's results from its inputs."""

    def write(self, step, results) -> None:
        """Store the step's results."""

    def record(self, step, results, seconds: float) -> Iterable[Job]:
        """Note the step's report entries; returns the output tensors it completed (for progress)."""

    def close(self) -> None:
        """After the last step: finish the files being written."""

    def abort(self) -> None:
        """On an error: close and drop whatever is being written."""


def stream(sink: Sink, *, device: str = "cpu", on_tensor: Callable[[Job], None] | None = None) -> None:
    """Run ``sink``'s steps: read ahead one step, compute, write behind one step. On an error the
    sink is aborted and the error raised (the caller removes its temporary folder)."""
    steps = sink.steps(device)
    with ThreadPoolExecutor(1, "omnimerge-read") as reader, ThreadPoolExecutor(1, "omnimerge-write") as writer:
        try:
            pending_read = reader.submit(sink.read, steps[0]) if steps else None
            pending_write = None
            for i, step in enumerate(steps):
                start = time.perf_counter()
                inputs = pending_read.result()
                pending_read = reader.submit(sink.read, steps[i + 1]) if i + 1 < len(steps) else None
                results = sink.compute(step, inputs, device)
                del inputs
                if pending_write is not None:
                    pending_write.result()
                pending_write = writer.submit(sink.write, step, results)
                for job in sink.record(step, results, time.perf_counter() - start):
                    if on_tensor:
                        on_tensor(job)
                del results
            if pending_write is not None:
                pending_write.result()
            sink.close()
        except BaseException:
            sink.abort()
            raise


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OmnimergeError("--device cuda: no CUDA device is available to torch here; use --device cpu")


class FolderSink(Sink, Protocol):
    """A sink that writes an output folder."""

    protect: list[Path]  # input folders the output must not overwrite
    total_bytes: int  # the bytes of output tensors (the progress bar's total)
    space_bytes: int | None  # bytes to check for on the disk (None: no check)
    total_tensors: int
    reductions: dict[str, Any]  # the pre-pass's results by canonical key (set before the loop)

    def work(self) -> list[tuple[Plan, Job]]:
        """Every (plan, job) the sink computes, for the pre-pass."""

    def open(self, tmp: Path) -> None:
        """Start writing into the temporary folder ``tmp``."""

    def finish(self, tmp: Path, seconds: float) -> None:
        """After the loop: the side files (config, card, report)."""

    def result(self, out: Path, seconds: float) -> Any:
        """What ``merge`` returns."""


def write_output(sink: FolderSink, out: str | Path, options: RunOptions, executor) -> Any:
    """Write ``sink``'s output to ``out`` atomically, its steps run by ``executor``."""
    check_device(options.device)
    keep_freed_memory_for_reuse()
    t0 = time.perf_counter()
    folder = OutputFolder(out, options.force, protect=sink.protect)
    if sink.space_bytes is not None:
        folder.check_space(sink.space_bytes)
    bar = ProgressBar(progress_enabled(options.progress), sink.total_tensors, sink.total_bytes)

    def done(job: Job) -> None:
        bar.advance(job.nbytes)
        if options.on_tensor:
            options.on_tensor(job)

    with folder as tmp:
        try:
            sink.reductions = prepass(sink.work(), options.device)
            sink.open(tmp)
            executor.run(sink, device=options.device, on_tensor=done)
            sink.finish(tmp, time.perf_counter() - t0)
            folder.commit()
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OmnimergeError(f"disk full while writing {folder.out}; nothing was left behind. Free space "
                                     "and run again") from None
            raise OmnimergeError(f"cannot write {folder.out}: {e}; nothing was left behind") from None
        finally:
            bar.close()
            give_memory_back()
    return sink.result(folder.out, time.perf_counter() - t0)


# --- the pre-pass ---------------------------------------------------------------------------------
@dataclass
class _PassSink:
    """One streaming pass of the pre-pass: every tensor (or row block) of the reductions' groups fed to its group."""

    work: list[tuple[Plan, Job | Block, Hashable]]
    accumulators: dict[Hashable, Any]

    def steps(self, device: str) -> list[tuple[Plan, Job | Block, Hashable]]:
        return [w for w in self.work if not self.accumulators[w[2]].done]

    def read(self, step) -> list[torch.Tensor]:
        plan, part, _ = step
        return read_block(plan, part) if isinstance(part, Block) else read_inputs(plan, part)

    def compute(self, step, tensors, device: str) -> None:
        plan, part, group = step
        job, offset = (part.job, part.offset) if isinstance(part, Block) else (part, 0)
        if not isinstance(part, Block) and job.rows is not None:
            tensors.pop()
        xs = compute_inputs(plan, job, tensors, device)
        tensors.clear()
        if not isinstance(part, Block) and job.rows is not None:
            xs = [x[: job.rows] for x in xs]
        ctx = MethodContext(job.canonical, torch.Generator(device=device).manual_seed(job.seed), offset=offset)
        self.accumulators[group].feed(xs[0], xs[1:], ctx, job.params)

    def write(self, step, results) -> None:
        pass

    def record(self, step, results, seconds: float) -> list[Job]:
        return []

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def prepass(work: Iterable[tuple[Plan, Job]], device: str = "cpu") -> dict[str, Any]:
    """The reductions of the methods of ``work``'s merge jobs, by canonical key.

    A method with a ``reduction`` groups the tensors it merges (``Reduction.group``: e.g. TIES with
    ``trim: global`` by its densities; None leaves a tensor out); each group's accumulator is fed
    every tensor of the group, in as many streaming passes as it asks for; its result is handed to
    the merge of each tensor of the group (``MethodContext.reduction``). A tensor merged in row
    blocks (run.blocks) is fed block by block; one that ``Reduction.when_blocked`` says needs a
    reduction of its own (TIES's ``trim: per_tensor``) is a group by itself."""
    grouped: list[tuple[Plan, Job | Block, Hashable]] = []
    accumulators: dict[Hashable, Any] = {}
    for plan, job in work:
        red = job.method.reduction if job.action is Action.MERGE else None
        if red is None:
            continue
        in_blocks = blockable(plan, job)
        key = red.group(job.params)
        if key is None and in_blocks and red.when_blocked is not None and red.when_blocked(job.params):
            key = ("tensor", job.canonical)
        if key is None:
            continue
        key = (job.method.name, key)
        if key not in accumulators:
            accumulators[key] = red.start(job.params)
        parts = [b for b in blocks(plan, job) if b.merge] if in_blocks else [job]
        grouped.extend((plan, part, key) for part in parts)
    if not grouped:
        return {}
    sink = _PassSink(grouped, accumulators)
    while not all(a.done for a in accumulators.values()):
        stream(sink, device=device)
        for a in accumulators.values():
            a.next_pass()
    results = {k: a.result() for k, a in accumulators.items()}
    return {(part.job if isinstance(part, Block) else part).canonical: results[key] for _, part, key in grouped}
