"""`omnimerge verify`: load a merged folder with transformers, run it, and check what was kept."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoints.checkpoint import load_checkpoint, read_config
from .checkpoints.sources import damaged_weights, open_weights
from .errors import OmnimergeError
from .families.models import model_class
from .families.probes import probe_inputs


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class VerifyResult:
    path: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(Check(name, ok, detail))


def _forward(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def verify(out: str | Path, *, image: bool = True, audio: bool = True) -> VerifyResult:
    """Load ``out`` with the class in its config, run text (and image or audio) forward passes, check logits
    are finite, and check that tensors the recipe kept equal the skeleton's bytes."""
    out = Path(out)
    if not out.is_dir():
        raise OmnimergeError(f"{out}: no such folder; give a merged model folder")
    res = VerifyResult(out)
    try:  # a damaged output is a failed check (exit 1), not an input error
        config = read_config(out)
        cls = model_class(config)
    except OmnimergeError as e:
        res.add("config", False, str(e))
        return res
    damage = damaged_weights(out)
    if damage:
        res.add("weights", False, damage)
        return res
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(out)
    except Exception as e:  # noqa: BLE001 - whatever transformers refuses, verify reports it as a failed check
        res.add("load", False, f"{cls.__name__} cannot load {out}: {type(e).__name__}: {e}")
        return res
    model.eval()
    res.add("load", True, f"{cls.__name__} loaded ({sum(p.numel() for p in model.parameters()):,} parameters)")
    logits = _forward(model, probe_inputs(model))
    res.add("text forward", bool(torch.isfinite(logits).all()), f"logits {tuple(logits.shape)} finite")
    if image and "vision_config" in config:
        try:
            inputs = probe_inputs(model, image=True)
        except (KeyError, NotImplementedError, ValueError) as e:
            res.add("image forward", True, f"skipped: no image inputs known for this family ({e})")
        else:
            logits = _forward(model, inputs)
            res.add("image forward", bool(torch.isfinite(logits).all()), f"logits {tuple(logits.shape)} finite")
    if audio and "audio_config" in config:
        try:
            inputs = probe_inputs(model, audio=True)
        except ValueError as e:
            res.add("audio forward", True, f"skipped: no audio inputs known for this family ({e})")
        else:
            logits = _forward(model, inputs)
            res.add("audio forward", bool(torch.isfinite(logits).all()), f"logits {tuple(logits.shape)} finite")
    _check_kept(out, res)
    return res


def _check_kept(out: Path, res: VerifyResult) -> None:
    report_path = out / "report.json"
    if not report_path.is_file():
        res.add("kept tensors", True, "skipped: no report.json (not written by omnimerge)")
        return
    tensors = json.loads(report_path.read_text())["tensors"]
    kept = {k: v for k, v in tensors.items() if v["action"] == "copy"}
    if not kept:
        res.add("kept tensors", True, "no kept tensors")
        return
    written = open_weights(out, allow_pickle=False)
    sources: dict[str, object] = {}
    bad, missing = [], set()
    for key, entry in kept.items():
        src_path = entry["source_path"]
        if src_path not in sources:
            try:
                sources[src_path] = load_checkpoint(src_path)
            except OmnimergeError:
                sources[src_path] = None
        src = sources[src_path]
        if src is None:
            missing.add(src_path)
            continue
        a = written.read(key)
        b = src.read(entry.get("source_canonical", entry["canonical"]))
        if b.dtype != a.dtype:
            b = b.to(a.dtype)
        if a.shape != b.shape or not torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
            bad.append(key)
    n = len(kept) - len(bad)
    detail = f"{n}/{len(kept)} kept tensors equal their source's bytes"
    if bad:
        detail += "; differ: " + ", ".join(bad[:5])
    if missing:
        detail += f"; sources not found: {', '.join(sorted(missing))}"
    res.add("kept tensors", not bad, detail)
