"""Merging streams tensor by tensor: peak memory is bounded by a few tensors, not by the models."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from omnimerge.tiny import build_tiny, make_expert

CHILD = textwrap.dedent("""
    import json, sys
    import omnimerge

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    from omnimerge.plan import build_plan
    from omnimerge.engine import execute

    recipe = json.loads(sys.argv[1])
    plan = build_plan(recipe)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    before = status("VmRSS")
    execute(plan, sys.argv[2], progress=False)
    after = status("VmHWM")
    largest = max(j.nbytes for j in plan.jobs)
    inputs = sum(j.nbytes for j in plan.jobs) * len(plan.inputs())
    print(json.dumps({"growth": after - before, "largest": largest, "inputs": inputs}))
""")


def test_peak_memory_is_bounded_by_tensors_not_models(tmp_path):
    # 8 layers of 1024x4096 MLP matrices: about 420 MB per model in float32, 16 MB per largest tensor.
    base = build_tiny("qwen2", tmp_path / "base", hidden_size=1024, intermediate_size=4096, num_layers=8,
                      tokenizer=False)
    experts = [make_expert(base, tmp_path / f"e{i}", seed=i) for i in (1, 2)]
    recipe = {"method": "task_arithmetic", "base": str(base), "models": [{"path": str(e)} for e in experts]}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(recipe), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    # reading ahead doubles the inputs in flight: 2 x 3 inputs + result + temporaries = 16 largest tensors
    cap = 16 * r["largest"]
    assert r["inputs"] > 5 * cap, "the inputs add up to several times the cap"
    print(f"peak RSS growth {r['growth'] / 2**20:.0f} MiB, inputs {r['inputs'] / 2**20:.0f} MiB")
    assert r["growth"] < cap, f"peak RSS grew by {r['growth'] / 2**20:.0f} MiB (cap {cap / 2**20:.0f} MiB)"
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > 400e6
