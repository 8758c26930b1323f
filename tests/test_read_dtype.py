"""Methods registered with models_as_read take the models in their read dtype (no float32 copy of each
model): the merged bytes are those of converting every input first."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

import omnimerge
from omnimerge.methods import registry
from omnimerge.tiny import build_tiny, make_expert


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    base = build_tiny("qwen2", root / "base", seed=0, dtype=torch.bfloat16, vocab_size=300)
    return base, [make_expert(base, root / f"expert{i}", seed=10 + i, scale=0.02) for i in (1, 2, 3)]


def _spy(method: registry.Method, as_read: bool, seen: set):
    def fn(base, models, ctx, **params):
        seen.update((base.dtype, m.dtype) for m in models)
        return method.fn(base, models, ctx, **params)

    return dataclasses.replace(method, fn=fn, models_as_read=as_read)


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"lambda": 0.7}),
    ("ties", {"density": 0.4}),
    ("dare_linear", {"p": 0.4}),
    ("dare_ties", {"p": 0.3, "density": 0.8}),
])
def test_models_in_their_read_dtype_give_the_same_bytes(bf16_models, tmp_path, monkeypatch, method, params):
    base, experts = bf16_models
    recipe = {"method": method, "base": str(base),
              "models": [{"path": str(e), "weight": w} for e, w in zip(experts, (1.0, 0.5, 0.25))],
              "parameters": params, "components": {"embed": "merge"}}
    original = registry.get_method(method)
    assert original.models_as_read
    outputs, seen = {}, {}
    for as_read in (True, False):
        seen[as_read] = set()
        monkeypatch.setitem(registry._REGISTRY, method, _spy(original, as_read, seen[as_read]))
        out = tmp_path / f"as_read_{as_read}"
        omnimerge.merge(recipe, out, progress=False)
        outputs[as_read] = (out / "model.safetensors").read_bytes()
    assert seen[True] == {(torch.float32, torch.bfloat16)}  # the base converted, the models as read
    assert seen[False] == {(torch.float32, torch.float32)}
    assert outputs[True] == outputs[False]


def test_a_read_dtype_wider_than_the_compute_dtype_is_converted(bf16_models, tmp_path, monkeypatch):
    """dtype: bfloat16 with float32 inputs: m - base would compute in float32, so the models are converted."""
    base, experts = bf16_models
    f32 = [make_expert(base, tmp_path / f"f32-{i}", seed=i, scale=0.02) for i in (1, 2)]
    for p in f32:  # the same models stored in float32
        w = p / "model.safetensors"
        save_file({k: v.float() for k, v in load_file(w).items()}, w, metadata={"format": "pt"})
    seen: set = set()
    monkeypatch.setitem(registry._REGISTRY, "ties", _spy(registry.get_method("ties"), True, seen))
    omnimerge.merge({"method": "ties", "base": str(base), "models": [{"path": str(p)} for p in f32],
                     "dtype": "bfloat16"}, tmp_path / "out", progress=False)
    assert seen == {(torch.bfloat16, torch.bfloat16)}


def test_models_as_read_needs_a_base():
    with pytest.raises(ValueError, match="needs a base"):
        registry.register("_no_base", needs_base=False, reference="-", summary="-", models_as_read=True)(lambda *a: a)
    assert "_no_base" not in registry._REGISTRY
