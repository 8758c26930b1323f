"""Property-based tests beyond safetensors headers: shard indexes, adapter configs and recipes with
fields of any JSON value either load (and every tensor reads) or fail with an OmnimergeError —
never another exception. ``OMNIMERGE_FUZZ_EXAMPLES`` raises the example count (nightly)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from omnimerge.checkpoints.checkpoint import load_checkpoint
from omnimerge.errors import OmnimergeError
from omnimerge.recipe import parse_recipe

NIGHTLY = int(os.environ.get("OMNIMERGE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=NIGHTLY or 60, deadline=None, derandomize=not NIGHTLY,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.text(max_size=8)),
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(st.text(max_size=6), kids, max_size=3)),
    max_leaves=8)

Q = "model.layers.0.self_attn.q_proj"


def loads_or_refuses(spec: str) -> str:
    """Open ``spec`` and read every tensor; 'ok' or 'refused' (an OmnimergeError), nothing else."""
    try:
        ck = load_checkpoint(spec)
        for canon in ck.canon_to_raw:
            ck.read(canon)
    except OmnimergeError as e:
        assert str(e)
        return "refused"
    return "ok"


@pytest.fixture(scope="module")
def sharded(zoo, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sharded") / "m"
    folder.mkdir()
    src = zoo.expert("qwen2", 1)
    shutil.copy(src / "config.json", folder / "config.json")
    sd = load_file(str(src / "model.safetensors"))
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[::2], keys[1::2])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, str(folder / name))
        weight_map |= {k: name for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@FUZZ
@given(kind=st.sampled_from(["weight_map", "entry", "key", "top"]), value=json_value,
       name=st.sampled_from(["../x.safetensors", "/etc/passwd", "model-00001-of-00002.safetensors",
                             "model-00002-of-00002.safetensors", "config.json", "", ".", "sub/../model.safetensors"]))
def test_mutated_index(sharded, tmp_path_factory, kind, value, name):
    folder = tmp_path_factory.mktemp("idx") / "m"
    shutil.copytree(sharded, folder)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = sorted(data["weight_map"])[0]
    if kind == "weight_map":
        data["weight_map"] = value
    elif kind == "entry":
        data["weight_map"][key] = value if not isinstance(value, str) else name
    elif kind == "key":
        data["weight_map"][str(value)] = name
    else:
        data = value
    index.write_text(json.dumps(data))
    loads_or_refuses(str(folder))


@pytest.fixture(scope="module")
def lora(zoo, tmp_path_factory) -> Path:
    base = zoo.base("qwen2")
    folder = tmp_path_factory.mktemp("lora") / "a"
    folder.mkdir()
    w = load_file(str(base / "model.safetensors"))[Q + ".weight"]
    g = torch.Generator().manual_seed(0)
    save_file({f"base_model.model.{Q}.lora_A.weight": torch.randn(4, w.shape[1], generator=g),
               f"base_model.model.{Q}.lora_B.weight": torch.randn(w.shape[0], 4, generator=g)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "base_model_name_or_path": str(base)}))
    return folder


@FUZZ
@given(field=st.sampled_from(["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out",
                              "peft_type", "use_dora", "base_model_name_or_path", "whole"]),
       value=st.one_of(json_value, st.integers(-3, 9), st.dictionaries(st.sampled_from(["q_proj", Q, "(", ".*"]),
                                                                         st.integers(-2, 9), max_size=2)))
def test_mutated_adapter_config(lora, tmp_path_factory, field, value):
    folder = tmp_path_factory.mktemp("cfg") / "a"
    shutil.copytree(lora, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    if field == "whole":
        cfg = value
    else:
        cfg[field] = value
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    if loads_or_refuses(str(folder)) == "ok" and field == "r":
        assert value == 4  # the factors have rank 4: any other r is refused


@FUZZ
@given(field=st.sampled_from(["A", "B"]), shape=st.lists(st.integers(0, 70), min_size=0, max_size=3))
def test_adapter_factors_of_any_shape(lora, tmp_path_factory, field, shape):
    folder = tmp_path_factory.mktemp("fac") / "a"
    shutil.copytree(lora, folder)
    t = load_file(str(folder / "adapter_model.safetensors"))
    t[f"base_model.model.{Q}.lora_{field}.weight"] = torch.zeros(shape)
    save_file(t, str(folder / "adapter_model.safetensors"))
    loads_or_refuses(str(folder))


recipe_fields = st.fixed_dictionaries({}, optional={
    "method": json_value, "models": st.one_of(json_value, st.lists(st.dictionaries(
        st.sampled_from(["path", "name", "weight", "density", "lora_base"]), json_value, max_size=3), max_size=3)),
    "base": json_value, "skeleton": json_value, "skeletons": json_value, "parameters": json_value,
    "components": json_value, "dtype": json_value, "out_dtype": json_value, "seed": json_value,
    "tokenizer_source": json_value, "shard_size": json_value, "allow_duplicate_models": json_value,
    "copy_nonfinite": json_value})


@FUZZ
@given(data=recipe_fields)
def test_any_recipe_parses_or_is_refused(data):
    try:
        parse_recipe(data, "r.yaml")
    except OmnimergeError as e:
        assert str(e).startswith("r.yaml")
