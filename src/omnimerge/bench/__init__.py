"""The offline miniature of the MLLM-merging benchmark (``omnimerge bench``, DESIGN.md §6).

:mod:`omnimerge.bench.tasks` generates the task data: five vision tasks (VQA, geometry, chart,
OCR, grounding), a text-only arithmetic task for backbone merging, and generic captions for
pretraining the base; deterministic by seed, with disjoint train/validation/test splits.
"""

from .tasks import (
    CAPTION_TASK,
    COLOURS,
    GROUNDING_GRID,
    OCR_ALPHABET,
    SHAPES,
    SPLIT_FRACTIONS,
    SPLITS,
    TASKS,
    TEMPLATES,
    TEXT_TASKS,
    VISION_TASKS,
    Item,
    box_iou,
    chance_accuracy,
    generate,
    generic_caption,
    majority_baseline,
    normalize,
    parse_box,
    sample_sheet,
    score,
)

__all__ = [
    "CAPTION_TASK", "COLOURS", "GROUNDING_GRID", "OCR_ALPHABET", "SHAPES", "SPLIT_FRACTIONS",
    "SPLITS", "TASKS", "TEMPLATES", "TEXT_TASKS", "VISION_TASKS", "Item", "box_iou",
    "chance_accuracy", "generate", "generic_caption", "majority_baseline", "normalize",
    "parse_box", "sample_sheet", "score",
]
