"""The statistics stage for one model: samples -> rendered batches -> forward passes -> cached statistics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .collect import StatisticsCache, collect, load_model, load_renderer, render_batches, statistics_key
from .data import CalibrationSettings, load_samples


def model_statistics(model_folder: str | Path, calibration: str | Path, kinds: Sequence[str], *,
                     renderer_folder: str | Path | None = None, settings: CalibrationSettings | None = None,
                     cache: StatisticsCache | None = None, device: str = "cpu", seed: int = 0,
                     log: Callable[[str], None] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The statistics of ``kinds`` for the model in ``model_folder`` on the first ``settings.samples`` lines of
    ``calibration``, rendered with the processor/tokenizer of ``renderer_folder`` (default: the model's own
    folder; a merge passes its skeleton). Reused from ``cache`` when the same model, samples, settings and
    seed were seen before; the model is loaded only when they were not, and freed after."""
    import transformers

    settings = settings or CalibrationSettings()
    renderer_folder = Path(renderer_folder or model_folder)
    vision = getattr(transformers.AutoConfig.from_pretrained(renderer_folder), "vision_config", None) is not None
    samples = load_samples(calibration, limit=settings.samples, images=vision)
    key = statistics_key(model_folder, samples, settings, kinds, seed)
    if cache is not None:
        hit = cache.load(key)
        if hit is not None:
            if log:
                log(f"{model_folder}: statistics reused from {cache.path(key)}")
            return hit
    batches = render_batches(load_renderer(renderer_folder, vision=vision), samples, settings)
    model = load_model(model_folder, device)
    if log:
        log(f"{model_folder}: {len(samples)} samples, {sum(int(b['attention_mask'].sum()) for b in batches)} tokens, "
            f"collecting {', '.join(kinds)}")
    try:
        stats = collect(model, batches, kinds, seed=seed)
    finally:
        del model
    if cache is not None:
        cache.save(key, stats)
    return stats
