"""`omnimerge bench`: the runner, the summary, the report, the CLI. One real run of the micro preset
(the smallest pipeline: every stage, every registered method, both settings), a cached rerun with the
validation sweep that must reproduce it, and the report's arithmetic on hand-made results."""

from __future__ import annotations

import csv
import json
import math

import pytest

from omnimerge.bench.experiment import EXPERT_TASKS, SETTING_BASE, SETTING_MULTITASK, zoo_names
from omnimerge.bench.config import BenchConfig
from omnimerge.bench.report import backbone_rows, capability_rows, markdown, write_report
from omnimerge.bench.runner import SETTINGS, BenchResult, sweep_grid
from omnimerge.bench.stats import Bootstrap
from omnimerge.bench.summary import gain_recovered, question_breakdown, summarize
from omnimerge.bench import tasks as T
from omnimerge.cli import main
from omnimerge.methods import list_methods


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    rc = main(["bench", "--preset", "micro", "--no-sweep", "-o", str(root / "report"), "--cache-dir", str(root / "cache"),
               "--threads", "1"])
    assert rc == 0
    return root, json.loads((root / "report" / "results.json").read_text())


def test_micro_bench_reports_every_method_in_both_settings(micro_run):
    root, res = micro_run
    report = root / "report"
    for name in ("report.md", "results.csv", "results.json", "scores.json", "accuracy_heatmap.png", "methods.png",
                 "backbone.png"):
        assert (report / name).stat().st_size > 0, name
    assert not (report / "merged").exists()                      # merged checkpoints are cleaned up
    methods = [m.name for m in list_methods()]
    rows = [m for m in res["merges"] if m["kind"] == "capability"]
    assert sorted((m["setting"], m["method"]) for m in rows) == sorted((s, m) for s in SETTINGS for m in methods)
    scores = json.loads((report / "scores.json").read_text())
    for m in rows:
        if "skipped" in m:                                       # only with a reason
            assert m["skipped"]
            continue
        assert set(m["accuracy"]) == set(EXPERT_TASKS) and m["merge_s"] >= 0
        assert all(0.0 <= v <= 1.0 for v in m["accuracy"].values())
        # the accuracies are the per-item scores' means, every one with its interval
        bits = scores[f"capability/{m['setting']}/{m['method']}"]
        assert all(m["accuracy"][t] == pytest.approx(bits[t].count("1") / len(bits[t])) for t in EXPERT_TASKS)
        assert all(m["ci95"][t][0] <= m["accuracy"][t] <= m["ci95"][t][1] for t in EXPERT_TASKS)
        experts = {t: res["zoo"][f"{m['setting']}_{t}"][t] for t in EXPERT_TASKS}
        want = [m["accuracy"][t] / experts[t] for t in EXPERT_TASKS if experts[t] > 0]
        assert m["normalized"] == (pytest.approx(sum(want) / len(want)) if want else None) or math.isnan(m["normalized"])
        assert m["average"] == pytest.approx(sum(m["accuracy"].values()) / len(EXPERT_TASKS), abs=1e-4)
    backbone = {m["method"]: m for m in res["merges"] if m["kind"] == "backbone"}
    assert set(backbone) == {"asdf", "task_arithmetic"}
    assert all(set(m["accuracy"]) == {"vqa", "geometry", "chart", "ocr", "grounding", "arithmetic"}
               for m in backbone.values())
    # the zoo: every model evaluated (the text LLM on the text task only), with intervals
    assert set(res["zoo"]) == set(zoo_names(BenchConfig.micro()))
    assert set(res["zoo"]["text_llm"]) == {"arithmetic"}
    assert set(res["zoo_ci95"]) == set(res["zoo"])
    # the regime of each setting, and each expert against its rivals
    for s in SETTINGS:
        r = res["regime"][s]
        assert 0 < r["median_rel_norm"] <= r["max_rel_norm"] and r["rms_tau"] > 0
        assert set(r["cosine"]) == set(EXPERT_TASKS)
        assert set(res["experts"][s]["margins"]) == set(EXPERT_TASKS)
        assert [e["method"] for e in res["ranking"][s]] == [
            m["method"] for m in sorted((m for m in rows if m["setting"] == s and "skipped" not in m),
                                        key=lambda m: (-m["average"], m["method"]))]
    # the data-aware methods again at the other calibration sizes, with the same figures
    aware = sorted(m.name for m in list_methods() if m.needs_calibration)
    assert aware
    sizes = BenchConfig.micro().calibration_sizes
    extra = [m for m in res["merges"] if m["kind"] == "calibration"]
    assert sorted((m["setting"], m["method"], m["samples"]) for m in extra) == sorted(
        (s, m, n) for s in SETTINGS for m in aware for n in sizes)
    for m in extra:
        if "skipped" in m:
            continue
        bits = scores[f"calibration/{m['setting']}/{m['method']}/n{m['samples']}"]
        assert all(m["accuracy"][t] == pytest.approx(bits[t].count("1") / len(bits[t])) for t in EXPERT_TASKS)
        assert m["average"] == pytest.approx(sum(m["accuracy"].values()) / len(EXPERT_TASKS), abs=1e-4)
        assert "gain_recovered" in m and "average" in m["ci95"]
    n_main = BenchConfig.micro().calibration_items
    for s in SETTINGS:      # each calibration set holds that many validation questions of its task
        for n in (n_main, *sizes):
            for task in EXPERT_TASKS:
                path = root / "cache" / res["cache_key"] / "calibration" / f"n{n}" / task / "samples.jsonl"
                assert len(path.read_text().splitlines()) == n
    # the zoo is scored on expert_test_items; the merges, and the zoo rows beside them, on the first test_items
    cfg = BenchConfig.micro()
    assert cfg.expert_test_items > cfg.test_items
    for name, row in res["zoo"].items():
        for t, acc in row.items():
            bits = scores[f"zoo/{name}"][t]
            assert len(bits) == cfg.expert_test_items
            assert acc == pytest.approx(bits[:cfg.test_items].count("1") / cfg.test_items)
    for s in SETTINGS:
        for t, m in res["experts"][s]["margins"].items():
            assert m["expert"] == pytest.approx(scores[f"zoo/{s}_{t}"][t].count("1") / cfg.expert_test_items, abs=1e-4)
    md = (report / "report.md").read_text()
    assert "samples per expert" in md and f"| {aware[0]} | {sizes[0]} |" in md
    for method in methods:
        assert f"| {method} |" in md
    assert "skipped: method: 'slerp'" in md
    with open(report / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert {r["table"] for r in table} == {"capability", "backbone"}
    assert len([r for r in table if r["table"] == "capability"]) == len(SETTINGS) * (len(methods) + 8)


def test_cached_rerun_trains_nothing_reproduces_and_tunes_on_validation(micro_run, capsys):
    root, first = micro_run
    rc = main(["bench", "--preset", "micro", "--sweep", "-o", str(root / "report2"), "--cache-dir", str(root / "cache"),
               "--methods", "task_arithmetic,average", "--settings", "lora", "--threads", "1"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "reusing all" in err and "train " not in err                     # nothing retrained, and it says so
    assert "[stage " in err and "left" in err                               # progress with an estimate
    second = json.loads((root / "report2" / "results.json").read_text())
    assert {k: v for k, v in second["zoo"].items()} == {k: first["zoo"][k] for k in second["zoo"]}
    key = lambda m: (m["kind"], m["setting"], m["method"])        # noqa: E731
    before = {key(m): m["accuracy"] for m in first["merges"] if "accuracy" in m}
    for m in second["merges"]:
        assert m["accuracy"] == before[key(m)], key(m)            # same recipe, same seed: same answers
    ta = next(m for m in second["merges"] if m["method"] == "task_arithmetic")
    tuned = ta["tuned"]
    assert set(json.loads(k)["lambda"] for k in tuned["grid"]) == {1.0, 0.3, 0.6}
    assert tuned["validation_average"] == max(tuned["grid"].values())
    assert "accuracy" in tuned or tuned["note"]
    avg = next(m for m in second["merges"] if m["method"] == "average")
    assert avg["tuned"]["note"] == "no scale or density to tune"


def test_settings_in_parallel_give_the_serial_figures(micro_run, tmp_path, capsys):
    """--jobs 2 trains and merges each setting in its own process (from an empty cache) and reports what
    the serial run reports."""
    root, first = micro_run
    methods = "task_arithmetic,regmean"
    rc = main(["bench", "--preset", "micro", "--no-sweep", "--jobs", "2", "-o", str(tmp_path / "report"),
               "--cache-dir", str(tmp_path / "cache"), "--methods", methods, "--threads", "1"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "worker processes" in err and "assembling the report" in err
    for s in SETTINGS:
        assert (tmp_path / "report" / "workers" / f"{s}.log").stat().st_size > 0
    second = json.loads((tmp_path / "report" / "results.json").read_text())
    assert second["zoo"] == first["zoo"]
    t = second["timings"]
    assert 0 < t["settings_in_parallel_s"] <= t["total_s"]
    key = lambda m: (m["kind"], m["setting"], m["method"], m.get("samples"))        # noqa: E731
    before = {key(m): m.get("accuracy") for m in first["merges"]}
    assert {m["method"] for m in second["merges"] if m["kind"] == "capability"} == set(methods.split(","))
    for m in second["merges"]:
        assert m.get("accuracy") == before[key(m)], key(m)


def test_bench_refuses_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    rc = main(["bench", "--quick", "-o", str(tmp_path), "--cache-dir", str(tmp_path / "c")])
    assert rc == 2 and "--force" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me" and not (tmp_path / "c").exists()
    assert main(["bench", "--quick", "-o", str(tmp_path / "r"), "--methods", "nope"]) == 2
    assert main(["bench", "--quick", "-o", str(tmp_path / "r"), "--set", "no_such_field=1"]) == 2
    assert main(["bench", "--preset", "huge", "-o", str(tmp_path / "r")]) == 2


def test_sweep_grid_starts_at_the_defaults():
    assert sweep_grid("average") == [{}]
    assert sweep_grid("task_arithmetic") == [{"lambda": v} for v in (1.0, 0.3, 0.6)]
    assert sweep_grid("ties") == [{"lambda": v} for v in (1.0, 0.3, 0.6)]      # density: the default
    assert sweep_grid("iso_c") == [{"alpha": v} for v in (1.0, 0.3, 0.6)]


def test_bootstrap_is_paired_and_brackets_the_estimate():
    boot = Bootstrap(500, seed=1)
    a = [1] * 60 + [0] * 40
    lo, hi = boot.ci("vqa", a)
    assert lo < 0.6 < hi and 0.08 < hi - lo < 0.25                 # ~ ±1.96·sqrt(.24/100)
    assert boot.ci("vqa", a) == [lo, hi]                            # same draws every call
    same = boot.accuracy("vqa", a) - boot.accuracy("vqa", a)
    assert float(same.abs().max()) == 0.0                           # paired: a model against itself


def _fake_result():
    acc = lambda **kw: {t: kw.get(t, 0.0) for t in EXPERT_TASKS}   # noqa: E731
    n = 20

    def bits(a):
        return {t: "1" * round(v * n) + "0" * (n - round(v * n)) for t, v in a.items()}

    zoo = {"base": acc(vqa=0.2), "instruct": acc(vqa=0.4, ocr=0.2), "multitask": acc(vqa=0.8, ocr=0.6),
           "multitask_lora": acc(vqa=0.6, ocr=0.4), "text_llm": {"arithmetic": 0.9}}
    for s in SETTINGS:
        for t in EXPERT_TASKS:
            zoo[f"{s}_{t}"] = acc(**{t: 0.5})
    merges = [
        {"kind": "capability", "setting": "full", "method": "good", "merge_s": 1.0, "parameters": {},
         "accuracy": acc(vqa=0.5, geometry=0.25, chart=0.5, ocr=0.5, grounding=0.0),
         "tuned": {"parameters": {"lambda": 0.5}, "validation_average": 0.4,
                   "accuracy": acc(vqa=0.6, geometry=0.25, chart=0.5, ocr=0.5, grounding=0.0)}},
        {"kind": "capability", "setting": "full", "method": "pairwise", "skipped": "needs exactly two models"},
        {"kind": "capability", "setting": "lora", "method": "good", "merge_s": 1.0, "parameters": {},
         "accuracy": acc(vqa=0.5)},
        {"kind": "backbone", "setting": "text", "method": "asdf", "merge_s": 0.5,
         "accuracy": {**acc(vqa=0.5), "arithmetic": 0.7}},
    ]
    scores = {f"zoo/{k}": bits(v) for k, v in zoo.items()}
    scores["capability/full/good"] = bits(merges[0]["accuracy"])
    scores["capability/full/good/tuned"] = bits(merges[0]["tuned"]["accuracy"])
    scores["capability/lora/good"] = bits(merges[2]["accuracy"])
    scores["backbone/text/asdf"] = bits(merges[3]["accuracy"])
    result = BenchResult(config={"num_layers": 2, "hidden_size": 64, "test_items": n}, cache_key="k", zoo=zoo,
                         merges=merges, timings={"total_s": 1.0}, item_scores=scores,
                         regime={s: {"median_rel_norm": 0.01, "max_rel_norm": 0.02, "rms_tau": 1e-3,
                                     "cosine": {"a": {"b": 0.1}, "b": {"a": 0.1}}} for s in SETTINGS})
    summarize(result)
    return result.to_json()


def test_the_zoo_by_question_type(micro_run):
    root, res = micro_run
    scores = json.loads((root / "report" / "scores.json").read_text())
    cfg = res["config"]
    n_zoo = max(cfg["expert_test_items"], cfg["test_items"])
    byq = res["by_question"]
    assert set(byq) == set(EXPERT_TASKS)
    for task, types in byq.items():
        assert sum(q["items"] for q in types.values()) == n_zoo
        for name in res["zoo"]:
            if task not in res["zoo"][name]:
                continue
            # the types' accuracies, weighted by their item counts, give back the model's accuracy on the items
            bits = scores[f"zoo/{name}"][task]
            got = sum(q["models"][name] * q["items"] for q in types.values()) / n_zoo
            assert got == pytest.approx(bits.count("1") / len(bits), abs=1e-3)
        assert all(0.0 <= q["constant_accuracy"] <= 1.0 for q in types.values())
    assert "## The zoo by question type" in (root / "report" / "report.md").read_text()


def test_question_breakdown_by_hand():
    items = [T.Item("chart", "q", a, None, {"qtype": k}) for a, k in
             [("1", "value"), ("1", "value"), ("2", "value"), ("A", "argmax"), ("B", "argmax")]]
    out = question_breakdown({"m": {"chart": [1, 0, 1, 1, 1]}, "short": {"chart": [1, 1]}}, {"chart": items},
                             tasks=("chart",))
    value, argmax = out["chart"]["value"], out["chart"]["argmax"]
    assert value["items"] == 3 and value["constant"] == "1" and value["constant_accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert value["models"]["m"] == pytest.approx(2 / 3, abs=1e-4) and argmax["models"]["m"] == 1.0
    assert argmax["constant_accuracy"] == 0.5
    assert value["models"]["short"] == 1.0 and "short" not in argmax["models"]   # scored on the first two items only


def test_summary_and_report_from_hand_made_results(tmp_path):
    res = _fake_result()
    rows = {r["model"]: r for r in capability_rows(res, "full")}
    good = rows["good"]
    assert good["average"] == pytest.approx(0.35)
    # the full setting's base is the instruct model (avg 0.12), its multi-task model averages 0.28
    assert good["gain_recovered"] == pytest.approx((0.35 - 0.12) / (0.28 - 0.12))
    assert gain_recovered(0.35, 0.12, 0.28) == pytest.approx(good["gain_recovered"])
    assert good["normalized"] == pytest.approx((1 + 0.5 + 1 + 1 + 0) / 5)
    assert good["tuned"]["average"] == pytest.approx(0.37) and good["tuned"]["parameters"] == {"lambda": 0.5}
    merge = res["merges"][0]
    assert merge["gain_kept"]["vqa"] == pytest.approx((0.5 - 0.4) / (0.5 - 0.4))
    assert merge["gain_kept"]["ocr"] == pytest.approx((0.5 - 0.2) / (0.5 - 0.2))
    lo, hi = merge["ci95"]["gain_recovered"]
    assert lo <= merge["gain_recovered"] <= hi
    assert rows["experts, each on its own task"]["normalized"] == 1.0
    assert rows["pairwise"]["skipped"] == "needs exactly two models"
    lora = {r["model"]: r for r in capability_rows(res, "lora")}
    assert lora["good"]["gain_recovered"] == pytest.approx((0.1 - 0.04) / (0.2 - 0.04))   # against base, multitask_lora
    assert res["experts"]["full"]["margins"]["vqa"]["best_rival"] == SETTING_BASE["full"]
    assert res["experts"]["full"]["margins"]["vqa"]["margin"] == pytest.approx(0.1)
    assert res["setting_multitask"] == SETTING_MULTITASK
    bb = {r["model"]: r for r in backbone_rows(res)}
    assert bb["asdf"]["text"] == 0.7 and bb["asdf"]["vision_average"] == pytest.approx(0.1)
    assert bb["text LLM"]["text"] == 0.9 and math.isnan(bb["text LLM"]["vision_average"])
    md = markdown(res)
    assert "skipped: needs exactly two models" in md and "lambda 0.5" in md and "gain recovered" in md
    files = write_report(res, tmp_path)
    assert all(p.stat().st_size > 0 for p in files)
    assert json.loads((tmp_path / "results.json").read_text())["merges"][1]["skipped"]
    assert "item_scores" not in json.loads((tmp_path / "results.json").read_text())


def test_progress_reports_stage_elapsed_and_time_left():
    import io

    from omnimerge.bench.progress import NOMINAL, Progress, Stage, format_duration

    stream = io.StringIO()                                          # not a terminal: lines, not redraws
    stages = [Stage("train base", {"train_all": 100}, unit="steps", total=100),
              Stage("evaluate", {"eval": 1000}, unit="items", total=1000)]
    p = Progress(stages, stream=stream)
    assert p.nominal_total() == pytest.approx(100 * NOMINAL["train_all"] + 1000 * NOMINAL["eval"])
    p.begin(0)
    p.advance(50)
    line = p.status()
    assert line.startswith("[stage 1/2 train base 50/100 steps] elapsed ") and line.endswith(" left")
    full = p.nominal_total()
    assert p.remaining() == pytest.approx(full - 50 * NOMINAL["train_all"], rel=0.01)   # too little done to rescale
    p.end()
    p.skip(1)                                                       # a cached stage: nothing left
    assert p.remaining() == 0.0
    p.message("hello")
    out = stream.getvalue()
    assert "[stage 1/2 train base 0/100 steps]" in out and out.endswith("hello\n")
    assert format_duration(75) == "1 min 15 s" and format_duration(3725) == "1 h 02 min"


def test_calibration_size_reaches_the_recipe_and_the_merge_cache(tmp_path):
    """A data-aware merge at N samples asks the recipe for N (the recipe's own default is 32), and the
    merge cache keys each recipe whole, so two sizes never share a cached result."""
    from omnimerge.bench.runner import MergeCache, calibration_paths, capability_recipe

    recipes = {n: capability_recipe(tmp_path, "full", "regmean", {}, 0, calibration_paths(tmp_path, n), samples=n)
               for n in (8, 64)}
    assert {n: r["calibration"] for n, r in recipes.items()} == {8: {"samples": 8}, 64: {"samples": 64}}
    assert all(m["calibration"].endswith(f"n{n}/{m['name']}/samples.jsonl") for n, r in recipes.items() for m in r["models"])
    cache = MergeCache(tmp_path / "merges")
    cache.put("calibration_n8", "full", "regmean", "test", recipes[8], {"bits": {"vqa": "1"}})
    assert cache.get("calibration_n8", "full", "regmean", "test", recipes[8]) == {"bits": {"vqa": "1"}}
    assert cache.get("calibration_n8", "full", "regmean", "test", recipes[64]) is None
