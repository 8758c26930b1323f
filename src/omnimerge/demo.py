"""`omnimerge demo`: the main job on a built-in default, fully offline, in seconds.

Builds a tiny Qwen2-VL base, three experts fine-tuned from it (seeded perturbations of the
language backbone) and a Qwen2 text LLM with the same backbone shape; merges the experts with
every registered method and the text LLM into the VLM; verifies every output with transformers;
prints a table. (The offline benchmark with trained experts replaces this as the main job.)
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .checkpoints.checkpoint import load_checkpoint
from .api import merge
from .methods import list_methods
from .verify import verify


def _task_vector_stats(out: Path, base: Path, experts: list[Path]) -> tuple[float, float]:
    """Mean over language tensors of cos(τ_merged, τ_i) averaged over experts, and ‖τ_merged‖ / mean ‖τ_i‖."""
    m, b = load_checkpoint(str(out)), load_checkpoint(str(base))
    es = [load_checkpoint(str(e)) for e in experts]
    cos, ratio, n = 0.0, 0.0, 0
    for canon in m.canon_to_raw:
        if not canon.startswith("language.layers."):
            continue
        tb = b.read(canon).float()
        tm = (m.read(canon).float() - tb).flatten()
        taus = [(e.read(canon).float() - tb).flatten() for e in es]
        norms = torch.stack([t.norm() for t in taus])
        if float(norms.min()) == 0.0:
            continue
        cos += float(torch.stack([torch.nn.functional.cosine_similarity(tm, t, dim=0) for t in taus]).mean())
        ratio += float(tm.norm() / norms.mean())
        n += 1
    return cos / max(n, 1), ratio / max(n, 1)


# methods whose defaults refuse the demo's full fine-tunes, with the parameters that give them a route
DEMO_PARAMETERS = {"lora_lego": {"unit_rank": "knee"}}  # LoRA-LEGO clusters LoRA units: cut each τ_i at its knee


def build_demo_models(work: Path) -> tuple[Path, list[Path], Path]:
    """The demo's tiny models under ``work``: ``qwen2-vl-base``, ``qwen2-vl-expert{1,2,3}`` and
    ``qwen2-text`` (examples/demo-ties.yaml merges these); returns (base, experts, text)."""
    from .tiny import build_tiny, make_expert

    base = build_tiny("qwen2_vl", work / "qwen2-vl-base", seed=0)
    experts = [make_expert(base, work / f"qwen2-vl-expert{i}", seed=i, scale=0.02) for i in (1, 2, 3)]
    text = build_tiny("qwen2", work / "qwen2-text", seed=0)
    return base, experts, text


def run_demo(workdir: str | Path, console: Console | None = None) -> list[dict]:
    console = console or Console()
    work = Path(workdir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    console.print(f"building tiny models in {work} ...")
    base, experts, text = build_demo_models(work)
    rows = []
    data_aware = [m.name for m in list_methods() if m.needs_calibration]
    for method in list_methods():
        if method.needs_calibration:  # they learn from samples rendered by a processor; the bench runs them
            continue
        recipe = {
            "method": method.name,
            "models": [{"path": str(e)} for e in experts[: method.max_models]],  # slerp takes one
            "skeleton": str(base),
            **({"base": str(base)} if method.needs_base else {}),
            **({"parameters": DEMO_PARAMETERS[method.name]} if method.name in DEMO_PARAMETERS else {}),
        }
        rows.append(_run(console, f"capability: {method.name}", recipe, work / f"merged-{method.name}", base, experts))
    backbone = {"method": "average", "models": [{"path": str(experts[0]), "weight": 0.7},
                                               {"path": str(text), "weight": 0.3}], "skeleton": str(experts[0])}
    rows.append(_run(console, "backbone: qwen2 text → qwen2-vl (average 0.7/0.3)", backbone,
                     work / "merged-backbone", base, experts))
    table = Table(title="omnimerge demo: tiny Qwen2-VL, 3 experts (language backbone merged, vision kept)")
    for col in ("merge", "seconds", "verify", "mean cos(τ_merged, τ_i)", "‖τ_merged‖ / mean ‖τ_i‖"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], f"{r['seconds']:.2f}", "ok" if r["ok"] else "FAIL", f"{r['cos']:.3f}", f"{r['ratio']:.3f}")
    console.print(table)
    if data_aware:
        console.print(f"not in the demo: {', '.join(data_aware)} learn from calibration samples per model "
                      "(`calibration:` in the recipe; `omnimerge bench` runs them)")
    console.print(f"outputs are in {work}; inspect one with `omnimerge inspect {work / 'merged-ties'}`")
    return rows


def _run(console, name, recipe, out, base, experts) -> dict:
    t0 = time.perf_counter()
    merge(recipe, out, force=True, progress=False)
    seconds = time.perf_counter() - t0
    res = verify(out)
    cos, ratio = _task_vector_stats(out, base, experts)
    console.print(f"  {name}: {seconds:.2f} s, verify {'ok' if res.ok else 'FAILED'}")
    return {"name": name, "seconds": seconds, "ok": res.ok, "cos": cos, "ratio": ratio,
            "checks": [c.__dict__ for c in res.checks]}
