"""Every output path writes the same bytes as before the streaming loop became one module.

The digests in tests/data/output_digests.json were taken from the code before the redesign (see
digest_cases.py); TIES-family cases pin ``trim: per_tensor``, the old behaviour."""

from __future__ import annotations

import json

import pytest

from digest_cases import CARD_CHANGED, CASES, DATA, RECIPE_FILES, build_inputs, digests, input_digests, run_case

WANT = json.loads(DATA.read_text())


@pytest.fixture(autouse=True)
def two_threads():
    """The digests were taken with torch's 2 threads (this project's machines): the SVDs of the LoRA paths
    round differently with another thread count, so pin it, whatever an earlier test left."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("digests")
    m = build_inputs(root / "in")
    assert input_digests(m, root) == WANT["inputs"], "the tiny input models changed: the digests no longer apply"
    return root, m


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_bytes_unchanged(models, name):
    root, m = models
    out = run_case(name, m, root / "out" / name)
    pins = CASES[name][3]
    want = {f: d for f, d in WANT["cases"][name].items() if not (pins and f.rsplit("/", 1)[-1] in RECIPE_FILES)}
    got = digests(out, root, pins)
    if name in CARD_CHANGED:
        assert got.pop("README.md") != want.pop("README.md")
    assert got == want
