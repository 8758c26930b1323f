"""The figures the report shows, from the per-item test scores of a run (:class:`BenchResult`).

- **gain recovered** (the headline): (merged average − base average) / (multi-task average − base
  average) over the five expert tasks, each setting against its own base and multi-task model;
- **gain kept** per task: (merged − base) / (expert − base) on that expert's task;
- **normalized accuracy** (secondary): mean over tasks of merged ÷ the expert's own-task accuracy;
- bootstrap 95 % intervals (:mod:`.stats`) on every accuracy, average and gain recovered;
- the **ranking** of methods by average (defaults), each marked against the next one down and
  against the best by a paired bootstrap of the difference of averages;
- the **experts' margins**: each expert on its own task against the base and every other expert,
  with the 95 % interval of the margin, on all the test items the zoo was scored on
  (``expert_test_items``; every other figure uses the merges' ``test_items``);
- the zoo **by question type** (:func:`question_breakdown`): each zoo model's accuracy on each kind of
  question of each expert task, beside the best constant answer on the same items, which shows a skill
  that no model has learned (an accuracy at the constant's level) where a task average would hide it.
"""

from __future__ import annotations

import math
from typing import Any

from . import tasks as T
from .experiment import EXPERT_TASKS, SETTING_BASE, SETTING_MULTITASK
from .stats import Bootstrap, interval, ratio

__all__ = ["summarize", "gain_recovered", "gain_kept", "normalized_accuracy", "question_breakdown"]


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def normalized_accuracy(acc: dict[str, float], experts: dict[str, float]) -> float:
    """Mean over the expert tasks of ``acc[task] / experts[task]`` (tasks whose expert scores 0 are
    left out: nothing to normalise by; NaN if every expert scores 0)."""
    return _mean(acc.get(t, float("nan")) / experts[t] for t in EXPERT_TASKS if experts[t] > 0)


def gain_recovered(merged_avg: float, base_avg: float, multitask_avg: float) -> float:
    """(merged − base) / (multi-task − base); NaN when the multi-task model gains nothing."""
    den = multitask_avg - base_avg
    return (merged_avg - base_avg) / den if den != 0 else float("nan")


def gain_kept(acc: dict[str, float], base: dict[str, float], experts: dict[str, float]) -> dict[str, float]:
    """Per task, the share of the expert's own gain over the base that ``acc`` keeps."""
    return {t: ((acc[t] - base[t]) / (experts[t] - base[t]) if experts[t] != base[t] else float("nan"))
            for t in EXPERT_TASKS if t in acc}


def question_breakdown(scores: dict[str, dict[str, list[int]]], sets: dict[str, list[T.Item]],
                       tasks=EXPERT_TASKS) -> dict[str, dict[str, dict[str, Any]]]:
    """task -> question type -> ``{items, constant, constant_accuracy, models: {name: accuracy}}``, from
    per-item ``scores`` (model -> task -> 0/1 per item of ``sets[task]``, in order; a model scored on fewer
    items than the set is compared on its first ones). ``constant`` is the best constant answer to that
    type's items (:func:`tasks.majority_baseline`) and ``constant_accuracy`` its accuracy: a model at that
    level has not learned the skill."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task in tasks:
        items = sets.get(task)
        if not items:
            continue
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(str(it.meta.get("qtype", task)), []).append(i)
        out[task] = {}
        for qtype in sorted(groups):
            idx = groups[qtype]
            answer, constant = T.majority_baseline([items[i] for i in idx])
            models = {}
            for name, row in scores.items():
                s = row.get(task)
                if s is None:
                    continue
                mine = [s[i] for i in idx if i < len(s)]
                if mine:
                    models[name] = _round(sum(mine) / len(mine))
            out[task][qtype] = {"items": len(idx), "constant": answer, "constant_accuracy": _round(constant),
                                "models": models}
    return out


def _bits_to_list(bits: str) -> list[int]:
    return [1 if c == "1" else 0 for c in bits]


def _round(v: float, digits: int = 4) -> float:
    return v if math.isnan(v) else round(v, digits)


def _ci(pair) -> list[float]:
    return [_round(pair[0]), _round(pair[1])]


def summarize(result, n_resamples: int = 1000, seed: int = 0) -> None:
    """Fill in ``result``'s derived figures (in place): ``zoo_ci95``, ``experts``, ``ranking`` and, on
    every capability row (and its ``tuned`` part) and every calibration-size row, ``average``, ``normalized``, ``gain_recovered``,
    ``gain_kept`` and ``ci95``; backbone rows get ``vision_average``, ``text`` and ``ci95``."""
    boot = Bootstrap(n_resamples, seed)
    # The zoo may be scored on more test items than the merges (``expert_test_items``): the experts'
    # margins use all of them; every comparison with a merge uses the first ``test_items``, the merges' own.
    n_cmp = result.config.get("test_items")
    full = {name: {t: _bits_to_list(b) for t, b in row.items()} for name, row in result.item_scores.items()}
    scores = {name: {t: (v[:n_cmp] if n_cmp and name.startswith("zoo/") else v) for t, v in row.items()}
              for name, row in full.items()}
    tasks_all = list(dict.fromkeys(t for row in scores.values() for t in row))

    def ci_row(name: str, tasks) -> dict[str, list[float]]:
        row = scores[name]
        out = {t: _ci(boot.ci(t, row[t])) for t in tasks if t in row}
        present = [t for t in EXPERT_TASKS if t in row]
        if present:
            out["average"] = _ci(interval(boot.average(row, present)))
        return out

    result.zoo_ci95 = {name[len("zoo/"):]: ci_row(name, tasks_all) for name in scores if name.startswith("zoo/")}

    for setting in result.settings:
        base_name, mt_name = SETTING_BASE[setting], SETTING_MULTITASK[setting]
        base, mt = result.zoo[base_name], result.zoo[mt_name]
        experts = {t: result.zoo[f"{setting}_{t}"][t] for t in EXPERT_TASKS}
        base_avg, mt_avg = _mean(base[t] for t in EXPERT_TASKS), _mean(mt[t] for t in EXPERT_TASKS)
        boot_base = boot.average(scores[f"zoo/{base_name}"], EXPERT_TASKS)
        boot_mt = boot.average(scores[f"zoo/{mt_name}"], EXPERT_TASKS)

        def figures(acc: dict[str, float], key: str) -> dict[str, Any]:
            avg = _mean(acc[t] for t in EXPERT_TASKS)
            boot_avg = boot.average(scores[key], EXPERT_TASKS)
            return {"average": _round(avg), "normalized": _round(normalized_accuracy(acc, experts)),
                    "gain_recovered": _round(gain_recovered(avg, base_avg, mt_avg)),
                    "gain_kept": {t: _round(v) for t, v in gain_kept(acc, base, experts).items()},
                    "ci95": {**ci_row(key, EXPERT_TASKS),
                             "gain_recovered": _ci(interval(ratio(boot_avg - boot_base, boot_mt - boot_base)))}}

        # the experts against the base and each other
        margins = {}
        for t in EXPERT_TASKS:
            own = full[f"zoo/{setting}_{t}"][t]
            rivals = {base_name: full[f"zoo/{base_name}"][t],
                      **{f"{setting}_{o}": full[f"zoo/{setting}_{o}"][t] for o in EXPERT_TASKS if o != t}}
            best_rival = max(rivals, key=lambda n: sum(rivals[n]))
            diff = boot.accuracy(t, own) - boot.accuracy(t, rivals[best_rival])
            acc_ci = boot.ci(t, own)
            margin = (sum(own) - sum(rivals[best_rival])) / len(own)
            margins[t] = {"expert": _round(sum(own) / len(own)), "ci95": _ci(acc_ci),
                          "base": _round(sum(rivals[base_name]) / len(own)),
                          "best_rival": best_rival, "best_rival_accuracy": _round(sum(rivals[best_rival]) / len(own)),
                          "margin": _round(margin), "margin_ci95": _ci(interval(diff)),
                          "ci_half_width": _round((acc_ci[1] - acc_ci[0]) / 2),
                          "beats_by_more_than_ci": bool(margin > (acc_ci[1] - acc_ci[0]) / 2)}
        result.experts[setting] = {"margins": margins,
                                   "base_average": _round(base_avg), "multitask_average": _round(mt_avg),
                                   "expert_averages": {t: _round(_mean(result.zoo[f"{setting}_{t}"][o] for o in EXPERT_TASKS))
                                                       for t in EXPERT_TASKS},
                                   "own_task_average": _round(_mean(experts.values()))}

        ranked = []
        for row in result.merges:
            if row["kind"] != "capability" or row["setting"] != setting or "skipped" in row:
                continue
            key = f"capability/{setting}/{row['method']}"
            row.update(figures(row["accuracy"], key))
            tuned = row.get("tuned") or {}
            if "accuracy" in tuned:
                tuned.update(figures(tuned["accuracy"], key + "/tuned"))
            ranked.append((row["average"], row["method"], boot.average(scores[key], EXPERT_TASKS)))
        for row in result.merges:
            if row["kind"] == "calibration" and row["setting"] == setting and "accuracy" in row:
                row.update(figures(row["accuracy"], f"calibration/{setting}/{row['method']}/n{row['samples']}"))
        ranked.sort(key=lambda r: (-r[0], r[1]))
        order = []
        for i, (avg, method, samples) in enumerate(ranked):
            entry = {"method": method, "average": avg}
            if i + 1 < len(ranked):
                lo, hi = interval(samples - ranked[i + 1][2])
                entry["vs_next"] = ">" if lo > 0 else "≈"
            if i > 0:
                lo, hi = interval(ranked[0][2] - samples)
                entry["below_best"] = bool(lo > 0)
            else:
                entry["below_best"] = False
            lo, _ = interval(samples - boot_base)
            entry["above_base"] = bool(lo > 0)
            _, hi = interval(samples - boot_mt)
            entry["below_multitask"] = bool(hi < 0)
            order.append(entry)
        result.ranking[setting] = order

    for row in result.merges:
        if row["kind"] == "backbone" and "accuracy" in row:
            acc = row["accuracy"]
            row["vision_average"] = _round(_mean(acc[t] for t in EXPERT_TASKS))
            row["text"] = _round(_mean(acc[t] for t in acc if t not in EXPERT_TASKS))
            row["ci95"] = ci_row(f"backbone/text/{row['method']}", list(acc))
