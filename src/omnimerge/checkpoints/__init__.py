"""Reading inputs lazily and writing outputs atomically."""

from .checkpoint import Checkpoint, load_checkpoint, resolve_path, text_config

__all__ = ["Checkpoint", "load_checkpoint", "resolve_path", "text_config"]
