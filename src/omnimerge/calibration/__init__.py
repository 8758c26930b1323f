"""Calibration: unlabeled samples per model and the statistics data-aware methods merge with.

:mod:`.data` loads and validates a calibration JSONL; :mod:`.collect` runs one model on its samples and
collects input Grams and diagonal Fishers, keyed by canonical keys, cached on disk;
:func:`model_statistics` is the whole stage for one model.
"""

from .collect import KINDS, StatisticsCache, collect, fisher_norm, statistics_key
from .data import CalibrationSettings, Sample, load_samples
from .stage import StatsSource, attach_statistics, default_stats_dir, model_statistics

__all__ = ["KINDS", "CalibrationSettings", "Sample", "StatisticsCache", "collect", "fisher_norm", "load_samples",
           "model_statistics", "statistics_key", "StatsSource", "attach_statistics", "default_stats_dir"]
