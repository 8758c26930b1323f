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
import stat
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
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100_000_000  # the safetensors library's limit on the JSON header
MAX_BYTES = 2**64 - 1  # offsets and sizes are unsigned 64-bit in the format


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    nbytes: int


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class HeaderError(ValueError):
    """What is wrong with a safetensors header (the file's path is added by the caller)."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise HeaderError(f"the name '{k}' appears twice in the header")
        out[k] = v
    return out


def _no_constant(name: str):
    raise HeaderError(f"the header holds {name}, which is not JSON")


def header_length(head: bytes, size: int) -> int:
    """The JSON header's length from the file's first 8 bytes, checked against the file's ``size``."""
    if len(head) < 8:
        raise HeaderError(f"the file is {size} bytes long, shorter than the 8-byte header length that starts a "
                          "safetensors file")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or 8 + n > size:
        what = "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "data"
        raise HeaderError(f"its first 8 bytes are {what}, not the header length of a safetensors file of {size} "
                          "bytes (the file is in another format, or it is truncated)")
    if n < 2:
        raise HeaderError(f"the header is {n} byte(s) long, too short for a JSON object")
    return n


def parse_header(raw: bytes, data_len: int) -> tuple[dict[str, str], dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]]:
    """Validate a safetensors JSON header as strictly as the safetensors library does.

    Returns (metadata, {name: (dtype, shape, begin, end)}) with offsets relative to the data section
    of ``data_len`` bytes. Raises :class:`HeaderError` naming what is wrong: not UTF-8 JSON, not an
    object, duplicate names, ``__metadata__`` that is not string to string, an unknown dtype, a
    shape that is not a list of non-negative integers, offsets that are not two ordered integers,
    a byte count that disagrees with dtype × shape or overflows, tensors that overlap or leave
    gaps, or data that does not end where the file does.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderError(f"the header is not UTF-8 ({e.reason} at byte {e.start})") from None
    if not text.startswith("{"):
        raise HeaderError("the header is not a JSON object (it does not start with '{')")
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except HeaderError:
        raise
    except (ValueError, RecursionError) as e:
        raise HeaderError(f"the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise HeaderError("the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError("__metadata__ must map strings to strings")
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
    for name, spec in header.items():
        tensors[name] = _entry(name, spec)
    for name, (_, _, begin, end) in tensors.items():
        if end > data_len:
            raise HeaderError(f"tensor '{name}' ends at data byte {end}, the file holds only {data_len} data bytes; "
                              "the file is truncated")
    expected = 0  # tensors sorted by offset must tile the data section exactly
    for name, (_, _, begin, end) in sorted(tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != expected:
            what = "overlaps the tensor before it" if begin < expected else f"leaves a gap of {begin - expected} bytes"
            raise HeaderError(f"tensor '{name}' starts at data byte {begin}, which {what} (tensors must follow each "
                              "other without gaps or overlaps)")
        expected = end
    if expected != data_len:
        if expected > data_len:
            raise HeaderError(f"the tensors need {expected} data bytes, the file holds only {data_len}; the file is "
                              "truncated")
        raise HeaderError(f"the tensors take {expected} data bytes, the file holds {data_len}: "
                          f"{data_len - expected} bytes belong to no tensor")
    return metadata, tensors


def _entry(name: str, spec) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    if not isinstance(spec, dict):
        raise HeaderError(f"tensor '{name}': its entry is a {type(spec).__name__}, not an object with dtype, shape "
                          "and data_offsets")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in spec]
    if missing:
        raise HeaderError(f"tensor '{name}': the entry lacks {', '.join(missing)}")
    dtype_name, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise HeaderError(f"tensor '{name}': unknown dtype {dtype_name!r} (known: {', '.join(DTYPES)})")
    dtype = DTYPES[dtype_name]
    if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
        raise HeaderError(f"tensor '{name}': shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(x) and 0 <= x <= MAX_BYTES
                                                                        for x in offsets)):
        raise HeaderError(f"tensor '{name}': data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    if end < begin:
        raise HeaderError(f"tensor '{name}': data_offsets [{begin}, {end}] end before they begin")
    nbytes = _element_size(dtype)
    for s in shape:
        nbytes *= s
        if nbytes > MAX_BYTES:
            raise HeaderError(f"tensor '{name}': shape {shape} overflows (more bytes than a file can hold)")
    if end - begin != nbytes:
        raise HeaderError(f"tensor '{name}' has inconsistent offsets: [{begin}, {end}] spans {end - begin} bytes, "
                          f"its {dtype_name} shape {shape} needs {nbytes}")
    return dtype, tuple(shape), begin, end


class SafetensorsFile:
    """Header of one safetensors file, validated against the file size; reads tensors on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            if not stat.S_ISREG(os.stat(self.path).st_mode):  # a FIFO or a device would block or never end
                raise HeaderError("it is not a regular file")
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                n = header_length(f.read(8), size)
                raw = f.read(n)
            self.metadata, entries = parse_header(raw, size - 8 - n)
        except HeaderError as e:
            raise OmnimergeError(f"{self.path}: corrupt safetensors file: {e}. Download or save it again") from None
        except OSError as e:
            raise OmnimergeError(f"{self.path}: cannot be read ({e.strerror or e})") from None
        data_start = 8 + n
        self.size = size
        self.tensors: dict[str, TensorInfo] = {
            name: TensorInfo(dtype, shape, data_start + begin, end - begin)
            for name, (dtype, shape, begin, end) in entries.items()
        }

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` (or only its rows ``rows[0]:rows[1]`` of the first dimension), as a fresh tensor."""
        info = self.tensors[name]
        shape, start, nbytes = info.shape, info.start, info.nbytes
        if rows is not None:
            lo, hi = max(0, min(rows[0], shape[0])), max(0, min(rows[1], shape[0]))
            hi = max(lo, hi)
            row_bytes = info.nbytes // shape[0] if shape[0] else 0
            shape, start, nbytes = (hi - lo, *shape[1:]), start + lo * row_bytes, (hi - lo) * row_bytes
        out = torch.empty(shape, dtype=info.dtype)
        if nbytes == 0:
            return out
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise OmnimergeError(f"{self.path}: cannot be read ({e.strerror or e})") from None
        try:
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [buf[done:]], start + done)
                if got <= 0:
                    raise OmnimergeError(f"{self.path}: unexpected end of file while reading tensor '{name}'; the "
                                         "file was truncated after it was opened")
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
        self._rows = 0  # rows of the next tensor written so far (write_rows)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The next tensor, whole."""
        want_name, want_dtype, want_shape = self._order[self._next]
        if self._rows or name != want_name or tensor.dtype != want_dtype or tuple(tensor.shape) != want_shape:
            raise RuntimeError(
                f"writer expected {want_name} {want_dtype} {want_shape}, got {name} {tensor.dtype} {tuple(tensor.shape)}"
            )
        self._append(tensor)
        self._next += 1

    def write_rows(self, name: str, rows: torch.Tensor) -> bool:
        """The next rows (of the first dimension) of the next tensor, in order; returns True once the
        tensor is complete. A tensor may be written in any number of such pieces."""
        want_name, want_dtype, want_shape = self._order[self._next]
        if (name != want_name or rows.dtype != want_dtype or rows.ndim != len(want_shape) or not want_shape
                or tuple(rows.shape[1:]) != want_shape[1:] or self._rows + rows.shape[0] > want_shape[0]):
            raise RuntimeError(f"writer expected rows {self._rows}.. of {want_name} {want_dtype} {want_shape}, got "
                               f"{name} {rows.dtype} {tuple(rows.shape)}")
        self._append(rows)
        self._rows += rows.shape[0]
        if self._rows < want_shape[0]:
            return False
        self._rows = 0
        self._next += 1
        return True

    def _append(self, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))

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
