"""A PEFT LoRA adapter folder, written tensor by tensor: adapter_model.safetensors + adapter_config.json.

PEFT names every tensor after the module that holds it in the model *as transformers builds it in
memory* (``model.language_model.layers.0.self_attn.q_proj`` for Qwen2-VL, whose files say
``model.layers.0.self_attn.q_proj``), behind the prefix ``base_model.model.``:

* a Linear layer's update ΔW = s · B A (ΔW: out × in): ``<module>.lora_A.weight`` (r × in) and
  ``<module>.lora_B.weight`` (out × r);
* an Embedding's update (ΔW: vocab × dim) = s · (B A)ᵀ: ``<module>.lora_embedding_A`` (r × vocab)
  and ``<module>.lora_embedding_B`` (dim × r);
* a LoRA layer's new bias (config ``bias: lora_only``): ``<module>.base_layer.bias``;
* a module saved whole (config ``modules_to_save``): ``<module>.<parameter>``.

The scale is s = lora_alpha / r, per module through ``rank_pattern`` / ``alpha_pattern``. This
writer gives every module alpha = its own rank, so s = 1 exactly and B A is the update itself.
``checkpoints/peft_reader.py`` reads such folders back (the same names, the same scale).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections import Counter, defaultdict
from pathlib import Path

import torch

from ..errors import OmnimergeError
from .safetensors_io import DTYPE_NAMES, tensor_nbytes

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


class AdapterWriter:
    """Collects an adapter's tensors as they are computed and writes the folder on ``close``.

    Tensors go to a spool file at once (memory holds one tensor at a time); the safetensors
    header, which needs every shape and only then is known, is written first on ``close`` and the
    spooled bytes are copied after it.
    """

    def __init__(self, folder: Path, factor_dtype: torch.dtype = torch.float32):
        self.folder = Path(folder)
        self.factor_dtype = factor_dtype
        self._spool_path = self.folder / f".{WEIGHTS}.spool"
        self._spool = open(self._spool_path, "w+b")
        self._entries: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []  # name, dtype, shape, offset
        self._offset = 0
        self.ranks: dict[str, int] = {}  # module -> LoRA rank
        self.embeddings: set[str] = set()
        self.biases: set[str] = set()
        self.saved: dict[str, set[str]] = defaultdict(set)  # module -> parameters saved whole

    # --- tensors ------------------------------------------------------------------------------
    def _put(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._spool.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        nbytes = tensor_nbytes(t.dtype, tuple(t.shape))
        self._entries.append((PREFIX + name, t.dtype, tuple(t.shape), self._offset))
        self._offset += nbytes

    def add_lora(self, module: str, b: torch.Tensor, a: torch.Tensor, *, embedding: bool = False) -> None:
        """The update of ``module``'s weight is ``b @ a`` (weight orientation: out × in, or vocab × dim)."""
        if module in self.ranks:
            raise RuntimeError(f"LoRA factors for {module} were already written")
        b, a = b.to(self.factor_dtype), a.to(self.factor_dtype)
        if embedding:
            self._put(f"{module}.lora_embedding_A", b.T)
            self._put(f"{module}.lora_embedding_B", a.T)
            self.embeddings.add(module)
        else:
            self._put(f"{module}.lora_A.weight", a)
            self._put(f"{module}.lora_B.weight", b)
        self.ranks[module] = int(a.shape[0])

    def add_bias(self, module: str, bias: torch.Tensor) -> None:
        """The new bias of a LoRA-adapted Linear layer (replaces the base's)."""
        self._put(f"{module}.base_layer.bias", bias)
        self.biases.add(module)

    def add_saved(self, module: str, param: str, tensor: torch.Tensor) -> None:
        """One parameter of a module that the adapter saves whole (replaces the base's)."""
        self._put(f"{module}.{param}", tensor)
        self.saved[module].add(param)

    # --- the folder ---------------------------------------------------------------------------
    def close(self, *, base_model: str, modules: list[str]) -> dict:
        """Write adapter_model.safetensors and adapter_config.json; ``modules`` are the names of every
        module of the base model (to choose target names that match only the adapted ones)."""
        if not self.ranks:
            self.abort()
            what = (f"only {', '.join(sorted(self.saved))} changed, which are not layers LoRA can adapt"
                    if self.saved else "the result equals the base model: nothing changed")
            raise OmnimergeError(f"no LoRA adapter to write: {what}")
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        for name, dtype, shape, offset in self._entries:
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + tensor_nbytes(dtype, shape)]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._spool.flush()
        self._spool.seek(0)
        with open(self.folder / WEIGHTS, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            shutil.copyfileobj(self._spool, f, 16 << 20)
            f.flush()
            os.fsync(f.fileno())
        self.abort()
        config = adapter_config(self.ranks, modules, sorted(self.saved), bool(self.biases), base_model)
        (self.folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return config

    def abort(self) -> None:
        if not self._spool.closed:
            self._spool.close()
        self._spool_path.unlink(missing_ok=True)

    @property
    def nbytes(self) -> int:
        return self._offset


def target_names(adapted: set[str] | list[str], modules: list[str]) -> list[str]:
    """PEFT ``target_modules`` that select exactly the ``adapted`` modules among ``modules``.

    PEFT matches an entry against a module name by equality or as a dotted suffix. A short name
    (``q_proj``) is used when every module of that name is adapted, else the full names of the
    adapted ones (e.g. the language model's ``q_proj`` but not the vision tower's).
    """
    adapted = set(adapted)
    by_last: dict[str, list[str]] = defaultdict(list)
    for m in modules:
        by_last[m.rsplit(".", 1)[-1]].append(m)
    out: list[str] = []
    for last in sorted(by_last):
        chosen = [m for m in by_last[last] if m in adapted]
        if not chosen:
            continue
        out += [last] if len(chosen) == len(by_last[last]) else sorted(chosen)
    missing = adapted - {m for names in by_last.values() for m in names}
    if missing:
        raise RuntimeError(f"adapted modules not in the model: {sorted(missing)[:3]}")
    return out


def adapter_config(ranks: dict[str, int], modules: list[str], modules_to_save: list[str], bias: bool,
                   base_model: str) -> dict:
    """adapter_config.json: r is the most common rank; modules of another rank get their own
    ``rank_pattern`` entry (the module's full name, escaped, which PEFT matches as a dotted suffix),
    and ``alpha_pattern`` mirrors it, so that alpha / r = 1 for every module."""
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))
    pattern = {re.escape(m): k for m, k in sorted(ranks.items()) if k != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": target_names(ranks, modules),
        "modules_to_save": modules_to_save or None,
        "bias": "lora_only" if bias else "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
