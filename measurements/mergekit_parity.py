"""Parity with mergekit: run the same mergekit YAML through mergekit and through omnimerge, compare the outputs.

Needs a separate venv with mergekit 0.1.5 (it pins its own torch), e.g.::

    python3 -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install mergekit==0.1.5
    python measurements/mergekit_parity.py --mergekit-venv /tmp/mkvenv

Tiny Qwen2 text models are built offline (a base and three experts perturbed in every tensor); each
configuration is merged by mergekit (one subprocess for all, ``HF_HUB_OFFLINE=1``) and by omnimerge, both in
float32. Deterministic methods are compared tensor by tensor (max |Δ| over all tensors). The random ones
(DARE, DELLA) cannot agree entry by entry (different generators); for them, on one expert, the figures
compared are those the definition fixes: the L1 norm of every merged task vector (both rescale to the
expert's L1 norm) and the fraction of entries kept, pooled over all tensors (overall, and in the smallest
and largest quarter of magnitudes of each row, where DELLA's keep probabilities differ). Prints a Markdown table and writes parity.json to the work folder.
Nothing here is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

DRIVER = r"""
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):
    conf = MergeConfiguration.model_validate(yaml.safe_load(open(cfg)))
    run_merge(conf, out, options=MergeOptions(random_seed=0, quiet=True, copy_tokenizer=False,
                                               write_model_card=False))
    print("merged", cfg, flush=True)
"""


def _models(base: str, experts: list[str], params: list[str | None], include_base=True) -> str:
    lines = [f"  - model: {base}"] if include_base else []
    for e, p in zip(experts, params):
        lines.append(f"  - model: {e}" + (f"\n    parameters: {p}" if p else ""))
    return "models:\n" + "\n".join(lines)


def configs(base: str, ex: list[str], sparse: list[str]) -> dict[str, tuple[str, str]]:
    """name -> (kind, YAML). kind: exact (compare tensors) or random (compare the definition's statistics).
    ``ex``: experts perturbed in every entry; ``sparse``: experts that leave most entries at the base's value
    (for RAM, whose result depends on which entries each expert changes)."""
    w3 = ["{weight: 0.5, density: 0.5}", "{weight: 0.3, density: 0.6}", "{weight: 0.2, density: 0.4}"]
    head = f"base_model: {base}\ndtype: float32\n"
    return {
        "linear": ("exact", "merge_method: linear\ndtype: float32\n" + _models(
            base, ex, ["{weight: 0.5}", "{weight: 0.3}", "{weight: 0.2}"], include_base=False)),
        "linear normalize=false": ("exact", "merge_method: linear\ndtype: float32\nparameters: {normalize: false}\n"
                                   + _models(base, ex, ["{weight: 0.5}", "{weight: 0.3}", "{weight: 0.2}"],
                                             include_base=False)),
        "slerp (filters, gradient)": ("exact", f"merge_method: slerp\n{head}" + _models(base, ex[:1], [None]) + """
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
"""),
        "task_arithmetic": ("exact", f"merge_method: task_arithmetic\n{head}parameters: {{lambda: 0.8}}\n"
                            + _models(base, ex, w3)),
        "task_arithmetic normalize=true": ("exact", f"merge_method: task_arithmetic\n{head}"
                                           "parameters: {normalize: true}\n" + _models(base, ex, w3)),
        "ties": ("exact", f"merge_method: ties\n{head}" + _models(base, ex, w3)),
        "ties normalize=false, rescale": ("exact", f"merge_method: ties\n{head}parameters: {{normalize: false, "
                                          "rescale: true}\n" + _models(base, ex, w3)),
        "breadcrumbs": ("exact", f"merge_method: breadcrumbs\n{head}" + _models(
            base, ex, ["{weight: 0.5, density: 0.8, gamma: 0.05}", "{weight: 0.3, density: 0.7, gamma: 0.02}",
                       "{weight: 0.2, density: 0.9, gamma: 0.01}"])),
        "breadcrumbs_ties": ("exact", f"merge_method: breadcrumbs_ties\n{head}parameters: {{normalize: true, "
                             "density: 0.8, gamma: 0.05}\n" + _models(base, ex, ["{weight: 0.5}", "{weight: 0.3}",
                                                                                   "{weight: 0.2}"])),
        "model_stock": ("exact", f"merge_method: model_stock\n{head}" + _models(base, ex, [None] * 3)),
        "model_stock filter_wise": ("exact", f"merge_method: model_stock\n{head}parameters: {{filter_wise: true}}\n"
                                    + _models(base, ex, [None] * 3)),
        "dare_ties density=1": ("exact", f"merge_method: dare_ties\n{head}" + _models(
            base, ex, ["{weight: 0.5}", "{weight: 0.3}", "{weight: 0.2}"])),
        "nuslerp (base, whole tensors)": ("exact", f"merge_method: nuslerp\n{head}" + _models(
            base, ex[:2], ["{weight: 0.3}", "{weight: 0.7}"])),
        "nuslerp (no base, rows)": ("exact", "merge_method: nuslerp\ndtype: float32\nparameters: "
                                    "{nuslerp_flatten: false}\n" + _models(
                                        base, ex[:2], ["{weight: 0.6}", "{weight: 0.4}"], include_base=False)),
        "nuslerp (base, row_wise)": ("exact", f"merge_method: nuslerp\n{head}parameters: {{nuslerp_flatten: false, "
                                     "nuslerp_row_wise: true}\n" + _models(base, ex[:2], ["{weight: 1}", "{weight: 2}"])),
        "multislerp (base)": ("exact", f"merge_method: multislerp\n{head}" + _models(
            base, ex, ["{weight: 0.5}", "{weight: 0.3}", "{weight: 0.2}"])),
        "multislerp (no base, normalize_weights=false)": (
            "exact", "merge_method: multislerp\ndtype: float32\nparameters: {normalize_weights: false}\n"
            + _models(base, ex, ["{weight: 1.0}", "{weight: 0.6}", "{weight: 0.4}"], include_base=False)),
        "karcher (base among the points)": ("exact", f"merge_method: karcher\n{head}" + _models(base, ex, [None] * 3)),
        "karcher (no base, max_iter 3)": ("exact", "merge_method: karcher\ndtype: float32\nparameters: "
                                          "{max_iter: 3, tol: 1e-6}\n" + _models(base, ex, [None] * 3,
                                                                                 include_base=False)),
        "arcee_fusion": ("exact", f"merge_method: arcee_fusion\n{head}" + _models(base, ex[:1], [None])),
        "nearswap": ("exact", f"merge_method: nearswap\n{head}parameters: {{t: 0.01}}\n" + _models(
            base, ex[:1], [None])),
        "sce": ("exact", f"merge_method: sce\n{head}" + _models(base, ex, [None] * 3)),
        "sce select_topk=0.4": ("exact", f"merge_method: sce\n{head}parameters: {{select_topk: 0.4}}\n"
                                + _models(base, ex, [None] * 3)),
        "sce select_topk=0.4 (sparse experts)": ("exact", f"merge_method: sce\n{head}parameters: {{select_topk: 0.4}}\n"
                                                 + _models(base, sparse, [None] * 3)),
        "multislerp (base, sparse experts)": ("exact", f"merge_method: multislerp\n{head}" + _models(
            base, sparse, ["{weight: 0.2}", "{weight: 0.3}", "{weight: 0.5}"])),
        "ram (sparse experts)": ("exact", f"merge_method: ram\n{head}" + _models(base, sparse, [None] * 3)),
        "ramplus_tl (sparse experts)": ("exact", f"merge_method: ramplus_tl\n{head}parameters: {{r: 0.5, alpha: 0.4}}\n"
                                        + _models(base, sparse, [None] * 3)),
        "ramplus_tl defaults (sparse experts)": ("exact", f"merge_method: ramplus_tl\n{head}"
                                                 + _models(base, sparse, [None] * 3)),
        "dare_linear": ("random", f"merge_method: dare_linear\n{head}" + _models(
            base, ex[:1], ["{weight: 1.0, density: 0.6}"])),
        "dare_ties": ("random", f"merge_method: dare_ties\n{head}" + _models(
            base, ex[:1], ["{weight: 0.7, density: 0.3}"])),
        "della": ("random", f"merge_method: della\n{head}parameters: {{epsilon: 0.2}}\n" + _models(
            base, ex[:1], ["{weight: 1.0, density: 0.5}"])),
        "della_linear": ("random", f"merge_method: della_linear\n{head}" + _models(
            base, ex[:1], ["{weight: 0.8, density: 0.6, epsilon: 0.1}"])),
    }


def _sparse_expert(base: Path, expert: Path, out: Path, seed: int, keep: float) -> Path:
    """A copy of ``expert`` whose task vector keeps each entry with probability ``keep`` (the rest: the base's
    value), so that experts overlap in some entries and not in others."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(expert, out, dirs_exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    b = _weights(base)
    for f in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(f))
        for k in sorted(tensors):
            mask = torch.rand(tensors[k].shape, generator=gen) < keep
            tensors[k] = torch.where(mask, tensors[k], b[k]).contiguous()
        save_file(tensors, str(f), metadata={"format": "pt"})
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def _kept_counts(delta: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Entries kept / present: overall, and in each row's smallest and largest quarter of |τ|."""
    rows_d = delta.reshape(-1, delta.shape[-1]) if delta.ndim >= 2 else delta.reshape(1, -1)
    rows_t = tau.reshape(rows_d.shape)
    kept = ((rows_d != 0) & (rows_t != 0)).double()
    q = max(1, rows_t.shape[1] // 4)
    order = rows_t.abs().argsort(dim=1)
    low, high = kept.gather(1, order[:, :q]), kept.gather(1, order[:, -q:])
    return torch.tensor([kept.sum(), float((rows_t != 0).sum()), low.sum(), low.numel(), high.sum(), high.numel()])


def compare(kind: str, a: dict, b: dict, base: dict, expert: dict) -> dict:
    keys = sorted(a)
    if set(a) != set(b):
        return {"ok": False, "detail": f"different tensors: {sorted(set(a) ^ set(b))[:5]}"}
    if kind == "exact":
        diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)
        scale = max(float(a[k].abs().max()) for k in keys)
        return {"ok": diff <= 1e-5 * max(1.0, scale), "max_abs_diff": diff}
    l1_rel, counts_a, counts_b = 0.0, torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    for k in keys:
        da, db = a[k].double() - base[k].double(), b[k].double() - base[k].double()
        tau = expert[k].double() - base[k].double()
        na, nb = float(da.abs().sum()), float(db.abs().sum())
        l1_rel = max(l1_rel, abs(na - nb) / max(nb, 1e-12))
        counts_a += _kept_counts(da, tau)
        counts_b += _kept_counts(db, tau)
    out = {"l1_rel_diff": l1_rel}
    for i, name in enumerate(("kept", "kept_smallest_quarter", "kept_largest_quarter")):
        fa, fb = counts_a[2 * i] / counts_a[2 * i + 1], counts_b[2 * i] / counts_b[2 * i + 1]
        out[name] = (round(float(fa), 4), round(float(fb), 4))
    # pooled over ~10^5 entries: two draws of the same keep rate differ by well under 0.01
    out["ok"] = l1_rel < 1e-4 and all(abs(out[n][0] - out[n][1]) < 0.01 for n in
                                      ("kept", "kept_smallest_quarter", "kept_largest_quarter"))
    return out


def run(work: Path, venv: Path) -> list[dict]:
    import omnimerge
    from omnimerge.tiny import build_tiny, make_expert

    work.mkdir(parents=True, exist_ok=True)
    base = build_tiny("qwen2", work / "base", seed=0, num_layers=5)
    experts = [make_expert(base, work / f"expert{i}", seed=i, scale=0.02, pattern=".") for i in (1, 2, 3)]
    sparse = [_sparse_expert(base, e, work / f"sparse{i}", seed=10 + i, keep=0.4) for i, e in enumerate(experts)]
    cfgs = configs(str(base), [str(e) for e in experts], [str(s) for s in sparse])
    args = []
    for i, (name, (_, text)) in enumerate(cfgs.items()):
        p = work / f"cfg{i}.yml"
        p.write_text(text)
        args += [str(p), str(work / f"mergekit{i}")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="")
    res = subprocess.run([str(venv / "bin" / "python"), "-c", DRIVER, *args], env=env, capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise RuntimeError(f"mergekit failed:\n{res.stderr[-4000:]}")
    b, e1 = _weights(base), _weights(experts[0])
    rows = []
    for i, (name, (kind, _)) in enumerate(cfgs.items()):
        ours = work / f"omnimerge{i}"
        omnimerge.merge(work / f"cfg{i}.yml", ours, force=True, progress=False)
        row = {"config": name, "kind": kind, **compare(kind, _weights(ours), _weights(work / f"mergekit{i}"), b, e1)}
        rows.append(row)
    (work / "parity.json").write_text(json.dumps(rows, indent=2))
    return rows


def parse_cli(doc: str, prefix: str) -> tuple[Path, Path]:
    """A parity measurement's command line: its work folder (a temporary one by default) and the venv
    with mergekit 0.1.5."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--mergekit-venv", type=Path, required=True, help="venv with mergekit 0.1.5 installed")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    a = ap.parse_args()
    return a.work or Path(tempfile.mkdtemp(prefix=prefix)), a.mergekit_venv


def main() -> int:
    work, venv = parse_cli(__doc__, "mergekit-parity-")
    rows = run(work, venv)
    print("| configuration | compared | result | ok |\n|---|---|---|---|")
    for r in rows:
        if r["kind"] == "exact":
            what = f"max abs diff {r['max_abs_diff']:.3g}"
        else:
            what = (f"L1 rel diff {r['l1_rel_diff']:.2g}; kept (omnimerge, mergekit) {r['kept']}, smallest quarter "
                    f"{r['kept_smallest_quarter']}, largest quarter {r['kept_largest_quarter']}")
        print(f"| {r['config']} | {r['kind']} | {what} | {'yes' if r['ok'] else 'NO'} |")
    print(f"\noutputs and parity.json in {work}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
