"""RegMean++ and Expert Merging: statistics taken through the merged model, on tiny Qwen2-VLs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from omnimerge.calibration import CalibrationSettings, load_samples
from omnimerge.calibration.collect import load_model, load_renderer, render_batches
from omnimerge.errors import OmnimergeError

Q = "language.layers.{}.self_attn.q_proj.weight"


def _vlm(folder, layers: int):
    from omnimerge.bench.model import BenchConfig, build_base_model, build_processor, save_checkpoint

    cfg = dataclasses.replace(BenchConfig.quick(), num_layers=layers)
    save_checkpoint(build_base_model(cfg, seed=3), folder, build_processor(cfg))
    return folder


def _experts(vlm, root, scale=0.05):
    from omnimerge.tiny import make_expert

    return [make_expert(vlm, root / f"e{i}", seed=i, scale=scale) for i in (1, 2)]


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("calib")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "red.png")
    rows = [{"text": "what colour is the square?", "image": "red.png"}, {"text": "name a colour"},
            {"text": "count to three"}, {"text": "describe the scene", "image": "red.png"}]
    path = folder / "calib.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    vlm = _vlm(root / "base", 2)
    return vlm, _experts(vlm, root)


def _recipe(method, vlm, experts, calib, **extra):
    return {"method": method, "base": str(vlm), "skeleton": str(vlm), "seed": 1,
            "models": [{"path": str(e), "calibration": str(calib)} for e in experts],
            "calibration": {"samples": 4, "batch_size": 2}, **extra}


def _load(folder):
    import transformers

    return transformers.Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()


def _weight(model, key):
    layer, name = key.split(".")[2], key.split(".", 3)[3].rsplit(".", 1)[0]
    return model.get_decoder().layers[int(layer)].get_submodule(name).weight.detach().double()


# -------------------------------------------------------------------------------------------- RegMean++

def test_regmean_plusplus_equals_regmean_on_one_layer(tmp_path, calib, monkeypatch):
    """One decoder layer: its inputs are the embeddings, which the merged model and every expert share, so
    RegMean++'s Grams are RegMean's and so is the merge (at the same alpha)."""
    import omnimerge

    monkeypatch.setenv("OMNIMERGE_CACHE", str(tmp_path / "cache"))
    vlm = _vlm(tmp_path / "base", 1)
    experts = _experts(vlm, tmp_path)
    params = {"parameters": {"alpha": 0.9}}
    omnimerge.merge(_recipe("regmean", vlm, experts, calib, **params), tmp_path / "rm", progress=False)
    omnimerge.merge(_recipe("regmean_plusplus", vlm, experts, calib, **params), tmp_path / "pp", progress=False)
    a, b = _load(tmp_path / "rm"), _load(tmp_path / "pp")
    for (name, x), (_, y) in zip(a.get_decoder().layers.named_parameters(), b.get_decoder().layers.named_parameters()):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=name)
    report = json.loads((tmp_path / "pp" / "report.json").read_text())
    assert "regmean_plusplus" in json.dumps(report)


def test_regmean_plusplus_takes_layer_inputs_from_the_merged_model(two_layers, tmp_path, calib, monkeypatch):
    """Two layers, by hand: model i's Grams of layer 1 are those of its own layer 1 run on the hidden states
    that the *merged* layer 0 gives its samples; the merged layer 1 is RegMean's closed form on them, and
    differs from RegMean's (whose layer-1 inputs come from each expert's own layer 0)."""
    import omnimerge
    from omnimerge.methods.data_aware import regmean_solve

    vlm, experts = two_layers
    monkeypatch.setenv("OMNIMERGE_CACHE", str(tmp_path / "cache"))
    recipe = _recipe("regmean_plusplus", vlm, experts, calib)
    omnimerge.merge(recipe, tmp_path / "pp", progress=False)
    omnimerge.merge(_recipe("regmean", vlm, experts, calib, parameters={"alpha": 0.95}), tmp_path / "rm",
                    progress=False)
    merged = _load(tmp_path / "pp")
    batches = render_batches(load_renderer(vlm, vision=True), load_samples(calib, limit=4),
                             CalibrationSettings(samples=4, batch_size=2))
    grams_q, grams_down = [], []
    for e in experts:
        expert = _load(e)
        # the expert's layer 0 replaced by the merged one: its layer 1 then sees the merged model's inputs
        expert.get_decoder().layers[0].load_state_dict(merged.get_decoder().layers[0].state_dict())
        xs_q, xs_down = [], []
        layer1 = expert.get_decoder().layers[1]
        seen = []
        handle = layer1.mlp.down_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        with torch.no_grad():
            for b in batches:
                seen.clear()
                out = expert(**b, output_hidden_states=True, use_cache=False)
                mask = b["attention_mask"].bool()
                xs_q.append(layer1.input_layernorm(out.hidden_states[1])[mask].double())
                xs_down.append(seen[0][mask].double())
        handle.remove()
        xq, xd = torch.cat(xs_q), torch.cat(xs_down)
        grams_q.append(xq.T @ xq / len(xq))
        grams_down.append(xd.T @ xd / len(xd))
    ws = [_weight(_load(e), Q.format(1)) for e in experts]
    want = regmean_solve(ws, grams_q, 0.95)
    got = _weight(merged, Q.format(1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    down = "language.layers.1.mlp.down_proj.weight"
    want_down = regmean_solve([_weight(_load(e), down) for e in experts], grams_down, 0.95)
    torch.testing.assert_close(_weight(merged, down), want_down, rtol=1e-5, atol=1e-6)
    # layer 0 is RegMean's; layer 1 is not
    plain = _load(tmp_path / "rm")
    torch.testing.assert_close(_weight(merged, Q.format(0)), _weight(plain, Q.format(0)), rtol=1e-5, atol=1e-6)
    assert (_weight(merged, Q.format(1)) - _weight(plain, Q.format(1))).abs().max() > 1e-5
    # cached: a second merge reuses the statistics and writes the same bytes
    files = sorted((tmp_path / "cache" / "stats").glob("stats-*"))
    omnimerge.merge(recipe, tmp_path / "again", progress=False)
    assert sorted((tmp_path / "cache" / "stats").glob("stats-*")) == files
    assert (tmp_path / "pp" / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()


# --------------------------------------------------------------------------------------- Expert Merging

def _toy(vlm, expert, calib, *, factor):
    """The base, one task vector `factor`·(expert − base), and the expert's own logits and hidden states."""
    from omnimerge.calibration.collect import canonical_parameters
    from omnimerge.calibration.expert_merging import expert_targets
    from omnimerge.checkpoints.checkpoint import load_checkpoint

    model = load_model(vlm)
    base_ck, exp_ck = load_checkpoint(str(vlm)), load_checkpoint(str(expert))
    keys = [k for k, p in canonical_parameters(model).items() if k.startswith("language.layers.") and p.dim() == 2]
    tv = {k: factor * (exp_ck.read(k).float() - base_ck.read(k).float()) for k in keys}
    batches = render_batches(load_renderer(vlm, vision=True), load_samples(calib, limit=4),
                             CalibrationSettings(batch_size=2))
    targets = [e["batch%d" % b] for b, (e, _) in enumerate(expert_targets(load_model(expert), batches, "2"))]
    return model, tv, batches, targets


def test_expert_merging_recovers_a_known_optimum(two_layers, calib):
    """The expert is θ_base + 0.5·(2τ): the merged model equals it at λ = 0.5, where its logits and hidden
    states match the expert's; with no regulariser, the coefficients go there from init 0.1."""
    from omnimerge.calibration.expert_merging import expert_objective, learn_expert_coefficients

    vlm, experts = two_layers
    model, tv, batches, targets = _toy(vlm, experts[0], calib, factor=2.0)
    trace = []
    lam = learn_expert_coefficients(model, [tv], [batches], [targets], granularity="task", init=0.1, lr=0.2,
                                    epochs=40, reg_weight=0.0, hidden_layers="2", trace=trace)
    got = next(iter(lam.values()))[0]
    assert all(v == [got] for v in lam.values())  # task-wise: one coefficient
    assert abs(got - 0.5) < 0.02, got
    assert trace[-1] < trace[0]  # (the cross-entropy's floor is the expert's own entropy, not 0)
    # the objective at the learned coefficients is below its value at init and at the neighbours of the optimum
    obj = lambda c: expert_objective(model, [tv], [batches], [targets], {k: [c] for k in lam}, reg_weight=0.0)
    assert obj(got) < obj(0.1) and obj(got) <= min(obj(got - 0.05), obj(got + 0.05))
    assert not any(p.requires_grad for p in model.parameters())


def test_expert_merging_lowers_its_objective_with_the_regulariser(two_layers, calib):
    """Tensor-wise coefficients at the reference's defaults (lr 0.5, reg_weight 5): the objective falls, and the
    regulariser keeps the coefficients nearer init than without it."""
    from omnimerge.calibration.expert_merging import expert_objective, learn_expert_coefficients

    vlm, experts = two_layers
    model, tv, batches, targets = _toy(vlm, experts[0], calib, factor=2.0)
    free = learn_expert_coefficients(model, [tv], [batches], [targets], epochs=10, reg_weight=0.0)
    held = learn_expert_coefficients(model, [tv], [batches], [targets], epochs=10, reg_weight=5.0)
    assert len(free) == len(tv)  # one coefficient per matrix (tensor-wise)
    start = {k: [0.1] for k in held}
    assert expert_objective(model, [tv], [batches], [targets], held) < expert_objective(model, [tv], [batches],
                                                                                        [targets], start)
    dist = lambda lam: sum(abs(v[0] - 0.1) for v in lam.values())
    assert dist(held) < dist(free)


def test_expert_merging_end_to_end(two_layers, tmp_path, calib, monkeypatch):
    """recipe -> plan -> targets cached per expert -> coefficients -> streaming merge -> transformers loads it;
    the learned coefficients are in report.json; a second merge reuses everything."""
    import omnimerge
    from omnimerge.verify import verify

    vlm, experts = two_layers
    monkeypatch.setenv("OMNIMERGE_CACHE", str(tmp_path / "cache"))
    recipe = _recipe("expert_merging", vlm, experts, calib, parameters={"epochs": 2, "hidden_layers": "1,2"})
    omnimerge.merge(recipe, tmp_path / "out", progress=False)
    assert verify(tmp_path / "out").ok
    rows = json.loads((tmp_path / "out" / "report.json").read_text())
    text = json.dumps(rows)
    assert "coefficients" in text
    merged, base = _load(tmp_path / "out"), _load(vlm)
    ws = [_load(e) for e in experts]
    # every merged matrix is θ_base + Σ λ_i τ_i with λ_i in (0, 1), not all at init
    lams = []
    for key in (Q.format(0), "language.layers.1.mlp.down_proj.weight"):
        taus = torch.stack([(_weight(w, key) - _weight(base, key)).flatten() for w in ws], 1)
        lam = torch.linalg.lstsq(taus, (_weight(merged, key) - _weight(base, key)).flatten()).solution
        assert ((lam > 0) & (lam < 1)).all()
        lams.append(lam)
    assert any((lam - 0.1).abs().max() > 1e-3 for lam in lams)
    files = sorted((tmp_path / "cache" / "stats").glob("stats-*"))
    assert len(files) == 4  # two experts' targets, two coefficient files
    omnimerge.merge(recipe, tmp_path / "again", progress=False)
    assert sorted((tmp_path / "cache" / "stats").glob("stats-*")) == files
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()


def test_hidden_layers_are_validated():
    from omnimerge.methods import get_method

    with pytest.raises(OmnimergeError, match="hidden_layers"):
        get_method("expert_merging").param("hidden_layers").validate("4,x", "parameters")
    assert get_method("expert_merging").param("hidden_layers").validate(" 4, 8", "parameters") == "4,8"


# ------------------------------------------------------------------------------ methods in one recipe

def test_adamerging_shares_a_recipe_with_regmean(two_layers, tmp_path, calib, monkeypatch):
    """AdaMerging on the language backbone, RegMean on the lm_head: both statistics are collected, each job gets
    its own method's."""
    import omnimerge

    vlm, experts = two_layers
    monkeypatch.setenv("OMNIMERGE_CACHE", str(tmp_path / "cache"))
    recipe = _recipe("adamerging", vlm, experts, calib, parameters={"steps": 2},
                     components={"lm_head": {"method": "regmean"}})
    omnimerge.merge(recipe, tmp_path / "out", progress=False)
    rows = json.loads((tmp_path / "out" / "report.json").read_text())
    text = json.dumps(rows)
    assert "coefficients" in text and '"regmean": "gram"' in text


def test_two_methods_learned_through_the_merged_model_are_refused(two_layers, tmp_path, calib, monkeypatch):
    import omnimerge

    vlm, experts = two_layers
    monkeypatch.setenv("OMNIMERGE_CACHE", str(tmp_path / "cache"))
    recipe = _recipe("adamerging", vlm, experts, calib, components={"lm_head": {"method": "regmean_plusplus"}})
    with pytest.raises(OmnimergeError, match="merge in two steps"):
        omnimerge.merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_methods_lists_the_new_methods_as_needing_calibration(capsys):
    from omnimerge.cli import main

    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "regmean_plusplus (needs calibration)" in text
    assert "expert_merging (needs base, needs calibration)" in text
    assert main(["methods", "--json"]) == 0
    listing = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert "2508.03121" in listing["regmean_plusplus"]["reference"]
    assert "2509.25712" in listing["expert_merging"]["reference"]


# ------------------------------------------------------------------ real-layout checkpoints, end to end

@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "internvl"])
def test_calibration_merges_on_real_layout_checkpoints(family, tmp_path, calib, monkeypatch):
    """Tiny checkpoints saved in each family's hub layout (their processors need torchvision, so samples are
    rendered by omnimerge's own image rendering): every data-aware method merges image and text samples, and
    transformers loads and runs the result."""
    import omnimerge
    from omnimerge.calibration.collect import load_renderer
    from omnimerge.calibration.render import ImageRenderer
    from omnimerge.tiny import build_tiny, make_expert
    from omnimerge.verify import verify

    monkeypatch.setenv("OMNIMERGE_CACHE", str(tmp_path / "cache"))
    base = build_tiny(family, tmp_path / "base", seed=0, num_layers=2)
    experts = [make_expert(base, tmp_path / f"e{i}", seed=i, scale=0.02) for i in (1, 2)]
    assert isinstance(load_renderer(base, vision=True), ImageRenderer)
    for method, params in [("regmean", {}), ("fisher", {}), ("regmean_plusplus", {}), ("adamerging", {"steps": 2}),
                           ("expert_merging", {"hidden_layers": "all"})]:
        out = tmp_path / method
        omnimerge.merge(_recipe(method, base, experts, calib, parameters=params), out, progress=False)
        assert verify(out).ok, (family, method)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "internvl"])
def test_spans_reproduce_the_full_forward(family, tmp_path, calib):
    """Layer by layer from kept hidden states (the other layers skipped) gives every hidden state of one full
    pass, Qwen3-VL's deepstack additions after the early layers included."""
    from omnimerge.calibration.span import entry_module, layer_count, run_span
    from omnimerge.tiny import build_tiny

    folder = build_tiny(family, tmp_path / "m", seed=0, num_layers=3)
    model = load_model(folder)
    (batch, *_) = render_batches(load_renderer(folder, vision=True), load_samples(calib, limit=1),
                                 CalibrationSettings())
    assert "pixel_values" in batch
    L = layer_count(model)
    seen = {}
    hooks = [entry_module(model, k).register_forward_pre_hook(lambda _m, a, k=k: seen.__setitem__(k, a[0]))
             for k in range(L + 1)]
    with torch.no_grad():
        model(**batch, use_cache=False)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        h = run_span(model, batch, stop=0)
        torch.testing.assert_close(h, seen[0])
        for k in range(L):
            h = run_span(model, batch, start=k, hidden=h, stop=k + 1)
            torch.testing.assert_close(h, seen[k + 1], rtol=1e-5, atol=1e-6)
    assert all("forward" not in vars(layer) for layer in model.get_decoder().layers)  # the layers are restored


# --------------------------------------------------------------------------------------------- --device

def test_device_cuda_without_a_gpu_is_refused_before_the_statistics(two_layers, tmp_path, calib, monkeypatch):
    import omnimerge

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here")
    vlm, experts = two_layers
    monkeypatch.setenv("OMNIMERGE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(OmnimergeError, match="no CUDA device"):
        omnimerge.merge(_recipe("regmean", vlm, experts, calib), tmp_path / "out", progress=False, device="cuda")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


@needs_cuda
def test_cuda_statistics_match_the_cpu_statistics(two_layers, calib):
    """Grams and Fishers collected with the model on the GPU equal the CPU's (float32 forward passes, float64
    Grams), and come back on the CPU."""
    from omnimerge.calibration import collect
    from omnimerge.calibration.collect import merge_parts

    vlm, _ = two_layers
    batches = render_batches(load_renderer(vlm, vision=True), load_samples(calib), CalibrationSettings(batch_size=2))
    cpu = merge_parts(collect(load_model(vlm, "cpu"), batches, ["gram", "fisher"], seed=3))
    gpu = merge_parts(collect(load_model(vlm, "cuda"), batches, ["gram", "fisher"], seed=3))
    assert cpu.keys() == gpu.keys()
    for k in cpu:
        for kind in cpu[k]:
            assert gpu[k][kind].device.type == "cpu"
            torch.testing.assert_close(gpu[k][kind], cpu[k][kind], rtol=1e-3, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("method,params", [("regmean_plusplus", {}), ("expert_merging", {"hidden_layers": "1"}),
                                           ("adamerging", {"steps": 3})])
def test_cuda_stage_merges_like_the_cpu_stage(two_layers, tmp_path, calib, monkeypatch, method, params):
    import omnimerge
    from safetensors.torch import load_file

    vlm, experts = two_layers
    recipe = _recipe(method, vlm, experts, calib, parameters=params)
    for device in ("cpu", "cuda"):
        monkeypatch.setenv("OMNIMERGE_CACHE", str(tmp_path / f"cache-{device}"))
        omnimerge.merge(recipe, tmp_path / device, progress=False, device=device)
    cpu, gpu = (load_file(tmp_path / d / "model.safetensors") for d in ("cpu", "cuda"))
    assert cpu.keys() == gpu.keys()
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-3, atol=1e-5)


def test_regmean_plusplus_with_merged_embeddings_and_regmean_on_the_head(two_layers, tmp_path, calib, monkeypatch):
    """The merged model the stage runs holds every tensor's planned value: the embeddings merged (the models'
    mean: no input statistics), the lm_head merged by RegMean with its own statistics collected first."""
    import omnimerge
    from omnimerge.tiny import make_expert

    vlm, _ = two_layers
    experts = [make_expert(vlm, tmp_path / f"e{i}", seed=i, scale=0.05, pattern=r"layers\.|embed") for i in (1, 2)]
    monkeypatch.setenv("OMNIMERGE_CACHE", str(tmp_path / "cache"))
    recipe = _recipe("regmean_plusplus", vlm, experts, calib,
                     components={"embed": "merge", "lm_head": {"method": "regmean"}})
    omnimerge.merge(recipe, tmp_path / "out", progress=False)
    merged = _load(tmp_path / "out")
    ws = [_load(e) for e in experts]
    mean = sum(w.get_input_embeddings().weight.detach() for w in ws) / 2
    torch.testing.assert_close(merged.get_input_embeddings().weight.detach(), mean)
    assert (mean - _load(vlm).get_input_embeddings().weight.detach()).abs().max() > 1e-3
    text = (tmp_path / "out" / "report.json").read_text()
    assert '"regmean": "gram"' in text or '"regmean": "input rows (Woodbury)"' in text


def test_data_aware_methods_with_a_new_output_vocabulary_are_refused(two_layers, tmp_path, calib, monkeypatch):
    import omnimerge

    vlm, experts = two_layers
    monkeypatch.setenv("OMNIMERGE_CACHE", str(tmp_path / "cache"))
    recipe = _recipe("regmean", vlm, experts, calib, tokenizer={"source": "union"})
    with pytest.raises(OmnimergeError, match="tokenizer:"):
        omnimerge.merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
