"""Geometry: width, height and area of a rectangle on a grid; sides of a polygon; the angle of two lines."""

from __future__ import annotations

import math
import random

from PIL import Image

from .core import VISION, Draft, Item, Task, canon, pick, register
from .drawing import BLACK, COLOURS, GRID_GREY, new_image

__all__ = ["GEOMETRY_GRID", "GEOMETRY_ANGLES", "geometry_answer"]

GEOMETRY_GRID = 8           # the background is an 8 x 8 grid of unit squares
GEOMETRY_ANGLES = (30, 45, 60, 90, 120, 150)

TEMPLATES = {
    "width": ("How wide is the rectangle?", "What is the width of the rectangle?"),
    "height": ("How tall is the rectangle?", "What is the height of the rectangle?"),
    "area": ("What is the area of the rectangle?", "How many grid squares does the rectangle cover?"),
    "sides": ("How many sides does the polygon have?", "How many corners does the polygon have?"),
    "angle": ("What is the angle between the two lines?", "How many degrees is the angle?"),
}


def _scene(rng: random.Random, S: int, qtype: str) -> dict:
    u = S // GEOMETRY_GRID
    off = (S - u * GEOMETRY_GRID) // 2
    base = {"size": S, "unit": u, "offset": off}
    if qtype in ("width", "height", "area"):
        w, h = rng.randint(1, 6), rng.randint(1, 6)
        x, y = rng.randint(0, GEOMETRY_GRID - w), rng.randint(0, GEOMETRY_GRID - h)
        return {**base, "kind": "rect", "w": w, "h": h, "x": x, "y": y, "colour": rng.choice(list(COLOURS))}
    if qtype == "sides":
        n = rng.randint(3, 6)
        r = rng.randint(round(0.25 * S), round(0.40 * S))
        cx, cy = rng.randint(r + 2, S - r - 3), rng.randint(r + 2, S - r - 3)
        return {**base, "kind": "polygon", "n": n, "r": r, "cx": cx, "cy": cy,
                "rotation": rng.randrange(360), "colour": rng.choice(list(COLOURS))}
    # angle: two rays from a vertex, both ending inside the image
    angle = rng.choice(GEOMETRY_ANGLES)
    while True:
        length = rng.randint(round(0.30 * S), round(0.45 * S))
        vx, vy = rng.randint(3, S - 4), rng.randint(3, S - 4)
        theta = rng.randrange(360)
        ends = [_ray_end(vx, vy, theta + d, length) for d in (0, angle)]
        if all(2 <= x <= S - 3 and 2 <= y <= S - 3 for x, y in ends):
            return {**base, "kind": "angle", "angle": angle, "vx": vx, "vy": vy, "theta": theta, "length": length}


def _ray_end(vx: int, vy: int, deg: float, length: int) -> tuple[float, float]:
    rad = math.radians(deg)
    return vx + length * math.cos(rad), vy - length * math.sin(rad)


def _render(scene: dict) -> Image.Image:
    S, u, off = scene["size"], scene["unit"], scene["offset"]
    img, draw = new_image(S)
    for i in range(GEOMETRY_GRID + 1):
        p = min(off + i * u, S - 1)
        draw.line([(p, 0), (p, S - 1)], fill=GRID_GREY)
        draw.line([(0, p), (S - 1, p)], fill=GRID_GREY)
    lw = max(1, round(S / 32))
    if scene["kind"] == "rect":
        l, t = off + scene["x"] * u, off + scene["y"] * u
        r, b = min(l + scene["w"] * u, S - 1), min(t + scene["h"] * u, S - 1)
        draw.rectangle((l, t, r, b), fill=COLOURS[scene["colour"]], outline=BLACK)
    elif scene["kind"] == "polygon":
        draw.regular_polygon((scene["cx"], scene["cy"], scene["r"]), scene["n"],
                             rotation=scene["rotation"], fill=COLOURS[scene["colour"]], outline=BLACK)
    else:
        v = (scene["vx"], scene["vy"])
        for d in (0, scene["angle"]):
            draw.line([v, _ray_end(scene["vx"], scene["vy"], scene["theta"] + d, scene["length"])],
                      fill=BLACK, width=lw)
        draw.ellipse((v[0] - lw, v[1] - lw, v[0] + lw, v[1] + lw), fill=BLACK)
    return img


def geometry_answer(scene: dict, qtype: str) -> str:
    """The true answer of a geometry question, from the scene spec alone."""
    return str({"width": lambda: scene["w"], "height": lambda: scene["h"],
                "area": lambda: scene["w"] * scene["h"], "sides": lambda: scene["n"],
                "angle": lambda: scene["angle"]}[qtype]())


def sample(rng: random.Random, S: int) -> Draft:
    qtype = rng.choice(("width", "height", "area", "sides", "angle"))
    scene = _scene(rng, S, qtype)
    tpl = TEMPLATES[qtype]
    ti = pick(rng, tpl)
    question, answer = tpl[ti], geometry_answer(scene, qtype)
    meta = {"kind": scene["kind"], "scene": scene, "qtype": qtype, "template": ti}
    key = canon(scene)
    return Draft(key, key + "|" + question, lambda: Item("geometry", question, answer, _render(scene), meta))


def describe(meta: dict) -> str:
    scene = meta["scene"]
    if scene["kind"] == "rect":
        return f"{scene['colour']} rectangle {scene['w']} by {scene['h']}"
    if scene["kind"] == "polygon":
        return f"{scene['colour']} polygon with {scene['n']} sides"
    return f"two lines at {scene['angle']} degrees"


def caption(meta: dict, variant: int) -> str:
    scene = meta["scene"]
    if scene["kind"] == "rect":
        return f"a {scene['colour']} rectangle on a grid"
    if scene["kind"] == "polygon":
        return f"a {scene['colour']} polygon on a grid"
    return "two lines meeting on a grid"


TASK = register(Task("geometry", 1, VISION, TEMPLATES, sample, describe, caption))
