"""The main job on its built-in default: every method merges, every output verifies."""

from omnimerge.demo import run_demo
from omnimerge.methods import list_methods


def test_demo_merges_with_every_method_and_verifies(tmp_path):
    rows = run_demo(tmp_path / "demo")
    names = [r["name"] for r in rows]
    for m in list_methods():
        assert (f"capability: {m.name}" in names) != m.needs_calibration
    assert any(n.startswith("backbone:") for n in names)
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    # task arithmetic sums three task vectors: longer than any one of them, positively aligned
    ta = next(r for r in rows if r["name"] == "capability: task_arithmetic")
    assert ta["ratio"] > 1.2 and ta["cos"] > 0.4


def test_progress_bar_and_cuda_refusal(zoo, tmp_path, capsys):
    import pytest

    import omnimerge

    recipe = {"method": "average", "models": [{"path": str(zoo.base("qwen2"))}]}
    omnimerge.merge(recipe, tmp_path / "out", progress=True)
    assert "merging" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(omnimerge.OmnimergeError, match="--device cuda"):
            omnimerge.merge(recipe, tmp_path / "out2", device="cuda")
        assert not (tmp_path / "out2").exists()
