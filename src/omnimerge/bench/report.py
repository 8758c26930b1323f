"""The benchmark's report: tables like the paper's (Markdown, CSV, JSON) and PNG plots.

Per setting (full fine-tunes, LoRA): the task vectors' size (the regime), the experts against the
base and each other, and the merge table — each method with its defaults and with the parameters the
validation sweep chose, sorted by average, with the headline **gain recovered**
((merged − base) / (multi-task − base), five-task averages), bootstrap 95 % intervals, a mark of
which differences are significant, and normalized accuracy as the secondary column. The backbone
table puts the vision average beside the text accuracy. Figures come from
:func:`omnimerge.bench.summary.summarize`.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from . import tasks as T
from .experiment import EXPERT_TASKS, SETTING_BASE, SETTING_MULTITASK
from .summary import gain_recovered, normalized_accuracy

__all__ = ["normalized_accuracy", "capability_rows", "backbone_rows", "markdown", "write_report"]

TITLES = {"full": "full fine-tunes from the instruct model", "lora": "LoRA experts on the pretrained base"}


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def _setting_refs(result, setting):
    return result.get("setting_base", {}).get(setting, SETTING_BASE[setting]), \
        result.get("setting_multitask", {}).get(setting, SETTING_MULTITASK[setting])


def _row(name: str, acc: dict[str, float], experts: dict[str, float], base_avg: float, mt_avg: float,
         ci: dict | None = None, **extra) -> dict[str, Any]:
    row = {"model": name, **{t: acc.get(t, float("nan")) for t in EXPERT_TASKS}}
    row["average"] = _mean(row[t] for t in EXPERT_TASKS)
    row["normalized"] = normalized_accuracy(acc, experts)
    row["gain_recovered"] = gain_recovered(row["average"], base_avg, mt_avg)
    if ci:
        row["ci95"] = ci
    row.update(extra)
    return row


def capability_rows(result: dict[str, Any], setting: str) -> list[dict[str, Any]]:
    """The capability table of ``setting`` as a list of rows (dicts): references (base, experts, the
    experts each on its own task, multi-task model), then the methods sorted by average (defaults),
    skipped methods last. A method row carries its ``tuned`` part when the sweep ran."""
    zoo, cis = result["zoo"], result.get("zoo_ci95", {})
    base_name, mt_name = _setting_refs(result, setting)
    experts = {t: zoo[f"{setting}_{t}"][t] for t in EXPERT_TASKS}
    base_avg = _mean(zoo[base_name][t] for t in EXPERT_TASKS)
    mt_avg = _mean(zoo[mt_name][t] for t in EXPERT_TASKS)

    def ref(label, name, group):
        return _row(label, zoo[name], experts, base_avg, mt_avg, cis.get(name), group=group)

    rows = [ref(f"base ({base_name})", base_name, "reference")]
    for t in EXPERT_TASKS:
        rows.append(ref(f"expert: {t}", f"{setting}_{t}", "expert"))
    rows.append(_row("experts, each on its own task", experts, experts, base_avg, mt_avg, group="reference"))
    rows.append(ref(f"multi-task ({mt_name})", mt_name, "reference"))
    methods, skipped = [], []
    for m in result["merges"]:
        if m["kind"] != "capability" or m["setting"] != setting:
            continue
        if "skipped" in m:
            skipped.append({"model": m["method"], "group": "method", "skipped": m["skipped"]})
            continue
        row = _row(m["method"], m["accuracy"], experts, base_avg, mt_avg, m.get("ci95"), group="method",
                   merge_s=m.get("merge_s"), parameters=m.get("parameters", {}))
        if m.get("gain_kept"):
            row["gain_kept"] = m["gain_kept"]
        tuned = m.get("tuned")
        if tuned is not None:
            t_acc = tuned.get("accuracy", m["accuracy"])
            t_ci = tuned.get("ci95", m.get("ci95"))
            row["tuned"] = _row(m["method"], t_acc, experts, base_avg, mt_avg, t_ci,
                                parameters=tuned.get("parameters", {}), note=tuned.get("note", ""),
                                validation_average=tuned.get("validation_average"))
        methods.append(row)
    methods.sort(key=lambda r: (-r["average"], r["model"]))
    marks = {r["method"]: r for r in result.get("ranking", {}).get(setting, [])}
    for i, r in enumerate(methods, 1):
        r["rank"] = i
        if r["model"] in marks:
            r["vs_next"] = marks[r["model"]].get("vs_next", "")
            r["below_best"] = marks[r["model"]].get("below_best", False)
    return rows + methods + skipped


def backbone_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The backbone table: vision average and text accuracy of the inputs and of each merge."""
    zoo = result["zoo"]

    def row(name, acc, **extra):
        return {"model": name, "vision_average": _mean(acc.get(t, float("nan")) for t in EXPERT_TASKS),
                "text": _mean(acc.get(t, float("nan")) for t in T.TEXT_TASKS), **extra}

    rows = [row("base VLM", zoo["base"])]
    if "multitask" in zoo:
        rows.append(row("multi-task VLM", zoo["multitask"]))
    rows.append(row("text LLM", zoo["text_llm"]))
    for m in result["merges"]:
        if m["kind"] == "backbone":
            rows.append({"model": m["method"], "skipped": m["skipped"]} if "skipped" in m
                        else row(m["method"], m["accuracy"], merge_s=m["merge_s"]))
    return rows


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def _fmt_ci(v, ci, digits=3) -> str:
    if ci is None or any(c is None or (isinstance(c, float) and math.isnan(c)) for c in ci):
        return _fmt(v, digits)
    return f"{_fmt(v, digits)} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _params(p: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in p.items()) if p else "defaults"


def _markdown_table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def _regime_markdown(result) -> str:
    lines = []
    for s in result["settings"]:
        r = result.get("regime", {}).get(s)
        if not r:
            continue
        cos = [c for a in r.get("cosine", {}).values() for c in a.values()]
        lines.append([s, f"{r['median_rel_norm']:.4f}", f"{r['max_rel_norm']:.4f}", f"{r['rms_tau']:.2e}",
                      f"{_mean(cos):.3f}" if cos else "–", f"{min(cos):.3f} – {max(cos):.3f}" if cos else "–"])
    return _markdown_table(["setting", "median ‖τ‖/‖θ_base‖", "max ‖τ‖/‖θ_base‖", "rms(τ)", "mean cosine",
                            "cosine range"], lines)


def _by_question_markdown(result) -> str:
    """The zoo by question type: each setting's base, its expert on the row's task and its multi-task
    model, beside the best constant answer to the same items."""
    byq = result.get("by_question") or {}
    cols: list[tuple[str, str]] = []   # (column title, model name, or "<setting>_": its expert on the row's task)
    for s in result["settings"]:
        base_name, mt_name = _setting_refs(result, s)
        cols += [(base_name, base_name), (f"{s} expert", f"{s}_"), (mt_name, mt_name)]
    lines = []
    for task, types in byq.items():
        for qtype, q in types.items():
            cells = []
            for _, name in cols:
                name = f"{name}{task}" if name.endswith("_") else name
                cells.append(_fmt(q["models"][name]) if name in q["models"] else "–")
            lines.append([task, qtype, str(q["items"]), f"{_fmt(q['constant_accuracy'])} ({q['constant']})", *cells])
    return _markdown_table(["task", "question", "items", "best constant answer", *(c for c, _ in cols)], lines)


def _experts_markdown(result, setting) -> str:
    e = result.get("experts", {}).get(setting)
    if not e:
        return ""
    lines = []
    for t, m in e["margins"].items():
        lines.append([t, _fmt_ci(m["expert"], m["ci95"]), _fmt(m["base"]),
                      f"{m['best_rival']} {_fmt(m['best_rival_accuracy'])}",
                      _fmt_ci(m["margin"], m["margin_ci95"]), f"±{m['ci_half_width']:.3f}",
                      "yes" if m["beats_by_more_than_ci"] else "**no**"])
    return _markdown_table(["task", "expert [95% CI]", "base", "best rival", "margin [95% CI]",
                            "CI half-width", "margin > CI"], lines)


def _capability_markdown(result, setting) -> str:
    rows = capability_rows(result, setting)
    refs = [r for r in rows if r.get("group") != "method"]
    lines = [[r["model"], *(_fmt(r[t]) for t in EXPERT_TASKS), _fmt_ci(r["average"], (r.get("ci95") or {}).get("average")),
              _fmt(r["gain_recovered"], 2), _fmt(r["normalized"])] for r in refs]
    ref_table = _markdown_table(["model", *EXPERT_TASKS, "average [95% CI]", "gain recovered", "normalized"], lines)
    header = ["#", "method", "sig.", *EXPERT_TASKS, "average [95% CI]", "**gain recovered** [95% CI]", "normalized",
              "tuned on validation", "tuned average [95% CI]", "tuned gain recovered"]
    lines = []
    for r in rows:
        if r.get("group") != "method":
            continue
        if "skipped" in r:
            lines.append(["–", r["model"], "", f"skipped: {r['skipped']}"] + [""] * (len(header) - 4))
            continue
        ci = r.get("ci95") or {}
        tuned = r.get("tuned")
        if tuned is None:
            tuned_cells = ["(not swept)", "", ""]
        elif not tuned.get("parameters"):
            tuned_cells = [tuned.get("note") or "defaults", "", ""]
        else:
            tci = tuned.get("ci95") or {}
            tuned_cells = [_params(tuned["parameters"]), _fmt_ci(tuned["average"], tci.get("average")),
                           _fmt_ci(tuned["gain_recovered"], tci.get("gain_recovered"), 2)]
        lines.append([str(r["rank"]), r["model"], r.get("vs_next", ""), *(_fmt(r[t]) for t in EXPERT_TASKS),
                      _fmt_ci(r["average"], ci.get("average")), _fmt_ci(r["gain_recovered"], ci.get("gain_recovered"), 2),
                      _fmt(r["normalized"]), *tuned_cells])
    return ref_table + "\n\n" + _markdown_table(header, lines)


def calibration_rows(result: dict[str, Any], setting: str) -> list[dict[str, Any]]:
    """Each data-aware method at every calibration size of the run (the main rows' size included),
    ordered by method and size: ``{method, samples, average, gain_recovered, ci95}`` or ``skipped``."""
    main_n = result["config"].get("calibration_items")
    rows = [{**m, "samples": main_n} for m in result["merges"]
            if m["kind"] == "capability" and m["setting"] == setting and m["method"] in _data_aware(result)]
    rows += [m for m in result["merges"] if m["kind"] == "calibration" and m["setting"] == setting]
    return sorted(rows, key=lambda r: (r["method"], r["samples"]))


def _data_aware(result) -> set[str]:
    return {m["method"] for m in result["merges"] if m["kind"] == "calibration"}


def _calibration_markdown(result, setting) -> str:
    lines = []
    for r in calibration_rows(result, setting):
        if "skipped" in r:
            lines.append([r["method"], str(r["samples"]), f"skipped: {r['skipped']}", ""])
            continue
        ci = r.get("ci95") or {}
        lines.append([r["method"], str(r["samples"]), _fmt_ci(r.get("average"), ci.get("average")),
                      _fmt_ci(r.get("gain_recovered"), ci.get("gain_recovered"), 2)])
    return _markdown_table(["method", "samples per expert", "average [95% CI]", "gain recovered [95% CI]"], lines)


def _gain_kept_markdown(result, setting) -> str:
    rows = [r for r in capability_rows(result, setting) if r.get("group") == "method" and "gain_kept" in r]
    lines = [[r["model"], *(_fmt(r["gain_kept"].get(t), 2) for t in EXPERT_TASKS)] for r in rows]
    return _markdown_table(["method", *EXPERT_TASKS], lines)


def markdown(result: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    cfg, timings = result["config"], result["timings"]
    parts = ["# omnimerge bench", "",
             f"Tiny Qwen2-VL ({cfg['num_layers']} layers, hidden {cfg['hidden_size']}), five experts "
             f"({', '.join(EXPERT_TASKS)}) per setting, {cfg['test_items']} test items per task, greedy decoding, "
             f"exact-match accuracy (grounding: IoU >= 0.5). Cache key `{result['cache_key']}`.", "",
             "**Gain recovered** = (merged average − base average) / (multi-task average − base average) over the "
             "five tasks, each setting against its own base and multi-task model (1.0: as good as multi-task "
             "training; the paper's WUDI v2 reaches 0.945 on InternVL2.5). Normalized = mean over tasks of "
             "accuracy ÷ the expert's own-task accuracy. Intervals: paired bootstrap over test items, 95 %. "
             "**sig.**: `>` the method's average is significantly above the next one's, `≈` not.", ""]
    if result.get("regime"):
        parts += ["## The task vectors (the regime)", "",
                  "Per language-backbone matrix, ‖τ‖_F / ‖θ_base‖_F (LoRA: B·A·α/r); rms(τ) per element, the "
                  "largest expert's; cosine: between the experts' flattened task vectors.", "",
                  _regime_markdown(result), ""]
    if result.get("by_question"):
        n_zoo = max(cfg.get("expert_test_items") or 0, cfg["test_items"])
        parts += ["## The zoo by question type", "",
                  f"Accuracy on each kind of question ({n_zoo} test items per task), beside the best constant "
                  "answer to the same items: a model near that level has not learned the skill, whatever "
                  "its task average says.", "", _by_question_markdown(result), ""]
    for setting in result["settings"]:
        if not any(m["setting"] == setting for m in result["merges"]):
            continue
        title = TITLES.get(setting, setting)
        parts += [f"## Capability merging: {title}", ""]
        if result.get("experts", {}).get(setting):
            n_zoo = max(cfg.get("expert_test_items") or 0, cfg["test_items"])
            parts += [f"Each expert on its own task against the base and the best other expert, on {n_zoo} test "
                      "items per task (margin: expert − best rival, paired bootstrap interval):", "",
                      _experts_markdown(result, setting), ""]
        parts += [_capability_markdown(result, setting), ""]
        if any(m["kind"] == "calibration" and m["setting"] == setting for m in result["merges"]):
            parts += ["Data-aware methods by the number of unlabeled calibration samples per expert (defaults; "
                      f"the table above uses {result['config'].get('calibration_items')}):", "",
                      _calibration_markdown(result, setting), ""]
        kept = _gain_kept_markdown(result, setting)
        if kept.count("\n") > 1:
            parts += ["Share of each expert's own gain over the base that the merge keeps (defaults):", "", kept, ""]
    rows = backbone_rows(result)
    if any(m["kind"] == "backbone" for m in result["merges"]):
        lines = [[r["model"], f"skipped: {r['skipped']}", "", ""] if "skipped" in r
                 else [r["model"], _fmt(r["vision_average"]), _fmt(r["text"]),
                       _fmt(r.get("merge_s"), 2) if "merge_s" in r else ""]
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
                flat = {"table": "capability", "setting": setting, **r}
                ci = r.get("ci95") or {}
                flat["average_ci_low"], flat["average_ci_high"] = (ci.get("average") or [None, None])
                tuned = r.get("tuned") or {}
                if tuned.get("parameters"):
                    flat["tuned_parameters"] = json.dumps(tuned["parameters"], sort_keys=True)
                    flat["tuned_average"] = tuned["average"]
                    flat["tuned_gain_recovered"] = tuned["gain_recovered"]
                out.append(flat)
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
        # the accuracy heat map
        fig, axes = plt.subplots(1, len(settings), figsize=(7.5 * len(settings), 10), squeeze=False,
                                 gridspec_kw={"wspace": 0.7})
        im = None
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
            ax.set_xlabel("task")
            ax.set_ylabel("model (references, then methods by average)")
            ax.set_title(f"test accuracy: {TITLES.get(setting, setting)}", fontsize=10)
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.6, label="accuracy")
        written.append(save(fig, "accuracy_heatmap.png"))

        # the methods, sorted, with intervals and references
        fig, axes = plt.subplots(1, len(settings), figsize=(7 * len(settings), 7.5), squeeze=False,
                                 gridspec_kw={"wspace": 0.45})
        for ax, setting in zip(axes[0], settings):
            rows = capability_rows(result, setting)
            methods = [r for r in rows if r.get("group") == "method" and "skipped" not in r]
            skipped = [r for r in rows if "skipped" in r]
            methods = sorted(methods, key=lambda r: r["average"])          # best at the top
            ys = list(range(len(skipped), len(skipped) + len(methods)))
            avg = [r["average"] for r in methods]
            ci = [(r.get("ci95") or {}).get("average") or [r["average"], r["average"]] for r in methods]
            err = [[a - c[0] for a, c in zip(avg, ci)], [c[1] - a for a, c in zip(avg, ci)]]
            ax.barh(ys, avg, xerr=err, color="#4c72b0", alpha=0.85, capsize=2, label="defaults")
            tuned = [(y, r["tuned"]) for y, r in zip(ys, methods) if r.get("tuned") and r["tuned"].get("parameters")]
            if tuned:
                t_avg = [t["average"] for _, t in tuned]
                t_ci = [(t.get("ci95") or {}).get("average") or [t["average"]] * 2 for _, t in tuned]
                ax.errorbar(t_avg, [y for y, _ in tuned], xerr=[[a - c[0] for a, c in zip(t_avg, t_ci)],
                                                                 [c[1] - a for a, c in zip(t_avg, t_ci)]],
                            fmt="D", color="#dd8452", ms=4, capsize=2, label="tuned on validation")
            for y, r in zip(range(len(skipped)), skipped):
                ax.text(0.01, y, f"skipped: {r['skipped'][:60]}", va="center", fontsize=7, color="grey",
                        transform=ax.get_yaxis_transform())
            labels = [r["model"] for r in skipped] + [r["model"] for r in methods]
            ax.set_yticks(range(len(labels)), labels, fontsize=8)
            refs = {r["model"]: r for r in rows if r.get("group") == "reference"}
            base_name, mt_name = _setting_refs(result, setting)
            lines = [(refs[f"base ({base_name})"]["average"], "base", "black", ":"),
                     (refs[f"multi-task ({mt_name})"]["average"], "multi-task", "#55a868", "--")]
            by = {r["model"]: r for r in methods}
            if "average" in by:
                lines.append((by["average"]["average"], "weight averaging", "#c44e52", "-."))
            best_expert = max(_mean(result["zoo"][f"{setting}_{t}"][o] for o in EXPERT_TASKS) for t in EXPERT_TASKS)
            lines.append((best_expert, "best single expert", "#8172b2", (0, (1, 3))))
            for x, label, colour, style in lines:
                ax.axvline(x, color=colour, ls=style, lw=1.2, label=f"{label} ({x:.3f})")
            lo = min([a for a in avg] + [x for x, *_ in lines]) - 0.05
            hi = max([c[1] for c in ci] + [x for x, *_ in lines]) + 0.03
            ax.set_xlim(max(0.0, lo), min(1.0, hi))
            ax.set_xlabel("average test accuracy over the five tasks (95% CI)")
            ax.set_ylabel("merging method (sorted by score)")
            ax.set_title(TITLES.get(setting, setting), fontsize=10)
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=2)
        written.append(save(fig, "methods.png"))

    rows = [r for r in backbone_rows(result) if "skipped" not in r]
    if any(m["kind"] == "backbone" for m in result["merges"]):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [0 if math.isnan(r["vision_average"]) else r["vision_average"] for r in rows],
               0.4, label="vision average")
        ax.bar([x + 0.2 for x in xs], [0 if math.isnan(r["text"]) else r["text"] for r in rows], 0.4,
               label="text (arithmetic)")
        for x, r in zip(xs, rows):
            for dx, v in ((-0.2, r["vision_average"]), (0.2, r["text"])):
                if math.isnan(v):
                    ax.text(x + dx, 0.02, "not\nscored", ha="center", fontsize=6, color="grey")
        ax.set_xticks(list(xs), [r["model"] for r in rows], rotation=20, ha="right")
        ax.set_ylim(0, 1)
        ax.set_xlabel("model")
        ax.set_ylabel("test accuracy")
        ax.set_title("backbone merging: text LLM into the multi-task VLM")
        ax.legend()
        written.append(save(fig, "backbone.png"))
    return written


def write_report(result: dict[str, Any], out) -> list[Path]:
    """Write ``report.md``, ``results.csv``, ``results.json``, ``scores.json`` (per-item test scores)
    and the PNG plots into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(result)
    scores = result.pop("item_scores", None)
    (out / "results.json").write_text(json.dumps(result, indent=1, sort_keys=True, default=float) + "\n")
    written = [out / "results.json"]
    if scores:
        (out / "scores.json").write_text(json.dumps(scores, sort_keys=True) + "\n")
        written.append(out / "scores.json")
    (out / "report.md").write_text(markdown(result) + "\n")
    rows = _csv_rows(result)
    fields = ["table", "setting", "rank", "model", *EXPERT_TASKS, "average", "average_ci_low", "average_ci_high",
              "gain_recovered", "normalized", "tuned_parameters", "tuned_average", "tuned_gain_recovered",
              "vision_average", "text", "merge_s", "skipped"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(v, 4) if isinstance(v, float) and not math.isnan(v) else ("" if isinstance(v, float) else v))
                        for k, v in r.items()})
    return written + [out / "report.md", out / "results.csv", *_plots(result, out)]
