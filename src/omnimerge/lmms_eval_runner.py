"""Hand a merged checkpoint to lmms-eval (``omnimerge eval``), with the model type and arguments its
family needs.

lmms-eval is an optional dependency (``pip install 'omnimerge[eval]'``); it needs torchvision and, in
practice, a GPU. omnimerge only builds the command from the checkpoint's ``config.json`` and runs it
as a subprocess (``python -m lmms_eval ...``), so the merge tool never imports it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from .errors import OmnimergeError
from .families.table import MODEL_TYPES

__all__ = ["LMMS_MODELS", "PAPER_TASKS", "lmms_model_type", "lmms_eval_command", "run_lmms_eval"]

# config.json model_type -> lmms-eval's model name (lmms-eval 0.7.3's registry), from the family table
LMMS_MODELS = {t.name: t.lmms_eval for t in MODEL_TYPES.values() if t.lmms_eval}

# The paper's five capabilities as lmms-eval tasks (``--tasks paper``).
PAPER_TASKS = {
    "vqa": "gqa",
    "geometry": "geometry3k",
    "chart": "chartqa",
    "ocr": "ocrbench",
    "grounding": "refcoco_bbox_rec_val",
}


def lmms_model_type(model: str | Path) -> str:
    """lmms-eval's model name for the checkpoint folder ``model`` (from its config.json)."""
    config = Path(model) / "config.json"
    if not config.is_file():
        raise OmnimergeError(f"{model}: no config.json; give a merged checkpoint folder")
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type not in LMMS_MODELS:
        raise OmnimergeError(f"{config}: model_type {model_type!r} has no lmms-eval mapping; supported: "
                             f"{', '.join(sorted(LMMS_MODELS))}. Run lmms-eval yourself with --model_args pretrained={model}")
    return LMMS_MODELS[model_type]


def _task_list(tasks: str | list[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise OmnimergeError("no tasks given; e.g. --tasks chartqa,ocrbench or --tasks paper")
    out: list[str] = []
    for name in names:
        out += list(PAPER_TASKS.values()) if name == "paper" else [name]
    return list(dict.fromkeys(out))


def lmms_eval_command(model: str | Path, tasks: str | list[str], *, device: str = "cuda", batch_size: int = 1,
                      output: str | Path | None = None, limit: int | None = None,
                      model_args: dict[str, str] | None = None, python: str = sys.executable) -> list[str]:
    """The lmms-eval command line that evaluates the checkpoint ``model`` on ``tasks`` (a list or a
    comma-separated string; ``paper`` expands to :data:`PAPER_TASKS`)."""
    model = Path(model).absolute()
    kind = lmms_model_type(model)
    args = {"pretrained": str(model), "device": device, "device_map": "auto" if device == "cuda" else device}
    args.update(model_args or {})
    bad = [k for k, v in args.items() if "," in str(v) or "=" in str(v)]
    if bad:
        raise OmnimergeError(f"model argument(s) {', '.join(bad)} contain ',' or '=', which lmms-eval cannot parse")
    cmd = [python, "-m", "lmms_eval", "--model", kind,
           "--model_args", ",".join(f"{k}={v}" for k, v in args.items()),
           "--tasks", ",".join(_task_list(tasks)), "--batch_size", str(batch_size)]
    if output is not None:
        cmd += ["--output_path", str(output), "--log_samples"]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    return cmd


def run_lmms_eval(model: str | Path, tasks: str | list[str], **kw) -> int:
    """Run :func:`lmms_eval_command` and return its exit code; a clear error if lmms-eval is missing."""
    cmd = lmms_eval_command(model, tasks, **kw)
    if importlib.util.find_spec("lmms_eval") is None:
        raise OmnimergeError("lmms-eval is not installed: pip install 'omnimerge[eval]' (it needs torchvision and, "
                             "in practice, a GPU); or run the command `omnimerge eval --dry-run` prints elsewhere")
    return subprocess.call(cmd)
