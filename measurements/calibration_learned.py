"""Peak memory and time of RegMean++'s and Expert Merging's statistics stages on a Qwen2-VL-2B-shaped model.

Both learn through the merged model, so they cannot be measured on the bare collectors (see
calibration_stats.py): this script writes a random Qwen2-VL of the 2B shape (with ``--layers`` decoder layers,
default 4, to fit a small machine; the vision tower, embeddings and widths are the 2B's) and ``--experts``
perturbed copies of it as checkpoints, a text calibration file per expert, and runs the stage of each method
through ``omnimerge.calibration.attach_statistics`` in a fresh process, printing seconds and peak RSS::

    python measurements/calibration_learned.py --workdir /tmp/learned --layers 4 --experts 2

Peak RSS is the child process's VmHWM. The per-layer part of the memory scales with the layer count (the
script prints the model's and a layer's sizes so the 28-layer figure can be extrapolated).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streaming import SHAPES  # noqa: E402  (the benchmark shapes, shared)

CHILD = """
import json, sys, time
from pathlib import Path
from omnimerge.plan import build_plan
from omnimerge.calibration import attach_statistics
recipe, cache = json.loads(sys.argv[1]), sys.argv[2]
plan = build_plan(recipe)
t0 = time.perf_counter()
attach_statistics(plan, cache_dir=cache)
seconds = time.perf_counter() - t0
peak = next(int(l.split()[1]) * 1024 for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM:'))
print(json.dumps({"seconds": seconds, "peak": peak}))
"""


def build(root: Path, layers: int, experts: int, samples: int, tokens: int) -> list[Path]:
    import transformers

    from omnimerge.tiny import make_expert, make_tokenizer

    shape = SHAPES["qwen2-vl-2b"]
    stamp = json.dumps({"layers": layers, "experts": experts, "samples": samples, "tokens": tokens, "v": 1})
    folders = [root / "base"] + [root / f"expert{i}" for i in range(1, experts + 1)]
    if (root / "stamp.json").is_file() and (root / "stamp.json").read_text() == stamp:
        return folders
    text = {**shape["text"], "num_hidden_layers": layers,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}}
    cfg = transformers.Qwen2VLConfig(text_config=text, vision_config=shape["vision"], tie_word_embeddings=True)
    cfg.architectures = ["Qwen2VLForConditionalGeneration"]
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(cfg).to(torch.bfloat16)
    model.save_pretrained(folders[0])
    make_tokenizer(4096).save_pretrained(folders[0])
    del model
    for i, f in enumerate(folders[1:], start=1):
        make_expert(folders[0], f, seed=i, scale=2e-3)
    words = "the quick brown fox jumps over the lazy dog and counts to ten".split()
    g = torch.Generator().manual_seed(0)
    for i in range(1, experts + 1):
        lines = [json.dumps({"text": " ".join(words[j] for j in torch.randint(0, len(words), (tokens // 2,),
                                                                          generator=g).tolist())})
                 for _ in range(samples)]
        (root / f"calib{i}.jsonl").write_text("\n".join(lines) + "\n")
    (root / "stamp.json").write_text(stamp)
    return folders


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("calibration-learned"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=2)
    ap.add_argument("--samples", type=int, default=5, help="per expert (Expert Merging's reference runs 5)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--methods", default="regmean,regmean_plusplus,expert_merging")
    args = ap.parse_args(argv)
    root = args.workdir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    folders = build(root, args.layers, args.experts, args.samples, args.tokens)
    from omnimerge.checkpoints.checkpoint import load_checkpoint

    ck = load_checkpoint(str(folders[0]))
    def numel(k):
        return int(torch.Size(ck.info(k)[1]).numel())

    total = sum(numel(k) for k in ck.canon_to_raw)
    layer = sum(numel(k) for k in ck.canon_to_raw if k.startswith("language.layers.0."))
    print(f"Qwen2-VL-2B shape with {args.layers} layers: {total / 1e9:.2f} B parameters "
          f"({total * 4 / 2**30:.2f} GiB in float32), {layer / 1e6:.1f} M per decoder layer; {args.experts} experts, "
          f"{args.samples} samples x ~{args.tokens} tokens each")
    for method in args.methods.split(","):
        recipe = {"method": method, "base": str(folders[0]), "skeleton": str(folders[0]),
                  "models": [{"path": str(f), "calibration": str(root / f"calib{i}.jsonl")}
                             for i, f in enumerate(folders[1:], start=1)],
                  "calibration": {"samples": args.samples, "batch_size": 1}}
        cache = root / f"cache-{method}-{time.time_ns()}"
        res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(recipe), str(cache)], capture_output=True,
                             text=True)
        if res.returncode:
            print(res.stderr[-3000:])
            raise SystemExit(f"{method} failed")
        out = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{method}: {out['seconds']:.1f} s, peak RSS {out['peak'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
