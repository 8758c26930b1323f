"""The benchmark's synthetic tasks: determinism, disjoint splits, answer formats, scoring,
answers checked against the scene specs and the pixels, non-degenerate answer distributions."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from omnimerge.bench import (
    CAPTION_TASK, COLOURS, OCR_ALPHABET, SHAPES, TASKS, TEXT_TASKS, VISION_TASKS, Item,
    chance_accuracy, generate, generic_caption, majority_baseline, sample_sheet, score,
)
from omnimerge.bench.tasks import CHART_LABELS, CHART_MAX, CORNERS, chart_geometry, grid_box

N_TEST = 300


@pytest.fixture(scope="module")
def test_items() -> dict[str, list[Item]]:
    return {t: generate(t, "test", N_TEST) for t in TASKS}


def _fingerprint(it: Item):
    return (it.question, it.answer, None if it.image is None else it.image.tobytes())


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def _mask(img: Image.Image, rgb) -> np.ndarray:
    return np.all(_pixels(img) == np.array(rgb, dtype=np.int16), axis=-1)


# ---------------------------------------------------------------- determinism and splits

@pytest.mark.parametrize("task", TASKS + (CAPTION_TASK,))
def test_deterministic_by_seed(task):
    a = generate(task, "train", 12, seed=3)
    b = generate(task, "train", 12, seed=3)
    c = generate(task, "train", 12, seed=4)
    assert [_fingerprint(x) for x in a] == [_fingerprint(x) for x in b]
    assert [x.meta for x in a] == [x.meta for x in b]
    assert [_fingerprint(x) for x in a] != [_fingerprint(x) for x in c]


@pytest.mark.parametrize("task", TASKS)
def test_splits_disjoint(task, test_items):
    train = generate(task, "train", N_TEST)
    val = generate(task, "validation", 100)
    test = test_items[task]
    fp = {name: {_fingerprint(x) for x in items}
          for name, items in (("train", train), ("val", val), ("test", test))}
    assert not fp["train"] & fp["test"]
    assert not fp["train"] & fp["val"]
    assert not fp["val"] & fp["test"]
    assert len(fp["test"]) == N_TEST          # no repeats inside the test split
    if task == "ocr":                          # unseen strings: reading must generalise
        assert not {x.answer for x in train} & {x.answer for x in test}
    if task == "arithmetic":                   # unseen expressions, whatever the phrasing
        assert not {x.meta["expression"] for x in train} & {x.meta["expression"] for x in test}
    # Split membership does not depend on the seed either.
    other = generate(task, "train", 100, seed=1)
    assert not {_fingerprint(x) for x in other} & fp["test"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        generate("audio", "train", 1)
    with pytest.raises(ValueError, match="unknown split"):
        generate("vqa", "val", 1)
    with pytest.raises(ValueError, match="image_size"):
        generate("vqa", "train", 1, image_size=16)
    assert generate("vqa", "test", 0) == []


# ---------------------------------------------------------------- formats

_FORMATS = {
    "vqa": re.compile(r"^(%s)$" % "|".join(
        [*COLOURS, *SHAPES, *CORNERS, "yes", "no", "1", "2", "3", "4"])),
    "geometry": re.compile(r"^[1-9]\d{0,2}$"),
    "chart": re.compile(r"^([1-%d]|[%s])$" % (CHART_MAX, CHART_LABELS)),
    "ocr": re.compile(r"^[%s]{3,4}$" % OCR_ALPHABET),
    "grounding": re.compile(r"^\d,\d,\d,\d$"),
    "arithmetic": re.compile(r"^\d{1,2}$"),
}


@pytest.mark.parametrize("task", TASKS)
def test_answer_format(task, test_items):
    for it in test_items[task]:
        assert it.task == task and it.question.strip() and _FORMATS[task].match(it.answer), it
        if task in TEXT_TASKS:
            assert it.image is None
        else:
            assert it.image.mode == "RGB" and it.image.size == (64, 64)
        if task == "grounding":
            x1, y1, x2, y2 = map(int, it.answer.split(","))
            assert x1 <= x2 and y1 <= y2 and [x1, y1, x2, y2] == it.meta["box"]


def test_image_size_is_honoured():
    for task in VISION_TASKS:
        (it,) = generate(task, "validation", 1, image_size=112)
        assert it.image.size == (112, 112)


# ---------------------------------------------------------------- scoring

def _box_item(box) -> Item:
    return Item("grounding", "Locate the red circle.", ",".join(map(str, box)), None,
                {"box": list(box)})


def test_score_exact_match():
    it = Item("vqa", "What colour is the circle?", "red", None, {})
    assert score("vqa", "red", it) == 1.0
    assert score("vqa", "  Red. ", it) == 1.0
    assert score("vqa", "blue", it) == 0.0
    assert score("vqa", "", it) == 0.0
    ocr = Item("ocr", "Read the text in the image.", "A7K", None, {})
    assert score("ocr", "a7k", ocr) == 1.0 and score("ocr", "A7", ocr) == 0.0


def test_score_grounding_iou():
    it = _box_item((2, 2, 5, 5))                      # 4 x 4 cells
    assert score("grounding", "2,2,5,5", it) == 1.0
    assert score("grounding", "(5, 5, 2, 2)", it) == 1.0   # corners in either order
    assert score("grounding", "2,2,5,3", it) == 1.0   # 8 / 16: IoU exactly 0.5 counts
    assert score("grounding", "3,2,6,5", it) == 1.0   # shifted one cell: 12 / 20 = 0.6
    assert score("grounding", "4,2,7,5", it) == 0.0   # shifted two cells: 8 / 24
    assert score("grounding", "2,2,4,3", it) == 0.0   # 6 / 16 < 0.5
    assert score("grounding", "0,0,9,9", it) == 0.0   # 16 / 100
    for bad in ("", "red circle", "2,2,5", "2,2,5,5,1", "a,b,c,d"):
        assert score("grounding", bad, it) == 0.0
    with pytest.raises(ValueError):
        score("nope", "x", it)


# ---------------------------------------------------------------- answers from meta and pixels

def _vqa_expected(it: Item) -> str:
    objs, q = it.meta["scene"]["objects"], it.question
    named_c = [c for c in COLOURS if re.search(rf"\b{c}\b", q)]
    named_s = [s for s in SHAPES if re.search(rf"\b{s}\b", q)]
    match it.meta["qtype"]:
        case "count":
            return str(len(objs))
        case "colour":
            (o,) = [o for o in objs if o["shape"] == named_s[0]]
            return o["colour"]
        case "shape":
            (o,) = [o for o in objs if o["colour"] == named_c[0]]
            return o["shape"]
        case "position":
            (o,) = [o for o in objs if (o["colour"], o["shape"]) == (named_c[0], named_s[0])]
            return CORNERS[o["cell"]]
        case "exists":
            hit = any((o["colour"], o["shape"]) == (named_c[0], named_s[0]) for o in objs)
            return "yes" if hit else "no"


def test_vqa_answers_match_scene_and_pixels(test_items):
    for it in test_items["vqa"]:
        assert it.answer == _vqa_expected(it), it
        objs = it.meta["scene"]["objects"]
        drawn = {rgb for _, rgb in it.image.getcolors()}
        assert drawn - {(255, 255, 255)} == {COLOURS[o["colour"]] for o in objs}
        for o in objs:
            l, t, r, b = o["box_px"]
            assert ((l + r) // 2 >= 32, (t + b) // 2 >= 32) == (o["cell"] % 2 == 1, o["cell"] >= 2)
            ys, xs = np.nonzero(_mask(it.image, COLOURS[o["colour"]]))
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (l, t, r, b)


def test_grounding_box_matches_pixels(test_items):
    for it in test_items["grounding"]:
        o = it.meta["scene"]["objects"][it.meta["target"]]
        assert o["colour"] in it.question and o["shape"] in it.question
        ys, xs = np.nonzero(_mask(it.image, COLOURS[o["colour"]]))
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == it.meta["box_px"]
        assert grid_box(it.meta["box_px"], 64) == it.meta["box"]
        assert score("grounding", it.answer, it) == 1.0


def test_geometry_answers_match_scene_and_pixels(test_items):
    for it in test_items["geometry"]:
        sc, qtype = it.meta["scene"], it.meta["qtype"]
        expected = {"width": sc.get("w"), "height": sc.get("h"), "sides": sc.get("n"),
                    "area": sc.get("w", 0) * sc.get("h", 0), "angle": sc.get("angle")}[qtype]
        assert it.answer == str(expected)
        if sc["kind"] == "rect":   # the fill inside the black outline spans w x h grid units
            ys, xs = np.nonzero(_mask(it.image, COLOURS[sc["colour"]]))
            u = sc["unit"]
            assert round((xs.max() - xs.min() + 2) / u) == sc["w"]
            assert round((ys.max() - ys.min() + 2) / u) == sc["h"]


def test_chart_answers_match_scene_and_pixels(test_items):
    for it in test_items["chart"]:
        sc, qtype = it.meta["scene"], it.meta["qtype"]
        values = sc["values"]
        if qtype.startswith("value"):
            label = re.search(r"\b([A-E])\?", it.question).group(1)
            assert it.answer == str(values[CHART_LABELS.index(label)])
        else:
            pick = max if qtype.startswith("argmax") else min
            assert it.answer == CHART_LABELS[values.index(pick(values))]
        if sc["kind"] == "bar":   # bar heights in pixels are ordered like the values
            mask = _mask(it.image, COLOURS[sc["colour"]])
            heights = [int(mask[:, g["cx"]].sum()) for g in chart_geometry(sc)]
            for (va, ha), (vb, hb) in zip(zip(values, heights), zip(values[1:], heights[1:])):
                assert (va > vb) == (ha > hb) and (va == vb) == (ha == hb)


def test_ocr_and_arithmetic_answers(test_items):
    for it in test_items["ocr"]:
        assert it.answer == it.meta["scene"]["text"]
        assert not _mask(it.image, it.meta["scene"]["paper"]).all()   # something is drawn
    for it in test_items["arithmetic"]:
        expr = it.meta["expression"]
        assert re.fullmatch(r"[\d ()+*-]+", expr) and expr in it.question
        assert int(it.answer) == eval(expr) == it.meta["value"]  # noqa: S307 (digits and ops)


# ---------------------------------------------------------------- distributions and baselines

@pytest.mark.parametrize("task", TASKS)
def test_answer_distribution_not_degenerate(task, test_items):
    items = test_items[task]
    counts = Counter(it.answer for it in items)
    assert max(counts.values()) / len(items) < 0.5
    assert len(counts) >= 10
    if task == "grounding":
        _, acc = majority_baseline(items)
        assert acc < 0.5


def test_chance_accuracy_is_the_majority_baseline(test_items):
    expected = majority_baseline(test_items["arithmetic"])[1]
    assert chance_accuracy("arithmetic") == expected < 0.2


# ---------------------------------------------------------------- captions and sheets

_CAPTION_WORDS = set(COLOURS) | set(SHAPES) | {
    "shapes,", "including", "a", "picture", "of", "shapes", "with", "rectangle", "on", "grid",
    "polygon", "two", "lines", "meeting", "bar", "chart", "bars", "line", "black", "dark",
    "letters", "and", "digits", "text", "light", "paper"}


def test_captions_are_generic():
    items = generate(CAPTION_TASK, "train", 60)
    assert {it.meta["source"] for it in items} == set(VISION_TASKS)
    for it in items:
        assert it.image is not None and set(it.answer.split()) <= _CAPTION_WORDS, it.answer
    (vqa_item,) = generate("vqa", "train", 1)
    assert set(generic_caption(vqa_item).split()) <= _CAPTION_WORDS
    with pytest.raises(ValueError):
        generic_caption(generate("arithmetic", "train", 1)[0])


def test_sample_sheet_writes_png(tmp_path):
    for task in ("chart", "arithmetic"):
        path = sample_sheet(task, tmp_path / "sheets" / f"{task}.png", n=4)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as img:
            assert img.width >= 4 * 128


def test_layouts_sit_on_the_visual_token_cells(test_items):
    """At 64 px the bench model's visual tokens are 16 x 16 px cells (patch 8, merge 2): OCR glyphs,
    chart columns and grounding boxes are laid out on them (docs/bench.md says why)."""
    for it in test_items["ocr"]:
        sc = it.meta["scene"]
        ink = np.asarray(it.image).astype(int).sum(-1) < np.asarray(sc["paper"]).sum() - 60
        ys, xs = np.nonzero(ink)
        assert set(ys // 16) == {sc["row"]}                                  # one row of cells
        cols = sorted(set(xs // 16))
        assert cols == list(range(sc["col"], sc["col"] + len(sc["text"])))   # one glyph per cell
        for c in cols:                                                       # glyphs clear the cell edges
            assert 0 < xs[xs // 16 == c].min() % 16 and xs[xs // 16 == c].max() % 16 < 15
    for it in test_items["chart"]:
        assert len(it.meta["scene"]["values"]) == 4
        for i, g in enumerate(chart_geometry(it.meta["scene"])):
            assert 16 * i <= g["l"] and g["r"] < 16 * (i + 1)
    for it in test_items["grounding"]:
        for o in it.meta["scene"]["objects"]:
            assert all(v % 8 == 0 for v in o["box_px"])                      # whole cells of the 8 x 8 grid
        x1, y1, x2, y2 = it.meta["box"]
        assert 2 <= x2 - x1 + 1 <= 3 and x2 - x1 == y2 - y1
