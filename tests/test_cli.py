"""The `omnimerge` command, in process (plus one run of the installed entry point)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from omnimerge.cli import main
from omnimerge.methods import list_methods
from conftest import leftovers


# The test's own reading of a tiny Qwen2-VL saved in the hub layout.
def qwen2_vl_component(raw: str) -> str:
    if raw == "lm_head.weight":
        return "lm_head"
    if raw == "model.embed_tokens.weight":
        return "embed"
    if raw.startswith(("model.layers.", "model.norm.")):
        return "language"
    if raw.startswith("visual.merger."):
        return "projector"
    if raw.startswith("visual."):
        return "vision"
    raise AssertionError(f"unexpected key {raw}")


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def file_counts(folder: Path) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        for k in f.keys():
            c = out.setdefault(qwen2_vl_component(k), {"tensors": 0, "parameters": 0})
            c["tensors"] += 1
            c["parameters"] += numel(f.get_slice(k).get_shape())
    return out


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def write_recipe(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def table_rows(text: str) -> dict[str, list[str]]:
    """Rows of a rich table, by first cell; continuation lines (empty first cell) are joined on."""
    rows: dict[str, list[str]] = {}
    last = None
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip("│").split("│")]
        if cells[0]:
            last = cells[0]
            rows[last] = cells[1:]
        elif last is not None:
            rows[last] = [(a + " " + b).strip() for a, b in zip(rows[last], cells[1:])]
    return rows


# --- methods ------------------------------------------------------------------------------------
def expected_methods() -> list[dict]:
    return [{"name": m.name, "needs_base": m.needs_base,
             "parameters": [{"name": p.name, "type": p.type_name, "default": p.default, "per_model": p.per_model}
                            for p in m.params]} for m in list_methods()]


def strip(listing: list[dict]) -> list[dict]:
    return [{"name": m["name"], "needs_base": m["needs_base"],
             "parameters": [{k: p[k] for k in ("name", "type", "default", "per_model")} for p in m["parameters"]]}
            for m in listing]


def test_methods_json(capsys):
    assert main(["methods", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {m["name"] for m in listing} >= {"average", "task_arithmetic", "ties", "dare_linear", "dare_ties"}
    assert strip(listing) == expected_methods()
    ties = next(m for m in listing if m["name"] == "ties")
    assert ties["needs_base"] and "2306.01708" in ties["reference"]
    density = next(p for p in ties["parameters"] if p["name"] == "density")
    assert density == {"name": "density", "type": "float", "default": 0.2, "range": "(0, 1]", "per_model": True,
                       "help": density["help"]} and density["help"]


def test_methods_text(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for m in list_methods():
        assert m.name in text
        for p in m.params:
            assert f"{p.name}: {p.type_name} = {p.default!r}" in text, (m.name, p.name)
    assert "average — " in text and "task_arithmetic (needs base)" in text


def test_installed_entry_point():
    script = Path(sys.executable).parent / "omnimerge"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "omnimerge.cli"]
    res = subprocess.run([*cmd, "methods", "--json"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert strip(json.loads(res.stdout)) == expected_methods()


@pytest.mark.parametrize("argv", [["merge"], ["merge", "r.yaml", "--bogus"], []])
def test_usage_error_exit_code(capsys, argv):
    """Usage errors exit 2 with the usage line (bare `omnimerge` prints the help)."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Usage" in captured.err + captured.out


# --- inspect ------------------------------------------------------------------------------------
def test_inspect_json(zoo, capsys):
    folder = zoo.base("qwen2_vl")
    assert main(["inspect", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "qwen2_vl" and info["kind"] == "vlm" and info["model_type"] == "qwen2_vl"
    assert info["inferred"] is False and info["tied_lm_head"] is False and info["lora"] is None
    assert info["layers"] == info["num_hidden_layers"] == 2 and info["vocab_size"] == 384
    assert list(info["components"]) == ["language", "embed", "lm_head", "vision", "projector"]
    want = file_counts(folder)
    for name, c in info["components"].items():
        assert c["tensors"] == want[name]["tensors"], name
        assert c["parameters"] == want[name]["parameters"], name
        assert c["bytes"] == 4 * c["parameters"] and c["dtypes"] == {"float32": c["tensors"]}
    total = load_file(str(folder / "model.safetensors"))
    assert info["tensors"] == len(total)
    assert info["parameters"] == sum(t.numel() for t in total.values())
    assert info["components"]["embed"]["parameters"] == 384 * 64


def test_inspect_text(zoo, capsys):
    assert main(["inspect", str(zoo.base("llava"))]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "family llava (vlm)" in text and "2 decoder layers" in text


def test_inspect_missing(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


# --- merge, dry run, verify ----------------------------------------------------------------------
def ta_recipe(zoo) -> dict:
    base, (e1, e2) = zoo.base("qwen2_vl"), zoo.experts("qwen2_vl", 2)
    return {"method": "task_arithmetic", "base": str(base), "skeleton": "base",
            "models": [{"path": str(base), "name": "base", "weight": 0.0},
                       {"path": str(e1), "name": "e1", "weight": 0.6},
                       {"path": str(e2), "name": "e2", "weight": 0.4}]}


@pytest.mark.parametrize("with_output", [False, True])
def test_merge_dry_run_prints_plan_and_writes_nothing(zoo, tmp_path, capsys, with_output):
    path = write_recipe(tmp_path, ta_recipe(zoo))
    before = tree(tmp_path)
    args = ["merge", str(path), "--dry-run"] + (["-o", str(tmp_path / "out")] if with_output else [])
    assert main(args) == 0
    text = capsys.readouterr().out
    assert tree(tmp_path) == before
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    counts = file_counts(zoo.base("qwen2_vl"))
    rows = table_rows(text)
    assert set(rows) == set(counts)
    for comp, c in counts.items():
        action, frm, tensors = rows[comp][:3]
        assert int(tensors) == c["tensors"], comp
        if comp == "language":
            assert action == "task_arithmetic"
            assert frm.replace(" ", "").split(",") == ["base", "base", "e1", "e2"]  # base, then the models
        else:
            assert action == "copy" and frm == "base", (comp, rows[comp])
    assert f"{sum(c['tensors'] for c in counts.values())} tensors" in " ".join(text.split())


def test_dry_run_refuses_existing_output(zoo, tmp_path, capsys):
    path = write_recipe(tmp_path, ta_recipe(zoo))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    assert main(["merge", str(path), "--dry-run", "-o", str(tmp_path / "out")]) == 2
    assert "--force" in capsys.readouterr().err
    assert tree(tmp_path / "out") == ["keep.txt"]


def test_merge_without_output_is_refused(zoo, tmp_path, capsys):
    path = write_recipe(tmp_path, ta_recipe(zoo))
    assert main(["merge", str(path)]) == 2
    assert "-o OUTPUT" in capsys.readouterr().err


@pytest.fixture(scope="module")
def merged(zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-merge")
    path = write_recipe(tmp, ta_recipe(zoo))
    assert main(["merge", str(path), "-o", str(tmp / "out"), "--no-progress"]) == 0
    return tmp / "out"


def test_merge_then_verify(zoo, merged, capsys):
    got = load_file(str(merged / "model.safetensors"))
    base = load_file(str(zoo.base("qwen2_vl") / "model.safetensors"))
    e1, e2 = (load_file(str(e / "model.safetensors")) for e in zoo.experts("qwen2_vl", 2))
    key = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(got[key], base[key] + 0.6 * (e1[key] - base[key]) + 0.4 * (e2[key] - base[key]))
    assert torch.equal(got["visual.blocks.0.attn.qkv.weight"], base["visual.blocks.0.attn.qkv.weight"])
    capsys.readouterr()
    assert main(["verify", str(merged)]) == 0
    text = capsys.readouterr().out
    assert "FAIL" not in text
    for check in ("load", "text forward", "image forward", "kept tensors"):
        assert f"ok   {check}:" in text, check
    assert "33/33 kept tensors equal" in text  # embed, lm_head, 25 vision, 6 projector


@pytest.fixture(scope="module")
def altered(merged, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-altered") / "altered"
    shutil.copytree(merged, out)
    f = out / "model.safetensors"
    with safe_open(str(f), "pt") as h:
        meta = h.metadata()
    sd = load_file(str(f))
    sd["visual.blocks.1.mlp.fc1.weight"][0, 0] += 1.0
    save_file(sd, str(f), metadata=meta)
    return out


def test_verify_catches_an_altered_kept_tensor(altered, capsys):
    main(["verify", str(altered), "--no-image"])  # exit code: see test_verify_failure_exits_1
    text = " ".join(capsys.readouterr().out.split())
    assert "FAIL kept tensors" in text and "visual.blocks.1.mlp.fc1.weight" in text and "32/33" in text
    assert "ok load" in text  # the model still loads and runs; only the bytes differ


def test_verify_failure_exits_1(altered, capsys):
    assert main(["verify", str(altered), "--no-image"]) == 1
    assert "FAIL kept tensors" in capsys.readouterr().out


# --- hub ids from a local cache -----------------------------------------------------------------
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(root: Path, repo: str, model: Path) -> Path:
    """The Hugging Face cache layout: blobs by hash, snapshot files as links to them, refs/main."""
    org, name = repo.split("/")
    top = root / f"models--{org}--{name}"
    snap = top / "snapshots" / COMMIT
    (top / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in sorted(model.iterdir()):
        data = p.read_bytes()
        blob = top / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / p.name).symlink_to(os.path.relpath(blob, snap))
    (top / "refs").mkdir()
    (top / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture
def hub(zoo, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    cache = tmp_path / "hub"
    snap = fake_hub_cache(cache, "org/tiny", zoo.expert("qwen2", 1))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment once, at import (already done in this process)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return snap


def test_hub_id_from_local_cache(zoo, hub, tmp_path, capsys):
    base = zoo.base("qwen2")
    recipe = {"method": "task_arithmetic", "base": str(base),
              "models": [{"path": "org/tiny", "weight": 0.25}, {"path": "org/tiny@main", "weight": 0.25},
                         {"path": f"org/tiny@{COMMIT}", "weight": 0.5}]}
    out = tmp_path / "out"
    path = write_recipe(tmp_path, recipe)  # three spellings of one cached model: a duplicate unless allowed
    assert main(["merge", str(path), "-o", str(out)]) == 2 and not out.exists()
    assert "same model as models[0]" in capsys.readouterr().err
    path = write_recipe(tmp_path, recipe | {"allow_duplicate_models": True})
    assert main(["merge", str(path), "-o", str(out)]) == 0, capsys.readouterr().err
    got = load_file(str(out / "model.safetensors"))
    b = load_file(str(base / "model.safetensors"))
    e = load_file(str(zoo.expert("qwen2", 1) / "model.safetensors"))
    n = 0
    for key, t in got.items():
        if key.startswith("model.layers."):
            torch.testing.assert_close(t, e[key], rtol=1e-5, atol=1e-6)  # b + 1.0·(e − b)
            assert not torch.equal(e[key], b[key])
            n += 1
    assert n == 24
    recorded = yaml.safe_load((out / "omnimerge.yaml").read_text())
    assert [Path(m["path"]) for m in recorded["models"]] == [hub] * 3
    capsys.readouterr()
    assert main(["inspect", "org/tiny@main", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "qwen2" and Path(info["path"]) == hub


def test_hub_revision_missing_from_cache(hub, tmp_path, capsys):
    path = write_recipe(tmp_path, {"method": "average", "models": [{"path": "org/tiny@v2"}]})
    assert main(["merge", str(path), "-o", str(tmp_path / "out")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "org/tiny@v2" in err and "--revision v2" in err and "never downloads" in err
    assert not (tmp_path / "out").exists()
