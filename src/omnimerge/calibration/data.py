"""Calibration samples: a JSONL file of unlabeled chat turns per model, validated before anything runs.

One JSON object per line::

    {"text": "How many red squares are there?", "image": "images/0001.png"}

``text`` is required (a non-empty string); ``image`` is optional (text LLMs have none), a path relative to
the JSONL file's folder that must stay inside it. Blank lines are skipped. Every error names the file, the
line and the fix; nothing is read past the first bad line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import OmnimergeError

MAX_FILE_BYTES = 64 * 2**20  # a calibration file is a few hundred short lines
MAX_TEXT_CHARS = 100_000
MAX_IMAGE_PIXELS = 40_000_000  # larger images are refused (a decompression bomb or a mistake)
MAX_IMAGE_SIDE = 16_384
_KEYS = {"text", "image"}


@dataclass(frozen=True)
class CalibrationSettings:
    """How many samples per model, in batches of how many, cut to how many tokens."""

    samples: int = 32
    batch_size: int = 4
    max_tokens: int = 512

    def __post_init__(self):
        for name in ("samples", "batch_size", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OmnimergeError(f"calibration.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Sample:
    text: str
    image: Path | None  # resolved, inside the JSONL's folder
    source: Path
    line: int

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def _confined_image(value, folder: Path, where: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise OmnimergeError(f"{where}: 'image' must be a path string relative to {folder}, got {value!r}")
    rel = Path(value)
    if rel.is_absolute() or ".." in rel.parts:
        raise OmnimergeError(f"{where}: image path {value!r} must be relative to the calibration file's folder "
                             f"({folder}) and stay inside it; copy the image there")
    path = (folder / rel).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise OmnimergeError(f"{where}: image {value!r} resolves to {path}, outside {folder} (a symlink?); copy the "
                             "image into the calibration folder")
    if not path.is_file():
        raise OmnimergeError(f"{where}: image {value!r} does not exist ({path}); fix the path or drop the line")
    return path


def check_image(path: Path, where: str) -> None:
    """Open the image header (no full decode) and check its size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise OmnimergeError(f"{where}: {path} is not a readable image ({e}); replace it or drop the line") from None
    if w < 1 or h < 1 or w > MAX_IMAGE_SIDE or h > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
        raise OmnimergeError(f"{where}: image {path} is {w}×{h} pixels; calibration images must be at most "
                             f"{MAX_IMAGE_SIDE} px a side and {MAX_IMAGE_PIXELS:,} pixels; resize it")


def load_samples(path: str | Path, *, limit: int | None = None, images: bool = True) -> list[Sample]:
    """The first ``limit`` samples of a calibration JSONL, validated (``images=False``: refuse images, for a
    text-only model)."""
    path = Path(path)
    if not path.is_file():
        raise OmnimergeError(f"calibration file {path} does not exist or is not a file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise OmnimergeError(f"calibration file {path} is {size / 2**20:.0f} MiB; keep it under "
                             f"{MAX_FILE_BYTES // 2**20} MiB (a few hundred samples are plenty)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise OmnimergeError(f"calibration file {path} is not UTF-8 (byte {e.start}); save it as UTF-8") from None
    folder = path.parent
    out: list[Sample] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if limit is not None and len(out) >= limit:
            break
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line, parse_constant=lambda c: math.nan)
        except json.JSONDecodeError as e:
            raise OmnimergeError(f"{where}: not a JSON object ({e.msg}); each line is "
                                 '{"text": "...", "image": "optional/path.png"}') from None
        if not isinstance(row, dict):
            raise OmnimergeError(f"{where}: a line must be a JSON object with 'text' (and optionally 'image'), "
                                 f"got {type(row).__name__}")
        unknown = sorted(set(row) - _KEYS)
        if unknown:
            raise OmnimergeError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; a sample has 'text' "
                                 "and optionally 'image'")
        body = row.get("text")
        if not isinstance(body, str) or not body.strip():
            raise OmnimergeError(f"{where}: 'text' must be a non-empty string")
        if len(body) > MAX_TEXT_CHARS:
            raise OmnimergeError(f"{where}: 'text' has {len(body):,} characters; keep samples under "
                                 f"{MAX_TEXT_CHARS:,}")
        image = None
        if row.get("image") is not None:
            if not images:
                raise OmnimergeError(f"{where}: this model takes no images; drop 'image' from the calibration "
                                     "file of a text LLM")
            image = _confined_image(row["image"], folder, where)
            check_image(image, where)
        out.append(Sample(body, image, path, number))
    if not out:
        raise OmnimergeError(f"calibration file {path} has no samples; add lines like "
                             '{"text": "a question the model answers"}')
    return out
