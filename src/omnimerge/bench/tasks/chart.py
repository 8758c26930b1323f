"""Chart: the value of a bar or point, and the arg max / arg min, of a 4-column bar or line chart."""

from __future__ import annotations

import random

from PIL import Image

from .core import VISION, Draft, Item, Task, canon, pick, register
from .drawing import BLACK, COLOURS, GRID_GREY, draw_text, font, ink_box, new_image

__all__ = ["CHART_MAX", "CHART_LABELS", "chart_geometry"]

CHART_MAX = 6               # values are integers 1..CHART_MAX; one unit = S / 8 px (a patch at 64 px)
CHART_LABELS = "ABCD"       # four bars/points, each centred in a quarter of the width

TEMPLATES = {
    "value_bar": ("What is the value of bar {label}?", "How high is bar {label}?"),
    "value_line": ("What is the value at {label}?", "What does the line show at {label}?"),
    "argmax_bar": ("Which bar is the tallest?", "Which bar has the largest value?"),
    "argmax_line": ("Where is the line highest?", "At which label does the line peak?"),
    "argmin_bar": ("Which bar is the shortest?", "Which bar has the smallest value?"),
    "argmin_line": ("Where is the line lowest?", "At which label is the line at its minimum?"),
}


def _layout(S: int) -> dict:
    """The plot spans rows S/8 .. 7S/8 (CHART_MAX units of S/8 px); the labels sit in the last S/8."""
    top, bottom = S // 8, S - S // 8            # bottom: y of the axis; labels below it
    return {"font": max(6, S // 8), "top": top, "side": 0, "bottom": bottom, "unit": (bottom - top) / CHART_MAX}


def chart_geometry(scene: dict) -> list[dict]:
    """Pixel placement of each bar/point: centre x, top y (of bar or point), bar left/right. Value i
    sits in the middle of column i of ``len(values)`` equal columns (quarters: the tiny bench model's
    visual tokens at 64 px)."""
    S, k = scene["size"], len(scene["values"])
    lay = _layout(S)
    slot = S / k
    out = []
    for i, v in enumerate(scene["values"]):
        cx = slot * (i + 0.5)
        half = slot * 0.25
        out.append({"cx": round(cx), "top": lay["bottom"] - round(v * lay["unit"]),
                    "l": round(cx - half), "r": round(cx + half) - 1})
    return out


def _render(scene: dict) -> Image.Image:
    S = scene["size"]
    lay = _layout(S)
    img, draw = new_image(S)
    for v in range(1, CHART_MAX + 1):
        y = lay["bottom"] - round(v * lay["unit"])
        draw.line([(lay["side"], y), (S - 1 - lay["side"], y)], fill=GRID_GREY)
    colour = COLOURS[scene["colour"]]
    geo = chart_geometry(scene)
    lw = max(1, round(S / 32))
    if scene["kind"] == "bar":
        for g in geo:
            draw.rectangle((g["l"], g["top"], g["r"], lay["bottom"] - 1), fill=colour)
    else:
        pts = [(g["cx"], g["top"]) for g in geo]
        draw.line(pts, fill=colour, width=lw)
        m = lw + 1
        for x, y in pts:
            draw.rectangle((x - m, y - m, x + m, y + m), fill=colour)
    draw.line([(lay["side"], lay["bottom"]), (S - 1 - lay["side"], lay["bottom"])], fill=BLACK)
    f = font(lay["font"])
    for g, label in zip(geo, CHART_LABELS):
        x0, _, x1, _ = ink_box(draw, label, f)
        draw_text(draw, (g["cx"] - (x1 - x0) // 2, lay["bottom"] + 2), label, f, BLACK)
    return img


def sample(rng: random.Random, S: int) -> Draft:
    kind = rng.choice(("bar", "line"))
    k = len(CHART_LABELS)
    while True:
        values = [rng.randint(1, CHART_MAX) for _ in range(k)]
        if values.count(max(values)) == 1 and values.count(min(values)) == 1:
            break
    scene = {"kind": kind, "size": S, "values": values, "colour": rng.choice(list(COLOURS))}
    qkind = rng.choice(("value", "argmax", "argmin"))
    qtype = f"{qkind}_{kind}"
    tpl = TEMPLATES[qtype]
    ti = pick(rng, tpl)
    if qkind == "value":
        i = rng.randrange(k)
        question, answer = tpl[ti].format(label=CHART_LABELS[i]), str(values[i])
    elif qkind == "argmax":
        question, answer = tpl[ti], CHART_LABELS[values.index(max(values))]
    else:
        question, answer = tpl[ti], CHART_LABELS[values.index(min(values))]
    meta = {"kind": kind, "scene": scene, "qtype": qtype, "template": ti}
    key = canon(scene)
    return Draft(key, key + "|" + question, lambda: Item("chart", question, answer, _render(scene), meta))


def describe(meta: dict) -> str:
    scene = meta["scene"]
    values = ", ".join(f"{label} {v}" for label, v in zip(CHART_LABELS, scene["values"]))
    return f"{scene['colour']} {scene['kind']} chart: {values}"


def caption(meta: dict, variant: int) -> str:
    scene = meta["scene"]
    return f"a bar chart with {scene['colour']} bars" if scene["kind"] == "bar" else f"a {scene['colour']} line chart"


TASK = register(Task("chart", 2, VISION, TEMPLATES, sample, describe, caption))
