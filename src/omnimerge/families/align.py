"""Map raw checkpoint keys to canonical keys and components.

Canonical keys are family-independent: ``language.layers.3.self_attn.q_proj.weight``,
``language.norm.weight``, ``embed.weight``, ``lm_head.weight``, ``vision.<...>``,
``projector.<...>``, ``audio.<...>``; anything else is ``other.<raw key>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .table import BY_MODEL_TYPE, Family

COMPONENTS = ("language", "embed", "lm_head", "vision", "projector", "audio", "other")
_LAYER_RE = re.compile(r"^language\.layers\.(\d+)\.")
_GENERIC_Q = re.compile(r"^(.*?)layers\.\d+\.(self_attn|attention|attn)\.")


def component_of(canonical: str) -> str:
    return canonical.split(".", 1)[0]


def layer_index(canonical: str) -> int | None:
    m = _LAYER_RE.match(canonical)
    return int(m.group(1)) if m else None


def _rules(family: Family) -> list[tuple[str, str]]:
    rules: list[tuple[str, str]] = []
    for p in family.decoder:
        rules += [
            (p + "layers.", "language.layers."),
            (p + "norm.", "language.norm."),
            (p + "final_layernorm.", "language.norm."),
            (p + "embed_tokens.", "embed."),
            (p + "rotary_emb.", "language.rotary_emb."),
        ]
    rules += [(p, "lm_head.") for p in family.lm_head]
    rules += list(family.parts)
    # Longest raw prefix first, so `model.visual.` wins over `model.` and
    # `vision_tower.vision_model.` over `vision_tower.`.
    return sorted(rules, key=lambda r: -len(r[0]))


def canonical_keys(raw_keys, family: Family) -> dict[str, str]:
    """Return ``{raw_key: canonical_key}`` for every raw key."""
    rules = _rules(family)
    out: dict[str, str] = {}
    for key in raw_keys:
        for raw_prefix, canon_prefix in rules:
            if key.startswith(raw_prefix):
                out[key] = canon_prefix + key[len(raw_prefix):]
                break
        else:
            out[key] = "other." + key
    return out


@dataclass(frozen=True)
class Detected:
    family: Family
    inferred: bool  # True when the generic fallback guessed the layout
    note: str = ""


_TOWER_WORDS = ("visual.", "vision_tower.", "vision_model.", "vision_encoder.", "image_encoder.", "audio_tower.",
                "audio_encoder.")


def generic_family(raw_keys, model_type: str) -> Family | None:
    """Guess the layout of an unknown family.

    The decoder is a ``<prefix>layers.<i>.(self_attn|attention|attn).*`` prefix that also holds
    ``embed_tokens`` (a ViT tower has layers with self-attention too, but no token embedding);
    the head is any ``...lm_head.weight``; keys under a tower word (``visual.``, ``vision_tower.``,
    ...) are the vision (or audio) component.
    """
    keys = list(raw_keys)
    prefixes = {m.group(1) for k in keys if (m := _GENERIC_Q.match(k))}
    with_embed = {p for p in prefixes if any(k.startswith(p + "embed_tokens.") for k in keys)}
    towers = {p for p in prefixes if any(w in p for w in _TOWER_WORDS)}
    decoder = tuple(sorted(with_embed or (prefixes - towers), key=len))
    if not decoder:
        return None
    heads = tuple(sorted({k[: -len("weight")] for k in keys if k.endswith("lm_head.weight")}))
    parts = set()
    for k in keys:
        if any(k.startswith(p) for p in decoder):
            continue
        for word in _TOWER_WORDS:
            i = k.find(word)
            if i >= 0:
                parts.add((k[: i + len(word)], "audio." if word.startswith("audio") else "vision."))
                break
    return Family(f"generic:{model_type or 'unknown'}", (), "generic", decoder, heads or ("lm_head.",),
                  tuple(sorted(parts)))


def detect_family(config: dict, raw_keys) -> Detected:
    model_type = str(config.get("model_type", ""))
    family = BY_MODEL_TYPE.get(model_type)
    if family is not None:
        return Detected(family, False)
    guessed = generic_family(raw_keys, model_type)
    if guessed is None:
        return Detected(Family(f"generic:{model_type or 'unknown'}", (), "generic", ()), True,
                        "no decoder layers found; every tensor is treated as 'other'")
    return Detected(guessed, True, f"unknown model_type '{model_type}': decoder prefix inferred as "
                    f"{', '.join(repr(p) for p in guessed.decoder)}")
