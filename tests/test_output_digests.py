"""Every output path writes the same bytes as before the streaming loop became one module.

The digests in tests/data/output_digests.json were taken from the code before the redesign (see
digest_cases.py); TIES-family cases pin ``trim: per_tensor``, the old behaviour."""

from __future__ import annotations

import json

import pytest

from digest_cases import CASES, DATA, build_inputs, digests, input_digests, run_case

WANT = json.loads(DATA.read_text())


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
    assert digests(out, root) == WANT["cases"][name]
