"""A checkpoint's model as transformers builds it: the class its config.json names."""

from __future__ import annotations

from ..errors import OmnimergeError


def model_class(config: dict):
    """The transformers model class of the first of ``config``'s ``architectures`` that transformers provides
    (a name that is not a model class — a function, a config class — is passed over, whatever the file says)."""
    import transformers  # (a few seconds: only where a model is built)

    archs = config.get("architectures") or []
    for name in archs if isinstance(archs, list) else []:
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    raise OmnimergeError(f"config.json names architectures {archs}, none of which transformers provides here")
