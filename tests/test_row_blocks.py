"""Element-wise methods merged in row blocks (run.blocks) write the bytes of the whole-tensor merge, whatever
the block size: TIES's thresholds (global, and per tensor with ties at the threshold) from the pre-pass,
DARE's masks keyed by element, rows past a smaller vocabulary copied from the skeleton."""

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
]


@pytest.mark.parametrize("method,params", CASES)
def test_blocks_give_the_bytes_of_the_whole_tensor(models, tmp_path, monkeypatch, method, params):
    base, experts = models
    recipe = {"method": method, "base": str(base), "models": [{"path": str(e)} for e in experts],
              "parameters": params, "seed": 5, "components": {"embed": "merge", "lm_head": "merge"}}
    whole, report_whole = _merge(recipe, tmp_path / "whole", monkeypatch, None)
    for block_bytes in (3000, 20000):  # blocks of a few rows (not dividing the row counts), and of many
        got, report = _merge(recipe, tmp_path / f"b{block_bytes}", monkeypatch, block_bytes)
        assert got.keys() == whole.keys()
        for key, t in whole.items():
            assert torch.equal(got[key], t), (block_bytes, key)
        blocked = {k: r for k, r in report.items() if r.get("row_blocks", 1) > 1}
        assert "model.embed_tokens.weight" in blocked and len(blocked) >= 4
        for key, r in blocked.items():
            assert r["norm"] == pytest.approx(report_whole[key]["norm"], rel=1e-5)
            assert r["delta_norm"] == pytest.approx(report_whole[key]["delta_norm"], rel=1e-5, abs=1e-6)


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
    for name in ("breadcrumbs", "della", "slerp", "model_stock", "tsv", "iso_c"):
        assert not get_method(name).blockable({})


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
