"""A small safetensors reader and streaming writer that never memory-map a whole file.

Reading uses positioned reads into a fresh tensor, so resident memory holds only the tensors
being worked on (a memory-mapped file would count every touched page). Writing streams tensors
into a file whose header is known in advance (every shape and dtype is known at plan time).
Files follow the safetensors format: an 8-byte little-endian header length, a JSON header with
``{name: {dtype, shape, data_offsets}}`` and ``__metadata__``, then the raw little-endian data.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import OmnimergeError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    nbytes: int


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class SafetensorsFile:
    """Header of one safetensors file, validated against the file size; reads tensors on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("file shorter than the 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER or 8 + n > size:
                    raise ValueError(f"header length {n} does not fit in a file of {size} bytes")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise OmnimergeError(
                f"{self.path}: not a readable safetensors file ({e}); the file is truncated or corrupt — "
                "download or save it again"
            ) from None
        if not isinstance(header, dict):
            raise OmnimergeError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.tensors: dict[str, TensorInfo] = {}
        data_start, data_len = 8 + n, size - 8 - n
        end_max = 0
        for name, spec in header.items():
            try:
                dtype = DTYPES[spec["dtype"]]
                shape = tuple(int(s) for s in spec["shape"])
                begin, end = (int(x) for x in spec["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise OmnimergeError(
                    f"{self.path}: corrupt safetensors header entry for tensor '{name}' ({spec!r})"
                ) from None
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * _element_size(dtype) or begin < 0:
                raise OmnimergeError(f"{self.path}: tensor '{name}' has inconsistent offsets in the header")
            if end > data_len:
                raise OmnimergeError(
                    f"{self.path}: tensor '{name}' ends at byte {end} but the file holds only {data_len} "
                    "data bytes; the file is truncated — download or save it again"
                )
            end_max = max(end_max, end)
            self.tensors[name] = TensorInfo(dtype, shape, data_start + begin, end - begin)

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes == 0:
            return out
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < info.nbytes:
                got = os.preadv(fd, [buf[done:]], info.start + done)
                if got <= 0:
                    raise OmnimergeError(f"{self.path}: unexpected end of file while reading tensor '{name}'")
                done += got
        finally:
            os.close(fd)
        return out


def tensor_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = _element_size(dtype)
    for s in shape:
        n *= s
    return n


class StreamingSafetensorsWriter:
    """Writes one safetensors file whose tensors (names, dtypes, shapes, order) are known up front.

    Tensors must be written in the declared order; ``close`` checks that all were written.
    """

    def __init__(self, path: str | os.PathLike, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._order: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for name, dtype, shape in entries:
            nbytes = tensor_nbytes(dtype, shape)
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            self._order.append((name, dtype, tuple(shape)))
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.total_bytes = offset
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, want_dtype, want_shape = self._order[self._next]
        if name != want_name or tensor.dtype != want_dtype or tuple(tensor.shape) != want_shape:
            raise RuntimeError(
                f"writer expected {want_name} {want_dtype} {want_shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            self._f.close()
            raise RuntimeError(f"{self.path}: {len(self._order) - self._next} tensors were never written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
