"""Damaged outputs and broken kept tensors: `omnimerge verify` names the shard and exits 1 without a
traceback; NaN/Inf in a tensor the output would copy is found (``check_finite``)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml

from omnimerge.checkpoints.checkpoint import check_finite, load_checkpoint, nonfinite_count
from omnimerge.checkpoints.sources import damaged_weights
from omnimerge.cli import main
from omnimerge.errors import OmnimergeError


@pytest.fixture(scope="module")
def merged(zoo, tmp_path_factory) -> Path:
    """A sharded merge output (several shards, an index, report.json)."""
    root = tmp_path_factory.mktemp("merged")
    recipe = root / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "average", "shard_size": "200kB",
                                      "models": [{"path": str(p)} for p in zoo.experts("qwen2", 2)]}))
    assert main(["merge", str(recipe), "-o", str(root / "out"), "--no-progress"]) == 0
    assert len(list((root / "out").glob("model-*.safetensors"))) >= 2
    return root / "out"


def damaged(merged: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(merged, out)
    return out


def verify(capsys, out: Path) -> tuple[int, str]:
    code = main(["verify", str(out), "--no-image"])
    captured = capsys.readouterr()
    text = " ".join((captured.out + captured.err).split())
    assert "Traceback" not in text
    return code, text


def test_an_intact_output_verifies(merged, capsys):
    assert damaged_weights(merged) is None
    code, text = verify(capsys, merged)
    assert code == 0, text


def test_a_truncated_shard(merged, tmp_path, capsys):
    out = damaged(merged, tmp_path)
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    code, text = verify(capsys, out)
    assert code == 1 and "FAIL" in text and shard.name in text and "truncated" in text, text


def test_a_zeroed_header(merged, tmp_path, capsys):
    out = damaged(merged, tmp_path)
    shard = sorted(out.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[: 8 + n] = bytes(8 + n)
    shard.write_bytes(bytes(data))
    code, text = verify(capsys, out)
    assert code == 1 and "FAIL" in text and shard.name in text, text


def test_a_missing_shard(merged, tmp_path, capsys):
    out = damaged(merged, tmp_path)
    shard = sorted(out.glob("model-*.safetensors"))[-1]
    shard.unlink()
    code, text = verify(capsys, out)
    assert code == 1 and "FAIL" in text and shard.name in text and "missing" in text, text


def test_a_missing_shard_and_index(merged, tmp_path, capsys):
    out = damaged(merged, tmp_path)
    shard = sorted(out.glob("model-*.safetensors"))[0]
    shard.unlink()
    (out / "model.safetensors.index.json").unlink()
    code, text = verify(capsys, out)
    assert code == 1 and shard.name in text and "report.json" in text, text


def test_a_garbage_index(merged, tmp_path, capsys):
    out = damaged(merged, tmp_path)
    (out / "model.safetensors.index.json").write_text('{"weight_map": ["x"]}')
    code, text = verify(capsys, out)
    assert code == 1 and "model.safetensors.index.json" in text and "weight_map" in text, text


def test_a_single_file_output_truncated(zoo, tmp_path, capsys):
    out = tmp_path / "single"
    shutil.copytree(zoo.expert("qwen2", 1), out)
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    code, text = verify(capsys, out)
    assert code == 1 and "model.safetensors" in text and "truncated" in text, text


# --- NaN/Inf in kept tensors ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nonfinite_count(dtype):
    t = torch.zeros(50, 7, dtype=dtype)
    assert nonfinite_count(t) == 0
    t[3, 4], t[10, 0] = float("nan"), float("-inf")
    assert nonfinite_count(t) == 2
    big = torch.full((4,), torch.finfo(dtype).max, dtype=dtype)  # the sum overflows, no entry is infinite
    assert nonfinite_count(big) == 0
    assert nonfinite_count(torch.zeros(0, dtype=dtype)) == 0
    assert nonfinite_count(torch.tensor([1, 2], dtype=torch.int64)) == 0


def test_check_finite_names_the_tensor_and_the_option(zoo):
    ck = load_checkpoint(str(zoo.base("qwen2")))
    t = ck.read("embed.weight")
    check_finite(t, ck.describe("embed.weight"), kept=True)  # a sound tensor passes
    t[0, 0] = float("inf")
    with pytest.raises(OmnimergeError) as e:
        check_finite(t, ck.describe("embed.weight"), kept=True)
    msg = str(e.value)
    assert "model.embed_tokens.weight" in msg and str(zoo.base("qwen2")) in msg and "1 NaN/Inf" in msg
    assert "copy_nonfinite: true" in msg
    check_finite(t, "x", kept=True, allowed=True)  # the recipe's explicit choice
    with pytest.raises(OmnimergeError, match="keep this component"):
        check_finite(t, "x", kept=False, allowed=True)  # merged inputs are always checked


def test_copy_nonfinite_is_a_recipe_field():
    from omnimerge.recipe import parse_recipe

    r = parse_recipe({"method": "average", "models": [{"path": "a"}], "copy_nonfinite": True})
    assert r.copy_nonfinite is True
    assert parse_recipe({"method": "average", "models": [{"path": "a"}]}).copy_nonfinite is None
    with pytest.raises(OmnimergeError, match="copy_nonfinite"):
        parse_recipe({"method": "average", "models": [{"path": "a"}], "copy_nonfinite": "sometimes"})


@pytest.mark.parametrize("damage", ["truncated", "missing", "not-an-object", "unknown-architecture"])
def test_a_damaged_config(merged, tmp_path, capsys, damage):
    out = damaged(merged, tmp_path)
    cfg = out / "config.json"
    if damage == "truncated":
        cfg.write_text(cfg.read_text()[:40])
    elif damage == "missing":
        cfg.unlink()
    elif damage == "not-an-object":
        cfg.write_text("[]")
    else:
        cfg.write_text(json.dumps(json.loads(cfg.read_text()) | {"architectures": ["NoSuchModel"]}))
    code, text = verify(capsys, out)
    assert code == 1 and "FAIL config" in text and ("config.json" in text or "NoSuchModel" in text), text


def test_verify_of_a_folder_that_does_not_exist(tmp_path, capsys):
    code, text = verify(capsys, tmp_path / "nope")
    assert code == 2 and "no such folder" in text
