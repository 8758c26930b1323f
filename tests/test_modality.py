"""Modality merging: one recipe, several skeletons (vision, audio and video LLMs on one Qwen2 base LLM),
one output per skeleton, each loaded and run by transformers; the language backbone merged once."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import omnimerge
from omnimerge.api import write_plan
from omnimerge.plan import build_plans
from omnimerge.run.outputs import skeletons
from omnimerge.cli import main
from omnimerge.tiny import build_tiny, make_expert
from omnimerge.verify import verify
from conftest import leftovers
from layouts import DECODER, HEAD  # the tests' own reading of the tiny checkpoints' keys

EXPERTS = {"vision": "qwen2_vl", "audio": "qwen2_audio", "video": "llava_onevision"}


def weights(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def language_tail(family: str, key: str) -> str | None:
    """'layers.0.mlp.up_proj.weight' / 'norm.weight' for a language-backbone key, else None."""
    p = DECODER[family]
    if key.startswith((p + "layers.", p + "norm.")):
        return key[len(p):]
    return None


@pytest.fixture(scope="module")
def family(zoo):
    """The base LLM and three experts trained from it, each with its own encoder family."""
    return {"base": zoo.base("qwen2"), **{label: zoo.on_backbone(f, "qwen2") for label, f in EXPERTS.items()}}


def recipe_for(family, **extra):
    return {"method": "task_arithmetic", "base": str(family["base"]), "parameters": {"lambda": 0.8},
            "models": [{"path": str(family[label]), "name": label, "weight": w}
                       for label, w in (("vision", 0.5), ("audio", 0.3), ("video", 0.2))],
            "skeletons": ["vision", "audio", "video"], **extra}


def test_one_output_per_skeleton_each_loads_and_runs(family, tmp_path, monkeypatch):
    computed, real = [], skeletons.compute

    def counting(plan, job, *args):
        computed.append(job.canonical)
        return real(plan, job, *args)

    monkeypatch.setattr(skeletons, "compute", counting)
    out = tmp_path / "out"
    results = omnimerge.merge(recipe_for(family), out)

    assert list(results) == ["vision", "audio", "video"]
    assert sorted(p.name for p in out.iterdir()) == ["audio", "video", "vision"]
    assert leftovers(tmp_path) == []
    b = weights(family["base"])
    experts = {label: weights(family[label]) for label in EXPERTS}
    merged_lang = {}
    for label, fam in EXPERTS.items():
        folder = out / label
        assert results[label].out == folder
        res = verify(folder)  # load with its own class, text forward, image/audio forward, kept bytes
        assert res.ok, res.checks
        names = [c.name for c in res.checks]
        assert ("audio forward" if fam == "qwen2_audio" else "image forward") in names
        got = weights(folder)
        assert set(got) == set(experts[label]), "exactly the skeleton's tensors, under its names"
        n_lang = 0
        for key, t in got.items():
            tail = language_tail(fam, key)
            if tail is None:  # encoders, projector, embeddings, head: the skeleton's bytes
                assert torch.equal(t, experts[label][key]), (label, key)
                continue
            bk = DECODER["qwen2"] + tail
            want = b[bk] + 0.8 * sum(w * (experts[e][DECODER[EXPERTS[e]] + tail] - b[bk])
                                     for e, w in (("vision", 0.5), ("audio", 0.3), ("video", 0.2)))
            torch.testing.assert_close(t, want, rtol=1e-6, atol=1e-6)
            merged_lang.setdefault(tail, []).append(t)
            n_lang += 1
        assert n_lang == 2 * 12 + 1  # 2 layers of 12 tensors (q/k/v with biases), the final norm
        for name in ("config.json", "tokenizer.json", "chat_template.jinja"):
            assert (folder / name).read_bytes() == (family[label] / name).read_bytes(), (label, name)
        skel_files = {p.name for p in family[label].iterdir() if p.suffix != ".safetensors"}
        assert skel_files <= {p.name for p in folder.iterdir()}, "processor files of its own"
        report = json.loads((folder / "report.json").read_text())
        assert report["modality_merge"] == {"outputs": {k: str(family[k]) for k in EXPERTS}, "shared_tensors": 25}
        assert omnimerge.load_recipe(folder / "omnimerge.yaml").skeleton == str(family[label])
    assert all(torch.equal(ts[0], t) for ts in merged_lang.values() for t in ts[1:]), "one backbone for all"
    merges = [c for c in computed if c.startswith("language.")]
    assert len(merges) == len(set(merges)) == 25, "each language tensor computed once, not once per output"
    assert (out / "audio" / "preprocessor_config.json").read_bytes() == \
        (family["audio"] / "preprocessor_config.json").read_bytes()


def test_each_output_equals_its_single_skeleton_merge(family, tmp_path):
    """Outputs of different dtypes (no out_dtype): each is byte-identical to merging its own recipe alone."""
    raw = build_tiny("qwen2_audio", tmp_path / "raw", seed=3, backbone=family["base"], dtype=torch.bfloat16)
    half = make_expert(raw, tmp_path / "audio-bf16", seed=5, scale=0.02)
    recipe = {"method": "ties", "base": str(family["base"]), "parameters": {"density": 0.5},
              "models": [{"path": str(family["vision"])}, {"path": str(half)}],
              "skeletons": [str(family["vision"]), str(half)]}
    out = tmp_path / "out"
    results = omnimerge.merge(recipe, out)
    assert list(results) == [family["vision"].name, half.name]
    for label, r in results.items():
        alone = tmp_path / f"alone-{label}"
        omnimerge.merge(r.out / "omnimerge.yaml", alone)
        a, b = weights(r.out), weights(alone)
        assert a.keys() == b.keys()
        assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), label
    lang = "language_model.model.layers.0.mlp.up_proj.weight"
    assert weights(out / half.name)[lang].dtype == torch.bfloat16
    assert weights(out / family["vision"].name)["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32


def test_interrupted_or_refused_leaves_old_output(family, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "omnimerge.yaml").write_text("method: average\nmodels:\n- path: old\n")  # an earlier omnimerge output
    with pytest.raises(omnimerge.OmnimergeError, match="--force"):
        omnimerge.merge(recipe_for(family), out)
    plans = build_plans(recipe_for(family))
    seen = []

    def stop(job):
        seen.append(job)
        if len(seen) == 30:  # past the 25 shared backbone tensors, into the first output's own
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_plan(plans, out, force=True, on_tensor=stop)
    assert [p.name for p in out.iterdir()] == ["omnimerge.yaml"] and leftovers(tmp_path) == []
    omnimerge.merge(recipe_for(family), out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["audio", "video", "vision"]


def test_plan_time_errors(zoo, family, tmp_path):
    out = tmp_path / "out"
    other = zoo.base("qwen2_vl", hidden_size=128)
    with pytest.raises(omnimerge.OmnimergeError) as e:
        omnimerge.merge(recipe_for(family, skeletons=["vision", str(other)]), out)
    msg = str(e.value)
    assert "the shape of 'language.layers.0." in msg and str(family["vision"]) in msg and str(other) in msg
    deeper = zoo.base("qwen2_audio", num_layers=3)
    with pytest.raises(omnimerge.OmnimergeError, match="3 decoder layers.*has 2"):
        omnimerge.merge(recipe_for(family, skeletons=["vision", str(deeper)]), out)
    with pytest.raises(omnimerge.OmnimergeError, match="not both"):
        omnimerge.merge(recipe_for(family, skeleton="vision"), out)
    with pytest.raises(omnimerge.OmnimergeError, match="more than once"):
        omnimerge.merge(recipe_for(family, skeletons=["vision", "vision"]), out)
    with pytest.raises(omnimerge.OmnimergeError, match="both be written to OUT/vision"):
        omnimerge.merge(recipe_for(family, skeletons=["vision", str(family["vision"])]), out)
    assert not out.exists()


def test_cli_dry_run_and_merge(family, tmp_path, capsys):
    path = tmp_path / "modality.yaml"
    path.write_text(yaml.safe_dump(recipe_for(family)))
    assert main(["merge", str(path), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert all(f"{label}/:" in text for label in EXPERTS)
    out = tmp_path / "out"
    assert main(["merge", str(path), "-o", str(out)]) == 0
    assert capsys.readouterr().out.count("wrote ") == 3
    assert all(verify(out / label).ok for label in ("audio",))
