"""The Python API: ``merge`` a recipe, ``extract`` a fine-tune as a LoRA adapter.

Both build a plan, choose the output (a checkpoint folder, a LoRA adapter, one folder per skeleton)
and the executor, and hand them to the streaming loop (:mod:`omnimerge.run.stream`). Run options
travel as one frozen :class:`~omnimerge.run.options.RunOptions`.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

from .calibration import attach_statistics
from .checkpoints.checkpoint import load_checkpoint
from .checkpoints.output import OutputFolder
from .errors import OmnimergeError
from .families.align import COMPONENTS
from .hub import check_repo_id, push_folder
from .methods import get_method
from .plan import DTYPES, Plan, build_plan, build_plans
from .recipe import ComponentMethod, load_recipe, parse_recipe
from .run.executors import make_executor, require_ray
from .run.options import EXECUTORS, RunOptions
from .run.outputs.checkpoint import CheckpointOutput
from .run.outputs.lora import LoraOutput, check_extract_pair, parse_rank
from .run.outputs.skeletons import SkeletonsOutput
from .run.stream import MergeResult, check_device, write_output

__all__ = ["MergeResult", "RunOptions", "extract", "merge", "write_plan"]


def _options(options: RunOptions | None, kwargs: dict) -> RunOptions:
    return replace(options or RunOptions(), **kwargs)


def _dry_run(out, options: RunOptions, plans: list[Plan]) -> None:
    """--dry-run: the output folder is checked as a run would check it; nothing is written."""
    if out is not None:
        OutputFolder(out, options.force, protect=[f for p in plans for f in p.input_folders()])


def _check_options(recipe, o: RunOptions) -> None:
    if o.executor not in EXECUTORS:
        raise OmnimergeError(f"unknown executor '{o.executor}'; use {' or '.join(EXECUTORS)}")
    if o.executor == "ray":
        if recipe.skeletons or o.as_lora is not None:
            raise OmnimergeError("--executor ray writes one merged model; --as-lora and `skeletons:` run on the "
                                 "local executor")
        require_ray()
    if o.push_to_hub:
        check_repo_id(o.push_to_hub)
    if recipe.skeletons and (o.as_lora is not None or o.push_to_hub):
        raise OmnimergeError("--as-lora and --push-to-hub take a recipe with one skeleton; `skeletons:` writes "
                             "several outputs (upload each folder with `hf upload REPO FOLDER`)")


def recipe_methods(recipe) -> list[str]:
    """The recipe's method and every component's own."""
    return [recipe.method] + [p.method for p in recipe.components.values() if isinstance(p, ComponentMethod)]


def _push(result: MergeResult, o: RunOptions) -> MergeResult:
    if o.push_to_hub and result.out is not None:
        result.url = push_folder(result.out, o.push_to_hub, private=o.private)
    return result


def merge(recipe, out: str | Path | None = None, *, options: RunOptions | None = None,
          **kwargs) -> MergeResult | dict[str, MergeResult]:
    """Merge per ``recipe`` (a path to YAML, a dict or a Recipe) into the folder ``out``.

    ``options`` (or its fields as keyword arguments: ``force``, ``dry_run``, ``device``, ``as_lora``,
    ``executor``, ``push_to_hub``, ...; see :class:`RunOptions`) say how. ``as_lora`` (a rank rule)
    writes the merged delta over the base as a PEFT LoRA adapter instead of full weights;
    ``executor="ray"`` spreads the shards over a Ray cluster; ``push_to_hub`` uploads ``out``
    afterwards. With ``dry_run`` only the plan is built and validated. A recipe with ``skeletons:``
    writes ``out/<label>/`` per skeleton and returns ``{label: MergeResult}``.
    """
    o = _options(options, kwargs)
    if isinstance(recipe, (str, Path)):
        o = replace(o, relative_to=o.relative_to or Path(recipe).parent)
        recipe = load_recipe(recipe)
    recipe = parse_recipe(recipe)
    _check_options(recipe, o)
    if recipe.skeletons and any(get_method(m).needs_calibration for m in recipe_methods(recipe)):
        raise OmnimergeError("data-aware methods merge into one skeleton; run one recipe per skeleton")
    if recipe.skeletons:
        plans = build_plans(recipe, relative_to=o.relative_to, allow_pickle=o.allow_pickle)
        if o.dry_run:
            _dry_run(out, o, list(plans.values()))
            return {label: MergeResult(None, plan, 0.0, None) for label, plan in plans.items()}
        return _write(SkeletonsOutput(plans), out, o)
    plan = build_plan(recipe, relative_to=o.relative_to, allow_pickle=o.allow_pickle)
    sink = LoraOutput(plan, o.as_lora) if o.as_lora is not None else CheckpointOutput(plan)
    if o.dry_run:
        _dry_run(out, o, [plan])
        return MergeResult(None, plan, 0.0, None)
    if plan.needs_statistics:
        if out is not None:  # the output folder's problems before minutes of forward passes
            _dry_run(out, o, [plan])
        check_device(o.device)
        attach_statistics(plan, device=o.device,
                          log=(lambda msg: print(msg, file=sys.stderr)) if o.progress is not False else None)
    return _push(_write(sink, out, o), o)


def write_plan(plan: Plan | dict[str, Plan], out: str | Path, *, options: RunOptions | None = None,
               **kwargs) -> MergeResult | dict[str, MergeResult]:
    """Write an already built plan (``plan.build_plan``), or one plan per skeleton (``plan.build_plans``),
    as a merged checkpoint folder (or folders ``out/<label>/``)."""
    sink = SkeletonsOutput(plan) if isinstance(plan, dict) else CheckpointOutput(plan)
    return _write(sink, out, _options(options, kwargs))


def _write(sink, out, o: RunOptions):
    if out is None:
        raise OmnimergeError("no output folder given")
    return write_output(sink, out, o, make_executor(o.executor, address=o.ray_address))


def extract(model: str | Path, base: str | Path, out: str | Path | None = None, *, rank=16,
            out_dtype: str | None = None, options: RunOptions | None = None, **kwargs) -> MergeResult:
    """Write MODEL − BASE (any fine-tune of BASE, or a LoRA adapter over it) as a LoRA adapter on BASE.

    ``rank`` is a rank rule (see :func:`~omnimerge.run.outputs.lora.parse_rank`); ``out_dtype``
    the factors' dtype (default float32); ``options`` as for :func:`merge` (``executor`` stays local).
    """
    o = _options(options, kwargs)
    rule = parse_rank(rank)
    if out_dtype is not None and out_dtype not in DTYPES:
        raise OmnimergeError(f"out_dtype {out_dtype!r}: use one of {', '.join(DTYPES)}")
    if o.push_to_hub:
        check_repo_id(o.push_to_hub)
    m = load_checkpoint(str(model), allow_pickle=o.allow_pickle)
    b = load_checkpoint(str(base), allow_pickle=o.allow_pickle)
    extra = check_extract_pair(m, b)
    recipe = {"method": "task_arithmetic", "base": str(base), "skeleton": str(base),
              "models": [{"path": str(model)}], "components": {c: {"take": str(model)} for c in COMPONENTS}}
    if out_dtype:
        recipe["out_dtype"] = out_dtype
    plan = build_plan(recipe, allow_pickle=o.allow_pickle)
    if extra:
        plan.notes.append(f"MODEL has {len(extra)} tensor(s) that BASE lacks (e.g. {m.raw_key(extra[0])}); an "
                          "adapter over BASE cannot carry them")
    sink = LoraOutput(plan, rule, extracted={"model": str(model), "base": str(base)})
    if o.dry_run:
        _dry_run(out, o, [plan])
        return MergeResult(None, plan, 0.0, None)
    return _push(_write(sink, out, replace(o, executor="local")), o)
