"""Spectral / optimisation methods on realistic matrix shapes: exact vs fast path, per layer.

For each model size, the distinct language-layer matrix shapes are merged once (random low-rank
+ noise task vectors); a layer's time is the sum over its 7 matrices (q, k, v, o, gate, up, down).
Prints, per method and number of tasks T: seconds per layer for the fast and the exact path, their
ratio, the relative Frobenius error of the merged delta (fast vs exact), and the extrapolated time
of a whole backbone (layers x seconds per layer).

    python benchmarks/spectral.py                       # 2B shapes exact+fast, 7B shapes fast, T = 2 and 5
    python benchmarks/spectral.py --sizes 7b --exact-sizes 7b --tasks 2   # the 7B exact path (hours)
"""

from __future__ import annotations

import argparse
import time

import torch

from omnimerge.methods import MethodContext, get_method

# (rows, cols) -> matrices of that shape per layer;  Qwen2-VL-2B / 7B language backbones (28 layers)
SIZES = {
    "2b": {"layers": 28, "shapes": {(1536, 1536): 2, (256, 1536): 2, (8960, 1536): 2, (1536, 8960): 1}},
    "7b": {"layers": 28, "shapes": {(3584, 3584): 2, (512, 3584): 2, (18944, 3584): 2, (3584, 18944): 1}},
}
# method -> (fast parameters, exact/reference parameters)
METHODS = {
    "asdf": ({}, {"exact": True}),
    "iso_c": ({}, {"exact": True}),
    "tsv": ({}, {"exact": True}),
    "iso_cts": ({}, {"exact": True}),
    "swudi": ({}, {"solver": "dense"}),
    "aswudi": ({}, {"solver": "dense"}),
    "task_arithmetic": ({}, None),
    "ties": ({}, None),
}


def task_vectors(shape, n_tasks, rank, noise, seed):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    base = 0.02 * torch.randn(m, n, generator=g)
    taus = []
    for _ in range(n_tasks):
        low = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / rank**0.5
        taus.append(1e-3 * low + noise * 1e-3 * torch.randn(m, n, generator=g))
    return base, [base + t for t in taus]


def run_one(name, params, base, models, seed):
    method = get_method(name)
    defaults = {p.name: p.default for p in method.params}
    kw = {**defaults, **params}
    for p in method.params:
        if p.per_model:
            kw[p.name] = [kw[p.name]] * len(models) if not isinstance(kw[p.name], list) else kw[p.name]
    ctx = MethodContext("language.layers.0.mlp.up_proj.weight", torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    out = method(base, models, ctx, **kw)
    return out, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2b,7b")
    ap.add_argument("--exact-sizes", default="2b", help="sizes whose exact path is timed too (7B exact takes hours)")
    ap.add_argument("--tasks", default="2,5")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rank", type=int, default=64, help="rank of each task vector's low-rank part")
    ap.add_argument("--noise", type=float, default=0.1, help="noise level relative to the low-rank part")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    exact_sizes = set(filter(None, args.exact_sizes.split(",")))
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; task vectors: rank {args.rank} + noise "
          f"{args.noise}")
    for size in args.sizes.split(","):
        spec = SIZES[size]
        for n_tasks in map(int, args.tasks.split(",")):
            data = {shape: task_vectors(shape, n_tasks, args.rank, args.noise, seed=hash(shape) % 1000)
                    for shape in spec["shapes"]}
            for name in args.methods.split(","):
                fast_params, exact_params = METHODS[name]
                fast_s = exact_s = 0.0
                err_num = err_den = 0.0
                for shape, count in spec["shapes"].items():
                    base, models = data[shape]
                    fast, t = run_one(name, fast_params, base, models, seed=1)
                    fast_s += count * t
                    if exact_params is not None and size in exact_sizes:
                        exact, te = run_one(name, exact_params, base, models, seed=1)
                        exact_s += count * te
                        err_num += count * float((fast - exact).double().norm() ** 2)
                        err_den += count * float((exact - base).double().norm() ** 2)
                measured = exact_params is not None and size in exact_sizes
                row = {"size": size, "T": n_tasks, "method": name, "fast_s": fast_s,
                       "exact_s": exact_s if measured else None,
                       "ratio": exact_s / fast_s if measured and fast_s else None,
                       "rel_err": (err_num / err_den) ** 0.5 if measured and err_den else None,
                       "backbone_min": fast_s * spec["layers"] / 60}
                rows.append(row)
                print(f"{size} T={n_tasks} {name:16s} fast {fast_s:8.2f} s/layer"
                      + (f"  exact {exact_s:8.2f} s/layer  x{row['ratio']:.1f}  rel.err {row['rel_err']:.1e}"
                         if measured else "  exact (not timed)")
                      + f"  -> {spec['layers']} layers: {row['backbone_min']:.1f} min", flush=True)
    print("\n| size | T | method | fast s/layer | exact s/layer | exact/fast | rel. error | backbone (fast) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ex = f"{r['exact_s']:.2f}" if r["exact_s"] is not None else "—"
        ra = f"{r['ratio']:.1f}×" if r["ratio"] else "—"
        er = f"{r['rel_err']:.1e}" if r["rel_err"] is not None else "—"
        print(f"| {r['size']} | {r['T']} | {r['method']} | {r['fast_s']:.2f} | {ex} | {ra} | {er} | "
              f"{r['backbone_min']:.1f} min |")


if __name__ == "__main__":
    main()
