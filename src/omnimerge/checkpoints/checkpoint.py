"""A model input: where it is, its config, its family, and its tensors under canonical keys."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import OmnimergeError
from ..families.align import canonical_keys, component_of, detect_family, layer_index
from ..families.table import Family
from .output import describing_files
from .sources import SafetensorsSource, TensorSource, confined_file, open_weights

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def resolve_path(spec: str, relative_to: Path | None = None) -> Path:
    """A local folder, or a Hugging Face hub id (``org/name[@revision]``) found in the local cache."""
    p = Path(os.path.expanduser(spec))
    candidates = [p] if p.is_absolute() else ([relative_to / p] if relative_to else []) + [p]
    for c in candidates:
        if c.exists():
            return c.resolve()
    if _HUB_ID.match(spec) and not spec.startswith((".", "/")):
        repo, _, rev = spec.partition("@")
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo, revision=rev or None, local_files_only=True))
        except Exception:  # noqa: BLE001 - any failure means "not in the cache"
            raise OmnimergeError(
                f"'{spec}': no such local path, and the hub id is not in the local Hugging Face cache "
                f"(omnimerge never downloads). Fetch it first, e.g. `hf download {repo}`"
                + (f" --revision {rev}" if rev else "") + ", or give a local folder"
            ) from None
    raise OmnimergeError(f"'{spec}': no such file or folder" + (f" (looked in {relative_to} too)" if relative_to else ""))


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise OmnimergeError(
            f"{folder}: no config.json — not a Hugging Face model folder (a PEFT adapter folder needs "
            "adapter_config.json)"
        )
    confined_file(folder, "config.json", str(folder))
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError, RecursionError) as e:
        raise OmnimergeError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise OmnimergeError(f"{path}: not a JSON object")
    return cfg


def text_config(config: dict) -> dict:
    """The language model's config: ``text_config`` / ``llm_config`` in VLM configs, else the config."""
    for k in ("text_config", "llm_config"):
        if isinstance(config.get(k), dict):
            return config[k]
    return config


@dataclass(eq=False)
class Checkpoint:
    """One input model, aligned on canonical keys."""

    name: str
    path: Path
    config: dict
    source: TensorSource
    family: Family
    inferred: bool = False
    note: str = ""
    lora: dict | None = None  # adapter facts when the model is base + LoRA
    canon_to_raw: dict[str, str] = field(default_factory=dict)
    raw_to_canon: dict[str, str] = field(default_factory=dict)
    tied_lm_head: bool = False  # no lm_head tensor: the head reads the embedding

    def __post_init__(self):
        self.raw_to_canon = canonical_keys(self.source.keys(), self.family)
        for raw, canon in self.raw_to_canon.items():
            if canon in self.canon_to_raw:
                raise OmnimergeError(
                    f"{self.path}: tensors '{self.canon_to_raw[canon]}' and '{raw}' both map to '{canon}'; the "
                    "checkpoint mixes two key layouts"
                )
            self.canon_to_raw[canon] = raw
        if "lm_head.weight" not in self.canon_to_raw and "embed.weight" in self.canon_to_raw:
            self.tied_lm_head = True

    # canonical access -----------------------------------------------------------------------
    def has(self, canon: str) -> bool:
        return canon in self.canon_to_raw or (canon == "lm_head.weight" and self.tied_lm_head)

    def raw_key(self, canon: str) -> str:
        if canon == "lm_head.weight" and self.tied_lm_head:
            return self.canon_to_raw["embed.weight"]
        return self.canon_to_raw[canon]

    def info(self, canon: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self.source.info(self.raw_key(canon))

    def read(self, canon: str) -> torch.Tensor:
        return self.source.read(self.raw_key(canon))

    def read_rows(self, canon: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (of the first dimension) of a tensor, as a fresh tensor."""
        return self.source.read_rows(self.raw_key(canon), start, stop)

    def describe(self, canon: str) -> str:
        return f"{self.name}: {self.source.describe(self.raw_key(canon))}"

    def folders(self) -> list[Path]:
        """Every folder this input reads: its own and, for a LoRA adapter, its base's (and theirs).
        An output may lie in none of them."""
        base = getattr(self.source, "base", None)
        return [self.path] + (base.folders() if isinstance(base, Checkpoint) else [])

    def layer_count(self) -> int:
        idx = {layer_index(c) for c in self.canon_to_raw}
        idx.discard(None)
        return (max(idx) + 1) if idx else 0

    def components(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for raw, canon in self.raw_to_canon.items():
            out.setdefault(component_of(canon), []).append(raw)
        return out


def load_checkpoint(spec: str, *, name: str | None = None, relative_to: Path | None = None,
                    allow_pickle: bool = False, lora_base: str | None = None,
                    _adapter_chain: tuple[Path, ...] = ()) -> Checkpoint:
    """Open a model folder, a LoRA adapter folder or a cached hub id, lazily.

    ``_adapter_chain``: the adapters whose base this is (to refuse adapters that are their own base)."""
    if not isinstance(spec, str) or not spec.strip():
        raise OmnimergeError(f"{spec!r} is not a path or hub id")
    path = resolve_path(spec, relative_to)
    if path.is_file():
        if path.suffix == ".safetensors":
            folder = path.parent
            config = read_config(folder)
            describing_files(folder)
            source: TensorSource = SafetensorsSource([path], folder)
            return _checkpoint(name or spec, folder, config, source)
        raise OmnimergeError(f"{path}: give the model folder (with config.json), not a single file")
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        from .peft_reader import check_adapter_chain, load_lora

        check_adapter_chain(path, _adapter_chain)
        return load_lora(path, name=name or spec, relative_to=relative_to, allow_pickle=allow_pickle,
                         base_override=lora_base, chain=_adapter_chain)
    config = read_config(path)
    describing_files(path)  # files the output may copy: checked now, not after the merge
    return _checkpoint(name or spec, path, config, open_weights(path, allow_pickle))


def _checkpoint(name: str, path: Path, config: dict, source: TensorSource, **kw) -> Checkpoint:
    det = detect_family(config, source.keys())
    return Checkpoint(name, path, config, source, det.family, det.inferred, det.note, **kw)


def nonfinite_count(t: torch.Tensor) -> int:
    """How many NaN/Inf values ``t`` holds (0 for integer tensors). One reduction when there are none:
    a sum is NaN/Inf whenever an entry is; only a sum that overflowed needs the entry-wise count."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    if bool(torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
        return 0
    return int((~torch.isfinite(t)).sum())


def check_finite(t: torch.Tensor, where: str, *, kept: bool = False, allowed: bool = False) -> None:
    """Refuse a tensor with NaN/Inf values: ``where`` names it (``Checkpoint.describe``). A ``kept``
    tensor is copied to the output unchanged (the skeleton's vision tower, say); ``allowed`` (the
    recipe's ``copy_nonfinite: true``) lets such tensors through as they are."""
    if allowed and kept:
        return
    bad = nonfinite_count(t)
    if bad:
        fix = ("; fix or re-download the model, or set `copy_nonfinite: true` in the recipe to copy it as it is"
               if kept else "; the model is broken — fix or re-download it, or keep this component from the skeleton")
        raise OmnimergeError(f"{where} holds {bad} NaN/Inf value(s){' (a tensor the output copies)' if kept else ''}"
                             + fix)


def check_distinct_models(entries, models: list[Checkpoint], allow: bool) -> None:
    """The recipe's ``models:`` (``entries``, loaded as ``models``) name different folders, unless the
    recipe allows duplicates: two spellings of one path, or a path and the hub id cached there."""
    if allow:
        return
    seen: dict[Path, int] = {}
    for i, (entry, m) in enumerate(zip(entries, models)):
        key = Path(os.path.realpath(m.path))
        if key in seen:
            raise OmnimergeError(f"models[{i}] ({entry.path}) is the same model as models[{seen[key]}] "
                                 f"({entries[seen[key]].path}): both are {key}; listing a model twice gives it twice "
                                 "the weight. Remove one, or set `allow_duplicate_models: true` if that is meant")
        seen[key] = i


def numel(shape) -> int:
    return math.prod(shape) if shape else 1
