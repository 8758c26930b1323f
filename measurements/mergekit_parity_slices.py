"""Parity with mergekit for layer stacking (``slices:``) and vocabularies (``tokenizer_source`` / ``tokenizer``).

Needs a separate venv with mergekit 0.1.5, as measurements/mergekit_parity.py::

    python measurements/mergekit_parity_slices.py --mergekit-venv /tmp/mkvenv

Tiny Qwen2 models of 4 layers are built offline: a base with 392 token rows for its 385 tokens (padding rows,
as real Qwen2 checkpoints have), two models perturbed in every tensor, and a copy of one whose tokenizer has
three more tokens. Each configuration is
merged by mergekit (one subprocess, ``HF_HUB_OFFLINE=1``) and by omnimerge, in float32, and compared: the
tensor names, every tensor (max |Δ|; embedding rows matched by token when the two vocabularies number the
tokens differently), the output vocabulary, and ``num_hidden_layers`` / ``vocab_size`` in the config.

mergekit 0.1.5 with transformers 5 fails to save the config of a stacked model (it rewrites
``num_hidden_layers`` but not ``layer_types``); the driver patches ``layer_types`` to the slices' layers
before the config is saved, which is what omnimerge writes. The Qwen2-VL configuration (``modules:``)
compares tensors only: mergekit rewrites the top-level ``num_hidden_layers`` there but leaves
``text_config``'s, so transformers drops its output's extra layers. Prints a Markdown table and writes
parity_slices.json to the work folder. Nothing here is timed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

DRIVER = r"""
import sys, yaml
import mergekit.merge as mm
from mergekit.config import MergeConfiguration
from mergekit.options import MergeOptions

_out_config = mm._model_out_config

def _with_layer_types(config, arch_info, trust_remote_code=False):
    res = _out_config(config, arch_info, trust_remote_code=trust_remote_code)
    slices = config.slices or []
    if slices and getattr(res, "layer_types", None) is not None:
        types = []
        for s in slices:
            src = s.sources[0]
            own = src.model.config(trust_remote_code=False).layer_types
            types += list(own[src.layer_range[0]:src.layer_range[1]])
        res.layer_types = types
    return res

mm._model_out_config = _with_layer_types
for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):
    conf = MergeConfiguration.model_validate(yaml.safe_load(open(cfg)))
    mm.run_merge(conf, out, options=MergeOptions(random_seed=0, quiet=True, copy_tokenizer=True,
                                                  write_model_card=False))
    print("merged", cfg, flush=True)
"""


def with_new_tokens(src: Path, dst: Path, tokens: list[str], seed: int) -> Path:
    """A copy of ``src`` whose tokenizer has ``tokens`` added, with an embedding and lm_head row for each."""
    from transformers import AutoTokenizer

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    tok = AutoTokenizer.from_pretrained(dst)
    tok.add_tokens(tokens)
    tok.save_pretrained(dst)
    w = load_file(str(dst / "model.safetensors"))
    rows = w["model.embed_tokens.weight"].shape[0]
    extra = max(0, len(tok) - rows)
    g = torch.Generator().manual_seed(seed)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        w[k] = torch.cat([w[k], torch.randn(extra, w[k].shape[1], generator=g) * 0.02])
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["vocab_size"] = rows + extra
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def with_rows(folder: Path, rows: int, seed: int) -> Path:
    """``folder``'s model with ``rows`` embedding and lm_head rows (padding rows past its tokenizer, as real
    Qwen2 checkpoints have: mergekit 0.1.5 stops on a tokenizer with tokens past the embedding rows)."""
    w = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        extra = rows - w[k].shape[0]
        w[k] = torch.cat([w[k], torch.randn(extra, w[k].shape[1], generator=g) * 0.02])
    save_file(w, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = rows
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def vlm_pair(work: Path) -> tuple[Path, Path]:
    """Two tiny Qwen2-VL models of 3 layers; their configs also say ``num_hidden_layers`` at the top, where
    mergekit 0.1.5's Qwen2-VL definition reads it (transformers 5 writes it only in ``text_config``)."""
    from omnimerge.tiny import build_tiny, make_expert

    a = build_tiny("qwen2_vl", work / "vl-a", seed=3, num_layers=3)
    b = make_expert(a, work / "vl-b", seed=4, scale=0.02, pattern=".")
    for f in (a, b):
        cfg = json.loads((f / "config.json").read_text())
        cfg["num_hidden_layers"] = cfg["text_config"]["num_hidden_layers"]
        (f / "config.json").write_text(json.dumps(cfg, indent=2))
    return a, b


# Configurations whose config mergekit writes wrong (text_config keeps the source's layer count): tensors only.
TENSORS_ONLY = ("Qwen2-VL modules: text_decoder slices, tower and projector from one model each",)


def configs(a: str, b: str, c: str, t: str, va: str, vb: str) -> dict[str, str]:
    """name -> mergekit YAML. ``a`` the base, ``b``/``c`` perturbed copies, ``t`` = ``b`` with new tokens,
    ``va``/``vb`` two Qwen2-VL models."""
    return {
        "passthrough, two models, overlapping ranges": f"""
merge_method: passthrough
dtype: float32
slices:
  - sources: [{{model: {a}, layer_range: [0, 3]}}]
  - sources: [{{model: {b}, layer_range: [1, 4]}}]
""",
        "passthrough, scale with a gradient": f"""
merge_method: passthrough
dtype: float32
slices:
  - sources: [{{model: {a}, layer_range: [0, 2]}}]
  - sources:
      - model: {b}
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: [0.0, 0.5, 1.0]
            - filter: down_proj
              value: 0.5
            - value: 1.0
  - sources: [{{model: {c}, layer_range: [3, 4]}}]
""",
        "slerp slices, gradients per slice": f"""
merge_method: slerp
base_model: {a}
dtype: float32
slices:
  - sources: [{{model: {a}, layer_range: [0, 2]}}, {{model: {b}, layer_range: [0, 2]}}]
    parameters:
      t: [0.1, 0.9]
  - sources: [{{model: {a}, layer_range: [1, 4]}}, {{model: {b}, layer_range: [1, 4]}}]
parameters:
  t:
    - filter: self_attn
      value: [0.0, 0.5, 1.0]
    - value: 0.3
""",
        "linear slices, per-source weights": f"""
merge_method: linear
dtype: float32
slices:
  - sources:
      - {{model: {a}, layer_range: [0, 2], parameters: {{weight: [1.0, 0.2]}}}}
      - {{model: {c}, layer_range: [2, 4], parameters: {{weight: 0.5}}}}
  - sources:
      - {{model: {b}, layer_range: [0, 4]}}
      - {{model: {c}, layer_range: [0, 4], parameters: {{weight: [{{filter: mlp, value: 0.25}}, {{value: 1.0}}]}}}}
parameters:
  weight: 0.7
""",
        "task_arithmetic slices, slice base": f"""
merge_method: task_arithmetic
base_model: {a}
dtype: float32
slices:
  - sources: [{{model: {a}, layer_range: [0, 4]}}, {{model: {b}, layer_range: [0, 4], parameters: {{weight: 0.6}}}}]
  - base_model: {c}
    sources: [{{model: {c}, layer_range: [2, 4]}}, {{model: {b}, layer_range: [0, 2], parameters: {{weight: 1.5}}}}]
parameters:
  lambda: 0.8
""",
        "linear, tokenizer_source: union": f"""
merge_method: linear
dtype: float32
tokenizer_source: union
models:
  - {{model: {a}, parameters: {{weight: 0.6}}}}
  - {{model: {t}, parameters: {{weight: 0.4}}}}
""",
        "task_arithmetic, tokenizer_source: base": f"""
merge_method: task_arithmetic
base_model: {a}
dtype: float32
tokenizer_source: base
models:
  - {{model: {t}, parameters: {{weight: 0.5}}}}
  - {{model: {c}, parameters: {{weight: 0.5}}}}
""",
        "ties, tokenizer: union with tokens and padding": f"""
merge_method: ties
base_model: {a}
dtype: float32
tokenizer:
  source: union
  pad_to_multiple_of: 64
  tokens:
    <tool_a>: {{source: {{kind: zero}}}}
    <s>:
      source: {{kind: model_token, model: {a}, token: "</s>"}}
      force: true
models:
  - {{model: {t}, parameters: {{weight: 0.7, density: 0.5}}}}
  - {{model: {c}, parameters: {{weight: 0.3, density: 0.5}}}}
""",
        "passthrough slices, tokenizer_source: a model": f"""
merge_method: passthrough
dtype: float32
tokenizer_source: {t}
slices:
  - sources: [{{model: {a}, layer_range: [0, 2]}}]
  - sources: [{{model: {t}, layer_range: [2, 4]}}]
""",
        TENSORS_ONLY[0]: f"""
merge_method: passthrough
dtype: float32
modules:
  text_decoder:
    slices:
      - sources: [{{model: {va}, layer_range: [0, 2]}}]
      - sources: [{{model: {vb}, layer_range: [1, 3]}}]
  vision_tower:
    models: [{{model: {vb}}}]
  multi_modal_projector:
    models: [{{model: {va}}}]
""",
    }


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def _vocab(folder: Path) -> dict[str, int] | None:
    from transformers import AutoTokenizer

    if not (folder / "tokenizer_config.json").is_file():
        return None
    return AutoTokenizer.from_pretrained(folder).get_vocab()


def _layers(cfg: dict) -> int | None:
    return (cfg.get("text_config") or cfg).get("num_hidden_layers")


def compare(ours: Path, theirs: Path, check_config: bool = True) -> dict:
    a, b = _weights(ours), _weights(theirs)
    if set(a) != set(b):
        return {"ok": False, "detail": f"different tensors: {sorted(set(a) ^ set(b))[:5]}"}
    va, vb = _vocab(ours), _vocab(theirs)
    out: dict = {}
    if va is not None and vb is not None and va != vb:
        if set(va) != set(vb):
            return {"ok": False, "detail": f"different vocabularies: {sorted(set(va) ^ set(vb))[:5]}"}
        out["vocab"] = "same tokens, other ids: rows matched by token"
        order_a = torch.tensor([va[t] for t in sorted(va)])
        order_b = torch.tensor([vb[t] for t in sorted(va)])
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            if k in a:
                a[k], b[k] = a[k][order_a], b[k][order_b]
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    ca = json.loads((ours / "config.json").read_text())
    cb = json.loads((theirs / "config.json").read_text())
    same_cfg = all(ca.get(k) == cb.get(k) for k in ("num_hidden_layers", "vocab_size", "layer_types")) and \
        _layers(ca) == _layers(cb)
    out.update(max_abs_diff=diff, layers=_layers(ca), mergekit_layers=_layers(cb),
               vocab_size=(ca.get("text_config") or ca).get("vocab_size"), config_equal=same_cfg,
               ok=diff <= 1e-6 and (same_cfg or not check_config) and (va is None) == (vb is None))
    return out


def run(work: Path, venv: Path) -> list[dict]:
    import omnimerge
    from omnimerge.tiny import build_tiny, make_expert

    work.mkdir(parents=True, exist_ok=True)
    a = with_rows(build_tiny("qwen2", work / "a", seed=0, num_layers=4), 392, seed=4)
    b = make_expert(a, work / "b", seed=1, scale=0.02, pattern=".")
    c = make_expert(a, work / "c", seed=2, scale=0.02, pattern=".")
    t = with_new_tokens(b, work / "t", ["<tool_a>", "<tool_b>", "<think>"], seed=3)
    va, vb = vlm_pair(work)
    cfgs = configs(str(a), str(b), str(c), str(t), str(va), str(vb))
    args = []
    for i, text in enumerate(cfgs.values()):
        p = work / f"cfg{i}.yml"
        p.write_text(text)
        args += [str(p), str(work / f"mergekit{i}")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="")
    res = subprocess.run([str(venv / "bin" / "python"), "-c", DRIVER, *args], env=env, capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise RuntimeError(f"mergekit failed:\n{res.stderr[-4000:]}")
    rows = []
    for i, name in enumerate(cfgs):
        ours = work / f"omnimerge{i}"
        omnimerge.merge(work / f"cfg{i}.yml", ours, force=True, progress=False)
        rows.append({"config": name, **compare(ours, work / f"mergekit{i}", name not in TENSORS_ONLY)})
    (work / "parity_slices.json").write_text(json.dumps(rows, indent=2))
    return rows


def main() -> int:
    from mergekit_parity import parse_cli  # this folder's other parity measurement (run as a script)

    work, venv = parse_cli(__doc__, "mergekit-parity-slices-")
    rows = run(work, venv)
    print("| configuration | layers (mergekit's config) | vocab_size | max \\|omnimerge − mergekit\\| | ok |\n"
          "|---|---|---|---|---|")
    for r in rows:
        if "max_abs_diff" in r:
            print(f"| {r['config']} | {r['layers']} ({r['mergekit_layers']}) | {r['vocab_size']} | "
                  f"{r['max_abs_diff']:.3g} | {'yes' if r['ok'] else 'NO'} |")
        else:
            print(f"| {r['config']} | | | {r['detail']} | NO |")
    print(f"\noutputs and parity_slices.json in {work}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
