"""TIES's `trim: global` through the run's pre-pass: one exact magnitude threshold per task vector over
every tensor merged, the same bytes as an in-memory implementation that flattens the whole model.
(On Ray: test_ray_executor's dare_ties merge, which trims globally by default.)"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import omnimerge
from omnimerge.methods.gta import dare_keep_mask
from omnimerge.plan import build_plan, tensor_seed


def recipe(zoo, method: str, **params) -> dict:
    return {"method": method, "base": str(zoo.base("qwen2_vl")), "seed": 3,
            "models": [{"path": str(e)} for e in zoo.experts("qwen2_vl", 3)], "parameters": params,
            "components": {"vision": "merge", "embed": "merge"}, "shard_size": "256KB"}


def in_memory(r: dict, density: float, p: float | None) -> dict[str, torch.Tensor]:
    """The reference: every merged tensor of every task vector in memory, one kthvalue over their
    concatenation per task vector, then the trim, sign election and disjoint mean of each tensor."""
    plan = build_plan(r)
    jobs = [j for j in plan.jobs if j.action == "merge"]
    taus = {}
    for j in jobs:
        base = plan.base.read(j.canonical).float()
        ts = [m.read(j.canonical).float() - base for m in plan.models]
        if p is not None:  # DARE first: each model's mask keyed by the tensor's seed, the model and the element
            seed = tensor_seed(r["seed"], j.canonical)
            ts = [t * dare_keep_mask(t.shape, p, seed, i) / (1 - p) for i, t in enumerate(ts)]
        taus[j.out_key] = (base, ts)
    thresholds = []
    for i in range(len(plan.models)):
        flat = torch.cat([ts[i].reshape(-1).abs() for _, ts in taus.values()])
        n, k = flat.numel(), int(density * flat.numel())
        thresholds.append(flat.kthvalue(n - k + 1).values)
    out = {}
    for key, (base, ts) in taus.items():
        kept = [t * (t.abs() >= thresholds[i]) for i, t in enumerate(ts)]
        sign = sum(kept[1:], kept[0].clone()).sign()
        agree = [(k * sign > 0) for k in kept]
        num = torch.zeros_like(base)
        den = torch.zeros_like(base)
        for k, a in zip(kept, agree):
            num = num + k * a
            den = den + a
        out[key] = base + num / torch.where(den == 0, torch.ones_like(den), den)
    return out


def merged(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


@pytest.mark.parametrize("method,params,p", [("ties", {"density": 0.3}, None),
                                             ("dare_ties", {"density": 0.5, "p": 0.3}, 0.3)])
def test_global_trim_is_the_whole_model_kthvalue(zoo, tmp_path, method, params, p):
    r = recipe(zoo, method, **params)
    res = omnimerge.merge(r, tmp_path / "out")
    assert len(res.plan.shards()) > 1
    got, want = merged(tmp_path / "out"), in_memory(r, params["density"], p)
    assert want and set(want) <= set(got)
    for key, t in want.items():
        assert torch.equal(got[key], t), key
    # one threshold over the model is not each tensor's own: per_tensor trimming gives other bytes
    per_tensor = merged(omnimerge.merge({**r, "parameters": {**params, "trim": "per_tensor"}}, tmp_path / "pt").out)
    assert any(not torch.equal(per_tensor[k], got[k]) for k in want)
