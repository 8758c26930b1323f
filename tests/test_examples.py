"""Every recipe in examples/ runs end to end: its hub ids and paths are rewritten to tiny checkpoints of
the same architectures, `omnimerge merge` runs it, and each output is loaded, run and checked against
the method's definition (computed here from the raw files)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from omnimerge import load_recipe
from omnimerge.cli import main
from omnimerge.methods import MethodContext, get_method
from omnimerge.methods.ranks import knee
from omnimerge.plan import tensor_seed
from omnimerge.verify import verify

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def close_bf16(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal up to one bfloat16 rounding of a float32 result (2^-8 relative)."""
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-6)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


# Per example: every model reference in it -> the tiny stand-in (the same architecture family).
STAND_INS = {
    "yoyo-asdf.yaml": {
        "Qwen/Qwen3-4B-Instruct-2507": lambda z: z.base("qwen3"),
        "Qwen/Qwen3-VL-4B-Instruct": lambda z: z.on_backbone("qwen3_vl", "qwen3"),
    },
    "viscodex.yaml": {
        "Qwen/Qwen2.5-7B": lambda z: z.base("qwen2"),
        "Qwen/Qwen2.5-VL-7B-Instruct": lambda z: z.on_backbone("qwen2_5_vl", "qwen2"),
        "nvidia/OpenCodeReasoning-Nemotron-1.1-7B": lambda z: z.expert("qwen2", 1),
    },
    "five-experts.yaml": {
        "Qwen/Qwen2-VL-7B-Instruct": lambda z: z.base("qwen2_vl"),
        **{f"./experts/qwen2-vl-7b-{task}": (lambda i: lambda z: z.expert("qwen2_vl", i))(i)
           for i, task in enumerate(["vqa", "geometry", "chart", "ocr", "grounding"], 1)},
    },
    "demo-ties.yaml": {
        "../omnimerge-demo/qwen2-vl-base": lambda z: z.base("qwen2_vl"),
        **{f"../omnimerge-demo/qwen2-vl-expert{i}": (lambda i: lambda z: z.expert("qwen2_vl", i))(i) for i in (1, 2, 3)},
    },
    "modality.yaml": {
        "Qwen/Qwen2-7B-Instruct": lambda z: z.base("qwen2"),
        "Qwen/Qwen2-VL-7B-Instruct": lambda z: z.on_backbone("qwen2_vl", "qwen2"),
        "llava-hf/llava-onevision-qwen2-7b-ov-hf": lambda z: z.on_backbone("llava_onevision", "qwen2"),
        "./qwen2-7b-audio-instruct": lambda z: z.on_backbone("qwen2_audio", "qwen2"),
    },
}


def references(recipe: dict) -> set[str]:
    """Every model path in a recipe (model names in `skeletons:` are not paths)."""
    names = {m.get("name") for m in recipe["models"]}
    refs = {m["path"] for m in recipe["models"]} | {recipe[k] for k in ("base", "skeleton", "tokenizer_source")
                                                     if recipe.get(k)}
    return refs | {s for s in recipe.get("skeletons", []) if s not in names}


def run_example(name: str, zoo, tmp_path: Path) -> tuple[dict, dict[str, Path], Path]:
    """Rewrite the example's references to tiny checkpoints, merge it with the CLI; (recipe, paths, OUT)."""
    text = (EXAMPLES / name).read_text()
    recipe = yaml.safe_load(text)
    assert references(recipe) == set(STAND_INS[name]), "the test covers every model of the example"
    paths = {ref: make(zoo) for ref, make in STAND_INS[name].items()}

    def swap(v):
        return str(paths[v]) if isinstance(v, str) and v in paths else v

    recipe["models"] = [{**m, "path": swap(m["path"])} for m in recipe["models"]]
    for k in ("base", "skeleton", "tokenizer_source"):
        if k in recipe:
            recipe[k] = swap(recipe[k])
    if "skeletons" in recipe:
        recipe["skeletons"] = [swap(s) for s in recipe["skeletons"]]
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / "out"
    assert main(["merge", str(path), "-o", str(out)]) == 0
    return recipe, paths, out


def test_every_example_is_tested_and_documented():
    files = sorted(p.name for p in EXAMPLES.glob("*.yaml"))
    assert files == sorted(STAND_INS)
    readme = (EXAMPLES / "README.md").read_text()
    for f in files:
        assert f in readme, f
        load_recipe(EXAMPLES / f)  # a valid recipe as written
        assert (EXAMPLES / f).read_text().startswith("#"), "explained in comments"


def test_yoyo_asdf(zoo, tmp_path):
    _, p, out = run_example("yoyo-asdf.yaml", zoo, tmp_path)
    text, vlm = p["Qwen/Qwen3-4B-Instruct-2507"], p["Qwen/Qwen3-VL-4B-Instruct"]
    res = verify(out)
    assert res.ok and "image forward" in [c.name for c in res.checks], res.checks
    got, t, v = weights(out), weights(text), weights(vlm)
    assert set(got) == set(v) and all(x.dtype == torch.bfloat16 for x in got.values())
    dec = "model.language_model."
    n = 0
    for key, x in got.items():
        if key.startswith(dec + "layers.") and v[key].ndim == 2:
            tk = "model." + key[len(dec):]
            u, s, vh = torch.linalg.svd((v[key] - t[tk]).double(), full_matrices=False)
            k = knee(s)
            close_bf16(x, t[tk].double() + (u[:, :k] * s[:k]) @ vh[:k])
            n += 1
        else:  # 1-D tensors, vision, projector, embed, lm_head: V's
            assert torch.equal(x, v[key].to(torch.bfloat16)), key
    assert n == 2 * 7  # q, k, v, o, gate, up, down per layer


def test_viscodex_code_injection(zoo, tmp_path):
    _, p, out = run_example("viscodex.yaml", zoo, tmp_path)
    base, vlm, code = (weights(p[k]) for k in ("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-VL-7B-Instruct",
                                               "nvidia/OpenCodeReasoning-Nemotron-1.1-7B"))
    res = verify(out)
    assert res.ok and "image forward" in [c.name for c in res.checks], res.checks
    got, lam = weights(out), 0.7
    n = 0
    for key, x in got.items():
        if key.startswith(("model.layers.", "model.norm.")):  # the hub layout of Qwen2.5-VL and Qwen2
            want = base[key] + lam * (vlm[key] - base[key]) + (1 - lam) * (code[key] - base[key])
            close_bf16(x, want)
            n += 1
        else:
            assert torch.equal(x, vlm[key].to(torch.bfloat16)), key  # vision, merger, embed, lm_head: the VLM's
    assert n == 2 * 12 + 1


def test_five_expert_capability_merge(zoo, tmp_path):
    recipe, p, out = run_example("five-experts.yaml", zoo, tmp_path)
    res = verify(out)
    assert res.ok, res.checks
    base = weights(p["Qwen/Qwen2-VL-7B-Instruct"])
    experts = [weights(Path(m["path"])) for m in recipe["models"]]
    got = weights(out)
    method = get_method("iso_cts")
    params = {q.name: q.default for q in method.params} | {"common_fraction": 0.8, "alpha": 1.0}
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        canonical = "language." + key[len("model."):]
        gen = torch.Generator().manual_seed(tensor_seed(0, canonical))
        want = method(base[key], [e[key] for e in experts], MethodContext(canonical, gen), **params)
        assert not torch.equal(want, base[key])
        close_bf16(got[key], want)
    assert all(torch.equal(got[k], base[k].to(torch.bfloat16)) for k in got if k.startswith("visual."))


def test_modality_merge(zoo, tmp_path):
    recipe, p, out = run_example("modality.yaml", zoo, tmp_path)
    assert sorted(x.name for x in out.iterdir()) == ["audio", "video", "vision"]
    base = weights(p["Qwen/Qwen2-7B-Instruct"])
    src = {m["name"]: Path(m["path"]) for m in recipe["models"]}
    decoder = {"vision": "model.", "video": "language_model.model.", "audio": "language_model.model."}
    experts = {label: weights(src[label]) for label in decoder}
    key = "layers.1.self_attn.o_proj.weight"
    want = base["model." + key] + 0.5 * sum(experts[label][decoder[label] + key] - base["model." + key]
                                            for label in decoder)
    for label, fam_check in (("vision", "image forward"), ("video", "image forward"), ("audio", "audio forward")):
        res = verify(out / label)
        assert res.ok and fam_check in [c.name for c in res.checks], (label, res.checks)
        got = weights(out / label)
        assert set(got) == set(experts[label])
        close_bf16(got[decoder[label] + key], want)
        assert (out / label / "config.json").is_file() and (out / label / "tokenizer.json").is_file()


def test_demo_example_runs_as_shipped(tmp_path):
    """examples/demo-ties.yaml, unchanged, on the models `omnimerge demo` builds beside examples/."""
    import shutil

    from omnimerge.demo import build_demo_models

    base, experts, _ = build_demo_models(tmp_path / "omnimerge-demo")
    (tmp_path / "examples").mkdir()
    shutil.copy(EXAMPLES / "demo-ties.yaml", tmp_path / "examples" / "demo-ties.yaml")
    out = tmp_path / "merged-demo"
    assert main(["merge", str(tmp_path / "examples" / "demo-ties.yaml"), "-o", str(out)]) == 0
    assert verify(out).ok
    key = "model.layers.0.self_attn.q_proj.weight"
    b, got = weights(base), weights(out)
    assert not torch.equal(got[key], b[key])                       # the language backbone merged
    assert all(torch.equal(got[k], b[k]) for k in got if k.startswith("visual."))
