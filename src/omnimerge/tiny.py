"""Tiny random models of real architectures, for tests, the demo and benchmarks.

The sizes are this module's; the config and model classes are the family table's
(``families.table.MODEL_TYPES``), and probe inputs for them are ``families.probes.probe_inputs``.

Every text LLM here and every VLM's language backbone share `TEXT_DIMS`, so a text model and
its VLM partner (see `PAIRS`) have identical decoder, embedding and lm_head shapes.
All families share one tokenizer (same special tokens at the same ids).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .families.table import MODEL_TYPES

TEXT_DIMS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=384,
)

# One shared special-token list: token i gets id i in every tiny tokenizer.
SPECIAL_TOKENS = (
    "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
    "<image>", "<video>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
    "<fake_token_around_image>", "<global-img>", "<img>", "</img>", "<IMG_CONTEXT>",
    "[IMG]", "[IMG_BREAK]", "[IMG_END]", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
)
TOKEN_ID = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
BASIC_IDS = dict(pad_token_id=TOKEN_ID["<pad>"], bos_token_id=TOKEN_ID["<s>"], eos_token_id=TOKEN_ID["</s>"])

IMAGE, PATCH = 32, 8  # vision tower input: a 32x32 image in 8x8 patches -> 4x4 grid
VISION_WIDTH = 32
MROPE = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])  # sums to head_dim/2


def _vit(**extra) -> Callable[[int], dict]:
    """Vision kwargs of a plain ViT (CLIP, SigLIP, InternViT, Pixtral, Idefics3)."""
    base = dict(hidden_size=VISION_WIDTH, intermediate_size=2 * VISION_WIDTH, num_hidden_layers=2,
                num_attention_heads=2, image_size=IMAGE, patch_size=PATCH)
    return lambda h: {**base, **extra}


# Audio tower (Whisper-style encoder): MEL_BINS x 2*AUDIO_POSITIONS frames -> AUDIO_POSITIONS // 2 tokens.
MEL_BINS, AUDIO_POSITIONS = 16, 16


def _qwen2_audio(h: int) -> dict:
    return dict(d_model=VISION_WIDTH, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=2 * VISION_WIDTH,
                num_mel_bins=MEL_BINS, max_source_positions=AUDIO_POSITIONS)


def _qwen2_vl_vision(h: int) -> dict:
    return dict(depth=2, embed_dim=VISION_WIDTH, hidden_size=h, num_heads=2, mlp_ratio=2,
                patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2)


def _qwen2_5_vl_vision(h: int) -> dict:
    return dict(depth=2, hidden_size=VISION_WIDTH, intermediate_size=2 * VISION_WIDTH, num_heads=2,
                out_hidden_size=h, patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2,
                window_size=2 * 2 * PATCH, fullatt_block_indexes=[1])


def _qwen3_vl_vision(h: int) -> dict:
    return dict(depth=3, hidden_size=VISION_WIDTH, intermediate_size=2 * VISION_WIDTH, num_heads=2,
                out_hidden_size=h, patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2,
                num_position_embeddings=(IMAGE // PATCH) ** 2, deepstack_visual_indexes=[0, 1, 2])


@dataclass(frozen=True)
class Spec:
    """How to build a tiny model of one model type: sub-config kwargs and token ids (its config and
    model classes are the family table's, ``families.table.MODEL_TYPES``)."""

    text: dict = field(default_factory=dict)  # extra text-config kwargs
    vision: Callable[[int], dict] | None = None  # text hidden size -> vision-config kwargs
    top: dict = field(default_factory=dict)  # extra top-level kwargs of a VLM config
    tokens: dict = field(default_factory=dict)  # config attribute -> special token
    text_type: str | None = None  # model_type of text_config, where the VLM takes several
    image_placeholder: str = "<image>"  # what the chat template writes for an image
    audio: Callable[[int], dict] | None = None  # text hidden size -> audio-config kwargs (audio-language models)


QWEN_VL_TOKENS = dict(image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                      vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")
QWEN_VL_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
SIGLIP = _vit(model_type="siglip_vision_model", vision_use_head=False)  # as in Gemma 3, OneVision
QWEN3_VL_TEXT = dict(rope_parameters={**MROPE, "mrope_interleaved": True})

SPECS: dict[str, Spec] = {
    "qwen2": Spec(),
    "qwen3": Spec(),
    "llama": Spec(),
    "mistral": Spec(),
    "gemma2": Spec(text=dict(query_pre_attn_scalar=16)),
    "gemma3_text": Spec(text=dict(query_pre_attn_scalar=16)),
    "qwen2_vl": Spec(text=dict(rope_parameters=MROPE), vision=_qwen2_vl_vision, tokens=QWEN_VL_TOKENS, image_placeholder=QWEN_VL_IMAGE),
    "qwen2_5_vl": Spec(text=dict(rope_parameters=MROPE),
                       vision=_qwen2_5_vl_vision, tokens=QWEN_VL_TOKENS, image_placeholder=QWEN_VL_IMAGE),
    "qwen3_vl": Spec(text=QWEN3_VL_TEXT,
                     vision=_qwen3_vl_vision, tokens=QWEN_VL_TOKENS, image_placeholder=QWEN_VL_IMAGE),
    "qwen3_vl_moe": Spec(text=dict(QWEN3_VL_TEXT, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
                         vision=_qwen3_vl_vision, tokens=QWEN_VL_TOKENS, image_placeholder=QWEN_VL_IMAGE),
    "llava": Spec(vision=_vit(model_type="clip_vision_model"),
                  text_type="llama", top=dict(image_seq_length=(IMAGE // PATCH) ** 2),
                  tokens=dict(image_token_id="<image>")),
    "llava_onevision": Spec(vision=SIGLIP, text_type="qwen2",
                            top=dict(image_grid_pinpoints=[[IMAGE, IMAGE], [IMAGE, 2 * IMAGE]]),
                            tokens=dict(image_token_id="<image>", video_token_id="<video>")),
    "internvl": Spec(vision=_vit(image_size=[IMAGE, IMAGE], patch_size=[PATCH, PATCH]), text_type="qwen2",
                     top=dict(image_seq_length=(IMAGE // PATCH // 2) ** 2),
                     tokens=dict(image_token_id="<IMG_CONTEXT>"), image_placeholder="<img><IMG_CONTEXT></img>"),
    "gemma3": Spec(text=dict(query_pre_attn_scalar=16),
                   vision=SIGLIP, top=dict(mm_tokens_per_image=4),
                   tokens=dict(image_token_id="<image_soft_token>", boi_token_id="<start_of_image>",
                               eoi_token_id="<end_of_image>"), image_placeholder="<start_of_image>"),
    "mistral3": Spec(vision=_vit(head_dim=16),
                     text_type="mistral", tokens=dict(image_token_id="[IMG]"), image_placeholder="[IMG]"),
    "idefics3": Spec(vision=_vit(), text_type="llama",
                     tokens=dict(image_token_id="<image>")),
    "smolvlm": Spec(vision=_vit(), text_type="llama",
                    tokens=dict(image_token_id="<image>")),
    "qwen2_audio": Spec(text_type="qwen2",
                        audio=_qwen2_audio, tokens=dict(audio_token_index="<|AUDIO|>"),
                        image_placeholder="<|audio_bos|><|AUDIO|><|audio_eos|>"),
}
FAMILIES = tuple(SPECS)
TEXT_FAMILIES = tuple(f for f, s in SPECS.items() if s.vision is None and s.audio is None)
VLM_FAMILIES = tuple(f for f, s in SPECS.items() if s.vision is not None)
AUDIO_FAMILIES = tuple(f for f, s in SPECS.items() if s.audio is not None)
QWEN_VL = tuple(f for f in SPECS if MODEL_TYPES[f].probe == "qwen_vl")  # take grid_thw and a Qwen image processor
# (text LLM, VLM) whose language tensors have identical names-after-prefix and shapes.
PAIRS = (
    ("qwen2", "qwen2_vl"), ("qwen2", "qwen2_5_vl"), ("qwen2", "internvl"), ("qwen2", "llava_onevision"),
    ("qwen3", "qwen3_vl"), ("llama", "llava"), ("llama", "idefics3"), ("llama", "smolvlm"),
    ("mistral", "mistral3"), ("gemma3_text", "gemma3"), ("qwen2", "qwen2_audio"),
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A picture shows a cat sitting on a red mat next to a window.",
    "Describe the image in one sentence. What color is the sky?",
    "Merging the weights of two models averages their parameters layer by layer.",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { } < > , . ; : ! ?",
] * 4
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}IMAGE{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _text_kwargs(spec: Spec, num_layers, vocab_size, hidden_size, intermediate_size, tie) -> dict:
    dims = dict(TEXT_DIMS)
    if hidden_size:
        heads = hidden_size // dims["head_dim"]
        dims.update(hidden_size=hidden_size, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2))
    dims["intermediate_size"] = intermediate_size or (2 * dims["hidden_size"])
    dims["num_hidden_layers"] = num_layers or dims["num_hidden_layers"]
    dims["vocab_size"] = vocab_size or dims["vocab_size"]
    if dims["vocab_size"] <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS)} (the special token ids)")
    kw = {**dims, **BASIC_IDS, "tie_word_embeddings": tie, **spec.text}
    if spec.text_type:
        kw["model_type"] = spec.text_type
    return kw


def make_config(family: str, *, num_layers=None, vocab_size=None, tie_word_embeddings=False,
                hidden_size=None, intermediate_size=None):
    """The transformers config of a tiny model of `family` (no weights)."""
    import transformers

    if family not in SPECS:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    spec = SPECS[family]
    text = _text_kwargs(spec, num_layers, vocab_size, hidden_size, intermediate_size, tie_word_embeddings)
    cls = getattr(transformers, MODEL_TYPES[family].config_class)
    if spec.vision is None and spec.audio is None:
        config = cls(**text)
    else:
        tokens = {k: TOKEN_ID[v] for k, v in spec.tokens.items()}
        tower = ({"vision_config": spec.vision(text["hidden_size"])} if spec.vision else
                 {"audio_config": spec.audio(text["hidden_size"])})
        config = cls(text_config=text, **tower, tie_word_embeddings=tie_word_embeddings, **spec.top, **tokens)
    config.architectures = [MODEL_TYPES[family].model_class]
    return config


def build_model(family: str, *, seed: int = 0, dtype=torch.float32, **config_kwargs):
    """A randomly initialised tiny model of `family`, in eval mode."""
    import transformers

    config = make_config(family, **config_kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_TYPES[family].model_class)(config)
    with torch.no_grad():  # e.g. Gemma 3's projector and InternViT's position embeddings start at zero
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(std=0.02)
    return model.to(dtype).eval()


def build_tiny(family: str, out_dir, *, seed: int = 0, num_layers: int | None = None,
               vocab_size: int | None = None, tie_word_embeddings: bool = False, dtype=torch.float32,
               hidden_size=None, intermediate_size=None, tokenizer: bool = True,
               save_original_format: bool = True, backbone=None) -> Path:
    """Build a tiny `family` model and save it (weights, config, tokenizer) to `out_dir`.

    With `backbone` (a saved tiny model of the same language shapes, e.g. a text LLM of `PAIRS`), the
    language model (decoder, embeddings, lm_head) is that model's: a multimodal model "trained from"
    that base LLM, with encoders of its own.
    """
    out = Path(out_dir)
    model = build_model(family, seed=seed, dtype=dtype, num_layers=num_layers, vocab_size=vocab_size,
                        tie_word_embeddings=tie_word_embeddings, hidden_size=hidden_size,
                        intermediate_size=intermediate_size)
    if backbone is not None:
        _copy_backbone(backbone, model)
    model.save_pretrained(out, save_original_format=save_original_format)
    _generation_config().save_pretrained(out)
    if tokenizer:
        vocab = model.config.get_text_config().vocab_size
        make_tokenizer(vocab, SPECS[family].image_placeholder).save_pretrained(out)
    if tokenizer and family in QWEN_VL:
        from .calibration.render import qwen_image_processor

        qwen_image_processor(model.config, max_merged_patches=4).save_pretrained(out)
    if tokenizer and family in AUDIO_FAMILIES:
        _audio_feature_extractor(model.config).save_pretrained(out)
    return out


def _copy_backbone(folder, model) -> None:
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    donor = getattr(transformers, config.architectures[0]).from_pretrained(folder)
    with torch.no_grad():
        model.get_decoder().load_state_dict(donor.get_decoder().state_dict())
        if not model.config.get_text_config().tie_word_embeddings:
            model.get_output_embeddings().weight.copy_(donor.get_output_embeddings().weight)


def _generation_config():
    from transformers import GenerationConfig

    return GenerationConfig(**BASIC_IDS, do_sample=False)


def _audio_feature_extractor(config):
    """Log-mel features of the shape the tiny audio tower takes: a 1 s clip at 16 kHz -> 2*AUDIO_POSITIONS frames."""
    from transformers import WhisperFeatureExtractor

    rate, frames = 16000, 2 * config.audio_config.max_source_positions
    return WhisperFeatureExtractor(feature_size=config.audio_config.num_mel_bins, sampling_rate=rate,
                                   hop_length=rate // frames, chunk_length=1, n_fft=512)


def make_tokenizer(vocab_size: int = TEXT_DIMS["vocab_size"], image_placeholder: str = "<image>"):
    """A byte-level BPE tokenizer trained on a few sentences, with `SPECIAL_TOKENS` at ids 0.."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE ({tok.get_vocab_size()})")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        chat_template=CHAT_TEMPLATE.replace("IMAGE", image_placeholder),
    )


def make_expert(src_dir, dst_dir, *, seed: int, scale: float = 0.01, pattern: str = r"layers\.") -> Path:
    """Copy a checkpoint folder and add N(0, scale²) noise to float tensors whose raw key matches `pattern`."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src, dst = Path(src_dir), Path(dst_dir)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for path in sorted(dst.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {"format": "pt"}
        tensors = load_file(str(path))
        for key in sorted(tensors):
            t = tensors[key]
            if t.is_floating_point() and re.search(pattern, key):
                noise = torch.randn(t.shape, generator=gen, dtype=torch.float32) * scale
                tensors[key] = (t.float() + noise).to(t.dtype)
        save_file(tensors, str(path), metadata=metadata)
    return dst
