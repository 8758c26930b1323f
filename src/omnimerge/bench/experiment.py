"""Train (or reuse) the bench's model zoo and measure its accuracy matrix, without merging.

``build_zoo(cfg, root)`` trains, in order, the base, one full fine-tune and one LoRA expert per task,
the multi-task model and the text LLM, saving each under ``root/<cfg.cache_key()>/`` as a
self-contained folder (``base/``, ``full_<task>/``, ``lora_<task>/`` adapters on ``base/``,
``multitask/``, ``text_llm/``). A folder that already holds a finished model (its ``bench.json``) is
reused, so a second run trains nothing. ``accuracy_matrix`` evaluates folders on every task.

This is the layer the benchmark runner builds on (it adds the merges and the report); run it alone
with ``python -m omnimerge.bench.experiment OUT [--quick]`` to reproduce the expert matrix.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from . import tasks as T
from .evaluate import evaluate
from .model import BenchConfig, build_processor, load_model, save_adapter, save_checkpoint
from .train import train_base, train_expert, train_multitask, train_text_llm

__all__ = ["ZOO_ORDER", "EXPERT_TASKS", "zoo_names", "build_zoo", "test_sets", "accuracy_matrix"]

ZOO_ORDER = ("base", "full", "lora", "multitask", "text_llm")
# The experts that capability merging merges: the paper's five vision tasks. The text task belongs to
# the text LLM (backbone merging).
EXPERT_TASKS = T.VISION_TASKS


def zoo_names(kinds=ZOO_ORDER) -> list[str]:
    """Folder names of the zoo, in training order."""
    names = []
    for kind in kinds:
        if kind in ("full", "lora"):
            names += [f"{kind}_{task}" for task in EXPERT_TASKS]
        else:
            names.append(kind)
    return names


def _done(folder: Path) -> bool:
    return (folder / "bench.json").is_file()


def build_zoo(cfg: BenchConfig, root, *, kinds=ZOO_ORDER, log: Callable[[str], None] | None = print) -> Path:
    """Train every model of ``kinds`` that ``root/<cache key>/`` does not hold yet; returns that
    folder. Each model's ``bench.json`` records its config, training steps, seconds (wall and CPU)
    and first/last losses."""
    zoo = Path(root) / cfg.cache_key()
    zoo.mkdir(parents=True, exist_ok=True)
    (zoo / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, sort_keys=True) + "\n")
    processor = build_processor(cfg)
    base = zoo / "base"

    def fit(name: str, fn, save):
        folder = zoo / name
        if _done(folder):
            return
        wall, cpu, history = time.perf_counter(), time.process_time(), []
        step_log = (lambda msg: log(f"{name}: {msg}")) if log else None
        model = fn(history=history, log=step_log, log_every=250)
        info = {"name": name, "cache_key": cfg.cache_key(), "steps": len(history),
                "train_wall_s": round(time.perf_counter() - wall, 2), "train_cpu_s": round(time.process_time() - cpu, 2),
                "loss_first": history[0] if history else None, "loss_last": history[-1] if history else None}
        save(model, folder, info)
        if log:
            log(f"{name}: {info['steps']} steps, {info['train_wall_s']:.0f} s "
                f"(loss {info['loss_first']:.3f} -> {info['loss_last']:.3f})")

    def checkpoint(model, folder, info):
        save_checkpoint(model, folder, processor, extra=info)

    def adapter(model, folder, info):
        save_adapter(model, folder, base, extra=info)

    if "base" in kinds:
        fit("base", lambda **kw: train_base(cfg, processor, **kw), checkpoint)
    if not _done(base):
        raise FileNotFoundError(f"{base}: no trained base; build the zoo with 'base' in kinds first")
    for kind in ("full", "lora"):
        if kind in kinds:
            for task in EXPERT_TASKS:
                fit(f"{kind}_{task}",
                    lambda task=task, kind=kind, **kw: train_expert(base, task, cfg, lora=kind == "lora",
                                                                   processor=processor, **kw),
                    adapter if kind == "lora" else checkpoint)
    if "multitask" in kinds:
        fit("multitask", lambda **kw: train_multitask(base, cfg, processor, **kw), checkpoint)
    if "text_llm" in kinds:
        fit("text_llm", lambda **kw: train_text_llm(base, cfg, processor, **kw), checkpoint)
    return zoo


def test_sets(cfg: BenchConfig, split: str = "test") -> dict[str, list[T.Item]]:
    """``cfg.test_items`` (or ``cfg.val_items``) items of every task."""
    n = cfg.test_items if split == "test" else cfg.val_items
    return {task: T.generate(task, split, n, seed=cfg.data_seed, image_size=cfg.image_size) for task in T.TASKS}


def accuracy_matrix(folders: dict[str, Path], cfg: BenchConfig, *, split: str = "test",
                    tasks=T.TASKS, sets: dict[str, list[T.Item]] | None = None,
                    processor=None) -> dict[str, dict[str, float]]:
    """name -> task -> accuracy for model folders (checkpoints or adapters) on ``tasks`` of ``sets``
    (default: :func:`test_sets` of ``split``); a text LLM is scored on the text tasks only."""
    sets = sets if sets is not None else test_sets(cfg, split)
    processor = processor or build_processor(cfg)
    out = {}
    for name, folder in folders.items():
        model = load_model(folder)
        vlm = model.config.model_type == "qwen2_vl"
        out[name] = {task: evaluate(model, task, sets[task], processor, batch_size=cfg.eval_batch_size)
                     for task in tasks if vlm or task in T.TEXT_TASKS}
    return out


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = BenchConfig.quick() if args.quick else BenchConfig.full()
    zoo = build_zoo(cfg, args.root)
    names = [n for n in zoo_names() if (zoo / n).is_dir()]
    matrix = accuracy_matrix({n: zoo / n for n in names}, cfg)
    (zoo / "accuracy.json").write_text(json.dumps(matrix, indent=1) + "\n")
    width = max(len(n) for n in names)
    print(" " * width + "  " + " ".join(f"{t[:9]:>9}" for t in T.TASKS))
    for name in names:
        print(f"{name:<{width}}  " + " ".join(f"{matrix[name][t]:9.3f}" if t in matrix[name] else " " * 9
                                               for t in T.TASKS))


if __name__ == "__main__":
    main()
