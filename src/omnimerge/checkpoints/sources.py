"""Tensor sources: the raw tensors of a checkpoint, read lazily one at a time."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import OmnimergeError
from .safetensors_io import SafetensorsFile

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class TensorSource:
    """Raw keys -> (dtype, shape), and a ``read`` that returns a fresh CPU tensor."""

    path: Path

    def keys(self) -> list[str]:
        raise NotImplementedError

    def info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        raise NotImplementedError

    def read(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def describe(self, key: str) -> str:
        """Where a tensor lives, for error messages."""
        return f"{self.path} [{key}]"


class SafetensorsSource(TensorSource):
    """One or several safetensors files (sharded with an index, or a single file)."""

    def __init__(self, files: list[Path], path: Path):
        self.path = path
        self._where: dict[str, SafetensorsFile] = {}
        for f in files:
            st = SafetensorsFile(f)
            for k in st.tensors:
                self._where[k] = st

    def keys(self):
        return list(self._where)

    def info(self, key):
        t = self._where[key].tensors[key]
        return t.dtype, t.shape

    def read(self, key):
        return self._where[key].read(key)

    def describe(self, key):
        return f"{self._where[key].path} [{key}]"


class PickleSource(TensorSource):
    """PyTorch pickles, loaded with ``weights_only=True`` (only when the user allows pickles)."""

    def __init__(self, files: list[Path], path: Path):
        self.path = path
        self._tensors: dict[str, torch.Tensor] = {}
        self._file: dict[str, Path] = {}
        for f in files:
            try:
                try:
                    sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:
                    sd = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - torch raises many kinds here
                raise OmnimergeError(f"{f}: cannot be read as a PyTorch state dict ({type(e).__name__}: {e})") from None
            if not isinstance(sd, dict):
                raise OmnimergeError(f"{f}: holds a {type(sd).__name__}, not a state dict of tensors")
            for k, v in sd.items():
                if isinstance(v, torch.Tensor):
                    self._tensors[k] = v
                    self._file[k] = f

    def keys(self):
        return list(self._tensors)

    def info(self, key):
        t = self._tensors[key]
        return t.dtype, tuple(t.shape)

    def read(self, key):
        return self._tensors[key].clone()

    def describe(self, key):
        return f"{self._file[key]} [{key}]"


def _index_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OmnimergeError(f"{index}: not a valid shard index ({e})") from None
    files = [index.parent / name for name in dict.fromkeys(weight_map.values())]
    for f in files:
        if not f.is_file():
            raise OmnimergeError(f"{index}: lists shard {f.name}, which is missing from {index.parent}")
    return files


def open_weights(folder: Path, allow_pickle: bool) -> TensorSource:
    """Open the weights of a Hugging Face model folder (safetensors preferred)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return SafetensorsSource(_index_files(index), folder)
    single = folder / "model.safetensors"
    if single.is_file():
        return SafetensorsSource([single], folder)
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return SafetensorsSource(others, folder)
    pindex = folder / "pytorch_model.bin.index.json"
    pickles = _index_files(pindex) if pindex.is_file() else sorted(
        p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()
    )
    if pickles:
        if not allow_pickle:
            raise OmnimergeError(
                f"{folder}: holds only pickled weights ({', '.join(p.name for p in pickles[:3])}). Pickles can run "
                "arbitrary code when loaded; convert them to safetensors, or pass --allow-pickle (read with "
                "torch.load(weights_only=True)) if you trust the source"
            )
        return PickleSource(pickles, folder)
    raise OmnimergeError(
        f"{folder}: not a checkpoint — no model.safetensors, sharded *.safetensors with an index, or adapter "
        "files found"
    )
