"""The bench's model layer: tokenizer, processor, saving/loading, training, LoRA, text LLM, evaluation."""

from __future__ import annotations

import json

import pytest
import torch

from omnimerge.bench import tasks as T
from omnimerge.bench.evaluate import evaluate, predict
from omnimerge.bench.model import (
    IMAGE_PAD, IMAGE_PLACEHOLDER, BenchConfig, build_base_model, build_processor, build_tokenizer,
    format_prompt, load_model, load_processor, save_checkpoint,
)
from omnimerge.bench.experiment import EXPERT_TASKS
from omnimerge.bench.train import extract_text_model, save_adapter, train

# A micro model: 32x32 images -> 4x4 patches -> 2x2 = 4 visual tokens; trains in milliseconds per step.
MICRO = BenchConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                    vision_depth=1, vision_embed_dim=16, vision_heads=2, image_size=32, batch_size=8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Micro models gain nothing from threads, and oversubscribed threads on a busy machine are slow."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def proc():
    return build_processor(MICRO)


@pytest.fixture(scope="module")
def items():
    return (T.generate("vqa", "train", 6, seed=0, image_size=32)
            + T.generate("arithmetic", "train", 2, seed=0))


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory, proc):
    folder = tmp_path_factory.mktemp("bench") / "base"
    return save_checkpoint(build_base_model(MICRO), folder, proc)


def _inputs(proc, items):
    return proc([format_prompt(it.question, it.image is not None) for it in items], [it.image for it in items])


def test_config_presets_and_cache_key():
    full, quick = BenchConfig.full(), BenchConfig.quick()
    assert full.cache_key() == BenchConfig.full().cache_key()
    assert len(full.cache_key()) == 16 and int(full.cache_key(), 16) >= 0
    assert full.cache_key() != quick.cache_key() != full.replace(seed=1).cache_key()
    assert full.cache_key(code=False) != full.cache_key()
    assert BenchConfig.from_dict(full.to_dict()) == full
    assert full.image_tokens == 16 and MICRO.image_tokens == 4
    with pytest.raises(ValueError, match="unknown"):
        BenchConfig.from_dict({"nope": 1})


def test_tokenizer_special_tokens_and_numbers():
    tok = build_tokenizer(640)
    assert tok.convert_tokens_to_ids(IMAGE_PAD) == 5 and tok.pad_token == "<|endoftext|>"
    assert tok.eos_token == "<|im_end|>" and tok.image_token == IMAGE_PAD
    # digits are single tokens (Qwen2's pre-tokenizer), OCR strings one token per character
    assert tok.convert_ids_to_tokens(tok("150", add_special_tokens=False)["input_ids"]) == list("150")
    assert tok.convert_ids_to_tokens(tok("XC7E", add_special_tokens=False)["input_ids"]) == list("XC7E")
    prompt = format_prompt("What colour is the circle?", True)
    assert len(tok(prompt, add_special_tokens=False)["input_ids"]) == 17


def test_text_llm_folder_tokenizes_like_the_vlm(tmp_path, proc):
    """transformers loads a qwen2 folder's tokenizer as Qwen2Tokenizer (its own pre-tokenizer) and a
    qwen2_vl folder's as TokenizersBackend (tokenizer.json's): both must give the same ids."""
    from transformers import AutoTokenizer

    vlm = save_checkpoint(build_base_model(MICRO), tmp_path / "vlm", proc)
    llm = save_checkpoint(extract_text_model(build_base_model(MICRO)), tmp_path / "llm", proc)
    text = [format_prompt("Compute 6 + 3 - 4 + 3.", False) + "13", "orange square 3,5,4,7", "TTA2 x1,y1"]
    want = [proc.encode_text(t) for t in text]
    for folder in (vlm, llm):
        tok = AutoTokenizer.from_pretrained(folder)
        assert [tok(t, add_special_tokens=False)["input_ids"] for t in text] == want, type(tok).__name__


def test_processor_expands_image_tokens(proc, items):
    out = _inputs(proc, items)
    n_img = sum(it.image is not None for it in items)
    ids, mask, mm = out["input_ids"], out["attention_mask"], out["mm_token_type_ids"]
    assert out["pixel_values"].shape == (n_img * 16, 3 * 2 * 8 * 8)       # 4x4 patches per 32x32 image
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]] * n_img
    per_row = (ids == proc.image_token_id).sum(1).tolist()
    assert per_row == [4 if it.image is not None else 0 for it in items]  # 16 patches / merge 2x2
    assert torch.equal(mm, (ids == proc.image_token_id).long())
    assert (mask[:, -1] == 1).all() and ids.shape == mask.shape           # left padding
    big = build_processor(MICRO.replace(image_size=64))
    img = T.generate("vqa", "test", 1, seed=0, image_size=64)[0]
    assert (big(format_prompt(img.question, True), img.image)["input_ids"] == big.image_token_id).sum() == 16
    with pytest.raises(ValueError, match="placeholder"):
        proc(["no image here"], [img.image])


def test_saved_model_and_processor_load(base_folder, proc, items):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    names = {p.name for p in base_folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "preprocessor_config.json", "processor_config.json", "chat_template.jinja"} <= names
    model = Qwen2VLForConditionalGeneration.from_pretrained(base_folder)
    inputs = _inputs(proc, items)
    with torch.no_grad():
        a = model(**inputs).logits
        b = build_base_model(MICRO)(**inputs).logits
    assert torch.equal(a, b)
    loaded = load_processor(base_folder)(*_args(items))
    auto = AutoProcessor.from_pretrained(base_folder)    # works without torchvision
    auto_out = auto(images=[it.image for it in items if it.image is not None], text=_args(items)[0],
                    padding=True, padding_side="left", return_tensors="pt")
    for key, value in inputs.items():
        assert torch.equal(loaded[key], value), key
        assert torch.equal(auto_out[key], value), key
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}]
    assert auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == format_prompt("Hi?", True)


def _args(items):
    return [format_prompt(it.question, it.image is not None) for it in items], [it.image for it in items]


def test_training_reduces_loss_and_is_deterministic(proc, items):
    runs = []
    for _ in range(2):
        history: list[float] = []
        model = train(build_base_model(MICRO), items, MICRO, steps=15, lr=1e-2, trainable="all",
                      processor=proc, history=history)
        runs.append((model, history))
    (m1, h1), (m2, h2) = runs
    assert sum(h1[-3:]) / 3 < 0.7 * sum(h1[:3]) / 3
    assert h1 == h2
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    m3 = train(build_base_model(MICRO), items, MICRO, steps=3, lr=1e-2, trainable="all", processor=proc, seed=1)
    assert any(not torch.equal(s1[k], m3.state_dict()[k]) for k in s1)


def test_language_training_touches_only_the_language_backbone(proc, items):
    before = build_base_model(MICRO).state_dict()
    after = train(build_base_model(MICRO), items, MICRO, steps=2, lr=3e-3, processor=proc).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("language_model.layers." in k or k == "model.language_model.norm.weight" for k in changed)
    assert any(k.endswith("mlp.down_proj.weight") for k in changed)


def test_lora_adapter_saves_and_loads(tmp_path, base_folder, proc, items):
    from peft import PeftModel
    from transformers import Qwen2VLForConditionalGeneration

    peft_model = train(load_model(base_folder), items, MICRO, steps=3, lora=True, lr=1e-2, processor=proc)
    folder = save_adapter(peft_model, tmp_path / "lora", base_folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_folder.absolute())
    assert (folder / "adapter_model.safetensors").is_file()
    from safetensors import safe_open
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    modules = {k.split(".")[-3] for k in keys}
    assert modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all("language_model.layers." in k for k in keys)
    inputs = _inputs(proc, items)
    reloaded = PeftModel.from_pretrained(Qwen2VLForConditionalGeneration.from_pretrained(base_folder), folder)
    merged = load_model(folder)  # adapter folder -> base + LoRA, merged
    with torch.no_grad():
        want = peft_model(**inputs).logits
        assert not torch.allclose(want, load_model(base_folder)(**inputs).logits)
        assert torch.allclose(reloaded(**inputs).logits, want, atol=1e-5)
        assert torch.allclose(merged(**inputs).logits, want, atol=1e-4)


def test_text_llm_shares_the_language_backbone(proc, items):
    from transformers import Qwen2ForCausalLM

    vlm = train(build_base_model(MICRO), items, MICRO, steps=2, lr=3e-3, trainable="all", processor=proc)
    text = extract_text_model(vlm)
    assert isinstance(text, Qwen2ForCausalLM)
    vs, ts = vlm.state_dict(), text.state_dict()
    lang = {k: v for k, v in vs.items() if k.startswith("model.language_model.")}
    assert len(ts) == len(lang) + 1
    for k, v in lang.items():
        assert torch.equal(ts["model." + k[len("model.language_model."):]], v)
    assert torch.equal(ts["lm_head.weight"], vs["lm_head.weight"])
    arith = [it for it in items if it.image is None]
    inputs = _inputs(proc, arith)
    inputs.pop("mm_token_type_ids")
    with torch.no_grad():
        assert torch.allclose(text(**inputs).logits, vlm(**inputs).logits, atol=1e-5)


def test_evaluate_overfit_and_range(tmp_path, proc, items):
    model = train(build_base_model(MICRO), items, MICRO, steps=80, lr=1e-2, trainable="all",
                  processor=proc, batch_size=len(items))
    vqa = [it for it in items if it.task == "vqa"]
    arith = [it for it in items if it.task == "arithmetic"]
    assert evaluate(model, "vqa", vqa, proc) == 1.0
    assert evaluate(model, "arithmetic", arith, proc) == 1.0                 # the VLM's text path
    text = extract_text_model(model)
    assert evaluate(text, "arithmetic", arith, proc) == 1.0                   # the text LLM
    text_folder = save_checkpoint(text, tmp_path / "text", proc)
    assert not (text_folder / "preprocessor_config.json").exists()           # tokenizer only
    assert evaluate(text_folder, "arithmetic", arith) == 1.0
    folder = save_checkpoint(model, tmp_path / "m", proc)
    assert evaluate(folder, "vqa", vqa) == 1.0                               # from a folder
    unseen = T.generate("vqa", "test", 10, seed=0, image_size=32)
    acc, preds = evaluate(model, "vqa", unseen, proc, batch_size=4, return_predictions=True)
    assert 0.0 <= acc <= 1.0 and len(preds) == 10
    # the hand-written greedy loop and transformers' generate agree
    assert predict(model, unseen + arith, proc) == predict(model, unseen + arith, proc, use_generate=True)


def test_zoo_builds_once_and_evaluates(tmp_path):
    from omnimerge.bench.experiment import SETTING_BASE, accuracy_matrix, build_zoo, score_models, test_sets, zoo_names

    cfg = BenchConfig.micro().replace(test_items=3)
    logged: list[str] = []
    threads_seen: set[int] = set()
    before_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # every model trains on one thread, whatever the caller's setting, which comes back afterwards
        zoo = build_zoo(cfg, tmp_path, log=logged.append,
                        on_step=lambda _name, _step: threads_seen.add(torch.get_num_threads()))
        assert threads_seen == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before_threads)
    names = zoo_names(cfg)
    assert len(names) == 15 and zoo.name == cfg.cache_key()
    assert [m.split(":")[0] for m in logged if "steps," in m] == names     # one line per model, in order
    assert all((zoo / n / "bench.json").is_file() for n in names)
    assert (zoo / "lora_vqa" / "adapter_config.json").is_file()
    assert (zoo / "multitask_lora" / "adapter_config.json").is_file()
    # each setting's experts start from the setting's base
    assert json.loads((zoo / "full_ocr" / "bench.json").read_text())["parent"] == SETTING_BASE["full"] == "instruct"
    adapter = json.loads((zoo / "lora_ocr" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((zoo / "base").resolve())
    assert json.loads((zoo / "text_llm" / "bench.json").read_text())["steps"] == cfg.text_steps
    before = len(logged)
    build_zoo(cfg, tmp_path, log=logged.append)                      # cached: nothing retrained
    assert len(logged) == before
    # a change to the full fine-tunes' recipe retrains that setting's experts and multi-task model only
    trained: list[str] = []
    build_zoo(cfg.replace(expert_lr=cfg.expert_lr * 2), tmp_path, log=None,
              on_done=lambda name, fresh: trained.append(name) if fresh else None)
    assert trained == [f"full_{t}" for t in EXPERT_TASKS] + ["multitask"]
    matrix = accuracy_matrix({"base": zoo / "base", "lora_ocr": zoo / "lora_ocr", "text_llm": zoo / "text_llm"}, cfg)
    assert set(matrix["base"]) == set(T.TASKS) and set(matrix["text_llm"]) == {"arithmetic"}
    assert all(0.0 <= v <= 1.0 for row in matrix.values() for v in row.values())
    # per-item scores, cached beside the model and read back unchanged
    sets = test_sets(cfg)
    first = score_models({"base": zoo / "base"}, cfg, sets=sets, cache_name="t")
    assert (zoo / "base" / "scores" / "t.json").is_file()
    assert score_models({"base": zoo / "base"}, cfg, sets=sets, cache_name="t") == first
    assert all(len(v) == cfg.test_items and set(v) <= {0, 1} for v in first["base"].values())


def test_model_keys_follow_the_stages():
    base = BenchConfig.micro()
    k = base.model_key("base")
    assert base.replace(expert_lr=1.0).model_key("base") == k              # experts' fields: not the base's
    assert base.replace(test_items=99).model_key("base") == k              # evaluation: nothing trained
    assert base.replace(base_steps=99).model_key("base") != k
    assert base.model_key("full", "p") != base.replace(expert_lr=1.0).model_key("full", "p")
    assert base.model_key("full", "p", "ocr") != base.model_key("full", "p", "vqa")
    assert base.model_key("lora", "p") == base.replace(expert_lr=1.0).model_key("lora", "p")
    with pytest.raises(ValueError, match="parent"):
        base.model_key("full")


def test_task_vector_stats_on_known_task_vectors():
    import copy

    from omnimerge.bench.regime import language_matrices, task_vector_stats

    base = build_base_model(MICRO)
    experts = {}
    for i, scale in ((1, 0.01), (2, 0.03)):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if p.ndim == 2 and ".layers." in name and "visual" not in name:
                    p.add_(scale * p)                      # τ = scale·θ: relative norm exactly `scale`
        experts[f"e{i}"] = m
    stats = task_vector_stats(base, experts)
    mats = language_matrices(base.state_dict())
    assert mats and all("visual" not in k for k in mats)
    assert stats["experts"]["e1"]["median_rel_norm"] == pytest.approx(0.01, rel=1e-4)
    assert stats["max_rel_norm"] == pytest.approx(0.03, rel=1e-4)
    rms = (sum(float((0.03 * v).pow(2).sum()) for v in mats.values()) / sum(v.numel() for v in mats.values())) ** 0.5
    assert stats["rms_tau"] == pytest.approx(rms, rel=1e-4)
    assert stats["cosine"]["e1"]["e2"] == pytest.approx(1.0, abs=1e-5)   # parallel task vectors
