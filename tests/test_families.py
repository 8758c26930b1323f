"""Families: every tiny family, in both on-disk layouts, aligns to the same canonical keys, and every raw
key lands in the component that a hand-written table (independent of omnimerge's own table) expects."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import omnimerge
from omnimerge.checkpoints import load_checkpoint
from omnimerge.tiny import AUDIO_FAMILIES, FAMILIES, PAIRS, VLM_FAMILIES

from layouts import FAMILY_NAME, LAYOUT


def expected(raw: str, layout) -> tuple[str, str] | None:
    """(component, canonical key or the tail it must end with) for one raw key; None if unknown."""
    dec, head, vision, projector, *audio = layout
    if raw == head:
        return "lm_head", "lm_head.weight"
    if raw == dec + "embed_tokens.weight":
        return "embed", "embed.weight"
    if raw.startswith((dec + "layers.", dec + "norm.")):
        return "language", "language." + raw[len(dec):]
    for p in sorted(projector, key=len, reverse=True):
        if raw.startswith(p):
            return "projector", raw[len(p):]
    for p in vision:
        if raw.startswith(p):
            return "vision", raw[len(p):]
    for p in audio[0] if audio else ():
        if raw.startswith(p):
            return "audio", raw[len(p):]
    return None


def raw_keys(folder: Path) -> dict[str, tuple[int, ...]]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                out[k] = tuple(h.get_slice(k).get_shape())
    return out


def component(canonical: str) -> str:
    return canonical.split(".", 1)[0]


def test_table_covers_every_tiny_family():
    assert set(LAYOUT) == set(FAMILIES)


@pytest.mark.parametrize("original", [True, False], ids=["hub", "t5"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_raw_key_in_its_component(zoo, family, original):
    folder = zoo.base(family, save_original_format=original)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == family
    ckpt = load_checkpoint(str(folder))
    assert ckpt.family.name == FAMILY_NAME.get(family, family)
    assert cfg["model_type"] in ckpt.family.model_types
    assert not ckpt.inferred and ckpt.note == ""
    assert ckpt.family.kind == ("vlm" if family in VLM_FAMILIES else "audio" if family in AUDIO_FAMILIES else "text")

    keys = raw_keys(folder)
    assert set(ckpt.raw_to_canon) == set(keys)
    seen = set()
    for raw in keys:
        want = expected(raw, LAYOUT[family][original])
        assert want is not None, f"{raw}: not in the test's table (would be 'other')"
        comp, canon = want
        got = ckpt.raw_to_canon[raw]
        assert component(got) == comp, (raw, got)
        if comp in ("language", "embed", "lm_head"):
            assert got == canon, raw
        else:
            assert got.endswith(canon), (raw, got)
        assert ckpt.canon_to_raw[got] == raw
        seen.add(comp)
    assert "other" not in ckpt.components()
    if family in VLM_FAMILIES:
        assert seen == {"language", "embed", "lm_head", "vision", "projector"}
    elif family in AUDIO_FAMILIES:
        assert seen == {"language", "embed", "lm_head", "audio", "projector"}
    else:
        assert seen == {"language", "embed", "lm_head"}
    by_comp = ckpt.components()
    assert sorted(sum(by_comp.values(), [])) == sorted(keys)

    text_cfg = cfg.get("text_config", cfg)
    assert ckpt.layer_count() == text_cfg["num_hidden_layers"] == 2
    assert not ckpt.tied_lm_head


@pytest.mark.parametrize("family", FAMILIES)
def test_both_layouts_give_the_same_canonical_keys(zoo, family):
    a = load_checkpoint(str(zoo.base(family)))
    b = load_checkpoint(str(zoo.base(family, save_original_format=False)))
    assert set(a.canon_to_raw) == set(b.canon_to_raw)
    for canon in a.canon_to_raw:
        assert a.info(canon) == b.info(canon), canon
    # the same seed builds the same weights: reading by canonical key finds the same tensor
    for canon in ("language.layers.1.self_attn.q_proj.weight", "embed.weight", "lm_head.weight"):
        assert torch.equal(a.read(canon), b.read(canon)), canon


@pytest.mark.parametrize("family,num_layers", [("qwen2_vl", 3), ("llava", 3), ("idefics3", 4)])
def test_layer_count_follows_config(zoo, family, num_layers):
    folder = zoo.base(family, num_layers=num_layers)
    ckpt = load_checkpoint(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    assert ckpt.layer_count() == cfg["text_config"]["num_hidden_layers"] == num_layers


@pytest.mark.parametrize("text,vlm", PAIRS)
def test_text_partner_has_the_vlm_language_keys(zoo, text, vlm):
    t = load_checkpoint(str(zoo.base(text)))
    v = load_checkpoint(str(zoo.base(vlm)))
    lang = {c for c in v.canon_to_raw if component(c) in ("language", "embed", "lm_head")}
    assert any(c.startswith("language.layers.") for c in lang)
    assert {"embed.weight", "lm_head.weight", "language.norm.weight"} <= lang
    assert set(t.canon_to_raw) == lang
    for canon in lang:
        assert t.info(canon) == v.info(canon), canon


def _rename_keys(src: Path, dst: Path, old: str, new: str) -> Path:
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    sd = load_file(str(f))
    renamed = {(new + k[len(old):] if k.startswith(old) else k): v for k, v in sd.items()}
    assert renamed.keys() != sd.keys()
    save_file(renamed, str(f), metadata=meta)
    return dst


@pytest.mark.parametrize("original,old,new", [
    (True, "vision_tower.", "vision_tower.vision_model."),
    (False, "model.vision_tower.", "model.vision_tower.vision_model."),
], ids=["hub", "t5"])
def test_hub_style_llava_vision_tower(zoo, tmp_path, original, old, new):
    src = zoo.base("llava", save_original_format=original)
    hub = _rename_keys(src, tmp_path / "hub-llava", old, new)
    a, b = load_checkpoint(str(src)), load_checkpoint(str(hub))
    assert any(k.startswith(new) for k in b.raw_to_canon)
    vis_a = {c for c in a.canon_to_raw if component(c) == "vision"}
    vis_b = {c for c in b.canon_to_raw if component(c) == "vision"}
    assert vis_a and vis_a == vis_b
    assert set(a.canon_to_raw) == set(b.canon_to_raw)
    assert "vision.embeddings.patch_embedding.weight" in vis_b
    for canon in vis_a:
        assert b.raw_key(canon).startswith(new)
        assert torch.equal(a.read(canon), b.read(canon)), canon


@pytest.mark.parametrize("family", ["qwen2", "qwen2_vl", "llava", "gemma3"])
def test_tied_embeddings(zoo, family):
    ckpt = load_checkpoint(str(zoo.base(family, tie_word_embeddings=True)))
    assert "lm_head.weight" not in ckpt.canon_to_raw  # no head tensor on disk
    assert not any(component(c) == "lm_head" for c in ckpt.canon_to_raw)
    assert ckpt.tied_lm_head
    assert ckpt.has("lm_head.weight") and ckpt.has("embed.weight")
    assert ckpt.raw_key("lm_head.weight") == ckpt.canon_to_raw["embed.weight"]
    assert ckpt.info("lm_head.weight") == ckpt.info("embed.weight")
    assert torch.equal(ckpt.read("lm_head.weight"), ckpt.read("embed.weight"))
    assert not ckpt.has("lm_head.bias")


def _mystery(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model_type"] = "mystery"
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("family,original", [("qwen2", True), ("qwen2_vl", True), ("qwen2_vl", False)])
def test_generic_fallback_infers_the_decoder(zoo, tmp_path, family, original):
    src = zoo.base(family, save_original_format=original)
    ckpt = load_checkpoint(str(_mystery(src, tmp_path / "mystery")))
    dec, head, vision, projector = LAYOUT[family][original]
    assert ckpt.inferred
    assert ckpt.family.decoder == (dec,)
    assert "mystery" in ckpt.note and repr(dec) in ckpt.note
    known = load_checkpoint(str(src))
    for raw, canon in ckpt.raw_to_canon.items():
        comp, _ = expected(raw, LAYOUT[family][original])
        if comp in ("language", "embed", "lm_head"):
            assert canon == known.raw_to_canon[raw], raw  # same canonical keys as the known family
        else:  # the visual tree is found by name; its merger may count as vision or projector
            assert component(canon) in ("vision", "projector"), (raw, canon)
            assert component(canon) == comp or raw.startswith(projector), (raw, canon)
    assert ckpt.layer_count() == 2 and not ckpt.tied_lm_head


# A CLIP/SigLIP tower has `vision_tower.encoder.layers.<i>.self_attn.*` too: the generic fallback must not
# take it for a second decoder.
@pytest.mark.parametrize("original", [True, False], ids=["hub", "t5"])
def test_generic_fallback_with_a_vit_tower(zoo, tmp_path, original):
    src = zoo.base("llava", save_original_format=original)
    ckpt = load_checkpoint(str(_mystery(src, tmp_path / "mystery")))
    dec, head, vision, projector = LAYOUT["llava"][original]
    assert ckpt.inferred and ckpt.family.decoder == (dec,)
    for raw, canon in ckpt.raw_to_canon.items():
        if raw.startswith(vision):
            assert component(canon) == "vision", (raw, canon)
    assert ckpt.layer_count() == 2


def test_generic_without_layers_is_all_other(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mystery"}))
    save_file({"encoder.w": torch.ones(2, 2), "head.b": torch.zeros(2)}, str(folder / "model.safetensors"))
    ckpt = load_checkpoint(str(folder))
    assert ckpt.inferred and "no decoder layers" in ckpt.note
    assert ckpt.raw_to_canon == {"encoder.w": "other.encoder.w", "head.b": "other.head.b"}
    assert ckpt.layer_count() == 0


def test_generic_fallback_merges_end_to_end(zoo, tmp_path):
    base = zoo.base("qwen2")
    e1, e2 = zoo.experts("qwen2", 2)
    mystery = _mystery(e1, tmp_path / "mystery")
    out = tmp_path / "out"
    recipe = {"method": "task_arithmetic", "base": str(base), "skeleton": str(mystery),
              "models": [{"path": str(mystery), "weight": 0.75}, {"path": str(e2), "weight": 0.5}]}
    result = omnimerge.merge(recipe, out)
    assert any("mystery" in n and "inferred" in n for n in result.plan.notes)
    got, b, m, e = (load_file(str(p / "model.safetensors")) for p in (out, base, mystery, e2))
    assert set(got) == set(m)
    n_lang = 0
    for key, t in got.items():
        if key.startswith(("model.layers.", "model.norm.")):
            want = b[key] + 0.75 * (m[key] - b[key]) + 0.5 * (e[key] - b[key])
            torch.testing.assert_close(t, want, rtol=1e-6, atol=1e-6)
            n_lang += 1
        else:  # embed and lm_head: kept from the skeleton (the mystery model)
            assert torch.equal(t, m[key]), key
    assert n_lang == 25
    assert json.loads((out / "config.json").read_text())["model_type"] == "mystery"


def test_model_class_takes_only_model_classes():
    """config.json's architectures name a transformers model class; any other attribute (a function, a
    config class, a module) is passed over, and nothing left is a clear error."""
    import transformers

    from omnimerge.errors import OmnimergeError
    from omnimerge.families.models import model_class

    assert model_class({"architectures": ["Qwen2Config", "Qwen2ForCausalLM"]}) is transformers.Qwen2ForCausalLM
    for archs in (["pipeline"], ["Qwen2Config"], ["logging"], [3], "Qwen2ForCausalLM", None):
        with pytest.raises(OmnimergeError, match="architectures"):
            model_class({"architectures": archs})
