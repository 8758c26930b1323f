"""Merging methods: pure functions on aligned tensors, behind a registry.

Every module of this package is imported here, so that a module's ``@register`` decorators run:
adding a method is adding one module (see docs/architecture.md).
"""

import importlib
import pkgutil

from .registry import InputFacts, Method, MethodContext, Param, get_method, list_methods, register

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["InputFacts", "Method", "MethodContext", "Param", "get_method", "list_methods", "register"]
