"""The tests' own reading of the raw key space of every tiny family, written by hand from the files
transformers writes, independently of omnimerge's family table (so that it can check the table).

Per layout: (decoder prefix, lm_head key, vision prefixes, projector prefixes[, audio prefixes]):
"hub" = save_original_format=True (the layout found on the hub, ``LAYOUT[family][True]``), "t5" =
save_original_format=False (transformers 5's own module paths, ``LAYOUT[family][False]``).
"""

from __future__ import annotations

TEXT = ("model.", "lm_head.weight", (), ())
QWEN2_VL_HUB = ("model.", "lm_head.weight", ("visual.",), ("visual.merger.",))
QWEN2_VL_T5 = ("model.language_model.", "lm_head.weight", ("model.visual.",), ("model.visual.merger.",))
QWEN3_VL = ("model.language_model.", "lm_head.weight", ("model.visual.",),
            ("model.visual.merger.", "model.visual.deepstack_merger_list."))
# LLaVA-likes. `image_newline` is a learned vector in the text hidden space appended after the
# projector's output (LLaVA-OneVision); it is counted with the projector, never with 'other'.
LLAVA_HUB = ("language_model.model.", "language_model.lm_head.weight", ("vision_tower.",),
             ("multi_modal_projector.", "image_newline"))
LLAVA_T5 = ("model.language_model.", "lm_head.weight", ("model.vision_tower.",),
            ("model.multi_modal_projector.", "model.image_newline"))
IDEFICS3 = ("model.text_model.", "lm_head.weight", ("model.vision_model.",), ("model.connector.",))
# Audio-language (Qwen2-Audio): a fifth entry, the audio tower prefixes.
QWEN2_AUDIO_HUB = ("language_model.model.", "language_model.lm_head.weight", (), ("multi_modal_projector.",),
                   ("audio_tower.",))
QWEN2_AUDIO_T5 = ("model.language_model.", "lm_head.weight", (), ("model.multi_modal_projector.",),
                  ("model.audio_tower.",))

LAYOUT = {
    **{f: {True: TEXT, False: TEXT} for f in ("qwen2", "qwen3", "llama", "mistral", "gemma2", "gemma3_text")},
    **{f: {True: QWEN2_VL_HUB, False: QWEN2_VL_T5} for f in ("qwen2_vl", "qwen2_5_vl")},
    **{f: {True: QWEN3_VL, False: QWEN3_VL} for f in ("qwen3_vl", "qwen3_vl_moe")},
    **{f: {True: LLAVA_HUB, False: LLAVA_T5} for f in ("llava", "llava_onevision", "internvl", "gemma3", "mistral3")},
    **{f: {True: IDEFICS3, False: IDEFICS3} for f in ("idefics3", "smolvlm")},
    "qwen2_audio": {True: QWEN2_AUDIO_HUB, False: QWEN2_AUDIO_T5},
}
# The family a model_type belongs to, where the name differs (SmolVLM is Idefics3's architecture).
FAMILY_NAME = {"smolvlm": "idefics3"}

# The tiny checkpoints are saved in the hub layout: their decoder prefix and lm_head key per family.
DECODER = {family: layout[True][0] for family, layout in LAYOUT.items()}
HEAD = {family: layout[True][1] for family, layout in LAYOUT.items()}
