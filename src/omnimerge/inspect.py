"""`omnimerge inspect`: what a checkpoint holds, per component, as omnimerge sees it."""

from __future__ import annotations

from collections import Counter
from typing import Any

from .checkpoints.checkpoint import load_checkpoint, text_config
from .checkpoints.safetensors_io import tensor_nbytes
from .families.align import COMPONENTS, component_of


def inspect_model(spec: str, *, allow_pickle: bool = False) -> dict[str, Any]:
    ckpt = load_checkpoint(spec, allow_pickle=allow_pickle)
    tcfg = text_config(ckpt.config)
    comps: dict[str, dict[str, Any]] = {}
    for raw, canon in ckpt.raw_to_canon.items():
        dtype, shape = ckpt.source.info(raw)
        n = 1
        for s in shape:
            n *= s
        c = comps.setdefault(component_of(canon), {"tensors": 0, "parameters": 0, "bytes": 0, "dtypes": Counter()})
        c["tensors"] += 1
        c["parameters"] += n
        c["bytes"] += tensor_nbytes(dtype, shape)
        c["dtypes"][str(dtype).removeprefix("torch.")] += 1
    ordered = {k: {**comps[k], "dtypes": dict(comps[k]["dtypes"])} for k in COMPONENTS if k in comps}
    return {
        "path": str(ckpt.path),
        "model_type": ckpt.config.get("model_type"),
        "architectures": ckpt.config.get("architectures"),
        "family": ckpt.family.name,
        "kind": ckpt.family.kind,
        "inferred": ckpt.inferred,
        "note": ckpt.note,
        "lora": ckpt.lora,
        "layers": ckpt.layer_count(),
        "num_hidden_layers": tcfg.get("num_hidden_layers"),
        "vocab_size": tcfg.get("vocab_size", ckpt.config.get("vocab_size")),
        "tied_lm_head": ckpt.tied_lm_head,
        "components": ordered,
        "tensors": sum(c["tensors"] for c in ordered.values()),
        "parameters": sum(c["parameters"] for c in ordered.values()),
    }
