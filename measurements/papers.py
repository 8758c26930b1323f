"""Seconds and peak memory per matrix of the data-free methods from the papers (pcb, localize_stitch, widen,
lora_lego) on the language-layer shapes of Qwen2-VL-2B and -7B.

Each expert's task vector is a rank-``--rank`` product (a LoRA-like update) plus ``--noise`` times a dense
random matrix (its share of the Frobenius norm), on a random base of scale 0.02; ``lora_lego`` gets the
low-rank part alone (its experts are LoRAs). The methods are called directly on float32 tensors, as the
run calls them, one matrix at a time, with their statistics taken over that matrix (the global scopes of
``pcb`` and ``localize_stitch`` add a pre-pass of four and two streaming reads of the inputs, as TIES's global
trim does, and then the same per-matrix work). Peak memory is the process's VmHWM above the inputs, reset before each
call::

    python measurements/papers.py                        # 2B and 7B shapes, 3 experts
    python measurements/papers.py --sizes 2b --tasks 2,5 --methods pcb,widen
"""

from __future__ import annotations

import argparse
import time

import torch

from calibration_stats import reset_peak, rss  # this folder's scripts share their memory probes
from omnimerge.methods import MethodContext, get_method

SHAPES = {"2b": [(1536, 1536), (8960, 1536), (1536, 8960)], "7b": [(3584, 3584), (18944, 3584), (3584, 18944)]}
METHODS = ("pcb", "localize_stitch", "widen", "lora_lego")


def inputs(shape, tasks: int, rank: int, noise: float, seed: int, dense: bool):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    base = 0.02 * torch.randn(m, n, generator=g)
    models = []
    for _ in range(tasks):
        low = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
        low *= 0.2 * base.norm() / low.norm()
        tau = low
        if dense:
            d = torch.randn(m, n, generator=g)
            tau = low + d * (noise * low.norm() / d.norm())
        models.append(base + tau)
    return base, models


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2b,7b")
    ap.add_argument("--tasks", default="3")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rank", type=int, default=16, help="rank of each task vector's low-rank part")
    ap.add_argument("--noise", type=float, default=0.1, help="dense noise, relative to the low-rank part's norm")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, rank {args.rank}, noise {args.noise}")
    print(f"{'size':>4} {'T':>2} {'method':<16} {'shape':>12} {'seconds':>8} {'peak MiB':>9} {'info'}")
    for size in args.sizes.split(","):
        for tasks in map(int, args.tasks.split(",")):
            for shape in SHAPES[size]:
                for method in args.methods.split(","):
                    base, models = inputs(shape, tasks, args.rank, args.noise, seed=0, dense=method != "lora_lego")
                    ctx = MethodContext("language.layers.0.mlp.up_proj.weight", torch.Generator().manual_seed(0))
                    reset_peak()
                    before = rss("VmRSS")
                    t0 = time.perf_counter()
                    out = get_method(method)(base, models, ctx)
                    seconds = time.perf_counter() - t0
                    peak = (rss("VmHWM") - before) / 2**20
                    assert torch.isfinite(out).all()
                    dims = f"{shape[0]}x{shape[1]}"
                    print(f"{size:>4} {tasks:>2} {method:<16} {dims:>12} {seconds:8.2f} {peak:9.0f} {ctx.info}",
                          flush=True)
                    del base, models, out


if __name__ == "__main__":
    main()
