"""Run a plan: stream tensors in, merge them one at a time, stream them out.

Peak memory is a few tensors (the inputs of the tensor being merged, those of the next one being
read ahead, and the result being written), never a whole model.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from . import __version__
from .checkpoints.card import model_card
from .checkpoints.output import OutputFolder, model_files, shard_filenames, write_json
from .checkpoints.safetensors_io import StreamingSafetensorsWriter
from .errors import OmnimergeError
from .methods import MethodContext, get_method
from .plan import Job, Plan, build_plan
from .recipe import ComponentMethod, Take, load_recipe, parse_recipe


@dataclass
class MergeResult:
    out: Path | None
    plan: Plan
    seconds: float
    report: dict[str, Any] | None
    adapter: dict[str, Any] | None = None  # --as-lora / extract: the adapter's summary (report.json "lora")
    url: str | None = None  # --push-to-hub: the Hub repo it was uploaded to


# --- reading and computing ----------------------------------------------------------------------
def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``. A sum is NaN/Inf whenever an entry is, and one reduction is ~20x cheaper
    than ``isfinite(t).all()``; only a sum that overflowed needs the entry-wise check."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _read_inputs(plan: Plan, job: Job) -> list[torch.Tensor]:
    if job.action == "copy":
        return [job.source.read(job.canonical)]
    tensors = []
    for m in plan.inputs():
        t = m.read(job.canonical)
        if t.is_floating_point() and not _all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise OmnimergeError(
                f"{m.describe(job.canonical)} holds {bad} NaN/Inf value(s); the model is broken — fix or "
                "re-download it, or keep this component from the skeleton"
            )
        tensors.append(t)
    if job.rows is not None:
        tensors.append(plan.skeleton.read(job.canonical))
    return tensors


def _compute_inputs(plan: Plan, job: Job, tensors: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    """A merge job's inputs on ``device`` in the compute dtype — but the models stay in their read dtype
    where the method takes them so (``Method.models_as_read``) and that dtype promotes to the compute
    dtype (so that keeping it is exact). The base (position 0) is always converted."""
    cd = plan.compute_dtype
    as_read = plan.base is not None and job.method.models_as_read

    def keep(i: int, t: torch.Tensor) -> bool:
        return as_read and i > 0 and t.is_floating_point() and torch.promote_types(t.dtype, cd) == cd

    return [t.to(device=device) if keep(i, t) else t.to(device=device, dtype=cd) for i, t in enumerate(tensors)]


def method_context(job: Job, device: str) -> MethodContext:
    """A merge job's context: its key, its RNG (seeded per tensor), and its calibration statistics if any."""
    stats = job.stats.for_key(job.canonical) if job.stats is not None else None
    return MethodContext(job.canonical, torch.Generator(device=device).manual_seed(job.seed), stats=stats)


def compute(plan: Plan, job: Job, tensors: list[torch.Tensor], device: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """One job's output tensor (on the CPU, in the job's dtype) and facts for the report."""
    if job.action == "copy":
        t = tensors[0]
        return (t if t.dtype == job.out_dtype else t.to(job.out_dtype)), {}
    full = tensors.pop() if job.rows is not None else None
    xs = _compute_inputs(plan, job, tensors, device)
    if job.rows is not None:
        xs = [x[: job.rows] for x in xs]
    base = xs[0] if plan.base is not None else None
    models = xs[1:] if plan.base is not None else xs
    ctx = method_context(job, device)
    out = job.method(base, models, ctx, **job.params)
    if not _all_finite(out):
        raise OmnimergeError(f"method '{job.method.name}' produced NaN/Inf for '{job.out_key}'; check its parameters")
    info = dict(ctx.info)
    info["norm"] = float(out.float().norm())
    if base is not None:
        info["delta_norm"] = float((out - base).float().norm())
    out = out.to(job.out_dtype).cpu()
    if full is not None:
        full = full.to(job.out_dtype)
        full[: job.rows] = out
        out = full
    return out, info


# On a GPU, consecutive small merges are computed as one step: their inputs cross in one copy per
# dtype and their results come back in one copy, with one synchronisation, instead of a few small
# copies and synchronisations per tensor (norms and biases are most of a model's tensors).
SMALL_TENSOR = 1 << 20  # output bytes up to which a merge joins a GPU batch
BATCH_BYTES = 64 << 20  # input + output bytes of one batch, at most


def _steps(plan: Plan, jobs: list[Job], device: str) -> list[list[Job]]:
    """``jobs`` in order, grouped into the steps computed together (one job each on the CPU)."""
    if device == "cpu":
        return [[j] for j in jobs]
    steps: list[list[Job]] = []
    size, batching = 0, False
    for j in jobs:
        small = j.action == "merge" and j.rows is None and j.nbytes <= SMALL_TENSOR
        cost = j.nbytes * (len(plan.inputs()) + 1)
        if small and batching and size + cost <= BATCH_BYTES:
            steps[-1].append(j)
            size += cost
        else:
            steps.append([j])
            size, batching = cost, small
    return steps


def _read_step(plan: Plan, step: list[Job]) -> list[list[torch.Tensor]]:
    return [_read_inputs(plan, j) for j in step]


def _moved(tensors: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    """``tensors`` on ``device``, moved in one copy per dtype (packed flat, then split into views)."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = torch.cat([tensors[i].reshape(-1) for i in idx]).to(device)
        for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = part.view(tensors[i].shape)
    return out


def compute_many(plan: Plan, jobs: list[Job], inputs: list[list[torch.Tensor]],
                 device: str) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """``compute`` for each job of a step (see ``_steps``); the same results, one transfer each way."""
    if len(jobs) == 1:
        if device == "cpu" and jobs[0].action == "merge":  # let the read dtype's copies go before the merge
            inputs[0][:] = _compute_inputs(plan, jobs[0], inputs[0], device)
        return [compute(plan, jobs[0], inputs[0], device)]
    moved = iter(_moved([t for ts in inputs for t in ts], device))
    outs, stats, infos = [], [], []
    for job, ts in zip(jobs, inputs):
        xs = [next(moved).to(plan.compute_dtype) for _ in ts]
        base = xs[0] if plan.base is not None else None
        models = xs[1:] if plan.base is not None else xs
        ctx = method_context(job, device)
        out = job.method(base, models, ctx, **job.params)
        o = out.float()
        delta = (out - base).float().norm() if base is not None else o.new_zeros(())
        stats.append(torch.stack([torch.isfinite(o).all().float(), o.norm(), delta]))
        outs.append(out.to(job.out_dtype))
        infos.append(dict(ctx.info))
    facts = torch.stack(stats).cpu().tolist()  # the one synchronisation
    results = []
    for job, out, (finite, norm, delta), info in zip(jobs, _moved(outs, "cpu"), facts, infos):
        if not finite:
            raise OmnimergeError(f"method '{job.method.name}' produced NaN/Inf for '{job.out_key}'; check its "
                                 "parameters")
        info["norm"] = norm
        if plan.base is not None:
            info["delta_norm"] = delta
        results.append((out, info))
    return results


def _release_freed_tensors_to_the_os() -> None:
    """Set glibc's allocator for a merge: tensors up to 1 GiB are reused from the heap; the heap is
    given back to the OS when the merge ends (``_give_memory_back``).

    glibc's default serves blocks over 32 MiB (and, once larger ones were freed, smaller ones too)
    with mmap: every new tensor is then fresh pages from the kernel, and filling them costs more
    than the arithmetic — a bf16 -> float32 conversion or a subtraction 4x slower, a whole merge
    2-3x. Reusing freed blocks costs 10-30% more peak memory (measured on the memory test's
    merges: task arithmetic 167 -> 185 MiB, TIES 272 -> 350 MiB for 16 MiB tensors) and keeps the
    peak resident until the end; tensors over 1 GiB (large embeddings) still come from mmap and go
    back at once."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD (a fixed value also stops glibc's own adjusting)
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep freed heap memory for the next tensor
        libc.mallopt(-8, 1)  # M_ARENA_MAX: the reader's, writer's and compute's blocks share one heap
    except (OSError, AttributeError):
        pass


def _give_memory_back() -> None:
    """Return the heap's free memory to the OS (after a merge; see ``_release_freed_tensors_to_the_os``)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# --- progress -----------------------------------------------------------------------------------
def _progress_enabled(flag: bool | None) -> bool:
    if flag is not None:
        return flag
    return sys.stderr.isatty() and not os.environ.get("CI")


class _Progress:
    def __init__(self, enabled: bool, total_tensors: int, total_bytes: int):
        self.bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("[bold]merging"), BarColumn(),
                                TextColumn("{task.fields[tensors]}/" + str(total_tensors) + " tensors"),
                                DownloadColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task("merge", total=total_bytes, tensors=0)
            self.done = 0

    def advance(self, nbytes: int) -> None:
        if self.bar:
            self.done += 1
            self.bar.update(self.task, advance=nbytes, tensors=self.done)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


# --- the merge ----------------------------------------------------------------------------------
def execute(plan: Plan, out: str | Path, *, force: bool = False, device: str = "cpu",
            progress: bool | None = None, on_tensor: Callable[[Job], None] | None = None,
            executor: str = "local", ray_address: str | None = None) -> MergeResult:
    """Write the plan's output to ``out`` atomically.

    ``executor="ray"`` spreads the output shards over a Ray cluster (``ray_address``, or a local one;
    see :mod:`omnimerge.executors.ray`): the bytes written are the same as the local executor's."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OmnimergeError("--device cuda: no CUDA device is available to torch here; use --device cpu")
    _release_freed_tensors_to_the_os()
    t0 = time.perf_counter()
    folder = OutputFolder(out, force, protect=[m.path for m in plan.inputs()] + [plan.skeleton.path])
    folder.check_space(plan.out_bytes)
    shards = plan.shards()
    names = shard_filenames(len(shards))
    bar = _Progress(_progress_enabled(progress), len(plan.jobs), plan.out_bytes)

    def done(job: Job) -> None:
        bar.advance(job.nbytes)
        if on_tensor:
            on_tensor(job)

    with folder as tmp:
        try:
            targets = [(shard, tmp / name) for shard, name in zip(shards, names)]
            if executor == "ray":
                from .executors.ray import run_shards

                report = run_shards(plan, targets, device=device, address=ray_address, on_tensor=done)
            elif executor == "local":
                report = stream_shards(plan, targets, device=device, on_tensor=done)
            else:
                raise OmnimergeError(f"unknown executor '{executor}'; use local or ray")
            _write_side_files(plan, tmp, shards, names, report, time.perf_counter() - t0)
            folder.commit()
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OmnimergeError(f"disk full while writing {folder.out}; nothing was left behind. Free space "
                                     "and run again") from None
            raise OmnimergeError(f"cannot write {folder.out}: {e}; nothing was left behind") from None
        finally:
            bar.close()
            _give_memory_back()
    seconds = time.perf_counter() - t0
    return MergeResult(folder.out, plan, seconds, report)


def stream_shards(plan: Plan, targets: list[tuple[list[Job], Path]], *, device: str = "cpu",
                  on_tensor: Callable[[Job], None] | None = None) -> dict[str, Any]:
    """Write each ``(jobs, path)`` shard file of ``targets``; returns the per-tensor report.

    The inputs of the next tensor are read while this one is computed (one reader thread), and a
    result is written while the next is computed (one writer thread). On an error, the files being
    written are closed and the error raised (the caller removes its temporary folder)."""
    report: dict[str, Any] = {}
    writers: list[StreamingSafetensorsWriter] = []
    with ThreadPoolExecutor(1, "omnimerge-read") as reader, ThreadPoolExecutor(1, "omnimerge-write") as writer_pool:
        try:
            steps = [_steps(plan, jobs, device) for jobs, _ in targets]
            queue = [step for shard in steps for step in shard]
            pending_read = reader.submit(_read_step, plan, queue[0]) if queue else None
            pending_write = None
            i = 0
            for (jobs, path), shard in zip(targets, steps):
                w = StreamingSafetensorsWriter(path, [(j.out_key, j.out_dtype, j.shape) for j in jobs])
                writers.append(w)
                for step in shard:
                    start = time.perf_counter()
                    inputs = pending_read.result()
                    i += 1
                    pending_read = reader.submit(_read_step, plan, queue[i]) if i < len(queue) else None
                    results = compute_many(plan, step, inputs, device)
                    del inputs
                    if pending_write is not None:
                        pending_write.result()
                    pending_write = writer_pool.submit(_write_step, w, step, [r for r, _ in results])
                    seconds = (time.perf_counter() - start) / len(step)
                    for job, (_, info) in zip(step, results):
                        report[job.out_key] = _tensor_report(plan, job, info, seconds, path.name)
                        if on_tensor:
                            on_tensor(job)
                    del results
                if pending_write is not None:
                    pending_write.result()
                    pending_write = None
                w.close()
        except BaseException:
            for w in writers:
                w.abort()
            raise
    return report


def _write_step(w: StreamingSafetensorsWriter, step: list[Job], results: list[torch.Tensor]) -> None:
    for job, t in zip(step, results):
        w.write(job.out_key, t)


def _tensor_report(plan: Plan, job: Job, info: dict, seconds: float, shard: str) -> dict[str, Any]:
    r: dict[str, Any] = {"canonical": job.canonical, "component": job.component, "action": job.action,
                         "shape": list(job.shape), "dtype": str(job.out_dtype).removeprefix("torch."), "shard": shard}
    if job.action == "merge":
        r["method"] = job.method.name
        r["params"] = job.params
        if job.rows is not None:
            r["rows_merged"] = job.rows
    else:
        r["source"] = job.source.name
        r["source_path"] = str(job.source.path)
        r["policy"] = job.note
    r.update(info)
    r["seconds"] = round(seconds, 6)
    return r


def _policy_text(pol) -> str:
    if isinstance(pol, Take):
        return f"take {pol.take}"
    if isinstance(pol, ComponentMethod):
        return pol.method
    return pol


def _write_side_files(plan: Plan, tmp: Path, shards: list[list[Job]], names: list[str], report: dict,
                      seconds: float) -> None:
    if len(shards) > 1:
        weight_map = {j.out_key: names[s] for s, shard in enumerate(shards) for j in shard}
        write_json(tmp / "model.safetensors.index.json",
                   {"metadata": {"total_size": plan.out_bytes}, "weight_map": weight_map})
    for name, src in model_files(plan.skeleton.path, plan.tokenizer_source).items():
        shutil.copy2(src, tmp / name)
    if plan.recipe.out_dtype:
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        _set_dtype(cfg, plan.recipe.out_dtype)
        write_json(cfg_path, cfg)
    recipe = resolved_recipe(plan)
    recipe_yaml = yaml.safe_dump(recipe, sort_keys=False)
    (tmp / "omnimerge.yaml").write_text(recipe_yaml)
    comps = sorted({j.component for j in plan.jobs})
    components = {c: _policy_text(plan.recipe.policy(c)) for c in comps}
    method = plan.recipe.method
    from .methods import get_method

    card = model_card(method=method, reference=get_method(method).reference,
                      base=plan.recipe.base, models=[e.path for e in plan.recipe.models],
                      skeleton=str(plan.skeleton.name), recipe_yaml=recipe_yaml, components=components,
                      paths={spec: ck.path for spec, ck in plan.refs.items()})
    (tmp / "README.md").write_text(card)
    write_json(tmp / "report.json", {
        "omnimerge_version": __version__,
        "method": method,
        "skeleton": str(plan.skeleton.path),
        "base": str(plan.base.path) if plan.base else None,
        "models": [str(m.path) for m in plan.models],
        "components": components,
        "notes": plan.notes,
        "seconds": round(seconds, 3),
        "bytes_written": plan.out_bytes,
        "tensors": report,
    })


def _set_dtype(cfg: dict, dtype: str) -> None:
    for c in [cfg] + [v for v in cfg.values() if isinstance(v, dict) and "model_type" in v]:
        if "torch_dtype" in c:
            c["torch_dtype"] = dtype
        c["dtype"] = dtype


def resolved_recipe(plan: Plan) -> dict:
    """The recipe with every path made absolute: what omnimerge.yaml records."""
    data = plan.recipe.model_dump(mode="json", exclude_none=True)

    def absolute(spec: str) -> str:
        return str(plan.refs[spec].path) if spec in plan.refs else spec

    for entry in data["models"]:
        entry["path"] = absolute(entry["path"])
    for k in ("base", "skeleton", "tokenizer_source"):
        if data.get(k):
            data[k] = absolute(data[k])
    data["skeleton"] = str(plan.skeleton.path)
    return data


def merge(recipe, out: str | Path | None = None, *, force: bool = False, dry_run: bool = False,
          device: str = "cpu", allow_pickle: bool = False, progress: bool | None = None,
          relative_to: str | Path | None = None, as_lora=None, push_to_hub: str | None = None,
          private: bool = False, executor: str = "local",
          ray_address: str | None = None) -> MergeResult | dict[str, MergeResult]:
    """Merge per ``recipe`` (a path to YAML, a dict or a Recipe) into the folder ``out``.

    ``as_lora`` (a rank rule) writes the merged delta over the base as a PEFT LoRA adapter instead
    of full weights (see :mod:`omnimerge.lora_out`); ``push_to_hub`` uploads ``out`` to that Hub
    repo afterwards (created if missing, ``private`` if asked).

    ``executor="ray"`` spreads the shards over a Ray cluster at ``ray_address`` (default: a local one).

    With ``dry_run`` only the plan is built and validated; nothing is written. A recipe with
    ``skeletons:`` writes ``out/<label>/`` per skeleton and returns ``{label: MergeResult}``
    (see :mod:`omnimerge.modality`).
    """
    if isinstance(recipe, (str, Path)):
        relative_to = relative_to or Path(recipe).parent
        recipe = load_recipe(recipe)
    recipe = parse_recipe(recipe)
    if executor not in ("local", "ray"):
        raise OmnimergeError(f"unknown executor '{executor}'; use local or ray")
    if executor == "ray":
        if recipe.skeletons or as_lora is not None:
            raise OmnimergeError("--executor ray writes one merged model; --as-lora and `skeletons:` run on the "
                                 "local executor")
        from .executors.ray import require_ray

        require_ray()
    if push_to_hub:
        from .hub import check_repo_id

        check_repo_id(push_to_hub)
    if recipe.skeletons and (as_lora is not None or push_to_hub):
        raise OmnimergeError("--as-lora and --push-to-hub take a recipe with one skeleton; `skeletons:` writes "
                             "several outputs (upload each folder with `hf upload REPO FOLDER`)")
    if recipe.skeletons and any(get_method(m).needs_calibration for m in _recipe_methods(recipe)):
        raise OmnimergeError("data-aware methods merge into one skeleton; run one recipe per skeleton")
    if recipe.skeletons:
        from .modality import merge_skeletons

        return merge_skeletons(recipe, out, force=force, dry_run=dry_run, device=device, allow_pickle=allow_pickle,
                               progress=progress, relative_to=relative_to)
    plan = build_plan(recipe, relative_to=relative_to, allow_pickle=allow_pickle)
    if plan.needs_statistics and not dry_run:
        if out is not None:  # the output folder's problems before minutes of forward passes
            OutputFolder(out, force, protect=[m.path for m in plan.inputs()])
        from .calibration import attach_statistics

        attach_statistics(plan, device=device, log=(lambda msg: print(msg, file=sys.stderr)) if progress is not False else None)
    if as_lora is not None:
        from .lora_out import write_lora

        result = write_lora(plan, out, as_lora, force=force, dry_run=dry_run, device=device, progress=progress)
        return _push(result, push_to_hub, private)
    if dry_run:
        if out is not None:
            OutputFolder(out, force, protect=[m.path for m in plan.inputs()])
        return MergeResult(None, plan, 0.0, None)
    if out is None:
        raise OmnimergeError("no output folder given")
    return _push(execute(plan, out, force=force, device=device, progress=progress, executor=executor,
                         ray_address=ray_address), push_to_hub, private)


def _recipe_methods(recipe) -> list[str]:
    return [recipe.method] + [p.method for p in recipe.components.values() if isinstance(p, ComponentMethod)]


def _push(result: MergeResult, repo: str | None, private: bool) -> MergeResult:
    if repo and result.out is not None:
        from .hub import push_folder

        result.url = push_folder(result.out, repo, private=private)
    return result
