"""Uncertainty of the bench's accuracies: a paired bootstrap over each task's test items.

Every model is scored on the same test items, so one set of resamples (per task, ``n_resamples``
draws of its items with replacement) serves every model: differences between two models, and ratios
such as the gain recovered, are bootstrapped on the same draws (a paired bootstrap), which is what
makes a small difference between two merges measurable at all. Tasks are resampled independently;
an average over tasks is the mean of the per-task resampled accuracies.

95 % intervals are the 2.5th and 97.5th percentiles of the resampled statistic.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

__all__ = ["Bootstrap", "interval"]


def interval(samples: torch.Tensor, level: float = 0.95) -> list[float]:
    """The central ``level`` percentile interval of ``samples`` (NaN draws left out)."""
    samples = samples[~torch.isnan(samples)]
    if samples.numel() == 0:
        return [float("nan"), float("nan")]
    lo, hi = torch.quantile(samples.double(), torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.double))
    return [float(lo), float(hi)]


class Bootstrap:
    """Paired bootstrap resamples of test items, one index matrix per (task, number of items)."""

    def __init__(self, n_resamples: int = 1000, seed: int = 0):
        self.n_resamples = n_resamples
        self.seed = seed
        self._idx: dict[tuple[str, int], torch.Tensor] = {}

    def _indices(self, task: str, n: int) -> torch.Tensor:
        if (task, n) not in self._idx:
            g = torch.Generator().manual_seed(self.seed + sum(map(ord, task)) * 7919 + n)
            self._idx[(task, n)] = torch.randint(0, n, (self.n_resamples, n), generator=g)
        return self._idx[(task, n)]

    def accuracy(self, task: str, scores: Sequence[int]) -> torch.Tensor:
        """``n_resamples`` resampled accuracies of per-item ``scores`` (0/1) on ``task``."""
        s = torch.as_tensor(list(scores), dtype=torch.float32)
        if s.numel() == 0:
            return torch.full((self.n_resamples,), float("nan"))
        return s[self._indices(task, s.numel())].mean(dim=1)

    def average(self, scores: dict[str, Sequence[int]], tasks: Sequence[str]) -> torch.Tensor:
        """Resampled mean over ``tasks`` of the per-task accuracies."""
        return torch.stack([self.accuracy(t, scores[t]) for t in tasks]).mean(dim=0)

    def ci(self, task: str, scores: Sequence[int], level: float = 0.95) -> list[float]:
        return interval(self.accuracy(task, scores), level)

    def ci_of(self, statistic: Callable[[], torch.Tensor], level: float = 0.95) -> list[float]:
        """Interval of any statistic built from this object's resamples (e.g. a ratio of averages)."""
        return interval(statistic(), level)


def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """Element-wise num / den, NaN where den is 0."""
    out = num / den
    out[den == 0] = math.nan
    return out
