"""The Ray executor: a merged model's shards spread over a Ray cluster (``--executor ray``).

Each output shard is one Ray task. The task reads its tensors' inputs from the paths in the plan,
runs the streaming loop on them (read-ahead, write-behind) and writes the shard file straight into
the output's temporary folder. Every node must therefore see the inputs and the output's parent
folder at the same paths (NFS, a cluster file system, a shared volume). The driver builds and checks
the plan (and runs any method's pre-pass), waits for the shards, then writes the index, config,
model card and report and renames the folder into place, as with the local executor.

The bytes are the same as the local executor's: a shard's layout (names, order, offsets) is fixed
by the plan, and every random draw is seeded by (recipe seed, canonical key), not by the worker.
A task whose worker dies (node lost, process killed, out of memory) is run again, up to
``max_retries`` times, and rewrites its shard from the start; an error of the merge itself (bad
input, NaN) is not retried but raised, and the other shards are cancelled (and waited for, so
that none writes into the temporary folder after it is removed).

Parallelism is per shard: a merge spreads over at most as many workers as it has shards, so give
the recipe a ``shard_size`` that makes enough of them (e.g. ``shard_size: 1GB``).
"""

from __future__ import annotations

import os
from typing import Any, Callable

from ...errors import OmnimergeError
from ...plan import Job
from ..memory import give_memory_back, keep_freed_memory_for_reuse
from ..stream import stream

STOP_TIMEOUT_S = 60.0  # how long an error waits for the cancelled shards' workers to stop


def require_ray():
    """The ``ray`` module, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise OmnimergeError("--executor ray needs Ray, which is not installed here: pip install 'omnimerge[ray]' "
                             "(on every node of the cluster)") from None
    return ray


def write_part(part, device: str) -> dict[str, Any]:
    """In a worker: run one shard's sink; returns its tensors' report entries."""
    keep_freed_memory_for_reuse()
    try:
        stream(part, device=device)
        return part.report
    finally:
        give_memory_back()


class RayExecutor:
    """Runs a sink that can be split into parts (``sink.part(i)`` for each shard ``i``) on a Ray cluster.

    Uses the running Ray session if there is one; otherwise connects to ``address`` (or
    ``$RAY_ADDRESS``), or starts a local cluster, and shuts it down at the end."""

    def __init__(self, address: str | None = None, max_retries: int = 3):
        self.address, self.max_retries = address, max_retries

    def run(self, sink, *, device: str, on_tensor: Callable[[Job], None] | None = None) -> None:
        if not hasattr(sink, "part"):
            raise OmnimergeError("--executor ray writes one merged model; --as-lora and `skeletons:` run on the "
                                 "local executor")
        ray = require_ray()
        started = False
        if not ray.is_initialized():
            address = self.address or os.environ.get("RAY_ADDRESS") or None
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
            except ConnectionError as e:
                raise OmnimergeError(f"--executor ray: cannot connect to the Ray cluster at {address}: {e}") from None
            started = True
        try:
            task = ray.remote(write_part).options(max_retries=self.max_retries, retry_exceptions=False,
                                                  num_gpus=0 if device == "cpu" else 1)
            pending = {task.remote(sink.part(i), device): shard for i, shard in enumerate(sink.shards)}
            report: dict[str, Any] = {}
            try:
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    for ref in ready:
                        jobs = pending.pop(ref)
                        report.update(_result(ray, ref))
                        for job in jobs:
                            if on_tensor:
                                on_tensor(job)
            except BaseException:
                _cancel_and_wait(ray, list(pending))
                raise
            sink.report.update({j.out_key: report[j.out_key] for shard in sink.shards for j in shard})
        finally:
            if started:
                ray.shutdown()


def _cancel_and_wait(ray, refs: list) -> None:
    """Cancel the shards still running and wait until their workers have stopped (or STOP_TIMEOUT_S has
    passed): the caller removes the output's temporary folder next, and a worker still writing a shard
    there would leave a file behind."""
    for ref in refs:
        ray.cancel(ref, force=True)
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=STOP_TIMEOUT_S)


def _result(ray, ref) -> dict[str, Any]:
    """``ray.get``, raising a task's own error (OmnimergeError, OSError) rather than Ray's wrapper."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, (OmnimergeError, OSError)):
            raise cause from None
        raise
