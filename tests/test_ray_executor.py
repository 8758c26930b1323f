"""The Ray executor (--executor ray) on a local 2-worker Ray cluster: the same bytes as the local
executor, and a worker that dies has its shard retried."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

import omnimerge
from omnimerge.cli import main
from omnimerge.api import write_plan
from omnimerge.errors import OmnimergeError
from omnimerge.methods import registry
from omnimerge.plan import build_plan


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    # the tests' own functions travel to the workers by value (this file is not an installed module)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray.shutdown()


def files(folder: Path) -> dict[str, bytes]:
    """Every file of a merged model, report.json without its timings."""
    out = {}
    for p in sorted(folder.iterdir()):
        data = p.read_bytes()
        if p.name == "report.json":
            report = json.loads(data)
            report.pop("seconds")
            for t in report["tensors"].values():
                t.pop("seconds")
            data = json.dumps(report).encode()
        out[p.name] = data
    return out


def recipe(zoo, method: str, shard_size: str = "128KB", **params) -> dict:
    base = zoo.base("qwen2_vl")
    return {"method": method, "base": str(base), "models": [{"path": str(e)} for e in zoo.experts("qwen2_vl", 2)],
            "parameters": params, "components": {"vision": "merge"}, "shard_size": shard_size}


def test_ray_writes_the_same_bytes_as_the_local_executor(zoo, tmp_path, ray_cluster):
    r = recipe(zoo, "dare_ties", p=0.3, density=0.6)  # random drops and a top-k trim
    local = omnimerge.merge(r, tmp_path / "local")
    distributed = omnimerge.merge(r, tmp_path / "ray", executor="ray")
    assert len(local.plan.shards()) >= 4, "several shards, so that both workers write some"
    assert files(tmp_path / "ray") == files(tmp_path / "local")
    assert list(distributed.report) == list(local.report)  # the report in plan order
    shards = {t["shard"] for t in distributed.report.values()}
    assert len(shards) == len(local.plan.shards()) and "model.safetensors.index.json" in files(tmp_path / "ray")


def _die_once(base, models, ctx, flag: str = ""):
    """The average — but the first call anywhere kills its process (a worker lost mid-shard)."""
    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return sum(models) / len(models)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os._exit(1)


def test_a_worker_that_dies_has_its_shard_retried(zoo, tmp_path, ray_cluster):
    flag = tmp_path / "died"
    registry.register("_die_once", params=(registry.Param("flag", str, "", "flag file"),), needs_base=False,
                      reference="a test", summary="kills its worker once")(_die_once)
    try:
        r = recipe(zoo, "_die_once", flag=str(flag))
        omnimerge.merge(r, tmp_path / "ray", executor="ray")
        died = int(flag.read_text())
        assert died != os.getpid(), "a Ray worker died, not this process"
        omnimerge.merge(r, tmp_path / "local")  # the flag exists now: nothing dies
    finally:
        registry._REGISTRY.pop("_die_once")
    assert files(tmp_path / "ray") == files(tmp_path / "local")


@pytest.mark.parametrize("where", [5, 40])
def test_a_merge_error_in_a_worker_is_raised_and_leaves_nothing(zoo, tmp_path, ray_cluster, where):
    # small shards: many of them are being written by the other worker when the error is raised, and
    # the driver must wait for those to stop before it removes the temporary folder
    plan = build_plan(recipe(zoo, "ties", shard_size="32KB", density=0.5))
    assert len(plan.shards()) >= 8
    bad = [j for j in plan.jobs if j.action == "merge"][-where]
    bad.params = {**bad.params, "lambda": float("nan")}  # that tensor's merge makes NaN, in a worker
    with pytest.raises(OmnimergeError, match="NaN"):
        write_plan(plan, tmp_path / "out", executor="ray")
    assert list(tmp_path.iterdir()) == []


def test_without_ray_the_error_says_how_to_install_it(zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe(zoo, "task_arithmetic")))
    assert main(["merge", str(path), "-o", str(tmp_path / "out"), "--executor", "ray"]) == 2
    assert "pip install 'omnimerge[ray]'" in capsys.readouterr().err
    assert main(["merge", str(path), "-o", str(tmp_path / "out"), "--executor", "dask"]) == 2
    assert "unknown executor 'dask'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["merge_task_arithmetic_bf16", "merge_dare_ties"])
def test_ray_writes_the_pre_redesign_bytes(tmp_path, ray_cluster, name):
    from digest_cases import CASES, DATA, RECIPE_FILES, build_inputs, digests, run_case

    want = json.loads(DATA.read_text())["cases"][name]
    pins = CASES[name][3]
    out = run_case(name, build_inputs(tmp_path / "in"), tmp_path / "out" / name, executor="ray")
    assert digests(out, tmp_path, pins) == {f: d for f, d in want.items() if not (pins and f in RECIPE_FILES)}
