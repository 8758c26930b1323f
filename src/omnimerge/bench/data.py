"""The bench's training sets: the base's pretraining mixture, the experts', the multi-task union.

Kept apart from :mod:`.train` so that the tokenizer (:mod:`.model`) can be trained on the same text.
"""

from __future__ import annotations

import random

from . import tasks as T

__all__ = ["DESCRIBE", "dense_caption", "describe_items", "base_items", "instruct_items", "expert_items",
           "multitask_items", "text_items"]


# --------------------------------------------------------------------------------------------

def expert_items(cfg, task: str, n: int | None = None) -> list[T.Item]:
    """The training items of one task."""
    return T.generate(task, "train", cfg.train_items if n is None else n, seed=cfg.data_seed,
                      image_size=cfg.image_size)


DESCRIBE = ("Describe the image in detail.", "List everything in the picture.")


def dense_caption(item: T.Item) -> str:
    """A detailed description of ``item``'s scene, from its spec (its task's ``describe``): every
    object with colour, shape and place (corner, or grid box), figure sizes, chart values, the text
    and its ink. The base's pretraining target (see :func:`base_items`); it states facts that task
    answers are made of, but never in the tasks' question/answer format."""
    return T.describe(item)


def describe_items(cfg, n: int, *, seed: int) -> list[T.Item]:
    """``n`` pretraining items: scenes of the five vision tasks (from the train split), each asked
    "Describe the image in detail." and answered by :func:`dense_caption`."""
    per = -(-n // len(T.VISION_TASKS))
    rng = random.Random(seed)
    items = []
    for task in T.VISION_TASKS:
        for it in T.generate(task, "train", per, seed=seed, image_size=cfg.image_size):
            meta = {"kind": it.meta["kind"], "scene": it.meta["scene"], "qtype": "describe", "source": task}
            items.append(T.Item("describe", rng.choice(DESCRIBE), dense_caption(it), it.image, meta))
    rng.shuffle(items)
    return items[:n]


def base_items(cfg) -> list[T.Item]:
    """The base's pretraining set: ``cfg.base_items`` items, of which ``cfg.base_task_fraction`` are
    the tasks' own training items (a light mixture, spread evenly over the six tasks) and the rest
    descriptions of the tasks' scenes (:func:`describe_items` when ``cfg.base_data == "dense"``, the
    tasks' generic captions when ``"generic"``). Drawn with other seeds than the experts' items."""
    n_task = round(cfg.base_task_fraction * cfg.base_items)
    n_desc = cfg.base_items - n_task
    seed = cfg.data_seed + 1_000_003
    if cfg.base_data == "dense":
        items = describe_items(cfg, n_desc, seed=seed)
    elif cfg.base_data == "generic":
        items = T.generate(T.CAPTION_TASK, "train", n_desc, seed=seed, image_size=cfg.image_size)
    else:
        raise ValueError(f"base_data must be 'dense' or 'generic', got {cfg.base_data!r}")
    per_task = -(-n_task // len(T.TASKS)) if n_task else 0
    for task in T.TASKS:
        items += T.generate(task, "train", per_task, seed=seed, image_size=cfg.image_size)
    return items


def instruct_items(cfg) -> list[T.Item]:
    """The instruction stage's set (the full setting's base, like an -Instruct model): a small pool of
    ``cfg.instruct_items`` items of every task, the text task included, plus as many scene
    descriptions; drawn with other seeds than the experts' items, which are many more (``train_items``
    per task), so that the experts still learn what the brief instruction stage left out."""
    seed = cfg.data_seed + 2_000_003
    items = describe_items(cfg, cfg.instruct_items, seed=seed)
    for task in T.TASKS:
        items += T.generate(task, "train", cfg.instruct_items, seed=seed, image_size=cfg.image_size)
    return items


def multitask_items(cfg) -> list[T.Item]:
    """The union of the five vision experts' training sets (the multi-task upper bound of capability
    merging). The text task is left out: it is what backbone merging brings in from the text LLM."""
    return [it for task in T.VISION_TASKS for it in expert_items(cfg, task)]


def text_items(cfg) -> list[T.Item]:
    """The text LLM's training set: the arithmetic experts' items."""
    return [it for task in T.TEXT_TASKS for it in expert_items(cfg, task)]
