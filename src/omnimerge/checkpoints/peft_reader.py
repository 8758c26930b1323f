"""PEFT LoRA adapter folders read as full models: W = W_base + (alpha / r) · B·A."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from ..errors import OmnimergeError
from ..families.align import canonical_keys
from .sources import TensorSource, open_weights

_PREFIX = "base_model.model."


def _pattern_value(module: str, patterns: dict, default):
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return value
    return default


class LoraSource(TensorSource):
    """The base model's tensors with the adapter's low-rank updates (and saved modules) applied."""

    def __init__(self, base, adapter: TensorSource, config: dict, path: Path):
        self.path = path
        self.base = base
        self.adapter = adapter
        r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
        rslora = bool(config.get("use_rslora"))
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        # module name (model-side, e.g. model.language_model.layers.0.self_attn.q_proj) -> base raw key
        ak = adapter.keys()
        module_keys: dict[str, str] = {}
        self.updates: dict[str, tuple[str, str, float, bool]] = {}  # base raw -> (A key, B key, scale, embedding)
        self.replacements: dict[str, str] = {}  # base raw -> adapter key
        base_map = base.canon_to_raw
        modules = set()
        for k in ak:
            if not k.startswith(_PREFIX):
                raise OmnimergeError(f"{path}: adapter tensor '{k}' does not start with '{_PREFIX}'; not a PEFT LoRA adapter")
            rest = k[len(_PREFIX):]
            m = re.match(r"^(.*)\.(lora_A|lora_B)\.weight$", rest) or re.match(r"^(.*)\.(lora_embedding_A|lora_embedding_B)$", rest)
            if m:
                modules.add((m.group(1), "embedding" in m.group(2)))
            else:
                module_keys[rest.replace(".base_layer.", ".").replace(".modules_to_save.", ".")] = k
        canon_of = canonical_keys([m + ".weight" for m, _ in modules] + list(module_keys), base.family)
        for module, emb in sorted(modules):
            canon = canon_of[module + ".weight"]
            if canon not in base_map:
                raise OmnimergeError(
                    f"{path}: the adapter updates '{module}', which the base model {base.path} does not have "
                    f"(canonical '{canon}'); is base_model_name_or_path the right base?"
                )
            k_a = f"{_PREFIX}{module}." + ("lora_embedding_A" if emb else "lora_A.weight")
            k_b = f"{_PREFIX}{module}." + ("lora_embedding_B" if emb else "lora_B.weight")
            if k_b not in ak:
                raise OmnimergeError(f"{path}: '{k_a}' has no matching '{k_b}'")
            rank = _pattern_value(module, config.get("rank_pattern") or {}, r)
            alph = _pattern_value(module, config.get("alpha_pattern") or {}, alpha)
            scale = alph / math.sqrt(rank) if rslora else alph / rank
            self.updates[base_map[canon]] = (k_a, k_b, float(scale), emb)
        for key, adapter_key in module_keys.items():
            canon = canon_of[key]
            if canon not in base_map:
                raise OmnimergeError(f"{path}: the adapter saves '{key}', which the base model {base.path} does not have")
            self.replacements[base_map[canon]] = adapter_key

    def keys(self):
        return self.base.source.keys()

    def info(self, key):
        return self.base.source.info(key)

    def read(self, key):
        if key in self.replacements:
            return self.adapter.read(self.replacements[key])
        w = self.base.source.read(key)
        if key not in self.updates:
            return w
        k_a, k_b, scale, emb = self.updates[key]
        a = self.adapter.read(k_a).float()
        b = self.adapter.read(k_b).float()
        delta = b @ a
        if emb or self.fan_in_fan_out:
            delta = delta.T
        if tuple(delta.shape) != tuple(w.shape):
            raise OmnimergeError(
                f"{self.path}: LoRA update for '{key}' has shape {tuple(delta.shape)}, the base tensor {tuple(w.shape)}"
            )
        return w.float() + scale * delta

    def describe(self, key):
        what = " + LoRA" if key in self.updates else (" (saved by the adapter)" if key in self.replacements else "")
        return f"{self.base.source.describe(key)}{what} via adapter {self.path}"


def load_lora(path: Path, *, name: str, relative_to: Path | None, allow_pickle: bool, base_override: str | None):
    from .checkpoint import Checkpoint, load_checkpoint

    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except ValueError as e:
        raise OmnimergeError(f"{path / 'adapter_config.json'}: not valid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise OmnimergeError(f"{path}: a {cfg.get('peft_type')} adapter; only LoRA adapters can be merged")
    if cfg.get("use_dora"):
        raise OmnimergeError(f"{path}: DoRA adapters are not supported; merge it into its base with PEFT first")
    base_spec = base_override or cfg.get("base_model_name_or_path")
    if not base_spec:
        raise OmnimergeError(
            f"{path}: adapter_config.json names no base_model_name_or_path; set `lora_base:` on this model in the recipe"
        )
    base = load_checkpoint(base_spec, name=f"{name} (base {base_spec})", relative_to=relative_to,
                           allow_pickle=allow_pickle)
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        from .sources import SafetensorsSource

        adapter: TensorSource = SafetensorsSource([weights], path)
    else:
        adapter = open_weights(path, allow_pickle)
    source = LoraSource(base, adapter, cfg, path)
    return Checkpoint(name, path, base.config, source, base.family, base.inferred, base.note,
                      lora={"adapter": str(path), "base": str(base.path), "r": cfg.get("r"),
                            "lora_alpha": cfg.get("lora_alpha"), "updated": len(source.updates)})
