"""The offline miniature of the MLLM-merging benchmark (``omnimerge bench``; docs/bench.md).

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

# The model layer (tiny Qwen2-VL, tokenizer, processor, training, evaluation). Imported lazily by
# attribute, so that ``import omnimerge.bench`` stays as light as the task generators. The functions
# ``train`` and ``evaluate`` share their modules' names, so they are not re-exported here (an imported
# submodule would shadow them): use ``from omnimerge.bench.train import train`` and
# ``from omnimerge.bench.evaluate import evaluate``.
_LAZY = {
    "BenchConfig": "model", "BenchProcessor": "model", "build_tokenizer": "model", "build_processor": "model",
    "build_base_model": "model", "load_processor": "model", "load_model": "model", "save_checkpoint": "model",
    "save_adapter": "model", "format_prompt": "model",
    "extract_text_model": "train", "train_base": "train", "train_expert": "train",
    "train_multitask": "train", "train_text_llm": "train", "base_items": "train", "expert_items": "train",
    "multitask_items": "train", "text_items": "train",
    "evaluate_tasks": "evaluate", "predict": "evaluate",
}
__all__ += list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
