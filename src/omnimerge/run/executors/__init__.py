"""Who runs the streaming loop: threads on this machine, or workers of a Ray cluster."""

from ...errors import OmnimergeError
from ..options import EXECUTORS
from .local import LocalExecutor
from .ray import RayExecutor, require_ray


def make_executor(name: str, *, address: str | None = None):
    if name == "local":
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address)
    raise OmnimergeError(f"unknown executor '{name}'; use {' or '.join(EXECUTORS)}")


__all__ = ["LocalExecutor", "RayExecutor", "make_executor", "require_ray"]
