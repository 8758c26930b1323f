"""Tiny random models: every family builds, reloads, runs; pairs share language shapes; make_expert."""

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from omnimerge import tiny
from omnimerge.families import probes
from omnimerge.families.probes import probe_inputs
from omnimerge.families.table import MODEL_TYPES

REQUIRED = {"qwen2", "qwen3", "llama", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "internvl"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {family: tiny.build_tiny(family, root / family) for family in tiny.FAMILIES}


def load(path):
    config = transformers.AutoConfig.from_pretrained(path)
    return getattr(transformers, config.architectures[0]).from_pretrained(path).eval()


def test_required_families_present():
    assert REQUIRED <= set(tiny.FAMILIES)
    assert set(tiny.TEXT_FAMILIES) | set(tiny.VLM_FAMILIES) | set(tiny.AUDIO_FAMILIES) == set(tiny.FAMILIES)


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_build_load_forward(built, family):
    model = load(built[family])
    assert model.config.architectures == [MODEL_TYPES[family].model_class]
    with torch.no_grad():
        logits = model(**probe_inputs(model)).logits
        assert torch.isfinite(logits).all()
        if family in tiny.VLM_FAMILIES:
            torch.manual_seed(0)
            first = model(**probe_inputs(model, image=True)).logits
            second = model(**probe_inputs(model, image=True)).logits  # other random pixels
            assert torch.isfinite(first).all()
            assert not torch.allclose(first[0, -1], second[0, -1])  # the image reaches the text
        if family in tiny.AUDIO_FAMILIES:
            first = model(**probe_inputs(model, audio=True)).logits
            second = model(**probe_inputs(model, audio=True)).logits  # another random clip
            assert torch.isfinite(first).all()
            assert not torch.allclose(first[0, -1], second[0, -1])  # the audio reaches the text


@pytest.mark.parametrize("family", tiny.VLM_FAMILIES)
def test_tokenizer_matches_config(built, family):
    tok = transformers.AutoTokenizer.from_pretrained(built[family])
    config = transformers.AutoConfig.from_pretrained(built[family])
    image_token = tiny.SPECS[family].tokens["image_token_id"]
    assert tok.convert_tokens_to_ids(image_token) == probes.image_token_id(config)
    assert len(tok) <= config.get_text_config().vocab_size
    assert json.loads((built[family] / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id


@pytest.mark.parametrize("family", tiny.AUDIO_FAMILIES)
def test_audio_token_and_feature_extractor_match_config(built, family):
    tok = transformers.AutoTokenizer.from_pretrained(built[family])
    config = transformers.AutoConfig.from_pretrained(built[family])
    assert tok.convert_tokens_to_ids(tiny.SPECS[family].tokens["audio_token_index"]) == probes.audio_token_id(config)
    features = transformers.AutoFeatureExtractor.from_pretrained(built[family])
    clip = torch.randn(features.sampling_rate).numpy()  # one second
    got = features(clip, sampling_rate=features.sampling_rate, return_tensors="pt")["input_features"]
    assert tuple(got.shape) == (1, config.audio_config.num_mel_bins, 2 * config.audio_config.max_source_positions)


def test_backbone_option_copies_the_language_model(tmp_path):
    text = tiny.build_tiny("qwen2", tmp_path / "text", seed=7)
    audio = load(tiny.build_tiny("qwen2_audio", tmp_path / "audio", seed=1, backbone=text))
    donor, fresh = load(text), tiny.build_model("qwen2_audio", seed=1)
    assert all(torch.equal(v, donor.get_decoder().state_dict()[k]) for k, v in audio.get_decoder().state_dict().items())
    assert torch.equal(audio.get_output_embeddings().weight, donor.get_output_embeddings().weight)
    tower = dict(fresh.named_parameters())
    assert all(torch.equal(p, tower[k]) for k, p in audio.named_parameters() if "audio_tower" in k), "encoder: its own"


def language_shapes(model):
    shapes = {k: tuple(v.shape) for k, v in model.get_decoder().state_dict().items()}
    shapes["lm_head"] = tuple(model.get_output_embeddings().weight.shape)
    return shapes


@pytest.mark.parametrize("text,vlm", tiny.PAIRS)
def test_pairs_share_language_shapes(text, vlm):
    assert language_shapes(tiny.build_model(text)) == language_shapes(tiny.build_model(vlm))


def test_size_overrides_keep_pairs_aligned():
    kw = dict(hidden_size=128, intermediate_size=192, num_layers=3, vocab_size=512)
    a, b = tiny.build_model("qwen2", **kw), tiny.build_model("qwen2_vl", **kw)
    assert language_shapes(a) == language_shapes(b)
    assert language_shapes(a)["lm_head"] == (512, 128)
    assert language_shapes(a)["layers.2.mlp.up_proj.weight"] == (192, 128)


def test_make_expert_changes_matched_tensors_only(tmp_path):
    base = tiny.build_tiny("qwen2_vl", tmp_path / "base", dtype=torch.bfloat16)
    expert = tiny.make_expert(base, tmp_path / "expert", seed=1, scale=0.01, pattern=r"^model\.layers\.")
    again = tiny.make_expert(base, tmp_path / "again", seed=1, scale=0.01, pattern=r"^model\.layers\.")
    assert {p.name for p in base.iterdir()} == {p.name for p in expert.iterdir()}
    a, b = load_file(base / "model.safetensors"), load_file(expert / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert b[key].dtype == a[key].dtype == torch.bfloat16
        assert torch.equal(a[key], b[key]) != key.startswith("model.layers."), key
    c = load_file(again / "model.safetensors")
    assert all(torch.equal(v, c[k]) for k, v in b.items())  # seeded
    with safe_open(str(expert / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
