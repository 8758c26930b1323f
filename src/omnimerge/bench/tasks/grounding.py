"""Grounding: the box of a named object, in cells of an 8 x 8 grid, correct when IoU >= 0.5.

Answers are boxes ``"x1,y1,x2,y2"`` of inclusive grid cells (each an integer 0-7)."""

from __future__ import annotations

import random
import re
from fractions import Fraction

from .core import VISION, Draft, Item, Task, canon, pick, register
from .shapes import GROUNDING_GRID, grid_box, grid_scene, render_shapes, shapes_caption

__all__ = ["parse_box", "box_iou", "inter_union"]

TEMPLATES = {
    "box": ("Give the box of the {colour} {shape}.", "Locate the {colour} {shape}.",
            "Where is the {colour} {shape}? Answer x1,y1,x2,y2."),
}


def sample(rng: random.Random, S: int) -> Draft:
    scene = grid_scene(rng, S)
    target = rng.randrange(len(scene["objects"]))
    o = scene["objects"][target]
    tpl = TEMPLATES["box"]
    ti = pick(rng, tpl)
    question = tpl[ti].format(colour=o["colour"], shape=o["shape"])
    box = grid_box(o["box_px"], S)
    answer = ",".join(map(str, box))
    meta = {"kind": "shapes", "scene": scene, "qtype": "box", "template": ti, "target": target,
            "box": box, "box_px": list(o["box_px"]), "grid": GROUNDING_GRID}
    key = canon(scene)
    return Draft(key, key + "|" + question, lambda: Item("grounding", question, answer, render_shapes(scene), meta))


def describe(meta: dict) -> str:
    """Every object with its colour, shape and grid box."""
    scene = meta["scene"]
    return "; ".join(f"{o['colour']} {o['shape']} " + ",".join(map(str, grid_box(o["box_px"], scene["size"])))
                     for o in scene["objects"])


_INT = re.compile(r"-?\d+")


def parse_box(text: str) -> tuple[int, int, int, int] | None:
    """The 4 integers of a predicted box (corners sorted), or None unless exactly 4 are found."""
    nums = [int(v) for v in _INT.findall(str(text))]
    if len(nums) != 4:
        return None
    x1, y1, x2, y2 = nums
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def _cells(x1, y1, x2, y2) -> int:
    return max(0, x2 - x1 + 1) * max(0, y2 - y1 + 1)


def inter_union(a, b) -> tuple[int, int]:
    """Cells in the intersection and in the union of two boxes of inclusive cells."""
    inter = _cells(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    return inter, _cells(*a) + _cells(*b) - inter


def box_iou(a, b) -> Fraction:
    """Exact IoU of two boxes of inclusive grid cells ``(x1, y1, x2, y2)``."""
    inter, union = inter_union(a, b)
    return Fraction(inter, union) if union > 0 else Fraction(0)


def score(prediction: str, item: Item) -> float:
    """1.0 when the predicted box has IoU >= 0.5 with the true one (exactly, in integers)."""
    box = parse_box(prediction)
    if box is None:
        return 0.0
    inter, union = inter_union(box, item.meta["box"])
    return 1.0 if union > 0 and 2 * inter >= union else 0.0


TASK = register(Task("grounding", 4, VISION, TEMPLATES, sample, describe, shapes_caption, score))
