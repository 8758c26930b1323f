"""The benchmark run: merge the zoo's experts with every registered method, evaluate, report.

``run_bench(cfg, out)`` is what ``omnimerge bench`` does:

1. train (or reuse from the cache) the zoo of :mod:`.experiment`: the pretrained base, the instruct
   model, five experts in each setting (full fine-tunes from the instruct model, LoRA adapters on the
   pretrained base), each setting's multi-task model, the text LLM;
2. score every zoo model on every task's test set, item by item (cached beside each model), and
   measure each setting's task vectors (:mod:`.regime`);
3. **capability merging**: for each setting and each registered method, merge the five experts into
   the setting's base through :func:`omnimerge.merge` (the path a user's recipe takes) with the
   method's defaults, and with the parameters that score best on the validation split (the sweep,
   :func:`sweep_grid`); evaluate both on the test split;
4. **backbone merging**: ``asdf`` and ``task_arithmetic`` merge the text LLM into the full setting's
   multi-task VLM;
5. summarise (bootstrap intervals, gain recovered, significance: :mod:`.summary`) and write the
   report (:mod:`.report`).

Merge results (validation and test scores of each recipe) are cached under the zoo, keyed by the
recipe and a digest of omnimerge's merging code (everything but the bench and the CLI), so a rerun
with the same code merges nothing again and a change to a method or the engine recomputes.

A method that cannot merge a setting (e.g. one that takes exactly two models) is listed with the
reason instead of a row of numbers; nothing is silently dropped.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import tasks as T
from .config import BenchConfig
from .experiment import (
    EXPERT_TASKS, SETTING_BASE, SETTING_MULTITASK, SETTINGS, model_keys, score_models, test_sets, zoo_plan,
)
from .model import quiet_transformers
from .progress import Progress, Stage, format_duration

__all__ = ["SETTINGS", "BenchResult", "bench", "capability_recipe", "backbone_recipes", "default_cache_dir",
           "sweep_grid", "run_bench", "merge_code_digest"]

SCALE_PARAMS = ("lambda", "alpha")
SCALE_GRID = (0.3, 0.6, 1.0)      # five task vectors summed want a scale well under 1
DENSITY_GRID: tuple[float, ...] = ()   # densities swept besides the default (none: the run's budget)


@dataclass
class BenchResult:
    """Everything the report shows; ``to_json()`` is ``results.json`` (plus the per-item scores,
    which the report writes to ``scores.json``)."""

    config: dict[str, Any]
    cache_key: str
    zoo: dict[str, dict[str, float]]                       # model name -> task -> accuracy
    merges: list[dict[str, Any]] = field(default_factory=list)   # one per (kind, setting, method)
    regime: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    training: dict[str, dict[str, Any]] = field(default_factory=dict)
    item_scores: dict[str, dict[str, str]] = field(default_factory=dict)   # run name -> task -> "0110..."
    settings: tuple[str, ...] = SETTINGS
    zoo_ci95: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    experts: dict[str, Any] = field(default_factory=dict)     # per setting: each expert against base and others
    ranking: dict[str, Any] = field(default_factory=dict)     # per setting: methods by average, significance
    by_question: dict[str, Any] = field(default_factory=dict)  # task -> question type -> the zoo's accuracies

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "cache_key": self.cache_key, "zoo": self.zoo, "merges": self.merges,
                "regime": self.regime, "timings": self.timings, "training": self.training,
                "tasks": list(T.TASKS), "expert_tasks": list(EXPERT_TASKS), "settings": list(self.settings),
                "setting_base": {s: SETTING_BASE[s] for s in self.settings},
                "setting_multitask": {s: SETTING_MULTITASK[s] for s in self.settings},
                "zoo_ci95": self.zoo_ci95, "experts": self.experts, "ranking": self.ranking,
                "by_question": self.by_question, "item_scores": self.item_scores}


def calibration_paths(zoo: Path, n: int) -> dict[str, Path]:
    """Where :func:`calibration_files` keeps ``n`` samples of each expert's task."""
    return {task: zoo / "calibration" / f"n{n}" / task / "samples.jsonl" for task in EXPERT_TASKS}


def calibration_files(zoo: Path, cfg: BenchConfig, n: int | None = None) -> dict[str, Path]:
    """Unlabeled samples of each expert's task for the data-aware methods (``regmean``, ``fisher``,
    ...): the first ``n`` (default ``cfg.calibration_items``) validation questions and images, written
    once under ``zoo/calibration/n<n>/<task>/samples.jsonl``. Validation, never test: the test split
    stays unseen."""
    n = cfg.calibration_items if n is None else n
    out = {}
    for task, path in calibration_paths(zoo, n).items():
        folder = path.parent
        if not path.is_file():
            (folder / "images").mkdir(parents=True, exist_ok=True)
            lines = []
            for i, item in enumerate(T.generate(task, "validation", n, seed=cfg.data_seed, image_size=cfg.image_size)):
                sample = {"text": item.question}
                if item.image is not None:
                    item.image.save(folder / "images" / f"{i:04d}.png")
                    sample["image"] = f"images/{i:04d}.png"
                lines.append(json.dumps(sample))
            tmp = path.with_suffix(".partial")
            tmp.write_text("\n".join(lines) + "\n")
            tmp.replace(path)
        out[task] = path
    return out


def capability_recipe(zoo: Path, setting: str, method: str, parameters: dict | None = None,
                      seed: int = 0, calibration: dict[str, Path] | None = None, samples: int | None = None) -> dict:
    """The recipe that merges the five experts of ``setting`` into the setting's base with ``method``;
    with ``calibration`` (task -> samples file) each expert gets its task's samples, ``samples`` of them."""
    base = str(zoo / SETTING_BASE[setting])
    models = [{"path": str(zoo / f"{setting}_{task}"), "name": task} for task in EXPERT_TASKS]
    recipe = {"method": method, "base": base, "skeleton": base, "models": models,
              "parameters": dict(parameters or {}), "seed": seed}
    if calibration:
        recipe["models"] = [{**m, "calibration": str(calibration[m["name"]])} for m in models]
        if samples is not None:
            recipe["calibration"] = {"samples": samples}
    return recipe


def backbone_recipes(zoo: Path, seed: int = 0) -> dict[str, dict]:
    """Text LLM into the full setting's multi-task VLM: ``asdf`` (the text LLM as base, the VLM's delta
    onto it, cut at the knee) and ``task_arithmetic`` (both task vectors from the shared pretrained
    base, summed)."""
    vlm, llm, base = str(zoo / "multitask"), str(zoo / "text_llm"), str(zoo / "base")
    return {
        "asdf": {"method": "asdf", "base": llm, "models": [{"path": vlm, "name": "vlm"}], "skeleton": vlm,
                 "seed": seed},
        "task_arithmetic": {"method": "task_arithmetic", "base": base, "skeleton": vlm, "seed": seed,
                            "models": [{"path": vlm, "name": "vlm"}, {"path": llm, "name": "text_llm"}]},
    }


def method_defaults(method: str) -> dict[str, Any]:
    from ..methods import get_method

    return {p.name: p.default for p in get_method(method).params}


def merge_parameters(cfg: BenchConfig, method: str, params: dict) -> dict:
    """The parameters a recipe gets: ``params``, plus ``steps: cfg.data_aware_steps`` for a data-aware
    method that optimises (the smoke presets' cap; 0 keeps the method's own default)."""
    if cfg.data_aware_steps and _needs_calibration(method) and "steps" in method_defaults(method):
        return {"steps": cfg.data_aware_steps, **params}
    return dict(params)


def sweep_grid(method: str) -> list[dict[str, Any]]:
    """The validation sweep of a method: its scale (``lambda`` or ``alpha``) over :data:`SCALE_GRID` and
    its ``density`` over :data:`DENSITY_GRID` (when that is not empty), each with the method's default
    value added; ``[{}]``
    (defaults only) for a method with neither. The defaults' own point comes first, so that on a tie
    the defaults stand."""
    defaults = method_defaults(method)
    axes: dict[str, list] = {}
    for p in SCALE_PARAMS:
        if p in defaults:
            axes[p] = _with_default(SCALE_GRID, defaults[p])
            break
    if "density" in defaults and DENSITY_GRID:
        axes["density"] = _with_default(DENSITY_GRID, defaults["density"])
    if not axes:
        return [{}]
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def _with_default(grid, default) -> list:
    values = [] if default is None else [default]       # e.g. wudi2's alpha "auto": its own point first
    return values + [v for v in grid if v not in values]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


@functools.lru_cache(maxsize=1)
def merge_code_digest() -> str:
    """SHA-256 (16 hex digits) of omnimerge's merging code: every module of the package but the bench
    and the CLI. Cached merge results are keyed by it."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("bench/") or rel == "cli.py":
            continue
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


class MergeCache:
    """Scores of merged recipes, one JSON file per (kind, setting, method) under ``folder``, each entry
    keyed by the split and a digest of the whole recipe (parameters, models, calibration, seed)."""

    def __init__(self, folder: Path):
        self.folder = folder / merge_code_digest()

    def _file(self, kind: str, setting: str, method: str) -> Path:
        return self.folder / f"{kind}_{setting}_{method}.json"

    @staticmethod
    def _key(split: str, recipe: dict) -> str:
        blob = json.dumps(recipe, sort_keys=True, default=str)
        return f"{split}|{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    def get(self, kind, setting, method, split, recipe: dict) -> dict | None:
        f = self._file(kind, setting, method)
        data = json.loads(f.read_text()) if f.is_file() else {}
        return data.get(self._key(split, recipe))

    def put(self, kind, setting, method, split, recipe: dict, entry: dict) -> None:
        f = self._file(kind, setting, method)
        f.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(f.read_text()) if f.is_file() else {}
        data[self._key(split, recipe)] = entry
        f.write_text(json.dumps(data, sort_keys=True) + "\n")


def _bits(scores: dict[str, list[int]]) -> dict[str, str]:
    return {t: "".join(map(str, s)) for t, s in scores.items()}


def _acc(bits: dict[str, str]) -> dict[str, float]:
    return {t: s.count("1") / len(s) for t, s in bits.items() if s}


def run_bench(cfg: BenchConfig, out, *, cache_dir, methods: list[str] | None = None,
              settings: tuple[str, ...] = SETTINGS, sweep: bool = True, keep_merged: bool = False,
              log: Callable[[str], None] | None = print, progress_stream=None, preset: str = "custom settings") -> BenchResult:
    """Run the benchmark into the folder ``out`` (its ``merged/`` holds merged checkpoints while they
    are evaluated; removed afterwards unless ``keep_merged``). Returns the result; the caller writes
    the report (:func:`omnimerge.bench.report.write_report`)."""
    from .. import merge
    from ..errors import OmnimergeError
    from ..methods import list_methods
    from .model import build_processor
    from .regime import task_vector_stats
    from .summary import question_breakdown, summarize

    out = Path(out)
    cache_dir = Path(cache_dir)
    t_start = time.perf_counter()
    all_methods = [m.name for m in list_methods()]
    if methods is None:
        methods = all_methods
    unknown = sorted(set(methods) - set(all_methods))
    if unknown:
        raise OmnimergeError(f"unknown method(s) {', '.join(unknown)}; `omnimerge methods` lists them")
    bad = sorted(set(settings) - set(SETTINGS))
    if bad or not settings:
        raise OmnimergeError(f"unknown setting(s) {', '.join(bad) or '(none)'}; choose from {', '.join(SETTINGS)}")
    settings = tuple(s for s in SETTINGS if s in settings)

    # ---- the plan: what is cached, what is left, what it costs
    plan = zoo_plan(cfg, settings)
    keys = model_keys(cfg, plan)
    zoo = cache_dir / cfg.cache_key()
    cached_models = {m.name for m in plan if (cache_dir / "models" / f"{m.name}-{keys[m.name]}" / "bench.json").is_file()}
    test_cache = f"test-n{cfg.zoo_test_items}-seed{cfg.data_seed}"
    n_tasks = {m.name: (1 if m.name == "text_llm" else len(T.TASKS)) for m in plan}
    scored = {m.name for m in plan if m.name in cached_models and
              (cache_dir / "models" / f"{m.name}-{keys[m.name]}" / "scores" / f"{test_cache}.json").is_file()}
    merge_cache = MergeCache(zoo / "merges")
    data_aware = [m for m in methods if _needs_calibration(m)]

    def recipe_for(setting: str, method: str, params: dict, samples: int | None = None) -> dict:
        """The recipe of one merge of the run: a data-aware method gets ``samples`` (default
        ``cfg.calibration_items``) unlabeled samples per expert."""
        if method not in data_aware:
            return capability_recipe(zoo, setting, method, params, cfg.seed)
        n = cfg.calibration_items if samples is None else samples
        return capability_recipe(zoo, setting, method, merge_parameters(cfg, method, params), cfg.seed,
                                 calibration=calibration_paths(zoo, n), samples=n)

    grids = {m: (sweep_grid(m) if sweep else [{}]) for m in methods}

    def optimise_steps(setting: str, method: str) -> int:
        """Optimisation steps of one merge by a data-aware method that learns coefficients (else 0)."""
        if method not in data_aware:
            return 0
        return int(recipe_for(setting, method, {})["parameters"].get("steps", method_defaults(method).get("steps") or 0))
    kind_of = {"base": "train_all", "instruct": "train_all", "full": "train_language", "multitask": "train_language",
               "lora": "train_lora", "multitask_lora": "train_lora", "text_llm": "train_text"}
    stages: list[Stage] = []
    train_stage: dict[str, int] = {}
    for m in plan:
        if m.name not in cached_models:
            train_stage[m.name] = len(stages)
            stages.append(Stage(f"train {m.name}", {kind_of[m.stage]: m.steps}, unit="steps", total=m.steps))
    to_score = [m.name for m in plan if m.name not in scored]
    eval_items = sum(n_tasks[n] * cfg.zoo_test_items for n in to_score)
    eval_stage = len(stages)
    stages.append(Stage("evaluate the zoo", {"eval": eval_items}, unit="items", total=eval_items))
    method_stage: dict[tuple[str, str], int] = {}
    n_points = n_cached_points = 0
    for setting in settings:
        for method in methods:
            todo_val = [p for p in grids[method]
                        if p and merge_cache.get("capability", setting, method, "validation", recipe_for(setting, method, p)) is None]
            todo_test = 0 if merge_cache.get("capability", setting, method, "test", recipe_for(setting, method, {})) else 1
            n_points += len([p for p in grids[method] if p])
            n_cached_points += len([p for p in grids[method] if p]) - len(todo_val)
            work = {"merge": len(todo_val) + todo_test * 2,
                    "eval": len(todo_val) * len(EXPERT_TASKS) * cfg.val_items
                    + todo_test * 2 * len(EXPERT_TASKS) * cfg.test_items,
                    "optimise_step": todo_test * optimise_steps(setting, method)}
            method_stage[(setting, method)] = len(stages)
            stages.append(Stage(f"{setting} {method}", work, unit="items",
                                total=work["eval"]))
    calibration_stage: dict[tuple[str, str, int], int] = {}
    for setting in settings:
        for method in (m for m in methods if _needs_calibration(m)):
            for n in cfg.calibration_sizes:
                todo = 0 if merge_cache.get(f"calibration_n{n}", setting, method, "test", recipe_for(setting, method, {}, n)) else 1
                calibration_stage[(setting, method, n)] = len(stages)
                work = {"merge": todo, "eval": todo * len(EXPERT_TASKS) * cfg.test_items,
                        "optimise_step": todo * optimise_steps(setting, method)}
                stages.append(Stage(f"{setting} {method} n={n}", work, unit="items", total=work["eval"]))
    backbone_stage = len(stages)
    stages.append(Stage("backbone merging", {"merge": 2, "eval": 2 * len(T.TASKS) * cfg.test_items}, unit="items",
                        total=2 * len(T.TASKS) * cfg.test_items))

    progress = Progress(stages, stream=progress_stream, enabled=log is not None)
    say = progress.message if log is not None else (lambda _m: None)
    train_steps = sum(m.steps for m in plan if m.name not in cached_models)
    say(f"omnimerge bench ({preset}): {len(plan)} models in the zoo, settings {', '.join(settings)}; "
        f"{len(methods)} methods, each with its defaults"
        + (f" and the parameters a validation sweep chooses ({n_points} grid points, {n_cached_points} cached)" if sweep else "")
        + f"; {cfg.test_items} test items per task.")
    if cached_models == {m.name for m in plan}:
        say(f"Cache: {zoo} — reusing all {len(plan)} trained models"
            + (" and their test scores." if len(scored) == len(plan) else "."))
    else:
        say(f"Cache: {zoo} — will train {len(plan) - len(cached_models)} models ({train_steps} steps)"
            + (f", reusing {len(cached_models)}" if cached_models else "") + ".")
    say(f"Estimated time: about {format_duration(progress.nominal_total())} on 2 quiet CPU cores "
        "(the estimate below corrects itself to this machine's speed).")

    with progress:
        # 1. the zoo
        t = time.perf_counter()

        def on_start(name: str) -> None:
            progress.begin(train_stage[name])

        def on_step(_name: str, _step: int) -> None:
            progress.advance(1)

        def on_done(name: str, trained: bool) -> None:
            if trained:
                progress.end()

        from .experiment import build_zoo

        build_zoo(cfg, cache_dir, settings=settings, log=(lambda m: say(f"train {m}")) if log else None,
                  on_start=on_start, on_step=on_step, on_done=on_done)
        t_train = time.perf_counter() - t

        # 2. the zoo's scores and task vectors
        t = time.perf_counter()
        processor = build_processor(cfg)
        zoo_tests = test_sets(cfg, "test", cfg.zoo_test_items)
        tests = {task: items[:cfg.test_items] for task, items in zoo_tests.items()}    # the merges' test items
        progress.begin(eval_stage)
        if to_score:
            say(f"evaluate {len(to_score)} zoo models on {cfg.zoo_test_items} test items per task")
        zoo_scores = score_models({m.name: zoo / m.name for m in plan}, cfg, sets=zoo_tests, processor=processor,
                                  cache_name=test_cache, on_task=lambda _n, _t, k: progress.advance(k))
        progress.end()
        regime = {}
        for setting in settings:
            stats = task_vector_stats(zoo / SETTING_BASE[setting], {t: zoo / f"{setting}_{t}" for t in EXPERT_TASKS})
            regime[setting] = stats
            say(f"regime {setting:<4}: median ‖τ‖/‖θ‖ {stats['median_rel_norm']:.4f}, max {stats['max_rel_norm']:.4f}, "
                f"rms(τ) {stats['rms_tau']:.2e}")
        t_eval_zoo = time.perf_counter() - t

        result = BenchResult(config=cfg.to_dict(), cache_key=cfg.cache_key(),
                             zoo={n: {t: sum(s[:cfg.test_items]) / len(s[:cfg.test_items]) for t, s in row.items()}
                                  for n, row in zoo_scores.items()},
                             regime=regime, settings=settings,
                             training={m.name: _training_info(zoo / m.name) for m in plan})
        result.item_scores = {f"zoo/{n}": _bits(row) for n, row in zoo_scores.items()}
        result.by_question = question_breakdown(zoo_scores, zoo_tests)
        vals = test_sets(cfg, "validation") if sweep else None

        work = out / "merged"
        work.mkdir(parents=True, exist_ok=True)

        def merged_scores(kind: str, setting: str, method: str, recipe: dict, split: str, tasks) -> dict:
            """{"bits": task -> "0101", "merge_s": s} or {"skipped": reason}; cached."""
            hit = merge_cache.get(kind, setting, method, split, recipe)
            if hit is not None:
                return hit
            if "calibration" in recipe:          # the samples' files, written on first use
                calibration_files(zoo, cfg, recipe["calibration"]["samples"])
            folder = work / f"{kind}_{setting}_{method}"
            try:
                with quiet_transformers(errors_only=True):     # e.g. the calibration stage loading each expert
                    res = merge(recipe, folder, force=True, progress=False)
            except OmnimergeError as e:
                entry = {"skipped": str(e).splitlines()[0]}
            else:
                sets = tests if split == "test" else vals
                scores = score_models({method: folder}, cfg, sets=sets, tasks=tasks, processor=processor,
                                      on_task=lambda _n, _t, k: progress.advance(k))[method]
                entry = {"bits": _bits(scores), "merge_s": round(res.seconds, 3)}
                if not keep_merged:
                    shutil.rmtree(folder, ignore_errors=True)
            merge_cache.put(kind, setting, method, split, recipe, entry)
            return entry

        # 3. capability merging
        t = time.perf_counter()
        for setting in settings:
            for method in methods:
                progress.begin(method_stage[(setting, method)])
                row: dict[str, Any] = {"kind": "capability", "setting": setting, "method": method,
                                       "parameters": merge_parameters(cfg, method, {})}
                entry = merged_scores("capability", setting, method, recipe_for(setting, method, {}), "test",
                                      EXPERT_TASKS)
                if "skipped" in entry:
                    row["skipped"] = entry["skipped"]
                    say(f"capability {setting:<4} {method:<16} skipped: {row['skipped']}")
                    result.merges.append(row)
                    progress.end()
                    continue
                row.update(accuracy=_acc(entry["bits"]), merge_s=entry["merge_s"])
                result.item_scores[f"capability/{setting}/{method}"] = entry["bits"]
                if sweep:
                    row["tuned"] = _tune(setting, method, grids[method], recipe_for, merged_scores, result)
                result.merges.append(row)
                progress.end()
                tuned = row.get("tuned", {})
                say(f"capability {setting:<4} {method:<16} avg {_mean(row['accuracy'].values()):.3f}"
                    + (f"  tuned {tuned['parameters']} avg {_mean(tuned['accuracy'].values()):.3f}"
                       if tuned.get("parameters") else "")
                    + f"  ({row['merge_s']:.1f} s merge)")
        # 3b. data-aware methods with other calibration sizes (their defaults only)
        for setting in settings:
            for method in data_aware:
                for n in cfg.calibration_sizes:
                    progress.begin(calibration_stage[(setting, method, n)])
                    kind = f"calibration_n{n}"
                    row = {"kind": "calibration", "setting": setting, "method": method, "samples": n, "parameters": {}}
                    entry = merged_scores(kind, setting, method, recipe_for(setting, method, {}, n), "test", EXPERT_TASKS)
                    if "skipped" in entry:
                        row["skipped"] = entry["skipped"]
                    else:
                        row.update(accuracy=_acc(entry["bits"]), merge_s=entry["merge_s"])
                        result.item_scores[f"calibration/{setting}/{method}/n{n}"] = entry["bits"]
                        say(f"calibration {setting:<4} {method:<16} n={n:<3} avg {_mean(row['accuracy'].values()):.3f}")
                    result.merges.append(row)
                    progress.end()
        t_capability = time.perf_counter() - t

        # 4. backbone merging
        t = time.perf_counter()
        progress.begin(backbone_stage)
        for method, recipe in backbone_recipes(zoo, cfg.seed).items() if "full" in settings else ():
            row = {"kind": "backbone", "setting": "text", "method": method, "parameters": {}}
            entry = merged_scores("backbone", "text", method, recipe, "test", T.TASKS)
            if "skipped" in entry:
                row["skipped"] = entry["skipped"]
            else:
                row.update(accuracy=_acc(entry["bits"]), merge_s=entry["merge_s"])
                result.item_scores[f"backbone/text/{method}"] = entry["bits"]
                say(f"backbone   text {method:<16} vision avg {_mean(row['accuracy'][t] for t in EXPERT_TASKS):.3f}  "
                    f"text {_mean(row['accuracy'][t] for t in T.TEXT_TASKS):.3f}")
            result.merges.append(row)
        progress.end()
        t_backbone = time.perf_counter() - t
    if not keep_merged:
        shutil.rmtree(work, ignore_errors=True)
    result.timings = {"train_s": round(t_train, 1), "evaluate_zoo_s": round(t_eval_zoo, 1),
                      "capability_s": round(t_capability, 1), "backbone_s": round(t_backbone, 1),
                      "total_s": round(time.perf_counter() - t_start, 1)}
    summarize(result)
    return result


def prepare_shared(cfg: BenchConfig, cache_dir: Path, methods: list[str] | None, *,
                   log: Callable[[str], None] | None = None) -> None:
    """What both settings use, made once before they run side by side: the pretrained base and the text
    LLM (trained or taken from the cache), their test scores, and every calibration sample file."""
    from ..methods import list_methods
    from .experiment import build_zoo

    zoo = build_zoo(cfg, cache_dir, settings=(), text_llm=True, log=(lambda m: log(f"train {m}")) if log else None)
    sets = test_sets(cfg, "test", cfg.zoo_test_items)
    score_models({name: zoo / name for name in ("base", "text_llm")}, cfg, sets=sets,
                 cache_name=f"test-n{cfg.zoo_test_items}-seed{cfg.data_seed}")
    names = methods if methods is not None else [m.name for m in list_methods()]
    if any(_needs_calibration(m) for m in names):
        for n in (cfg.calibration_items, *cfg.calibration_sizes):
            calibration_files(zoo, cfg, n)


def _needs_calibration(method: str) -> bool:
    from ..methods import get_method

    return bool(getattr(get_method(method), "needs_calibration", False))


def _tune(setting, method, grid, recipe_for, merged_scores, result) -> dict[str, Any]:
    """The grid point with the best mean validation accuracy over the five expert tasks (ties: the
    first, i.e. the defaults' own point); points the method refuses are passed over. Returns
    ``{parameters, validation_average, accuracy, merge_s}`` (``parameters`` empty: the defaults)."""
    if grid == [{}]:
        return {"parameters": {}, "note": "no scale or density to tune"}
    best, best_acc, tried = None, -1.0, {}
    for params in grid:
        entry = merged_scores("capability", setting, method, recipe_for(setting, method, params), "validation",
                              EXPERT_TASKS)
        if "skipped" in entry:
            continue
        acc = _mean(_acc(entry["bits"]).values())
        tried[json.dumps(params, sort_keys=True)] = round(acc, 4)
        if acc > best_acc:
            best, best_acc = params, acc
    if best is None:
        return {"parameters": {}, "note": "every grid point refused; defaults kept"}
    defaults = method_defaults(method)
    chosen = {k: v for k, v in best.items() if defaults.get(k) != v}
    out: dict[str, Any] = {"parameters": chosen, "validation_average": round(best_acc, 4), "grid": tried}
    if not chosen:
        out["note"] = "the defaults score best on validation"
        return out
    entry = merged_scores("capability", setting, method, recipe_for(setting, method, best), "test", EXPERT_TASKS)
    if "skipped" in entry:      # pragma: no cover - it merged on validation
        out["note"] = entry["skipped"]
        return out
    out.update(accuracy=_acc(entry["bits"]), merge_s=entry["merge_s"])
    result.item_scores[f"capability/{setting}/{method}/tuned"] = entry["bits"]
    return out


def _training_info(folder: Path) -> dict[str, Any]:
    info = json.loads((folder / "bench.json").read_text())
    return {k: info[k] for k in ("steps", "train_wall_s", "train_cpu_s", "loss_first", "loss_last") if k in info}


def default_cache_dir() -> Path:
    """Where trained bench models are cached: ``$OMNIMERGE_CACHE/bench``, else
    ``$XDG_CACHE_HOME/omnimerge/bench``, else ``~/.cache/omnimerge/bench``."""
    import os

    if os.environ.get("OMNIMERGE_CACHE"):
        return Path(os.environ["OMNIMERGE_CACHE"]) / "bench"
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "omnimerge" / "bench"


PRESETS = {"full": BenchConfig.full, "quick": BenchConfig.quick, "micro": BenchConfig.micro}


def bench(out, *, quick: bool = False, preset: str | None = None, config: BenchConfig | None = None,
          overrides: dict | None = None, cache_dir=None, methods: list[str] | None = None,
          settings: tuple[str, ...] = SETTINGS, sweep: bool | None = None, keep_merged: bool = False,
          force: bool = False, log: Callable[[str], None] | None = print,
          progress_stream=None, jobs: int | None = None) -> tuple[BenchResult, list[Path]]:
    """Run the benchmark and write its report into ``out``; returns the result and the files written.

    ``config`` (default: the ``preset``, "full", "quick" (= ``quick=True``) or "micro") with
    ``overrides`` (field -> value) sizes the models, training and evaluation. ``sweep`` (the
    validation sweep) defaults to on for the full preset and off for the smaller ones. ``out`` may be a
    previous bench report (its files are replaced); any other non-empty folder needs ``force``.
    ``jobs`` (default: 2 for the full preset on a machine with two cores or more, else 1) runs the
    settings in that many worker processes (:mod:`.parallel`); the report is the same.
    """
    from ..errors import OmnimergeError
    from .report import write_report

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OmnimergeError(f"{out} is a file; give a folder for the report")
    if out.is_dir() and any(out.iterdir()) and not (out / "results.json").is_file() and not force:
        raise OmnimergeError(f"{out} exists and is not a bench report; choose another folder or pass --force")
    preset = preset or ("quick" if quick else "full")
    if preset not in PRESETS:
        raise OmnimergeError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = config or PRESETS[preset]()
    if sweep is None:
        sweep = preset == "full"
    if overrides:
        try:
            cfg = cfg.replace(**overrides)
        except TypeError as e:
            fields = ", ".join(sorted(cfg.to_dict()))
            raise OmnimergeError(f"unknown bench setting in {sorted(overrides)}; the fields are: {fields}") from e
    if log is not None and progress_stream is None:
        import sys

        progress_stream = sys.stderr
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    label = preset + (" preset with --set overrides" if overrides else " preset")
    if jobs is None:
        import os

        jobs = 2 if preset == "full" and (os.cpu_count() or 1) >= 2 else 1
    if jobs < 1:
        raise OmnimergeError(f"--jobs must be at least 1, got {jobs}")
    wanted = tuple(s for s in SETTINGS if s in settings)
    t_parallel = None
    if jobs > 1 and len(wanted) > 1:
        import torch

        from .parallel import run_settings_in_parallel

        t0 = time.perf_counter()

        def say(message: str) -> None:      # where the serial run's progress goes
            if log is not None:
                print(message, file=progress_stream, flush=True)

        say(f"omnimerge bench ({label}): the settings {', '.join(wanted)} run in {min(jobs, len(wanted))} worker "
            f"processes (logs in {out / 'workers'}), then one pass assembles the report from the cache.")
        run_settings_in_parallel(
            cfg, out, cache_dir=cache_dir, methods=methods, settings=wanted, sweep=sweep, jobs=jobs,
            threads=torch.get_num_threads(), say=say, preset=label,
            interval=10.0 if getattr(progress_stream, "isatty", lambda: False)() else 60.0,
            prepare=lambda: prepare_shared(cfg, cache_dir, methods, log=say))
        t_parallel = time.perf_counter() - t0
    result = run_bench(cfg, out, cache_dir=cache_dir, methods=methods, settings=settings,
                       sweep=sweep, keep_merged=keep_merged, log=log, progress_stream=progress_stream,
                       preset=label)
    if t_parallel is not None:       # the workers' time (base and text LLM first, then both settings)
        result.timings["settings_in_parallel_s"] = round(t_parallel, 1)
        result.timings["total_s"] = round(result.timings["total_s"] + t_parallel, 1)
    return result, write_report(result.to_json(), out)
