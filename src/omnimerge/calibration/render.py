"""Calibration samples rendered to model inputs without transformers' processor classes.

The processors of Qwen2-VL, Qwen2.5-VL, Qwen3-VL and InternVL cannot be constructed without torchvision
(each declares a video processor, and transformers only registers video processors with torchvision). Their
image logic needs none of it: :class:`ImageRenderer` is the tokenizer, the family's image processor in its
PIL variant (``Qwen2VLImageProcessorPil``, ``GotOcr2ImageProcessorPil``) read from the checkpoint's
``preprocessor_config.json``, and the family's rule for the image tokens:

* Qwen-VL families: each image pad token becomes ``image_grid_thw.prod() // merge_size²`` copies;
  ``mm_token_type_ids`` marks them (1) for the model's multimodal rotary positions.
* InternVL: each image token becomes ``<img>`` + the image token × ``image_seq_length`` × patches + ``</img>``
  (a template that already writes ``<img>…</img>`` around it keeps one pair).

Other families render text-only samples through their tokenizer; a sample with an image there is refused by
:func:`.collect.load_renderer` with the reason.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
INTERNVL_TYPES = ("internvl",)
SUPPORTED = QWEN_VL_TYPES + INTERNVL_TYPES


def _chat_template(folder: Path, tokenizer) -> str | None:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    js = folder / "chat_template.json"
    if js.is_file():
        return json.loads(js.read_text(encoding="utf-8")).get("chat_template")
    return None


def _processor_config(folder: Path) -> dict:
    path = folder / "processor_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class ImageRenderer:
    """Texts and images -> a padded batch of model inputs, for the families of :data:`SUPPORTED`.

    ``renderer(text=[...], images=[...], padding=True, return_tensors="pt")`` takes one prompt per sample,
    each holding the image placeholder its chat template writes once per image, and the images in order."""

    def __init__(self, folder: str | Path, config):
        import transformers

        folder = Path(folder)
        self.model_type = config.model_type
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        self.chat_template = _chat_template(folder, self.tokenizer)
        tok = self.tokenizer
        has_ip = (folder / "preprocessor_config.json").is_file()
        if self.model_type in QWEN_VL_TYPES:
            self.image_processor = (transformers.Qwen2VLImageProcessorPil.from_pretrained(folder) if has_ip else
                                    qwen_image_processor(config))
            self.image_token = getattr(tok, "image_token", None) or "<|image_pad|>"
        elif self.model_type in INTERNVL_TYPES:
            self.image_processor = (transformers.GotOcr2ImageProcessorPil.from_pretrained(folder) if has_ip else
                                    _internvl_image_processor(config))
            self.image_token = (getattr(tok, "context_image_token", None)
                                or tok.convert_ids_to_tokens(config.image_token_id))
            self.start, self.end = (getattr(tok, "start_image_token", None) or "<img>",
                                    getattr(tok, "end_image_token", None) or "</img>")
            self.image_seq_length = int(_processor_config(folder).get("image_seq_length", config.image_seq_length))
        else:
            raise ValueError(f"no image rendering for model_type {self.model_type!r}")
        self.image_token_id = tok.convert_tokens_to_ids(self.image_token)
        # Qwen-VL's pixel rows split by image_grid_thw; InternVL's patches carry no per-sample count
        self.image_rows_splittable = self.model_type in QWEN_VL_TYPES

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)

    def _expand(self, prompts: list[str], counts: list[int]) -> list[str]:
        """Each image placeholder replaced by its image's tokens, images taken in order."""
        pending = iter(counts)
        token = re.escape(self.image_token)
        if self.model_type in INTERNVL_TYPES:
            pattern = re.compile(f"(?:{re.escape(self.start)})?{token}(?:{re.escape(self.end)})?")

            def fill(_m):
                return self.start + self.image_token * (self.image_seq_length * next(pending)) + self.end
        else:
            pattern = re.compile(token)

            def fill(_m):
                return self.image_token * next(pending)
        out = [pattern.sub(fill, p) for p in prompts]
        if next(pending, None) is not None:
            raise ValueError("more images than image placeholders in the rendered prompts")
        return out

    def __call__(self, text, images=None, padding=True, return_tensors="pt", **kwargs) -> dict:
        texts = [text] if isinstance(text, str) else list(text)
        extra: dict[str, torch.Tensor] = {}
        if images:
            out = self.image_processor(list(images), return_tensors="pt")
            if self.model_type in QWEN_VL_TYPES:
                merge = self.image_processor.merge_size
                counts = [int(g.prod()) // merge ** 2 for g in out["image_grid_thw"]]
                extra = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
            else:
                counts = [int(n) for n in out["num_patches"]]
                extra = {"pixel_values": out["pixel_values"]}
            texts = self._expand(texts, counts)
        batch = dict(self.tokenizer(texts, padding=padding, return_tensors=return_tensors, **kwargs))
        if self.model_type in QWEN_VL_TYPES:
            marks = (batch["input_ids"] == self.image_token_id) if self.image_token_id is not None else \
                torch.zeros_like(batch["input_ids"], dtype=torch.bool)
            batch["mm_token_type_ids"] = marks.long() * batch["attention_mask"]
        batch.update(extra)
        return batch


def qwen_image_processor(config, max_merged_patches: int = 16):
    """Qwen-VL's PIL image processor (no torchvision) for ``config``'s vision tower: images of at least one
    merged patch, and at most ``max_merged_patches`` merged patches a side."""
    from transformers import Qwen2VLImageProcessorPil

    v = config.vision_config
    side = v.patch_size * v.spatial_merge_size
    return Qwen2VLImageProcessorPil(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                    temporal_patch_size=v.temporal_patch_size,
                                    size={"shortest_edge": side * side, "longest_edge": (max_merged_patches * side) ** 2})


def _internvl_image_processor(config):
    from transformers import GotOcr2ImageProcessorPil

    size = config.vision_config.image_size
    h, w = (size, size) if isinstance(size, int) else size
    return GotOcr2ImageProcessorPil(size={"height": h, "width": w}, crop_to_patches=False)
