"""Property-based tests: mutated safetensors headers and files are read correctly or refused.

Every mutation of a valid file must give one of two outcomes: omnimerge's reader refuses it with
an OmnimergeError naming the file, or it reads exactly the tensors that the reference
`safetensors` library reads from the same bytes. Reading something the library refuses, or
reading other bytes than it does, fails the test.

The number of examples is small in CI (the whole file stays well under a minute); set
``OMNIMERGE_FUZZ_EXAMPLES`` (e.g. 5000) for a longer, nightly-style run, which also enables the
tests marked ``slow``.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from omnimerge.checkpoints.safetensors_io import DTYPES, SafetensorsFile
from omnimerge.errors import OmnimergeError

NIGHTLY = int(os.environ.get("OMNIMERGE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=NIGHTLY or 300, deadline=None, derandomize=not NIGHTLY,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
slow = pytest.mark.skipif(not NIGHTLY, reason="nightly: set OMNIMERGE_FUZZ_EXAMPLES to run")

TENSORS = {
    "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b": torch.arange(6, dtype=torch.int16),
    "c": torch.ones(2, 2, dtype=torch.bfloat16),
}


def valid_file() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.safetensors"
        save_file(TENSORS, str(path), metadata={"format": "pt"})
        return path.read_bytes()


VALID = valid_file()
HEADER_LEN = struct.unpack("<Q", VALID[:8])[0]
HEADER = json.loads(VALID[8:8 + HEADER_LEN])
DATA = VALID[8 + HEADER_LEN:]


def reference(path: Path) -> dict[str, torch.Tensor] | None:
    """What the safetensors library reads from ``path``; None when it refuses the file."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # noqa: BLE001 - the library raises several kinds; any means "refused"
        return None


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def check_against_reference(path: Path) -> str:
    """Read ``path`` with omnimerge; 'refused' or 'read' — and a read must equal the library's."""
    try:
        f = ours = SafetensorsFile(path)
    except OmnimergeError as e:
        assert str(path) in str(e) and "Traceback" not in str(e)
        return "refused"
    ref = reference(path)
    assert ref is not None, f"omnimerge read a file the safetensors library refuses: {path.read_bytes()[:300]!r}"
    assert set(ours.tensors) == set(ref)
    for name, want in ref.items():
        assert same(f.read(name), want), name
    return "read"


def with_header(header, data: bytes = DATA, pad: bool = True) -> bytes:
    raw = (header if isinstance(header, bytes) else json.dumps(header).encode())
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


# --- strategies ---------------------------------------------------------------------------------
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                        st.text(max_size=6))
json_value = st.recursive(json_scalar, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                               st.dictionaries(st.text(max_size=4), kids, max_size=3)),
                          max_leaves=6)
dims = st.one_of(st.integers(-3, 20), st.sampled_from([2**31, 2**62, 2**64, 2**70]), st.floats(0, 8),
                 st.booleans(), st.text(max_size=2))
offset = st.one_of(st.integers(-10, 200), st.sampled_from([2**63, 2**64 - 1, 2**64, 2**66]), st.floats(0, 100),
                   st.none())


@st.composite
def field_mutation(draw):
    """A header with one field of one tensor (or the metadata) changed."""
    header = json.loads(json.dumps(HEADER))
    name = draw(st.sampled_from(sorted(TENSORS)))
    kind = draw(st.sampled_from(["dtype", "shape", "shape_dim", "offsets", "offset", "same_offsets", "swap_offsets",
                                 "drop", "extra", "entry", "metadata", "metadata_value", "rename"]))
    spec = header[name]
    if kind == "dtype":
        spec["dtype"] = draw(st.one_of(st.sampled_from(list(DTYPES) + ["F7", "f32", "", "C64", "F4"]), json_value))
    elif kind == "shape":
        spec["shape"] = draw(st.one_of(st.lists(dims, max_size=4), json_value))
    elif kind == "shape_dim" and spec["shape"]:
        i = draw(st.integers(0, len(spec["shape"]) - 1))
        spec["shape"][i] = draw(dims)
    elif kind == "offsets":
        spec["data_offsets"] = draw(st.one_of(st.lists(offset, min_size=0, max_size=3), json_value))
    elif kind == "offset":
        spec["data_offsets"][draw(st.integers(0, 1))] = draw(offset)
    elif kind == "same_offsets":  # two tensors claim the same bytes
        other = draw(st.sampled_from(sorted(set(TENSORS) - {name})))
        spec["data_offsets"] = list(header[other]["data_offsets"])
        if draw(st.booleans()):
            spec["dtype"], spec["shape"] = header[other]["dtype"], list(header[other]["shape"])
    elif kind == "swap_offsets":
        other = draw(st.sampled_from(sorted(set(TENSORS) - {name})))
        spec["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], spec["data_offsets"]
    elif kind == "drop":
        spec.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])))
    elif kind == "extra":
        spec[draw(st.text(max_size=5))] = draw(json_value)
    elif kind == "entry":
        header[name] = draw(json_value)
    elif kind == "metadata":
        header["__metadata__"] = draw(json_value)
    elif kind == "metadata_value":
        header["__metadata__"]["format"] = draw(json_value)
    elif kind == "rename":
        header[draw(st.text(max_size=8))] = header.pop(name)
    return header


@st.composite
def byte_mutation(draw):
    """The valid file with bytes flipped, cut, inserted or its length field changed."""
    data = bytearray(VALID)
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "length", "header_byte"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    elif kind == "truncate":
        del data[draw(st.integers(0, len(data) - 1)):]
    elif kind == "insert":
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "length":
        data[:8] = struct.pack("<Q", draw(st.one_of(st.integers(0, 2 * len(VALID)), st.integers(0, 2**64 - 1))))
    else:  # a byte of the JSON header replaced by a structural character
        i = draw(st.integers(8, 8 + HEADER_LEN - 1))
        data[i] = ord(draw(st.sampled_from(list('{}[]",:0-9 e\\'))))
    return bytes(data)


# --- properties ---------------------------------------------------------------------------------
@FUZZ
@given(header=field_mutation(), pad=st.booleans())
def test_mutated_header_fields_are_read_exactly_or_refused(tmp_path, header, pad):
    path = tmp_path / "m.safetensors"
    path.write_bytes(with_header(header, pad=pad))
    check_against_reference(path)


@FUZZ
@given(data=byte_mutation())
def test_mutated_bytes_are_read_exactly_or_refused(tmp_path, data):
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    check_against_reference(path)


@slow
@settings(max_examples=max(NIGHTLY, 1), deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.binary(max_size=512))
def test_arbitrary_bytes_are_read_exactly_or_refused(tmp_path, data):
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    check_against_reference(path)


# --- the cases the property covers, spelled out --------------------------------------------------
def refused(tmp_path: Path, data: bytes, *words: str, stricter: bool = False) -> str:
    """Refused by omnimerge, naming the file and ``words``; the library refuses it too unless
    omnimerge is meant to be ``stricter`` (duplicate names, which the library resolves silently)."""
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    with pytest.raises(OmnimergeError) as e:
        SafetensorsFile(path)
    msg = str(e.value)
    assert str(path) in msg
    for w in words:
        assert w in msg, (w, msg)
    if not stricter:
        assert reference(path) is None, "the library reads this file: omnimerge must too"
    return msg


def mutated(**changes) -> dict:
    header = json.loads(json.dumps(HEADER))
    for name, fields in changes.items():
        header[name].update(fields)
    return header


def test_two_tensors_on_the_same_bytes(tmp_path):
    header = mutated(b={"dtype": HEADER["a"]["dtype"], "shape": HEADER["a"]["shape"],
                        "data_offsets": HEADER["a"]["data_offsets"]})
    refused(tmp_path, with_header(header), "overlaps")


def test_overlapping_tensors(tmp_path):
    begin, end = HEADER["b"]["data_offsets"]
    header = mutated(b={"data_offsets": [begin - 2, end - 2]})
    refused(tmp_path, with_header(header), "'b'")


def test_a_gap_between_tensors(tmp_path):
    header = {"x": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
              "y": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}}
    refused(tmp_path, with_header(header, b"\0" * 6), "'y'", "gap")


def test_bytes_that_belong_to_no_tensor(tmp_path):
    refused(tmp_path, with_header(HEADER, DATA + b"\0" * 8), "belong to no tensor")


def test_duplicate_names(tmp_path):
    raw = json.dumps(HEADER)
    entry = json.dumps({"a": HEADER["a"]})[1:-1]
    refused(tmp_path, with_header(raw[:-1].encode() + b", " + entry.encode() + b"}"), "'a'", "twice", stricter=True)


@pytest.mark.parametrize("shape", [[-1, 4], [3.0, 4], [True, 4], ["3", 4], 12])
def test_bad_dimensions(tmp_path, shape):
    refused(tmp_path, with_header(mutated(a={"shape": shape})), "'a'", "shape")


def test_dimensions_whose_product_overflows(tmp_path):
    header = mutated(a={"shape": [2**32, 2**32, 2**32]})
    refused(tmp_path, with_header(header), "'a'", "overflows")
    header = mutated(a={"shape": [2**62, 4, 0]})  # zero elements, but the product overflows on the way
    refused(tmp_path, with_header(header), "'a'")


@pytest.mark.parametrize("metadata", [{"format": 1}, ["pt"], "pt", {"k": None}])
def test_metadata_must_map_strings_to_strings(tmp_path, metadata):
    header = dict(HEADER, __metadata__=metadata)
    refused(tmp_path, with_header(header), "__metadata__")


def test_header_that_is_not_utf8(tmp_path):
    raw = json.dumps(HEADER).encode().replace(b'"format"', b'"form\xff\xfe"')
    refused(tmp_path, with_header(raw), "UTF-8")


def test_header_with_nan_constant(tmp_path):
    raw = json.dumps(HEADER).encode().replace(b'"pt"', b"NaN")
    refused(tmp_path, with_header(raw), "NaN")


def test_a_text_file_is_not_quoted_as_a_header_length(tmp_path):
    text = b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
    msg = refused(tmp_path, text, "text", "not the header length")
    assert str(struct.unpack("<Q", text[:8])[0]) not in msg


def test_a_folder_or_a_device_is_refused(tmp_path):
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(OmnimergeError):
        SafetensorsFile(tmp_path / "d.safetensors")
    with pytest.raises(OmnimergeError, match="not a regular file"):
        SafetensorsFile("/dev/zero")


def test_every_dtype_and_empty_tensors_still_read(tmp_path):
    tensors = {f"t{i}": torch.zeros(2, 0, 3, dtype=d) if i % 2 else torch.ones(3, dtype=d)
               for i, d in enumerate(DTYPES.values())}
    path = tmp_path / "ok.safetensors"
    save_file(tensors, str(path))
    assert check_against_reference(path) == "read"
    assert load_file(str(path)).keys() == SafetensorsFile(path).tensors.keys()


# --- end to end: a merge with a mutated input -----------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from omnimerge.tiny import build_tiny, make_expert

    root = tmp_path_factory.mktemp("fuzz-models")
    base = build_tiny("qwen2", root / "base", seed=0)
    return base, make_expert(base, root / "expert", seed=5, scale=0.02)


@settings(max_examples=NIGHTLY or 12, deadline=None, derandomize=not NIGHTLY,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), field=st.sampled_from(["dtype", "shape", "data_offsets", "same", "bytes"]))
def test_a_merge_with_a_mutated_input_is_correct_or_exit_2(tmp_path_factory, capsys, models, seed, field):
    import random
    import shutil

    from omnimerge.cli import main

    base, expert = models
    rng = random.Random(seed)
    work = tmp_path_factory.mktemp("m")
    bad = work / "bad"
    shutil.copytree(expert, bad)
    f = bad / "model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    names = sorted(k for k in header if k != "__metadata__")
    name = rng.choice(names)
    if field == "dtype":
        header[name]["dtype"] = rng.choice(["F16", "BF16", "I32", "F64", "U8"])
    elif field == "shape":
        header[name]["shape"] = list(reversed(header[name]["shape"])) + rng.choice([[], [1], [-1]])
    elif field == "data_offsets":
        b, e = header[name]["data_offsets"]
        d = rng.choice([-4, 4, -2, 2])
        header[name]["data_offsets"] = [b + d, e + d]
    elif field == "same":
        other = rng.choice(names)
        header[name] = dict(header[other])
    if field == "bytes":
        raw = bytearray(data)
        i = rng.randrange(8, 8 + n)
        raw[i] = rng.choice(b'{}[]",:0123456789')
        f.write_bytes(bytes(raw))
    else:
        raw = json.dumps(header).encode()
        f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    recipe = work / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "average", "models": [{"path": str(base)}, {"path": str(bad)}]}))
    code = main(["merge", str(recipe), "-o", str(work / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    leftovers = [p.name for p in work.iterdir() if ".omnimerge-" in p.name]
    assert leftovers == []
    if code == 2:
        assert "error" in err and not (work / "out").exists()
        return
    assert code == 0, err
    want_a, want_b = load_file(str(base / "model.safetensors")), load_file(str(f))  # the library must read it too
    got = load_file(str(work / "out" / "model.safetensors"))
    report = json.loads((work / "out" / "report.json").read_text())["tensors"]
    for k, t in got.items():
        if report[k]["action"] == "copy":  # kept from the skeleton (the first model)
            assert same(t, want_a[k]), k
        else:
            expect = ((want_a[k].float() + want_b[k].float()) / 2).to(t.dtype)
            assert same(t, expect), k
