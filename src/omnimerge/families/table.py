"""The family table: everything omnimerge knows of a family, in one record each. Data, not code.

Each family lists the key prefixes of every layout that it is stored under (the hub's legacy
layout and transformers 5's own), so that one entry reads checkpoints written either way. Keys
are matched by the longest prefix; see ``align.py``.

* ``model_types``: the config.json ``model_type``s it covers, each with what transformers and
  lmms-eval call it and how to make probe inputs for it (:class:`ModelType`);
* ``decoder``: prefixes of the decoder module that holds ``layers.``, ``norm.``, ``embed_tokens.``;
* ``lm_head``: prefixes of the output head;
* ``parts``: other ``raw_prefix -> canonical_prefix`` rules (vision tower, projector, audio, ...).
  The canonical prefix's first segment is the component: ``vision``, ``projector``, ``audio``.

``verify`` (probe inputs), ``omnimerge eval`` (lmms-eval's model name) and the tiny test models
(``tiny.py``: config and model classes) read their facts from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelType:
    """One config.json ``model_type``: transformers' classes, lmms-eval's name, its probe inputs."""

    name: str
    config_class: str | None = None  # transformers' config class
    model_class: str | None = None  # transformers' model class, with its LM head
    lmms_eval: str | None = None  # lmms-eval's model name (``omnimerge eval``)
    probe: str | None = None  # how to make an image/audio input for it (families/probes.py)
    token_type_arg: str | None = None  # the forward argument that marks the image positions, if any


@dataclass(frozen=True)
class Family:
    name: str
    types: tuple[ModelType | str, ...]  # a bare string: a model_type with nothing more known
    kind: str  # "text", "vlm" or "audio"
    decoder: tuple[str, ...]
    lm_head: tuple[str, ...] = ("lm_head.",)
    parts: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def __post_init__(self):
        object.__setattr__(self, "types", tuple(t if isinstance(t, ModelType) else ModelType(t) for t in self.types))

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.types)


def _text(name: str, config: str, model: str) -> ModelType:
    return ModelType(name, config, model)


def _qwen_vl(name: str, config: str, model: str, lmms_eval: str) -> ModelType:
    return ModelType(name, config, model, lmms_eval, "qwen_vl", "mm_token_type_ids")


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
    Family("qwen2", (_text("qwen2", "Qwen2Config", "Qwen2ForCausalLM"),), "text", _TEXT_DECODER),
    Family("qwen2_moe", ("qwen2_moe",), "text", _TEXT_DECODER),
    Family("qwen3", (_text("qwen3", "Qwen3Config", "Qwen3ForCausalLM"),), "text", _TEXT_DECODER),
    Family("qwen3_moe", ("qwen3_moe",), "text", _TEXT_DECODER),
    Family("llama", (_text("llama", "LlamaConfig", "LlamaForCausalLM"),), "text", _TEXT_DECODER),
    Family("mistral", (_text("mistral", "MistralConfig", "MistralForCausalLM"), "ministral"), "text", _TEXT_DECODER),
    Family("gemma2", (_text("gemma2", "Gemma2Config", "Gemma2ForCausalLM"),), "text", _TEXT_DECODER),
    Family("gemma3_text", (_text("gemma3_text", "Gemma3TextConfig", "Gemma3ForCausalLM"),), "text",
           ("model.language_model.", "model.")),
    # vision-language models
    Family("qwen2_vl", (_qwen_vl("qwen2_vl", "Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "qwen2_vl"),), "vlm",
           _QWEN_VL_DECODER, parts=_QWEN_VL_PARTS),
    Family("qwen2_5_vl", (_qwen_vl("qwen2_5_vl", "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration",
                                   "qwen2_5_vl"),), "vlm", _QWEN_VL_DECODER, parts=_QWEN_VL_PARTS),
    Family("qwen3_vl", (_qwen_vl("qwen3_vl", "Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "qwen3_vl"),), "vlm",
           _QWEN_VL_DECODER, parts=_QWEN_VL_PARTS),
    Family("qwen3_vl_moe", (_qwen_vl("qwen3_vl_moe", "Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration",
                                     "qwen3_vl"),), "vlm", _QWEN_VL_DECODER, parts=_QWEN_VL_PARTS),
    Family("llava", (ModelType("llava", "LlavaConfig", "LlavaForConditionalGeneration", "llava_hf", "llava"),
                     "llava_next"), "vlm", _LLAVA_DECODER, _LLAVA_HEAD, _LLAVA_PARTS),
    Family("llava_onevision", (ModelType("llava_onevision", "LlavaOnevisionConfig",
                                         "LlavaOnevisionForConditionalGeneration", "llava_hf", "llava_onevision"),),
           "vlm", _LLAVA_DECODER, _LLAVA_HEAD, _LLAVA_PARTS),
    Family("internvl", (ModelType("internvl", "InternVLConfig", "InternVLForConditionalGeneration", "internvl_hf",
                                  "internvl"),), "vlm", _LLAVA_DECODER, _LLAVA_HEAD, _LLAVA_PARTS),
    Family("gemma3", (ModelType("gemma3", "Gemma3Config", "Gemma3ForConditionalGeneration", "gemma3", "gemma3",
                                "token_type_ids"),), "vlm", _LLAVA_DECODER, _LLAVA_HEAD, _LLAVA_PARTS),
    Family("mistral3", (ModelType("mistral3", "Mistral3Config", "Mistral3ForConditionalGeneration", "mistral3_vl",
                                  "mistral3"),), "vlm", _LLAVA_DECODER, _LLAVA_HEAD, _LLAVA_PARTS),
    Family(
        "idefics3",
        (ModelType("idefics3", "Idefics3Config", "Idefics3ForConditionalGeneration", probe="idefics3"),
         ModelType("smolvlm", "SmolVLMConfig", "SmolVLMForConditionalGeneration", probe="idefics3")),
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
        (ModelType("qwen2_audio", "Qwen2AudioConfig", "Qwen2AudioForConditionalGeneration", probe="qwen2_audio"),),
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
MODEL_TYPES: dict[str, ModelType] = {t.name: t for f in FAMILIES for t in f.types}
