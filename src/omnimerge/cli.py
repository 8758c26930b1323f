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
from .run.options import RunOptions

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Merge the weights of multimodal LLMs.")
out = Console()
err = Console(stderr=True)


def check_device(device: str) -> str:
    """``--device``: cpu, cuda or cuda:N, where torch can use it; a clear error for anything else."""
    import re

    m = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", device.strip())
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        raise OmnimergeError(f"--device {device!r} is not a device; use --device cpu, cuda or cuda:N (N = the GPU's "
                             "index)")
    if m.group(1) == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise OmnimergeError(f"--device {device}: no CUDA device is available to torch here; use --device cpu")
        count = torch.cuda.device_count()
        if m.group(2) is not None and int(m.group(2)) >= count:
            raise OmnimergeError(f"--device {device}: torch sees {count} CUDA device(s), numbered 0 to {count - 1}; "
                                 "use one of those, or --device cuda")
    return device.strip()


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


_AS_LORA_HELP = ("write the merged delta over the base as a PEFT LoRA adapter instead of full weights; the rank "
                 "per tensor by a rank rule: 16, 0.25 (of min(m, n)), knee, energy:0.9, ... (1.0 = full rank)")
_PUSH_HELP = "after writing, upload OUTPUT to this Hugging Face Hub repo (created if missing)"


def _wrote(result) -> None:
    plan, a = result.plan, result.adapter
    if a is not None:
        ranks = a["ranks"]
        out.print(f"wrote {result.out} (LoRA adapter: {a['lora_modules']} modules, rank {ranks['min']}–{ranks['max']}, "
                  f"{_gb(a['bytes'])}; relative error {a['relative_error']:.2%}) in {result.seconds:.1f} s")
    else:
        out.print(f"wrote {result.out} ({len(plan.jobs)} tensors, {_gb(plan.out_bytes)}) in {result.seconds:.1f} s")
    if result.url:
        out.print(f"uploaded to {result.url}")


@app.command()
def merge(
    recipe: Path = typer.Argument(..., help="recipe YAML file"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="output folder"),
    force: bool = typer.Option(False, "--force", help="replace an existing output folder"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate and print the plan; write nothing"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="read .bin/.pt pickles (weights_only=True)"),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="progress bar (default: on a terminal)"),
    as_lora: Optional[str] = typer.Option(None, "--as-lora", metavar="RANK", help=_AS_LORA_HELP),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", metavar="REPO", help=_PUSH_HELP),
    private: bool = typer.Option(False, "--private", help="with --push-to-hub: create the repo as private"),
    executor: str = typer.Option("local", "--executor", help="local, or ray: spread the shards over a Ray cluster "
                                 "(pip install 'omnimerge[ray]'; see docs/distributed.md)"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", metavar="ADDRESS",
                                              help="with --executor ray: the cluster (default: $RAY_ADDRESS, else a "
                                              "local one)"),
):
    """Merge the models of RECIPE into OUTPUT."""
    from .api import merge as run_merge

    device = check_device(device)
    if output is None and not dry_run:
        raise OmnimergeError("give an output folder with -o OUTPUT (or --dry-run to only check the recipe)")
    options = RunOptions(force=force, dry_run=dry_run, device=device, allow_pickle=allow_pickle, progress=progress,
                         as_lora=as_lora, push_to_hub=push_to_hub, private=private, executor=executor,
                         ray_address=ray_address)
    result = run_merge(recipe, output, options=options)
    results = result if isinstance(result, dict) else {None: result}  # `skeletons:`: one result per output
    for note in dict.fromkeys(n for r in results.values() for n in r.plan.notes):
        err.print(f"[yellow]note[/]: {escape(note)}")
    for label, result in results.items():
        plan = result.plan
        if dry_run:
            where = f"{label}/: " if label else ""
            table = Table(title=f"plan: {where}{plan.recipe.method} → {plan.skeleton.name} ({len(plan.jobs)} "
                                f"tensors, {_gb(plan.out_bytes)} in {len(plan.shards())} shard(s))")
            for col in ("component", "action", "from", "tensors", "size", "note"):
                table.add_column(col)
            for r in plan.summary():
                table.add_row(r["component"], r["action"], r["from"], str(r["tensors"]), _gb(r["bytes"]), r["note"])
            out.print(table)
        else:
            _wrote(result)


@app.command()
def extract(
    model: str = typer.Argument(..., help="the fine-tuned model (folder, LoRA adapter folder or cached hub id)"),
    base: str = typer.Option(..., "--base", help="the model it was fine-tuned from; the adapter applies to it"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="adapter folder to write"),
    rank: str = typer.Option("16", "--rank", metavar="RULE", help="rank rule: 16, 0.25, knee, energy:0.9, ... (1.0 = full)"),
    out_dtype: Optional[str] = typer.Option(None, "--out-dtype", help="dtype of the LoRA factors (default float32)"),
    force: bool = typer.Option(False, "--force", help="replace an existing output folder"),
    dry_run: bool = typer.Option(False, "--dry-run", help="check the inputs; write nothing"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="read .bin/.pt pickles (weights_only=True)"),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="progress bar (default: on a terminal)"),
    push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", metavar="REPO", help=_PUSH_HELP),
    private: bool = typer.Option(False, "--private", help="with --push-to-hub: create the repo as private"),
):
    """Write MODEL − BASE as a PEFT LoRA adapter over BASE."""
    from .api import extract as run_extract

    device = check_device(device)
    if output is None and not dry_run:
        raise OmnimergeError("give an output folder with -o OUTPUT (or --dry-run to only check the inputs)")
    options = RunOptions(force=force, dry_run=dry_run, device=device, allow_pickle=allow_pickle, progress=progress,
                         push_to_hub=push_to_hub, private=private)
    result = run_extract(model, base, output, rank=rank, out_dtype=out_dtype, options=options)
    for note in result.plan.notes:
        err.print(f"[yellow]note[/]: {escape(note)}")
    if dry_run:
        out.print(f"ok: {result.plan.models[0].path} − {result.plan.base.path}, {len(result.plan.jobs)} tensors")
    else:
        _wrote(result)


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
        out.print(f"{'[green]ok[/]  ' if c.ok else '[red]FAIL[/]'} {c.name}: {escape(c.detail)}", soft_wrap=True)
    if not res.ok:
        raise typer.Exit(1)


@app.command()
def methods(as_json: bool = typer.Option(False, "--json", help="print JSON")):
    """List the merging methods and their parameters."""
    from .methods import list_methods

    ms = list_methods()
    if as_json:
        print(json.dumps([{"name": m.name, "needs_base": m.needs_base, "summary": m.summary, "reference": m.reference,
                           "defaults_from": m.defaults_from, "needs_calibration": list(m.calibration), "parameters": [{"name": p.name, "type": p.type_name, "default": p.default,
                                           "range": p.range_text(), "per_model": p.per_model, "help": p.help}
                                          for p in m.params]} for m in ms], indent=2))
        return
    for m in ms:
        needs = [w for w, yes in (("needs base", m.needs_base), ("needs calibration", m.needs_calibration)) if yes]
        out.print(f"[bold]{m.name}[/]{' (' + ', '.join(needs) + ')' if needs else ''} — {m.summary}")
        out.print(f"  [dim]{escape(m.reference)}[/]")
        if m.defaults_from:
            out.print(f"  [dim]defaults: {escape(m.defaults_from)}[/]")
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


def _key_values(items: list[str], flag: str, example: str) -> dict[str, str]:
    """``KEY=VALUE`` options (``--set``, ``--model-arg``) as a dict; a clear error for anything else."""
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OmnimergeError(f"{flag} {item!r}: write KEY=VALUE, e.g. {flag} {example}")
        pairs[key.strip()] = value.strip()
    return pairs


def _bench_value(text: str):
    """A --set value: int, float, true/false, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@app.command()
def bench(
    output: Path = typer.Option(Path("omnimerge-bench"), "-o", "--output", help="folder for the report"),
    quick: bool = typer.Option(False, "--quick", help="a smoke run in minutes: smaller model, fewer steps and items"),
    preset: Optional[str] = typer.Option(None, "--preset", help="full (default), quick (= --quick) or micro (the tests' smallest run)"),
    methods: Optional[str] = typer.Option(None, "--methods", help="comma-separated methods (default: every registered one)"),
    settings: str = typer.Option("full,lora", "--settings", help="expert settings to merge: full, lora or both"),
    sweep: Optional[bool] = typer.Option(None, "--sweep/--no-sweep", help="also choose each method's scale on the validation split (default: on for the full preset, off for --quick)"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="trained-model cache (default ~/.cache/omnimerge/bench)"),
    set_: list[str] = typer.Option([], "--set", help="override a size/training field, e.g. --set test_items=1000"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (on a busy machine 1 is often faster)"),
    keep_merged: bool = typer.Option(False, "--keep-merged", help="keep the merged checkpoints under OUTPUT/merged"),
    force: bool = typer.Option(False, "--force", help="write into a non-empty folder that is not a bench report"),
    jobs: Optional[int] = typer.Option(None, "--jobs", help="run the two settings in this many processes (default: 2 for the full preset on 2+ cores, else 1)"),
):
    """The offline benchmark: train tiny Qwen2-VL experts (cached), merge them with every method, report."""
    import sys

    from .bench.runner import bench as run

    overrides = {k: _bench_value(v) for k, v in _key_values(set_, "--set", "test_items=1000").items()}
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    try:
        result, files = run(output, quick=quick, preset=preset, overrides=overrides, cache_dir=cache_dir,
                            methods=chosen, settings=tuple(s.strip() for s in settings.split(",") if s.strip()),
                            sweep=sweep, keep_merged=keep_merged, force=force, progress_stream=sys.stderr, jobs=jobs)
    finally:  # called in-process (tests, notebooks): leave torch as it was
        torch.set_num_threads(before)
    out.print((output / "report.md").read_text(), highlight=False, markup=False, soft_wrap=True)
    out.print(f"wrote {', '.join(p.name for p in files)} to {output} ({result.timings['total_s']:.0f} s)")


@app.command("eval")
def eval_(
    model: Path = typer.Argument(..., help="a merged checkpoint folder"),
    tasks: str = typer.Option(..., "--tasks", help="lmms-eval tasks, comma-separated; 'paper' = the paper's five"),
    device: str = typer.Option("cuda", "--device", help="cuda or cpu"),
    batch_size: int = typer.Option(1, "--batch-size"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="lmms-eval's output folder (with samples)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="items per task (a smoke run)"),
    model_arg: list[str] = typer.Option([], "--model-arg", help="extra lmms-eval model argument KEY=VALUE"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the lmms-eval command, run nothing"),
):
    """Evaluate a merged real checkpoint with lmms-eval (optional dependency), with its family's model type."""
    import shlex

    from .lmms_eval_runner import lmms_eval_command, run_lmms_eval

    extra = _key_values(model_arg, "--model-arg", "max_pixels=802816")
    kw = dict(device=device, batch_size=batch_size, output=output, limit=limit, model_args=extra)
    if dry_run:
        out.print(shlex.join(lmms_eval_command(model, tasks, **kw)), highlight=False, markup=False, soft_wrap=True)
        return 0
    return run_lmms_eval(model, tasks, **kw)


@app.command()
def demo(
    workdir: Path = typer.Option(Path("omnimerge-demo"), "--workdir", help="where the tiny models and outputs go"),
):
    """Build tiny Qwen2-VL experts and a Qwen2 text model offline, merge them with every method, verify."""
    from .demo import run_demo

    run_demo(workdir, console=out)


INTERRUPTED = "interrupted; no output was left behind"


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    interrupted = []

    def on_sigint(signum, frame):
        interrupted.append(signum)  # typer turns the KeyboardInterrupt into a silent exit code 130
        raise KeyboardInterrupt

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        rc = app(args=argv, standalone_mode=False, prog_name="omnimerge")
    except OmnimergeError as e:
        err.print(f"[red]error[/]: {escape(str(e))}", highlight=False, soft_wrap=True)
        return OmnimergeError.exit_code
    except KeyboardInterrupt:
        err.print(INTERRUPTED)
        return 130
    except Exception as e:
        # click's usage errors (typer ships its own copy of click, so match by shape, not class)
        show, code = getattr(e, "show", None), getattr(e, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            return code
        raise
    finally:
        if signal.getsignal(signal.SIGINT) is on_sigint:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted and rc == 130:
        err.print(INTERRUPTED)
        return 130
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
