"""Train (or reuse) the bench's model zoo and measure its accuracies, without merging.

The zoo has two settings, as in the paper:

- **full**: the ``instruct`` model (the pretrained ``base`` trained briefly on every task, like an
  -Instruct model: decent, not saturated) is the base; each expert fine-tunes its language backbone
  (``full_<task>``); ``multitask`` is trained from ``instruct`` on the union of the experts' data with
  the same recipe.
- **lora**: the pretrained ``base`` (like Qwen2-VL-Base) is the base; each expert is a LoRA adapter
  (``lora_<task>``); ``multitask_lora`` is a LoRA trained on the union.

Plus the ``text_llm`` (the base's language backbone fine-tuned on arithmetic) for backbone merging.

Every model is cached under ``root/models/<name>-<key>/`` (its key: :meth:`BenchConfig.model_key`),
and ``root/<cfg.cache_key()>/<name>`` links to it, so that a change to an expert's settings retrains
the experts only. A folder that holds a finished model (its ``bench.json``) is reused. Test-set scores
are cached in each model's folder too (``scores/``).

``omnimerge bench`` is its command line (the zoo alone: ``build_zoo`` and ``accuracy_matrix`` from Python).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import tasks as T
from .config import BenchConfig
from .evaluate import evaluate
from .model import build_processor, load_model, save_adapter, save_checkpoint
from .train import train_base, train_expert, train_instruct, train_multitask, train_text_llm

__all__ = ["SETTINGS", "SETTING_BASE", "SETTING_MULTITASK", "EXPERT_TASKS", "ZooModel", "zoo_plan", "zoo_names",
           "build_zoo", "test_sets", "score_models", "accuracy_matrix"]

SETTINGS = ("full", "lora")
SETTING_BASE = {"full": "instruct", "lora": "base"}            # the model each setting's experts start from
SETTING_MULTITASK = {"full": "multitask", "lora": "multitask_lora"}
# The experts that capability merging merges: the paper's five vision tasks. The text task belongs to
# the text LLM (backbone merging).
EXPERT_TASKS = T.VISION_TASKS


@dataclass(frozen=True)
class ZooModel:
    """One model of the zoo: its folder name, training stage, task (experts), parent, optimizer
    steps, and whether it is saved as a LoRA adapter on its parent."""

    name: str
    stage: str              # "base" or a key of config.STAGE_FIELDS
    parent: str | None
    steps: int
    task: str | None = None
    adapter: bool = False


def zoo_plan(cfg: BenchConfig, settings=SETTINGS, *, text_llm: bool = True) -> list[ZooModel]:
    """The zoo's models in training order (parents first) for ``settings`` (and the text LLM)."""
    plan = [ZooModel("base", "base", None, cfg.base_steps)]
    if "full" in settings:
        plan.append(ZooModel("instruct", "instruct", "base", cfg.instruct_steps))
        plan += [ZooModel(f"full_{t}", "full", "instruct", cfg.expert_steps, t) for t in EXPERT_TASKS]
        plan.append(ZooModel("multitask", "multitask", "instruct", cfg.multitask_steps))
    if "lora" in settings:
        plan += [ZooModel(f"lora_{t}", "lora", "base", cfg.lora_steps, t, adapter=True) for t in EXPERT_TASKS]
        plan.append(ZooModel("multitask_lora", "multitask_lora", "base", cfg.lora_multitask_steps, adapter=True))
    if text_llm:
        plan.append(ZooModel("text_llm", "text_llm", "base", cfg.text_steps))
    return plan


def zoo_names(cfg: BenchConfig | None = None, settings=SETTINGS) -> list[str]:
    """Folder names of the zoo, in training order."""
    return [m.name for m in zoo_plan(cfg or BenchConfig.full(), settings)]


def _done(folder: Path) -> bool:
    return (folder / "bench.json").is_file()


def model_keys(cfg: BenchConfig, plan: list[ZooModel]) -> dict[str, str]:
    keys: dict[str, str] = {}
    for m in plan:
        keys[m.name] = cfg.model_key(m.stage, keys.get(m.parent) if m.parent else None, m.task)
    return keys


def _link(link: Path, target: Path) -> None:
    rel = os.path.relpath(target, link.parent)
    if link.is_symlink() and os.readlink(link) == rel:
        return
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(rel, target_is_directory=True)


# Every zoo model trains on one torch thread. A model trained on two threads differs from one trained on one
# (float sums taken in another order, amplified over thousands of steps), and the cache key cannot know the
# machine: the same key then held two zoos whose verdicts differed (tsv 0.307 against 0.269 on the full
# setting's test average). One thread makes a zoo reproducible on any machine with the same CPU kernels.
TRAIN_THREADS = 1


def build_zoo(cfg: BenchConfig, root, *, settings=SETTINGS, text_llm: bool = True, log: Callable[[str], None] | None = print,
              on_start: Callable[[str], None] | None = None, on_step: Callable[[str, int], None] | None = None,
              on_done: Callable[[str, bool], None] | None = None) -> Path:
    """Train every model of :func:`zoo_plan` that the cache under ``root`` does not hold yet; returns
    the zoo folder ``root/<cfg.cache_key()>/`` (links to the cached models). Each model's
    ``bench.json`` records its config, training steps, seconds (wall and CPU) and first/last losses.
    ``on_start(name)`` is called before a model is trained, ``on_step(name, step)`` after every step, ``on_done(name, trained)`` after
    each model (``trained`` False when it came from the cache)."""
    root = Path(root)
    plan = zoo_plan(cfg, settings, text_llm=text_llm)
    keys = model_keys(cfg, plan)
    zoo = root / cfg.cache_key()
    zoo.mkdir(parents=True, exist_ok=True)
    (zoo / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, sort_keys=True) + "\n")
    processor = None

    for m in plan:
        folder = root / "models" / f"{m.name}-{keys[m.name]}"
        if _done(folder):
            _link(zoo / m.name, folder)
            if on_done:
                on_done(m.name, False)
            continue
        if on_start:
            on_start(m.name)
        processor = processor or build_processor(cfg)
        parent = zoo / m.parent if m.parent else None
        wall, cpu, history = time.perf_counter(), time.process_time(), []
        step_log = (lambda msg, name=m.name: log(f"{name}: {msg}")) if log else None
        kw = {"history": history, "log": step_log, "log_every": 250, "processor": processor}
        if on_step:
            kw["callback"] = lambda step, _model, _loss, name=m.name: on_step(name, step)
        threads = torch.get_num_threads()
        torch.set_num_threads(TRAIN_THREADS)
        try:
            if m.stage == "base":
                model = train_base(cfg, **kw)
            elif m.stage == "instruct":
                model = train_instruct(parent, cfg, **kw)
            elif m.stage in ("full", "lora"):
                model = train_expert(parent, m.task, cfg, lora=m.stage == "lora", **kw)
            elif m.stage in ("multitask", "multitask_lora"):
                model = train_multitask(parent, cfg, lora=m.stage == "multitask_lora", **kw)
            else:
                model = train_text_llm(parent, cfg, **kw)
        finally:
            torch.set_num_threads(threads)
        info = {"name": m.name, "model_key": keys[m.name], "parent": m.parent, "steps": len(history),
                "train_wall_s": round(time.perf_counter() - wall, 2), "train_cpu_s": round(time.process_time() - cpu, 2),
                "loss_first": history[0] if history else None, "loss_last": history[-1] if history else None,
                "config": cfg.to_dict()}
        tmp = folder.with_name(f"{folder.name}.partial{os.getpid()}")
        for stale in (tmp, folder):          # left by an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
        if m.adapter:
            save_adapter(model, tmp, parent.resolve(), extra=info)
        else:
            save_checkpoint(model, tmp, processor, extra=info)
        tmp.replace(folder)
        _link(zoo / m.name, folder)
        if log:
            log(f"{m.name}: {info['steps']} steps, {info['train_wall_s']:.0f} s "
                f"(loss {info['loss_first']:.3f} -> {info['loss_last']:.3f})")
        if on_done:
            on_done(m.name, True)
    return zoo


def test_sets(cfg: BenchConfig, split: str = "test", n: int | None = None) -> dict[str, list[T.Item]]:
    """``n`` (default ``cfg.test_items``, or ``cfg.val_items`` for validation) items of every task. A
    longer draw starts with the items of a shorter one (generation is deterministic and only stops later)."""
    if n is None:
        n = cfg.test_items if split == "test" else cfg.val_items
    return {task: T.generate(task, split, n, seed=cfg.data_seed, image_size=cfg.image_size) for task in T.TASKS}


def _model_tasks(model, tasks) -> list[str]:
    vlm = model.config.model_type == "qwen2_vl"
    return [t for t in tasks if vlm or t in T.TEXT_TASKS]


def score_models(folders: dict[str, Path], cfg: BenchConfig, *, sets: dict[str, list[T.Item]],
                 tasks=T.TASKS, processor=None, cache_name: str | None = None,
                 on_task: Callable[[str, str, int], None] | None = None) -> dict[str, dict[str, list[int]]]:
    """name -> task -> per-item scores (0/1) of model folders (checkpoints or adapters) on ``tasks`` of
    ``sets``; a text LLM is scored on the text tasks only. With ``cache_name``, the scores are kept in
    ``<folder>/scores/<cache_name>.json`` and read back from there. ``on_task(name, task, n_items)``
    is called after each task."""
    processor = processor or build_processor(cfg)
    out: dict[str, dict[str, list[int]]] = {}
    for name, folder in folders.items():
        cache = Path(folder) / "scores" / f"{cache_name}.json" if cache_name else None
        if cache is not None and cache.is_file():
            stored = json.loads(cache.read_text())
            if all(t in stored or t not in sets for t in tasks):
                out[name] = {t: [int(c) for c in stored[t]] for t in tasks if t in stored}
                if on_task:
                    for t in out[name]:
                        on_task(name, t, 0)
                continue
        model = load_model(folder)
        row = {}
        for task in _model_tasks(model, tasks):
            _, preds = evaluate(model, task, sets[task], processor, batch_size=cfg.eval_batch_size,
                                return_predictions=True)
            row[task] = [int(T.score(task, p, it)) for p, it in zip(preds, sets[task])]
            if on_task:
                on_task(name, task, len(sets[task]))
        out[name] = row
        if cache is not None:
            cache.parent.mkdir(exist_ok=True)
            cache.write_text(json.dumps({t: "".join(map(str, s)) for t, s in row.items()}) + "\n")
    return out


def accuracy_matrix(folders: dict[str, Path], cfg: BenchConfig, *, split: str = "test",
                    tasks=T.TASKS, sets: dict[str, list[T.Item]] | None = None,
                    processor=None) -> dict[str, dict[str, float]]:
    """name -> task -> accuracy for model folders on ``tasks`` of ``sets`` (default: :func:`test_sets`
    of ``split``); a text LLM is scored on the text tasks only."""
    sets = sets if sets is not None else test_sets(cfg, split)
    scores = score_models(folders, cfg, sets=sets, tasks=tasks, processor=processor)
    return {name: {t: sum(s) / len(s) for t, s in row.items()} for name, row in scores.items()}
