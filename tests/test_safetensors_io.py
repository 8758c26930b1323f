"""The safetensors reader and streaming writer, against the reference `safetensors` library."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from omnimerge.checkpoints.safetensors_io import DTYPES, SafetensorsFile, StreamingSafetensorsWriter
from omnimerge.errors import OmnimergeError


def sample(dtype: torch.dtype, shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 3).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**31)), min(info.max, 2**31 - 1), shape, generator=g, dtype=torch.int64).to(dtype)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN-safe) with dtype and shape."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def reference_file(tmp_path: Path, tensors: dict, metadata=None) -> Path:
    path = tmp_path / "ref.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    return path


# --- reading ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(DTYPES))
def test_reads_every_dtype(tmp_path, name):
    dtype = DTYPES[name]
    tensors = {
        "matrix": sample(dtype, (5, 7)),
        "scalar": sample(dtype, (), seed=1),
        "empty": sample(dtype, (0, 3)),
        "vector": sample(dtype, (13,), seed=2),
        "stack": sample(dtype, (2, 3, 4), seed=3),
    }
    path = reference_file(tmp_path, tensors, metadata={"format": "pt", "note": name})
    st = SafetensorsFile(path)
    assert st.metadata == {"format": "pt", "note": name}
    assert set(st.tensors) == set(tensors)
    raw = json.loads(path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    for key, want in tensors.items():
        assert raw[key]["dtype"] == name
        info = st.tensors[key]
        assert info.dtype == dtype and info.shape == tuple(want.shape)
        assert info.nbytes == want.numel() * want.element_size()
        got = st.read(key)
        assert same_bytes(got, want), key
    # reading twice gives independent tensors
    a, b = st.read("matrix"), st.read("matrix")
    assert a.data_ptr() != b.data_ptr()


def test_reads_mixed_dtypes_and_no_metadata(tmp_path):
    tensors = {"b": torch.arange(6, dtype=torch.int64).reshape(2, 3), "a": torch.ones(3, dtype=torch.bfloat16),
               "c": torch.tensor(True)}
    path = reference_file(tmp_path, tensors)
    st = SafetensorsFile(path)
    assert st.metadata == {}
    for k, v in tensors.items():
        assert same_bytes(st.read(k), v)


def test_reads_non_ascii_names_and_metadata(tmp_path):
    tensors = {"größe.weight": torch.randn(2, 2)}
    path = reference_file(tmp_path, tensors, metadata={"format": "pt", "autor": "Jürgen"})
    st = SafetensorsFile(path)
    assert st.metadata["autor"] == "Jürgen"
    assert same_bytes(st.read("größe.weight"), tensors["größe.weight"])


# --- writing ------------------------------------------------------------------------------------
def entries_of(tensors: dict) -> list:
    return [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]


def test_writer_output_loads_with_safetensors(tmp_path):
    tensors = {
        "z.first": sample(torch.float32, (4, 3)),
        "a.bf16": sample(torch.bfloat16, (5,), seed=1),
        "scalar": sample(torch.int64, (), seed=2),
        "empty": sample(torch.float16, (0, 8)),
        "mask": sample(torch.bool, (3, 3), seed=3),
        "transposed": sample(torch.float32, (3, 6), seed=4).t(),  # not contiguous
        "f8": sample(torch.float8_e4m3fn, (4,), seed=5),
    }
    assert not tensors["transposed"].is_contiguous()
    path = tmp_path / "out.safetensors"
    w = StreamingSafetensorsWriter(path, entries_of(tensors), metadata={"format": "pt", "who": "omnimerge"})
    assert w.total_bytes == sum(v.numel() * v.element_size() for v in tensors.values())
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert same_bytes(loaded[k], v.contiguous()), k
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "who": "omnimerge"}
        assert same_bytes(f.get_tensor("a.bf16"), tensors["a.bf16"])
    # header padded to 8 bytes; data follows in the declared order
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert n % 8 == 0
    header = json.loads(path.read_bytes()[8:8 + n])
    spans = {k: h["data_offsets"] for k, h in header.items() if k != "__metadata__"}
    order = sorted((begin, k) for k, (begin, end) in spans.items() if end > begin)
    assert [k for _, k in order] == [k for k in tensors if tensors[k].numel()]
    assert path.stat().st_size == 8 + n + w.total_bytes
    # and our own reader agrees
    st = SafetensorsFile(path)
    assert st.metadata == {"format": "pt", "who": "omnimerge"}
    for k, v in tensors.items():
        assert same_bytes(st.read(k), v.contiguous()), k


def test_writer_default_metadata(tmp_path):
    path = tmp_path / "out.safetensors"
    w = StreamingSafetensorsWriter(path, [("x", torch.float32, (2,))])
    w.write("x", torch.tensor([1.0, 2.0]))
    w.close()
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("x").tolist() == [1.0, 2.0]


ENTRIES = [("a", torch.float32, (2, 2)), ("b", torch.bfloat16, (3,))]


@pytest.mark.parametrize("name,tensor", [
    ("b", torch.zeros(3, dtype=torch.bfloat16)),  # out of order
    ("a", torch.zeros(2, 2, dtype=torch.float16)),  # wrong dtype
    ("a", torch.zeros(4, dtype=torch.float32)),  # wrong shape
], ids=["order", "dtype", "shape"])
def test_writer_refuses_what_was_not_declared(tmp_path, name, tensor):
    w = StreamingSafetensorsWriter(tmp_path / "out.safetensors", ENTRIES)
    with pytest.raises(RuntimeError, match="expected a"):
        w.write(name, tensor)
    w.abort()


def test_writer_refuses_second_out_of_order(tmp_path):
    w = StreamingSafetensorsWriter(tmp_path / "out.safetensors", ENTRIES)
    w.write("a", torch.zeros(2, 2))
    with pytest.raises(RuntimeError, match="expected b"):
        w.write("a", torch.zeros(2, 2))
    w.abort()


def test_writer_close_with_missing_tensors(tmp_path):
    path = tmp_path / "out.safetensors"
    w = StreamingSafetensorsWriter(path, ENTRIES)
    w.write("a", torch.zeros(2, 2))
    with pytest.raises(RuntimeError, match="1 tensors were never written"):
        w.close()
    with pytest.raises(Exception):  # the partial file is not a valid safetensors file
        load_file(str(path))


# --- corrupt files ------------------------------------------------------------------------------
@pytest.fixture
def good(tmp_path) -> Path:
    return reference_file(tmp_path, {"w": torch.randn(4, 4), "b": torch.randn(4)}, metadata={"format": "pt"})


def header_of(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n])


def rewrite_header(path: Path, header: dict) -> None:
    """Replace the header by ``header`` (the data bytes stay as they were)."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def refused(path: Path, *words: str) -> str:
    with pytest.raises(OmnimergeError) as e:
        SafetensorsFile(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def test_intact_file_reads(good):
    assert set(SafetensorsFile(good).tensors) == {"w", "b"}


def test_truncated_data(good):
    good.write_bytes(good.read_bytes()[:-10])
    refused(good, "truncated")


def test_truncated_inside_header(good):
    good.write_bytes(good.read_bytes()[:20])
    refused(good, "truncated")


def test_shorter_than_the_length_field(good):
    good.write_bytes(b"\x01\x02\x03")
    refused(good, "8-byte")


def test_header_length_larger_than_file(good):
    data = good.read_bytes()
    good.write_bytes(struct.pack("<Q", len(data)) + data[8:])
    refused(good, "header length", f"{len(data)} bytes")


def test_header_length_absurd(good):
    data = good.read_bytes()
    good.write_bytes(struct.pack("<Q", 2**63) + data[8:])
    refused(good, "header length")


def test_bad_json(good):
    data = bytearray(good.read_bytes())
    data[8:20] = b"{not json!!!"
    good.write_bytes(bytes(data))
    refused(good, "corrupt")


def test_header_not_an_object(good):
    rewrite_header(good, [1, 2, 3])
    refused(good, "not a JSON object")


def test_inconsistent_offsets(good):
    _, header = header_of(good)
    begin, end = header["w"]["data_offsets"]
    header["w"]["data_offsets"] = [begin, end - 4]  # 60 bytes for a 4x4 float32
    rewrite_header(good, header)
    refused(good, "'w'", "inconsistent offsets")


def test_shape_disagrees_with_offsets(good):
    _, header = header_of(good)
    header["b"]["shape"] = [5]
    rewrite_header(good, header)
    refused(good, "'b'", "inconsistent offsets")


def test_negative_offset(good):
    _, header = header_of(good)
    begin, end = header["b"]["data_offsets"]
    header["b"]["data_offsets"] = [-16, end - begin - 16]
    rewrite_header(good, header)
    refused(good, "'b'")


def test_offsets_beyond_the_data(good):
    n, header = header_of(good)
    size = good.stat().st_size - 8 - n
    header["b"]["data_offsets"] = [size, size + 16]
    rewrite_header(good, header)
    refused(good, "'b'", "truncated")


@pytest.mark.parametrize("mutate", [
    lambda h: h["w"].update(dtype="F7"),
    lambda h: h["w"].pop("shape"),
    lambda h: h["w"].update(data_offsets="0-64"),
], ids=["dtype", "no-shape", "offsets-type"])
def test_corrupt_entry(good, mutate):
    _, header = header_of(good)
    mutate(header)
    rewrite_header(good, header)
    refused(good, "'w'", "corrupt")


def test_missing_file(tmp_path):
    refused(tmp_path / "nope.safetensors")
