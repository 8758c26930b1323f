"""Streaming merge speed and memory: omnimerge against the I/O floor and against mergekit, in one run.

Generates synthetic bf16 checkpoints — a base and N experts (base + small random task vectors) of
a real architecture's shapes, sharded as on the Hub — then measures, on those same files, each run
in a child process of its own:

* ``floor`` — read every input tensor the merge reads, once, into memory (plain positioned reads),
  and write an output of the same size with ``safetensors.torch.save_file`` (+ fsync, as omnimerge
  does). Its time is read + write; both are shown apart.
* ``omnimerge <method>`` — ``omnimerge merge`` (the CLI) with task_arithmetic, ties (density 0.5,
  ``trim: per_tensor`` as mergekit) and dare_ties (p 0.5), with omnimerge's default components: the language backbone merged; the
  embedding, vision tower and projector the base's.
* with mergekit (``--mergekit PATH`` to ``mergekit-yaml``, or one on PATH): the *text-only* merge,
  which mergekit can do — mergekit 0.1.5 with transformers 5 fails on a Qwen2-VL config, since its
  Qwen2-VL definition reads ``num_hidden_layers`` at the config's top level. Each VLM folder has a
  ``text/`` view of the same files (hard links to the language shards, with a Qwen2 config), and
  ``floor-text``, ``omnimerge-text <method>`` and ``mergekit-text <method>`` all merge every
  language tensor there, the embedding included (mergekit cannot keep it). mergekit needs an
  environment of its own: ``python -m venv mk && mk/bin/pip install torch==2.13.0 mergekit``.

Wall time and peak RSS (``ru_maxrss`` of the child, from ``wait4``) are printed for every run,
then the medians over ``--repeats`` and the ratios omnimerge/floor and omnimerge/mergekit, with the
load average (the ratios are taken within one run, so that a busy machine slows all alike).

    python measurements/streaming.py --small                        # smoke run: ~1.4 GB of inputs
    python measurements/streaming.py --mergekit mk/bin/mergekit-yaml --repeats 3 --keep
    python measurements/streaming.py --cold ...                     # drop the page cache before each run (root)
    python measurements/streaming.py --shape qwen2-0.5b --experts 2 --merge-embed   # the embedding merged too
    python measurements/streaming.py --shape qwen2-vl-7b-2layers --merge-embed      # 7B tensor shapes, 2 layers

The default size is a Qwen2-VL-2B-shaped base + 3 experts (4.4 GB each, 17.7 GB in all; the
checkpoints are written to ``--workdir`` and deleted at the end unless ``--keep``). ``--merge-embed``
makes the model's own merge take the embedding and lm_head too (then merged in row blocks: peak memory
follows a block); ``qwen2-vl-7b-2layers`` has every tensor shape of Qwen2-VL-7B with 2 of its layers
(peak memory follows the largest tensors, and four full 7B models need 66 GB of disk).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

# torch is imported by the child processes only (see the end): a child's peak RSS (ru_maxrss) includes
# the memory of the parent it was forked from, so the driver stays small.

# ---------------------------------------------------------------------------------------- shapes
# Qwen2-VL-2B (the dimensions of Qwen/Qwen2-VL-2B-Instruct), a scale-down of it, and Qwen2-0.5B (text only).
MROPE = dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24])
SHAPES = {
    "qwen2-vl-2b": dict(
        text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936),
        vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2),
    ),
    "small": dict(
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=32000, bos_token_id=1, eos_token_id=2),
        vision=dict(depth=4, embed_dim=512, hidden_size=1024, num_heads=8, mlp_ratio=4, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2),
    ),
    # Qwen2-VL-7B's tensor shapes (Qwen/Qwen2-VL-7B-Instruct: untied 152064-row embedding and lm_head, 18944-wide
    # MLP) with 2 of its 28 decoder layers and 2 of its 32 vision blocks: peak memory follows the largest
    # tensors, not their number, and 4 models of the full size (66 GB) do not fit this machine's disk.
    "qwen2-vl-7b-2layers": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=2, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064),
        vision=dict(depth=2, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2),
        tie=False,
    ),
    "qwen2-0.5b": dict(
        text=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936),
        vision=None,
    ),
}
SHARD_BYTES = 2 * 10**9  # input shards, as on the Hub


def configs(shape: dict):
    """(the model's transformers config, the text-only Qwen2 config of its language model)."""
    import transformers

    tie = shape.get("tie", True)
    text = transformers.Qwen2Config(**shape["text"], rope_theta=1e6, tie_word_embeddings=tie)
    text.architectures = ["Qwen2ForCausalLM"]
    text.dtype = "bfloat16"
    if shape["vision"] is None:
        return text, text
    vl = transformers.Qwen2VLConfig(text_config={**shape["text"], "rope_parameters": MROPE},
                                    vision_config=shape["vision"], tie_word_embeddings=tie)
    vl.architectures = ["Qwen2VLForConditionalGeneration"]
    vl.dtype = "bfloat16"
    return vl, text


def hub_config_json(cfg) -> dict:
    """config.json as on the Hub: a Qwen2-VL config keeps its text fields at the top level."""
    d = cfg.to_dict()
    if "text_config" in d:
        t = d.pop("text_config")
        t.pop("model_type", None)
        d.update({k: v for k, v in t.items() if k not in d})
    return d


def tensor_specs(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """(name on disk, shape) of every tensor, in transformers' order, from a model on the meta device."""
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, cfg.architectures[0])(cfg)
    specs = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:  # tied to the embedding: not saved
            continue
        # save_pretrained's on-disk names for Qwen2-VL (in memory they nest language_model / visual)
        name = name.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)
        specs.append((name, tuple(t.shape)))
    return specs


def _split(specs, limit):
    shards, size = [[]], 0
    for name, shape in specs:
        n = 2 * math.prod(shape)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def write_checkpoint(folder: Path, config: dict, specs, make, text_config: dict | None) -> None:
    """Write tensors ``make(name, shape)`` (bf16) as Hub-style shards with an index.

    The language tensors fill the first shards, the vision tower and projector the last ones, so
    that ``folder/text`` can be a text-only Qwen2 checkpoint of the same files (hard links)."""
    from omnimerge.checkpoints.safetensors_io import StreamingSafetensorsWriter

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lang = [(n, s) for n, s in specs if not n.startswith("visual.")]
    shards = _split(lang, SHARD_BYTES) + (_split([(n, s) for n, s in specs if n.startswith("visual.")],
                                                 SHARD_BYTES) if len(lang) < len(specs) else [])
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for fname, shard in zip(names, shards):
        w = StreamingSafetensorsWriter(tmp / fname, [(n, torch.bfloat16, s) for n, s in shard])
        for name, shape in shard:
            w.write(name, make(name, shape))
        w.close()

    def index(entries):
        return json.dumps({"metadata": {"total_size": sum(2 * math.prod(s) for _, sh in entries for _, s in sh)},
                           "weight_map": {n: f for f, sh in entries for n, _ in sh}}, indent=1)

    (tmp / "model.safetensors.index.json").write_text(index(list(zip(names, shards))))
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    if text_config is not None:
        (tmp / "text").mkdir()
        lang_files = [(f, sh) for f, sh in zip(names, shards) if not sh[0][0].startswith("visual.")]
        for f, _ in lang_files:
            os.link(tmp / f, tmp / "text" / f)
        (tmp / "text" / "model.safetensors.index.json").write_text(index(lang_files))
        (tmp / "text" / "config.json").write_text(json.dumps(text_config, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)


def generate(root: Path, shape_name: str, experts: int, seed: int = 0) -> None:
    """Base + experts under ``root``: ``base/``, ``expert1/``, ...; each VLM also has ``text/``."""
    from omnimerge.checkpoints.safetensors_io import SafetensorsFile

    shape = SHAPES[shape_name]
    cfg, text_cfg = configs(shape)
    specs = tensor_specs(cfg)
    config = hub_config_json(cfg)
    text_config = hub_config_json(text_cfg) if shape["vision"] else None
    folders = [root / "base"] + [root / f"expert{i}" for i in range(1, experts + 1)]

    def base_tensor(name, shape_):
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
        if len(shape_) == 1:  # norms and biases
            return (1.0 + 0.1 * torch.randn(shape_, generator=g)).bfloat16()
        return (0.02 * torch.randn(shape_, generator=g)).bfloat16()

    write_checkpoint(folders[0], config, specs, base_tensor, text_config)
    base_files = {}
    for f in sorted(folders[0].glob("*.safetensors")):
        st = SafetensorsFile(f)
        base_files.update({k: st for k in st.tensors})
    for i, folder in enumerate(folders[1:], start=1):
        g = torch.Generator().manual_seed(1000 * seed + i)

        def expert_tensor(name, shape_, g=g):  # base + a task vector of 1/10 of the weights' scale
            return (base_files[name].read(name).float() + 0.002 * torch.randn(shape_, generator=g)).bfloat16()

        write_checkpoint(folder, config, specs, expert_tensor, text_config)


# ---------------------------------------------------------------------------------------- recipes
METHOD_PARAMS = {  # the same merge in both tools' terms
    "task_arithmetic": ({"lambda": 1.0}, {"weight": 1.0}, {}),
    # mergekit trims each tensor on its own: omnimerge's trim: per_tensor (its default, global, adds a pre-pass)
    "ties": ({"lambda": 1.0, "trim": "per_tensor"}, {"weight": 1.0, "density": 0.5}, {"normalize": True}),
    # mergekit's dare_ties density is the keep rate: density 0.5 = omnimerge's drop rate p 0.5
    "dare_ties": ({"lambda": 1.0, "p": 0.5, "trim": "per_tensor"}, {"weight": 1.0}, {"normalize": True}),
    # mergekit's other methods that merge in row blocks (their defaults; slerp takes --experts 1)
    "breadcrumbs": ({"lambda": 1.0}, {"weight": 1.0, "density": 0.9, "gamma": 0.01}, {}),
    "della": ({"lambda": 1.0}, {"weight": 1.0, "density": 0.5, "epsilon": 0.15}, {}),
    "model_stock": ({}, {}, {}),
    "slerp": ({"t": 0.5}, {}, {"t": 0.5}),
}
MERGEKIT_DENSITY = {"ties": 0.5, "dare_ties": 0.5}


def omnimerge_recipe(method: str, base: Path, experts: list[Path], merge_embed: bool) -> dict:
    glob, per_model, _ = METHOD_PARAMS[method]
    recipe = {"method": method, "base": str(base), "parameters": dict(glob),
              "models": [{"path": str(f), **per_model} for f in experts], "dtype": "float32"}
    if merge_embed:
        recipe["components"] = {"embed": "merge", "lm_head": "merge"}
    return recipe


def mergekit_config(method: str, base: Path, experts: list[Path]) -> dict:
    _, per_model, glob = METHOD_PARAMS[method]
    params = dict(per_model)  # (the same names in both tools)
    if method in MERGEKIT_DENSITY:
        params["density"] = MERGEKIT_DENSITY[method]
    cfg = {"merge_method": method, "base_model": str(base), "dtype": "float32", "out_dtype": "bfloat16",
           "models": [{"model": str(base)}] + [{"model": str(f), "parameters": dict(params)} for f in experts]}
    if glob:
        cfg["parameters"] = dict(glob)
    return cfg


# ---------------------------------------------------------------------------------------- the floor
def floor_child(recipe_path: str, out: str) -> None:
    """Read what the merge reads, once, into memory; write an output of the same size with safetensors."""
    from safetensors.torch import save_file

    from omnimerge.checkpoints.output import shard_filenames
    from omnimerge.checkpoints.safetensors_io import SafetensorsFile
    from omnimerge.plan import build_plan
    from omnimerge.recipe import load_recipe

    plan = build_plan(load_recipe(recipe_path))
    headers: dict[str, SafetensorsFile] = {}

    def read(ckpt, canon):  # plain positioned reads into a tensor (a memory map would count as RSS)
        raw = ckpt.raw_key(canon)
        path = ckpt.source.describe(raw).rsplit(" [", 1)[0]
        info = headers.setdefault(path, SafetensorsFile(path)).tensors[raw]
        t = torch.empty(info.shape, dtype=info.dtype)
        buf, done = memoryview(t.view(-1).view(torch.uint8).numpy()), 0
        with open(path, "rb", buffering=0) as f:
            f.seek(info.start)
            while done < info.nbytes:
                done += f.readinto(buf[done:])
        return t

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = plan.shards()
    read_s = write_s = 0.0
    for fname, shard in zip(shard_filenames(len(shards)), shards):
        t0 = time.perf_counter()
        tensors = {}
        for job in shard:
            srcs = [job.source] if job.action == "copy" else plan.inputs()
            first = None
            for c in srcs:
                t = read(c, job.canonical)
                first = t if first is None else first
            tensors[job.out_key] = first[tuple(slice(0, n) for n in job.shape)].contiguous().to(job.out_dtype)
        t1 = time.perf_counter()
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        fd = os.open(out / fname, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        del tensors
        read_s += t1 - t0
        write_s += time.perf_counter() - t1
    print(json.dumps({"read_s": read_s, "write_s": write_s}))


# ---------------------------------------------------------------------------------------- running
def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_child(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; wall seconds, peak RSS (bytes) from its own rusage (wait4), exit code, output."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    outs: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, f=f: outs.__setitem__(k, f.read()))
               for k, f in (("out", p.stdout), ("err", p.stderr))]  # so a chatty child never blocks
    for r in readers:
        r.start()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    for r in readers:
        r.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"wall": wall, "rss": usage.ru_maxrss * 1024, "rc": p.returncode,
            "stdout": outs.get("out", ""), "stderr": outs.get("err", "")}


def folder_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-vl-2b")
    ap.add_argument("--small", action="store_true", help="the 'small' shape (a smoke run)")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("streaming-bench"),
                    help="where the checkpoints and outputs go (checkpoints are reused by the next run)")
    ap.add_argument("--methods", default="task_arithmetic,ties,dare_ties")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--mergekit", default=os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml"),
                    help="path to mergekit-yaml (default: $MERGEKIT_YAML or the one on PATH)")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each run (needs root)")
    ap.add_argument("--omnimerge-args", default="", help="extra arguments for `omnimerge merge`")
    ap.add_argument("--only", default="", help="comma-separated run names to keep (e.g. 'floor,omnimerge ties')")
    ap.add_argument("--merge-embed", action="store_true",
                    help="the model's own merge also merges the embedding and lm_head (as mergekit does)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints for the next run")
    ap.add_argument("--json", type=Path, help="write every result to this JSON file")
    args = ap.parse_args()
    shape = "small" if args.small else args.shape
    methods = [m for m in args.methods.split(",") if m]
    mergekit = None if args.no_mergekit else args.mergekit
    work = args.workdir.absolute()
    root = work / f"models-{shape}-{args.experts}"
    stamp = json.dumps({"shape": shape, "spec": SHAPES[shape], "experts": args.experts, "version": 2}, sort_keys=True)
    marker = root / "models.json"
    if marker.is_file() and marker.read_text() == stamp:
        print(f"reusing the checkpoints in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, __file__, "_generate", str(root), shape, str(args.experts)], check=True)
        marker.write_text(stamp)
        print(f"generated the checkpoints in {time.perf_counter() - t0:.0f} s")
    folders = [root / "base"] + [root / f"expert{i}" for i in range(1, args.experts + 1)]
    vlm = SHAPES[shape]["vision"] is not None
    texts = [f / "text" for f in folders] if vlm else folders
    out = work / "out"

    # (name, command): the model's default merge; then, for mergekit, the text-only merge of every
    # language tensor (embedding included, as mergekit does) on the text-only view of the same files.
    runs: list[tuple[str, list[str]]] = []

    def recipe(tag, m, fs, embed):
        p = work / f"recipe-{tag}-{m}.json"  # JSON is YAML
        p.write_text(json.dumps(omnimerge_recipe(m, fs[0], fs[1:], embed), indent=1))
        return p

    def omni(tag, fs, embed):
        runs.append((f"floor{tag}", [sys.executable, __file__, "_floor", str(recipe(tag, methods[0], fs, embed)),
                                     str(out)]))
        for m in methods:
            runs.append((f"omnimerge{tag} {m}", [sys.executable, "-m", "omnimerge.cli", "merge",
                                                 str(recipe(tag, m, fs, embed)), "-o", str(out), "--force",
                                                 "--no-progress", *args.omnimerge_args.split()]))

    omni("-embed" if args.merge_embed and not vlm else "", folders, args.merge_embed)
    if mergekit:
        import yaml

        tag = "-text" if vlm else "-embed"
        if vlm or not args.merge_embed:
            omni(tag, texts, True)
        for m in methods:
            cfg = work / f"mergekit-{m}.yml"
            cfg.write_text(yaml.safe_dump(mergekit_config(m, texts[0], texts[1:]), sort_keys=False))
            runs.append((f"mergekit{tag} {m}", [mergekit, str(cfg), str(out), "--quiet", "--no-copy-tokenizer"]))
    if args.only:
        keep = set(args.only.split(","))
        runs = [r for r in runs if r[0] in keep]

    env = dict(os.environ, HF_HUB_OFFLINE="1", CI="1")
    load0 = os.getloadavg()
    print(f"{shape}: base + {args.experts} experts, {sum(map(folder_bytes, folders)) / 1e9:.2f} GB of bf16 inputs "
          f"({folder_bytes(folders[0]) / 1e9:.2f} GB each"
          + (f", language model {folder_bytes(texts[0]) / 1e9:.2f} GB" if vlm else "") + f"); {os.cpu_count()} CPUs; "
          f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}; page cache {'cold' if args.cold else 'warm'}")
    if args.cold and not drop_caches():
        sys.exit("--cold needs root (it writes /proc/sys/vm/drop_caches)")
    results: dict[str, list[dict]] = {name: [] for name, _ in runs}
    for rep in range(args.repeats):
        for name, cmd in runs:
            shutil.rmtree(out, ignore_errors=True)
            if args.cold:
                drop_caches()
            else:
                os.sync()
            r = run_child(cmd, env)
            if r["rc"] != 0:
                print(f"{name}: exit {r['rc']}\n{r['stderr'][-3000:]}", file=sys.stderr)
                r["failed"] = True
            elif name.startswith("floor"):
                r.update(json.loads(r["stdout"].strip().splitlines()[-1]))
            r["load"] = os.getloadavg()[0]
            r["out_bytes"] = folder_bytes(out) if out.is_dir() else 0
            results[name].append(r)
            extra = f"  (read {r['read_s']:.1f} s + write {r['write_s']:.1f} s)" if "read_s" in r else ""
            print(f"  [{rep + 1}/{args.repeats}] {name:32s} {r['wall']:8.1f} s  peak RSS {r['rss'] / 2**30:6.2f} GiB  "
                  f"load {r['load']:.2f}{extra}", flush=True)
    shutil.rmtree(out, ignore_errors=True)

    def med(name, key="wall"):
        ok = [r[key] for r in results.get(name, []) if not r.get("failed")]
        return statistics.median(ok) if ok else None

    def ratio(name, other):
        """The median over repeats of name / other within each repeat (the load drifts between repeats)."""
        pairs = [(a["wall"], b["wall"]) for a, b in zip(results.get(name, []), results.get(other, []))
                 if not a.get("failed") and not b.get("failed")]
        return statistics.median(x / y for x, y in pairs) if pairs else None

    load1 = os.getloadavg()
    print(f"\nmedians over {args.repeats} run(s) (ratios: the median of each repeat's ratio); load average now {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    print(f"{'run':36s} {'wall s':>8s} {'peak RSS GiB':>13s} {'/floor':>7s} {'/mergekit':>10s}")
    summary = {}
    for name, _ in runs:
        w, rss = med(name), med(name, "rss")
        if w is None:
            print(f"{name:36s} failed")
            continue
        tool, _, m = name.partition(" ")
        tag = tool.removeprefix("omnimerge").removeprefix("mergekit").removeprefix("floor")
        floor = ratio(name, "floor" + tag) if tool != "floor" + tag else None
        mk = ratio(name, f"mergekit{tag} {m}") if tool.startswith("omnimerge") else None
        summary[name] = {"wall_s": w, "peak_rss_bytes": rss, "over_floor": floor, "over_mergekit": mk}
        print(f"{name:36s} {w:8.1f} {rss / 2**30:13.2f} "
              f"{(f'{floor:7.2f}' if floor else '      -')} {(f'{mk:10.2f}' if mk else '         -')}")
    if args.json:
        args.json.write_text(json.dumps({
            "shape": shape, "experts": args.experts, "input_bytes": [folder_bytes(f) for f in folders],
            "cold": args.cold, "load_before": load0, "load_after": load1, "summary": summary,
            "runs": {k: [{kk: vv for kk, vv in r.items() if kk not in ("stdout", "stderr")} for r in v]
                     for k, v in results.items()}}, indent=1))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_floor":
        import torch

        floor_child(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "_generate":
        import torch

        generate(Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    else:
        main()
