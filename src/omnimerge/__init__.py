"""omnimerge: merge the weights of multimodal LLMs."""

from .errors import OmnimergeError
from .recipe import Recipe, load_recipe, parse_recipe
from .version import __version__


def merge(recipe, out=None, **kwargs):
    """Merge per ``recipe`` into ``out``; see :func:`omnimerge.api.merge`."""
    from .api import merge as _merge  # (the API imports torch: ``import omnimerge`` stays light)

    return _merge(recipe, out, **kwargs)


def extract(model, base, out=None, **kwargs):
    """Write ``model`` − ``base`` as a PEFT LoRA adapter over ``base``; see :func:`omnimerge.api.extract`."""
    from .api import extract as _extract

    return _extract(model, base, out, **kwargs)


__all__ = ["OmnimergeError", "Recipe", "extract", "load_recipe", "merge", "parse_recipe", "__version__"]
