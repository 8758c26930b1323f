"""The statistics stage: samples -> rendered batches -> forward passes -> statistics on disk.

:func:`model_statistics` does it for one model; :func:`attach_statistics` for every model of a plan whose
method learns from calibration samples, before the streaming merge, one model resident at a time. The
merge then reads each tensor's statistics lazily from the cached files (:class:`StatsSource`), so memory
stays bounded by one tensor's statistics, not the model's.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import OmnimergeError
from .collect import StatisticsCache, collect, load_model, load_renderer, render_batches, statistics_key
from .data import CalibrationSettings, Sample


def default_stats_dir() -> Path:
    """``$OMNIMERGE_CACHE/stats``, else ``$XDG_CACHE_HOME/omnimerge/stats``, else ``~/.cache/omnimerge/stats``."""
    if os.environ.get("OMNIMERGE_CACHE"):
        return Path(os.environ["OMNIMERGE_CACHE"]) / "stats"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "omnimerge" / "stats"


@contextlib.contextmanager
def _bar(description: str, total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr (a terminal only); yields ``advance_to(done)``."""
    if not enabled or not sys.stderr.isatty():
        yield lambda _done: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda done: bar.update(task, completed=done)


def takes_images(folder: str | Path) -> bool:
    """Whether the model (or processor) in ``folder`` has a vision tower, by its config."""
    import transformers

    return getattr(transformers.AutoConfig.from_pretrained(folder), "vision_config", None) is not None


def model_statistics(model_folder: str | Path, samples: Sequence[Sample], kinds: Sequence[str], *,
                     renderer_folder: str | Path | None = None, settings: CalibrationSettings | None = None,
                     cache: StatisticsCache, device: str = "cpu", seed: int = 0, lora_base: str | Path | None = None,
                     memory_budget: int = 2 << 30, log: Callable[[str], None] | None = None) -> Path:
    """The folder holding the statistics of ``kinds`` for the model in ``model_folder`` (a LoRA adapter runs
    merged into ``lora_base``) on ``samples`` (:func:`.data.load_samples`), rendered with the
    processor/tokenizer of ``renderer_folder`` (default: the model's own folder; a merge passes its
    skeleton). Reused from ``cache`` when the same model, samples, settings and seed were seen before; the
    model is loaded only when they were not, and freed after. ``memory_budget``: bytes of accumulators per
    pass over the samples (more passes when the statistics are larger)."""
    settings = settings or CalibrationSettings()
    renderer_folder = Path(renderer_folder or model_folder)
    extra = [renderer_folder] + ([lora_base] if lora_base is not None else [])
    key = statistics_key(model_folder, samples, settings, kinds, seed, extra_folders=extra)
    path = cache.path(key)
    if path.is_dir():
        if log:
            log(f"{model_folder}: statistics reused from {path}")
        return path
    batches = render_batches(load_renderer(renderer_folder, vision=takes_images(renderer_folder)), samples, settings)
    if log:
        log(f"{model_folder}: {len(samples)} samples, {sum(int(b['attention_mask'].sum()) for b in batches)} tokens, "
            f"collecting {', '.join(kinds)}")
    model = load_model(model_folder, device, lora_base=lora_base)
    passes = len(batches) * len(kinds)
    try:
        with _bar(f"statistics of {Path(model_folder).name}", passes, log is not None) as advance:
            done = [0]

            def step(_i: int) -> None:
                done[0] += 1
                advance(done[0])

            return cache.save(key, collect(model, batches, kinds, seed=seed, progress=step,
                                           memory_budget=memory_budget))
    finally:
        del model


@dataclass(frozen=True)
class StatsSource:
    """Per-model statistics folders (see :class:`StatisticsCache`), read lazily per canonical key
    (``for_key``). ``fisher_norms``: each model's Fisher L2 norm over the merged tensors, added to every
    key's mapping as ``fisher_norm``."""

    folders: tuple[Path, ...]
    fisher_norms: tuple[float, ...] | None = None
    # per model: canonical key -> (part file, the tensor names of its statistics)
    _index: tuple[dict[str, tuple[Path, tuple[tuple[str, str], ...]]], ...] = field(default=(), compare=False,
                                                                                   repr=False)

    @staticmethod
    def _index_folder(folder: Path) -> dict[str, tuple[Path, tuple[tuple[str, str], ...]]]:
        import json

        from safetensors import safe_open

        found: dict[str, tuple[Path, list[tuple[str, str]]]] = {}
        aliases: dict[str, str] = {}
        for f in sorted(folder.glob("part-*.safetensors")):
            with safe_open(f, "pt") as fh:
                for name in fh.keys():
                    canon, _, kind = name.rpartition("::")
                    found.setdefault(canon, (f, []))[1].append((kind, name))
                aliases.update(json.loads((fh.metadata() or {}).get("aliases", "{}")))
        index = {k: (f, tuple(names)) for k, (f, names) in found.items()}
        for k, target in aliases.items():
            if target in index:
                index[k] = index[target]
        return index

    @classmethod
    def open(cls, folders: Sequence[Path], merged_keys: Sequence[str] = ()) -> "StatsSource":
        index = tuple(cls._index_folder(Path(f)) for f in folders)
        source = cls(tuple(Path(f) for f in folders), None, index)
        if not any(kind == "fisher" for ix in index for _, names in ix.values() for kind, _ in names):
            return source
        norms = []
        for ix in index:
            total = 0.0
            for k in merged_keys:
                for kind, name in ix.get(k, (None, ()))[1]:
                    if kind == "fisher":
                        total += float((source._read(ix[k][0], name).double() ** 2).sum())
            norms.append(total ** 0.5)
        return cls(source.folders, tuple(norms), index)

    @staticmethod
    def _read(path: Path, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(path, "pt") as fh:
            return fh.get_tensor(name)

    def for_key(self, canonical: str) -> tuple[dict[str, torch.Tensor], ...]:
        out = []
        for i, ix in enumerate(self._index):
            stats: dict[str, torch.Tensor] = {}
            if canonical in ix:
                path, names = ix[canonical]
                stats = {kind: self._read(path, name) for kind, name in names}
            if self.fisher_norms is not None:
                stats["fisher_norm"] = torch.tensor(self.fisher_norms[i])
            out.append(stats)
        return tuple(out)


PER_MODEL_KINDS = ("gram", "fisher")  # one model at a time, on its own samples
JOINT_KINDS = ("coefficient", "merged_gram", "expert_coefficient")  # through the merged model, all models at once


def attach_statistics(plan, *, device: str = "cpu", cache_dir: str | Path | None = None,
                      log: Callable[[str], None] | None = None) -> dict[str, StatsSource] | None:
    """Run the statistics stage for ``plan`` (a :class:`omnimerge.plan.Plan` whose methods learn from
    calibration samples) and give each data-aware job the :class:`StatsSource` of its method's statistics.
    Returns them by method name (None when no job needs statistics).

    Statistics of one model on its own samples (RegMean's Grams, Fishers) are collected first, one model at a
    time; then at most one kind learned through the merged model (AdaMerging's or Expert Merging's
    coefficients, RegMean++'s Grams). While those are learned, the tensors another method merges hold the
    values that method gives them (RegMean++), or the base's (AdaMerging, Expert Merging: the coefficients
    are learned through the base with the task vectors of their own tensors)."""
    jobs = [j for j in plan.jobs if j.action == "merge" and j.method is not None and j.method.needs_calibration]
    if not jobs:
        return None
    if getattr(plan, "vocabulary", None) is not None:
        raise OmnimergeError("data-aware methods run the models with the skeleton's tokenizer; a recipe with "
                             "`tokenizer:` (a new output vocabulary) cannot use them. Merge the vocabularies in a "
                             "data-free step first")
    with _full_precision():
        return _attach(plan, jobs, device, cache_dir, log)


@contextlib.contextmanager
def _full_precision() -> Iterator[None]:
    """float32 matmuls and convolutions in full precision on a GPU (no TF32), so that statistics do not
    depend on the device beyond rounding."""
    matmul, conv = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, conv


def _attach(plan, jobs, device: str, cache_dir, log) -> dict[str, StatsSource]:
    kinds = sorted({k for j in jobs for k in j.method.calibration})
    joint = [k for k in kinds if k in JOINT_KINDS]
    if len(joint) > 1:
        names = sorted({j.method.name for j in jobs if set(j.method.calibration) & set(joint)})
        raise OmnimergeError(f"{' and '.join(names)} each learn through the whole merged model; one recipe takes one "
                             "of them (merge in two steps: the first output is the second recipe's model)")
    opts = plan.recipe.calibration
    settings = CalibrationSettings(**opts.model_dump()) if opts is not None else CalibrationSettings()
    cache = StatisticsCache(cache_dir or default_stats_dir())
    sources: dict[str, StatsSource] = {}
    own = [j for j in jobs if not set(j.method.calibration) & set(JOINT_KINDS)]
    if own:
        own_kinds = sorted({k for j in own for k in j.method.calibration})
        files = [model_statistics(model.lora["adapter"] if model.lora else model.path, samples, own_kinds,
                                  renderer_folder=plan.skeleton.path, settings=settings, cache=cache, device=device,
                                  seed=plan.recipe.seed, lora_base=model.lora["base"] if model.lora else None,
                                  log=log)
                 for model, samples in zip(plan.models, plan.calibration)]
        source = StatsSource.open(files, [j.canonical for j in own if "fisher" in j.method.calibration])
        for j in own:
            j.stats = source
            sources[j.method.name] = source
    if joint:
        learned = [j for j in jobs if joint[0] in j.method.calibration]
        source = StatsSource.open(_JOINT[joint[0]](plan, learned, settings, cache, device, log))
        for j in learned:
            j.stats = source
            sources[j.method.name] = source
    return sources


def _model_keys(plan, settings: CalibrationSettings, kind: str) -> list[str]:
    """Each model's statistics key for ``kind`` (its files, samples, settings; the base's and skeleton's
    files too)."""
    extra = [plan.skeleton.path] + ([plan.base.path] if plan.base is not None else [])
    return [statistics_key(m.lora["adapter"] if m.lora else m.path, s, settings, [kind], plan.recipe.seed,
                           extra_folders=extra + ([m.lora["base"]] if m.lora else []))
            for m, s in zip(plan.models, plan.calibration)]


def _coefficient_paths(plan, jobs, settings, cache, kind: str, params: dict, method: str,
                       log) -> tuple[str, list, bool]:
    """The cache key of a learned method's coefficients, their folders (one per model) and whether all are
    there (then said in the log)."""
    joint = _joint_key(plan, jobs, settings, kind, params)
    paths = [cache.path(f"{joint}-{i}") for i in range(len(plan.models))]
    cached = all(p.is_dir() for p in paths)
    if cached and log:
        log(f"{method}: coefficients reused from {paths[0].parent}")
    return joint, paths, cached


def _joint_key(plan, jobs, settings: CalibrationSettings, kind: str, params: dict) -> str:
    """One digest of every model's key, the method's parameters, the merged keys and the recipe."""
    import hashlib
    import json

    body = {"models": _model_keys(plan, settings, kind), "params": params, "keys": sorted(j.canonical for j in jobs),
            "kind": kind}
    if kind == "merged_gram":  # the merged layers depend on everything the recipe says
        body["recipe"] = plan.recipe.model_dump(mode="json")
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _batches(plan, settings: CalibrationSettings) -> list[list[dict]]:
    renderer = load_renderer(plan.skeleton.path, vision=takes_images(plan.skeleton.path))
    return [render_batches(renderer, s, settings) for s in plan.calibration]


def _coefficient_files(plan, jobs, settings: CalibrationSettings, cache: StatisticsCache, device: str,
                       log: Callable[[str], None] | None) -> list[Path]:
    """AdaMerging's coefficients, one file per model (``<key>::coefficient`` scalars), learned once for the
    plan's base, models, samples and the method's parameters, and cached."""
    from .adamerging import learn_coefficients

    params = {k: jobs[0].params[k] for k in ("granularity", "init", "lr", "steps")}
    joint, paths, cached = _coefficient_paths(plan, jobs, settings, cache, "coefficient", params, "adamerging", log)
    if cached:
        return paths
    batches = _batches(plan, settings)
    model = load_model(plan.base.path, device)
    task_vectors = _task_vectors(plan, jobs)
    if log:
        log(f"adamerging: learning {params['granularity']}-wise coefficients for {len(plan.models)} models, "
            f"{params['steps']} steps")
    with _bar("adamerging coefficients", params["steps"], log is not None) as advance:
        lam = learn_coefficients(model, task_vectors, batches, log=log, progress=advance, **params)
    del model, task_vectors
    return _save_coefficients(cache, joint, lam, len(plan.models))


def _task_vectors(plan, jobs) -> dict[str, torch.Tensor]:
    """``{key: (T, *shape)}``: every model's τ_i of the jobs' tensors, stacked as they are read (one copy)."""
    out = {}
    for k in sorted(j.canonical for j in jobs):
        base = plan.base.read(k).float()
        out[k] = torch.stack([m.read(k).float() - base for m in plan.models])
    return out


def _save_coefficients(cache: StatisticsCache, joint: str, lam: dict[str, list[float]], count: int) -> list[Path]:
    return [cache.save(f"{joint}-{i}", [({k: {"coefficient": torch.tensor(v[i])} for k, v in lam.items()}, {})])
            for i in range(count)]


def _merged_gram_files(plan, jobs, settings: CalibrationSettings, cache: StatisticsCache, device: str,
                       log: Callable[[str], None] | None) -> list[Path]:
    """RegMean++'s Grams, one folder per model, collected layer by layer through the model merged so far."""
    from .sequential import merged_gram_files

    params = {k: jobs[0].params.get(k) for k in sorted(jobs[0].params)}
    joint = _joint_key(plan, jobs, settings, "merged_gram", params)
    if log:
        log(f"regmean_plusplus: merging {plan.skeleton.layer_count()} layers in order, {len(plan.models)} models")
    return merged_gram_files(plan, jobs, cache, device, lambda: _batches(plan, settings), joint, log=log,
                             bar=lambda what, total: _bar(what, total, log is not None))


def _expert_coefficient_files(plan, jobs, settings: CalibrationSettings, cache: StatisticsCache, device: str,
                              log: Callable[[str], None] | None) -> list[Path]:
    """Expert Merging's coefficients: each expert's logits (and hidden states) on its own samples cached first,
    one expert at a time; then the coefficients learned with the base and the task vectors in memory."""
    from .expert_merging import EXPERT_PARAMS, TargetReader, expert_targets, learn_expert_coefficients

    params = {k: jobs[0].params[k] for k in EXPERT_PARAMS}
    joint, paths, cached = _coefficient_paths(plan, jobs, settings, cache, "expert_coefficient", params,
                                              "expert_merging", log)
    if cached:
        return paths
    batches = _batches(plan, settings)
    layers = params["hidden_layers"]
    targets = []
    for i, (m, key) in enumerate(zip(plan.models, _model_keys(plan, settings, f"expert_targets:{layers}"))):
        folder = cache.path(key)
        if not folder.is_dir():
            if log:
                log(f"expert_merging: caching {m.name}'s logits on its {len(plan.calibration[i])} samples")
            expert = load_model(m.lora["adapter"] if m.lora else m.path, device,
                                lora_base=m.lora["base"] if m.lora else None)
            try:
                cache.save(key, expert_targets(expert, batches[i], layers))
            finally:
                del expert
        targets.append(TargetReader(folder))
    model = load_model(plan.base.path, device)
    task_vectors = _task_vectors(plan, jobs)
    steps = params["epochs"] * max(len(b) for b in batches)
    if log:
        log(f"expert_merging: learning {params['granularity']}-wise coefficients for {len(plan.models)} models, "
            f"{steps} steps")
    with _bar("expert merging coefficients", steps, log is not None) as advance:
        lam = learn_expert_coefficients(model, task_vectors, batches, targets, log=log, progress=advance, **params)
    del model, task_vectors
    return _save_coefficients(cache, joint, lam, len(plan.models))


_JOINT = {"coefficient": _coefficient_files, "merged_gram": _merged_gram_files,
          "expert_coefficient": _expert_coefficient_files}
