"""Element-wise methods merged in row blocks (run.blocks) write the bytes of the whole-tensor merge, whatever
the block size: TIES's thresholds (global, and per tensor with ties at the threshold) from the pre-pass,
DARE's and DELLA's draws keyed by element, Breadcrumbs' rank cuts (ties at the cuts), the L1 norms of
Breadcrumbs and DELLA and the norms and dot products of slerp and Model Stock from a per-tensor pre-pass,
rows past a smaller vocabulary copied from the skeleton."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import omnimerge
from omnimerge.checkpoints.safetensors_io import SafetensorsFile, StreamingSafetensorsWriter
from omnimerge.methods import get_method
from omnimerge.methods.selection import StreamedKthLargest, top_k_mask
from omnimerge.run import blocks
from omnimerge.tiny import build_tiny, make_expert


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """bf16 models (their task vectors have many exact ties), the embedding perturbed too."""
    root = tmp_path_factory.mktemp("blocks")
    base = build_tiny("qwen2", root / "base", seed=0, dtype=torch.bfloat16, vocab_size=300, tokenizer=False)
    experts = [make_expert(base, root / f"e{i}", seed=20 + i, scale=0.02, pattern=r"layers\.|embed")
               for i in (1, 2, 3)]
    return base, experts


def _merge(recipe: dict, out, monkeypatch, block_bytes: int | None):
    """The merge, with tensors over 0 bytes cut into blocks of ``block_bytes`` and gta's pipeline run in
    pieces of 1000 elements (None: whole tensors, in one piece)."""
    from omnimerge.methods import gta

    monkeypatch.setattr(blocks, "BLOCK_ABOVE", 0 if block_bytes else 1 << 62)
    monkeypatch.setattr(blocks, "BLOCK_BYTES", block_bytes or 1)
    monkeypatch.setattr(gta, "PIECE", 1000 if block_bytes else 1 << 40)
    omnimerge.merge(recipe, out)
    return load_file(str(out / "model.safetensors")), json.loads((out / "report.json").read_text())["tensors"]


CASES = [
    ("average", {}),
    ("task_arithmetic", {"lambda": 0.7}),
    ("ties", {"density": 0.3}),  # trim: global
    ("ties", {"density": 0.3, "trim": "per_tensor"}),
    ("dare_linear", {"p": 0.4}),
    ("dare_ties", {"p": 0.3, "density": 0.6, "trim": "per_tensor"}),
    ("dare_ties", {"p": 0.3, "density": 0.6}),
    ("breadcrumbs", {"density": 0.6, "gamma": 0.1}),
    ("breadcrumbs", {"density": 0.7, "gamma": 0.05, "rescale": "l1", "weight": [1.0, 0.5, 0.25]}),
    ("breadcrumbs", {"density": 0.95, "gamma": 0.2}),  # the outlier cut shrinks (density + gamma > 1)
    ("breadcrumbs", {"density": [0.5, 1.0, 0.8], "gamma": 0.1, "rescale": "l1"}),  # one model not masked
    ("breadcrumbs_ties", {"density": 0.8, "gamma": 0.05}),
    ("della", {"density": 0.6, "epsilon": 0.1}),  # rescale: l1, the default
    ("della_linear", {"density": 0.5, "epsilon": 0.2, "rescale": "inverse"}),
    ("della_linear", {"density": [0.5, 1.0, 0.7], "epsilon": 0.1, "rescale": "l1"}),
    ("model_stock", {}),
    ("model_stock", {"filter_wise": True}),
    ("slerp", {"t": 0.3}),
]
NEW_IN_BLOCKS = ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "slerp")


@pytest.mark.parametrize("method,params", CASES)
def test_blocks_give_the_bytes_of_the_whole_tensor(models, tmp_path, monkeypatch, method, params):
    base, experts = models
    experts = experts[:1] if method == "slerp" else experts
    each = {k: v for k, v in params.items() if isinstance(v, list)}  # per-model values, in the model entries
    recipe = {"method": method, "base": str(base),
              "models": [{"path": str(e), **{k: v[i] for k, v in each.items()}} for i, e in enumerate(experts)],
              "parameters": {k: v for k, v in params.items() if k not in each}, "seed": 5,
              "components": {"embed": "merge", "lm_head": "merge"}}
    whole, report_whole = _merge(recipe, tmp_path / "whole", monkeypatch, None)
    sizes = (3000, 20000) if method not in NEW_IN_BLOCKS else (200, 3000, 20000)
    for block_bytes in sizes:  # blocks of one row, of a few rows (not dividing the row counts), and of many
        got, report = _merge(recipe, tmp_path / f"b{block_bytes}", monkeypatch, block_bytes)
        assert got.keys() == whole.keys()
        for key, t in whole.items():
            assert torch.equal(got[key], t), (block_bytes, key)
        blocked = {k: r for k, r in report.items() if r.get("row_blocks", 1) > 1}
        assert "model.embed_tokens.weight" in blocked and len(blocked) >= 4
        for key, r in blocked.items():
            assert r["norm"] == pytest.approx(report_whole[key]["norm"], rel=1e-5)
            assert r["delta_norm"] == pytest.approx(report_whole[key]["delta_norm"], rel=1e-5, abs=1e-6)
            for fact in ("slerp_angle_deg", "model_stock_t"):  # the method's facts: the whole tensor's
                assert r.get(fact) == report_whole[key].get(fact), (block_bytes, key, fact)


def test_blocks_past_a_smaller_vocabulary_are_the_skeletons_rows(models, tmp_path, monkeypatch):
    base, experts = models
    big = build_tiny("qwen2", tmp_path / "big", seed=7, dtype=torch.bfloat16, vocab_size=448, tokenizer=False)
    recipe = {"method": "average", "models": [{"path": str(big)}, {"path": str(experts[0])}], "skeleton": str(big),
              "components": {"embed": "merge", "lm_head": "merge"}}
    whole, _ = _merge(recipe, tmp_path / "whole", monkeypatch, None)
    got, report = _merge(recipe, tmp_path / "blocks", monkeypatch, 5000)
    assert report["model.embed_tokens.weight"]["rows_merged"] == 300
    assert report["model.embed_tokens.weight"]["row_blocks"] > 2
    for key, t in whole.items():
        assert torch.equal(got[key], t), key


def test_per_tensor_cut_keeps_exactly_the_top_k_mask_with_ties():
    """The streamed selection with exact counts, fed in chunks, keeps the same entries as top_k_mask."""
    g = torch.Generator().manual_seed(1)
    values = (torch.randint(0, 6, (50, 40), generator=g) * 0.25).float()  # thousands of ties
    counted = 0
    for density in (0.1, 0.37, 0.5, 0.99):
        k = int(density * values.numel())
        sel = StreamedKthLargest(density, exact_count=True)
        chunks = [(0, 13), (13, 14), (14, 50)]
        while not sel.done:
            for a, b in chunks:
                sel.feed(values[a:b], a * 40)
            sel.next_pass()
        if int((values >= sel.threshold).sum()) > k:  # not every entry equal to the threshold is kept
            assert sel.ties is not None
            counted += 1
        keep = torch.cat([_cut(values[a:b], sel, a * 40) for a, b in chunks])
        assert int(keep.sum()) == k
        assert torch.equal(keep, top_k_mask(values, k))
    assert counted >= 2


def _cut(block, sel, offset):
    if sel.ties is None:
        return block >= sel.threshold
    keep = block > sel.threshold
    left = sel.ties - sel.ties_before[offset]
    if left > 0:
        keep.view(-1)[(block.reshape(-1) == sel.threshold).nonzero().squeeze(1)[:left]] = True
    return keep


def test_elementwise_declarations():
    assert get_method("average").blockable({})
    assert get_method("task_arithmetic").blockable({"rank": "full"})
    assert not get_method("task_arithmetic").blockable({"rank": "knee"})  # a truncated SVD needs the whole matrix
    assert get_method("ties").blockable({"rescale": "none"}) and not get_method("ties").blockable({"rescale": "l1"})
    assert get_method("dare_linear").blockable({"rescale": "inverse"})
    for name in NEW_IN_BLOCKS:
        assert get_method(name).blockable({"rescale": "l1"}) and get_method(name).blockable({})
    for name in ("tsv", "iso_c", "nuslerp", "multislerp", "karcher", "pcb", "localize_stitch"):
        assert not get_method(name).blockable({})
    # which of them need a per-tensor pre-pass when blocked
    assert get_method("breadcrumbs").reduction.when_blocked({"density": [0.9, 1.0]})
    assert not get_method("breadcrumbs").reduction.when_blocked({"density": 1.0})
    assert get_method("della").reduction.when_blocked({"density": 0.5, "rescale": "l1"})
    assert not get_method("della").reduction.when_blocked({"density": 0.5, "rescale": "inverse"})
    assert get_method("slerp").reduction.when_blocked({}) and get_method("model_stock").reduction.when_blocked({})


def test_writer_takes_a_tensor_in_row_pieces(tmp_path):
    a, b = torch.arange(12.0).view(4, 3), torch.arange(5, dtype=torch.bfloat16)
    w = StreamingSafetensorsWriter(tmp_path / "x.safetensors", [("a", a.dtype, (4, 3)), ("b", b.dtype, (5,))])
    assert w.write_rows("a", a[:1]) is False
    with pytest.raises(RuntimeError, match="expected rows 1.. of a"):
        w.write_rows("a", a[1:2].T.contiguous())  # not whole rows
    assert w.write_rows("a", a[1:3]) is False
    assert w.write_rows("a", a[3:]) is True
    w.write("b", b)
    w.close()
    f = SafetensorsFile(tmp_path / "x.safetensors")
    assert torch.equal(f.read("a"), a) and torch.equal(f.read("b"), b)
    assert torch.equal(f.read("a", rows=(1, 3)), a[1:3])
    assert f.read("a", rows=(4, 4)).shape == (0, 3)


PIECE_CASES = [
    ("ties", {"density": 0.3}), ("ties", {"density": 0.3, "trim": "per_tensor"}),
    ("ties", {"density": 0.5, "normalize": False, "weight": [1.0, 0.5, 2.0]}),
    ("dare_linear", {"p": 0.4}), ("dare_linear", {"p": 0.4, "rescale": "none", "normalize": True}),
    ("dare_ties", {"p": 0.3}), ("dare_ties", {"p": 0.3, "density": 0.6, "trim": "per_tensor"}),
    ("dare_ties", {"p": 0.3, "density": 0.6}),
]


@pytest.mark.parametrize("method,params", PIECE_CASES)
def test_the_pipeline_in_pieces_gives_the_bits_of_the_whole_tensor(monkeypatch, method, params):
    """gta's element-wise variants run in cache-sized pieces: the same bits as one pass over the tensor (bf16
    models: many ties at the threshold)."""
    from omnimerge.methods import MethodContext, gta

    g = torch.Generator().manual_seed(2)
    base = (0.02 * torch.randn(120, 70, generator=g)).bfloat16().float()
    models = [(base + 0.002 * torch.randn(120, 70, generator=g)).bfloat16() for _ in range(3)]

    def run(piece):
        monkeypatch.setattr(gta, "PIECE", piece)
        return get_method(method)(base, models, MethodContext("k", torch.Generator().manual_seed(9)), **params)

    whole = run(1 << 40)
    for piece in (1000, 4096):
        got = run(piece)
        assert torch.equal(got.view(torch.int32), whole.view(torch.int32)), piece   # bits: signed zeros too


# --- the per-tensor reductions of the newly blocked methods, against their definitions -------------------------
def _feed_in_blocks(acc, base, models, rows_per_block, params):
    """Feed ``acc`` the row blocks of (base, models) in order, pass after pass, as run.stream.prepass does."""
    from omnimerge.methods import MethodContext

    row = base[0].numel()
    while not acc.done:
        for s in range(0, base.shape[0], rows_per_block):
            ctx = MethodContext("k", torch.Generator().manual_seed(9), offset=s * row)
            acc.feed(base[s:s + rows_per_block], [m[s:s + rows_per_block] for m in models], ctx, params)
        acc.next_pass()
    return acc.result()


def _stable_ranks(values):
    """Each entry's rank in the stable ascending sort of ``values`` (flattened)."""
    flat = values.reshape(-1)
    ranks = torch.empty(flat.numel(), dtype=torch.long)
    ranks[torch.argsort(flat, stable=True)] = torch.arange(flat.numel())
    return ranks.view(values.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_streamed_rank_cut_is_the_stable_sorts_first_m(dtype):
    """StreamedRankCut, fed in chunks, marks exactly the entries of rank < m in a stable ascending sort."""
    from omnimerge.methods.selection import StreamedRankCut

    g = torch.Generator().manual_seed(3)
    values = (torch.randint(0, 7, (40, 30), generator=g) * 0.125).to(dtype)  # many ties at every value
    values[5, :7] = 0.0
    values[11, 3] = 1e-30 if dtype != torch.bfloat16 else 0.5
    ranks = _stable_ranks(values)
    n = values.numel()
    chunks = [(0, 1), (1, 13), (13, 14), (14, 40)]
    for m in (0, 1, 2, 37, n // 2, n - 1, n):
        cut = StreamedRankCut(lambda count, m=m: m)
        while not cut.done:
            for a, b in chunks:
                cut.feed(values[a:b], a * 30)
            cut.next_pass()
        got = torch.cat([cut.cut.mask(values[a:b], a * 30) for a, b in chunks])
        assert torch.equal(got, ranks < m), m
        assert torch.equal(cut.cut.mask(values), ranks < m), m  # the whole tensor at tag 0


def test_breadcrumbs_cut_and_l1_norms_are_the_whole_tensors():
    """Breadcrumbs' pre-pass fed in blocks gives the mask of outliers() and the L1 norms of l1_norms()."""
    from omnimerge.methods import MethodContext
    from omnimerge.methods.gta import VARIANTS, l1_norms, outliers, outliers_by_cut
    from omnimerge.methods.rowsums import tensor_sum

    g = torch.Generator().manual_seed(4)
    base = (0.02 * torch.randn(37, 24, generator=g)).bfloat16().float()
    models = [(base + 0.002 * torch.randn(37, 24, generator=g)).bfloat16().float() for _ in range(3)]
    params = {"density": [0.6, 1.0, 0.9], "gamma": [0.1, 0.1, 0.2], "rescale": "l1", "weight": 1.0,
              "lambda": 1.0, "normalize": False}
    for rows in (1, 5, 37):
        acc = get_method("breadcrumbs").reduction.start(params)
        cuts = _feed_in_blocks(acc, base, models, rows, params)
        assert cuts[1] is None  # density 1: no mask
        for i in (0, 2):
            d = models[i] - base
            want = outliers(d, params["density"][i], params["gamma"][i])
            assert torch.equal(outliers_by_cut(d, cuts[i], 0), want)
            got = torch.cat([outliers_by_cut(d[s:s + rows], cuts[i], s * 24) for s in range(0, 37, rows)])
            assert torch.equal(got, want)
            assert cuts[i].l1 == l1_norms(d, want)
            assert cuts[i].l1[0] == pytest.approx(float(d.double().abs().sum()), rel=1e-12)
            assert cuts[i].l1[1] == tensor_sum(want, torch.abs)
    assert VARIANTS["breadcrumbs"].sparsify == "outliers"
    # and the method with the reduction, block by block, gives the whole tensor's bits
    whole = get_method("breadcrumbs")(base, models, MethodContext("k", torch.Generator().manual_seed(9)), **params)
    acc = get_method("breadcrumbs").reduction.start(params)
    red = _feed_in_blocks(acc, base, models, 5, params)
    got = torch.cat([get_method("breadcrumbs")(base[s:s + 5], [m[s:s + 5] for m in models],
                                               MethodContext("k", torch.Generator().manual_seed(9), reduction=red,
                                                             offset=s * 24), **params) for s in range(0, 37, 5)])
    assert torch.equal(got, whole)


def test_della_l1_norms_are_the_whole_tensors():
    """DELLA's pre-pass fed in blocks: the L1 norms of τ_i and of MagPrune's kept entries (element-keyed draws)."""
    from omnimerge.methods import MethodContext
    from omnimerge.methods.gta import l1_norms, magprune_kept

    g = torch.Generator().manual_seed(5)
    base = torch.randn(29, 16, generator=g)
    models = [base + 0.1 * torch.randn(29, 16, generator=g) for _ in range(2)]
    params = {"density": [0.5, 0.7], "epsilon": 0.1, "rescale": "l1", "weight": 1.0, "lambda": 1.0,
              "normalize": True}
    for rows in (1, 4, 29):
        acc = get_method("della").reduction.start(params)
        norms = _feed_in_blocks(acc, base, models, rows, params)
        for i in (0, 1):
            d = models[i] - base
            kept, _ = magprune_kept(d, params["density"][i], 0.1, MethodContext("k", torch.Generator().manual_seed(9)), i)
            assert norms[i] == l1_norms(d, kept)
            assert norms[i][1] == pytest.approx(float(kept.double().abs().sum()), rel=1e-12)


@pytest.mark.parametrize("method", ["slerp", "model_stock"])
def test_gram_rows_are_the_whole_tensors_dot_products(method):
    """slerp's and Model Stock's pre-pass fed in blocks: the same float64 row sums of the products of their vectors
    as the whole tensor, their totals the dot products (to float64 rounding)."""
    from omnimerge.methods.interpolation import gram_rows
    from omnimerge.methods.rowsums import total

    g = torch.Generator().manual_seed(6)
    base = torch.randn(31, 20, generator=g)
    models = [base + 0.5 * torch.randn(31, 20, generator=g) for _ in range(1 if method == "slerp" else 3)]
    vs = [base, models[0]] if method == "slerp" else [m - base for m in models]
    want = gram_rows(vs)
    for rows in (1, 6, 31):
        acc = get_method(method).reduction.start({})
        assert torch.equal(_feed_in_blocks(acc, base, models, rows, {}), want)
    pairs = [(i, j) for i in range(len(vs)) for j in range(i, len(vs))]
    for p, (i, j) in enumerate(pairs):
        assert total(want[p]) == pytest.approx(float((vs[i].double() * vs[j].double()).sum()), rel=1e-12)
        assert torch.allclose(want[p], (vs[i].double() * vs[j].double()).sum(-1), rtol=1e-12, atol=0)


def test_row_sums_do_not_depend_on_blocks_threads_or_chunks(monkeypatch):
    """The fixed-order sums: a tensor's row sums are the same bits whole, in blocks, in chunks, on 1 or 2 threads."""
    from omnimerge.methods import rowsums

    g = torch.Generator().manual_seed(7)
    x = torch.randn(300, 1000, generator=g) * torch.logspace(-6, 6, 1000)
    before = torch.get_num_threads()
    try:
        want = rowsums.row_sums(x, torch.abs)
        torch.set_num_threads(1)
        assert torch.equal(torch.cat([rowsums.row_sums(x[s:s + 7], torch.abs) for s in range(0, 300, 7)]), want)
        monkeypatch.setattr(rowsums, "CHUNK", 3000)
        assert torch.equal(rowsums.row_sums(x, torch.abs), want)
    finally:
        torch.set_num_threads(before)
    assert rowsums.total(want) == pytest.approx(float(x.double().abs().sum()), rel=1e-13)
    assert rowsums.tensor_sum(torch.arange(10.0)) == 45.0 and rowsums.tensor_sum(torch.zeros(0)) == 0.0


def test_della_probabilities_in_row_chunks_are_the_whole_tensors(monkeypatch):
    from omnimerge.methods import gta

    g = torch.Generator().manual_seed(8)
    tau = (torch.randn(50, 33, generator=g) * 4).round() / 4  # ties within rows
    whole = gta.della_keep_probabilities(tau, 0.5, 0.15)
    monkeypatch.setattr(gta, "PROB_ROWS", 100)
    assert torch.equal(gta.della_keep_probabilities(tau, 0.5, 0.15), whole)
    assert torch.equal(gta.della_keep_probabilities(tau[0], 0.5, 0.15), whole[0])
