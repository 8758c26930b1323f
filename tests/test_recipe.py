"""The recipe: defaults, sizes, per-model and filtered parameters, component policies, errors that
name the field, parameter precedence and per-tensor seeds."""

from __future__ import annotations

import pytest
import yaml

from omnimerge.errors import OmnimergeError
from omnimerge.methods import get_method
from omnimerge.plan import resolve_params, tensor_seed
from omnimerge.recipe import (ComponentMethod, FilteredValue, Recipe, Take, load_recipe, parse_recipe,
                              parse_size, pick)

COMPONENTS = ("language", "embed", "lm_head", "vision", "projector", "audio", "other")
MIN = {"method": "average", "models": [{"path": "a"}]}


def recipe(**kw) -> Recipe:
    return parse_recipe({**MIN, **kw})


def refused(data, *words) -> str:
    with pytest.raises(OmnimergeError) as e:
        parse_recipe(data, "my.yaml")
    msg = str(e.value)
    assert msg.startswith("my.yaml: invalid recipe"), msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


# --- defaults -----------------------------------------------------------------------------------
def test_minimal_recipe_defaults():
    r = parse_recipe(MIN)
    assert r.method == "average"
    assert [m.path for m in r.models] == ["a"]
    assert r.base is None and r.skeleton is None and r.tokenizer_source is None
    assert r.dtype == "float32" and r.out_dtype is None and r.seed == 0
    assert r.parameters == {} and r.components == {}
    assert r.shard_size == "5GB" and r.shard_bytes == 5_000_000_000
    assert r.policy("language") == "merge"
    for c in COMPONENTS[1:]:
        assert r.policy(c) == "keep", c
    m = r.models[0]
    assert m.name is None and m.label == "a" and m.parameters == {} and m.lora_base is None


def test_parse_recipe_passes_a_recipe_through():
    r = parse_recipe(MIN)
    assert parse_recipe(r) is r


def test_load_recipe_from_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "method": "ties", "base": "b", "models": [{"path": "x", "name": "X", "weight": 0.5}, {"path": "y"}],
        "parameters": {"density": 0.4}, "dtype": "bfloat16", "out_dtype": "float16", "seed": 7,
        "shard_size": "500MB", "components": {"vision": {"take": "X"}}}))
    r = load_recipe(path)
    assert r.method == "ties" and r.base == "b" and r.seed == 7
    assert r.dtype == "bfloat16" and r.out_dtype == "float16" and r.shard_bytes == 500_000_000
    assert r.models[0].label == "X" and r.models[0].parameters == {"weight": 0.5}
    assert r.models[1].label == "y"
    assert r.policy("vision") == Take(take="X")
    assert r.parameters == {"density": 0.4}


def test_load_recipe_errors_name_the_file(tmp_path):
    with pytest.raises(OmnimergeError, match="cannot read the recipe"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed")
    with pytest.raises(OmnimergeError, match="not valid YAML") as e:
        load_recipe(bad)
    assert str(bad) in str(e.value)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(OmnimergeError, match="must be a mapping") as e:
        load_recipe(lst)
    assert str(lst) in str(e.value)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump({**MIN, "dtype": "int8"}))
    with pytest.raises(OmnimergeError) as e:
        load_recipe(wrong)
    assert str(wrong) in str(e.value) and "dtype" in str(e.value)


# --- sizes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,n", [
    ("500MB", 500_000_000), ("2GiB", 2 * 1024**3), ("1.5GB", 1_500_000_000), ("5GB", 5 * 10**9),
    ("5gb", 5 * 10**9), ("64KiB", 65536), ("1TB", 10**12), ("10KB", 10_000), ("123", 123), ("7B", 7),
    (" 3 MB ", 3_000_000), (4096, 4096), (1, 1),
])
def test_parse_size(text, n):
    assert parse_size(text) == n
    assert recipe(shard_size=text).shard_bytes == n


@pytest.mark.parametrize("text", ["0", 0, -5, "five", "5 XB", "", "1.5.0GB", "-1GB", "0.0001KB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)
    refused({**MIN, "shard_size": text}, "shard_size")


def test_parse_size_rejects_bool():
    with pytest.raises(ValueError):
        parse_size(True)


# --- per-model parameters and filters ------------------------------------------------------------
def test_per_model_parameters():
    r = recipe(models=[
        {"path": "a", "weight": 0.3, "flag": True, "mode": "x"},
        {"path": "b", "name": "B", "density": [{"filter": "mlp", "value": 0.5}, {"value": 0.2}]},
        {"path": "c", "lora_base": "base-folder"},
    ])
    a, b, c = r.models
    assert a.parameters == {"weight": 0.3, "flag": True, "mode": "x"}
    assert b.label == "B" and set(b.parameters) == {"density"}
    assert b.parameters["density"] == [FilteredValue(filter="mlp", value=0.5), FilteredValue(value=0.2)]
    assert c.parameters == {} and c.lora_base == "base-folder"  # lora_base is not a method parameter


def test_global_filtered_parameters():
    r = recipe(parameters={"lambda": [{"filter": r"layers\.0\.", "value": 0.0}, {"value": 1.0}], "density": 0.5})
    assert r.parameters["density"] == 0.5
    assert r.parameters["lambda"] == [FilteredValue(filter=r"layers\.0\.", value=0.0), FilteredValue(value=1.0)]


def test_pick_semantics():
    entries = [FilteredValue(filter="mlp", value=1), FilteredValue(filter="layers", value=2),
               FilteredValue(value=3), FilteredValue(filter="attn", value=4)]
    assert pick(entries, "language.layers.0.mlp.up_proj.weight") == 1  # first match wins, not the most specific
    assert pick(entries, "language.layers.0.self_attn.q_proj.weight") == 2
    assert pick(entries, "vision.blocks.0.attn.qkv.weight") == 3  # no filter matches everything; 'attn' never reached
    assert pick([FilteredValue(filter="mlp", value=1)], "embed.weight") is None
    assert pick([], "embed.weight") is None
    assert pick(0.7, "anything") == 0.7
    assert pick(False, "anything") is False
    # re.search, not re.match: a filter may match anywhere; anchors work
    assert pick([FilteredValue(filter="up_proj", value=5)], "language.layers.1.mlp.up_proj.weight") == 5
    assert pick([FilteredValue(filter="^mlp", value=5)], "language.layers.1.mlp.up_proj.weight") is None
    # a filtered value of 0 / False is a value, not "no match"
    assert pick([FilteredValue(filter="mlp", value=0.0), FilteredValue(value=9.0)], "x.mlp") == 0.0


# --- component policies -------------------------------------------------------------------------
def test_component_policies():
    r = recipe(components={
        "language": "keep", "embed": "merge", "vision": {"take": "B"},
        "projector": {"method": "ties", "parameters": {"density": [{"filter": "linear_1", "value": 0.5}], "lambda": 2}},
    })
    assert r.policy("language") == "keep"
    assert r.policy("embed") == "merge"
    assert r.policy("vision") == Take(take="B")
    pol = r.policy("projector")
    assert isinstance(pol, ComponentMethod) and pol.method == "ties"
    assert pol.parameters["lambda"] == 2
    assert pol.parameters["density"] == [FilteredValue(filter="linear_1", value=0.5)]
    assert r.policy("lm_head") == "keep" and r.policy("audio") == "keep" and r.policy("other") == "keep"
    assert recipe(components={"audio": {"method": "average"}}).policy("audio") == ComponentMethod(method="average")


# --- errors name the field ----------------------------------------------------------------------
def test_unknown_top_level_field():
    refused({**MIN, "colour": 1}, "colour", "Extra inputs")


def test_missing_method_and_path():
    refused({"models": [{"path": "a"}]}, "method", "Field required")
    refused({"method": "ties", "models": [{"name": "x"}]}, "models.0.path")


def test_empty_models():
    refused({"method": "ties", "models": []}, "models", "at least 1")
    refused({"method": "ties"}, "models")


@pytest.mark.parametrize("field,value", [("dtype", "float8"), ("dtype", "int8"), ("out_dtype", "fp16")])
def test_bad_dtype(field, value):
    refused({**MIN, field: value}, field, "float32")


def test_bad_component_name():
    refused({**MIN, "components": {"visoin": "keep"}}, "components.visoin", "vision")


@pytest.mark.parametrize("policy", ["drop", {"take": "a", "extra": 1}, {"parameters": {}}, 3])
def test_bad_policy(policy):
    refused({**MIN, "components": {"vision": policy}}, "components.vision")


def test_filter_regex_that_does_not_compile():
    refused({**MIN, "parameters": {"density": [{"filter": "(", "value": 0.1}]}},
            "parameters.density", "invalid regular expression '('")
    refused({**MIN, "components": {"vision": {"method": "ties", "parameters": {"p": [{"filter": "[", "value": 0.1}]}}}},
            "components.vision", "parameters.p", "invalid regular expression '['")
    # per model: the message names the model entry and the parameter
    refused({**MIN, "models": [{"path": "a", "density": [{"filter": "(", "value": 0.1}]}]},
            "models.0", "'density'", "'('")


def test_bad_parameter_values():
    refused({**MIN, "parameters": {"density": [{"filtre": "mlp", "value": 0.1}]}}, "parameters.density", "filtre")
    refused({**MIN, "parameters": {"density": {"a": 1}}}, "parameters.density")
    refused({**MIN, "models": [{"path": "a", "weight": {"a": 1}}]}, "models.0", "'weight'")
    refused({**MIN, "seed": "abc"}, "seed")


def test_not_a_mapping():
    with pytest.raises(OmnimergeError, match="must be a mapping"):
        parse_recipe(["method", "ties"])


# --- parameter precedence -----------------------------------------------------------------------
UP = "language.layers.0.mlp.up_proj.weight"
Q = "language.layers.1.self_attn.q_proj.weight"
V = "vision.blocks.0.attn.qkv.weight"


def fv(*pairs):
    return [FilteredValue(filter=f, value=v) for f, v in pairs]


def test_resolve_params_defaults():
    ties = get_method("ties")
    entries = recipe(models=[{"path": "a"}, {"path": "b"}]).models
    got = resolve_params(ties, UP, entries, {}, {})
    assert got == {"density": [0.2, 0.2], "weight": [1.0, 1.0], "lambda": 1.0, "normalize": True, "rescale": "none",
                   "trim": "global"}


def test_resolve_params_precedence_per_filter():
    ties = get_method("ties")
    entries = recipe(models=[
        {"path": "a", "density": [{"filter": "mlp", "value": 0.9}]},
        {"path": "b", "weight": 3.0},
        {"path": "c", "density": 0.7, "weight": [{"filter": "self_attn", "value": 0.25}]},
    ]).models
    component = {"density": fv(("attn", 0.5)), "lambda": fv(("layers\\.1\\.", 4.0))}
    glob = {"density": 0.3, "lambda": fv(("layers\\.0\\.", 2.0)), "weight": fv(("vision", 0.1))}

    got = resolve_params(ties, UP, entries, component, glob)
    # a: its own filter matches; b: component filter 'attn' misses -> recipe 0.3; c: its scalar
    assert got["density"] == [0.9, 0.3, 0.7]
    assert got["weight"] == [1.0, 3.0, 1.0]  # recipe 'vision' filter misses -> default; b per model
    assert got["lambda"] == 2.0  # component filter misses -> recipe filter

    got = resolve_params(ties, Q, entries, component, glob)
    assert got["density"] == [0.5, 0.5, 0.7]  # a's 'mlp' misses -> component 'attn' beats recipe 0.3
    assert got["weight"] == [1.0, 3.0, 0.25]
    assert got["lambda"] == 4.0  # component beats recipe

    got = resolve_params(ties, V, entries, component, glob)
    assert got["density"] == [0.5, 0.5, 0.7]
    assert got["weight"] == [0.1, 3.0, 0.1]  # recipe filter 'vision' matches; c's 'self_attn' misses
    assert got["lambda"] == 1.0  # nothing matches -> default

    # component scalar beats recipe scalar; recipe applies where the component says nothing
    got = resolve_params(ties, UP, entries[1:2], {"density": 0.6}, {"density": 0.3, "lambda": 0.5})
    assert got == {"density": [0.6], "weight": [3.0], "lambda": 0.5, "normalize": True, "rescale": "none",
                   "trim": "global"}


def test_resolve_params_validates_the_chosen_value():
    ties = get_method("ties")
    entries = recipe(models=[{"path": "a", "name": "expert-A", "density": [{"filter": "mlp", "value": 1.5}]}]).models
    assert resolve_params(ties, Q, entries, {}, {})["density"] == [0.2]  # the bad value is not picked here
    with pytest.raises(OmnimergeError, match="expert-A.*density"):
        resolve_params(ties, UP, entries, {}, {})
    with pytest.raises(OmnimergeError, match="lambda"):
        resolve_params(ties, UP, entries[:0], {}, {"lambda": "big"})


def test_resolve_params_types_are_coerced():
    ta = get_method("task_arithmetic")
    entries = recipe(models=[{"path": "a", "weight": 2}]).models
    got = resolve_params(ta, UP, entries, {}, {"lambda": 1})
    assert got == {"weight": [2.0], "lambda": 1.0, "rank": "full", "normalize": False}
    assert isinstance(got["weight"][0], float) and isinstance(got["lambda"], float)


# --- per-tensor seeds ---------------------------------------------------------------------------
def test_tensor_seed():
    assert tensor_seed(0, UP) == tensor_seed(0, UP)
    seeds = {tensor_seed(s, k) for s in range(4) for k in (UP, Q, V, "embed.weight", "lm_head.weight")}
    assert len(seeds) == 20
    assert all(0 <= s < 2**63 for s in seeds)
    assert tensor_seed(1, UP) != tensor_seed(0, UP)
    # no ambiguity between the seed and the key: (1, "2x") != (12, "x")
    assert tensor_seed(1, "2x") != tensor_seed(12, "x")


# --- hostile values -------------------------------------------------------------------------------
@pytest.mark.parametrize("where,data", [
    ("models[1].weight", {"models": [{"path": "a"}, {"path": "b", "weight": 1.0e308}]}),
    ("models[0].weight", {"models": [{"path": "a", "weight": -3.5e38}]}),
    ("parameters.lambda", {"parameters": {"lambda": 1e39}}),
    ("parameters.density[1].value", {"parameters": {"density": [{"filter": "x", "value": 0.5}, {"value": 1e300}]}}),
    ("components.vision.parameters.density", {"components": {"vision": {"method": "ties",
                                                                        "parameters": {"density": 1e40}}}}),
    ("models[0].weight", {"models": [{"path": "a", "weight": 1e-300}]}),
    ("models[0].weight", {"models": [{"path": "a", "weight": 70000.0}]}, ),
])
def test_values_that_overflow_the_compute_dtype(where, data):
    data = {"method": "ties", "models": [{"path": "a"}]} | data
    if data["models"][0].get("weight") == 70000.0:
        data["dtype"] = "float16"
        assert recipe(models=[{"path": "a", "weight": 70000.0}]).models  # fine in float32
    msg = refused(data, where)
    assert "overflows" in msg or "rounds to 0" in msg
    assert "use" in msg  # the fix


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 2**64, -(2**70)])
def test_values_that_are_not_finite_or_too_long(value):
    msg = refused({"method": "ties", "models": [{"path": "a", "weight": value}]}, "models[0].weight")
    assert "finite" in msg or "64 bits" in msg


def test_float64_compute_takes_large_values():
    r = recipe(models=[{"path": "a", "weight": 1e300}], dtype="float64")
    assert r.models[0].parameters["weight"] == 1e300


def test_yaml_infinity_and_huge_numbers(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("method: ties\nmodels:\n  - path: a\n    weight: .inf\n  - path: b\n    weight: 1.0e+308\n")
    with pytest.raises(OmnimergeError, match=r"models\[0\].weight = inf is not a finite number"):
        load_recipe(p)


def test_the_same_model_twice(tmp_path):
    for paths in (["a", "a"], ["m/x", "./m/x/"], ["org/name", "org/name"]):
        msg = refused({"method": "average", "models": [{"path": p} for p in paths]}, "models[1]",
                      "same model as models[0]", "allow_duplicate_models: true")
    r = recipe(method="average", models=[{"path": "a"}, {"path": "a"}], allow_duplicate_models=True)
    assert len(r.models) == 2
    assert r.model_dump(exclude_none=True)["allow_duplicate_models"] is True  # recorded in omnimerge.yaml
    assert "allow_duplicate_models" not in recipe().model_dump(exclude_none=True)  # and only when set


def test_two_models_with_one_name():
    refused({"method": "average", "models": [{"path": "a", "name": "x"}, {"path": "b", "name": "x"}]},
            "models[1].name 'x'")


def test_recipe_that_is_not_utf8(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_bytes("method: ties\nmodels:\n  - path: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(OmnimergeError, match=r"not UTF-8 text \(byte 0xe9 at offset \d+\); save the recipe as UTF-8"):
        load_recipe(p)
    p.write_bytes(b"\xef\xbb\xbfmethod: average\nmodels:\n  - path: a\n")  # a BOM is fine
    assert load_recipe(p).method == "average"


def test_recipe_that_is_a_folder_or_binary(tmp_path):
    with pytest.raises(OmnimergeError, match="is a folder"):
        load_recipe(tmp_path)
    (tmp_path / "r.yaml").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(OmnimergeError, match="r.yaml"):
        load_recipe(tmp_path / "r.yaml")


@pytest.mark.parametrize("size", ["9" * 400 + "GB", 2**70, "1e400"])
def test_shard_size_that_overflows(size):
    refused({"method": "ties", "models": [{"path": "a"}], "shard_size": size}, "shard_size")
