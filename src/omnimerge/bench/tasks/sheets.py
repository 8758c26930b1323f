"""What is measured about a task's data rather than a model: the best constant answer, sample sheets."""

from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw

from .core import TEXT, Item, generate, normalize, task
from .drawing import BLACK, GRID_GREY, WHITE, draw_text, font

__all__ = ["majority_baseline", "chance_accuracy", "sample_sheet"]


def majority_baseline(items: list[Item]) -> tuple[str, float]:
    """The best constant answer over ``items`` (among the answers seen, by the task's own scoring;
    ties go to the first in sorted order) and its accuracy. For exact-match tasks that is the most
    frequent answer; for grounding, the box that overlaps most true boxes enough."""
    if not items:
        raise ValueError("no items")
    t = task(items[0].task)
    candidates = sorted(Counter(normalize(it.answer) for it in items))

    def hits(answer: str) -> float:
        return sum(t.score(answer, it) for it in items)

    best = max(candidates, key=hits)
    answer = next(it.answer for it in items if normalize(it.answer) == best)
    return answer, hits(best) / len(items)


def chance_accuracy(task_name: str, *, n: int = 300, seed: int = 0, image_size: int = 64) -> float:
    """Accuracy of always giving the best constant answer, measured on ``n`` test items."""
    return majority_baseline(generate(task_name, "test", n, seed=seed, image_size=image_size))[1]


def sample_sheet(task_name: str, path, n: int = 8, seed: int = 0, *, split: str = "test",
                 image_size: int = 64, columns: int = 4) -> Path:
    """Write a PNG grid of ``n`` items of ``task_name`` with the question and answer under each."""
    items = generate(task_name, split, n, seed=seed, image_size=image_size)
    text_only = task(task_name).kind == TEXT
    scale = max(1, 128 // image_size)
    cell_w = max(200, image_size * scale + 16)
    body, title = font(11), font(13)
    line_h, wrap = 14, 30
    blocks = []
    for it in items:
        lines = [(ln, BLACK) for ln in textwrap.wrap("Q: " + it.question, wrap)]
        lines += [(ln, (0, 110, 0)) for ln in textwrap.wrap("A: " + it.answer, wrap)]
        blocks.append(lines)
    img_h = 0 if text_only else image_size * scale + 6
    cell_h = img_h + line_h * max(len(b) for b in blocks) + 12
    cols = min(columns, max(1, n))
    rows = -(-n // cols)
    title_h = 24
    sheet = Image.new("RGB", (cols * cell_w, title_h + rows * cell_h), WHITE)
    draw = ImageDraw.Draw(sheet)
    where = f"seed {seed}" + ("" if text_only else f", {image_size} px")
    draw_text(draw, (8, 6), f"{task_name}: {n} {split} items ({where})", title, BLACK)
    for i, (it, lines) in enumerate(zip(items, blocks)):
        x, y = (i % cols) * cell_w, title_h + (i // cols) * cell_h
        if it.image is not None:
            big = it.image.resize((image_size * scale,) * 2, Image.NEAREST)
            px = x + (cell_w - big.width) // 2
            sheet.paste(big, (px, y))
            draw.rectangle((px - 1, y - 1, px + big.width, y + big.height), outline=GRID_GREY)
        for j, (line, colour) in enumerate(lines):
            draw_text(draw, (x + 8, y + img_h + j * line_h), line, body, colour)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG", optimize=True)
    return path
