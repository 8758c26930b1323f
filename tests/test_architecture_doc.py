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


def task_example() -> tuple[str, str]:
    """The path and code of the doc's worked example of a benchmark task."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    (code,) = [b for b in blocks if b.startswith("# src/omnimerge/bench/tasks/")]
    return code.splitlines()[0][2:], code


def test_the_worked_example_adds_a_benchmark_task(tmp_path):
    """Dropping the doc's file into a copy of the package is all it takes: the task is registered,
    generated, scored, described, counted among the vision tasks, and joins the experts' training sets."""
    import shutil
    import subprocess
    import sys

    src = Path(omnimerge.__file__).resolve().parent
    copy = tmp_path / "src" / "omnimerge"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("__pycache__"))
    rel, code = task_example()
    (tmp_path / rel).write_text(code)
    probe = (
        "from omnimerge.bench import tasks as T\n"
        "from omnimerge.bench import data, experiment\n"
        "from omnimerge.bench.config import BenchConfig\n"
        "items = T.generate('corner', 'test', 20, seed=1, image_size=32)\n"
        "assert T.VISION_TASKS[-1] == 'corner' and 'corner' in T.TASKS and 'corner' in T.TEMPLATES\n"
        "assert {it.answer for it in items} <= {'none', *T.COLOURS}\n"
        "assert all(T.score('corner', it.answer, it) == 1.0 for it in items)\n"
        "assert all(o['colour'] in T.describe(it) for it in items for o in it.meta['scene']['objects'])\n"
        "cfg = BenchConfig.micro()\n"
        "assert 'full_corner' in [m.name for m in experiment.zoo_plan(cfg)]\n"
        "assert any(it.task == 'corner' for it in data.multitask_items(cfg))\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", probe], env={"PYTHONPATH": str(tmp_path / "src"), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
