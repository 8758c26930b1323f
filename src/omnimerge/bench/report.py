"""The benchmark's report: tables like the paper's (Markdown, CSV, JSON) and PNG plots.

Rows of the capability table (one per setting, full fine-tune and LoRA): the base, each expert, the
experts each on its own task (the "individual" reference), the multi-task model, then every method.
Columns: the five tasks, their average, and the normalized accuracy — the mean over tasks of
merged ÷ expert on that expert's own task (the paper's normalisation; 1.0 = every skill kept).
The backbone table puts the vision average beside the text accuracy.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from . import tasks as T
from .experiment import EXPERT_TASKS

__all__ = ["normalized_accuracy", "capability_rows", "backbone_rows", "markdown", "write_report"]


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def normalized_accuracy(acc: dict[str, float], experts: dict[str, float]) -> float:
    """Mean over the expert tasks of ``acc[task] / experts[task]`` (tasks whose expert scores 0 are
    left out: nothing to normalise by; NaN if every expert scores 0)."""
    return _mean(acc.get(t, float("nan")) / experts[t] for t in EXPERT_TASKS if experts[t] > 0)


def _row(name: str, acc: dict[str, float], experts: dict[str, float], **extra) -> dict[str, Any]:
    row = {"model": name, **{t: acc.get(t, float("nan")) for t in EXPERT_TASKS}}
    row["average"] = _mean(row[t] for t in EXPERT_TASKS)
    row["normalized"] = normalized_accuracy(acc, experts)
    row.update(extra)
    return row


def capability_rows(result: dict[str, Any], setting: str) -> list[dict[str, Any]]:
    """The capability table of ``setting`` as a list of rows (dicts)."""
    zoo = result["zoo"]
    experts = {t: zoo[f"{setting}_{t}"][t] for t in EXPERT_TASKS}
    rows = [_row("base", zoo["base"], experts, group="reference")]
    for t in EXPERT_TASKS:
        rows.append(_row(f"expert: {t}", zoo[f"{setting}_{t}"], experts, group="expert"))
    rows.append(_row("experts, each on its own task", experts, experts, group="reference"))
    rows.append(_row("multi-task (upper bound)", zoo["multitask"], experts, group="reference"))
    for m in result["merges"]:
        if m["kind"] != "capability" or m["setting"] != setting:
            continue
        if "skipped" in m:
            rows.append({"model": m["method"], "group": "method", "skipped": m["skipped"]})
        else:
            rows.append(_row(m["method"], m["accuracy"], experts, group="method", merge_s=m["merge_s"],
                             parameters=m.get("parameters", {})))
    return rows


def backbone_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The backbone table: vision average and text accuracy of the inputs and of each merge."""
    zoo = result["zoo"]

    def row(name, acc, **extra):
        return {"model": name, "vision_average": _mean(acc.get(t, float("nan")) for t in EXPERT_TASKS),
                "text": _mean(acc.get(t, float("nan")) for t in T.TEXT_TASKS), **extra}

    rows = [row("base VLM", zoo["base"]), row("multi-task VLM", zoo["multitask"]), row("text LLM", zoo["text_llm"])]
    for m in result["merges"]:
        if m["kind"] == "backbone":
            rows.append({"model": m["method"], "skipped": m["skipped"]} if "skipped" in m
                        else row(m["method"], m["accuracy"], merge_s=m["merge_s"]))
    return rows


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def _markdown_table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def _capability_markdown(rows: list[dict[str, Any]]) -> str:
    header = ["model", *EXPERT_TASKS, "average", "normalized", "merge s"]
    methods = [r for r in rows if r.get("group") == "method" and "skipped" not in r]
    best = {c: max((r[c] for r in methods if not math.isnan(r[c])), default=None)
            for c in (*EXPERT_TASKS, "average", "normalized")}
    lines = []
    for r in rows:
        if "skipped" in r:
            lines.append([r["model"], f"skipped: {r['skipped']}"] + [""] * (len(header) - 2))
            continue
        cells = [r["model"]]
        for c in (*EXPERT_TASKS, "average", "normalized"):
            text = _fmt(r[c])
            if r.get("group") == "method" and best[c] is not None and r[c] == best[c]:
                text = f"**{text}**"
            cells.append(text)
        cells.append(_fmt(r.get("merge_s"), 2) if "merge_s" in r else "")
        lines.append(cells)
    return _markdown_table(header, lines)


def markdown(result: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    cfg, timings = result["config"], result["timings"]
    parts = ["# omnimerge bench", "",
             f"Tiny Qwen2-VL ({cfg['num_layers']} layers, hidden {cfg['hidden_size']}), five experts "
             f"({', '.join(EXPERT_TASKS)}) fine-tuned from one base, {cfg['test_items']} test items per task, "
             f"greedy decoding, exact-match accuracy (grounding: IoU >= 0.5). Cache key `{result['cache_key']}`. "
             "Normalized = mean over tasks of accuracy ÷ the expert's accuracy on its own task. "
             "**Bold**: best method in the column.", ""]
    for setting in result["settings"]:
        if not any(m["setting"] == setting for m in result["merges"]):
            continue
        title = {"full": "full fine-tuning", "lora": "LoRA"}.get(setting, setting)
        parts += [f"## Capability merging: experts by {title}", "", _capability_markdown(capability_rows(result, setting)), ""]
    rows = backbone_rows(result)
    lines = [[r["model"], f"skipped: {r['skipped']}", "", ""] if "skipped" in r
             else [r["model"], _fmt(r["vision_average"]), _fmt(r["text"]), _fmt(r.get("merge_s"), 2) if "merge_s" in r else ""]
             for r in rows]
    parts += ["## Backbone merging: the text LLM into the multi-task VLM", "",
              _markdown_table(["model", "vision average", "text (arithmetic)", "merge s"], lines), ""]
    parts += ["## Time", "", _markdown_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()]), ""]
    return "\n".join(parts)


def _csv_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for setting in result["settings"]:
        if any(m["setting"] == setting for m in result["merges"]):
            for r in capability_rows(result, setting):
                out.append({"table": "capability", "setting": setting, **r})
    for r in backbone_rows(result):
        out.append({"table": "backbone", "setting": "text", **r})
    return out


def _plots(result: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> Path:
        fig.savefig(out / name, dpi=110, bbox_inches="tight")
        plt.close(fig)
        return out / name

    settings = [s for s in result["settings"] if any(m["setting"] == s for m in result["merges"])]
    if settings:
        fig, axes = plt.subplots(1, len(settings), figsize=(7.5 * len(settings), 0.42 * 20 + 1.5), squeeze=False,
                                 gridspec_kw={"wspace": 0.6})
        for ax, setting in zip(axes[0], settings):
            rows = [r for r in capability_rows(result, setting) if "skipped" not in r]
            data = [[r[t] for t in EXPERT_TASKS] + [r["average"]] for r in rows]
            im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(EXPERT_TASKS) + 1), [*EXPERT_TASKS, "average"], rotation=30, ha="right")
            ax.set_yticks(range(len(rows)), [r["model"] for r in rows], fontsize=8)
            for i, row in enumerate(data):
                for j, v in enumerate(row):
                    ax.text(j, i, _fmt(v, 2), ha="center", va="center", fontsize=7,
                            color="white" if v < 0.6 else "black")
            ax.set_title(f"accuracy, experts by {setting} fine-tuning")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.6)
        written.append(save(fig, "accuracy_heatmap.png"))

        fig, ax = plt.subplots(figsize=(10, 4))
        methods = [m["method"] for m in result["merges"] if m["kind"] == "capability" and m["setting"] == settings[0]]
        width = 0.8 / len(settings)
        for k, setting in enumerate(settings):
            by = {r["model"]: r["normalized"] for r in capability_rows(result, setting) if r.get("group") == "method"
                  and "skipped" not in r}
            ax.bar([i + k * width for i in range(len(methods))], [by.get(m, 0.0) for m in methods], width,
                   label=setting)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks([i + width * (len(settings) - 1) / 2 for i in range(len(methods))], methods, rotation=40, ha="right")
        ax.set_ylabel("normalized accuracy")
        ax.set_title("capability merging: accuracy ÷ expert accuracy, mean over five tasks")
        ax.legend()
        written.append(save(fig, "normalized_accuracy.png"))

    rows = [r for r in backbone_rows(result) if "skipped" not in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [0 if math.isnan(r["vision_average"]) else r["vision_average"] for r in rows], 0.4,
           label="vision average")
    ax.bar([x + 0.2 for x in xs], [0 if math.isnan(r["text"]) else r["text"] for r in rows], 0.4, label="text (arithmetic)")
    ax.set_xticks(list(xs), [r["model"] for r in rows], rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title("backbone merging: text LLM into the multi-task VLM")
    ax.legend()
    written.append(save(fig, "backbone.png"))
    return written


def write_report(result: dict[str, Any], out) -> list[Path]:
    """Write ``report.md``, ``results.csv``, ``results.json`` and the PNG plots into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1, sort_keys=True, default=float) + "\n")
    (out / "report.md").write_text(markdown(result) + "\n")
    rows = _csv_rows(result)
    fields = ["table", "setting", "model", *EXPERT_TASKS, "average", "normalized", "vision_average", "text",
              "merge_s", "skipped"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 4) if isinstance(v, float) and not math.isnan(v) else ("" if isinstance(v, float) else v))
                        for k, v in r.items()})
    return [out / "results.json", out / "report.md", out / "results.csv", *_plots(result, out)]
