"""The output folder's clean-up: nothing is left behind, even when a file appears during the removal."""

from __future__ import annotations

import os
import shutil

import pytest

from omnimerge.checkpoints import output
from omnimerge.checkpoints.output import OutputFolder, remove_tree


def _racing_rmtree(real):
    """An rmtree during whose first run another process creates a file in the folder (a worker that
    finishes a shard late): the files listed are removed, the new one stays, the final rmdir fails."""
    calls = []

    def rmtree(path, ignore_errors=False):
        calls.append(path)
        if len(calls) > 1:
            return real(path, ignore_errors=ignore_errors)
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        (path / "model-00002-of-00004.safetensors").write_bytes(b"late")
        try:
            os.rmdir(path)
        except OSError:
            if not ignore_errors:
                raise

    return rmtree, calls


def test_remove_tree_repeats_until_the_folder_is_gone(tmp_path, monkeypatch):
    folder = tmp_path / ".out.omnimerge-tmp-1234"
    folder.mkdir()
    (folder / "model-00001-of-00004.safetensors").write_bytes(b"x")
    fake, calls = _racing_rmtree(shutil.rmtree)
    monkeypatch.setattr(output.shutil, "rmtree", fake)
    remove_tree(folder)
    assert not folder.exists() and len(calls) == 2


def test_an_aborted_output_leaves_nothing_even_with_a_late_file(tmp_path, monkeypatch):
    fake, calls = _racing_rmtree(shutil.rmtree)
    monkeypatch.setattr(output.shutil, "rmtree", fake)
    with pytest.raises(RuntimeError, match="interrupted"):
        with OutputFolder(tmp_path / "out", force=False) as tmp:
            (tmp / "model-00001-of-00004.safetensors").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == [] and len(calls) == 2


def test_remove_tree_of_a_missing_folder_is_a_no_op(tmp_path):
    remove_tree(tmp_path / "never-made")
    assert list(tmp_path.iterdir()) == []
