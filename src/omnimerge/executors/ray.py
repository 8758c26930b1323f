"""The Ray executor: a plan's output shards spread over a Ray cluster (``--executor ray``).

Each output shard is one Ray task. The task reads its tensors' inputs from the paths in the plan,
merges them with the local streaming engine (``engine.stream_shards``: read-ahead, write-behind)
and writes the shard file straight into the output's temporary folder. Every node must therefore
see the inputs and the output's parent folder at the same paths (NFS, a cluster file system, a
shared volume). The driver builds and checks the plan, waits for the shards, then writes the
index, config, model card and report and renames the folder into place, as the local executor does.

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
from pathlib import Path
from typing import Any, Callable

from ..errors import OmnimergeError
from ..plan import Job, Plan


def require_ray():
    """The ``ray`` module, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise OmnimergeError("--executor ray needs Ray, which is not installed here: pip install 'omnimerge[ray]' "
                             "(on every node of the cluster)") from None
    return ray


def _write_shard(plan: Plan, jobs: list[Job], path: str, device: str) -> dict[str, Any]:
    """In a worker: write one shard file; returns its tensors' report entries."""
    from ..engine import _give_memory_back, _release_freed_tensors_to_the_os, stream_shards

    _release_freed_tensors_to_the_os()
    try:
        return stream_shards(plan, [(jobs, Path(path))], device=device)
    finally:
        _give_memory_back()


def run_shards(plan: Plan, targets: list[tuple[list[Job], Path]], *, device: str = "cpu", address: str | None = None,
               on_tensor: Callable[[Job], None] | None = None, max_retries: int = 3) -> dict[str, Any]:
    """Write every ``(jobs, path)`` shard on the Ray cluster; returns the per-tensor report in plan order.

    Uses the running Ray session if there is one; otherwise connects to ``address`` (or
    ``$RAY_ADDRESS``), or starts a local cluster, and shuts it down at the end."""
    ray = require_ray()
    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except ConnectionError as e:
            raise OmnimergeError(f"--executor ray: cannot connect to the Ray cluster at {address}: {e}") from None
        started = True
    try:
        task = ray.remote(_write_shard).options(max_retries=max_retries, retry_exceptions=False,
                                                num_gpus=0 if device == "cpu" else 1)
        plan_ref = ray.put(plan)
        pending = {task.remote(plan_ref, jobs, str(path), device): jobs for jobs, path in targets}
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
        return {j.out_key: report[j.out_key] for jobs, _ in targets for j in jobs}
    finally:
        if started:
            ray.shutdown()


STOP_TIMEOUT_S = 60.0  # how long an error waits for the cancelled shards' workers to stop


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
