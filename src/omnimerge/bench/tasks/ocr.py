"""OCR: a 3-4 character string printed in character cells, like a licence plate or a form field."""

from __future__ import annotations

import functools
import random

from PIL import Image, ImageDraw

from .core import VISION, Draft, Item, Task, canon, pick, register
from .drawing import PAPER_COLOURS, TEXT_COLOURS, draw_text, font, ink_box, new_image

__all__ = ["OCR_ALPHABET", "OCR_CELLS"]

OCR_ALPHABET = "ACEHKPTX2347"  # visually distinct in Aileron at ~18 px
OCR_CELLS = 4  # a text line is OCR_CELLS character cells, each S / OCR_CELLS wide

TEMPLATES = {
    "read": ("What does the text say?", "Read the text in the image.", "What is written in the image?"),
}


@functools.lru_cache(maxsize=None)
def _font_size(S: int) -> int:
    """Largest font size at which every character of the alphabet fits in a cell of S / OCR_CELLS
    pixels (with a pixel to spare)."""
    cell = S // OCR_CELLS
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    best = 4
    for size in range(4, 2 * cell):
        f = font(size)
        boxes = [ink_box(draw, c, f) for c in OCR_ALPHABET]
        if all(b[2] - b[0] < cell - 1 and b[3] - b[1] < cell - 1 for b in boxes):
            best = size
    return best


def _render(scene: dict) -> Image.Image:
    """Monospaced: character i centred in cell i of the row ``scene["row"]`` (cells of S / 4 pixels,
    which are the tiny bench model's visual tokens at 64 px)."""
    S = scene["size"]
    cell = S // OCR_CELLS
    img, draw = new_image(S, tuple(scene["paper"]))
    f = font(scene["font"])
    for i, c in enumerate(scene["text"]):
        x0, y0, x1, y1 = ink_box(draw, c, f)
        draw_text(draw, ((scene["col"] + i) * cell + (cell - (x1 - x0)) // 2,
                         scene["row"] * cell + (cell - (y1 - y0)) // 2), c, f, TEXT_COLOURS[scene["ink"]], bold=True)
    return img


def sample(rng: random.Random, S: int) -> Draft:
    n = rng.choice((3, 4))
    text = "".join(rng.choice(OCR_ALPHABET) for _ in range(n))
    scene = {"kind": "text", "size": S, "text": text, "font": _font_size(S),
             "row": rng.randrange(OCR_CELLS), "col": rng.randint(0, OCR_CELLS - n),
             "ink": rng.choice(sorted(TEXT_COLOURS)), "paper": list(rng.choice(PAPER_COLOURS))}
    tpl = TEMPLATES["read"]
    ti = pick(rng, tpl)
    question = tpl[ti]
    meta = {"kind": "text", "scene": scene, "qtype": "read", "template": ti}
    # The split is decided by the string itself: test strings never occur in training.
    return Draft(text, canon(scene) + "|" + question, lambda: Item("ocr", question, text, _render(scene), meta))


def describe(meta: dict) -> str:
    scene = meta["scene"]
    return f"{scene['ink']} text {scene['text']}"


def caption(meta: dict, variant: int) -> str:
    return (f"{meta['scene']['ink']} letters and digits", f"{meta['scene']['ink']} text on light paper")[variant % 2]


TASK = register(Task("ocr", 3, VISION, TEMPLATES, sample, describe, caption, in_corpus=False))
