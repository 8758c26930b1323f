"""End to end on tiny real-architecture checkpoints: merge, load with transformers, run, compare
every tensor with the definition computed here by hand (independently of omnimerge's key tables)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file

import omnimerge
from omnimerge.tiny import VLM_FAMILIES as VLMS
from omnimerge.verify import verify
from layouts import DECODER  # the tests' own reading of raw keys (not omnimerge's table)

BACKBONE_PAIRS = [("qwen2", "qwen2_vl"), ("qwen2", "qwen2_5_vl"), ("qwen3", "qwen3_vl"), ("llama", "llava"),
                  ("qwen2", "internvl")]


def weights(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def is_language(family: str, key: str) -> bool:
    p = DECODER[family]
    return key.startswith(p + "layers.") or key.startswith(p + "norm.")


@pytest.mark.parametrize("family", VLMS)
def test_capability_merge_task_arithmetic(zoo, tmp_path, family):
    base, experts = zoo.base(family), zoo.experts(family)
    w, lam = [0.5, 0.3, 0.2], 0.8
    recipe = {"method": "task_arithmetic", "base": str(base), "parameters": {"lambda": lam},
              "models": [{"path": str(e), "weight": wi} for e, wi in zip(experts, w)]}
    out = tmp_path / "out"
    omnimerge.merge(recipe, out)
    got, b = weights(out), weights(base)
    es = [weights(e) for e in experts]
    assert set(got) == set(b), "output has exactly the skeleton's tensors, under its names"
    n_lang = 0
    for key, t in got.items():
        if is_language(family, key):
            want = b[key] + lam * sum(wi * (e[key] - b[key]) for wi, e in zip(w, es))
            torch.testing.assert_close(t, want, rtol=1e-6, atol=1e-6)
            n_lang += 1
        else:  # vision, projector, embed, lm_head: the skeleton's bytes
            assert torch.equal(t, b[key]), key
    assert n_lang > 10
    res = verify(out)
    assert res.ok, res.checks
    assert any(c.name == "image forward" and "finite" in c.detail for c in res.checks)


@pytest.mark.parametrize("text_family,vlm_family", BACKBONE_PAIRS)
def test_backbone_merge_text_llm_into_vlm(zoo, tmp_path, text_family, vlm_family):
    text, vlm = zoo.text(text_family), zoo.base(vlm_family)
    recipe = {"method": "task_arithmetic", "base": str(text), "skeleton": str(vlm),
              "models": [{"path": str(vlm), "weight": 0.5}]}
    out = tmp_path / "out"
    omnimerge.merge(recipe, out)
    got, t, v = weights(out), weights(text), weights(vlm)
    assert set(got) == set(v)
    n_lang = 0
    for key, tensor in got.items():
        if is_language(vlm_family, key):
            tkey = DECODER[text_family] + key[len(DECODER[vlm_family]):]
            want = t[tkey] + 0.5 * (v[key] - t[tkey])
            torch.testing.assert_close(tensor, want, rtol=0, atol=1e-6)
            n_lang += 1
        else:
            assert torch.equal(tensor, v[key]), key
    assert n_lang > 10
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == vlm_family
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    assert verify(out).ok


def test_text_llm_as_base_of_several_layouts_agree(zoo, tmp_path):
    """Qwen2-VL saved in transformers 5's own layout (model.language_model.*) merges like the hub layout."""
    a = zoo.base("qwen2_vl")
    b = zoo.base("qwen2_vl", save_original_format=False)
    keys_b = weights(b).keys()
    assert any(k.startswith("model.language_model.layers.") for k in keys_b)
    out = tmp_path / "out"
    omnimerge.merge({"method": "average", "models": [{"path": str(a)}, {"path": str(b)}], "skeleton": str(a)}, out)
    # both hold the same weights, so the average is the model itself
    for key, t in weights(out).items():
        torch.testing.assert_close(t, weights(a)[key])


def test_out_dtype_shards_and_determinism(zoo, tmp_path):
    base, experts = zoo.base("qwen2_vl"), zoo.experts("qwen2_vl")
    recipe = {"method": "dare_ties", "base": str(base), "models": [{"path": str(e)} for e in experts],
              "out_dtype": "bfloat16", "shard_size": "200KB", "seed": 3}
    omnimerge.merge(recipe, tmp_path / "a")
    omnimerge.merge(recipe, tmp_path / "b")
    shards = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(weights(base))
    for s in shards:
        assert (tmp_path / "a" / s).read_bytes() == (tmp_path / "b" / s).read_bytes(), "same recipe, same bytes"
    assert all(t.dtype == torch.bfloat16 for t in weights(tmp_path / "a").values())
    assert json.loads((tmp_path / "a" / "config.json").read_text())["dtype"] == "bfloat16"
    assert verify(tmp_path / "a").ok
    recipe["seed"] = 4
    omnimerge.merge(recipe, tmp_path / "c")
    a, c = weights(tmp_path / "a"), weights(tmp_path / "c")
    assert any(not torch.equal(a[k], c[k]) for k in a if ".layers." in k), "another seed draws other DARE masks"


def test_component_policies_take_and_own_method(zoo, tmp_path):
    base, experts = zoo.base("llava"), zoo.experts("llava")
    recipe = {"method": "average", "models": [{"path": str(e), "name": f"e{i}"} for i, e in enumerate(experts)],
              "base": str(base),
              "components": {"vision": {"take": "e1"},
                             "projector": {"method": "task_arithmetic", "parameters": {"lambda": 2.0}}}}
    out = tmp_path / "out"
    omnimerge.merge(recipe, out)
    got, b, es = weights(out), weights(base), [weights(e) for e in experts]
    for key, t in got.items():
        if key.startswith("vision_tower."):
            assert torch.equal(t, es[1][key]), key
        elif key.startswith("multi_modal_projector."):
            want = b[key] + 2.0 * sum(e[key] - b[key] for e in es)
            torch.testing.assert_close(t, want)
        elif is_language("llava", key):
            torch.testing.assert_close(t, sum(e[key] for e in es) / 3)
    report = json.loads((out / "report.json").read_text())
    assert report["components"]["vision"] == "take e1"
    assert verify(out).ok


def test_filters_give_layers_their_own_values(zoo, tmp_path):
    base, experts = zoo.base("qwen2"), zoo.experts("qwen2")[:2]
    recipe = {"method": "task_arithmetic", "base": str(base),
              "parameters": {"lambda": [{"filter": r"layers\.0\.", "value": 0.0}, {"value": 1.0}]},
              "models": [{"path": str(experts[0]), "weight": [{"filter": "mlp", "value": 2.0}, {"value": 1.0}]},
                         {"path": str(experts[1])}]}
    out = tmp_path / "out"
    omnimerge.merge(recipe, out)
    got, b, e0, e1 = weights(out), weights(base), weights(experts[0]), weights(experts[1])
    for key, t in got.items():
        if "layers.0." in key:
            assert torch.equal(t, b[key])
        elif "layers.1." in key:
            w0 = 2.0 if "mlp" in key else 1.0
            torch.testing.assert_close(t, b[key] + w0 * (e0[key] - b[key]) + (e1[key] - b[key]))


def test_vocab_sizes_differ_merge_shared_rows(zoo, tmp_path):
    small, big = zoo.text("qwen2"), zoo.base("qwen2", vocab_size=448)
    recipe = {"method": "average", "models": [{"path": str(big)}, {"path": str(small)}], "skeleton": str(big),
              "components": {"embed": "merge", "lm_head": "merge"}}
    out = tmp_path / "out"
    omnimerge.merge(recipe, out)
    got, s, g = weights(out), weights(small), weights(big)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        n = s[key].shape[0]
        assert got[key].shape == g[key].shape
        torch.testing.assert_close(got[key][:n], (s[key] + g[key][:n]) / 2)
        assert torch.equal(got[key][n:], g[key][n:])
    assert verify(out).ok


def test_tied_embeddings_input_feeds_untied_lm_head(zoo, tmp_path):
    tied, untied = zoo.base("qwen2", tie_word_embeddings=True), zoo.text("qwen2")
    assert "lm_head.weight" not in weights(tied)
    recipe = {"method": "average", "models": [{"path": str(untied)}, {"path": str(tied)}], "skeleton": str(untied),
              "components": {"lm_head": "merge"}}
    out = tmp_path / "out"
    omnimerge.merge(recipe, out)
    got = weights(out)
    want = (weights(untied)["lm_head.weight"] + weights(tied)["model.embed_tokens.weight"]) / 2
    torch.testing.assert_close(got["lm_head.weight"], want)


def test_interrupted_merge_leaves_nothing(zoo, tmp_path):
    from omnimerge.api import write_plan
    from omnimerge.plan import build_plan

    base, experts = zoo.base("qwen2"), zoo.experts("qwen2")
    plan = build_plan({"method": "ties", "base": str(base), "models": [{"path": str(e)} for e in experts]})
    seen = []

    def stop(job):
        seen.append(job)
        if len(seen) == 5:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_plan(plan, out, on_tensor=stop)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_report_and_card(zoo, tmp_path):
    base, experts = zoo.base("qwen2_vl"), zoo.experts("qwen2_vl")
    out = tmp_path / "out"
    omnimerge.merge({"method": "ties", "base": str(base), "models": [{"path": str(e)} for e in experts]}, out)
    report = json.loads((out / "report.json").read_text())
    t = report["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    assert t["method"] == "ties" and t["params"]["density"] == [0.2, 0.2, 0.2] and t["delta_norm"] > 0
    assert report["tensors"]["visual.blocks.0.attn.qkv.weight"]["action"] == "copy"
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "- merge" in card and "arXiv:2306.01708" in card
    header = yaml.safe_load(card.split("---\n")[1])  # the front matter the Hub renders
    assert header == {"base_model": [base.name] + [e.name for e in experts], "base_model_relation": "merge",
                      "library_name": "transformers", "tags": ["merge", "omnimerge", "ties"]}
    recorded = omnimerge.load_recipe(out / "omnimerge.yaml")
    assert recorded.base == str(base) and recorded.method == "ties"
    assert re.search(r"preprocessor_config\.json|chat_template", " ".join(p.name for p in out.iterdir()))
