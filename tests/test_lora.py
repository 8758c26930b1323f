"""PEFT LoRA adapter folders are read as base + (alpha/r)·B·A, matching PEFT's own merge."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import omnimerge
from omnimerge.verify import verify


def make_adapter(base_dir, out_dir, family_cls, *, targets, seed=0, r=4, alpha=8, **kw):
    import peft
    import transformers

    model = getattr(transformers, family_cls).from_pretrained(base_dir)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **kw)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, cfg)
    pm.save_pretrained(out_dir)
    adapter_cfg = json.loads((out_dir / "adapter_config.json").read_text())
    adapter_cfg["base_model_name_or_path"] = str(base_dir)
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_cfg))
    merged = pm.merge_and_unload()
    return out_dir, merged


@pytest.mark.parametrize("family,cls,language_prefix", [
    ("qwen2", "Qwen2ForCausalLM", "model.layers."),
    ("qwen2_vl", "Qwen2VLForConditionalGeneration", "model.layers."),
])
def test_lora_adapter_is_base_plus_scaled_BA(zoo, tmp_path, family, cls, language_prefix):
    base = zoo.base(family)
    adapter, merged_by_peft = make_adapter(base, tmp_path / "adapter", cls, targets=["q_proj", "down_proj"],
                                           use_rslora=(family == "qwen2"))
    out = tmp_path / "out"
    omnimerge.merge({"method": "average", "models": [{"path": str(adapter)}], "skeleton": str(base)}, out)
    got, b = load_file(str(out / "model.safetensors")), load_file(str(base / "model.safetensors"))
    # PEFT's in-memory names (model.language_model.* for Qwen2-VL) -> this checkpoint's on-disk names
    want = {}
    for k, v in merged_by_peft.state_dict().items():
        k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        want[k] = v
    changed = 0
    for key, t in got.items():
        if key.startswith(language_prefix):
            torch.testing.assert_close(t, want[key], rtol=1e-5, atol=1e-6)
            changed += int(not torch.equal(t, b[key]))
        else:
            assert torch.equal(t, b[key])
    assert changed == 4  # q_proj and down_proj in each of the 2 layers
    assert verify(out).ok


def test_lora_expert_in_a_capability_merge(zoo, tmp_path):
    base, full = zoo.base("qwen2"), zoo.expert("qwen2", 1)
    adapter, merged_by_peft = make_adapter(base, tmp_path / "adapter", "Qwen2ForCausalLM", targets=["v_proj"])
    out = tmp_path / "out"
    omnimerge.merge({"method": "task_arithmetic", "base": str(base),
                     "models": [{"path": str(full)}, {"path": str(adapter)}]}, out)
    got, b, e = (load_file(str(p / "model.safetensors")) for p in (out, base, full))
    lora = merged_by_peft.state_dict()
    key = "model.layers.1.self_attn.v_proj.weight"
    torch.testing.assert_close(got[key], b[key] + (e[key] - b[key]) + (lora[key] - b[key]), rtol=1e-5, atol=1e-6)


def test_lora_without_base_is_a_clear_error(zoo, tmp_path):
    adapter, _ = make_adapter(zoo.base("qwen2"), tmp_path / "adapter", "Qwen2ForCausalLM", targets=["q_proj"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(omnimerge.OmnimergeError, match="lora_base"):
        omnimerge.merge({"method": "average", "models": [{"path": str(adapter)}]}, tmp_path / "out")
    omnimerge.merge({"method": "average", "models": [{"path": str(adapter), "lora_base": str(zoo.base("qwen2"))}],
                     "skeleton": str(zoo.base("qwen2"))}, tmp_path / "out")


def test_wudi2_auto_resolves_from_the_inputs_at_plan_time(zoo, tmp_path):
    """wudi2's variant and alpha are decided once per merge: LoRA adapters -> lora at alpha 1.0; full
    checkpoints (here, the same adapters merged into full weights) -> full at alpha 0.1."""
    from omnimerge.plan import build_plan

    base = zoo.base("qwen2")
    adapters, fulls = [], []
    for i in range(2):
        a, merged = make_adapter(base, tmp_path / f"a{i}", "Qwen2ForCausalLM", targets=["q_proj"], seed=i)
        merged.save_pretrained(tmp_path / f"full{i}")
        adapters.append(str(a))
        fulls.append(str(tmp_path / f"full{i}"))
    for paths, want in ((adapters, {"variant": "lora", "alpha": 1.0}), (fulls, {"variant": "full", "alpha": 0.1}),
                        (adapters[:1] + fulls[:1], {"variant": "full", "alpha": 0.1})):
        plan = build_plan({"method": "wudi2", "base": str(base), "models": [{"path": p} for p in paths]})
        merged_jobs = [j for j in plan.jobs if j.action == "merge"]
        assert merged_jobs and all({k: j.params[k] for k in want} == want for j in merged_jobs)
    plan = build_plan({"method": "wudi2", "base": str(base), "models": [{"path": p} for p in adapters],
                       "parameters": {"variant": "full", "alpha": 0.5}})
    assert all(j.params["variant"] == "full" and j.params["alpha"] == 0.5 for j in plan.jobs if j.action == "merge")
