"""Merging methods: pure functions on aligned tensors, behind a registry."""

from .registry import Method, MethodContext, Param, get_method, list_methods, register
from . import basic  # noqa: F401  (registers average, task_arithmetic)
from . import gta  # noqa: F401  (registers ties, dare_*, breadcrumbs*, della*)
from . import asdf  # noqa: F401  (registers asdf)
from . import spectral  # noqa: F401  (registers tsv, iso_c, iso_cts)
from . import wudi  # noqa: F401  (registers wudi, wudi2, swudi, aswudi)
from . import interpolation  # noqa: F401  (registers slerp, model_stock)

__all__ = ["Method", "MethodContext", "Param", "get_method", "list_methods", "register"]
