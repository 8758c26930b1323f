"""Layer stacking (`slices:`, frankenmerges) and output vocabularies (`tokenizer:`), in omnimerge recipes and
translated from mergekit YAML: which input tensor makes each output tensor, the output config, loading and
generating with transformers, `verify`, the union vocabulary's rows, and the errors raised before any output
exists. Parity with mergekit itself: tests/test_slices.py::test_parity_with_mergekit (needs a mergekit venv)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import omnimerge
from omnimerge.errors import OmnimergeError
from omnimerge.mergekit_yaml import from_mergekit
from omnimerge.plan import build_plan
from omnimerge.tiny import build_tiny, make_expert
from omnimerge.verify import verify

LAYER = re.compile(r"^(model\.layers\.)(\d+)\.(.+)$")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def mk(text: str) -> dict:
    return from_mergekit(yaml.safe_load(text))


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """Two tiny Qwen2 models of 4 layers (a, and b = a perturbed in every tensor) and a third, c."""
    root = tmp_path_factory.mktemp("four")
    a = build_tiny("qwen2", root / "a", num_layers=4, seed=0)
    b = make_expert(a, root / "b", seed=1, scale=0.02, pattern=".")
    c = make_expert(a, root / "c", seed=2, scale=0.02, pattern=".")
    return a, b, c


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A tiny Qwen2 of another width (hidden size 128)."""
    return build_tiny("qwen2", tmp_path_factory.mktemp("wide") / "w", num_layers=2, hidden_size=128, seed=9)


def generate(folder: Path, n: int = 4) -> torch.Tensor:
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    model = getattr(transformers, config.architectures[0]).from_pretrained(folder).eval()
    ids = torch.tensor([[10, 11, 12, 13]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    assert out.shape == (1, 4 + n)
    return out


# ------------------------------------------------------------------------------ the layer mapping


def test_frankenmerge_maps_each_output_layer_to_its_source(four, tmp_path):
    a, b, _ = four
    recipe = {"method": "passthrough", "models": [{"path": str(a), "name": "a"}, {"path": str(b), "name": "b"}],
              "slices": [{"model": "a", "layers": [0, 3]}, {"model": "b", "layers": [1, 4]}]}  # overlapping
    out = tmp_path / "out"
    res = omnimerge.merge(recipe, out)
    got, wa, wb = weights(out), weights(a), weights(b)
    want_layers = [(wa, 0), (wa, 1), (wa, 2), (wb, 1), (wb, 2), (wb, 3)]
    seen = set()
    for key, t in got.items():
        m = LAYER.match(key)
        if m:
            src, i = want_layers[int(m.group(2))]
            assert torch.equal(t, src[f"model.layers.{i}.{m.group(3)}"]), key
            seen.add(int(m.group(2)))
        elif key == "model.norm.weight":  # the final norm is the language model's: the last slice's
            assert torch.equal(t, wb[key])
        else:  # omnimerge's default policies: embeddings and head are the skeleton's (the first model)
            assert torch.equal(t, wa[key]), key
    assert seen == set(range(6))
    assert len(got) == len(wa) + 2 * len([k for k in wa if k.startswith("model.layers.0.")])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6 and cfg["layer_types"] == ["full_attention"] * 6
    report = json.loads((out / "report.json").read_text())["tensors"]
    assert report["model.layers.4.mlp.up_proj.weight"]["source_canonical"] == "language.layers.2.mlp.up_proj.weight"
    assert report["model.layers.4.mlp.up_proj.weight"]["source"] == "b"
    assert [j.shape for j in res.plan.jobs if j.out_key == "model.layers.5.self_attn.q_proj.weight"] == [(64, 64)]
    check = verify(out)
    assert check.ok, check.checks
    generate(out)
    again = tmp_path / "again"  # omnimerge.yaml reproduces the output
    omnimerge.merge(out / "omnimerge.yaml", again)
    assert all(torch.equal(t, weights(again)[k]) for k, t in got.items())


def test_scale_and_merged_slices(four, tmp_path):
    """`scale` on the o_proj of a repeated layer; a slice of two sources merged with the recipe's method."""
    a, b, c = four
    recipe = {"method": "average", "models": [{"path": str(a), "name": "a"}, {"path": str(b), "name": "b"},
                                              {"path": str(c), "name": "c"}],
              "slices": [{"sources": [{"model": "a", "layers": [0, 2], "weight": 3.0},
                                      {"model": "b", "layers": [2, 4], "weight": [{"filter": "mlp", "value": 0.0},
                                                                                  {"value": 1.0}]}]},
                         {"sources": [{"model": "c", "layers": [3, 4]}]}]}  # one source: the average is itself
    out = tmp_path / "avg"
    omnimerge.merge(recipe, out)
    got, wa, wb, wc = weights(out), weights(a), weights(b), weights(c)
    for key, t in got.items():
        m = LAYER.match(key)
        if not m:
            continue
        i, rest = int(m.group(2)), m.group(3)
        if i < 2:
            x, y = wa[f"model.layers.{i}.{rest}"], wb[f"model.layers.{i + 2}.{rest}"]
            # per-source filters match the source's own keys: b's weight is 0 on its mlp tensors
            want = x if "mlp" in rest else (3 * x + y) / 4
        else:
            want = wc[f"model.layers.3.{rest}"]
        torch.testing.assert_close(t, want, rtol=1e-6, atol=1e-7, msg=key)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3

    pt = {"method": "passthrough", "models": [{"path": str(a), "name": "a"}],
          "slices": [{"model": "a", "layers": [0, 2]},
                     {"sources": [{"model": "a", "layers": [1, 2],
                                   "scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}]}]}
    omnimerge.merge(pt, tmp_path / "pt")
    got = weights(tmp_path / "pt")
    torch.testing.assert_close(got["model.layers.2.self_attn.o_proj.weight"],
                               0.5 * wa["model.layers.1.self_attn.o_proj.weight"])
    assert torch.equal(got["model.layers.2.self_attn.q_proj.weight"], wa["model.layers.1.self_attn.q_proj.weight"])
    assert verify(tmp_path / "pt").ok


def test_slice_base_and_task_vectors(four, tmp_path):
    """A method with a base: each slice's base is one of its sources, its layers the origin of the task vectors."""
    a, b, c = four
    recipe = {"method": "task_arithmetic", "base": "a", "parameters": {"lambda": 0.5},
              "models": [{"path": str(a), "name": "a"}, {"path": str(b), "name": "b"}],
              "slices": [{"sources": [{"model": "a", "layers": [0, 4]}, {"model": "b", "layers": [0, 4]}]},
                         {"sources": [{"model": "a", "layers": [2, 4]}, {"model": "b", "layers": [0, 2]}]}]}
    out = tmp_path / "ta"
    omnimerge.merge(recipe, out)
    omnimerge.merge(out / "omnimerge.yaml", tmp_path / "ta-again")  # names became paths, the base still a source
    assert all(torch.equal(t, weights(tmp_path / "ta-again")[k]) for k, t in weights(out).items())
    got, wa, wb = weights(out), weights(a), weights(b)
    key = "model.layers.5.mlp.down_proj.weight"  # slice 2, position 1: base a's layer 3, b's layer 1
    want = wa["model.layers.3.mlp.down_proj.weight"] + 0.5 * (wb["model.layers.1.mlp.down_proj.weight"]
                                                              - wa["model.layers.3.mlp.down_proj.weight"])
    torch.testing.assert_close(got[key], want)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "llava", "gemma3"])
def test_vlm_frankenmerge_keeps_the_vision_tower(tmp_path, family):
    from layouts import LAYOUT

    decoder, _, vision, projector = LAYOUT[family][True][:4]
    base = build_tiny(family, tmp_path / "vl-a", num_layers=3, seed=3)
    other = make_expert(base, tmp_path / "vl-b", seed=4, scale=0.02, pattern=".")
    recipe = {"method": "passthrough", "models": [{"path": str(base), "name": "a"}, {"path": str(other), "name": "b"}],
              "slices": [{"model": "a", "layers": [0, 2]}, {"model": "b", "layers": [1, 3]},
                         {"model": "a", "layers": [2, 3]}]}
    out = tmp_path / "vl"
    omnimerge.merge(recipe, out)
    got, wa, wb = weights(out), weights(base), weights(other)
    tower = [k for k in wa if k.startswith(vision + projector)]
    assert tower and all(torch.equal(got[k], wa[k]) for k in tower)  # the skeleton's tower, untouched
    layer = re.compile(rf"^({re.escape(decoder)}layers\.)(\d+)\.(.+)$")
    plan = [(wa, 0), (wa, 1), (wb, 1), (wb, 2), (wa, 2)]
    layer_keys = [k for k in got if layer.match(k)]
    assert {int(layer.match(k).group(2)) for k in layer_keys} == set(range(5))
    for k in layer_keys:  # restacked under the skeleton's own decoder prefix
        m = layer.match(k)
        src, i = plan[int(m.group(2))]
        assert torch.equal(got[k], src[f"{decoder}layers.{i}.{m.group(3)}"]), k
    text = json.loads((out / "config.json").read_text())["text_config"]
    source = json.loads((base / "config.json").read_text())["text_config"]
    assert text["num_hidden_layers"] == 5
    if "layer_types" in source:  # each output layer keeps its source layer's attention type
        types = source["layer_types"]
        assert text["layer_types"] == [types[0], types[1], types[1], types[2], types[2]]
    check = verify(out)
    assert check.ok and any(c.name == "image forward" for c in check.checks), check.checks
    generate(out)


def test_mergekit_frankenmerge_translates_and_runs(four, tmp_path):
    a, b, _ = four
    cfg = tmp_path / "franken.yml"
    cfg.write_text(f"""
merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 3]}}]
  - sources:
      - model: {b}
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: [0.0, 1.0]
            - value: 1.0
dtype: float32
""")
    r = from_mergekit(yaml.safe_load(cfg.read_text()), str(cfg))
    assert r["method"] == "passthrough" and r["skeleton"] == str(a)
    assert r["slices"][0] == {"sources": [{"model": str(a), "layers": [0, 3], "scale": 1.0}]}
    scale = r["slices"][1]["sources"][0]["scale"]  # the gradient over the slice's own three layers: t = 0, ½, 1
    entries = [(e["filter"], e["value"]) for e in scale]
    assert ("^(?=.*(?:o_proj))language\\.layers\\.2\\.", 0.5) in entries  # b's layer 2 (the slice's middle)
    assert ("^(?=.*(?:o_proj))language\\.layers\\.1\\.", 0.0) in entries
    assert ("^(?=.*(?:o_proj))language\\.layers\\.3\\.", 1.0) in entries
    assert r["components"]["embed"] == "merge" and r["components"]["lm_head"] == "merge"
    out = tmp_path / "out"
    omnimerge.merge(cfg, out)
    got, wa, wb = weights(out), weights(a), weights(b)
    assert torch.equal(got["model.embed_tokens.weight"], wa["model.embed_tokens.weight"])  # the first slice's
    assert torch.equal(got["lm_head.weight"], wb["lm_head.weight"])  # the last slice's (as mergekit)
    assert torch.equal(got["model.norm.weight"], wb["model.norm.weight"])
    assert torch.equal(got["model.layers.3.self_attn.o_proj.weight"], 0 * wb["model.layers.1.self_attn.o_proj.weight"])
    torch.testing.assert_close(got["model.layers.4.self_attn.o_proj.weight"],
                               0.5 * wb["model.layers.2.self_attn.o_proj.weight"])
    assert torch.equal(got["model.layers.4.self_attn.q_proj.weight"], wb["model.layers.2.self_attn.q_proj.weight"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    assert verify(out).ok


def test_mergekit_slices_with_a_method_and_gradients_per_slice(four, tmp_path):
    a, b, _ = four
    r = mk(f"""
merge_method: slerp
base_model: {a}
slices:
  - sources: [{{model: {a}, layer_range: [0, 2]}}, {{model: {b}, layer_range: [0, 2]}}]
    parameters: {{t: [0, 1]}}
  - sources: [{{model: {a}, layer_range: [2, 4]}}, {{model: {b}, layer_range: [2, 4]}}]
parameters:
  t: [0.2, 0.4]
""")
    assert r["base"] == str(a) and r["method"] == "slerp"
    glob = {e["filter"]: e["value"] for e in r["parameters"]["t"]}  # over every output layer, t within its slice
    assert glob["^language\\.layers\\.0\\."] == pytest.approx(0.2) and glob["^language\\.layers\\.1\\."] == 0.4
    assert glob["^language\\.layers\\.2\\."] == pytest.approx(0.2) and glob["^language\\.layers\\.3\\."] == 0.4
    own = {e["filter"]: e["value"] for e in r["slices"][0]["parameters"]["t"]}
    assert own["^language\\.layers\\.0\\."] == 0 and own["^language\\.layers\\.1\\."] == 1
    out = tmp_path / "slerp"
    omnimerge.merge(r, out)
    got, wa, wb = weights(out), weights(a), weights(b)
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], wb["model.layers.1.mlp.up_proj.weight"])  # t = 1
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], wa["model.layers.0.mlp.up_proj.weight"])  # t = 0


def test_mergekit_modules_for_a_vlm(tmp_path):
    a = build_tiny("qwen2_vl", tmp_path / "a", num_layers=2, seed=5)
    b = make_expert(a, tmp_path / "b", seed=6, scale=0.02, pattern=".")
    r = mk(f"""
merge_method: passthrough
modules:
  text_decoder:
    slices:
      - sources: [{{model: {a}, layer_range: [0, 2]}}]
      - sources: [{{model: {b}, layer_range: [0, 2]}}]
  vision_tower:
    models: [{{model: {b}}}]
  multi_modal_projector:
    models: [{{model: {a}}}]
""")
    assert r["components"]["vision"] == {"take": str(b)} and r["components"]["projector"] == {"take": str(a)}
    out = tmp_path / "out"
    omnimerge.merge(r, out)
    got, wa, wb = weights(out), weights(a), weights(b)
    assert all(torch.equal(got[k], wb[k]) for k in wb if k.startswith("visual.") and ".merger." not in k)
    assert all(torch.equal(got[k], wa[k]) for k in wa if k.startswith("visual.merger."))
    assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], wb["model.layers.1.mlp.up_proj.weight"])
    assert verify(out).ok
    with pytest.raises(OmnimergeError, match="unknown module"):
        mk("merge_method: passthrough\nmodules: {audio_tower: {models: [{model: x}]}, text_decoder: {models: "
           "[{model: x}]}}")


def test_mergekit_modules_with_a_method_tokenizer_and_notes(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="omnimerge.mergekit"):
        r = mk("""
merge_method: linear
base_model: a
modules:
  text_decoder:
    models: [{model: a, parameters: {weight: 0.3}}, {model: b, parameters: {weight: 0.7}}]
    parameters: {normalize: false}
  vision_tower:
    models: [{model: a}, {model: b}]
    parameters: {normalize: true}
tokenizer:
  source: union
  pad_to_multiple_of: 8
  tokens:
    "<x>": {source: b, force: true}
    "<y>": {source: {kind: zero}}
""")
    assert r["models"] == [{"path": "a", "weight": 0.3}, {"path": "b", "weight": 0.7}]
    assert r["parameters"] == {"normalize": False}  # the language module's parameters over the global ones
    assert r["components"]["vision"] == {"method": "average", "parameters": {"normalize": True}}
    assert r["components"]["projector"] == "keep" and "no multi_modal_projector module" in caplog.text
    assert r["tokenizer"] == {"source": "union", "tokens": {"<x>": {"source": "b", "force": True},
                                                            "<y>": {"source": {"kind": "zero"}}},
                              "pad_to_multiple_of": 8, "base": "a"}
    with pytest.raises(OmnimergeError, match="omnimerge merges the vision over the same models"):
        mk("merge_method: linear\nmodules: {text_decoder: {models: [{model: a, parameters: {weight: 1}}]}, "
           "vision_tower: {models: [{model: c, parameters: {weight: 1}}]}}")
    with caplog.at_level(logging.WARNING, logger="omnimerge.mergekit"):
        mk("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [0, 1]}], residual_weight: 0.5}, "
           "{sources: [{model: b, layer_range: [0, 1]}]}]")
    assert "residual_weight: mergekit 0.1.5 reads it and does nothing with it" in caplog.text


# ------------------------------------------------------------------------------ the config


def test_per_layer_config_lists_follow_their_layers(four, tmp_path):
    a, b, _ = four
    b2 = tmp_path / "b2"
    shutil.copytree(b, b2)
    cfg = json.loads((b2 / "config.json").read_text())
    cfg["layer_types"] = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    cfg["sliding_window"], cfg["use_sliding_window"] = 16, True
    (b2 / "config.json").write_text(json.dumps(cfg))
    recipe = {"method": "passthrough", "models": [{"path": str(b2), "name": "b"}, {"path": str(a), "name": "a"}],
              "slices": [{"model": "b", "layers": [1, 4]}, {"model": "a", "layers": [0, 1]}]}
    omnimerge.merge(recipe, tmp_path / "out")
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["num_hidden_layers"] == 4
    assert out["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    assert verify(tmp_path / "out").ok


# ------------------------------------------------------------------------------ errors, before any output


@pytest.mark.parametrize("change,words", [
    (lambda r, a, w: r["slices"].append({"model": "a", "layers": [2, 9]}),
     ["slices[1].sources[0]", "layers [2, 9]", "reach past its 4 decoder layers", "at most [0, 4]"]),
    (lambda r, a, w: r["slices"].append({"model": "w", "layers": [0, 1]}),
     ["slices[1].sources[0]", "input_layernorm.weight] is (128,)", "'input_layernorm.weight' is (64,)",
      "hidden sizes differ"]),
    (lambda r, a, w: r.update(method="task_arithmetic", base="a"),
     ["slices[0]: 'task_arithmetic' merges at least 1 model(s) besides the base, the slice has 0"]),
    (lambda r, a, w: r.update(method="task_arithmetic", base="w"), ["the base 'w' is not one of the slice's sources"]),
    (lambda r, a, w: r["slices"][0]["sources"].append({"model": "w", "layers": [0, 2]}),
     ["'passthrough' merges exactly 1 model(s), the slice has 2", "give each slice one source"]),
    (lambda r, a, w: r.update(components={"language": "keep"}), ["components.language: with `slices:`"]),
    (lambda r, a, w: r["slices"].append({"model": "zzz", "layers": [0, 1]}),
     ["slices[1].sources[0].model 'zzz' is not the name or path of a model under `models:`"]),
    (lambda r, a, w: r["slices"].append({"model": "a", "layers": [3, 1]}), ["layers [3, 1] is empty"]),
    (lambda r, a, w: r["slices"].append({"sources": [{"model": "a", "layers": [0, 1], "scale": "x"}]}),
     ["slices[1].sources[0] (a)", "'scale' must be a number"]),
])
def test_bad_slices_fail_before_any_output(four, wide, tmp_path, change, words):
    a = four[0]
    recipe = {"method": "passthrough", "models": [{"path": str(a), "name": "a"}, {"path": str(wide), "name": "w"}],
              "slices": [{"sources": [{"model": "a", "layers": [0, 2]}]}]}
    change(recipe, a, wide)
    out = tmp_path / "out"
    with pytest.raises(OmnimergeError) as e:
        omnimerge.merge(recipe, out)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".omnimerge-" in p.name]


def test_slices_refuse_skeletons_lora_output_analysis_and_data_aware_methods(four, tmp_path):
    from omnimerge.analysis.stats import analyze

    a = str(four[0])
    sliced = {"method": "task_arithmetic", "base": a, "models": [{"path": a}, {"path": str(four[1])}],
              "slices": [{"sources": [{"model": a, "layers": [0, 2]}, {"model": str(four[1]), "layers": [0, 2]}]}]}
    with pytest.raises(OmnimergeError, match="--as-lora: the recipe restacks the layers"):
        omnimerge.merge(sliced, tmp_path / "lora", as_lora=8)
    with pytest.raises(OmnimergeError, match="analyze compares whole models"):
        analyze(sliced, tmp_path / "analysis")
    assert not (tmp_path / "lora").exists()
    with pytest.raises(OmnimergeError, match="cannot be combined with `skeletons:`"):
        build_plan({"method": "passthrough", "skeletons": [a], "slices": [{"model": a, "layers": [0, 1]}]})
    with pytest.raises(OmnimergeError, match="cannot merge restacked layers"):
        build_plan({"method": "regmean", "slices": [{"model": a, "layers": [0, 1]}]})


# ------------------------------------------------------------------------------ vocabularies


def with_new_tokens(src: Path, dst: Path, tokens: list[str], seed: int) -> Path:
    """A copy of `src` whose tokenizer has `tokens` added and whose embedding and lm_head have a row for each."""
    from transformers import AutoTokenizer

    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    n_before = len(tok)
    tok.add_tokens(tokens)
    tok.save_pretrained(dst)
    w = weights(dst)
    rows = w["model.embed_tokens.weight"].shape[0]
    extra = n_before + len(tokens) - rows
    g = torch.Generator().manual_seed(seed)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        w[k] = torch.cat([w[k], torch.randn(extra, w[k].shape[1], generator=g) * 0.02])
    for f in dst.glob("*.safetensors"):
        f.unlink()
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["vocab_size"] = rows + extra
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_tokenizer_union_adds_tokens_and_realigns_rows(four, tmp_path):
    from transformers import AutoTokenizer

    a, b, _ = four
    b_new = with_new_tokens(b, tmp_path / "b-new", ["<tool>", "<think>"], seed=3)
    recipe = {"method": "average", "models": [{"path": str(a)}, {"path": str(b_new)}], "tokenizer_source": "union",
              "components": {"embed": "merge", "lm_head": "merge"}}
    out = tmp_path / "union"
    res = omnimerge.merge(recipe, out)
    assert res.plan.recipe.tokenizer.source == "union" and res.plan.recipe.tokenizer_source is None
    tok = AutoTokenizer.from_pretrained(out)
    ta, tb = AutoTokenizer.from_pretrained(a), AutoTokenizer.from_pretrained(b_new)
    vocab = tok.get_vocab()
    assert "<tool>" in vocab and "<think>" in vocab
    got, wa, wb = weights(out), weights(a), weights(b_new)
    rows_a = wa["model.embed_tokens.weight"].shape[0]
    # a's `<|endoftext|>` (id 384) has no row in a (384 rows): it is dropped, as mergekit drops it
    assert got["model.embed_tokens.weight"].shape == (len(vocab), 64)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(vocab)
    for t in ("<tool>", "<think>"):  # only b has them: b's row
        i = vocab[t]
        assert torch.equal(got["model.embed_tokens.weight"][i], wb["model.embed_tokens.weight"][tb.get_vocab()[t]])
        assert torch.equal(got["lm_head.weight"][i], wb["lm_head.weight"][tb.get_vocab()[t]])
    for t in ("<s>", "Ġthe"):  # both have them: the average of their rows
        i, ia, ib = vocab[t], ta.get_vocab()[t], tb.get_vocab()[t]
        assert ia < rows_a
        want = (wa["model.embed_tokens.weight"][ia] + wb["model.embed_tokens.weight"][ib]) / 2
        torch.testing.assert_close(got["model.embed_tokens.weight"][i], want)
    assert verify(out).ok
    generate(out)


def test_tokenizer_base_overrides_and_padding(four, tmp_path):
    a, b, _ = four
    b_new = with_new_tokens(b, tmp_path / "b-new", ["<tool>"], seed=4)
    recipe = {"method": "task_arithmetic", "base": str(a), "models": [{"path": str(b_new)}],
              "components": {"embed": "merge", "lm_head": "merge"},
              "tokenizer": {"source": "union", "pad_to_multiple_of": 64,
                            "tokens": {"<tool>": {"source": {"kind": "zero"}},
                                       "<s>": {"source": {"kind": "model_token", "model": str(a), "token": "</s>"},
                                               "force": True}}}}
    out = tmp_path / "tok"
    omnimerge.merge(recipe, out)
    from transformers import AutoTokenizer

    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    got, wa = weights(out), weights(a)
    emb = got["model.embed_tokens.weight"]
    assert emb.shape[0] % 64 == 0 and emb.shape[0] >= len(vocab)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == emb.shape[0]
    torch.testing.assert_close(emb[len(vocab):], emb[:len(vocab)].mean(0).expand(emb.shape[0] - len(vocab), -1))
    # <tool>: zero in the base (which lacks it), b's own row in b (not forced): base + λ(b − base) = b's row
    wb = weights(b_new)
    tool_b = AutoTokenizer.from_pretrained(b_new).get_vocab()["<tool>"]
    torch.testing.assert_close(emb[vocab["<tool>"]], wb["model.embed_tokens.weight"][tool_b])
    assert torch.equal(emb[vocab["<s>"]], wa["model.embed_tokens.weight"][2])  # forced for both: a's </s> row
    omnimerge.merge(out / "omnimerge.yaml", tmp_path / "tok-again")
    assert torch.equal(weights(tmp_path / "tok-again")["model.embed_tokens.weight"], emb)
    assert verify(out).ok

    kept = {"method": "average", "models": [{"path": str(b_new)}], "tokenizer": {"source": str(a)}}
    omnimerge.merge(kept, tmp_path / "kept")  # the skeleton's (b's) rows, realigned to a's tokenizer: <tool> gone
    k = weights(tmp_path / "kept")
    tok_a = AutoTokenizer.from_pretrained(tmp_path / "kept").get_vocab()
    assert "<tool>" not in tok_a and k["model.embed_tokens.weight"].shape[0] == len(tok_a)


# ------------------------------------------------------------------- parity with mergekit (optional)


@pytest.mark.skipif(not os.environ.get("OMNIMERGE_MERGEKIT_VENV"),
                    reason="set OMNIMERGE_MERGEKIT_VENV to a venv with mergekit 0.1.5 to compare with mergekit")
def test_parity_with_mergekit(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "mergekit_parity_slices", Path(__file__).parent.parent / "measurements" / "mergekit_parity_slices.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.run(tmp_path, Path(os.environ["OMNIMERGE_MERGEKIT_VENV"]))
    for r in rows:
        assert r["ok"], r
