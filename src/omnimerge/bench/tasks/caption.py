"""Generic captions of the vision tasks' scenes, for pretraining the base; never evaluated.

A caption names what is in the picture (objects, colours, the kind of figure) but never an answer to
a task's question (no counts, places, values, text or boxes)."""

from __future__ import annotations

import random

from .core import PRETRAINING, VISION, Draft, Item, Task, pick, register, registry

TEMPLATES = {"describe": ("Describe the image.", "What is in the picture?")}


def sample(rng: random.Random, S: int) -> Draft:
    sources = [t for t in registry() if t.kind == VISION]
    source = rng.choice(sources)
    draft = source.sample(rng, S)
    variant = rng.randrange(4)
    tpl = TEMPLATES["describe"]
    ti = pick(rng, tpl)

    def build() -> Item:
        src = draft.build()
        meta = {"kind": src.meta["kind"], "scene": src.meta["scene"], "qtype": "describe",
                "template": ti, "source": source.name}
        return Item("caption", tpl[ti], source.caption(src.meta, variant), src.image, meta)

    scene_key = source.name + "|" + draft.scene_key
    return Draft(scene_key, scene_key + f"|{variant}|{ti}", build)


TASK = register(Task("caption", 100, PRETRAINING, TEMPLATES, sample))
