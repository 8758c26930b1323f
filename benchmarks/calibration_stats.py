"""Peak memory and time of the statistics stage (data-aware merging) on a Qwen2-VL-shaped model.

Builds a randomly initialised model of the chosen shape in float32 (no download), then runs the stage's
collectors on synthetic text samples and prints, per statistic, the seconds, the number of parts (passes
over the samples that the memory budget asked for) and the peak RSS above the loaded model::

    python benchmarks/calibration_stats.py                       # Qwen2-VL-2B shape, 4 samples of 128 tokens
    python benchmarks/calibration_stats.py --shape small --samples 8 --tokens 256 --budget-mib 512

Peak RSS is the process's VmHWM, reset before each measurement (``/proc/self/clear_refs``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming import SHAPES, configs  # noqa: E402  (the benchmark shapes, shared)

from omnimerge.calibration.collect import collect  # noqa: E402


def rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-vl-2b")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--kinds", default="gram,fisher")
    ap.add_argument("--budget-mib", type=int, default=2048, help="accumulator bytes per pass")
    args = ap.parse_args(argv)
    import transformers

    torch.manual_seed(0)
    cfg, _ = configs(SHAPES[args.shape])
    cfg.dtype = "float32"
    t0 = time.perf_counter()
    with torch.device("cpu"):
        model = getattr(transformers, cfg.architectures[0])(cfg).eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.shape}: {n_params / 1e9:.2f} B parameters, float32, built in {time.perf_counter() - t0:.0f} s; "
          f"RSS {rss('VmRSS') / 2**30:.2f} GiB")
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, vocab, (1, args.tokens), generator=g),
                "attention_mask": torch.ones(1, args.tokens, dtype=torch.long)} for _ in range(args.samples)]
    base = rss("VmRSS")
    for kind in args.kinds.split(","):
        reset_peak()
        t0 = time.perf_counter()
        parts = 0
        for stats, _aliases in collect(model, batches, [kind], memory_budget=args.budget_mib << 20):
            parts += 1
            del stats  # the stage writes each part to disk and lets it go
        seconds = time.perf_counter() - t0
        print(f"{kind}: {seconds:.1f} s, {parts} part(s), peak RSS {rss('VmHWM') / 2**30:.2f} GiB "
              f"({(rss('VmHWM') - base) / 2**30:.2f} GiB above the loaded model), "
              f"{args.samples} samples x {args.tokens} tokens, budget {args.budget_mib} MiB")


if __name__ == "__main__":
    main()
