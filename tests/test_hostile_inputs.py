"""Hostile checkpoint folders and LoRA adapters: exit 2 with a message that names the problem, and
nothing read from outside a model folder, nothing written, nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from omnimerge.checkpoints.checkpoint import load_checkpoint
from omnimerge.checkpoints.sources import confined_file, confinement_root
from omnimerge.cli import main
from omnimerge.errors import OmnimergeError
from conftest import leftovers

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def cli(tmp_path, capsys):
    """Runs ``omnimerge merge`` on a recipe; returns (exit code, stderr on one line); checks that no
    output and no temporary folder was left when the merge failed."""

    def go(recipe: dict | str, *extra: str):
        path = tmp_path / "recipe.yaml"
        path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
        code = main(["merge", str(path), "-o", str(tmp_path / "out"), "--no-progress", *extra])
        err = " ".join(capsys.readouterr().err.split())
        assert "Traceback" not in err
        assert leftovers(tmp_path) == []
        if code != 0:
            assert not (tmp_path / "out").exists()
        return code, err

    return go


def refused(cli, recipe, *words, extra=()):
    code, err = cli(recipe, *extra)
    assert code == 2, err
    for w in words:
        assert w in err, (w, err)
    return err


def average(*paths) -> dict:
    return {"method": "average", "models": [{"path": str(p)} for p in paths]}


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shard(model: Path, folder: Path, pieces: int = 2) -> Path:
    """``model`` re-saved as ``pieces`` shards with an index."""
    folder.mkdir()
    shutil.copy(model / "config.json", folder / "config.json")
    sd = load_file(str(model / "model.safetensors"))
    keys = sorted(sd)
    weight_map = {}
    for i in range(pieces):
        name = f"model-{i + 1:05d}-of-{pieces:05d}.safetensors"
        part = {k: sd[k] for k in keys[i::pieces]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map |= {k: name for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def set_index(folder: Path, change) -> None:
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    change(data)
    index.write_text(json.dumps(data))


# --- confinement --------------------------------------------------------------------------------
def test_confined_file_rules(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "ok.safetensors").write_bytes(b"x")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    assert confined_file(tmp_path / "m", "ok.safetensors", "test") == tmp_path / "m" / "ok.safetensors"
    for bad in ("../outside.safetensors", str(tmp_path / "outside.safetensors"), "sub/../../outside.safetensors",
                "~/x", "", 7, None, ["a"]):
        with pytest.raises(OmnimergeError, match="test"):
            confined_file(tmp_path / "m", bad, "test")
    os.symlink(tmp_path / "outside.safetensors", tmp_path / "m" / "link.safetensors")
    with pytest.raises(OmnimergeError, match="link"):
        confined_file(tmp_path / "m", "link.safetensors", "test")
    os.symlink("ok.safetensors", tmp_path / "m" / "inner.safetensors")  # a link inside the folder is fine
    assert confined_file(tmp_path / "m", "inner.safetensors", "test").name == "inner.safetensors"


def test_hub_cache_snapshots_may_link_to_their_blobs(tmp_path):
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_bytes(b"x")
    snap = repo / "snapshots" / "0123"
    snap.mkdir(parents=True)
    os.symlink("../../blobs/abc", snap / "model.safetensors")
    assert confinement_root(snap) == repo.resolve()
    assert confined_file(snap, "model.safetensors", "t") == snap / "model.safetensors"
    (tmp_path / "elsewhere").write_bytes(b"x")
    os.symlink(tmp_path / "elsewhere", snap / "evil.safetensors")
    with pytest.raises(OmnimergeError, match="outside"):
        confined_file(snap, "evil.safetensors", "t")


@pytest.mark.parametrize("target", ["../secret.safetensors", "ABSOLUTE", "sub/../../secret.safetensors"])
def test_index_naming_a_file_outside_the_folder(cli, zoo, tmp_path, target):
    model = shard(zoo.expert("qwen2", 1), tmp_path / "sharded")
    shutil.copy(model / "model-00001-of-00002.safetensors", tmp_path / "secret.safetensors")
    target = str(tmp_path / "secret.safetensors") if target == "ABSOLUTE" else target
    set_index(model, lambda d: d["weight_map"].update({k: target for k, v in list(d["weight_map"].items())
                                                       if v == "model-00001-of-00002.safetensors"}))
    refused(cli, average(zoo.base("qwen2"), model), "outside the model folder", "model.safetensors.index.json")


def test_shard_that_is_a_link_out_of_the_folder(cli, zoo, tmp_path):
    model = shard(zoo.expert("qwen2", 1), tmp_path / "sharded")
    moved = tmp_path / "elsewhere.safetensors"
    shutil.move(model / "model-00002-of-00002.safetensors", moved)
    os.symlink(moved, model / "model-00002-of-00002.safetensors")
    refused(cli, average(zoo.base("qwen2"), model), "is a link to", "outside the model folder")


def test_single_file_link_to_etc_passwd(cli, zoo, tmp_path):
    model = copy_model(zoo.expert("qwen2", 1), tmp_path / "m")
    (model / "model.safetensors").unlink()
    os.symlink("/etc/passwd", model / "model.safetensors")
    refused(cli, average(zoo.base("qwen2"), model), "/etc/passwd", "outside the model folder")


def test_a_text_file_as_weights_is_called_what_it_is(cli, zoo, tmp_path):
    model = copy_model(zoo.expert("qwen2", 1), tmp_path / "m")
    shutil.copy("/etc/passwd", model / "model.safetensors")
    err = refused(cli, average(zoo.base("qwen2"), model), "model.safetensors", "text", "not the header length")
    assert str(int.from_bytes(Path("/etc/passwd").read_bytes()[:8], "little")) not in err


def test_a_file_given_as_a_model(cli, zoo):
    refused(cli, average(zoo.base("qwen2"), "/etc/passwd"), "/etc/passwd", "model folder")


@pytest.mark.parametrize("weight_map", [["a", "b"], "model.safetensors", None, {}, {"x": 3}, {"x": ["a"]}])
def test_index_of_the_wrong_json_type(cli, zoo, tmp_path, weight_map):
    model = shard(zoo.expert("qwen2", 1), tmp_path / "sharded")
    set_index(model, lambda d: d.update(weight_map=weight_map))
    refused(cli, average(zoo.base("qwen2"), model), "model.safetensors.index.json", "weight_map")


def test_index_that_is_not_an_object_or_not_json(cli, zoo, tmp_path):
    model = shard(zoo.expert("qwen2", 1), tmp_path / "sharded")
    (model / "model.safetensors.index.json").write_text("[1, 2]")
    refused(cli, average(zoo.base("qwen2"), model), "model.safetensors.index.json", "weight_map")
    (model / "model.safetensors.index.json").write_bytes(b"\xff\xfe{")
    refused(cli, average(zoo.base("qwen2"), model), "model.safetensors.index.json", "not a valid shard index")


def test_index_that_does_not_match_its_shards(cli, zoo, tmp_path):
    model = shard(zoo.expert("qwen2", 1), tmp_path / "sharded")
    set_index(model, lambda d: d["weight_map"].update({"model.norm.weight": "model-00001-of-00002.safetensors"
                                                       if d["weight_map"]["model.norm.weight"].startswith("model-00002")
                                                       else "model-00002-of-00002.safetensors"}))
    refused(cli, average(zoo.base("qwen2"), model), "model.norm.weight", "does not match")
    model = shard(zoo.expert("qwen2", 1), tmp_path / "sharded2")
    set_index(model, lambda d: d["weight_map"].update({"ghost.weight": "model-00001-of-00002.safetensors"}))
    refused(cli, average(zoo.base("qwen2"), model), "ghost.weight", "no shard holds it")


def test_a_tensor_in_two_shards(cli, zoo, tmp_path):
    model = shard(zoo.expert("qwen2", 1), tmp_path / "sharded")
    one = load_file(str(model / "model-00001-of-00002.safetensors"))
    two = load_file(str(model / "model-00002-of-00002.safetensors"))
    key = sorted(one)[0]
    two[key] = one[key]
    save_file(two, str(model / "model-00002-of-00002.safetensors"))
    refused(cli, average(zoo.base("qwen2"), model), key, "in both")


def test_config_that_links_out_of_the_folder(cli, zoo, tmp_path):
    model = copy_model(zoo.expert("qwen2", 1), tmp_path / "m")
    shutil.move(model / "config.json", tmp_path / "config.json")
    os.symlink(tmp_path / "config.json", model / "config.json")
    refused(cli, average(zoo.base("qwen2"), model), "config.json", "outside the model folder")


def test_tokenizer_source_files_that_link_out_are_not_copied(cli, zoo, tmp_path):
    tok = copy_model(zoo.base("qwen2"), tmp_path / "tok")
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    os.symlink(secret, tok / "tokenizer_config.json") if not (tok / "tokenizer_config.json").exists() else (
        (tok / "tokenizer_config.json").unlink(), os.symlink(secret, tok / "tokenizer_config.json"))
    r = average(zoo.base("qwen2"), zoo.expert("qwen2", 1)) | {"tokenizer_source": str(tok)}
    refused(cli, r, "tokenizer_config.json", "outside the model folder")


def test_skeleton_files_that_link_out_are_not_copied(cli, zoo, tmp_path):
    skel = copy_model(zoo.base("qwen2"), tmp_path / "skel")
    secret = tmp_path / "secret.txt"
    secret.write_text("password")
    os.symlink(secret, skel / "generation_config.json.bak")
    refused(cli, average(skel, zoo.expert("qwen2", 1)), "generation_config.json.bak", "outside the model folder")


# --- LoRA adapters ------------------------------------------------------------------------------
def adapter(base: Path, folder: Path, *, r=4, a_rank=None, b_rank=None, alpha=8, module=Q, cfg=None,
            a_cols=None, b_rows=None, seed=0) -> Path:
    """A hand-written PEFT LoRA adapter over ``base`` updating ``module``."""
    folder.mkdir()
    weight = load_file(str(base / "model.safetensors"))[module + ".weight"]
    out, inp = weight.shape
    g = torch.Generator().manual_seed(seed)
    tensors = {
        f"base_model.model.{module}.lora_A.weight": torch.randn(a_rank or r, a_cols or inp, generator=g) * 0.01,
        f"base_model.model.{module}.lora_B.weight": torch.randn(b_rows or out, b_rank or r, generator=g) * 0.01,
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj"],
              "base_model_name_or_path": str(base)} | (cfg or {})
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_a_valid_adapter_merges(cli, zoo, tmp_path):
    base = zoo.base("qwen2")
    a = adapter(base, tmp_path / "lora")
    code, err = cli(average(base, a))
    assert code == 0, err
    ad = load_file(str(a / "adapter_model.safetensors"))
    delta = ad[f"base_model.model.{Q}.lora_B.weight"] @ ad[f"base_model.model.{Q}.lora_A.weight"] * 2
    got = load_file(str(tmp_path / "out" / "model.safetensors"))[Q + ".weight"]
    want = load_file(str(base / "model.safetensors"))[Q + ".weight"] + delta / 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw,words", [
    ({"a_rank": 3}, ["rank", "A is (3,", "B is"]),
    ({"a_rank": 3, "b_rank": 3}, ["rank 3", "r = 4"]),
    ({"a_cols": 7}, ["B·A is", "right base"]),
    ({"b_rows": 9}, ["B·A is", "right base"]),
    ({"r": 0, "a_rank": 4, "b_rank": 4}, ["'r' must be a positive integer"]),
    ({"r": -2, "a_rank": 4, "b_rank": 4}, ["'r' must be a positive integer"]),
    ({"r": True, "a_rank": 4, "b_rank": 4}, ["'r'"]),
    ({"alpha": "8"}, ["'lora_alpha' must be a finite number"]),
    ({"cfg": {"rank_pattern": {"q_proj": 0}}}, ["rank_pattern['q_proj'] must be a positive integer"]),
    ({"cfg": {"alpha_pattern": {"q_proj": "x"}}}, ["alpha_pattern['q_proj'] must be a finite number"]),
    ({"cfg": {"rank_pattern": {"(": 4}}}, ["rank_pattern", "regular expression"]),
    ({"cfg": {"rank_pattern": ["q_proj"]}}, ["rank_pattern"]),
    ({"cfg": {"base_model_name_or_path": 5}}, ["base_model_name_or_path"]),
    ({"cfg": {"use_rslora": "yes"}}, ["use_rslora"]),
], ids=["A-B-ranks", "config-rank", "in-dim", "out-dim", "r-zero", "r-negative", "r-bool", "alpha-string",
        "rank-pattern-zero", "alpha-pattern-string", "rank-pattern-regex", "rank-pattern-list", "base-not-string", "rslora-string"])
def test_bad_adapters(cli, zoo, tmp_path, kw, words):
    a = adapter(zoo.base("qwen2"), tmp_path / "lora", **kw)
    refused(cli, average(zoo.base("qwen2"), a), str(a), *words)


def test_adapter_config_of_the_wrong_type(cli, zoo, tmp_path):
    a = adapter(zoo.base("qwen2"), tmp_path / "lora")
    (a / "adapter_config.json").write_text("[1]")
    refused(cli, average(zoo.base("qwen2"), a), "adapter_config.json", "not a JSON object")
    (a / "adapter_config.json").write_bytes(b'{"r": 4, "x": "\xff"}')
    refused(cli, average(zoo.base("qwen2"), a), "adapter_config.json", "not a valid LoRA adapter config")


def test_adapter_with_a_lone_factor(cli, zoo, tmp_path):
    a = adapter(zoo.base("qwen2"), tmp_path / "lora")
    t = load_file(str(a / "adapter_model.safetensors"))
    del t[f"base_model.model.{Q}.lora_B.weight"]
    save_file(t, str(a / "adapter_model.safetensors"))
    refused(cli, average(zoo.base("qwen2"), a), "lora_A.weight", "lora_B.weight", "incomplete")


def test_adapter_whose_weights_are_missing(cli, zoo, tmp_path):
    a = adapter(zoo.base("qwen2"), tmp_path / "lora")
    (a / "adapter_model.safetensors").unlink()
    refused(cli, average(zoo.base("qwen2"), a), "adapter_model.safetensors is missing", str(a))


def test_adapter_weights_that_link_out(cli, zoo, tmp_path):
    a = adapter(zoo.base("qwen2"), tmp_path / "lora")
    shutil.move(a / "adapter_model.safetensors", tmp_path / "w.safetensors")
    os.symlink(tmp_path / "w.safetensors", a / "adapter_model.safetensors")
    refused(cli, average(zoo.base("qwen2"), a), "adapter_model.safetensors", "outside the model folder")


def test_adapter_that_is_its_own_base(cli, zoo, tmp_path):
    a = adapter(zoo.base("qwen2"), tmp_path / "lora", cfg={"base_model_name_or_path": str(tmp_path / "lora")})
    refused(cli, average(zoo.base("qwen2"), a), "cycle", str(a))


def test_adapters_that_are_each_others_base(cli, zoo, tmp_path):
    a = adapter(zoo.base("qwen2"), tmp_path / "a", cfg={"base_model_name_or_path": str(tmp_path / "b")})
    adapter(zoo.base("qwen2"), tmp_path / "b", cfg={"base_model_name_or_path": str(tmp_path / "a")})
    refused(cli, average(zoo.base("qwen2"), a), "cycle", str(tmp_path / "a"), str(tmp_path / "b"))


def test_adapter_saving_a_module_of_the_wrong_shape(cli, zoo, tmp_path):
    a = adapter(zoo.base("qwen2"), tmp_path / "lora")
    t = load_file(str(a / "adapter_model.safetensors"))
    t["base_model.model.model.norm.weight"] = torch.ones(5)
    save_file(t, str(a / "adapter_model.safetensors"))
    refused(cli, average(zoo.base("qwen2"), a), "model.norm.weight", "(5,)")


def test_adapter_checks_happen_before_reading(zoo, tmp_path):
    """A bad adapter fails when opened (load_checkpoint), not at the first tensor read."""
    a = adapter(zoo.base("qwen2"), tmp_path / "lora", a_rank=2, b_rank=2)
    with pytest.raises(OmnimergeError, match="rank 2"):
        load_checkpoint(str(a))


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "adapter_config.json"])
def test_json_nested_too_deep(cli, zoo, tmp_path, name):
    if name == "adapter_config.json":
        model = adapter(zoo.base("qwen2"), tmp_path / "lora")
    elif name == "config.json":
        model = copy_model(zoo.expert("qwen2", 1), tmp_path / "m")
    else:
        model = shard(zoo.expert("qwen2", 1), tmp_path / "sharded")
    (model / name).write_text("[" * 100_000 + "]" * 100_000)
    refused(cli, average(zoo.base("qwen2"), model), name)


def test_an_adapter_names_its_base_folder_among_its_folders(zoo, tmp_path):
    base = zoo.base("qwen2")
    a = adapter(base, tmp_path / "lora")
    ck = load_checkpoint(str(a))
    assert ck.folders() == [a.resolve(), base.resolve()]
    assert load_checkpoint(str(base)).folders() == [base.resolve()]
