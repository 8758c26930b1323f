"""`omnimerge bench`: the runner, the report, the CLI. One real `--quick` run (CI's exercise of the
benchmark), a cached rerun that must reproduce it, and the report's arithmetic on hand-made results."""

from __future__ import annotations

import csv
import json
import math

import pytest

from omnimerge.bench.experiment import EXPERT_TASKS, zoo_names
from omnimerge.bench.report import backbone_rows, capability_rows, markdown, write_report
from omnimerge.bench.runner import SETTINGS, sweep_grid
from omnimerge.cli import main
from omnimerge.methods import list_methods


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    rc = main(["bench", "--quick", "-o", str(root / "report"), "--cache-dir", str(root / "cache"), "--threads", "2"])
    assert rc == 0
    return root, json.loads((root / "report" / "results.json").read_text())


def test_quick_bench_reports_every_method_in_both_settings(quick_run):
    root, res = quick_run
    report = root / "report"
    for name in ("report.md", "results.csv", "results.json", "accuracy_heatmap.png", "normalized_accuracy.png",
                 "backbone.png"):
        assert (report / name).stat().st_size > 0, name
    assert not (report / "merged").exists()                      # merged checkpoints are cleaned up
    methods = [m.name for m in list_methods()]
    rows = [m for m in res["merges"] if m["kind"] == "capability"]
    assert sorted((m["setting"], m["method"]) for m in rows) == sorted((s, m) for s in SETTINGS for m in methods)
    for m in rows:
        if "skipped" in m:                                       # only with a reason
            assert m["skipped"]
            continue
        assert set(m["accuracy"]) == set(EXPERT_TASKS) and m["merge_s"] >= 0
        assert all(0.0 <= v <= 1.0 for v in m["accuracy"].values())
        experts = {t: res["zoo"][f"{m['setting']}_{t}"][t] for t in EXPERT_TASKS}
        want = [m["accuracy"][t] / experts[t] for t in EXPERT_TASKS if experts[t] > 0]
        assert m["normalized"] == pytest.approx(sum(want) / len(want))
        assert m["average"] == pytest.approx(sum(m["accuracy"].values()) / len(EXPERT_TASKS))
    backbone = {m["method"]: m for m in res["merges"] if m["kind"] == "backbone"}
    assert set(backbone) == {"asdf", "task_arithmetic"}
    assert all(set(m["accuracy"]) == {"vqa", "geometry", "chart", "ocr", "grounding", "arithmetic"}
               for m in backbone.values())
    # the zoo: every model evaluated; the text LLM on the text task only
    assert set(res["zoo"]) == set(zoo_names())
    assert set(res["zoo"]["text_llm"]) == {"arithmetic"}
    md = (report / "report.md").read_text()
    for method in methods:
        assert f"| {method} |" in md
    with open(report / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert {r["table"] for r in table} == {"capability", "backbone"}
    assert len([r for r in table if r["table"] == "capability"]) == len(SETTINGS) * (len(methods) + 8)


def test_cached_rerun_trains_nothing_and_reproduces_the_numbers(quick_run, capsys):
    root, first = quick_run
    rc = main(["bench", "--quick", "-o", str(root / "report2"), "--cache-dir", str(root / "cache"),
               "--methods", "ties,iso_c", "--settings", "lora", "--threads", "2"])
    assert rc == 0
    second = json.loads((root / "report2" / "results.json").read_text())
    assert "train " not in capsys.readouterr().err               # nothing retrained
    assert second["zoo"] == first["zoo"]
    key = lambda m: (m["kind"], m["setting"], m["method"])        # noqa: E731
    before = {key(m): m["accuracy"] for m in first["merges"] if "accuracy" in m}
    for m in second["merges"]:
        assert m["accuracy"] == before[key(m)], key(m)            # same recipe, same seed: same answers


def test_bench_refuses_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    rc = main(["bench", "--quick", "-o", str(tmp_path), "--cache-dir", str(tmp_path / "c")])
    assert rc == 2 and "--force" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me" and not (tmp_path / "c").exists()
    assert main(["bench", "--quick", "-o", str(tmp_path / "r"), "--methods", "nope"]) == 2
    assert main(["bench", "--quick", "-o", str(tmp_path / "r"), "--set", "no_such_field=1"]) == 2


def test_sweep_grid():
    assert sweep_grid("average") == [{}]
    assert sweep_grid("task_arithmetic") == [{"lambda": v} for v in (0.2, 0.4, 0.7, 1.0, 1.5)]
    ties = sweep_grid("ties")
    assert len(ties) == 15 and {"lambda": 1.0, "density": 0.2} in ties
    assert sweep_grid("iso_c") == [{"alpha": v} for v in (0.2, 0.4, 0.7, 1.0, 1.5)]


def _fake_result():
    acc = lambda **kw: {t: kw.get(t, 0.0) for t in EXPERT_TASKS}   # noqa: E731
    zoo = {"base": acc(vqa=0.2), "multitask": {**acc(vqa=0.8, ocr=0.6), "arithmetic": 0.1},
           "text_llm": {"arithmetic": 0.9}}
    for s in SETTINGS:
        for t in EXPERT_TASKS:
            zoo[f"{s}_{t}"] = acc(**{t: 0.5})
    zoo["base"]["arithmetic"] = 0.05
    merges = [
        {"kind": "capability", "setting": "full", "method": "good", "merge_s": 1.0, "parameters": {},
         "accuracy": acc(vqa=0.5, geometry=0.25, chart=0.5, ocr=0.5, grounding=0.0)},
        {"kind": "capability", "setting": "full", "method": "pairwise", "skipped": "needs exactly two models"},
        {"kind": "backbone", "setting": "text", "method": "asdf", "merge_s": 0.5,
         "accuracy": {**acc(vqa=0.5), "arithmetic": 0.7}},
    ]
    return {"config": {"num_layers": 2, "hidden_size": 64, "test_items": 10}, "cache_key": "k", "zoo": zoo,
            "merges": merges, "timings": {"total_s": 1.0}, "settings": list(SETTINGS)}


def test_report_tables_from_hand_made_results(tmp_path):
    res = _fake_result()
    rows = {r["model"]: r for r in capability_rows(res, "full")}
    assert rows["good"]["average"] == pytest.approx(0.35)
    assert rows["good"]["normalized"] == pytest.approx((1 + 0.5 + 1 + 1 + 0) / 5)
    assert rows["experts, each on its own task"]["normalized"] == 1.0
    assert rows["base"]["normalized"] == pytest.approx(0.2 / 0.5 / 5)
    assert rows["pairwise"]["skipped"] == "needs exactly two models"
    bb = {r["model"]: r for r in backbone_rows(res)}
    assert bb["asdf"]["text"] == 0.7 and bb["asdf"]["vision_average"] == pytest.approx(0.1)
    assert bb["text LLM"]["text"] == 0.9 and math.isnan(bb["text LLM"]["vision_average"])
    md = markdown(res)
    assert "| good | **0.500** | **0.250** |" in md and "skipped: needs exactly two models" in md
    files = write_report(res, tmp_path)
    assert all(p.stat().st_size > 0 for p in files)
    assert json.loads((tmp_path / "results.json").read_text())["merges"][1]["skipped"]
