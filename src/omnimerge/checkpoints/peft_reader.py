"""PEFT LoRA adapter folders read as full models: W = W_base + (alpha / r) · B·A."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..errors import OmnimergeError
from ..families.align import canonical_keys
from .sources import TensorSource, confined_file, confined_files

_PREFIX = "base_model.model."


def _pattern_value(module: str, patterns: dict, default):
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return value
    return default


class LoraSource(TensorSource):
    """The base model's tensors with the adapter's low-rank updates (and saved modules) applied.

    Everything is checked when the adapter is opened, before a tensor is read: each update has its
    A and B factors, their ranks agree with each other and with the config (``r`` or
    ``rank_pattern``), and B·A has the shape of the base tensor it updates; a saved module has the
    base tensor's shape."""

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
            for have, lacks in ((k_a, k_b), (k_b, k_a)):
                if lacks not in ak:
                    raise OmnimergeError(f"{path}: '{have}' has no matching '{lacks}'; the adapter is incomplete")
            rank = _pattern_value(module, config.get("rank_pattern") or {}, r)
            alph = _pattern_value(module, config.get("alpha_pattern") or {}, alpha)
            raw = base_map[canon]
            self._check_factors(module, k_a, k_b, rank, emb, raw)
            scale = alph / math.sqrt(rank) if rslora else alph / rank
            if not math.isfinite(scale):
                raise OmnimergeError(f"{path}: the LoRA scale of '{module}' (lora_alpha {alph} over rank {rank}) is not "
                                     "a finite number; fix lora_alpha in adapter_config.json")
            self.updates[raw] = (k_a, k_b, float(scale), emb)
        for key, adapter_key in module_keys.items():
            canon = canon_of[key]
            if canon not in base_map:
                raise OmnimergeError(f"{path}: the adapter saves '{key}', which the base model {base.path} does not have")
            raw = base_map[canon]
            got, want = tuple(adapter.info(adapter_key)[1]), tuple(base.source.info(raw)[1])
            if got != want:
                raise OmnimergeError(f"{path}: the adapter saves '{adapter_key}' with shape {got}, but the base's "
                                     f"'{raw}' ({base.path}) is {want}; is base_model_name_or_path the right base?")
            self.replacements[raw] = adapter_key

    def _check_factors(self, module: str, k_a: str, k_b: str, rank: int, emb: bool, raw: str) -> None:
        """A (r × in) and B (out × r) of one update agree with each other, the config's rank and the base."""
        (_, a), (_, b) = self.adapter.info(k_a), self.adapter.info(k_b)
        a, b = tuple(a), tuple(b)
        where = f"{self.path}: LoRA factors of '{module}'"
        if len(a) != 2 or len(b) != 2:
            raise OmnimergeError(f"{where}: A is {a} and B is {b}; both must be matrices")
        if a[0] != b[1]:
            raise OmnimergeError(f"{where}: A is {a} and B is {b}; A's rows and B's columns must both be the rank")
        if a[0] != rank:
            raise OmnimergeError(f"{where} have rank {a[0]}, adapter_config.json says r = {rank} for this module "
                                 "(r / rank_pattern); the config does not belong to these weights")
        want = tuple(self.base.source.info(raw)[1])
        got = (a[1], b[0]) if emb else ((a[1], b[0]) if self.fan_in_fan_out else (b[0], a[1]))
        if got != want:
            raise OmnimergeError(f"{where}: B·A is {got}, but the base's '{raw}' ({self.base.path}) is {want}; is "
                                 "base_model_name_or_path the right base?")

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

    def read_rows(self, key, start, stop):
        """Rows of a tensor: read alone where the adapter leaves it or replaces it; an updated tensor is
        computed whole (B·A in one product, so that its rows are the same bits) and cut."""
        if key in self.replacements:
            return self.adapter.read_rows(self.replacements[key], start, stop)
        if key not in self.updates:
            return self.base.source.read_rows(key, start, stop)
        return self.read(key)[start:stop].clone()

    def describe(self, key):
        what = " + LoRA" if key in self.updates else (" (saved by the adapter)" if key in self.replacements else "")
        return f"{self.base.source.describe(key)}{what} via adapter {self.path}"


def _number(cfg: dict, key: str, default, *, positive_int: bool = False, label: str | None = None):
    v = cfg.get(key, default)
    label = label or f"'{key}'"
    if positive_int:
        if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise ValueError(f"{label} must be a positive integer, got {v!r}")
    elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{label} must be a finite number, got {v!r}")
    return v


def check_adapter_config(cfg) -> None:
    """The fields of adapter_config.json that omnimerge uses have the right types and values."""
    if not isinstance(cfg, dict):
        raise ValueError("it is not a JSON object")
    _number(cfg, "r", 8, positive_int=True)
    _number(cfg, "lora_alpha", 8)
    for key, positive_int in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = cfg.get(key) or {}
        if not isinstance(patterns, dict):
            raise ValueError(f"'{key}' must map module patterns to values, got {type(patterns).__name__}")
        for pat in patterns:
            try:
                re.compile(pat)
            except re.error as e:
                raise ValueError(f"'{key}' has the pattern {pat!r}, which is not a regular expression ({e})") from None
            _number(patterns, pat, None, positive_int=positive_int, label=f"{key}[{pat!r}]")
    for key in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if cfg.get(key) not in (None, True, False):
            raise ValueError(f"'{key}' must be true or false, got {cfg.get(key)!r}")
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise ValueError(f"'base_model_name_or_path' must be a path or hub id, got {base!r}")


MAX_ADAPTER_CHAIN = 8


def load_lora(path: Path, *, name: str, relative_to: Path | None, allow_pickle: bool, base_override: str | None,
              chain: tuple[Path, ...] = ()):
    from .checkpoint import Checkpoint, load_checkpoint

    config_path = confined_file(path, "adapter_config.json", str(path))
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
        check_adapter_config(cfg)
    except (ValueError, OSError, RecursionError) as e:
        raise OmnimergeError(f"{config_path}: not a valid LoRA adapter config ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise OmnimergeError(f"{path}: a {cfg.get('peft_type')} adapter; only LoRA adapters can be merged")
    if cfg.get("use_dora"):
        raise OmnimergeError(f"{path}: DoRA adapters are not supported; merge it into its base with PEFT first")
    chain = chain + (path.resolve(),)
    base_spec = base_override or cfg.get("base_model_name_or_path")
    if not base_spec:
        raise OmnimergeError(
            f"{path}: adapter_config.json names no base_model_name_or_path; set `lora_base:` on this model in the recipe"
        )
    weights = _adapter_weights(path, allow_pickle)  # before the base: a missing file is named at once
    base = load_checkpoint(base_spec, name=f"{name} (base {base_spec})", relative_to=relative_to,
                           allow_pickle=allow_pickle, _adapter_chain=chain)
    source = LoraSource(base, weights, cfg, path)
    return Checkpoint(name, path, base.config, source, base.family, base.inferred, base.note,
                      lora={"adapter": str(path), "base": str(base.path), "r": cfg.get("r"),
                            "lora_alpha": cfg.get("lora_alpha"), "updated": len(source.updates)})


def check_adapter_chain(path: Path, chain: tuple[Path, ...]) -> None:
    """An adapter whose base is (through other adapters) itself, or a chain too long to be meant."""
    real = path.resolve()
    if real in chain:
        loop = " -> ".join(str(p) for p in chain[chain.index(real):] + (real,))
        raise OmnimergeError(f"LoRA adapters name each other as base in a cycle: {loop}; set base_model_name_or_path "
                             "(or `lora_base:` in the recipe) to the full model the adapter was trained on")
    if len(chain) >= MAX_ADAPTER_CHAIN:
        raise OmnimergeError(f"{chain[0]}: its base is an adapter of an adapter ... {len(chain)} levels deep; set "
                             "`lora_base:` in the recipe to the full model")


def _adapter_weights(path: Path, allow_pickle: bool) -> TensorSource:
    from .sources import PickleSource, SafetensorsSource

    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        return SafetensorsSource(confined_files(path, [weights], "adapter weights"), path)
    pickled = path / "adapter_model.bin"
    if pickled.is_file():
        if not allow_pickle:
            raise OmnimergeError(f"{path}: has no adapter_model.safetensors, only the pickle adapter_model.bin. Pickles "
                                 "can run arbitrary code when loaded; convert it to safetensors, or pass --allow-pickle "
                                 "if you trust the source")
        return PickleSource(confined_files(path, [pickled], "adapter weights"), path)
    raise OmnimergeError(f"{path}: adapter_model.safetensors is missing — the folder has adapter_config.json but not "
                         "the adapter's weights; copy adapter_model.safetensors into it")
