"""README's two set-up commands are the ones CI runs and the ones that exist."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_readmes_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = "pip install torch==2.13.0 -e '.[test]' && pytest -q"
    assert test_cmd in readme
    assert test_cmd in ci.splitlines()
    assert "pip install torch==2.13.0 -e . && omnimerge bench" in readme


def test_console_script_and_demo_command_exist():
    from omnimerge.cli import app

    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert {"merge", "inspect", "verify", "methods", "demo", "bench", "eval"} <= names
