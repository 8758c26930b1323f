"""Modality merging: one merge, several skeletons, one output per skeleton.

Vision-, audio- and video-LLMs fine-tuned from one base LLM share its language backbone. A recipe
with ``skeletons: [a, b, c]`` merges that backbone once and writes ``OUT/<label>/`` for each
skeleton: the merged backbone plus the skeleton's own encoders, projector, config, tokenizer and
processor files. Every merged tensor is computed once and written to each output; the outputs
appear together (built in one temporary folder renamed into place) or not at all.

Each output is planned as an ordinary single-skeleton merge (its ``omnimerge.yaml`` names its own
skeleton and reproduces it alone); what the outputs share is found by comparing their jobs.
"""

from __future__ import annotations

import errno
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoints.checkpoint import Checkpoint, load_checkpoint
from .checkpoints.output import OutputFolder, shard_filenames, write_json
from .checkpoints.safetensors_io import StreamingSafetensorsWriter
from .engine import (MergeResult, _Progress, _progress_enabled, _read_inputs, _release_freed_tensors_to_the_os,
                     _tensor_report, _write_side_files, compute)
from .errors import OmnimergeError
from .families.align import component_of
from .plan import Job, Plan, build_plan
from .recipe import Recipe, parse_recipe

_HUB_REV = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+@")


# --- planning -----------------------------------------------------------------------------------
def _entry(recipe: Recipe, spec: str):
    """The model entry that ``spec`` names (by name, then by path), if any."""
    return next((e for e in recipe.models if e.name == spec), None) or \
        next((e for e in recipe.models if e.path == spec), None)


def _label(recipe: Recipe, spec: str, ckpt: Checkpoint) -> str:
    """The output subfolder of one skeleton: its model entry's `name`, else its folder (or hub repo) name."""
    entry = _entry(recipe, spec)
    if entry is not None and entry.name:
        label = entry.name
    else:
        label = Path(spec.split("@", 1)[0] if _HUB_REV.match(spec) else spec).name
        if label in ("", ".", ".."):
            label = ckpt.path.name
    if label.startswith(".") or "/" in label or "\\" in label:
        raise OmnimergeError(f"skeletons: '{spec}' would be written to OUT/{label}, which is not a plain folder name; "
                             "list the model under `models` with a `name:` to label its output")
    return label


def _backbone(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Language tensors and their shapes, then the width (not the rows: vocabularies may differ) of
    the embedding and the head, in the checkpoint's order."""
    shapes = {c: tuple(ckpt.info(c)[1]) for c in ckpt.canon_to_raw if component_of(c) == "language"}
    for c in ("embed.weight", "lm_head.weight"):
        if ckpt.has(c):
            shapes[c] = tuple(ckpt.info(c)[1][1:])
    return shapes


def _where(ckpt: Checkpoint, canon: str) -> str:
    return ckpt.source.describe(ckpt.raw_key(canon))


def _check_shared_backbone(skeletons: dict[str, Checkpoint]) -> None:
    """Every skeleton must have the first one's language backbone: same tensors, same shapes."""
    (first_label, first), *rest = skeletons.items()
    want = _backbone(first)
    fix = ("modality merging needs skeletons built on one base LLM (the same language backbone); merge models "
           "of different backbones separately")
    for label, ck in rest:
        if ck.layer_count() != first.layer_count():
            raise OmnimergeError(
                f"skeletons: '{label}' ({ck.path}) has {ck.layer_count()} decoder layers, '{first_label}' "
                f"({first.path}) has {first.layer_count()}; {fix}")
        got = _backbone(ck)
        for key in list(want) + [k for k in got if k not in want]:
            if key not in got or key not in want:
                (has, h), (lacks, l) = ((first, first_label), (ck, label)) if key not in got else \
                    ((ck, label), (first, first_label))
                raise OmnimergeError(f"skeletons: '{key}' is in '{h}' ({_where(has, key)}) but not in '{l}' "
                                     f"({lacks.path}); {fix}")
            if got[key] != want[key]:
                what = "width" if key in ("embed.weight", "lm_head.weight") else "shape"
                raise OmnimergeError(
                    f"skeletons: the {what} of '{key}' differs: {want[key]} in '{first_label}' ({_where(first, key)}), "
                    f"{got[key]} in '{label}' ({_where(ck, key)}); {fix}")


def build_plans(recipe: Recipe | dict, *, relative_to: str | Path | None = None,
                allow_pickle: bool = False) -> dict[str, Plan]:
    """One plan per skeleton of a recipe with ``skeletons:``, keyed by output label (OUT/<label>).

    Checks, before anything is read, that the labels are distinct folder names and that every
    skeleton has the same language backbone (tensors and shapes), naming the files that differ.
    """
    recipe = parse_recipe(recipe)
    if not recipe.skeletons:
        raise OmnimergeError("the recipe has no `skeletons:` list; use omnimerge.plan.build_plan for one output")
    rel = Path(relative_to) if relative_to else None
    skeletons: dict[str, Checkpoint] = {}
    specs: dict[str, str] = {}
    for spec in recipe.skeletons:
        entry = _entry(recipe, spec)
        ck = load_checkpoint(entry.path if entry else spec, name=spec, relative_to=rel, allow_pickle=allow_pickle,
                             lora_base=entry.lora_base if entry else None)
        label = _label(recipe, spec, ck)
        if label in skeletons:
            raise OmnimergeError(
                f"skeletons: '{specs[label]}' and '{spec}' would both be written to OUT/{label}; give them "
                "distinct folder names, or list them under `models` with distinct `name:`s")
        skeletons[label], specs[label] = ck, spec
    _check_shared_backbone(skeletons)
    return {label: build_plan(recipe.model_copy(update={"skeleton": spec, "skeletons": None}), relative_to=rel,
                              allow_pickle=allow_pickle)
            for label, spec in specs.items()}


@dataclass
class _Step:
    """One tensor computed once and written to one or several outputs."""

    plan: Plan  # whose inputs it reads
    job: Job
    targets: list[tuple["_Output", Job]]


def _same_work(a: Job, b: Job) -> bool:
    return (a.action == b.action == "merge" and a.rows is None and b.rows is None and a.shape == b.shape
            and a.method is b.method and a.params == b.params and a.seed == b.seed)


def _steps(outputs: list["_Output"]) -> list[_Step]:
    """Merged tensors every output shares first (computed once), then each output's own tensors.

    Each output's jobs are reordered to match (the order of tensors in a safetensors file is free)."""
    first = outputs[0].plan
    by_canon = [{j.canonical: j for j in o.plan.jobs} for o in outputs]
    shared = [j.canonical for j in first.jobs
              if j.action == "merge" and all(j.canonical in m and _same_work(j, m[j.canonical]) for m in by_canon)]
    steps = [_Step(first, by_canon[0][c], [(o, m[c]) for o, m in zip(outputs, by_canon)]) for c in shared]
    done = set(shared)
    for o, m in zip(outputs, by_canon):
        own = [j for j in o.plan.jobs if j.canonical not in done]
        o.plan.jobs = [m[c] for c in shared] + own
        steps += [_Step(o.plan, j, [(o, j)]) for j in own]
    return steps


# --- writing ------------------------------------------------------------------------------------
@dataclass
class _Output:
    label: str
    plan: Plan
    folder: Path | None = None
    shards: list[list[Job]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    shard_of: dict[str, str] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    writers: list[StreamingSafetensorsWriter] = field(default_factory=list)
    _left: int = 0

    def open(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir()
        self.shards = self.plan.shards()
        self.names = shard_filenames(len(self.shards))
        self.shard_of = {j.out_key: self.names[s] for s, shard in enumerate(self.shards) for j in shard}

    def write(self, job: Job, tensor: torch.Tensor) -> None:
        """Write the next tensor in order, opening the next shard (and closing the last) as needed."""
        if self._left == 0:
            if self.writers:
                self.writers[-1].close()
            shard = self.shards[len(self.writers)]
            self.writers.append(StreamingSafetensorsWriter(self.folder / self.names[len(self.writers)],
                                                           [(j.out_key, j.out_dtype, j.shape) for j in shard]))
            self._left = len(shard)
        self.writers[-1].write(job.out_key, tensor)
        self._left -= 1

    def close(self) -> None:
        if self.writers:
            self.writers[-1].close()

    def abort(self) -> None:
        for w in self.writers:
            w.abort()


def _compute_step(step: _Step, tensors: list[torch.Tensor], device: str) -> tuple[list[torch.Tensor], dict]:
    """The step's tensor for each target, computed once and cast to each target's dtype."""
    if len({j.out_dtype for _, j in step.targets}) == 1:  # step.job is the first target's job
        t, info = compute(step.plan, step.job, tensors, device)
        return [t] * len(step.targets), info
    # Outputs of different dtypes: compute in float64 (exact for every narrower result), cast for each.
    t, info = compute(step.plan, replace(step.job, out_dtype=torch.float64), tensors, device)
    return [t.to(j.out_dtype) for _, j in step.targets], info


def _write_step(step: _Step, results: list[torch.Tensor]) -> None:
    for (o, job), t in zip(step.targets, results):
        o.write(job, t)


def execute_plans(plans: dict[str, Plan], out: str | Path, *, force: bool = False, device: str = "cpu",
                  progress: bool | None = None,
                  on_tensor: Callable[[Job], None] | None = None) -> dict[str, MergeResult]:
    """Write ``OUT/<label>/`` for every plan, atomically together; shared tensors are computed once."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OmnimergeError("--device cuda: no CUDA device is available to torch here; use --device cpu")
    _release_freed_tensors_to_the_os()
    t0 = time.perf_counter()
    protect = [p for plan in plans.values() for p in [m.path for m in plan.inputs()] + [plan.skeleton.path]]
    folder = OutputFolder(out, force, protect=protect)
    total = sum(p.out_bytes for p in plans.values())
    folder.check_space(total)
    outputs = [_Output(label, plan) for label, plan in plans.items()]
    steps = _steps(outputs)
    bar = _Progress(_progress_enabled(progress), sum(len(p.jobs) for p in plans.values()), total)
    with folder as tmp, ThreadPoolExecutor(1, "omnimerge-read") as reader, \
            ThreadPoolExecutor(1, "omnimerge-write") as writer_pool:
        try:
            for o in outputs:
                o.open(tmp / o.label)
            pending_read = reader.submit(_read_inputs, steps[0].plan, steps[0].job) if steps else None
            pending_write = None
            for i, step in enumerate(steps):
                start = time.perf_counter()
                tensors = pending_read.result()
                nxt = steps[i + 1] if i + 1 < len(steps) else None
                pending_read = reader.submit(_read_inputs, nxt.plan, nxt.job) if nxt else None
                results, info = _compute_step(step, tensors, device)
                del tensors
                if pending_write is not None:
                    pending_write.result()
                pending_write = writer_pool.submit(_write_step, step, results)
                seconds = time.perf_counter() - start
                for o, job in step.targets:
                    o.report[job.out_key] = _tensor_report(o.plan, job, info, seconds, o.shard_of[job.out_key])
                    bar.advance(job.nbytes)
                if on_tensor:
                    on_tensor(step.job)
            if pending_write is not None:
                pending_write.result()
            for o in outputs:
                o.close()
            shared = sum(len(s.targets) > 1 for s in steps)
            siblings = {o.label: str(o.plan.skeleton.path) for o in outputs}
            for o in outputs:
                _write_side_files(o.plan, o.folder, o.shards, o.names, o.report, time.perf_counter() - t0)
                report_path = o.folder / "report.json"
                report = json.loads(report_path.read_text())
                report["modality_merge"] = {"outputs": siblings, "shared_tensors": shared}
                write_json(report_path, report)
            folder.commit()
        except OSError as e:
            for o in outputs:
                o.abort()
            if e.errno == errno.ENOSPC:
                raise OmnimergeError(f"disk full while writing {folder.out}; nothing was left behind. Free space "
                                     "and run again") from None
            raise OmnimergeError(f"cannot write {folder.out}: {e}; nothing was left behind") from None
        except BaseException:
            for o in outputs:
                o.abort()
            raise
        finally:
            bar.close()
    seconds = time.perf_counter() - t0
    return {o.label: MergeResult(folder.out / o.label, o.plan, seconds, o.report) for o in outputs}


def merge_skeletons(recipe: Recipe, out: str | Path | None, *, force: bool = False, dry_run: bool = False,
                    device: str = "cpu", allow_pickle: bool = False, progress: bool | None = None,
                    relative_to: str | Path | None = None) -> dict[str, MergeResult]:
    """``omnimerge.merge`` for a recipe with ``skeletons:``: ``{label: MergeResult}``, outputs in OUT/<label>."""
    plans = build_plans(recipe, relative_to=relative_to, allow_pickle=allow_pickle)
    if dry_run:
        if out is not None:
            OutputFolder(out, force, protect=[m.path for p in plans.values() for m in p.inputs() + [p.skeleton]])
        return {label: MergeResult(None, plan, 0.0, None) for label, plan in plans.items()}
    if out is None:
        raise OmnimergeError("no output folder given")
    return execute_plans(plans, out, force=force, device=device, progress=progress)
