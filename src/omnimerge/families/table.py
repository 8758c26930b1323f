"""The family table: where each part of a model lives in the raw key space. Data, not code.

Each family lists the key prefixes of every layout that it is stored under (the hub's legacy
layout and transformers 5's own, see NOTES.md), so that one entry reads checkpoints written
either way. Keys are matched by the longest prefix; see ``align.py``.

* ``decoder``: prefixes of the decoder module that holds ``layers.``, ``norm.``, ``embed_tokens.``;
* ``lm_head``: prefixes of the output head;
* ``parts``: other ``raw_prefix -> canonical_prefix`` rules (vision tower, projector, audio, ...).
  The canonical prefix's first segment is the component: ``vision``, ``projector``, ``audio``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    kind: str  # "text", "vlm" or "audio"
    decoder: tuple[str, ...]
    lm_head: tuple[str, ...] = ("lm_head.",)
    parts: tuple[tuple[str, str], ...] = field(default_factory=tuple)


# --- layouts shared by several families ---------------------------------------------------------
_TEXT_DECODER = ("model.",)

# LLaVA-style: `language_model.model.*` (hub) or `model.language_model.*` (transformers 5).
_LLAVA_DECODER = ("language_model.model.", "model.language_model.")
_LLAVA_HEAD = ("language_model.lm_head.", "lm_head.")
_LLAVA_PARTS = (
    # A CLIP/SigLIP tower is saved as `vision_tower.vision_model.*` or `vision_tower.*`.
    ("vision_tower.vision_model.", "vision."),
    ("vision_tower.", "vision."),
    ("model.vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("multi_modal_projector.", "projector."),
    ("model.multi_modal_projector.", "projector."),
    ("image_newline", "projector.image_newline"),
    ("model.image_newline", "projector.image_newline"),
)

# Qwen-VL: `model.layers.*` + `visual.*` (Qwen2-VL on disk) or `model.language_model.*` +
# `model.visual.*` (Qwen3-VL, and transformers 5 in memory).
_QWEN_VL_DECODER = ("model.language_model.", "model.")
_QWEN_VL_PARTS = tuple(
    (p + sub, canon)
    for p in ("visual.", "model.visual.")
    for sub, canon in (
        ("merger.", "projector.merger."),
        ("deepstack_merger_list.", "projector.deepstack_merger_list."),
        ("", "vision."),
    )
)

FAMILIES: tuple[Family, ...] = (
    # text LLMs
    Family("qwen2", ("qwen2",), "text", _TEXT_DECODER),
    Family("qwen2_moe", ("qwen2_moe",), "text", _TEXT_DECODER),
    Family("qwen3", ("qwen3",), "text", _TEXT_DECODER),
    Family("qwen3_moe", ("qwen3_moe",), "text", _TEXT_DECODER),
    Family("llama", ("llama",), "text", _TEXT_DECODER),
    Family("mistral", ("mistral", "ministral"), "text", _TEXT_DECODER),
    Family("gemma2", ("gemma2",), "text", _TEXT_DECODER),
    Family("gemma3_text", ("gemma3_text",), "text", ("model.language_model.", "model.")),
    # vision-language models
    Family("qwen2_vl", ("qwen2_vl",), "vlm", _QWEN_VL_DECODER, parts=_QWEN_VL_PARTS),
    Family("qwen2_5_vl", ("qwen2_5_vl",), "vlm", _QWEN_VL_DECODER, parts=_QWEN_VL_PARTS),
    Family("qwen3_vl", ("qwen3_vl",), "vlm", _QWEN_VL_DECODER, parts=_QWEN_VL_PARTS),
    Family("qwen3_vl_moe", ("qwen3_vl_moe",), "vlm", _QWEN_VL_DECODER, parts=_QWEN_VL_PARTS),
    Family("llava", ("llava", "llava_next"), "vlm", _LLAVA_DECODER, _LLAVA_HEAD, _LLAVA_PARTS),
    Family("llava_onevision", ("llava_onevision",), "vlm", _LLAVA_DECODER, _LLAVA_HEAD, _LLAVA_PARTS),
    Family("internvl", ("internvl",), "vlm", _LLAVA_DECODER, _LLAVA_HEAD, _LLAVA_PARTS),
    Family("gemma3", ("gemma3",), "vlm", _LLAVA_DECODER, _LLAVA_HEAD, _LLAVA_PARTS),
    Family("mistral3", ("mistral3",), "vlm", _LLAVA_DECODER, _LLAVA_HEAD, _LLAVA_PARTS),
    Family(
        "idefics3",
        ("idefics3", "smolvlm"),
        "vlm",
        ("model.text_model.",),
        parts=(("model.vision_model.", "vision."), ("model.connector.", "projector.")),
    ),
    # InternVL's original (remote-code) format: `vision_model.*`, `mlp1.*`, `language_model.model.*`.
    Family(
        "internvl_chat",
        ("internvl_chat",),
        "vlm",
        ("language_model.model.",),
        ("language_model.lm_head.",),
        parts=(("vision_model.", "vision."), ("mlp1.", "projector.")),
    ),
    # audio-language models
    Family(
        "qwen2_audio",
        ("qwen2_audio",),
        "audio",
        _LLAVA_DECODER,
        _LLAVA_HEAD,
        parts=(
            ("audio_tower.", "audio."),
            ("model.audio_tower.", "audio."),
            ("multi_modal_projector.", "projector."),
            ("model.multi_modal_projector.", "projector."),
        ),
    ),
)

BY_MODEL_TYPE: dict[str, Family] = {mt: f for f in FAMILIES for mt in f.model_types}
