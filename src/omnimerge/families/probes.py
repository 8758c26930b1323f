"""Probe inputs: a few text tokens, and an image or an audio clip with its placeholder tokens, that a
model of a family's architecture takes in a forward pass (``omnimerge verify``, the tests).

Each probe (``ModelType.probe`` in the family table) maps a config to (the number of placeholder
tokens, the extra forward keyword arguments); the inputs are random, of the shapes the config asks.
"""

from __future__ import annotations

import torch

from .table import MODEL_TYPES, ModelType



def _qwen_vl_image(c):
    v = c.vision_config
    side = 2 * v.spatial_merge_size  # a 2x2 grid of merged tokens
    pixels = torch.randn(side * side, v.in_channels * v.temporal_patch_size * v.patch_size ** 2)
    thw = torch.tensor([[1, side, side]])
    return side * side // v.spatial_merge_size ** 2, dict(pixel_values=pixels, image_grid_thw=thw)


def _first(x):
    """image_size / patch_size are ints, or (height, width) pairs in InternViT."""
    return x[0] if isinstance(x, (list, tuple)) else x


def _grid(v) -> int:
    """Patches per side of a square ViT input."""
    return _first(v.image_size) // _first(v.patch_size)


def _image(v, *lead):
    return torch.randn(*lead, v.num_channels, _first(v.image_size), _first(v.image_size))


def _vit_tokens(c) -> int:
    """Features a LLaVA-style model keeps per image: patches (+ CLIP's CLS) (- first if 'default')."""
    v = c.vision_config
    return _grid(v) ** 2 + (v.model_type == "clip_vision_model") - (c.vision_feature_select_strategy == "default")


def _llava_image(c):
    return _vit_tokens(c), dict(pixel_values=_image(c.vision_config, 1))


def _onevision_image(c):
    # Two images in one sample: multi-image mode, one tile each, plus one newline token per image.
    size = torch.tensor([[_first(c.vision_config.image_size)] * 2] * 2)
    return 2 * (_vit_tokens(c) + 1), dict(pixel_values=_image(c.vision_config, 2, 1), image_sizes=size,
                                          batch_num_images=torch.tensor([2]))


def _internvl_image(c):
    v = c.vision_config
    return int(_grid(v) ** 2 * c.downsample_ratio ** 2), dict(pixel_values=_image(v, 1))


def _gemma3_image(c):
    return c.mm_tokens_per_image, dict(pixel_values=_image(c.vision_config, 1))


def _mistral3_image(c):
    v = c.vision_config
    side = 2 * v.patch_size * c.spatial_merge_size  # 2x2 merged tokens
    pixels = torch.randn(1, v.num_channels, side, side)
    return 4, dict(pixel_values=pixels, image_sizes=torch.tensor([[side, side]]))


def _idefics3_image(c):
    v = c.vision_config
    return _grid(v) ** 2 // c.scale_factor ** 2, dict(pixel_values=_image(v, 1, 1))


IMAGE_INPUTS = {"qwen_vl": _qwen_vl_image, "llava": _llava_image, "llava_onevision": _onevision_image,
                "internvl": _internvl_image, "gemma3": _gemma3_image, "mistral3": _mistral3_image,
                "idefics3": _idefics3_image}


def _qwen2_audio_input(c):
    a = c.audio_config
    frames = 2 * a.max_source_positions  # what the encoder's position table covers
    tokens = ((frames - 1) // 2 + 1 - 2) // 2 + 1  # a stride-2 convolution, then average pooling by 2
    return tokens, dict(input_features=torch.randn(1, a.num_mel_bins, frames),
                        feature_attention_mask=torch.ones(1, frames, dtype=torch.long))


AUDIO_INPUTS = {"qwen2_audio": _qwen2_audio_input}


def image_token_id(config) -> int:
    """The id of the image placeholder token of a VLM config."""
    for name in ("image_token_id", "image_token_index"):
        if getattr(config, name, None) is not None:
            return getattr(config, name)
    raise ValueError(f"{config.model_type}: config has no image token id")


def audio_token_id(config) -> int:
    """The id of the audio placeholder token of an audio-language config."""
    for name in ("audio_token_id", "audio_token_index"):
        if getattr(config, name, None) is not None:
            return getattr(config, name)
    raise ValueError(f"{config.model_type}: config has no audio token id")


def probe_inputs(model, image: bool = False, audio: bool = False) -> dict[str, torch.Tensor]:
    """Keyword arguments for `model(**inputs)`: 8 text ids, plus an image (or an audio clip) and its
    placeholder tokens if `image` (`audio`).

    Reads only `model.config` (and the model's dtype/device); LLaVA-OneVision gets two images (multi-image mode).
    """
    config = model.config
    kind = MODEL_TYPES.get(config.model_type, ModelType(config.model_type))
    vocab = config.get_text_config().vocab_size
    text = torch.arange(8) + vocab // 2  # ordinary ids, far from the special tokens at either end
    inputs = {}
    if image:
        if kind.probe not in IMAGE_INPUTS:
            raise ValueError(f"no image inputs for model_type {config.model_type!r}")
        n, inputs = IMAGE_INPUTS[kind.probe](config)
        text = torch.cat([text[:4], torch.full((n,), image_token_id(config)), text[4:]])
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        if kind.token_type_arg:
            inputs[kind.token_type_arg] = (text == image_token_id(config)).long()[None]
    elif audio:
        if kind.probe not in AUDIO_INPUTS:
            raise ValueError(f"no audio inputs for model_type {config.model_type!r}")
        n, inputs = AUDIO_INPUTS[kind.probe](config)
        text = torch.cat([text[:4], torch.full((n,), audio_token_id(config)), text[4:]])
        inputs["input_features"] = inputs["input_features"].to(model.dtype)
    ids = text[None]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **inputs}
    return {k: v.to(model.device) for k, v in inputs.items()}
