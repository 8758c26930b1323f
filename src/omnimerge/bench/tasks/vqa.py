"""VQA: colour, shape, count, corner and existence of the objects in a scene of 1-4 shapes."""

from __future__ import annotations

import random
from collections import Counter

from .core import VISION, Draft, Item, Task, canon, pick, register
from .drawing import COLOURS, SHAPES
from .shapes import CORNERS, quadrant_scene, render_shapes, shapes_caption

TEMPLATES = {
    "colour": ("What colour is the {shape}?", "What is the colour of the {shape}?"),
    "shape": ("What shape is the {colour} object?", "Which shape is {colour}?"),
    "count": ("How many objects are there?", "How many shapes are in the image?"),
    "position": ("In which corner is the {colour} {shape}?", "Which corner holds the {colour} {shape}?"),
    "exists": ("Is there a {colour} {shape}?", "Does the image contain a {colour} {shape}?"),
}


def sample(rng: random.Random, S: int) -> Draft:
    scene = quadrant_scene(rng, S)
    objs = scene["objects"]
    shape_counts = Counter(o["shape"] for o in objs)
    unique_shape = [o for o in objs if shape_counts[o["shape"]] == 1]
    qtypes = ["shape", "count", "position", "exists"] + (["colour"] if unique_shape else [])
    qtype = rng.choice(sorted(qtypes))
    tpl = TEMPLATES[qtype]
    ti = pick(rng, tpl)
    if qtype == "colour":
        o = rng.choice(unique_shape)
        question, answer = tpl[ti].format(shape=o["shape"]), o["colour"]
    elif qtype == "shape":
        o = rng.choice(objs)
        question, answer = tpl[ti].format(colour=o["colour"]), o["shape"]
    elif qtype == "count":
        question, answer = tpl[ti], str(len(objs))
    elif qtype == "position":
        o = rng.choice(objs)
        question, answer = tpl[ti].format(colour=o["colour"], shape=o["shape"]), CORNERS[o["cell"]]
    else:  # exists
        present = {(o["colour"], o["shape"]) for o in objs}
        if rng.random() < 0.5:
            colour, shape = rng.choice(sorted(present))
        else:
            colour, shape = rng.choice([(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present])
        question = tpl[ti].format(colour=colour, shape=shape)
        answer = "yes" if (colour, shape) in present else "no"
    meta = {"kind": "shapes", "scene": scene, "qtype": qtype, "template": ti}
    key = canon(scene)
    return Draft(key, key + "|" + question, lambda: Item("vqa", question, answer, render_shapes(scene), meta))


def describe(meta: dict) -> str:
    """Every object with its colour, shape and corner."""
    return "; ".join(f"{o['colour']} {o['shape']} {CORNERS[o['cell']]}" for o in meta["scene"]["objects"])


TASK = register(Task("vqa", 0, VISION, TEMPLATES, sample, describe, shapes_caption))
