"""The statistics stage: run one model on its calibration samples and collect what data-aware methods need.

* ``gram``: for every linear layer of the language backbone (and the lm_head), the Gram of its inputs over
  every non-padding token, G = XᵀX / N (RegMean). A layer whose input is wider than the number of tokens
  seen keeps the N × d input rows instead (``inputs``), which is smaller and exact (RegMean solves from
  them without forming d × d).
* ``fisher``: the diagonal Fisher of every parameter of the language backbone, embeddings and lm_head:
  the mean over samples of the squared gradient of log p(ŷ | x), ŷ the tokens the model itself samples
  at every non-padding position (the empirical-free Fisher of Matena & Raffel), one sample at a time.

Statistics are keyed by canonical keys (``language.layers.3.mlp.down_proj.weight``, ``lm_head.weight``,
``embed.weight``), so they line up with the merge's tensors whatever the checkpoint's key layout. One
model is resident at a time; :class:`StatisticsCache` keeps the results on disk for the next merge.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from ..checkpoints.checkpoint import read_config
from ..errors import OmnimergeError
from ..families.align import canonical_keys
from ..families.models import model_class
from ..families.table import Family
from .data import CalibrationSettings, Sample

KINDS = ("gram", "fisher")
STATS_VERSION = 1
# Names relative to the language decoder module: the family table's decoder rules with an empty prefix.
_DECODER = Family("decoder-relative", (), "text", ("",), lm_head=())


def canonical_name(decoder_name: str) -> str | None:
    """The canonical key of a parameter named relative to the language decoder (None: not a merged role)."""
    canon = canonical_keys([decoder_name], _DECODER)[decoder_name]
    return None if canon.startswith("other.") or canon.startswith("language.rotary_emb.") else canon


# ------------------------------------------------------------------------------------------ inputs

def _is_vlm(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def load_renderer(folder: str | Path, *, vision: bool):
    """The processor (VLM) or tokenizer (text LLM) saved in ``folder``. A VLM's processor that transformers
    cannot construct here (Qwen-VL and InternVL processors need torchvision for their video processors) is
    replaced by :class:`.render.ImageRenderer` for those families, else by the tokenizer alone (text-only
    samples; an image is then refused with the reason)."""
    import transformers

    what = "processor" if vision else "tokenizer"
    try:
        if not vision:
            return transformers.AutoTokenizer.from_pretrained(folder)
        try:
            return transformers.AutoProcessor.from_pretrained(folder)
        except Exception as first:  # noqa: BLE001 - torchvision missing, no processor files, ...
            from .render import SUPPORTED, ImageRenderer

            config = transformers.AutoConfig.from_pretrained(folder)
            if config.model_type in SUPPORTED:
                return ImageRenderer(folder, config)
            tok = transformers.AutoTokenizer.from_pretrained(folder)
            tok.omnimerge_no_images = (f"the processor of {folder} cannot be loaded ({str(first).strip()[:200]}), and "
                                       f"omnimerge renders images itself only for {', '.join(SUPPORTED)}; use "
                                       "text-only calibration samples for this model")
            return tok
    except Exception as e:  # noqa: BLE001 - any loading failure is the same user-facing problem
        raise OmnimergeError(f"cannot load the {what} of {folder} to render calibration samples ({e}); the "
                             f"skeleton folder needs its {what} files") from None


def _prompt(renderer, sample: Sample) -> str:
    content = ([{"type": "image"}] if sample.image is not None else []) + [{"type": "text", "text": sample.text}]
    if getattr(renderer, "chat_template", None):
        return renderer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                            add_generation_prompt=True)
    if sample.image is not None:
        raise OmnimergeError(f"{sample.where}: the processor has no chat template to place the image in; give the "
                             "skeleton a chat template or drop the image")
    return sample.text


def _check_images(renderer, sample: Sample) -> None:
    reason = getattr(renderer, "omnimerge_no_images", None)
    if sample.image is not None and reason:
        raise OmnimergeError(f"{sample.where}: this sample has an image, but {reason}")


def render_batches(renderer, samples: Sequence[Sample], settings: CalibrationSettings) -> list[dict]:
    """Model inputs for ``samples``: batches of ``settings.batch_size`` (samples with and without an image in
    separate batches; one image sample per batch where the renderer's image inputs cannot be split by
    sample), padded; a sample longer than ``max_tokens`` is cut when it has no image and refused
    when it has one (cutting would split the image's tokens)."""
    from PIL import Image

    groups: list[list[Sample]] = []
    # image inputs that cannot be cut back into samples (InternVL's patches): one image sample per batch
    image_batch = settings.batch_size if getattr(renderer, "image_rows_splittable", True) else 1
    for s in samples:
        size = settings.batch_size if s.image is None else image_batch
        if groups and len(groups[-1]) < size and (groups[-1][0].image is None) == (s.image is None):
            groups[-1].append(s)
        else:
            groups.append([s])
    batches = []
    for group in groups:
        for s in group:
            _check_images(renderer, s)
        texts = [_prompt(renderer, s) for s in group]
        kw = {"padding": True, "return_tensors": "pt"}
        if group[0].image is not None:
            images = [Image.open(s.image).convert("RGB") for s in group]
            batch = dict(renderer(text=texts, images=images, **kw))
        else:
            tok = getattr(renderer, "tokenizer", renderer)
            batch = dict(tok(texts, truncation=True, max_length=settings.max_tokens, **kw))
        lengths = batch["attention_mask"].sum(-1)
        for s, n in zip(group, lengths.tolist()):
            if n > settings.max_tokens:
                raise OmnimergeError(f"{s.where}: the sample renders to {n} tokens (its image included), more than "
                                     f"calibration.max_tokens = {settings.max_tokens}; raise max_tokens or use a "
                                     "smaller image")
        batches.append(batch)
    return batches


def load_model(folder: str | Path, device: str = "cpu", *, lora_base: str | Path | None = None):
    """The model in ``folder`` (a checkpoint, or a PEFT LoRA adapter merged into its base: ``lora_base``, else
    the adapter config's base_model_name_or_path), in float32, in eval mode, with the class its config.json
    names."""
    folder = Path(folder)
    adapter = folder / "adapter_config.json"
    source = folder
    if adapter.is_file():
        base = str(lora_base) if lora_base is not None else json.loads(adapter.read_text()).get("base_model_name_or_path")
        if not isinstance(base, str) or not Path(base).is_dir():
            raise OmnimergeError(f"{adapter}: base_model_name_or_path {base!r} is not a local model folder; the "
                                 "statistics stage runs the adapter merged into its base")
        source = Path(base)
    model = model_class(read_config(source)).from_pretrained(source, dtype=torch.float32)
    if adapter.is_file():
        import peft

        model = peft.PeftModel.from_pretrained(model, folder).merge_and_unload()
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------- collect

class _Inputs:
    """Accumulates one linear layer's inputs: the Gram (float64 sum) or the rows themselves."""

    def __init__(self, keep_rows: bool):
        self.keep_rows = keep_rows
        self.rows: list[torch.Tensor] = []
        self.sum: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach()
        self.count += x.shape[0]
        if self.keep_rows:
            self.rows.append(x.to("cpu", torch.float32))
        else:  # in float64 where the activations are (the GPU with --device cuda), moved to the CPU at the end
            x = x.double()
            g = x.T @ x
            self.sum = g if self.sum is None else self.sum + g

    def result(self) -> dict[str, torch.Tensor]:
        if self.keep_rows:
            return {"inputs": torch.cat(self.rows)}
        return {"gram": (self.sum / self.count).float().cpu()}


def decoder_linears(model) -> dict[str, torch.nn.Linear]:
    """Canonical weight key -> linear module, for the language decoder and the lm_head."""
    decoder = model.get_decoder()
    out = {}
    for name, module in decoder.named_modules():
        if isinstance(module, torch.nn.Linear):
            canon = canonical_name(name + ".weight")
            if canon is not None:
                out[canon] = module
    head = model.get_output_embeddings()
    if isinstance(head, torch.nn.Linear):
        out["lm_head.weight"] = head
    return out


def canonical_parameters(model) -> dict[str, torch.nn.Parameter]:
    """Canonical key -> parameter, for the language decoder, the embeddings and an untied lm_head."""
    decoder = model.get_decoder()
    out = {}
    for name, p in decoder.named_parameters():
        canon = canonical_name(name)
        if canon is not None:
            out[canon] = p
    head = model.get_output_embeddings()
    if head is not None and head.weight is not decoder.get_input_embeddings().weight:
        out["lm_head.weight"] = head.weight
    return out


def _forward_inputs(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _run(model, inputs: dict) -> None:
    model(**inputs, use_cache=False)


def _sites(model, batch: dict, linears: dict[str, torch.nn.Linear],
           forward: Callable[[object, dict], None] = _run) -> list[list[str]]:
    """Groups of linear layers that read the same input tensor (q/k/v, gate/up): one forward pass, noting
    which consecutive pre-hook calls receive the very same tensor object."""
    groups: list[list[str]] = []
    last: list = [None]

    def hook_for(key):
        def hook(_module, args):
            if groups and args[0] is last[0]:
                groups[-1].append(key)
            else:
                groups.append([key])
            last[0] = args[0]  # held, so that its memory cannot be reused by the next input
        return hook

    handles = [m.register_forward_pre_hook(hook_for(k)) for k, m in linears.items()]
    try:
        with torch.no_grad():
            forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        last[0] = None
    seen = {k for g in groups for k in g}
    return groups + [[k] for k in linears if k not in seen]  # never called (e.g. an unused head): alone


def _chunks(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive indices grouped so that each group's sizes add up to at most ``budget`` (a larger item
    alone)."""
    out: list[list[int]] = []
    total = 0
    for i, n in enumerate(sizes):
        if out and total + n <= budget:
            out[-1].append(i)
            total += n
        else:
            out.append([i])
            total = n
    return out


def collect_grams(model, batches: Sequence[dict], *, memory_budget: int = 2 << 30,
                  progress: Callable[[int], None] | None = None, linears: dict[str, torch.nn.Linear] | None = None,
                  forward: Callable[[object, dict], None] = _run
                  ) -> Iterator[tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]]:
    """Parts ``(stats, aliases)``: ``stats`` maps a canonical key to ``{"gram": d×d}`` or ``{"inputs": N×d}``
    over every non-padding token of ``batches``; ``aliases`` maps the other layers reading the same input
    (k/v beside q, up beside gate) to that key. The accumulators of one part fit in ``memory_budget`` bytes;
    more parts take more passes over the batches (each layer is collected in exactly one).
    ``linears``: the layers to collect (default: every linear layer of the language decoder and the lm_head,
    :func:`decoder_linears`); ``forward(model, inputs)``: how one batch runs (default: the whole model)."""
    device = next(model.parameters()).device
    if not batches:
        return
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    linears = decoder_linears(model) if linears is None else linears
    sites = _sites(model, _forward_inputs(batches[0], device), linears, forward)
    widths = [linears[g[0]].in_features for g in sites]
    sizes = [tokens * d * 4 if tokens < d else d * d * 8 for d in widths]
    done = 0
    for chunk in _chunks(sizes, memory_budget):
        acc = {sites[i][0]: _Inputs(keep_rows=tokens < widths[i]) for i in chunk}
        mask: list[torch.Tensor] = []

        def hook_for(inputs: _Inputs, mask: list[torch.Tensor]):
            def hook(_module, args):
                x = args[0]
                inputs.add(x[mask[0]] if x.dim() == 3 else x.reshape(-1, x.shape[-1]))
            return hook

        handles = [linears[k].register_forward_pre_hook(hook_for(a, mask)) for k, a in acc.items()]
        try:
            with torch.no_grad():
                for batch in batches:
                    inputs = _forward_inputs(batch, device)
                    mask[:] = [inputs["attention_mask"].bool()]
                    forward(model, inputs)
                    done += 1
                    if progress:
                        progress(done)
        finally:
            for h in handles:
                h.remove()
        stats = {k: a.result() for k, a in acc.items() if a.count}
        aliases = {other: sites[i][0] for i in chunk for other in sites[i][1:] if sites[i][0] in stats}
        del acc
        yield stats, aliases


def collect_fisher(model, batches: Sequence[dict], *, seed: int = 0, memory_budget: int = 2 << 30,
                   progress: Callable[[int], None] | None = None
                   ) -> Iterator[tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]]:
    """Parts ``({canonical key: {"fisher": like the parameter}}, {})``: the mean over samples of
    (∇ log p(ŷ | x))², ŷ the next tokens sampled from the model's own predictions at every non-padding
    position, one sample at a time (a batch's gradient would mix samples before squaring). The sampled ŷ
    are the same in every part (one generator per pass, same seed); a part's accumulators fit in
    ``memory_budget`` bytes."""
    device = next(model.parameters()).device
    params = canonical_parameters(model)
    keys = list(params)
    done = 0
    for chunk in _chunks([params[k].numel() * 4 for k in keys], memory_budget):
        part = [keys[i] for i in chunk]
        for p in model.parameters():
            p.requires_grad_(False)
        for k in part:
            params[k].requires_grad_(True)
        sums = {k: torch.zeros_like(params[k], dtype=torch.float32, device="cpu") for k in part}
        g = torch.Generator(device="cpu").manual_seed(seed)
        count = 0
        try:
            for batch in batches:
                for row in _split(batch):
                    inputs = _forward_inputs(row, device)
                    logits = model(**inputs, use_cache=False).logits[0].float()  # (L, V)
                    keep = inputs["attention_mask"][0].bool()
                    logp = torch.log_softmax(logits[keep], dim=-1)
                    y = torch.multinomial(logp.detach().exp().cpu(), 1, generator=g).to(device)
                    model.zero_grad(set_to_none=True)
                    logp.gather(-1, y).sum().backward()
                    for k in part:
                        grad = params[k].grad
                        if grad is not None:
                            grad = grad.detach().to("cpu", torch.float32)
                            sums[k].addcmul_(grad, grad)  # += grad², without a squared copy
                    model.zero_grad(set_to_none=True)
                    count += 1
                done += 1
                if progress:
                    progress(done)
        finally:
            model.zero_grad(set_to_none=True)
            for p in model.parameters():
                p.requires_grad_(False)
        yield {k: {"fisher": s / count} for k, s in sums.items()}, {}


def _split(batch: dict) -> list[dict]:
    """One-sample batches of a padded batch (image inputs split by their grids)."""
    n = batch["input_ids"].shape[0]
    if n == 1:
        return [batch]
    out = []
    if "image_grid_thw" in batch:
        sizes = batch["image_grid_thw"].prod(-1).tolist()
        starts = [0]
        for s in sizes:
            starts.append(starts[-1] + s)
    for i in range(n):
        keep = batch["attention_mask"][i].bool()
        shape = batch["input_ids"].shape  # per-token tensors: input_ids, attention_mask, mm_token_type_ids, ...
        row = {k: v[i:i + 1][:, keep] for k, v in batch.items()
               if isinstance(v, torch.Tensor) and v.shape[:2] == shape}
        if "image_grid_thw" in batch:
            row["image_grid_thw"] = batch["image_grid_thw"][i:i + 1]
            row["pixel_values"] = batch["pixel_values"][starts[i]:starts[i + 1]]
        out.append(row)
    return out


def collect(model, batches: Sequence[dict], kinds: Sequence[str], *, seed: int = 0, memory_budget: int = 2 << 30,
            progress: Callable[[int], None] | None = None
            ) -> Iterator[tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]]:
    """Every statistic of ``kinds`` for one model, as parts ``(stats, aliases)`` (see :func:`collect_grams`)."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; known: {KINDS}")
    if "gram" in kinds:
        yield from collect_grams(model, batches, memory_budget=memory_budget, progress=progress)
    if "fisher" in kinds:
        yield from collect_fisher(model, batches, seed=seed, memory_budget=memory_budget, progress=progress)


def merge_parts(parts) -> dict[str, dict[str, torch.Tensor]]:
    """All parts in one mapping, aliases resolved (tests and small models)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for stats, aliases in parts:
        for k, v in stats.items():
            out.setdefault(k, {}).update(v)
        for k, target in aliases.items():
            out.setdefault(k, {}).update(stats[target])
    return out


def fisher_norm(stats: dict[str, dict[str, torch.Tensor]], keys) -> float:
    """The L2 norm of a model's Fisher over ``keys`` (the tensors the merge merges)."""
    return float(sum(float((stats[k]["fisher"].double() ** 2).sum()) for k in keys if "fisher" in stats.get(k, {})))**0.5


# ------------------------------------------------------------------------------------------- cache

def _file_identity(path: Path) -> dict:
    st = path.stat()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def statistics_key(model_folder: str | Path, samples: Sequence[Sample], settings: CalibrationSettings,
                   kinds: Sequence[str], seed: int = 0, *, extra_folders: Sequence[str | Path] = ()) -> str:
    """A digest of everything the statistics depend on: the model's files (names, sizes, times; also those of
    ``extra_folders``, e.g. a LoRA adapter's base and the processor's folder), the samples (text and image
    bytes), the settings, the kinds and the seed."""
    h = hashlib.sha256()
    folders = {}
    for folder in (Path(model_folder), *map(Path, extra_folders)):
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json", ".bin"))
        folders[str(folder.resolve())] = [_file_identity(p) for p in files]
    h.update(json.dumps({"version": STATS_VERSION, "folders": folders, "settings": asdict(settings),
                         "kinds": sorted(kinds), "seed": seed}, sort_keys=True).encode())
    for s in samples:
        h.update(s.text.encode())
        h.update(b"\0")
        if s.image is not None:
            h.update(hashlib.sha256(s.image.read_bytes()).digest())
        h.update(b"\1")
    return h.hexdigest()[:24]


class StatisticsCache:
    """Statistics on disk: one folder per key, one safetensors file per part (``<canonical key>::<kind>``
    tensors; the part's aliases in its metadata). A folder appears whole or not at all."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"stats-{key}"

    def parts(self, key: str) -> list[Path]:
        return sorted(self.path(key).glob("part-*.safetensors"))

    def load(self, key: str) -> dict[str, dict[str, torch.Tensor]] | None:
        """Everything of ``key`` in memory, aliases resolved (None if absent)."""
        from safetensors import safe_open

        if not self.path(key).is_dir():
            return None
        parts = []
        for f in self.parts(key):
            with safe_open(f, "pt") as fh:
                stats: dict[str, dict[str, torch.Tensor]] = {}
                for name in fh.keys():
                    canon, _, kind = name.rpartition("::")
                    stats.setdefault(canon, {})[kind] = fh.get_tensor(name)
                aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
            parts.append((stats, aliases))
        return merge_parts(parts)

    def save(self, key: str, parts) -> Path:
        """Write the parts (an iterable of ``(stats, aliases)``) one by one, then move the folder into place."""
        with self.writer(key) as w:
            for stats, aliases in parts:
                w.add(stats, aliases)
        return self.path(key)

    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator["PartWriter"]:
        """A :class:`PartWriter` for ``key``'s folder: parts are written as they come (several writers may be
        open at once); the folder moves into place when the block ends without an error, and is removed
        otherwise."""
        import shutil

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{key}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            yield PartWriter(tmp)
            final = self.path(key)
            if final.exists():  # another run finished the same statistics first: theirs are as good
                shutil.rmtree(tmp)
            else:
                tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


class PartWriter:
    """Writes one statistics folder's parts, numbered in order (see :meth:`StatisticsCache.writer`)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.count = 0

    def add(self, stats: dict[str, dict[str, torch.Tensor]], aliases: dict[str, str] | None = None) -> None:
        from safetensors.torch import save_file

        flat = {f"{k}::{kind}": t.contiguous() for k, v in stats.items() for kind, t in v.items()}
        save_file(flat, self.folder / f"part-{self.count:05d}.safetensors",
                  metadata={"omnimerge_stats_version": str(STATS_VERSION), "aliases": json.dumps(aliases or {})})
        self.count += 1
