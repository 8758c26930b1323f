"""Task-vector statistics and plots: what a user looks at before choosing a method."""

from .stats import analyze, tensor_stats

__all__ = ["analyze", "tensor_stats"]
