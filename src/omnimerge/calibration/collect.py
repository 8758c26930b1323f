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

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import OmnimergeError
from .data import CalibrationSettings, Sample

KINDS = ("gram", "fisher")
STATS_VERSION = 1
_DECODER_RULES = (("layers.", "language.layers."), ("norm.", "language.norm."),
                  ("final_layernorm.", "language.norm."), ("embed_tokens.", "embed."))


def canonical_name(decoder_name: str) -> str | None:
    """The canonical key of a parameter named relative to the language decoder (None: not a merged role)."""
    for raw, canon in _DECODER_RULES:
        if decoder_name.startswith(raw):
            return canon + decoder_name[len(raw):]
    return None


# ------------------------------------------------------------------------------------------ inputs

def _is_vlm(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def load_renderer(folder: str | Path, *, vision: bool):
    """The processor (VLM) or tokenizer (text LLM) saved in ``folder``."""
    import transformers

    try:
        if vision:
            return transformers.AutoProcessor.from_pretrained(folder)
        return transformers.AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 - any loading failure is the same user-facing problem
        what = "processor" if vision else "tokenizer"
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


def render_batches(renderer, samples: Sequence[Sample], settings: CalibrationSettings) -> list[dict]:
    """Model inputs for ``samples``: batches of ``settings.batch_size`` (samples with and without an image in
    separate batches), padded; a sample longer than ``max_tokens`` is cut when it has no image and refused
    when it has one (cutting would split the image's tokens)."""
    from PIL import Image

    groups: list[list[Sample]] = []
    for s in samples:
        if groups and len(groups[-1]) < settings.batch_size and (groups[-1][0].image is None) == (s.image is None):
            groups[-1].append(s)
        else:
            groups.append([s])
    batches = []
    for group in groups:
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
    import transformers

    folder = Path(folder)
    adapter = folder / "adapter_config.json"
    source = folder
    if adapter.is_file():
        base = str(lora_base) if lora_base is not None else json.loads(adapter.read_text()).get("base_model_name_or_path")
        if not isinstance(base, str) or not Path(base).is_dir():
            raise OmnimergeError(f"{adapter}: base_model_name_or_path {base!r} is not a local model folder; the "
                                 "statistics stage runs the adapter merged into its base")
        source = Path(base)
    config = transformers.AutoConfig.from_pretrained(source)
    cls = None
    for name in getattr(config, "architectures", None) or []:
        candidate = getattr(transformers, str(name), None)
        if isinstance(candidate, type) and issubclass(candidate, transformers.PreTrainedModel):
            cls = candidate
            break
    if cls is None:
        raise OmnimergeError(f"{source}/config.json names no model class this transformers provides "
                             f"({getattr(config, 'architectures', None)}); the statistics stage must run the model")
    model = cls.from_pretrained(source, dtype=torch.float32)
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
        x = x.detach().to("cpu", torch.float64)
        self.count += x.shape[0]
        if self.keep_rows:
            self.rows.append(x.float())
        else:
            g = x.T @ x
            self.sum = g if self.sum is None else self.sum + g

    def result(self) -> dict[str, torch.Tensor]:
        if self.keep_rows:
            return {"inputs": torch.cat(self.rows)}
        return {"gram": (self.sum / self.count).float()}


def _linears(model) -> dict[str, torch.nn.Linear]:
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


def collect_grams(model, batches: Sequence[dict], *, progress: Callable[[int], None] | None = None
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """``{canonical key: {"gram": d×d} or {"inputs": N×d}}`` over every non-padding token of ``batches``."""
    device = next(model.parameters()).device
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    linears = _linears(model)
    acc = {k: _Inputs(keep_rows=tokens < m.in_features) for k, m in linears.items()}
    mask: list[torch.Tensor] = []

    def hook_for(key):
        def hook(_module, args):
            x = args[0]
            acc[key].add(x[mask[0]] if x.dim() == 3 else x.reshape(-1, x.shape[-1]))
        return hook

    handles = [m.register_forward_pre_hook(hook_for(k)) for k, m in linears.items()]
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                inputs = _forward_inputs(batch, device)
                mask[:] = [inputs["attention_mask"].bool()]
                model(**inputs, use_cache=False)
                if progress:
                    progress(i + 1)
    finally:
        for h in handles:
            h.remove()
    return {k: a.result() for k, a in acc.items() if a.count}


def collect_fisher(model, batches: Sequence[dict], *, seed: int = 0,
                   progress: Callable[[int], None] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """``{canonical key: {"fisher": like the parameter}}``: the mean over samples of (∇ log p(ŷ | x))², ŷ the
    next tokens sampled from the model's own predictions at every non-padding position, one sample at a
    time (a batch's gradient would mix samples before squaring)."""
    device = next(model.parameters()).device
    params = canonical_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    sums = {k: torch.zeros_like(p, dtype=torch.float32, device="cpu") for k, p in params.items()}
    g = torch.Generator(device="cpu").manual_seed(seed)
    count = 0
    try:
        for i, batch in enumerate(batches):
            for row in _split(batch):
                inputs = _forward_inputs(row, device)
                logits = model(**inputs, use_cache=False).logits[0].float()  # (L, V)
                keep = inputs["attention_mask"][0].bool()
                logp = torch.log_softmax(logits[keep], dim=-1)
                y = torch.multinomial(logp.detach().exp().cpu(), 1, generator=g).to(device)
                model.zero_grad(set_to_none=True)
                logp.gather(-1, y).sum().backward()
                for k, p in params.items():
                    if p.grad is not None:
                        sums[k] += p.grad.detach().float().cpu() ** 2
                count += 1
            if progress:
                progress(i + 1)
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(False)
    return {k: {"fisher": s / count} for k, s in sums.items()}


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


def collect(model, batches: Sequence[dict], kinds: Sequence[str], *, seed: int = 0,
            progress: Callable[[int], None] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Every statistic of ``kinds`` for one model, merged per canonical key."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; known: {KINDS}")
    out: dict[str, dict[str, torch.Tensor]] = {}
    if "gram" in kinds:
        for k, v in collect_grams(model, batches, progress=progress).items():
            out.setdefault(k, {}).update(v)
    if "fisher" in kinds:
        for k, v in collect_fisher(model, batches, seed=seed, progress=progress).items():
            out.setdefault(k, {}).update(v)
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
    """Statistics on disk, one safetensors file per key (``<canonical key>::<kind>`` tensors)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"stats-{key}.safetensors"

    def load(self, key: str) -> dict[str, dict[str, torch.Tensor]] | None:
        from safetensors.torch import load_file

        path = self.path(key)
        if not path.is_file():
            return None
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in load_file(path).items():
            canon, _, kind = name.rpartition("::")
            out.setdefault(canon, {})[kind] = t
        return out

    def save(self, key: str, stats: dict[str, dict[str, torch.Tensor]]) -> Path:
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        flat = {f"{k}::{kind}": t.contiguous() for k, v in stats.items() for kind, t in v.items()}
        tmp = self.path(key).with_suffix(".tmp")
        save_file(flat, tmp, metadata={"omnimerge_stats_version": str(STATS_VERSION)})
        tmp.replace(self.path(key))  # atomic: a reader sees the whole file or none
        return self.path(key)
