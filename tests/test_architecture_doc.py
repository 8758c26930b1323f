"""docs/architecture.md's worked example: a method added in one file works end to end."""

from __future__ import annotations

import re
import types
from pathlib import Path

import torch
from safetensors.torch import load_file

import omnimerge
from omnimerge.methods import get_method, registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def example_module() -> str:
    """The python block of the doc that starts with the new file's path."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    (code,) = [b for b in blocks if b.startswith("# src/omnimerge/methods/median.py")]
    return code


def test_the_worked_example_adds_a_method(zoo, tmp_path):
    module = types.ModuleType("omnimerge.methods.median", "the doc's example")
    module.__package__ = "omnimerge.methods"
    try:
        exec(compile(example_module(), str(DOC), "exec"), module.__dict__)  # what importing the file does
        m = get_method("median")
        assert m.needs_base and m.param("lambda").default == 1.0
        base, experts = zoo.base("qwen2"), zoo.experts("qwen2", 3)
        recipe = {"method": "median", "base": str(base), "models": [{"path": str(e)} for e in experts],
                  "parameters": {"lambda": 0.5}}
        omnimerge.merge(recipe, tmp_path / "out")
        got = load_file(str(tmp_path / "out" / "model.safetensors"))
        b = load_file(str(base / "model.safetensors"))
        es = [load_file(str(e / "model.safetensors")) for e in experts]
        key = "model.layers.1.mlp.up_proj.weight"
        want = b[key] + 0.5 * torch.stack([e[key] - b[key] for e in es]).median(dim=0).values
        assert torch.equal(got[key], want)
        assert torch.equal(got["model.embed_tokens.weight"], b["model.embed_tokens.weight"])  # kept: not merged
    finally:
        registry._REGISTRY.pop("median", None)
