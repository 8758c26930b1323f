"""`omnimerge eval`: the lmms-eval command for each supported family (lmms-eval itself is not installed
here: it needs torchvision; the command is what we own)."""

from __future__ import annotations

import json
import shlex
import sys

import pytest

from omnimerge import OmnimergeError
from omnimerge.cli import main
from omnimerge.lmms_eval_runner import LMMS_MODELS, PAPER_TASKS, lmms_eval_command, run_lmms_eval


def _opts(cmd):
    return {a: cmd[i + 1] for i, a in enumerate(cmd) if a.startswith("--") and a != "--log_samples"}


def _checkpoint(tmp_path, model_type):
    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


@pytest.mark.parametrize("model_type, lmms", [("qwen2_vl", "qwen2_vl"), ("qwen2_5_vl", "qwen2_5_vl"),
                                              ("qwen3_vl", "qwen3_vl"), ("llava", "llava_hf"),
                                              ("internvl", "internvl_hf")])
def test_command_per_family(tmp_path, model_type, lmms):
    folder = _checkpoint(tmp_path, model_type)
    cmd = lmms_eval_command(folder, "chartqa, ocrbench", output=tmp_path / "logs", limit=8)
    assert cmd[:3] == [sys.executable, "-m", "lmms_eval"]
    opts = _opts(cmd)
    assert opts["--model"] == lmms == LMMS_MODELS[model_type]
    assert opts["--model_args"] == f"pretrained={folder.absolute()},device=cuda,device_map=auto"
    assert opts["--tasks"] == "chartqa,ocrbench" and opts["--batch_size"] == "1" and opts["--limit"] == "8"
    assert opts["--output_path"] == str(tmp_path / "logs") and "--log_samples" in cmd


def test_paper_tasks_cpu_and_extra_args(tmp_path):
    folder = _checkpoint(tmp_path, "qwen2_vl")
    cmd = lmms_eval_command(folder, ["paper", "chartqa", "mme"], device="cpu", model_args={"max_pixels": "200704"})
    opts = _opts(cmd)
    assert opts["--tasks"].split(",") == [*PAPER_TASKS.values(), "mme"]      # expanded, deduplicated
    assert opts["--model_args"].endswith("device=cpu,device_map=cpu,max_pixels=200704")


def test_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(OmnimergeError, match="no config.json"):
        lmms_eval_command(tmp_path, "chartqa")
    with pytest.raises(OmnimergeError, match="qwen2.*no lmms-eval mapping"):
        lmms_eval_command(_checkpoint(tmp_path, "qwen2"), "chartqa")
    folder = _checkpoint(tmp_path, "llava")
    with pytest.raises(OmnimergeError, match="no tasks"):
        lmms_eval_command(folder, " , ")
    with pytest.raises(OmnimergeError, match="cannot parse"):
        lmms_eval_command(folder, "mme", model_args={"x": "a,b"})
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(OmnimergeError, match=r"pip install 'omnimerge\[eval\]'"):
        run_lmms_eval(folder, "mme")


def test_cli_dry_run_and_missing_lmms_eval(tmp_path, capsys, monkeypatch):
    folder = _checkpoint(tmp_path, "qwen3_vl")
    assert main(["eval", str(folder), "--tasks", "paper", "--dry-run", "--model-arg", "max_pixels=1000"]) == 0
    cmd = shlex.split(capsys.readouterr().out.strip())
    assert cmd[cmd.index("--model") + 1] == "qwen3_vl" and "max_pixels=1000" in cmd[cmd.index("--model_args") + 1]
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert main(["eval", str(folder), "--tasks", "mme"]) == 2
    assert "lmms-eval is not installed" in capsys.readouterr().err
    assert main(["eval", str(folder), "--tasks", "mme", "--model-arg", "oops"]) == 2
