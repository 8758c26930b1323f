"""Tensors the output copies (kept components) follow the same NaN/Inf rule as merged ones, and no output
may land inside any folder the merge reads."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import omnimerge
from omnimerge.errors import OmnimergeError


def with_nan_in_vision(src, dst):
    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.startswith("visual.") and tensors[k].is_floating_point())
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    return dst, key


def test_a_nan_in_a_kept_tensor_is_refused_unless_asked_for(zoo, tmp_path):
    skeleton, key = with_nan_in_vision(zoo.base("qwen2_vl"), tmp_path / "broken")
    recipe = {"method": "average", "skeleton": str(skeleton), "models": [{"path": str(p)} for p in zoo.experts("qwen2_vl", 2)]}
    with pytest.raises(OmnimergeError, match="copy_nonfinite") as e:
        omnimerge.merge(recipe, tmp_path / "out", progress=False)
    assert key in str(e.value) and "a tensor the output copies" in str(e.value)
    assert not (tmp_path / "out").exists()
    omnimerge.merge({**recipe, "copy_nonfinite": True}, tmp_path / "out", progress=False)
    assert torch.isnan(load_file(tmp_path / "out" / "model.safetensors")[key]).any()


def test_an_output_inside_the_tokenizer_source_is_refused(zoo, tmp_path):
    base = zoo.base("qwen2")
    copy = tmp_path / "tok"
    shutil.copytree(base, copy)
    recipe = {"method": "average", "models": [{"path": str(p)} for p in zoo.experts("qwen2", 2)],
              "tokenizer_source": str(copy)}
    with pytest.raises(OmnimergeError, match="inside"):
        omnimerge.merge(recipe, copy / "merged", progress=False)
    assert not (copy / "merged").exists()
