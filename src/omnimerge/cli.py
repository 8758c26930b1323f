"""The `omnimerge` command: a thin shell over the Python API."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import OmnimergeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Merge the weights of multimodal LLMs.")
out = Console()
err = Console(stderr=True)


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


@app.command()
def merge(
    recipe: Path = typer.Argument(..., help="recipe YAML file"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="output folder"),
    force: bool = typer.Option(False, "--force", help="replace an existing output folder"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate and print the plan; write nothing"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="read .bin/.pt pickles (weights_only=True)"),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="progress bar (default: on a terminal)"),
):
    """Merge the models of RECIPE into OUTPUT."""
    from .engine import merge as run_merge

    if output is None and not dry_run:
        raise OmnimergeError("give an output folder with -o OUTPUT (or --dry-run to only check the recipe)")
    result = run_merge(recipe, output, force=force, dry_run=dry_run, device=device, allow_pickle=allow_pickle,
                       progress=progress)
    plan = result.plan
    for note in plan.notes:
        err.print(f"[yellow]note[/]: {escape(note)}")
    if dry_run:
        table = Table(title=f"plan: {plan.recipe.method} → {plan.skeleton.name} ({len(plan.jobs)} tensors, "
                            f"{_gb(plan.out_bytes)} in {len(plan.shards())} shard(s))")
        for col in ("component", "action", "from", "tensors", "size", "note"):
            table.add_column(col)
        for r in plan.summary():
            table.add_row(r["component"], r["action"], r["from"], str(r["tensors"]), _gb(r["bytes"]), r["note"])
        out.print(table)
        return
    out.print(f"wrote {result.out} ({len(plan.jobs)} tensors, {_gb(plan.out_bytes)}) in {result.seconds:.1f} s")


@app.command()
def inspect(
    model: str = typer.Argument(..., help="model folder, LoRA adapter folder or cached hub id"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
):
    """Show MODEL's family and its components: tensors, parameters, dtypes."""
    from .inspect import inspect_model

    info = inspect_model(model, allow_pickle=allow_pickle)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    out.print(f"[bold]{info['path']}[/]  family [bold]{info['family']}[/] ({info['kind']}), model_type "
              f"{info['model_type']}, {info['layers']} decoder layers, vocab {info['vocab_size']}"
              + (", lm_head tied to embed" if info["tied_lm_head"] else ""))
    if info["note"]:
        out.print(f"[yellow]note[/]: {escape(info['note'])}")
    table = Table()
    for col in ("component", "tensors", "parameters", "size", "dtypes"):
        table.add_column(col)
    for name, c in info["components"].items():
        table.add_row(name, str(c["tensors"]), f"{c['parameters']:,}", _gb(c["bytes"]),
                      ", ".join(f"{k}×{v}" for k, v in c["dtypes"].items()))
    out.print(table)


@app.command()
def verify(
    output: Path = typer.Argument(..., help="a merged model folder"),
    image: bool = typer.Option(True, "--image/--no-image", help="also run a forward pass with an image (VLMs)"),
):
    """Load OUTPUT with transformers, run it, and check kept tensors against their sources."""
    from .verify import verify as run_verify

    res = run_verify(output, image=image)
    for c in res.checks:
        out.print(f"{'[green]ok[/]  ' if c.ok else '[red]FAIL[/]'} {c.name}: {escape(c.detail)}")
    if not res.ok:
        raise typer.Exit(1)


@app.command()
def methods(as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """List the merging methods and their parameters."""
    from .methods import list_methods

    ms = list_methods()
    if as_json:
        print(json.dumps([{"name": m.name, "needs_base": m.needs_base, "summary": m.summary, "reference": m.reference,
                           "parameters": [{"name": p.name, "type": p.type_name, "default": p.default,
                                           "range": p.range_text(), "per_model": p.per_model, "help": p.help}
                                          for p in m.params]} for m in ms], indent=2))
        return
    for m in ms:
        out.print(f"[bold]{m.name}[/]{' (needs base)' if m.needs_base else ''} — {m.summary}")
        out.print(f"  [dim]{escape(m.reference)}[/]")
        for p in m.params:
            scope = "per model" if p.per_model else "global"
            out.print(escape(f"  {p.name}: {p.type_name} = {p.default!r}  [{p.range_text()}; {scope}]  {p.help}"))


@app.command()
def analyze(
    recipe: Path = typer.Argument(..., help="recipe YAML file (needs a base)"),
    output: Path = typer.Option(..., "-o", "--output", help="folder for analysis.json and the PNG plots"),
    rank_rule: str = typer.Option("knee", "--rank-rule", help="rank rule marked on the spectra"),
    spectra: bool = typer.Option(True, "--spectra/--no-spectra", help="compute singular spectra of 2-D task vectors"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle"),
):
    """Task-vector norms, cosines, sign conflicts and spectra of RECIPE's models, per layer."""
    from .analysis import analyze as run_analyze

    rule = int(rank_rule) if rank_rule.isdigit() else (float(rank_rule) if rank_rule.replace(".", "", 1).isdigit() else rank_rule)
    result = run_analyze(recipe, output, rank_rule=rule, spectra=spectra, allow_pickle=allow_pickle)
    table = Table(title=f"task vectors of {', '.join(result['models'])} (base {result['base']})")
    for col in ("component", "tensors", "norm per model", "mean pairwise cos", "sign conflict"):
        table.add_column(col)
    for comp, s in result["summary"].items():
        table.add_row(comp, str(s["tensors"]), ", ".join(f"{v:.3g}" for v in s["norm"]),
                      f"{s['mean_pairwise_cosine']:.3f}", f"{s['mean_sign_conflict']:.3f}")
    out.print(table)
    out.print(f"wrote {output / 'analysis.json'} and {len(result.get('plots', []))} plots in {result['seconds']:.1f} s")


@app.command()
def demo(
    workdir: Path = typer.Option(Path("omnimerge-demo"), "--workdir", help="where the tiny models and outputs go"),
):
    """Build tiny Qwen2-VL experts and a Qwen2 text model offline, merge them with every method, verify."""
    from .demo import run_demo

    run_demo(workdir, console=out)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        rc = app(args=argv, standalone_mode=False, prog_name="omnimerge")
    except OmnimergeError as e:
        err.print(f"[red]error[/]: {escape(str(e))}", highlight=False, soft_wrap=True)
        return OmnimergeError.exit_code
    except KeyboardInterrupt:
        err.print("interrupted; no output was left behind")
        return 130
    except Exception as e:
        # click's usage errors (typer ships its own copy of click, so match by shape, not class)
        show, code = getattr(e, "show", None), getattr(e, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            return code
        raise
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
