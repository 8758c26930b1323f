"""What the tasks draw with: the palette, Pillow's built-in font, text and filled shapes."""

from __future__ import annotations

import functools

from PIL import Image, ImageDraw, ImageFont

__all__ = ["COLOURS", "SHAPES", "WHITE", "BLACK", "GRID_GREY", "TEXT_COLOURS", "PAPER_COLOURS",
           "font", "ink_box", "draw_text", "draw_shape", "new_image"]

# Flat colours (shapes are drawn without antialiasing, so an image holds exactly these values).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 190, 0),
    "purple": (150, 60, 190),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")

WHITE = (255, 255, 255)
BLACK = (20, 20, 20)
GRID_GREY = (205, 205, 205)
TEXT_COLOURS = {"black": (20, 20, 20), "dark blue": (20, 30, 120), "dark red": (120, 20, 20)}
PAPER_COLOURS = ((255, 255, 255), (246, 240, 222), (228, 238, 250))


@functools.lru_cache(maxsize=None)
def font(size: int):
    """Pillow's built-in font: scalable Aileron when FreeType is present, else the bitmap one."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def ink_box(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int, int, int]:
    """The box of the ink ``text`` leaves when drawn at the origin."""
    try:
        return tuple(int(v) for v in draw.textbbox((0, 0), text, font=font, anchor="lt"))
    except (ValueError, TypeError):  # bitmap font: no anchors
        return tuple(int(v) for v in draw.textbbox((0, 0), text, font=font))


def draw_text(draw: ImageDraw.ImageDraw, xy, text: str, font, fill, bold: bool = False) -> None:
    """Draw ``text`` with its ink box's top-left corner at ``xy``; ``bold`` double-strikes it."""
    x0, y0, _, _ = ink_box(draw, text, font)
    x, y = xy[0] - x0, xy[1] - y0
    kw = {"anchor": "lt"} if isinstance(font, ImageFont.FreeTypeFont) else {}
    for dx in ((0, 1) if bold else (0,)):
        draw.text((x + dx, y), text, font=font, fill=fill, **kw)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box, fill) -> None:
    """Fill ``shape`` exactly inside the half-open pixel box ``[l, r) x [t, b)``."""
    l, t, r, b = box
    if shape == "circle":
        draw.ellipse((l, t, r - 1, b - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((l, t, r - 1, b - 1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(l, b - 1), (r - 1, b - 1), ((l + r - 1) / 2, t)], fill=fill)
    else:  # pragma: no cover
        raise ValueError(shape)


def new_image(size: int, colour=WHITE) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (size, size), colour)
    return img, ImageDraw.Draw(img)
