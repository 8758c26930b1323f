"""Scenes of coloured shapes, shared by VQA (one object per quadrant) and grounding (objects on a grid)."""

from __future__ import annotations

import math
import random

from PIL import Image

from .drawing import COLOURS, SHAPES, draw_shape, new_image

__all__ = ["CORNERS", "GROUNDING_GRID", "quadrant_scene", "grid_scene", "grid_box", "render_shapes",
           "shapes_caption"]

CORNERS = ("top left", "top right", "bottom left", "bottom right")  # quadrant index 0..3
GROUNDING_GRID = 8          # boxes are answered in cells of an 8 x 8 grid (8 px = one patch at 64 px)


def quadrant_scene(rng: random.Random, S: int) -> dict:
    """1-4 objects of distinct colours, each inside its own quadrant (so corners are unambiguous)."""
    k = rng.randint(1, 4)
    cells = rng.sample(range(4), k)
    colours = rng.sample(list(COLOURS), k)
    q = S // 2
    lo, hi = round(0.26 * S), round(0.40 * S)
    objects = []
    for cell, colour in zip(cells, colours):
        s = rng.randint(lo, hi)
        qx, qy = (cell % 2) * q, (cell // 2) * q
        l = rng.randint(qx + 1, qx + q - s - 1)
        t = rng.randint(qy + 1, qy + q - s - 1)
        objects.append({"shape": rng.choice(SHAPES), "colour": colour, "cell": cell,
                        "box_px": [l, t, l + s, t + s]})
    return {"kind": "shapes", "size": S, "objects": objects}


def grid_box(box_px, size: int, grid: int = GROUNDING_GRID) -> list[int]:
    """Quantise a half-open pixel box to inclusive cells of a ``grid`` x ``grid`` partition
    (each edge rounded to the nearest cell boundary, at least one cell wide)."""
    def edge(v):
        return math.floor(v * grid / size + 0.5)
    l, t, r, b = box_px
    x1, y1 = min(edge(l), grid - 1), min(edge(t), grid - 1)
    x2, y2 = max(edge(r) - 1, x1), max(edge(b) - 1, y1)
    return [x1, y1, min(x2, grid - 1), min(y2, grid - 1)]


def grid_scene(rng: random.Random, S: int, grid: int = GROUNDING_GRID) -> dict:
    """2-4 non-overlapping objects of distinct colours whose boxes are whole cells of a ``grid`` x
    ``grid`` partition (2-3 cells a side, a free cell between objects), so every box has one exact
    grid answer."""
    while True:
        k = rng.randint(2, 4)
        colours = rng.sample(list(COLOURS), k)
        cells: list[list[int]] = []     # inclusive cell boxes x1, y1, x2, y2
        for _ in range(200):
            w = rng.randint(2, 3)
            x, y = rng.randint(0, grid - w), rng.randint(0, grid - w)
            box = [x, y, x + w - 1, y + w - 1]
            if all(box[0] > o[2] + 1 or o[0] > box[2] + 1 or box[1] > o[3] + 1 or o[1] > box[3] + 1
                   for o in cells):
                cells.append(box)
                if len(cells) == k:
                    break
        if len(cells) == k:
            break
    px = [[round(c * S / grid) for c in (b[0], b[1], b[2] + 1, b[3] + 1)] for b in cells]
    objects = [{"shape": rng.choice(SHAPES), "colour": c, "box_px": b} for c, b in zip(colours, px)]
    return {"kind": "shapes", "size": S, "objects": objects}


def render_shapes(scene: dict) -> Image.Image:
    img, draw = new_image(scene["size"])
    for o in scene["objects"]:
        draw_shape(draw, o["shape"], o["box_px"], COLOURS[o["colour"]])
    return img


def shapes_caption(meta: dict, variant: int) -> str:
    """A generic caption of a shapes scene: one object's colour and shape, no count or place."""
    objects = meta["scene"]["objects"]
    o = objects[variant % len(objects)]
    return ("shapes, including a {c} {s}", "a picture of shapes with a {c} {s}")[variant % 2].format(
        c=o["colour"], s=o["shape"])
