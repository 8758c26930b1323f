"""LoRA adapters as output: `merge --as-lora RULE`, `extract MODEL --base BASE`, and `--push-to-hub`.

The adapters are loaded with PEFT itself (`PeftModel.from_pretrained`) and compared with the full
merge (or the fine-tune) by their logits, and their factors with a hand-made truncated SVD.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file

import omnimerge
from omnimerge.checkpoints.peft_writer import target_names
from omnimerge.checkpoints.card import input_name, model_card
from omnimerge.cli import main
from omnimerge.run.outputs.lora import lora_factors, parse_rank
from omnimerge.methods.ranks import choose_rank, knee
from omnimerge.families.probes import probe_inputs
from conftest import leftovers
from test_cli import COMMIT, hub  # noqa: F401 - the fake Hugging Face cache fixture

PREFIX = "base_model.model."
CLASSES = {"qwen2": "Qwen2ForCausalLM", "qwen2_vl": "Qwen2VLForConditionalGeneration",
           "llava_onevision": "LlavaOnevisionForConditionalGeneration"}


def load(family, folder, adapter=None):
    import peft
    import transformers

    model = getattr(transformers, CLASSES[family]).from_pretrained(folder).eval()
    return peft.PeftModel.from_pretrained(model, str(adapter)).eval() if adapter else model


def logits(model, image):
    torch.manual_seed(0)  # the dummy image is random
    with torch.no_grad():
        return model(**probe_inputs(model, image=image)).logits


def recipe(zoo, family, n=2):
    return {"method": "task_arithmetic", "base": str(zoo.base(family)),
            "models": [{"path": str(e), "weight": 0.7} for e in zoo.experts(family, n)]}


# --- the factorisation, against its definition ---------------------------------------------------
def test_factors_are_the_balanced_truncated_svd():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(40, 6, generator=g) @ torch.randn(6, 30, generator=g)  # rank 6
    b, a, k = lora_factors(delta, 1.0)
    assert k == 30 and b.shape == (40, 30) and a.shape == (30, 30)
    torch.testing.assert_close(b @ a, delta, rtol=0, atol=1e-5)
    b, a, k = lora_factors(delta, 6)
    torch.testing.assert_close(b @ a, delta, rtol=0, atol=1e-5)  # rank 6 holds it all
    noisy = delta + 0.1 * torch.randn(40, 30, generator=g)
    u, s, vh = torch.linalg.svd(noisy, full_matrices=False)
    for rule, want in ((3, 3), (0.25, 7), ("knee", knee(s)), ("energy:0.5", choose_rank("energy:0.5", (40, 30), s))):
        b, a, k = lora_factors(noisy, rule)
        assert k == want
        torch.testing.assert_close(b @ a, (u[:, :k] * s[:k]) @ vh[:k], rtol=0, atol=1e-5)  # Eckart–Young
        torch.testing.assert_close(b.norm(dim=0), a.norm(dim=1), rtol=1e-5, atol=1e-6)  # S^½ on each side
        torch.testing.assert_close(b.norm(dim=0) ** 2, s[:k], rtol=1e-5, atol=1e-6)


def test_factors_of_a_large_matrix_take_the_gram_routes():
    """min(m, n) >= 512: linalg.truncate, then an exact factorisation of its rank-k result."""
    g = torch.Generator().manual_seed(1)
    s_true = torch.logspace(0, -3, 520)
    q1, _ = torch.linalg.qr(torch.randn(600, 520, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(520, 520, generator=g))
    delta = (q1 * s_true) @ q2.T
    b, a, k = lora_factors(delta, 8, torch.Generator().manual_seed(0))
    assert k == 8
    best = (q1[:, :8] * s_true[:8]) @ q2[:, :8].T
    assert float((b @ a - best).norm() / best.norm()) < 1e-3


def test_rank_text_and_target_names():
    assert [parse_rank(x) for x in ("16", "0.25", "1.0", "knee", "energy:0.9", 8)] == [16, 0.25, 1.0, "knee",
                                                                                      "energy:0.9", 8]
    with pytest.raises(omnimerge.OmnimergeError, match="rank 'kne'"):
        parse_rank("kne")
    mods = ["m.layers.0.q_proj", "m.layers.1.q_proj", "v.blocks.0.q_proj", "m.layers.0.o_proj", "v.proj", "m.proj"]
    # a short name only where every module of that name is adapted
    assert target_names({"m.layers.0.q_proj", "m.layers.1.q_proj", "m.layers.0.o_proj"}, mods) == [
        "o_proj", "m.layers.0.q_proj", "m.layers.1.q_proj"]
    assert target_names(set(mods[:3]) | {"m.proj"}, mods) == ["m.proj", "q_proj"]


# --- merge --as-lora, end to end ----------------------------------------------------------------
@pytest.mark.parametrize("family,prefix", [("qwen2", "model."), ("qwen2_vl", "model.language_model.")])
def test_full_rank_adapter_reproduces_the_merge(zoo, tmp_path, family, prefix):
    image = family != "qwen2"
    full, ad = tmp_path / "full", tmp_path / "adapter"
    omnimerge.merge(recipe(zoo, family), full)
    res = omnimerge.merge(recipe(zoo, family), ad, as_lora="1.0")
    assert sorted(p.name for p in ad.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                                   "omnimerge.yaml", "report.json"]
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == str(zoo.base(family)) and cfg["lora_alpha"] == cfg["r"] == 64
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    # k_proj / v_proj are 32 × 64: full rank 32, set per module, with alpha = rank (scale 1)
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == {
        re.escape(f"{prefix}layers.{i}.self_attn.{p}"): 32 for i in (0, 1) for p in ("k_proj", "v_proj")}
    # the experts' noise touched norms and q/k/v biases too: saved whole / as LoRA-layer biases
    assert cfg["bias"] == "lora_only"
    assert cfg["modules_to_save"] == [f"{prefix}layers.{i}.{n}" for i in (0, 1)
                                      for n in ("input_layernorm", "post_attention_layernorm")]
    keys = set(load_file(str(ad / "adapter_model.safetensors")))
    assert f"{PREFIX}{prefix}layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert f"{PREFIX}{prefix}layers.1.self_attn.v_proj.base_layer.bias" in keys
    assert f"{PREFIX}{prefix}layers.1.input_layernorm.weight" in keys
    assert not any("visual" in k or "embed" in k or "lm_head" in k for k in keys)
    summary = json.loads((ad / "report.json").read_text())["lora"]
    assert summary == res.adapter and summary["lost_fraction"] == 0 and summary["relative_error"] < 1e-5

    want = logits(load(family, full), image)
    got = logits(load(family, zoo.base(family), ad), image)
    moved = (logits(load(family, zoo.base(family)), image) - want).abs().max()
    diff = (got - want).abs().max()
    assert moved > 0.1 and diff < 1e-4, (float(diff), float(moved))

    # omnimerge reads its own adapter back as base + B·A: the full merge's tensors
    back = tmp_path / "back"
    omnimerge.merge({"method": "average", "models": [{"path": str(ad)}], "skeleton": str(zoo.base(family))}, back)
    a, b = load_file(str(back / "model.safetensors")), load_file(str(full / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-6)


def test_low_rank_adapter_is_the_truncated_delta(zoo, tmp_path):
    base, ad, full = zoo.base("qwen2"), tmp_path / "adapter", tmp_path / "full"
    omnimerge.merge(recipe(zoo, "qwen2"), full)
    res = omnimerge.merge(recipe(zoo, "qwen2"), ad, as_lora="knee")
    cfg = json.loads((ad / "adapter_config.json").read_text())
    report = json.loads((ad / "report.json").read_text())["tensors"]
    f, b, lora = (load_file(str(p)) for p in (full / "model.safetensors", base / "model.safetensors",
                                              ad / "adapter_model.safetensors"))
    ranks = {}
    for key, t in report.items():
        if t["as"] != "lora":
            continue
        delta = f[key] - b[key]
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = knee(s)
        assert t["rank"] == k
        mod = key.removesuffix(".weight")
        B, A = lora[f"{PREFIX}{mod}.lora_B.weight"], lora[f"{PREFIX}{mod}.lora_A.weight"]
        torch.testing.assert_close(B @ A, (u[:, :k] * s[:k]) @ vh[:k], rtol=0, atol=1e-5)
        ranks[mod] = k
    assert len(ranks) == 14 and len(set(ranks.values())) > 1
    # per-module ranks reach PEFT through rank_pattern / alpha_pattern
    pm = load("qwen2", base, ad)
    for mod, k in ranks.items():
        layer = pm.base_model.model.get_submodule(mod)
        assert layer.r["default"] == k and layer.scaling["default"] == 1.0
    assert 0.2 < res.adapter["residual_fraction"] < 1 and res.adapter["r"] == cfg["r"]
    # PEFT and omnimerge's own reading of the adapter agree
    back = tmp_path / "back"
    omnimerge.merge({"method": "average", "models": [{"path": str(ad)}], "skeleton": str(base)}, back)
    assert (logits(pm, False) - logits(load("qwen2", back), False)).abs().max() < 1e-4


def test_as_lora_errors_before_writing(zoo, tmp_path):
    out = tmp_path / "out"
    no_base = {"method": "average", "models": [{"path": str(e)} for e in zoo.experts("qwen2", 2)]}
    with pytest.raises(omnimerge.OmnimergeError, match="no base"):
        omnimerge.merge(no_base, out, as_lora=8)
    text_base = {"method": "task_arithmetic", "base": str(zoo.base("qwen2")), "skeleton": str(zoo.base("qwen2_vl")),
                 "models": [{"path": str(zoo.base("qwen2_vl"))}]}
    with pytest.raises(omnimerge.OmnimergeError, match="cannot change the architecture"):
        omnimerge.merge(text_base, out, as_lora=8)
    with pytest.raises(omnimerge.OmnimergeError, match="unknown rank rule"):
        omnimerge.merge(recipe(zoo, "qwen2"), out, as_lora="kne")
    with pytest.raises(omnimerge.OmnimergeError, match="nothing changed"):
        omnimerge.merge({**recipe(zoo, "qwen2"), "models": [{"path": str(zoo.base("qwen2"))}]}, out, as_lora=8)
    assert not out.exists() and leftovers(tmp_path) == []


def test_cli_as_lora_force_and_dry_run(zoo, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(zoo, "qwen2_vl")))
    out = tmp_path / "out"
    assert main(["merge", str(path), "-o", str(out), "--as-lora", "4", "--dry-run"]) == 0
    assert not out.exists()
    assert main(["merge", str(path), "-o", str(out), "--as-lora", "4"]) == 0, capsys.readouterr().err
    assert "LoRA adapter: 14 modules, rank 4–4" in " ".join(capsys.readouterr().out.split())
    assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"] == {}
    assert main(["merge", str(path), "-o", str(out), "--as-lora", "2"]) == 2
    assert "--force" in capsys.readouterr().err
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4  # untouched
    assert main(["merge", str(path), "-o", str(out), "--as-lora", "2", "--force"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    assert leftovers(tmp_path) == []


# --- extract --------------------------------------------------------------------------------------
def test_extract_reproduces_the_fine_tune(zoo, tmp_path, capsys):
    base, tuned = zoo.base("qwen2_vl"), zoo.expert("qwen2_vl", 1)
    ad = tmp_path / "adapter"
    assert main(["extract", str(tuned), "--base", str(base), "-o", str(ad), "--rank", "1.0"]) == 0
    got = logits(load("qwen2_vl", base, ad), True)
    want = logits(load("qwen2_vl", tuned), True)
    assert (got - want).abs().max() < 1e-4
    card = (ad / "README.md").read_text()
    head = yaml.safe_load(card.split("---")[1])
    assert head == {"base_model": [base.name], "base_model_relation": "adapter", "library_name": "peft",
                    "tags": ["omnimerge", "lora", "extracted"]}
    assert not (ad / "omnimerge.yaml").exists()
    report = json.loads((ad / "report.json").read_text())
    assert report["kind"] == "lora_extract" and report["model"] == str(tuned)
    # the same through the Python API at a small rank: (out × 2) and (2 × in) factors
    res = omnimerge.extract(tuned, base, tmp_path / "r2", rank=2, out_dtype="bfloat16")
    t = load_file(str(tmp_path / "r2" / "adapter_model.safetensors"))
    a = t[f"{PREFIX}model.language_model.layers.0.mlp.down_proj.lora_A.weight"]
    assert a.shape == (2, 128) and a.dtype == torch.bfloat16 and res.adapter["ranks"] == {"min": 2, "max": 2,
                                                                                         "mean": 2.0}


def test_extract_tied_embeddings(zoo, tmp_path):
    """A changed embedding of a tied model: LoRA on the embedding and the same factors on lm_head."""
    from omnimerge.tiny import make_expert

    base = zoo.base("qwen2", tie_word_embeddings=True)
    tuned = make_expert(base, tmp_path / "tuned", seed=5, scale=0.02, pattern=r"embed_tokens|q_proj")
    ad = tmp_path / "adapter"
    res = omnimerge.extract(tuned, base, ad, rank=1.0)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["embed_tokens", "lm_head", "q_proj"]
    t = load_file(str(ad / "adapter_model.safetensors"))
    torch.testing.assert_close(t[f"{PREFIX}lm_head.lora_A.weight"], t[f"{PREFIX}model.embed_tokens.lora_embedding_B"].T)
    assert any("ties lm_head" in n for n in res.plan.notes)
    assert (logits(load("qwen2", base, ad), False) - logits(load("qwen2", tuned), False)).abs().max() < 1e-4


def test_extract_reports_what_an_adapter_cannot_carry(zoo, tmp_path):
    """LLaVA-OneVision's image_newline is a parameter of the model itself, not of a layer: lost, and said so."""
    from omnimerge.tiny import make_expert

    base = zoo.base("llava_onevision")
    tuned = make_expert(base, tmp_path / "tuned", seed=5, scale=0.02, pattern=r"image_newline|q_proj")
    res = omnimerge.extract(tuned, base, tmp_path / "adapter", rank=1.0)
    b, t = load_file(str(base / "model.safetensors")), load_file(str(tuned / "model.safetensors"))
    changed = {k: float((t[k] - b[k]).norm()) for k in b if not torch.equal(t[k], b[k])}
    lost = [k for k in changed if "image_newline" in k]
    assert res.adapter["lost_tensors"] == lost and len(lost) == 1
    total = sum(v * v for v in changed.values()) ** 0.5
    assert res.adapter["lost_fraction"] == pytest.approx(changed[lost[0]] / total, rel=1e-4)
    assert any("cannot carry 1 changed tensor" in n for n in res.plan.notes)
    report = json.loads((tmp_path / "adapter" / "report.json").read_text())
    assert report["tensors"][lost[0]]["as"] == "lost"


def test_extract_shape_mismatch_is_a_clear_error(zoo, tmp_path):
    with pytest.raises(omnimerge.OmnimergeError, match="cannot change a tensor's shape"):
        omnimerge.extract(zoo.base("qwen2", vocab_size=448), zoo.base("qwen2"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- the Hub --------------------------------------------------------------------------------------
def test_push_to_hub_calls(zoo, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo",
                        lambda repo_id, **kw: calls.append(("create", repo_id, kw)) or f"https://hf.co/{repo_id}")
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(("upload", kw)))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(zoo, "qwen2")))
    out = tmp_path / "out"
    assert main(["merge", str(path), "-o", str(out), "--as-lora", "4", "--push-to-hub", "me/merged",
                 "--private"]) == 0
    assert "uploaded to https://hf.co/me/merged" in capsys.readouterr().out
    assert calls[0] == ("create", "me/merged", {"private": True, "exist_ok": True, "repo_type": "model"})
    kw = calls[1][1]
    assert kw["repo_id"] == "me/merged" and kw["folder_path"] == str(out) and kw["repo_type"] == "model"
    calls.clear()
    assert main(["extract", str(zoo.expert("qwen2", 1)), "--base", str(zoo.base("qwen2")), "-o",
                 str(tmp_path / "x"), "--push-to-hub", "me/x"]) == 0
    assert calls[0][2]["private"] is False and calls[1][1]["folder_path"] == str(tmp_path / "x")
    calls.clear()
    # a bad repo id fails before the merge
    assert main(["merge", str(path), "-o", str(tmp_path / "y"), "--push-to-hub", "me/a--b"]) == 2
    assert "not a Hub repo id" in capsys.readouterr().err and not (tmp_path / "y").exists() and not calls


def test_push_failure_keeps_the_output(zoo, tmp_path, monkeypatch):
    import huggingface_hub

    def refuse(*a, **kw):
        raise RuntimeError("401 Unauthorized")

    monkeypatch.setattr(huggingface_hub, "create_repo", refuse)
    out = tmp_path / "out"
    with pytest.raises(omnimerge.OmnimergeError, match=r"was written, but uploading .*401.*hf upload me/m"):
        omnimerge.merge(recipe(zoo, "qwen2"), out, push_to_hub="me/m")
    assert (out / "model.safetensors").is_file()


def test_card_names(tmp_path):
    snap = tmp_path / "hub" / "models--org--tiny-model" / "snapshots" / COMMIT
    assert input_name("org/tiny-model@v1", snap) == "org/tiny-model"
    assert input_name("org/tiny-model@v1") == "org/tiny-model"  # not resolved: taken as written, less the revision
    assert input_name("experts/a", tmp_path / "experts" / "a") == "a"  # a local folder that looks like a hub id
    assert input_name(str(tmp_path / "b")) == "b"
    card = model_card(method="task_arithmetic", reference="ref", base="org/tiny-model@v1",
                      models=["experts/a", "org/tiny-model"], skeleton="s", recipe_yaml="method: x", components={},
                      paths={"org/tiny-model@v1": snap, "experts/a": tmp_path / "experts" / "a", "org/tiny-model": snap})
    assert yaml.safe_load(card.split("---\n")[1]) == {
        "base_model": ["org/tiny-model", "a"], "base_model_relation": "merge", "library_name": "transformers",
        "tags": ["merge", "omnimerge", "task-arithmetic"]}


def test_hub_base_is_named_by_its_id(zoo, hub, tmp_path):  # noqa: F811 - `hub`: the fake cache fixture
    """Models resolved from the Hugging Face cache (with a revision) are named by their repo ids."""
    ad = tmp_path / "adapter"
    omnimerge.extract(zoo.expert("qwen2", 2), f"org/tiny@{COMMIT}", ad, rank=2)
    assert json.loads((ad / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny"
    assert yaml.safe_load((ad / "README.md").read_text().split("---")[1])["base_model"] == ["org/tiny"]
    out = tmp_path / "merged"
    omnimerge.merge({"method": "task_arithmetic", "base": str(zoo.base("qwen2")),
                     "models": [{"path": "org/tiny@main"}, {"path": str(zoo.expert("qwen2", 2))}]}, out)
    head = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert head["base_model"] == [zoo.base("qwen2").name, "org/tiny", zoo.expert("qwen2", 2).name]
