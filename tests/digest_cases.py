"""Small merges on every output path, and the digests of their output files.

``tests/data/output_digests.json`` holds the digests that the code written before the streaming
loop was one module produced (``python tests/digest_cases.py --write`` regenerates it: only when
an output is meant to change). test_output_digests.py asserts that every path still writes those
bytes. Files are compared byte for byte, except that the temporary root's path is replaced by
``<ROOT>`` in text files and JSON files lose their ``seconds`` timings.

Each case's ``pins`` are parameters added after the digests were taken, set to the values that give
the old behaviour (``trim: per_tensor`` for TIES; the old code had no such parameter). A pinned
case's weights and report must match; its omnimerge.yaml and model card, which record the recipe
with its pins, are not compared.

The DARE cases' weights and report.json were taken again, on purpose, when DARE's masks became keyed
by (tensor seed, model, element index) instead of drawn in model order from one generator per tensor
(so that a merge in row blocks gives the same bytes whatever the block size; see run/blocks.py).
The DELLA cases' were taken again for the same reason, when MagPrune's draws became DARE's element-keyed
uniforms (``gta.dare_uniforms``) instead of ``torch.rand`` from the tensor's generator in model order, and
its L1 rescale's norms block-independent float64 sums (``methods.rowsums``) instead of float32 ``sum()``s.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

DATA = Path(__file__).parent / "data" / "output_digests.json"
EXPERTS = {"vision": "qwen2_vl", "audio": "qwen2_audio", "video": "llava_onevision"}


def build_inputs(root: Path) -> dict[str, Path]:
    """The tiny models every case reads (deterministic: seeded)."""
    from omnimerge.tiny import build_tiny, make_expert

    m: dict[str, Path] = {}
    for fam in ("qwen2_vl", "qwen2"):
        m[f"{fam}-base"] = build_tiny(fam, root / f"{fam}-base", seed=0)
        for i in (1, 2):
            m[f"{fam}-e{i}"] = make_expert(m[f"{fam}-base"], root / f"{fam}-e{i}", seed=100 + i, scale=0.02)
    for label, fam in EXPERTS.items():
        raw = build_tiny(fam, root / f"{label}-raw", seed=1, backbone=m["qwen2-base"])
        m[label] = make_expert(raw, root / label, seed=201, scale=0.02)
    return m


def _vl(m, method: str, **params) -> dict:
    return {"method": method, "base": str(m["qwen2_vl-base"]),
            "models": [{"path": str(m["qwen2_vl-e1"]), "weight": 0.6}, {"path": str(m["qwen2_vl-e2"]), "weight": 0.4}],
            "parameters": params, "components": {"vision": "merge"}, "shard_size": "128KB"}


def _text(m, method: str, **params) -> dict:
    return {"method": method, "base": str(m["qwen2-base"]),
            "models": [{"path": str(m["qwen2-e1"])}, {"path": str(m["qwen2-e2"])}], "parameters": params}


# name -> (kind, recipe builder, extra keyword arguments, pins added after the digests were taken)
CASES = {
    "merge_task_arithmetic_bf16": ("merge", lambda m: {**_vl(m, "task_arithmetic", **{"lambda": 0.7}),
                                                       "out_dtype": "bfloat16"}, {}, {}),
    "merge_ties": ("merge", lambda m: _vl(m, "ties", density=0.3), {}, {"trim": "per_tensor"}),
    "merge_ties_l1": ("merge", lambda m: _vl(m, "ties", density=0.5, rescale="l1", normalize=False), {},
                      {"trim": "per_tensor"}),
    "merge_dare_ties": ("merge", lambda m: _vl(m, "dare_ties", p=0.5, density=0.7), {}, {"trim": "per_tensor"}),
    "merge_dare_linear": ("merge", lambda m: _vl(m, "dare_linear", p=0.5), {}, {}),
    "merge_dare_linear_l1": ("merge", lambda m: _vl(m, "dare_linear", p=0.3, rescale="l1"), {}, {}),
    "merge_average": ("merge", lambda m: _vl(m, "average"), {}, {}),
    "merge_breadcrumbs": ("merge", lambda m: _vl(m, "breadcrumbs", density=0.8, gamma=0.05), {}, {}),
    "merge_breadcrumbs_ties": ("merge", lambda m: _vl(m, "breadcrumbs_ties", density=0.8, gamma=0.05), {}, {}),
    "merge_della": ("merge", lambda m: _vl(m, "della", density=0.6, epsilon=0.1), {}, {}),
    "merge_della_linear": ("merge", lambda m: _vl(m, "della_linear", density=0.6, epsilon=0.1, rescale="inverse"),
                           {}, {}),
    "merge_tsv": ("merge", lambda m: {**_vl(m, "tsv"), "models": [{"path": str(m[f"qwen2_vl-e{i}"])} for i in (1, 2)]},
                  {}, {}),
    "as_lora_rank4": ("merge", lambda m: _text(m, "task_arithmetic", **{"lambda": 0.9}), {"as_lora": "4"}, {}),
    "as_lora_full_ties": ("merge", lambda m: _text(m, "ties", density=0.4), {"as_lora": "1.0"},
                          {"trim": "per_tensor"}),
    "skeletons": ("merge", lambda m: {
        "method": "task_arithmetic", "base": str(m["qwen2-base"]), "parameters": {"lambda": 0.8},
        "models": [{"path": str(m[label]), "name": label, "weight": w}
                   for label, w in (("vision", 0.5), ("audio", 0.3), ("video", 0.2))],
        "skeletons": ["vision", "audio", "video"]}, {}, {}),
    "extract_rank2": ("extract", lambda m: (m["qwen2-e1"], m["qwen2-base"]), {"rank": 2}, {}),
    "extract_full_bf16": ("extract", lambda m: (m["qwen2_vl-e1"], m["qwen2_vl-base"]),
                          {"rank": "1.0", "out_dtype": "bfloat16"}, {}),
    "analyze": ("analyze", lambda m: _text(m, "task_arithmetic"), {"plots": False}, {}),
}


def _drop(x, pins: dict):
    """``x`` without its ``seconds`` timings, nor the pinned parameters in its ``params`` entries."""
    if isinstance(x, dict):
        return {k: (_drop({q: w for q, w in v.items() if q not in pins}, pins) if k == "params" else _drop(v, pins))
                for k, v in x.items() if k != "seconds"}
    if isinstance(x, list):
        return [_drop(v, pins) for v in x]
    return x


RECIPE_FILES = ("omnimerge.yaml", "README.md")  # they record the recipe, pins included
# Cases whose model card changed by design: it cites the method's reference, which now names the
# source of DARE's default drop rate (MLLMerging's p = 0.2).
CARD_CHANGED = ("merge_dare_linear", "merge_dare_linear_l1")


def digests(folder: Path, root: Path, pins: dict | None = None) -> dict[str, str]:
    """sha256 of every file under ``folder`` (by relative path), normalised as the module doc says; with
    ``pins``, the files that record the recipe are left out (they name the pins)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or (pins and p.name in RECIPE_FILES):
            continue
        data = p.read_bytes()
        if p.suffix in (".json", ".yaml", ".md", ".txt", ".jinja"):
            text = data.decode().replace(str(root), "<ROOT>")
            if p.suffix == ".json":
                text = json.dumps(_drop(json.loads(text), pins or {}), sort_keys=True)
            data = text.encode()
        out[str(p.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out


def input_digests(models: dict[str, Path], root: Path) -> dict[str, str]:
    return {f"{name}/{k}": v for name, p in models.items() for k, v in digests(p, root).items()
            if k.endswith(".safetensors")}


def run_case(name: str, models: dict[str, Path], out: Path, *, pinned: bool = True, **extra) -> Path:
    """Write case ``name``'s output to ``out`` (pins applied unless ``pinned`` is false); returns ``out``."""
    import omnimerge
    from omnimerge.analysis import analyze

    kind, make, kwargs, pins = CASES[name]
    arg = make(models)
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "merge":
        if pinned and pins:
            arg = {**arg, "parameters": {**arg["parameters"], **pins}}
        omnimerge.merge(arg, out, **kwargs, **extra)
    elif kind == "extract":
        omnimerge.extract(*arg, out, **kwargs, **extra)
    else:
        analyze(arg, out, **kwargs, **extra)
    return out


def write(root: Path) -> None:
    models = build_inputs(root / "in")
    data = {"inputs": input_digests(models, root), "cases": {}}
    for name in CASES:
        data["cases"][name] = digests(run_case(name, models, root / "out" / name, pinned=False), root)
    DATA.parent.mkdir(exist_ok=True)
    DATA.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        write(Path(d))
    print(f"wrote {DATA}")
