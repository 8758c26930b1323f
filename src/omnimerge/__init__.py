"""omnimerge: merge the weights of multimodal LLMs."""

__version__ = "0.1.0"

from .errors import OmnimergeError  # noqa: E402
from .recipe import Recipe, load_recipe, parse_recipe  # noqa: E402


def merge(recipe, out=None, **kwargs):
    """Merge per ``recipe`` into ``out``; see :func:`omnimerge.engine.merge`."""
    from .engine import merge as _merge

    return _merge(recipe, out, **kwargs)


__all__ = ["OmnimergeError", "Recipe", "load_recipe", "merge", "parse_recipe", "__version__"]
