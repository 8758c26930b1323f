"""PCB-Merging, Localize-and-Stitch, WIDEN and LoRA-LEGO end to end on tiny checkpoints: merged, compared with
the method's definition tensor by tensor, loaded by transformers and run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import omnimerge
from omnimerge.methods import MethodContext, get_method
from omnimerge.verify import verify
from layouts import DECODER  # the tests' own reading of raw keys (not omnimerge's table)
from test_merge_e2e import is_language, weights
from test_lora import make_adapter
from test_lora_out import PREFIX, load, logits
from test_methods_papers import pcb_reference


def direct(method: str, base, models, reduction=None, **params):
    ctx = MethodContext("language.layers.0.x.weight", torch.Generator().manual_seed(0), reduction=reduction)
    return get_method(method)(base.float(), [m.float() for m in models], ctx, **params)


@pytest.mark.parametrize("method,params", [("pcb", {}), ("pcb", {"density": 0.5, "lambda": 1.0}),
                                           ("pcb", {"scope": "per_tensor"}),
                                           ("widen", {}), ("localize_stitch", {}),
                                           ("localize_stitch", {"scope": "per_tensor", "density": 0.2})])
def test_capability_merge_is_the_definition_and_runs(zoo, tmp_path, method, params):
    family = "qwen2_vl"
    base, experts = zoo.base(family), zoo.experts(family, 2)
    out = tmp_path / "out"
    omnimerge.merge({"method": method, "base": str(base), "parameters": params,
                     "models": [{"path": str(e)} for e in experts]}, out)
    got, b = weights(out), weights(base)
    es = [weights(e) for e in experts]
    lang = sorted(k for k in got if is_language(family, k))
    assert len(lang) > 10
    thresholds = None
    if method == "localize_stitch" and params.get("scope", "global") == "global":
        # one threshold per task vector over every merged tensor: the k-th largest |τ_i|, k = ⌊0.05·N⌋
        thresholds = []
        for e in es:
            mags = torch.cat([(e[k].float() - b[k].float()).abs().reshape(-1) for k in lang])
            k = int(0.05 * mags.numel())
            thresholds.append(float(mags.kthvalue(mags.numel() - k + 1).values))
    whole = None
    if method == "pcb" and params.get("scope", "global") == "global":
        # the authors' PCB_merge on the whole merged model flattened into one row per task vector
        taus = torch.stack([torch.cat([(e[k].double() - b[k].double()).reshape(-1) for k in lang]) for e in es])
        flat = pcb_reference(taus, params.get("density", 0.1), 1e-4) * params.get("lambda", 1.2)
        whole = dict(zip(lang, flat.split([b[k].numel() for k in lang])))
    for key, t in got.items():
        if key in lang and whole is not None:
            want = (b[key].double() + whole[key].reshape(t.shape)).to(t.dtype)
            torch.testing.assert_close(t, want, rtol=1e-5, atol=1e-5)
        elif key in lang:
            want = direct(method, b[key], [e[key] for e in es], thresholds, **params).to(t.dtype)
            torch.testing.assert_close(t, want, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(t, b[key]), key
    if method == "localize_stitch":  # report.json: each tensor's localised fractions; over the model, the density
        tensors = json.loads((out / "report.json").read_text())["tensors"]
        total = sum(got[k].numel() for k in lang)
        for i in range(2):
            kept = sum(tensors[k]["density"][i] * got[k].numel() for k in lang)
            want = int(params.get("density", 0.05) * total) if thresholds else \
                sum(int(params["density"] * got[k].numel()) for k in lang)
            assert kept == pytest.approx(want, abs=0.01 * len(lang))  # (fractions rounded to 6 digits)
    res = verify(out)
    assert res.ok, res.checks


def test_widen_backbone_merge_of_pre_trained_and_fine_tuned_relatives(zoo, tmp_path):
    """WIDEN's setting: one base LLM, a relative trained further on it (here a VLM on that backbone) and a
    fine-tuned text relative, merged into the VLM's skeleton."""
    text = zoo.base("qwen2")
    vlm, chat = zoo.on_backbone("qwen2_vl", "qwen2"), zoo.expert("qwen2", 1)
    out = tmp_path / "out"
    omnimerge.merge({"method": "widen", "base": str(text), "skeleton": str(vlm),
                     "models": [{"path": str(vlm)}, {"path": str(chat)}]}, out)
    got, t, v, c = weights(out), weights(text), weights(vlm), weights(chat)
    n = 0
    for key, tensor in got.items():
        if is_language("qwen2_vl", key):
            tkey = DECODER["qwen2"] + key[len(DECODER["qwen2_vl"]):]
            want = direct("widen", t[tkey], [v[key], c[tkey]]).to(tensor.dtype)
            torch.testing.assert_close(tensor, want, rtol=1e-6, atol=1e-6)
            n += 1
        else:
            assert torch.equal(tensor, v[key]), key
    assert n > 10
    assert verify(out).ok


# ------------------------------------------------------------------------------------------- LoRA-LEGO
def adapters(zoo, tmp_path, n=2, r=4):
    base = zoo.base("qwen2")
    return base, [make_adapter(base, tmp_path / f"adapter{i}", "Qwen2ForCausalLM", targets=["q_proj", "v_proj"],
                               seed=i, r=r)[0] for i in range(n)]


def test_lora_lego_of_one_adapter_is_that_adapter(zoo, tmp_path):
    base = zoo.base("qwen2")
    adapter, merged_by_peft = make_adapter(base, tmp_path / "adapter", "Qwen2ForCausalLM", targets=["q_proj", "v_proj"])
    out = tmp_path / "out"
    omnimerge.merge({"method": "lora_lego", "base": str(base), "models": [{"path": str(adapter)}]}, out)
    want = merged_by_peft.state_dict()
    for key, t in weights(out).items():
        torch.testing.assert_close(t, want[key], rtol=1e-5, atol=1e-5)


def test_lora_lego_merges_adapters_into_rank_k_and_writes_a_lora(zoo, tmp_path):
    base, ads = adapters(zoo, tmp_path)
    recipe = {"method": "lora_lego", "base": str(base), "parameters": {"rank": 3},
              "models": [{"path": str(a)} for a in ads]}
    full, ad = tmp_path / "full", tmp_path / "lora"
    omnimerge.merge(recipe, full)
    got, b = weights(full), weights(base)
    changed = 0
    for key, t in got.items():
        delta = t.float() - b[key].float()
        if key.endswith(("q_proj.weight", "v_proj.weight")) and ".layers." in key:
            assert int(torch.linalg.matrix_rank(delta, rtol=1e-4)) == 3, key
            changed += 1
        else:
            assert torch.equal(t, b[key]), key
    assert changed == 4
    assert verify(full).ok

    omnimerge.merge(recipe, ad, as_lora=3)  # the merged update as a PEFT adapter of rank 3
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    keys = load_file(str(ad / "adapter_model.safetensors"))
    assert keys[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_A.weight"].shape[0] == 3
    image = False
    diff = (logits(load("qwen2", base, ad), image) - logits(load("qwen2", full), image)).abs().max()
    assert diff < 1e-4, float(diff)


def test_lora_lego_refuses_full_fine_tunes_unless_unit_rank_is_set(zoo, tmp_path):
    base, experts = zoo.base("qwen2_vl"), zoo.experts("qwen2_vl", 2)
    recipe = {"method": "lora_lego", "base": str(base), "models": [{"path": str(e)} for e in experts]}
    with pytest.raises(omnimerge.OmnimergeError, match="not every model of this merge is a LoRA adapter"):
        omnimerge.merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    out = tmp_path / "out2"
    omnimerge.merge({**recipe, "parameters": {"unit_rank": 4, "rank": 4}}, out)
    got, b = weights(out), weights(base)
    key = DECODER["qwen2_vl"] + "layers.0.mlp.up_proj.weight"
    assert int(torch.linalg.matrix_rank(got[key].float() - b[key].float(), rtol=1e-4)) <= 4
    assert verify(out).ok
