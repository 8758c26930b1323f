"""The benchmark run: merge the zoo's experts with every registered method, evaluate, report.

``run_bench(cfg, out)`` is what ``omnimerge bench`` does:

1. train (or reuse from the cache) the zoo of :mod:`.experiment` — base, five experts in two settings
   (full fine-tune, LoRA), multi-task model, text LLM;
2. evaluate every zoo model on every task's test set (cached beside the zoo);
3. **capability merging**: for each setting and each registered method, merge the five experts into
   the base with the method's documented defaults through :func:`omnimerge.merge` — the same path a
   user's recipe takes — and evaluate the merged checkpoint; with ``sweep=True`` first choose the
   method's scale (``lambda``/``alpha``) and ``density`` on the validation split;
4. **backbone merging**: ``asdf`` and ``task_arithmetic`` merge the text LLM into the multi-task VLM;
   the vision average and the text (arithmetic) accuracy are reported side by side;
5. write the report (:mod:`.report`).

A method that cannot merge this setting (e.g. one that takes exactly two models) is listed with the
reason instead of a row of numbers; nothing is silently dropped.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import tasks as T
from .experiment import EXPERT_TASKS, accuracy_matrix, build_zoo, test_sets
from .model import BenchConfig, build_processor

__all__ = ["SETTINGS", "BenchResult", "bench", "capability_recipe", "backbone_recipes", "default_cache_dir",
           "sweep_grid", "run_bench"]

SETTINGS = ("full", "lora")
SCALE_PARAMS = ("lambda", "alpha")
SCALE_GRID = (0.2, 0.4, 0.7, 1.0, 1.5)  # five task vectors summed want a scale well under 1
DENSITY_GRID = (0.1, 0.2, 0.5)


@dataclass
class BenchResult:
    """Everything the report shows; ``to_json()`` is ``results.json``."""

    config: dict[str, Any]
    cache_key: str
    zoo: dict[str, dict[str, float]]                       # model name -> task -> accuracy
    merges: list[dict[str, Any]] = field(default_factory=list)   # one per (kind, setting, method)
    timings: dict[str, float] = field(default_factory=dict)
    training: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "cache_key": self.cache_key, "zoo": self.zoo, "merges": self.merges,
                "timings": self.timings, "training": self.training, "tasks": list(T.TASKS),
                "expert_tasks": list(EXPERT_TASKS), "settings": list(SETTINGS)}


def capability_recipe(zoo: Path, setting: str, method: str, parameters: dict | None = None,
                      seed: int = 0) -> dict:
    """The recipe that merges the five experts of ``setting`` into the base with ``method``."""
    return {"method": method, "base": str(zoo / "base"), "skeleton": str(zoo / "base"),
            "models": [{"path": str(zoo / f"{setting}_{task}"), "name": task} for task in EXPERT_TASKS],
            "parameters": dict(parameters or {}), "seed": seed}


def backbone_recipes(zoo: Path, seed: int = 0) -> dict[str, dict]:
    """Text LLM into the multi-task VLM: ``asdf`` (the text LLM as base, the VLM's delta onto it, cut
    at the knee) and ``task_arithmetic`` (both task vectors from the shared base, summed)."""
    vlm, llm, base = str(zoo / "multitask"), str(zoo / "text_llm"), str(zoo / "base")
    return {
        "asdf": {"method": "asdf", "base": llm, "models": [{"path": vlm, "name": "vlm"}], "skeleton": vlm,
                 "seed": seed},
        "task_arithmetic": {"method": "task_arithmetic", "base": base, "skeleton": vlm, "seed": seed,
                            "models": [{"path": vlm, "name": "vlm"}, {"path": llm, "name": "text_llm"}]},
    }


def sweep_grid(method: str) -> list[dict[str, Any]]:
    """The validation sweep of a method: its scale (``lambda`` or ``alpha``) over :data:`SCALE_GRID` and
    its ``density`` over :data:`DENSITY_GRID`, where it has them; ``[{}]`` (defaults only) otherwise."""
    from ..methods import get_method

    names = {p.name for p in get_method(method).params}
    axes: dict[str, tuple] = {}
    for p in SCALE_PARAMS:
        if p in names:
            axes[p] = SCALE_GRID
            break
    if "density" in names:
        axes["density"] = DENSITY_GRID
    if not axes:
        return [{}]
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def run_bench(cfg: BenchConfig, out, *, cache_dir, methods: list[str] | None = None,
              settings: tuple[str, ...] = SETTINGS, sweep: bool = False, keep_merged: bool = False,
              log: Callable[[str], None] | None = print) -> BenchResult:
    """Run the benchmark into the folder ``out`` (its ``merged/`` holds merged checkpoints while they
    are evaluated; removed afterwards unless ``keep_merged``). Returns the result; the caller writes
    the report (:func:`omnimerge.bench.report.write_report`)."""
    from .. import merge
    from ..errors import OmnimergeError
    from ..methods import list_methods
    from .report import normalized_accuracy

    log = log or (lambda _msg: None)
    out = Path(out)
    t_start = time.perf_counter()
    all_methods = [m.name for m in list_methods()]
    if methods is None:
        methods = all_methods
    unknown = sorted(set(methods) - set(all_methods))
    if unknown:
        raise OmnimergeError(f"unknown method(s) {', '.join(unknown)}; `omnimerge methods` lists them")
    bad = sorted(set(settings) - set(SETTINGS))
    if bad:
        raise OmnimergeError(f"unknown setting(s) {', '.join(bad)}; choose from {', '.join(SETTINGS)}")

    # 1. the zoo
    t = time.perf_counter()
    zoo = build_zoo(cfg, cache_dir, log=lambda m: log(f"train {m}"))
    t_train = time.perf_counter() - t

    # 2. the zoo's accuracies (cached beside it: same config and code -> same numbers)
    t = time.perf_counter()
    cached = zoo / "accuracy.json"
    zoo_acc = json.loads(cached.read_text()) if cached.is_file() else {}
    names = [n for n in _zoo_models(settings) if n not in zoo_acc]
    if names:
        log(f"evaluate {len(names)} trained models on {cfg.test_items} test items per task")
        zoo_acc.update(accuracy_matrix({n: zoo / n for n in names}, cfg))
        cached.write_text(json.dumps(zoo_acc, indent=1, sort_keys=True) + "\n")
    t_eval_zoo = time.perf_counter() - t

    result = BenchResult(config=cfg.to_dict(), cache_key=cfg.cache_key(), zoo=zoo_acc,
                         training={n: _training_info(zoo / n) for n in _zoo_models(settings)})
    processor = build_processor(cfg)
    tests = test_sets(cfg, "test")
    vals = test_sets(cfg, "validation") if sweep else None
    work = out / "merged"
    work.mkdir(parents=True, exist_ok=True)

    def run_one(kind: str, setting: str, method: str, recipe: dict, tasks: tuple[str, ...]) -> dict:
        row: dict[str, Any] = {"kind": kind, "setting": setting, "method": method,
                               "parameters": dict(recipe.get("parameters", {}))}
        folder = work / f"{kind}_{setting}_{method}"
        try:
            res = merge(recipe, folder, force=True, progress=False)
        except OmnimergeError as e:
            row["skipped"] = str(e).splitlines()[0]
            log(f"{kind} {setting:<4} {method:<16} skipped: {row['skipped']}")
            return row
        row["merge_s"] = round(res.seconds, 3)
        row["accuracy"] = accuracy_matrix({method: folder}, cfg, tasks=tasks, sets=tests,
                                          processor=processor)[method]
        if not keep_merged:
            shutil.rmtree(folder, ignore_errors=True)
        return row

    # 3. capability merging
    t = time.perf_counter()
    for setting in settings:
        experts = {task: zoo_acc[f"{setting}_{task}"][task] for task in EXPERT_TASKS}
        for method in methods:
            params: dict[str, Any] = {}
            if sweep:
                params = _sweep(zoo, setting, method, cfg, vals, processor, work, log)
            row = run_one("capability", setting, method, capability_recipe(zoo, setting, method, params, cfg.seed),
                          EXPERT_TASKS)
            if "accuracy" in row:
                acc = row["accuracy"]
                row["average"] = _mean(acc[t] for t in EXPERT_TASKS)
                row["normalized"] = normalized_accuracy(acc, experts)
                log(f"capability {setting:<4} {method:<16} avg {row['average']:.3f}  "
                    f"normalized {row['normalized']:.3f}  ({row['merge_s']:.1f} s merge)")
            result.merges.append(row)
    t_capability = time.perf_counter() - t

    # 4. backbone merging
    t = time.perf_counter()
    for method, recipe in backbone_recipes(zoo, cfg.seed).items():
        row = run_one("backbone", "text", method, recipe, T.TASKS)
        if "accuracy" in row:
            acc = row["accuracy"]
            row["vision_average"] = _mean(acc[t] for t in EXPERT_TASKS)
            row["text"] = _mean(acc[t] for t in T.TEXT_TASKS)
            log(f"backbone   text {method:<16} vision avg {row['vision_average']:.3f}  text {row['text']:.3f}  "
                f"({row['merge_s']:.1f} s merge)")
        result.merges.append(row)
    t_backbone = time.perf_counter() - t
    if not keep_merged:
        shutil.rmtree(work, ignore_errors=True)
    result.timings = {"train_s": round(t_train, 1), "evaluate_zoo_s": round(t_eval_zoo, 1),
                      "capability_s": round(t_capability, 1), "backbone_s": round(t_backbone, 1),
                      "total_s": round(time.perf_counter() - t_start, 1)}
    return result


def _zoo_models(settings) -> list[str]:
    from .experiment import zoo_names

    kinds = ("base", *settings, "multitask", "text_llm")
    return zoo_names(kinds)


def _training_info(folder: Path) -> dict[str, Any]:
    info = json.loads((folder / "bench.json").read_text())
    return {k: info[k] for k in ("steps", "train_wall_s", "train_cpu_s", "loss_first", "loss_last") if k in info}


def _sweep(zoo: Path, setting: str, method: str, cfg: BenchConfig, vals, processor, work: Path, log) -> dict:
    """The grid point of :func:`sweep_grid` with the best mean validation accuracy over the five
    expert tasks (ties: the first, i.e. the smallest values); points the method refuses are passed
    over, and with none left the defaults stand."""
    from .. import merge
    from ..errors import OmnimergeError

    grid = sweep_grid(method)
    if grid == [{}]:
        return {}
    best, best_acc = {}, -1.0
    for params in grid:
        folder = work / f"sweep_{setting}_{method}"
        try:
            merge(capability_recipe(zoo, setting, method, params, cfg.seed), folder, force=True, progress=False)
        except OmnimergeError:  # a grid point the method refuses (e.g. della's epsilon against a density)
            continue
        acc = accuracy_matrix({method: folder}, cfg, tasks=EXPERT_TASKS, sets=vals, processor=processor)[method]
        shutil.rmtree(folder, ignore_errors=True)
        mean = _mean(acc.values())
        if mean > best_acc:
            best, best_acc = params, mean
    if best_acc < 0:
        log(f"sweep      {setting:<4} {method:<16} refused every grid point; defaults kept")
    else:
        log(f"sweep      {setting:<4} {method:<16} chose {best} (validation avg {best_acc:.3f})")
    return best


def default_cache_dir() -> Path:
    """Where trained bench models are cached: ``$OMNIMERGE_CACHE/bench``, else
    ``$XDG_CACHE_HOME/omnimerge/bench``, else ``~/.cache/omnimerge/bench``."""
    import os

    if os.environ.get("OMNIMERGE_CACHE"):
        return Path(os.environ["OMNIMERGE_CACHE"]) / "bench"
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "omnimerge" / "bench"


def bench(out, *, quick: bool = False, config: BenchConfig | None = None, overrides: dict | None = None,
          cache_dir=None, methods: list[str] | None = None, settings: tuple[str, ...] = SETTINGS,
          sweep: bool = False, keep_merged: bool = False, force: bool = False,
          log: Callable[[str], None] | None = print) -> tuple[BenchResult, list[Path]]:
    """Run the benchmark and write its report into ``out``; returns the result and the files written.

    ``config`` (default: the ``quick`` or full preset) with ``overrides`` (field -> value) sizes the
    models, training and evaluation. ``out`` may be a previous bench report (its files are replaced);
    any other non-empty folder needs ``force``.
    """
    from ..errors import OmnimergeError
    from .report import write_report

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OmnimergeError(f"{out} is a file; give a folder for the report")
    if out.is_dir() and any(out.iterdir()) and not (out / "results.json").is_file() and not force:
        raise OmnimergeError(f"{out} exists and is not a bench report; choose another folder or pass --force")
    cfg = config or (BenchConfig.quick() if quick else BenchConfig.full())
    if overrides:
        try:
            cfg = cfg.replace(**overrides)
        except TypeError as e:
            fields = ", ".join(sorted(cfg.to_dict()))
            raise OmnimergeError(f"unknown bench setting in {sorted(overrides)}; the fields are: {fields}") from e
    result = run_bench(cfg, out, cache_dir=cache_dir or default_cache_dir(), methods=methods, settings=settings,
                       sweep=sweep, keep_merged=keep_merged, log=log)
    return result, write_report(result.to_json(), out)
