"""Calibration samples and the statistics stage, on a tiny Qwen2-VL with a real processor."""

from __future__ import annotations

import json

import pytest
import torch

from omnimerge.calibration import (CalibrationSettings, StatisticsCache, collect, load_samples, model_statistics,
                                   statistics_key)
from omnimerge.calibration.collect import (collect_fisher, collect_grams, load_model, load_renderer, merge_parts,
                                           render_batches)
from omnimerge.errors import OmnimergeError


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """An untrained bench-size Qwen2-VL saved with its processor (loads with AutoProcessor, no torchvision)."""
    from omnimerge.bench.model import BenchConfig, build_base_model, build_processor, save_checkpoint

    cfg = BenchConfig.quick()
    folder = tmp_path_factory.mktemp("vlm") / "model"
    save_checkpoint(build_base_model(cfg, seed=3), folder, build_processor(cfg))
    return folder


def write_jsonl(folder, rows, name="calib.jsonl"):
    path = folder / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def png(path, colour=(200, 30, 30), size=(64, 64)):
    from PIL import Image

    Image.new("RGB", size, colour).save(path)
    return path.name


@pytest.fixture
def calib(tmp_path):
    png(tmp_path / "red.png")
    png(tmp_path / "blue.png", (20, 20, 220))
    rows = [{"text": "what colour is the square?", "image": "red.png"},
            {"text": "how many shapes are there?", "image": "blue.png"},
            {"text": "name a colour"},
            {"text": "count to three"},
            {"text": "describe the scene", "image": "red.png"}]
    return write_jsonl(tmp_path, rows)


# ------------------------------------------------------------------------------------------- data

def test_samples_load_in_order_with_images_resolved(calib):
    samples = load_samples(calib)
    assert [s.line for s in samples] == [1, 2, 3, 4, 5]
    assert samples[0].image == (calib.parent / "red.png").resolve() and samples[2].image is None
    assert len(load_samples(calib, limit=2)) == 2


@pytest.mark.parametrize("line,match", [
    ("not json", "not a JSON object"),
    ("[1, 2]", "must be a JSON object"),
    ('{"text": ""}', "non-empty string"),
    ('{"text": 3}', "non-empty string"),
    ('{"text": "a", "label": "b"}', "unknown field"),
    ('{"text": "a", "image": "/etc/passwd"}', "relative"),
    ('{"text": "a", "image": "../outside.png"}', "relative"),
    ('{"text": "a", "image": "missing.png"}', "does not exist"),
    ('{"text": "a", "image": "notimage.png"}', "not a readable image"),
    ('{"text": "a", "image": 5}', "path string"),
])
def test_bad_lines_name_the_file_and_line(tmp_path, line, match):
    (tmp_path / "notimage.png").write_bytes(b"this is not a png")
    path = write_jsonl(tmp_path, [{"text": "fine"}, line])
    with pytest.raises(OmnimergeError, match=match) as e:
        load_samples(path)
    assert f"{path}:2" in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(OmnimergeError, match="does not exist"):
        load_samples(tmp_path / "nope.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\xe9"}'.encode("latin-1"))
    with pytest.raises(OmnimergeError, match="not UTF-8"):
        load_samples(tmp_path / "latin1.jsonl")
    with pytest.raises(OmnimergeError, match="no samples"):
        load_samples(write_jsonl(tmp_path, ["", "  "], "empty.jsonl"))
    png(tmp_path / "huge.png", size=(17000, 2))
    with pytest.raises(OmnimergeError, match="resize"):
        load_samples(write_jsonl(tmp_path, [{"text": "a", "image": "huge.png"}], "huge.jsonl"))
    with pytest.raises(OmnimergeError, match="takes no images"):
        load_samples(write_jsonl(tmp_path, [{"text": "a", "image": "huge.png"}], "t.jsonl"), images=False)


def test_symlinked_image_leaving_the_folder_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    png(outside / "x.png")
    inside = tmp_path / "calib"
    inside.mkdir()
    (inside / "link.png").symlink_to(outside / "x.png")
    with pytest.raises(OmnimergeError, match="outside"):
        load_samples(write_jsonl(inside, [{"text": "a", "image": "link.png"}]))


def test_settings_are_validated():
    with pytest.raises(OmnimergeError, match="calibration.samples"):
        CalibrationSettings(samples=0)
    with pytest.raises(OmnimergeError, match="calibration.max_tokens"):
        CalibrationSettings(max_tokens=True)


# ------------------------------------------------------------------------------------------ stats

def test_rendering_batches_and_max_tokens(vlm, calib):
    renderer = load_renderer(vlm, vision=True)
    samples = load_samples(calib)
    batches = render_batches(renderer, samples, CalibrationSettings(batch_size=4))
    # image and text-only samples never share a batch: [img, img], [txt, txt], [img]
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert "pixel_values" in batches[0] and "pixel_values" not in batches[1]
    with pytest.raises(OmnimergeError, match="max_tokens"):
        render_batches(renderer, samples[:1], CalibrationSettings(max_tokens=8))
    cut = render_batches(renderer, samples[2:3], CalibrationSettings(max_tokens=5))
    assert cut[0]["input_ids"].shape[1] == 5


def test_grams_are_the_layer_inputs_gram(vlm, calib):
    """q_proj of layer 0 sees input_layernorm(hidden state entering layer 0), on every non-padding token."""
    model = load_model(vlm)
    batches = render_batches(load_renderer(vlm, vision=True), load_samples(calib), CalibrationSettings())
    stats = merge_parts(collect_grams(model, batches))
    xs = []
    layer0 = model.get_decoder().layers[0]
    with torch.no_grad():
        for b in batches:
            h = model(**b, output_hidden_states=True, use_cache=False).hidden_states[0]
            xs.append(layer0.input_layernorm(h)[b["attention_mask"].bool()].double())
    x = torch.cat(xs)
    key = "language.layers.0.self_attn.q_proj.weight"
    got = stats[key]["gram"] if "gram" in stats[key] else stats[key]["inputs"].double().T @ stats[key]["inputs"].double() / len(x)
    torch.testing.assert_close(got.double(), x.T @ x / len(x), rtol=1e-4, atol=1e-6)
    # every linear layer of the decoder and the lm_head, nothing of the vision tower
    n_layers = len(model.get_decoder().layers)
    assert len([k for k in stats if k.startswith("language.layers.")]) == 7 * n_layers
    assert "lm_head.weight" in stats and not any("visual" in k for k in stats)
    # a layer wider than the tokens seen keeps the rows (exact, smaller); the others the Gram
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    for k, v in stats.items():
        width = (v.get("gram") if "gram" in v else v["inputs"]).shape[-1]
        assert ("inputs" in v) == (tokens < width), k


def test_fisher_is_the_mean_squared_gradient_of_sampled_predictions(vlm, calib):
    model = load_model(vlm)
    samples = load_samples(calib)
    settings = CalibrationSettings(batch_size=2)
    together = merge_parts(collect_fisher(model, render_batches(load_renderer(vlm, vision=True), samples[:2],
                                                                settings), seed=5))
    # by hand, sample by sample with the same generator
    g = torch.Generator().manual_seed(5)
    want = None
    for s in samples[:2]:
        (b,) = render_batches(load_renderer(vlm, vision=True), [s], settings)
        model.zero_grad(set_to_none=True)
        w = model.get_decoder().layers[1].mlp.down_proj.weight
        w.requires_grad_(True)
        logp = torch.log_softmax(model(**b, use_cache=False).logits[0].float(), -1)
        y = torch.multinomial(logp.detach().exp(), 1, generator=g)
        logp.gather(-1, y).sum().backward()
        want = w.grad ** 2 if want is None else want + w.grad ** 2
        w.requires_grad_(False)
    torch.testing.assert_close(together["language.layers.1.mlp.down_proj.weight"]["fisher"], want / 2,
                               rtol=1e-4, atol=1e-10)
    f = together["language.layers.1.mlp.down_proj.weight"]["fisher"]
    assert (f >= 0).all() and f.sum() > 0
    assert {"embed.weight", "lm_head.weight", "language.norm.weight"} <= set(together)
    assert not any(p.requires_grad for p in model.parameters())


def test_stage_caches_and_keys_on_what_matters(vlm, calib, tmp_path):
    cache = StatisticsCache(tmp_path / "stats")
    logs = []
    three = load_samples(calib, limit=3)
    path = model_statistics(vlm, three, ["gram", "fisher"], settings=CalibrationSettings(samples=3), cache=cache,
                            log=logs.append)
    mtime = path.stat().st_mtime_ns
    again_path = model_statistics(vlm, three, ["gram", "fisher"], settings=CalibrationSettings(samples=3),
                                  cache=cache, log=logs.append)
    assert again_path == path and path.stat().st_mtime_ns == mtime
    assert "reused" in logs[-1] and "reused" not in logs[0]
    first = cache.load(path.name[len("stats-"):])
    again = cache.load(path.name[len("stats-"):])
    assert first and first.keys() == again.keys()
    for k in first:
        for kind in first[k]:
            assert torch.equal(first[k][kind], again[k][kind])
    samples = load_samples(calib, limit=3)
    key = statistics_key(vlm, samples, CalibrationSettings(samples=3), ["gram", "fisher"])
    assert path.name == f"stats-{statistics_key(vlm, samples, CalibrationSettings(samples=3), ['gram', 'fisher'], extra_folders=[vlm])}"
    assert key != statistics_key(vlm, samples[:2], CalibrationSettings(samples=3), ["gram", "fisher"])
    assert key != statistics_key(vlm, samples, CalibrationSettings(samples=3), ["gram"])
    assert key != statistics_key(vlm, samples, CalibrationSettings(samples=3, max_tokens=100), ["gram", "fisher"])
    assert not list((tmp_path / "stats").glob("*.tmp"))


def test_memory_budget_splits_the_work_into_parts_with_the_same_results(vlm, calib):
    """A small budget: more passes, each layer in exactly one part, the same numbers; q/k/v and gate/up read
    one input, so k/v and up are aliases of q and gate."""
    model = load_model(vlm)
    batches = render_batches(load_renderer(vlm, vision=True), load_samples(calib), CalibrationSettings())
    one = list(collect(model, batches, ["gram", "fisher"], seed=2))
    many = list(collect(model, batches, ["gram", "fisher"], seed=2, memory_budget=64 << 10))
    assert len(many) > len(one) == 2
    a, b = merge_parts(one), merge_parts(many)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].keys() == b[k].keys()
        for kind in a[k]:
            torch.testing.assert_close(a[k][kind], b[k][kind], rtol=1e-5, atol=1e-9)
    stats, aliases = one[0]
    assert aliases["language.layers.0.self_attn.k_proj.weight"] == "language.layers.0.self_attn.q_proj.weight"
    assert aliases["language.layers.0.mlp.up_proj.weight"] == "language.layers.0.mlp.gate_proj.weight"
    assert "language.layers.0.self_attn.o_proj.weight" in stats and "language.layers.0.mlp.down_proj.weight" in stats
    seen: list[str] = []
    for part, al in many:
        seen += [k for k in part if "gram" in part[k] or "inputs" in part[k]]
    assert len(seen) == len(set(seen))


def test_stats_source_reads_one_key_at_a_time_with_aliases(vlm, calib, tmp_path):
    from omnimerge.calibration import StatsSource

    cache = StatisticsCache(tmp_path)
    folder = model_statistics(vlm, load_samples(calib), ["gram"], cache=cache, memory_budget=64 << 10)
    assert len(list(folder.glob("part-*.safetensors"))) > 1
    source = StatsSource.open([folder, folder])
    q = source.for_key("language.layers.1.self_attn.q_proj.weight")
    v = source.for_key("language.layers.1.self_attn.v_proj.weight")
    assert len(q) == 2 and q[0].keys() == v[0].keys() and q[0].keys() <= {"gram", "inputs"}
    for kind in q[0]:
        assert torch.equal(q[0][kind], v[0][kind])
    assert source.for_key("language.norm.weight") == ({}, {})
    assert source.fisher_norms is None


def test_collect_rejects_unknown_kinds(vlm):
    with pytest.raises(ValueError, match="unknown statistics"):
        list(collect(None, [], ["hessian"]))


# ------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def experts(vlm, tmp_path_factory):
    """Two 'experts': the VLM with different perturbations of its language layers."""
    from omnimerge.tiny import make_expert

    root = tmp_path_factory.mktemp("experts")
    return [make_expert(vlm, root / f"e{i}", seed=i, scale=0.02) for i in (1, 2)]


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_data_aware_merge_end_to_end(vlm, experts, calib, tmp_path, monkeypatch, method):
    """recipe -> plan (calibration validated) -> statistics stage -> streaming merge -> transformers loads it;
    RegMean's merged q_proj is the least-squares merge of the experts on their own samples' inputs."""
    import transformers

    import omnimerge
    from omnimerge.calibration import StatisticsCache

    monkeypatch.setenv("OMNIMERGE_CACHE", str(tmp_path / "cache"))
    recipe = {"method": method, "base": str(vlm), "skeleton": str(vlm), "seed": 1,
              "models": [{"path": str(e), "calibration": str(calib)} for e in experts],
              "calibration": {"samples": 4, "batch_size": 2}}
    out = tmp_path / "out"
    omnimerge.merge(recipe, out, progress=False)
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(out)
    from omnimerge.verify import verify

    assert verify(out).ok
    stats_files = sorted((tmp_path / "cache" / "stats").glob("stats-*"))
    assert len(stats_files) == 2
    key = "language.layers.0.self_attn.q_proj.weight"
    got = model.get_decoder().layers[0].self_attn.q_proj.weight.double()
    ws = [transformers.Qwen2VLForConditionalGeneration.from_pretrained(e).get_decoder().layers[0].self_attn.q_proj
          .weight.double() for e in experts]
    settings = CalibrationSettings(samples=4, batch_size=2)
    samples = load_samples(calib, limit=4)
    cache = StatisticsCache(tmp_path / "cache" / "stats")
    loaded = [cache.load(statistics_key(e, samples, settings, [{"regmean": "gram", "fisher": "fisher"}[method]], 1,
                                        extra_folders=[vlm])) for e in experts]
    assert all(st is not None for st in loaded)  # each expert's own file, found by its key
    if method == "regmean":
        from omnimerge.methods.data_aware import regmean_solve

        grams = []
        for st in loaded:
            s = st[key]
            grams.append(s["gram"].double() if "gram" in s else s["inputs"].double().T @ s["inputs"].double()
                         / len(s["inputs"]))
        torch.testing.assert_close(got.detach(), regmean_solve(ws, grams, 0.9).detach(), rtol=1e-5, atol=1e-6)
    else:
        assert all("fisher" in st[key] for st in loaded)
    # a second merge reuses the statistics (no new files, same bytes)
    omnimerge.merge(recipe, tmp_path / "again", progress=False)
    assert sorted((tmp_path / "cache" / "stats").glob("stats-*")) == stats_files
    a = (out / "model.safetensors").read_bytes()
    assert a == (tmp_path / "again" / "model.safetensors").read_bytes()


def test_data_aware_method_without_calibration_is_refused_before_anything_runs(vlm, experts, tmp_path, calib):
    import omnimerge

    recipe = {"method": "regmean", "skeleton": str(vlm), "models": [{"path": str(e)} for e in experts]}
    with pytest.raises(OmnimergeError, match=r"models\[0\].*calibration: samples.jsonl"):
        omnimerge.merge(recipe, tmp_path / "out", progress=False)
    recipe["models"] = [{"path": str(e), "calibration": str(calib.parent / "missing.jsonl")} for e in experts]
    with pytest.raises(OmnimergeError, match="missing.jsonl does not exist"):
        omnimerge.merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    # a recipe file: calibration paths are relative to it
    import yaml

    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"method": "regmean", "skeleton": str(vlm), "models": [
        {"path": str(e), "calibration": calib.name} for e in experts]}))
    (tmp_path / calib.name).write_text(calib.read_text())
    for img in calib.parent.glob("*.png"):
        (tmp_path / img.name).write_bytes(img.read_bytes())
    res = omnimerge.merge(tmp_path / "r.yaml", dry_run=True)
    assert [[s.source for s in samples] for samples in res.plan.calibration] == [[tmp_path / calib.name] * 5] * 2


# ------------------------------------------------------------------------------------- adamerging

def test_adamerging_coefficients_minimise_the_entropy_on_a_toy_problem(vlm, experts, calib):
    """One model, one coefficient (task-wise), one batch: Adam lands on the minimum of the 1-D entropy curve
    that a fine grid reaches walking downhill from the same start (the curve need not be convex)."""
    from omnimerge.calibration.adamerging import answer_entropy, learn_coefficients
    from omnimerge.calibration.collect import canonical_parameters
    from omnimerge.checkpoints.checkpoint import load_checkpoint

    model = load_model(vlm)
    base_ck, exp_ck = load_checkpoint(str(vlm)), load_checkpoint(str(experts[0]))
    keys = [k for k in canonical_parameters(model) if k.startswith("language.layers.")]
    tv = {k: 20 * (exp_ck.read(k).float() - base_ck.read(k).float()) for k in keys}  # a strong direction
    batch = render_batches(load_renderer(vlm, vision=True), load_samples(calib)[2:4], CalibrationSettings())[0]
    params = canonical_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}

    def entropy_at(lam: float) -> float:
        w = {names[id(params[k])]: params[k] + lam * tv[k] for k in keys}
        with torch.no_grad():
            logits = torch.func.functional_call(model, w, args=(), kwargs={**batch, "use_cache": False},
                                                strict=False).logits
        return float(answer_entropy(logits, batch["attention_mask"]))

    grid = [i / 40 for i in range(-40, 81)]
    values = [entropy_at(x) for x in grid]
    i = grid.index(0.3)
    while True:  # downhill from the start, on the grid
        j = min((i - 1, i, i + 1), key=lambda n: values[n] if 0 <= n < len(grid) else float("inf"))
        if j == i:
            break
        i = j
    best = grid[i]
    trace = []
    lam = learn_coefficients(model, [tv], [[batch]], granularity="task", init=0.3, lr=0.05, steps=150, trace=trace)
    got = lam[keys[0]][0]
    assert all(v == [got] for v in lam.values())  # task-wise: one coefficient everywhere
    assert trace[-1] < trace[0]
    assert abs(got - best) <= 0.025, (got, best)
    assert entropy_at(got) <= values[i] + 1e-4
    assert entropy_at(got) <= min(entropy_at(got - 0.02), entropy_at(got + 0.02))
    # layer-wise: a coefficient per decoder layer (and one for the rest); steps 0 returns init
    lam0 = learn_coefficients(model, [tv, tv], [[batch], [batch]], granularity="layer", init=0.25, steps=0)
    assert all(v == [0.25, 0.25] for v in lam0.values())
    assert not any(p.requires_grad for p in model.parameters())


def test_adamerging_end_to_end(vlm, experts, calib, tmp_path, monkeypatch):
    import omnimerge

    monkeypatch.setenv("OMNIMERGE_CACHE", str(tmp_path / "cache"))
    recipe = {"method": "adamerging", "base": str(vlm), "skeleton": str(vlm),
              "models": [{"path": str(e), "calibration": str(calib)} for e in experts],
              "parameters": {"steps": 5, "lr": 0.01}, "calibration": {"samples": 4}}
    res = omnimerge.merge(recipe, tmp_path / "out", progress=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = report["tensors"] if isinstance(report, dict) and "tensors" in report else report
    text = json.dumps(rows)
    assert "coefficients" in text
    from omnimerge.verify import verify

    assert verify(tmp_path / "out").ok and res.plan is not None
    files = sorted((tmp_path / "cache" / "stats").glob("stats-*"))
    assert len(files) == 2
    omnimerge.merge(recipe, tmp_path / "again", progress=False)  # cached: the same coefficients, the same bytes
    assert sorted((tmp_path / "cache" / "stats").glob("stats-*")) == files
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()
