"""A checkpoint's model as transformers builds it: the class its config.json names."""

from __future__ import annotations

from ..errors import OmnimergeError


def model_class(config: dict):
    """The transformers class of the first of ``config``'s ``architectures`` that transformers provides."""
    import transformers  # (a few seconds: only where a model is built)

    archs = config.get("architectures") or []
    for name in archs:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise OmnimergeError(f"config.json names architectures {archs}, none of which transformers provides here")
