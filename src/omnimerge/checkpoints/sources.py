"""Tensor sources: the raw tensors of a checkpoint, read lazily one at a time."""

from __future__ import annotations

import json
import os
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

    def read_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the first dimension, as a fresh tensor (sources that can read a part
        alone override this; the default reads the whole tensor)."""
        return self.read(key)[start:stop].clone()

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
                if k in self._where:
                    raise OmnimergeError(f"{path}: tensor '{k}' is in both {self._where[k].path.name} and {f.name}; "
                                         "a checkpoint holds each tensor once — download or save it again")
                self._where[k] = st

    def keys(self):
        return list(self._where)

    def info(self, key):
        t = self._where[key].tensors[key]
        return t.dtype, t.shape

    def read(self, key):
        return self._where[key].read(key)

    def read_rows(self, key, start, stop):
        return self._where[key].read(key, rows=(start, stop))

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

    def read_rows(self, key, start, stop):
        return self._tensors[key][start:stop].clone()

    def describe(self, key):
        return f"{self._file[key]} [{key}]"


def confinement_root(folder: Path) -> Path:
    """The folder whose files a model folder may use: the folder itself, or for a snapshot in the
    Hugging Face cache (``models--org--name/snapshots/<rev>``, whose files link to ``../../blobs``)
    the model's cache folder."""
    real = Path(os.path.realpath(folder))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith(("models--", "datasets--")):
        return real.parent.parent
    return real


def confined_file(folder: Path, name: object, named_by: str) -> Path:
    """``folder / name`` after checking that it stays inside ``folder`` (see ``confinement_root``):
    ``name`` must be a relative path without ``..``, and the file it reaches, links followed, must
    lie inside the folder. ``named_by`` says what named the file, for the message."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise OmnimergeError(f"{named_by}: names the file {name!r}, which is not a file name")
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts or name.startswith("~"):
        raise OmnimergeError(f"{named_by}: names the file '{name}', outside the model folder {folder}; a model "
                             "folder may only use files inside it (no absolute paths, no '..')")
    path = folder / name
    root = confinement_root(folder)
    real = Path(os.path.realpath(path))
    if real != root and root not in real.parents:
        raise OmnimergeError(f"{named_by}: '{name}' is a link to {real}, outside the model folder {folder}; a model "
                             "folder may only use files inside it — copy the file into the folder instead of linking")
    return path


def confined_files(folder: Path, paths: list[Path], what: str) -> list[Path]:
    """``paths`` (found in ``folder``) checked by ``confined_file``."""
    return [confined_file(folder, p.name, f"{folder}: {what}") for p in paths]


def _index_files(index: Path, suffixes: tuple[str, ...]) -> tuple[list[Path], dict[str, str]]:
    """The shard files an index names (checked to lie in its folder) and its weight_map."""
    try:
        data = json.loads(confined_file(index.parent, index.name, str(index.parent)).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise OmnimergeError(f"{index}: not a valid shard index ({e}); save the model again") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise OmnimergeError(f"{index}: not a valid shard index: it needs a 'weight_map' object mapping tensor "
                             f"names to shard files, found {type(weight_map).__name__}; save the model again")
    for key, shard in weight_map.items():
        if not isinstance(shard, str):
            raise OmnimergeError(f"{index}: weight_map maps '{key}' to {shard!r}, not to a shard file name")
    files = []
    for name in dict.fromkeys(weight_map.values()):
        f = confined_file(index.parent, name, str(index))
        if not name.endswith(suffixes):
            raise OmnimergeError(f"{index}: lists shard '{name}', which is not a {' or '.join(suffixes)} file")
        if not f.is_file():
            raise OmnimergeError(f"{index}: lists shard {name}, which is missing from {index.parent}")
        files.append(f)
    return files, weight_map


def _check_weight_map(index: Path, weight_map: dict[str, str], source: "SafetensorsSource") -> None:
    """Every tensor the index names lies in the shard it names."""
    for key, shard in weight_map.items():
        st = source._where.get(key)
        if st is None:
            raise OmnimergeError(f"{index}: names tensor '{key}' in {shard}, but no shard holds it; the checkpoint is "
                                 "incomplete — download or save it again")
        if st.path != index.parent / shard:
            raise OmnimergeError(f"{index}: names tensor '{key}' in {shard}, but it is in {st.path.name}; the index "
                                 "does not match the shards — download or save the model again")


def open_weights(folder: Path, allow_pickle: bool) -> TensorSource:
    """Open the weights of a Hugging Face model folder (safetensors preferred). Every file read lies
    inside ``folder`` (see ``confined_file``)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files, weight_map = _index_files(index, (".safetensors",))
        source = SafetensorsSource(files, folder)
        _check_weight_map(index, weight_map, source)
        return source
    single = folder / "model.safetensors"
    if single.is_file():
        return SafetensorsSource(confined_files(folder, [single], "weights"), folder)
    others = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if others:
        return SafetensorsSource(confined_files(folder, others, "weights"), folder)
    pindex = folder / "pytorch_model.bin.index.json"
    pickles = _index_files(pindex, PICKLE_SUFFIXES)[0] if pindex.is_file() else confined_files(folder, sorted(
        p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()
    ), "weights")
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


def damaged_weights(folder: Path) -> str | None:
    """Why the weight files of a model folder cannot be read, naming the shard (a missing, truncated
    or corrupt shard, an index that does not match), or None when every header is sound. Reads
    headers only. A report.json beside them (an omnimerge output) also names the shards to expect."""
    report = folder / "report.json"
    try:
        tensors = json.loads(report.read_text(encoding="utf-8")).get("tensors") if report.is_file() else None
    except (OSError, ValueError, AttributeError):
        tensors = None
    if isinstance(tensors, dict):
        shards = {t.get("shard") for t in tensors.values() if isinstance(t, dict) and isinstance(t.get("shard"), str)}
        for name in sorted(shards):
            if not (folder / name).is_file():
                return f"{folder / name}: missing — report.json says it holds tensors of this model"
    try:
        open_weights(folder, allow_pickle=False)
    except OmnimergeError as e:
        return str(e)
    return None
