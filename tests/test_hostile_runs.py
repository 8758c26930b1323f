"""Interrupted and concurrent runs, end to end: Ctrl-C, kill -9, two runs on one output, --device."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from omnimerge.cli import main
from conftest import leftovers

SRC = str(Path(__file__).resolve().parents[1] / "src")

HOLD = """
import os, signal, sys, time
from omnimerge.checkpoints.output import OutputFolder
with OutputFolder(sys.argv[1], force=False) as tmp:
    (tmp / "model.safetensors").write_bytes(b"half-written")
    print("ready", flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)
"""

SLOW_MERGE = """
import signal, sys, time
# as in a terminal: a run started in the background of a non-interactive shell (CI) inherits SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
import omnimerge.checkpoints.safetensors_io as io
real = io.StreamingSafetensorsWriter.write
def slow(self, name, tensor):
    time.sleep(0.1)
    return real(self, name, tensor)
io.StreamingSafetensorsWriter.write = slow
from omnimerge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def python(code: str, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


@pytest.fixture
def job(zoo, tmp_path):
    base, experts = zoo.base("qwen2"), zoo.experts("qwen2")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "ties", "base": str(base),
                                      "models": [{"path": str(e)} for e in experts]}))
    return recipe


def run(capsys, *args) -> tuple[int, str]:
    code = main(list(map(str, args)))
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err
    return code, err


def test_a_second_merge_on_a_busy_output_fails_fast_naming_the_first(job, tmp_path, capsys):
    holder = python(HOLD, str(tmp_path / "out"), "hold")
    try:
        assert holder.stdout.readline().strip() == "ready"
        code, err = run(capsys, "merge", job, "-o", tmp_path / "out", "--force", "--no-progress")
        assert code == 2 and f"another omnimerge run (pid {holder.pid} on" in err, err
        tmp = [p for p in tmp_path.iterdir() if ".omnimerge-tmp-" in p.name]
        assert len(tmp) == 1 and (tmp[0] / "model.safetensors").read_bytes() == b"half-written"  # untouched
    finally:
        holder.kill()
        holder.wait()


def test_the_next_run_removes_what_a_killed_run_left(job, tmp_path, capsys):
    holder = python(HOLD, str(tmp_path / "out"), "die")
    assert holder.stdout.readline().strip() == "ready"
    assert holder.wait() == -signal.SIGKILL
    assert len(leftovers(tmp_path)) == 2  # its temporary folder and its lock file
    code, err = run(capsys, "merge", job, "-o", tmp_path / "out", "--no-progress")
    assert code == 0, err
    assert "removed" in err and ".out.omnimerge-tmp-" in err and f"pid {holder.pid}" in err
    assert leftovers(tmp_path) == [] and (tmp_path / "out" / "model.safetensors").is_file()


def test_ctrl_c_during_a_merge(job, tmp_path):
    # each tensor's write takes 2 s, so that the signal surely comes while the output is being written
    proc = python(SLOW_MERGE.replace("time.sleep(0.1)", "time.sleep(2.0)"), "merge", str(job), "-o",
                  str(tmp_path / "out"), "--no-progress")
    deadline = time.time() + 120
    while not any(".omnimerge-tmp-" in p.name for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)  # well inside the writing
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted; no output was left behind" in err and "Traceback" not in err
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def test_two_merges_at_once_never_both_claim_success(job, tmp_path):
    """Started together on one output: one writes it, the other fails with exit 2 (busy, or the
    output exists by then) — never two successes of which one was silently lost."""
    procs = [python(SLOW_MERGE, "merge", str(job), "-o", str(tmp_path / "out"), "--no-progress") for _ in range(2)]
    results = [(p.wait(timeout=300), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "another omnimerge run" in loser or "exists" in loser, loser
    assert leftovers(tmp_path) == [] and json.loads((tmp_path / "out" / "report.json").read_text())["tensors"]


@pytest.mark.parametrize("device,words", [("cdua", ["'cdua' is not a device", "cpu, cuda or cuda:N"]),
                                          ("cpu:0", ["'cpu:0' is not a device"]),
                                          ("cuda:x", ["not a device"]),
                                          ("cuda:99", ["cuda:99"])])
def test_a_device_that_is_not_one(job, tmp_path, capsys, device, words):
    code, err = run(capsys, "merge", job, "-o", tmp_path / "out", "--device", device)
    assert code == 2
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "out").exists()
    code, err = run(capsys, "extract", str(job.parent), "--base", str(job.parent), "--dry-run", "--device", device)
    assert code == 2 and "--device" in err


def test_sigterm_during_a_merge(job, tmp_path):
    # each tensor's write takes 2 s, so that the signal surely comes while the output is being written
    proc = python(SLOW_MERGE.replace("time.sleep(0.1)", "time.sleep(2.0)"), "merge", str(job), "-o",
                  str(tmp_path / "out"), "--no-progress")
    deadline = time.time() + 120
    while not any(".omnimerge-tmp-" in p.name for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    proc.terminate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and leftovers(tmp_path) == [] and not (tmp_path / "out").exists()
