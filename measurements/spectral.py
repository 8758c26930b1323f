"""Spectral / optimisation methods on realistic matrix shapes: exact vs fast path, per layer.

For each model size, the distinct language-layer matrix shapes are merged once (random low-rank
+ noise task vectors); a layer's time is the sum over its 7 matrices (q, k, v, o, gate, up, down).
Prints, per method and number of tasks T: seconds per layer for the fast and the exact path — wall
clock and CPU (time.process_time of this process, all threads) — their ratio, the relative
Frobenius error of each path's merged delta, the extrapolated time of a whole backbone
(layers x seconds per layer), and how much of the fast path's time is spent inside LAPACK's dense
decompositions (torch.linalg eigh / eigvalsh / svd / svdvals): the eigendecompositions a method's
definition needs are a floor that no rearrangement of the other work removes on this machine.
Each method's line also prints its **ratio to that decomposition floor** (fast-path wall seconds ÷
the wall seconds spent in those decompositions during the same call, at the precision the fast path
runs them: float64 for the Gram eigendecompositions): the CPU target is ≤ 1.3×, with the relative
error against float64 ≤ 1e-4. Absolute minutes vary about 2× between machines: they are printed
with the machine's calibration line, as context, not as the target.

The errors are measured against the definition computed in float64: the exact path run on float64
copies of the same (float32) task vectors. Both float32 paths round, and where a method amplifies
rounding (a polar factor of an ill-conditioned matrix) the float32 exact path is itself off; the
fast path's error against the float32 exact path would then measure the exact path's rounding too.
The load average is printed at the start and the end: on a shared machine wall seconds grow with
the load, CPU seconds much less.

On a machine shared with other processes, run it with OMP_WAIT_POLICY=PASSIVE: with the default
(spinning) policy, LAPACK's eigh and SVD, made of many short parallel regions, slowed down 10-15x
under a load of 8 on 2 cores (eigh 2048²: 33.8 s against 2.3 s wall), and their CPU seconds 10x.

    python measurements/spectral.py                       # 2B shapes exact+fast, 7B shapes fast, T = 2 and 5
    python measurements/spectral.py --sizes 7b --exact-sizes 7b --tasks 2   # the 7B exact path (hours)
    python measurements/spectral.py --methods asdf,aswudi --exact-sizes none   # fast vs randomized

``solver: randomized`` (asdf, aswudi; opt-in and approximate) is timed beside the fast path
and its error taken against the same float64 truth: the exact path in float64 where that size's
exact path is measured, else the fast path run on float64 copies (the same numbers to ~1e-10).
"""

from __future__ import annotations

import argparse
import json
import os
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
# the opt-in approximate route: its speed-up over the fast path and its error against float64
RANDOMIZED = {name: {"solver": "randomized"} for name in ("asdf", "aswudi")}


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def calibration() -> str:
    """Seconds of two reference operations, so that runs on different machines can be compared."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2048, 2048, generator=g, dtype=torch.float64)
    sym = a @ a.mT
    t0 = time.perf_counter()
    torch.linalg.eigh(sym)
    eigh_s = time.perf_counter() - t0
    b = a.float()
    t0 = time.perf_counter()
    b @ b
    mm_s = time.perf_counter() - t0
    return f"float64 eigh 2048²: {eigh_s:.2f} s, float32 matmul 2048³: {mm_s:.3f} s"


def task_vectors(shape, n_tasks, rank, noise, seed):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    base = 0.02 * torch.randn(m, n, generator=g)
    taus = []
    for _ in range(n_tasks):
        low = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / rank**0.5
        taus.append(1e-3 * low + noise * 1e-3 * torch.randn(m, n, generator=g))
    return base, [base + t for t in taus]


DECOMPOSITIONS = ("eigh", "eigvalsh", "svd", "svdvals")


class DecompositionClock:
    """Wall seconds spent inside torch.linalg's dense decompositions (LAPACK: eigh, eigvalsh, svd,
    svdvals) while active. The spectral methods' fast paths cannot avoid the eigendecompositions
    their definitions need (a per-task top-⌊r/T⌋ basis for TSV, C's eigenvectors for the WUDI
    family), so this is the floor that a faster implementation on the same machine would still pay."""

    def __init__(self):
        self.seconds = 0.0
        self._saved = {}

    def __enter__(self):
        for name in DECOMPOSITIONS:
            fn = getattr(torch.linalg, name)
            self._saved[name] = fn

            def timed(*a, _fn=fn, **k):
                t0 = time.perf_counter()
                try:
                    return _fn(*a, **k)
                finally:
                    self.seconds += time.perf_counter() - t0

            setattr(torch.linalg, name, timed)
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(torch.linalg, name, fn)


def run_one(name, params, base, models, seed):
    """(merged tensor, wall seconds, CPU seconds, seconds in dense decompositions, report info) of one call."""
    method = get_method(name)
    defaults = {p.name: p.default for p in method.params}
    kw = {**defaults, **params}
    for p in method.params:
        if p.per_model:
            kw[p.name] = [kw[p.name]] * len(models) if not isinstance(kw[p.name], list) else kw[p.name]
    ctx = MethodContext("language.layers.0.mlp.up_proj.weight", torch.Generator().manual_seed(seed))
    with DecompositionClock() as clock:
        t0, c0 = time.perf_counter(), time.process_time()
        out = method(base, models, ctx, **kw)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return out, wall, cpu, clock.seconds, ctx.info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2b,7b")
    ap.add_argument("--exact-sizes", default="2b", help="sizes whose exact path is timed too (7B exact takes hours)")
    ap.add_argument("--tasks", default="2,5")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rank", type=int, default=64, help="rank of each task vector's low-rank part")
    ap.add_argument("--noise", type=float, default=0.1, help="noise level relative to the low-rank part")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-randomized", action="store_true", help="skip the `solver: randomized` runs")
    ap.add_argument("--json", help="also write the rows (and per-shape timings) to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    exact_sizes = set(filter(None, args.exact_sizes.split(",")))
    rows = []
    start_wall, start_load = time.perf_counter(), loadavg()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}; task vectors: rank {args.rank} + noise {args.noise}; "
          f"load average at start: {start_load}", flush=True)
    print(f"machine: {calibration()}", flush=True)
    for size in args.sizes.split(","):
        spec = SIZES[size]
        for n_tasks in map(int, args.tasks.split(",")):
            data = {shape: task_vectors(shape, n_tasks, args.rank, args.noise, seed=hash(shape) % 1000)
                    for shape in spec["shapes"]}
            for name in args.methods.split(","):
                fast_params, exact_params = METHODS[name]
                measured = exact_params is not None and size in exact_sizes
                randomized = None if args.no_randomized else RANDOMIZED.get(name)
                fast_s = fast_c = fast_d = exact_s = exact_c = rand_s = 0.0
                err_num = exact_num = err_den = rand_num = 0.0
                shapes = []
                for shape, count in spec["shapes"].items():
                    base, models = data[shape]
                    fast, t, c, d, info = run_one(name, fast_params, base, models, seed=1)
                    fast_s += count * t
                    fast_c += count * c
                    fast_d += count * d
                    entry = {"shape": list(shape), "count": count, "fast_s": t, "fast_cpu_s": c, "fast_decomp_s": d,
                             "route": info.get("route") or info.get("path")}
                    line = (f"    {size} T={n_tasks} {name:8s} {shape[0]:>5}x{shape[1]:<5} "
                            f"fast {t:8.2f} s (CPU {c:8.2f}, decomp. {d:7.2f})")
                    if measured:
                        exact, te, ce, _, _ = run_one(name, exact_params, base, models, seed=1)
                        truth, *_ = run_one(name, exact_params, base.double(), [x.double() for x in models], seed=1)
                        exact_s += count * te
                        exact_c += count * ce
                        den = float((truth - base.double()).norm() ** 2)
                        num = float((fast.double() - truth).norm() ** 2)
                        num_exact = float((exact.double() - truth).norm() ** 2)
                        err_num += count * num
                        exact_num += count * num_exact
                        err_den += count * den
                        entry.update(exact_s=te, exact_cpu_s=ce, rel_err=(num / den) ** 0.5 if den else None,
                                     exact_rel_err=(num_exact / den) ** 0.5 if den else None)
                        line += (f"  exact {te:8.2f} s (CPU {ce:8.2f})  rel.err fast {entry['rel_err']:.1e}"
                                 f" exact {entry['exact_rel_err']:.1e}")
                        del exact
                    if randomized is not None:
                        approx, tr, cr, _, _ = run_one(name, randomized, base, models, seed=1)
                        if not measured:  # the float64 truth from the fast path (the same numbers, to ~1e-10)
                            truth, *_ = run_one(name, fast_params, base.double(), [x.double() for x in models],
                                                seed=1)
                            den = float((truth - base.double()).norm() ** 2)
                            num = float((fast.double() - truth).norm() ** 2)
                            err_num += count * num
                            err_den += count * den
                        num_r = float((approx.double() - truth).norm() ** 2)
                        rand_s += count * tr
                        rand_num += count * num_r
                        entry.update(randomized_s=tr, randomized_cpu_s=cr,
                                     randomized_rel_err=(num_r / den) ** 0.5 if den else None)
                        line += (f"  randomized {tr:8.2f} s (CPU {cr:8.2f})  rel.err randomized "
                                 f"{entry['randomized_rel_err']:.1e} fast {(num / den) ** 0.5 if den else 0:.1e}")
                        del approx
                    if measured or randomized is not None:
                        del truth
                    del fast
                    shapes.append(entry)
                    print(line + (f"  [{entry['route']}]" if entry["route"] else ""), flush=True)
                row = {"size": size, "T": n_tasks, "method": name, "fast_s": fast_s, "fast_cpu_s": fast_c,
                       "exact_s": exact_s if measured else None, "exact_cpu_s": exact_c if measured else None,
                       "ratio": exact_s / fast_s if measured and fast_s else None,
                       "rel_err": (err_num / err_den) ** 0.5 if err_den else None,
                       "exact_rel_err": (exact_num / err_den) ** 0.5 if measured and err_den else None,
                       "backbone_min": fast_s * spec["layers"] / 60,
                       "backbone_cpu_min": fast_c * spec["layers"] / 60, "fast_decomp_s": fast_d,
                       "backbone_decomp_min": fast_d * spec["layers"] / 60,
                       "over_floor": fast_s / fast_d if fast_d > 0 else None, "load": loadavg(), "shapes": shapes,
                       "randomized_s": rand_s if randomized is not None else None,
                       "randomized_speedup": fast_s / rand_s if randomized is not None and rand_s else None,
                       "randomized_rel_err": (rand_num / err_den) ** 0.5 if randomized is not None and err_den
                       else None}
                rows.append(row)
                print(f"{size} T={n_tasks} {name:16s} fast {fast_s:8.2f} s/layer (CPU {fast_c:8.2f})"
                      + (f"  exact {exact_s:8.2f} s/layer (CPU {exact_c:8.2f})  x{row['ratio']:.1f}  "
                         f"rel.err fast {row['rel_err']:.1e} exact {row['exact_rel_err']:.1e}" if measured
                         else "  exact (not timed)")
                      + f"  -> {spec['layers']} layers: {row['backbone_min']:.1f} min"
                      + f" (CPU {row['backbone_cpu_min']:.1f}"
                      + f", decompositions {row['backbone_decomp_min']:.1f})"
                      + (f"  / floor {row['over_floor']:.2f}x" if row["over_floor"] else "  / floor -")
                      + (f"  randomized {rand_s:.2f} s/layer, x{row['randomized_speedup']:.2f} faster, rel.err "
                         f"{row['randomized_rel_err']:.1e} (fast {row['rel_err']:.1e})" if randomized is not None else "")
                      + f"  load {row['load']}", flush=True)
    end_load = loadavg()
    print(f"\nload average at start: {start_load}; at end: {end_load}; {time.perf_counter() - start_wall:.0f} s in all")
    print("\n| size | T | method | fast s/layer (CPU s) | exact s/layer (CPU s) | exact/fast | rel. error fast "
          "| rel. error exact | backbone, fast: wall (CPU) | of it in decompositions | fast / decomposition floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ex = f"{r['exact_s']:.1f} ({r['exact_cpu_s']:.1f})" if r["exact_s"] is not None else "—"
        ra = f"{r['ratio']:.1f}×" if r["ratio"] else "—"
        er = f"{r['rel_err']:.1e}" if r["rel_err"] is not None else "—"
        ee = f"{r['exact_rel_err']:.1e}" if r["exact_rel_err"] is not None else "—"
        fl = f"{r['over_floor']:.2f}×" if r["over_floor"] else "—"
        print(f"| {r['size']} | {r['T']} | {r['method']} | {r['fast_s']:.1f} ({r['fast_cpu_s']:.1f}) | {ex} | {ra} "
              f"| {er} | {ee} | {r['backbone_min']:.1f} min ({r['backbone_cpu_min']:.1f}) "
              f"| {r['backbone_decomp_min']:.1f} min ({r['fast_decomp_s'] / r['fast_s'] if r['fast_s'] else 0:.0%}) "
              f"| {fl} |")
    rand_rows = [r for r in rows if r["randomized_s"] is not None]
    if rand_rows:
        print("\n| size | T | method | randomized s/layer | fast / randomized | rel. error randomized "
              "| rel. error fast | backbone, randomized |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rand_rows:
            print(f"| {r['size']} | {r['T']} | {r['method']} | {r['randomized_s']:.1f} | {r['randomized_speedup']:.2f}× "
                  f"| {r['randomized_rel_err']:.1e} | {r['rel_err']:.1e} "
                  f"| {r['randomized_s'] * SIZES[r['size']]['layers'] / 60:.1f} min |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "load_start": start_load, "load_end": end_load, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
