"""The task registry and what every task shares: items, drafts, splits, the generation loop, scoring.

A task is one :class:`Task` record in a file of its own (``vqa.py``, ``chart.py``, ...), registered at
import with :func:`register`: its name and place in the paper's order, its kind (a vision task that an
expert is trained on, the text task of backbone merging, or the base's pretraining captions), its
question templates, its sampler, the base's descriptions of its scenes and its scoring. The package
imports every module in this folder, so adding a task is adding one file.

Everything is deterministic: :func:`generate` derives its own ``random.Random`` from
``(seed, task, split)`` with SHA-256 and never touches global RNG state, so the same arguments give
the same questions, answers and byte-identical images (on the same Pillow/FreeType build).

Splits are disjoint by construction: every draft item has a *scene key* (the full scene spec; the
string for OCR; the expression for arithmetic) and SHA-256 of ``(task, scene key)`` assigns the
scene to exactly one of train (80 %), validation (10 %) or test (10 %) of the item space, whatever
the seed. A split keeps only the drafts that fall in its own part. Train items are i.i.d. draws
from the train part (small sub-spaces, e.g. short sums, may repeat); validation and test items
within one call are distinct (scene + question) unless the part runs out of items, after which
repeats are allowed.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Callable

from PIL import Image

__all__ = [
    "Item", "Draft", "Task", "register", "registry", "task", "SPLITS", "SPLIT_FRACTIONS",
    "VISION", "TEXT", "PRETRAINING", "generate", "normalize", "exact_match", "canon", "pick",
]

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

# The kinds of task.
VISION = "vision"            # an expert's task: capability merging merges one expert per vision task
TEXT = "text"                # text only: the text LLM's task in backbone merging
PRETRAINING = "pretraining"  # the base's generic captions; never evaluated


@dataclass(frozen=True)
class Item:
    """One benchmark example. ``meta`` is JSON-serialisable: the scene spec, the question type
    (``qtype``) and template index, and task extras (``box``/``box_px`` for grounding)."""

    task: str
    question: str
    answer: str
    image: Image.Image | None
    meta: dict


@dataclass
class Draft:
    """An item before it is rendered: ``scene_key`` decides the split (same scene => same split),
    ``item_key`` de-duplicates within one call, ``build`` renders it (pure: no randomness)."""

    scene_key: str
    item_key: str
    build: Callable[[], Item]


def normalize(text: str) -> str:
    """Canonical form for exact match: strip, lower-case, collapse spaces, drop a final '.'."""
    return " ".join(str(text).strip().lower().split()).rstrip(".").strip()


def exact_match(prediction: str, item: Item) -> float:
    """1.0 when ``prediction`` equals the answer after :func:`normalize`, else 0.0."""
    return 1.0 if normalize(prediction) == normalize(item.answer) else 0.0


@dataclass(frozen=True)
class Task:
    """One task of the benchmark, everything about it in one record.

    - ``name``, ``order`` (its place in the paper's order: tables, training mixtures and the caption
      sampler follow it), ``kind`` (:data:`VISION`, :data:`TEXT` or :data:`PRETRAINING`);
    - ``templates``: question type -> the question's phrasings (``{colour}``, ``{shape}``, ``{label}``
      and ``{expr}`` are filled by the sampler; the tokenizer is trained on them);
    - ``sample(rng, image_size) -> Draft``: one random draft item;
    - ``describe(meta) -> str``: the base's dense description of the item's scene (vision tasks);
    - ``caption(meta, variant) -> str``: a generic caption of the scene that never states an answer;
    - ``score(prediction, item) -> float``: 1.0 or 0.0 (default: :func:`exact_match`);
    - ``in_corpus``: whether the task's questions, answers and descriptions train the tokenizer (OCR's
      strings stay out, so that they tokenize one character per token).
    """

    name: str
    order: int
    kind: str
    templates: dict[str, tuple[str, ...]]
    sample: Callable[[random.Random, int], Draft]
    describe: Callable[[dict], str] | None = None
    caption: Callable[[dict, int], str] | None = None
    score: Callable[[str, Item], float] = field(default=exact_match)
    in_corpus: bool = True

    def __post_init__(self):
        if self.kind not in (VISION, TEXT, PRETRAINING):
            raise ValueError(f"task {self.name!r}: kind must be {VISION!r}, {TEXT!r} or {PRETRAINING!r}")
        if self.kind == VISION and (self.describe is None or self.caption is None):
            raise ValueError(f"vision task {self.name!r} needs describe() and caption()")


_REGISTRY: dict[str, Task] = {}


def register(t: Task) -> Task:
    """Add ``t`` to the registry (a second task of the same name or order is an error)."""
    if t.name in _REGISTRY:
        raise ValueError(f"task {t.name!r} is registered twice")
    clash = [o.name for o in _REGISTRY.values() if o.order == t.order]
    if clash:
        raise ValueError(f"tasks {clash[0]!r} and {t.name!r} share order {t.order}")
    _REGISTRY[t.name] = t
    return t


def registry() -> list[Task]:
    """Every registered task, in order."""
    return sorted(_REGISTRY.values(), key=lambda t: t.order)


def task(name: str) -> Task:
    """The registered task ``name``, or a ``ValueError`` that lists them."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; expected one of {tuple(t.name for t in registry())}") from None


def _sha_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def split_of(task_name: str, scene_key: str) -> str:
    u = _sha_int(f"omnimerge.bench.split|{task_name}|{scene_key}") / 2.0**64
    edge = 0.0
    for name, frac in zip(SPLITS, SPLIT_FRACTIONS):
        edge += frac
        if u < edge:
            return name
    return SPLITS[-1]


def canon(obj) -> str:
    """A canonical JSON string of a scene spec (its key)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def pick(rng: random.Random, templates: tuple[str, ...]) -> int:
    """The index of a random phrasing."""
    return rng.randrange(len(templates))


_MAX_MISSES = 2000  # consecutive duplicate drafts before repeats are allowed


def generate(task_name: str, split: str, n: int, *, seed: int = 0, image_size: int = 64) -> list[Item]:
    """``n`` items of the task ``task_name`` from ``split`` ("train", "validation", "test").
    Deterministic in all arguments; ``image_size`` (>= 32) is the side of the square RGB images and
    is ignored by text tasks."""
    t = task(task_name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if t.kind != TEXT and (not isinstance(image_size, int) or image_size < 32):
        raise ValueError(f"image_size must be an int >= 32, got {image_size!r}")
    rng = random.Random(_sha_int(f"omnimerge.bench.seed|{seed}|{task_name}|{split}"))
    items: list[Item] = []
    seen: set[str] = set()
    misses, allow_repeats = 0, False
    while len(items) < n:
        draft = t.sample(rng, image_size)
        if split_of(task_name, draft.scene_key) != split:
            continue
        if split != "train" and draft.item_key in seen and not allow_repeats:
            misses += 1
            allow_repeats = misses >= _MAX_MISSES
            continue
        misses = 0
        seen.add(draft.item_key)
        items.append(draft.build())
    return items
