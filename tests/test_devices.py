"""--device: compute on a GPU with small tensors batched; the batching itself is checked on the CPU."""

from __future__ import annotations

import pytest
import torch

import omnimerge
from omnimerge.run.compute import compute, compute_many, group_steps, read_inputs
from omnimerge.plan import build_plan


def plan_for(zoo, method: str, **params):
    base = zoo.base("qwen2_vl")
    return build_plan({"method": method, "base": str(base), "parameters": params,
                       "models": [{"path": str(e)} for e in zoo.experts("qwen2_vl", 2)],
                       "components": {"vision": "merge", "projector": "merge"}})


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.4}), ("dare_ties", {"p": 0.3})])
def test_a_batch_gives_what_one_tensor_at_a_time_gives(zoo, method, params):
    plan = plan_for(zoo, method, **params)
    steps = group_steps(plan, plan.jobs, "cuda")  # grouping needs no GPU
    assert [j for s in steps for j in s] == plan.jobs
    batches = [s for s in steps if len(s) > 1]
    assert batches and all(j.action == "merge" and j.nbytes <= 1 << 20 for s in batches for j in s)
    for step in batches[:3]:
        got = compute_many(plan, step, [read_inputs(plan, j) for j in step], "cpu")
        for job, (out, info) in zip(step, got):
            want, want_info = compute(plan, job, read_inputs(plan, job), "cpu")
            assert out.dtype == want.dtype and torch.equal(out, want), job.out_key
            assert info == want_info
    assert group_steps(plan, plan.jobs, "cpu") == [[j] for j in plan.jobs]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "average"])
def test_cuda_merge_matches_the_cpu_merge(zoo, tmp_path, method):
    from safetensors.torch import load_file

    recipe = {"method": method, "base": str(zoo.base("qwen2_vl")),
              "models": [{"path": str(e)} for e in zoo.experts("qwen2_vl", 2)], "components": {"vision": "merge"}}
    omnimerge.merge(recipe, tmp_path / "cpu")
    omnimerge.merge(recipe, tmp_path / "cuda", device="cuda")
    cpu, cuda = load_file(tmp_path / "cpu" / "model.safetensors"), load_file(tmp_path / "cuda" / "model.safetensors")
    assert cpu.keys() == cuda.keys()
    for k in cpu:
        assert cuda[k].device.type == "cpu" and cuda[k].dtype == cpu[k].dtype
        torch.testing.assert_close(cuda[k].float(), cpu[k].float(), rtol=1e-2, atol=1e-5)
