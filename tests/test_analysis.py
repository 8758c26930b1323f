"""`omnimerge analyze`: task-vector statistics against their definitions, and the command end to end."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from omnimerge.analysis import analyze, tensor_stats
from omnimerge.cli import main


def test_tensor_stats_hand_checked():
    a = torch.tensor([1.0, -2.0, 0.0, 3.0])
    b = torch.tensor([1.0, 2.0, 0.0, -3.0])
    c = torch.tensor([2.0, -4.0, 0.0, 6.0])  # = 2a
    s = tensor_stats([a, b, c], spectra=False)
    assert s["norms"] == pytest.approx([14**0.5, 14**0.5, 56**0.5])
    # cos(a, b) = (1 - 4 - 9) / 14, cos(a, c) = 1
    assert s["cosine"][0][1] == pytest.approx(-12 / 14, abs=1e-6)
    assert s["cosine"][0][2] == pytest.approx(1.0, abs=1e-6)
    # entries 0..3: signs (+,+,+) no conflict; (-,+,-) conflict; all zero: not contested; (+,-,+) conflict
    assert s["sign_conflict"] == pytest.approx(2 / 3)


def test_spectra_mark_the_rank_of_low_rank_task_vectors():
    g = torch.Generator().manual_seed(0)
    taus = []
    for r in (3, 6):
        t = torch.randn(40, r, generator=g) @ torch.randn(r, 60, generator=g) + 1e-4 * torch.randn(40, 60, generator=g)
        taus.append(t)
    s = tensor_stats(taus, rank_rule="knee")
    assert [sp["rank"] for sp in s["spectra"]] == [3, 6]
    assert all(sp["energy_at_rank"] > 0.999 for sp in s["spectra"])
    assert len(s["spectra"][0]["singular_values"]) == 40


def test_analyze_command_writes_json_and_plots(zoo, tmp_path, capsys):
    base, experts = zoo.base("qwen2_vl"), zoo.experts("qwen2_vl")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "ties", "base": str(base),
                                      "models": [{"path": str(e), "name": f"e{i}"} for i, e in enumerate(experts)]}))
    assert main(["analyze", str(recipe), "-o", str(tmp_path / "an")]) == 0
    assert "mean pairwise cos" in capsys.readouterr().out
    data = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert data["models"] == ["e0", "e1", "e2"]
    q = data["tensors"]["language.layers.1.self_attn.q_proj.weight"]
    assert q["layer"] == 1 and q["component"] == "language" and len(q["spectra"]) == 3
    assert all("vision" not in k for k in data["tensors"]), "kept components are not analysed"
    for name in ("layers.png", "cosine.png", "spectra.png"):
        assert (tmp_path / "an" / name).stat().st_size > 5000
    # independent check of one norm
    from safetensors.torch import load_file

    key = "model.layers.1.self_attn.q_proj.weight"
    want = (load_file(str(experts[0] / "model.safetensors"))[key] - load_file(str(base / "model.safetensors"))[key]).norm()
    assert q["norms"][0] == pytest.approx(float(want), rel=1e-5)


def test_analyze_needs_a_base(zoo, tmp_path):
    from omnimerge import OmnimergeError

    with pytest.raises(OmnimergeError, match="base"):
        analyze({"method": "average", "models": [{"path": str(zoo.base("qwen2"))}]}, tmp_path / "an")
