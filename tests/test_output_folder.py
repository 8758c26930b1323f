"""The output folder's clean-up: nothing is left behind, even when a file appears during the removal."""

from __future__ import annotations

import json
import os
import shutil
import socket

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


# --- units, --force, the final rename ------------------------------------------------------------
@pytest.mark.parametrize("n,text", [(0, "0 B"), (999, "999 B"), (48_000, "48 kB"), (491_520, "492 kB"),
                                    (3_210_000, "3.21 MB"), (1.5e9, "1.5 GB"), (16.04e9, "16 GB"),
                                    (2e12, "2 TB"), (5e15, "5000 TB")])
def test_human_size(n, text):
    assert output.human_size(n) == text


def test_disk_space_message_uses_fitting_units(tmp_path, monkeypatch):
    class Usage:
        total, used, free = 10**9, 10**9 - 1000, 1000

    monkeypatch.setattr(output.shutil, "disk_usage", lambda p: Usage)
    with pytest.raises(output.OmnimergeError) as e:
        OutputFolder(tmp_path / "out", force=False).check_space(491_520)
    assert "about 492 kB" in str(e.value) and "1 kB are free" in str(e.value) and "0.00 GB" not in str(e.value)


def omnimerge_output(folder, method="average"):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w")
    (folder / "omnimerge.yaml").write_text(f"method: {method}\nmodels:\n- path: /m\n")
    return folder


def test_foreign_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert output.foreign_file(empty) is None
    ours = omnimerge_output(tmp_path / "ours")
    assert output.foreign_file(ours) is None
    report_only = tmp_path / "report"
    report_only.mkdir()
    (report_only / "report.json").write_text('{"omnimerge_version": "0.1.0", "tensors": {}}')
    assert output.foreign_file(report_only) is None
    skeletons = tmp_path / "skeletons"  # a `skeletons:` output: one omnimerge output per subfolder
    omnimerge_output(skeletons / "vision")
    omnimerge_output(skeletons / "audio")
    assert output.foreign_file(skeletons) is None
    (skeletons / "notes.txt").write_text("mine")
    assert output.foreign_file(skeletons) == "notes.txt"
    mine = tmp_path / "mine"
    (mine / "photos").mkdir(parents=True)
    (mine / "photos" / "cat.jpg").write_bytes(b"x")
    assert output.foreign_file(mine) == "photos/cat.jpg"
    fake = tmp_path / "fake"  # files named like omnimerge's are not enough
    fake.mkdir()
    (fake / "report.json").write_text('{"mine": true}')
    (fake / "omnimerge.yaml").write_text("just: notes\n")
    assert output.foreign_file(fake) == "omnimerge.yaml"


def test_force_refuses_a_folder_omnimerge_did_not_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(output.OmnimergeError, match="would have deleted .*thesis.tex"):
        OutputFolder(out, force=True)
    assert (out / "thesis.tex").read_text() == "years of work"


def test_force_replaces_an_omnimerge_output_only_at_commit(tmp_path):
    out = omnimerge_output(tmp_path / "out")
    with pytest.raises(RuntimeError):
        with OutputFolder(out, force=True) as tmp:
            (tmp / "model.safetensors").write_bytes(b"new")
            raise RuntimeError("failed before commit")
    assert (out / "model.safetensors").read_bytes() == b"w"  # a failed run replaces nothing
    folder = OutputFolder(out, force=True)
    with folder as tmp:
        (tmp / "model.safetensors").write_bytes(b"new")
        folder.commit()
    assert (out / "model.safetensors").read_bytes() == b"new" and not (out / "omnimerge.yaml").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_output_that_appears_during_the_run_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    folder = OutputFolder(out, force=False)
    with pytest.raises(output.OmnimergeError, match="appeared while this run was writing"):
        with folder as tmp:
            (tmp / "model.safetensors").write_bytes(b"merged")
            out.mkdir()  # another program writes OUT meanwhile
            (out / "theirs.txt").write_text("theirs")
            folder.commit()
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_with_force_an_output_that_changed_during_the_run_is_not_replaced(tmp_path):
    out = omnimerge_output(tmp_path / "out")
    folder = OutputFolder(out, force=True)
    with pytest.raises(output.OmnimergeError, match="changed while this run was writing"):
        with folder as tmp:
            (tmp / "model.safetensors").write_bytes(b"merged")
            (out / "omnimerge.yaml").unlink()
            (out / "results.csv").write_text("mine")  # the user put work of theirs there meanwhile
            folder.commit()
    assert (out / "results.csv").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_empty_folder_is_used(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    folder = OutputFolder(out, force=False)
    with folder as tmp:
        (tmp / "model.safetensors").write_bytes(b"merged")
        folder.commit()
    assert (out / "model.safetensors").read_bytes() == b"merged"


def test_rename_no_replace(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()  # even an empty folder is not replaced (os.rename would)
    with pytest.raises(FileExistsError):
        output.rename_no_replace(tmp_path / "a", tmp_path / "b")
    output.rename_no_replace(tmp_path / "a", tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "c"]


def test_output_inside_an_input_folder_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(output.OmnimergeError, match="inside the input folder"):
        OutputFolder(model / "merged", force=False, protect=[model])
    with pytest.raises(output.OmnimergeError, match="is, or contains, the input"):
        OutputFolder(tmp_path, force=True, protect=[model])
    assert list(model.iterdir()) == []


def test_an_output_that_is_a_link_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "out")
    with pytest.raises(output.OmnimergeError, match="is a link"):
        OutputFolder(tmp_path / "out", force=True)


# --- one run per output; what dead runs left ------------------------------------------------------
def test_a_second_run_on_the_same_output_fails_naming_the_first(tmp_path):
    first = OutputFolder(tmp_path / "out", force=False)
    second = OutputFolder(tmp_path / "out", force=False)  # checked before the first run started
    with first:
        with pytest.raises(output.OmnimergeError, match=f"another omnimerge run \\(pid {os.getpid()} on "):
            OutputFolder(tmp_path / "out", force=False)  # fails at once, before any work
        with pytest.raises(output.OmnimergeError, match="being written by another omnimerge run"):
            with second:  # and when it got past the first check
                pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_lock_is_released_and_removed(tmp_path):
    folder = OutputFolder(tmp_path / "out", force=False)
    with folder as tmp:
        lock = tmp_path / ".out.omnimerge-lock"
        assert lock.is_file()
        owner = json.loads(lock.read_text())
        assert owner["pid"] == os.getpid() and owner["tmp"] == tmp.name
        folder.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with OutputFolder(tmp_path / "other", force=False):  # and can be taken again
        pass


def test_stale_temporary_folders_are_removed_by_the_next_run(tmp_path, capsys):
    dead = {"pid": 2**22 + 12345, "host": socket.gethostname(), "start": "1", "since": "then",
            "tmp": ".out.omnimerge-tmp-deadbeef"}
    (tmp_path / ".out.omnimerge-lock").write_text(json.dumps(dead))
    (tmp_path / ".out.omnimerge-tmp-deadbeef").mkdir()
    (tmp_path / ".out.omnimerge-tmp-deadbeef" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".out.omnimerge-old-0badf00d").mkdir()
    (tmp_path / ".other.omnimerge-tmp-12345678").mkdir()  # another output's: not this run's business
    folder = OutputFolder(tmp_path / "out", force=False)  # a dead owner does not block
    with folder:
        folder.commit()
    err = capsys.readouterr().err
    assert f"removed {tmp_path / '.out.omnimerge-tmp-deadbeef'}" in err and f"pid {dead['pid']}" in err
    assert ".out.omnimerge-old-0badf00d" in err and "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.omnimerge-tmp-12345678", "out"]


def test_run_alive():
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": output._process_start(os.getpid())}
    assert output.run_alive(me) is True
    assert output.run_alive(me | {"start": "0"}) is False  # the pid was reused by another process
    assert output.run_alive(me | {"pid": 2**22 + 12345}) is False
    assert output.run_alive(me | {"host": "elsewhere.example"}) is None


def test_a_failed_final_rename_puts_the_earlier_output_back(tmp_path, monkeypatch):
    out = omnimerge_output(tmp_path / "out")

    def fail(src, dst):
        raise OSError(5, "Input/output error")

    folder = OutputFolder(out, force=True)
    with pytest.raises(OSError, match="Input/output error"):
        with folder as tmp:
            (tmp / "model.safetensors").write_bytes(b"new")
            monkeypatch.setattr(output, "rename_no_replace", fail)
            folder.commit()
    assert (out / "model.safetensors").read_bytes() == b"w" and (out / "omnimerge.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
