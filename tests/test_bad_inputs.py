"""Every bad input: a clear message, exit code 2, and no output (nor temporary folder) left behind."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from omnimerge.cli import main
from conftest import leftovers


def run(tmp_path: Path, recipe: dict | str, *extra: str, out: str = "out") -> tuple[int, str]:
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    return main(["merge", str(path), "-o", str(tmp_path / out), *extra]), ""


@pytest.fixture
def ctx(zoo, tmp_path, capsys):
    """Runs the CLI on a recipe and returns (exit code, stderr); asserts nothing was left behind."""

    def go(recipe, *extra, out="out"):
        code, _ = run(tmp_path, recipe, *extra, out=out)
        err = capsys.readouterr().err
        assert leftovers(tmp_path) == []
        return code, " ".join(err.split())

    go.base = zoo.base("qwen2")
    go.experts = zoo.experts("qwen2")
    go.tmp = tmp_path
    return go


def recipe(base, models, method="ties", **kw):
    return {"method": method, "base": str(base), "models": [{"path": str(m)} for m in models], **kw}


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_refused(ctx, code, err, *words):
    assert code == 2, err
    for w in words:
        assert w in err, (w, err)
    assert not (ctx.tmp / "out").exists()


def test_missing_path(ctx):
    code, err = ctx(recipe(ctx.base, [ctx.tmp / "nope"]))
    assert_refused(ctx, code, err, "nope", "no such file or folder")


def test_missing_hub_id_is_not_downloaded(ctx, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    code, err = ctx({"method": "average", "models": [{"path": "someorg/somemodel@v1"}]})
    assert_refused(ctx, code, err, "someorg/somemodel", "not in the local Hugging Face cache", "hf download")


def test_not_a_checkpoint(ctx):
    folder = ctx.tmp / "empty"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    code, err = ctx(recipe(ctx.base, [folder]))
    assert_refused(ctx, code, err, str(folder), "not a checkpoint")
    code, err = ctx(recipe(ctx.base, [ctx.tmp]))  # a folder without config.json
    assert_refused(ctx, code, err, "no config.json")


def test_truncated_safetensors(ctx):
    bad = copy_model(ctx.experts[0], ctx.tmp / "truncated")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    code, err = ctx(recipe(ctx.base, [bad]))
    assert_refused(ctx, code, err, "model.safetensors", "truncated")


def test_corrupt_header(ctx):
    bad = copy_model(ctx.experts[0], ctx.tmp / "corrupt")
    f = bad / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))
    code, err = ctx(recipe(ctx.base, [bad]))
    assert_refused(ctx, code, err, "model.safetensors", "corrupt")


def test_pickle_refused_without_flag_and_read_with_it(ctx):
    pkl = copy_model(ctx.experts[0], ctx.tmp / "pickled")
    sd = load_file(str(pkl / "model.safetensors"))
    (pkl / "model.safetensors").unlink()
    torch.save(sd, pkl / "pytorch_model.bin")
    code, err = ctx(recipe(ctx.base, [pkl]))
    assert_refused(ctx, code, err, "pytorch_model.bin", "--allow-pickle")
    code, err = ctx(recipe(ctx.base, [pkl]), "--allow-pickle")
    assert code == 0, err
    assert (ctx.tmp / "out" / "model.safetensors").is_file()


def test_shape_mismatch(ctx, zoo):
    wide = zoo.base("qwen2", hidden_size=96)
    code, err = ctx(recipe(ctx.base, [wide]))
    assert_refused(ctx, code, err, "shape mismatch", "language.layers.0.", "(96,", "(64,", str(wide))


def test_different_layer_counts(ctx, zoo):
    deep = zoo.base("qwen2", num_layers=3)
    code, err = ctx(recipe(ctx.base, [deep]))
    assert_refused(ctx, code, err, "3 decoder layers", "has 2")


def test_unknown_method(ctx):
    code, err = ctx(recipe(ctx.base, ctx.experts, method="tiess"))
    assert_refused(ctx, code, err, "unknown method 'tiess'", "ties")


def test_unknown_parameter(ctx):
    code, err = ctx(recipe(ctx.base, ctx.experts, parameters={"densty": 0.5}))
    assert_refused(ctx, code, err, "'densty'", "density")
    r = recipe(ctx.base, ctx.experts)
    r["models"][0]["dropout"] = 0.1
    code, err = ctx(r)
    assert_refused(ctx, code, err, "models[0]", "'dropout'")


def test_parameter_out_of_range(ctx):
    code, err = ctx(recipe(ctx.base, ctx.experts, parameters={"density": 1.5}))
    assert_refused(ctx, code, err, "density", "1.5", "(0, 1]")
    code, err = ctx(recipe(ctx.base, ctx.experts, parameters={"density": [{"filter": "mlp", "value": -1}]}))
    assert_refused(ctx, code, err, "density", "-1")


def test_recipe_field_errors_name_the_field(ctx):
    code, err = ctx({"method": "ties", "models": [], "dtype": "float8", "colour": 1})
    assert_refused(ctx, code, err, "models", "dtype", "colour")
    code, err = ctx("method: [unclosed")
    assert_refused(ctx, code, err, "not valid YAML")
    code, err = ctx(recipe(ctx.base, ctx.experts, parameters={"density": [{"filter": "(", "value": 0.1}]}))
    assert_refused(ctx, code, err, "invalid regular expression")


def test_method_needs_base(ctx):
    code, err = ctx({"method": "ties", "models": [{"path": str(e)} for e in ctx.experts]})
    assert_refused(ctx, code, err, "needs a `base:`")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_an_input_tensor(ctx, value):
    bad = copy_model(ctx.experts[1], ctx.tmp / "broken")
    sd = load_file(str(bad / "model.safetensors"))
    sd["model.layers.1.mlp.down_proj.weight"][3, 5] = value
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    code, err = ctx(recipe(ctx.base, [ctx.experts[0], bad]))
    assert_refused(ctx, code, err, "model.layers.1.mlp.down_proj.weight", "NaN/Inf", str(bad))


def test_output_exists_without_force(ctx):
    out = ctx.tmp / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    code, err = ctx(recipe(ctx.base, ctx.experts))
    assert code == 2 and "--force" in err
    assert (out / "precious.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    code, err = ctx(recipe(ctx.base, ctx.experts), "--force")  # --force never deletes what omnimerge did not write
    assert code == 2 and "would have deleted" in err and str(out / "precious.txt") in err
    assert (out / "precious.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    (out / "precious.txt").unlink()
    code, err = ctx(recipe(ctx.base, ctx.experts))  # an empty folder is used as it is
    assert code == 0 and (out / "model.safetensors").is_file()
    code, err = ctx(recipe(ctx.base, ctx.experts))
    assert code == 2 and "an earlier omnimerge output" in err and "--force" in err
    code, err = ctx(recipe(ctx.base, ctx.experts, method="task_arithmetic"), "--force")  # omnimerge's: replaced
    assert code == 0 and "task_arithmetic" in (out / "omnimerge.yaml").read_text()


def test_output_that_is_an_input_is_refused(ctx):
    (ctx.tmp / "r.yaml").write_text(yaml.safe_dump(recipe(ctx.base, ctx.experts)))
    for target in (ctx.experts[0], ctx.experts[0].parent):
        code = main(["merge", str(ctx.tmp / "r.yaml"), "-o", str(target), "--force"])
        assert code == 2 and (ctx.experts[0] / "model.safetensors").is_file()


def test_disk_full_before_writing(ctx, monkeypatch):
    import omnimerge.checkpoints.output as output

    class Usage:
        total, used, free = 10**9, 10**9 - 1000, 1000

    monkeypatch.setattr(output.shutil, "disk_usage", lambda p: Usage)
    code, err = ctx(recipe(ctx.base, ctx.experts))
    assert_refused(ctx, code, err, "not enough disk space")


def test_disk_full_while_writing(ctx, monkeypatch):
    from omnimerge.checkpoints import safetensors_io

    calls = []
    real = safetensors_io.StreamingSafetensorsWriter.write

    def write(self, name, tensor):
        calls.append(name)
        if len(calls) == 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, name, tensor)

    monkeypatch.setattr(safetensors_io.StreamingSafetensorsWriter, "write", write)
    code, err = ctx(recipe(ctx.base, ctx.experts))
    assert_refused(ctx, code, err, "disk full", "nothing was left behind")


# --- recipe values ------------------------------------------------------------------------------
def test_a_weight_that_overflows_float32(ctx):
    r = recipe(ctx.base, ctx.experts, method="task_arithmetic")
    r["models"][1]["weight"] = 1.0e308
    code, err = ctx(r)
    assert_refused(ctx, code, err, "models[1].weight", "overflows float32", "use a smaller value")


def test_a_recipe_that_is_not_utf8(ctx, capsys):
    path = ctx.tmp / "latin1.yaml"
    path.write_bytes(f"method: average\nmodels:\n  - path: {ctx.base}\n  - path: caf\xe9\n".encode("latin-1"))
    code = main(["merge", str(path), "-o", str(ctx.tmp / "out")])
    err = " ".join(capsys.readouterr().err.split())
    assert_refused(ctx, code, err, "latin1.yaml", "not UTF-8", "save the recipe as UTF-8")


def test_the_same_model_twice_in_two_spellings(ctx, tmp_path, monkeypatch):
    link = tmp_path / "alias"
    link.symlink_to(ctx.experts[0])
    code, err = ctx(recipe(ctx.base, [ctx.experts[0], link]))
    assert_refused(ctx, code, err, "models[1]", "same model as models[0]", "allow_duplicate_models: true")
    code, err = ctx(recipe(ctx.base, [ctx.experts[0], link], method="task_arithmetic", allow_duplicate_models=True))
    assert code == 0, err


def test_an_output_inside_an_input_folder(ctx):
    (ctx.tmp / "r.yaml").write_text(yaml.safe_dump(recipe(ctx.base, ctx.experts)))
    before = sorted(p.name for p in ctx.experts[0].iterdir())
    code = main(["merge", str(ctx.tmp / "r.yaml"), "-o", str(ctx.experts[0] / "merged")])
    assert code == 2 and sorted(p.name for p in ctx.experts[0].iterdir()) == before
