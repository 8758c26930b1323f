"""Merging methods: pure functions on aligned tensors, behind a registry."""

from .registry import InputFacts, Method, MethodContext, Param, get_method, list_methods, register
from . import basic  # noqa: F401  (registers average, task_arithmetic, ties, dare_*)
from . import asdf  # noqa: F401  (registers asdf)
from . import spectral  # noqa: F401  (registers tsv, iso_c, iso_cts)
from . import wudi  # noqa: F401  (registers wudi, wudi2, swudi, aswudi)
from . import mergekit  # noqa: F401  (registers slerp, model_stock, breadcrumbs*, della*)
from . import data_aware  # noqa: F401  (registers regmean, fisher: they learn from calibration samples)

__all__ = ["InputFacts", "Method", "MethodContext", "Param", "get_method", "list_methods", "register"]
