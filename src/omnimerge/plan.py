"""Recipe + checkpoints + families -> a validated list of tensor jobs. Nothing is written here.

Every check that can be made without computing is made here, so that a bad recipe fails in
seconds, before any output exists: paths, formats, families, methods and their parameters,
missing tensors, shapes, layer counts.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch

from .checkpoints.checkpoint import Checkpoint, check_distinct_models, load_checkpoint
from .checkpoints.safetensors_io import tensor_nbytes
from .dtypes import DTYPE_NAMES
from .errors import OmnimergeError
from .families.align import COMPONENTS, component_of, layer_index
from .methods import InputFacts, Method, get_method
from .calibration.data import Sample, load_samples
from .recipe import CalibrationOptions, ComponentMethod, ModelEntry, ParamValue, Recipe, Take, parse_recipe, pick
from .slicing import OutputLayer, output_key, plan_layers, restack_config, slice_inputs
from .vocab import VOCAB_KEYS, OutputVocabulary, build_vocabulary, set_vocab_size

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
ROW_ALIGNED = ("embed.weight", "lm_head.weight")  # may differ in vocabulary size


class Action(str, Enum):
    """What a job does: copy one input's tensor (``source``), or merge the inputs (``method``,
    ``params``, ``rows``, ``seed``)."""

    MERGE = "merge"
    COPY = "copy"

    def __str__(self) -> str:
        return self.value


@dataclass
class Job:
    """One output tensor: how to make it."""

    out_key: str  # the skeleton's name for it
    canonical: str
    component: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    action: Action
    source: Checkpoint | None = None  # COPY: where from
    method: Method | None = None  # MERGE: how
    params: dict[str, Any] = field(default_factory=dict)  # MERGE: the method's parameters for this tensor
    rows: int | None = None  # MERGE: merge only the first `rows` rows (vocabularies of different sizes)
    seed: int = 0  # MERGE: the tensor's random seed
    note: str = ""
    stats: Any = None  # merge with a data-aware method: a calibration.StatsSource (set by the statistics stage)
    # Where inputs are not the plan's base and models under `canonical` (restacked layers, realigned rows):
    reads: tuple[tuple[Checkpoint, str], ...] | None = None  # MERGE: (model, its key) per input, in method order
    with_base: bool = False  # MERGE with `reads`: the first input is the base
    source_key: str | None = None  # COPY: the source's key for this tensor, when not `canonical`
    align: Any = None  # MERGE: realigns the inputs' token rows to the output vocabulary (vocab.Alignment)

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.out_dtype, self.shape)


@dataclass
class Plan:
    recipe: Recipe
    skeleton: Checkpoint
    base: Checkpoint | None
    models: list[Checkpoint]
    tokenizer_source: Path
    jobs: list[Job]
    notes: list[str]
    compute_dtype: torch.dtype
    refs: dict[str, Checkpoint] = field(default_factory=dict)  # every spec in the recipe -> its checkpoint
    calibration: list[list[Sample]] | None = None  # per model, its validated samples, when a method learns from them
    layers: list[OutputLayer] | None = None  # `slices:`: every output decoder layer and its sources
    vocabulary: OutputVocabulary | None = None  # `tokenizer:`: the output vocabulary (rows realigned to it)

    def job_reads(self, job: Job) -> list[tuple[Checkpoint, str]]:
        """A merge job's inputs, in the method's order (the base first when it has one): (model, key)."""
        if job.reads is not None:
            return list(job.reads)
        return [(m, job.canonical) for m in self.inputs()]

    def job_has_base(self, job: Job) -> bool:
        """Whether a merge job's first input is the base."""
        return job.with_base if job.reads is not None else self.base is not None

    @property
    def rewrites_config(self) -> bool:
        return self.layers is not None or self.vocabulary is not None

    def edit_config(self, cfg: dict) -> None:
        """The skeleton's config.json made the output's: the stacked layers' count and per-layer lists, the
        output vocabulary's size."""
        if self.layers is not None:
            restack_config(cfg, self.layers, self.skeleton)
        if self.vocabulary is not None:
            set_vocab_size(cfg, self.vocabulary.size)

    @property
    def needs_statistics(self) -> bool:
        return any(j.method is not None and j.method.needs_calibration for j in self.jobs if j.action == "merge")

    @property
    def out_bytes(self) -> int:
        return sum(j.nbytes for j in self.jobs)

    def inputs(self) -> list[Checkpoint]:
        return ([self.base] if self.base else []) + self.models

    def input_folders(self) -> list[Path]:
        """Every folder the merge reads (LoRA bases and the tokenizer source included): an output may lie
        in none of them."""
        return [p for m in self.inputs() + [self.skeleton] for p in m.folders()] + [Path(self.tokenizer_source)]

    def shards(self) -> list[list[Job]]:
        """Greedy split of the jobs, in order, into shards of at most ``shard_size`` bytes."""
        limit, shards, size = self.recipe.shard_bytes, [[]], 0
        for j in self.jobs:
            if shards[-1] and size + j.nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append(j)
            size += j.nbytes
        return shards

    def summary(self) -> list[dict[str, Any]]:
        """Per component and action: tensor count, bytes, method and sources (what --dry-run prints)."""
        rows: dict[tuple, dict[str, Any]] = {}
        for j in self.jobs:
            how = j.method.name if j.action is Action.MERGE else "copy"
            frm = (", ".join(m.name for m, _ in self.job_reads(j)) if j.action is Action.MERGE
                   else j.source.name)
            key = (j.component, how, frm, j.note)
            r = rows.setdefault(key, {"component": j.component, "action": how, "from": frm, "note": j.note,
                                       "tensors": 0, "bytes": 0})
            r["tensors"] += 1
            r["bytes"] += j.nbytes
        return list(rows.values())


def tensor_seed(seed: int, canonical: str) -> int:
    """A per-tensor seed from (recipe seed, canonical key): independent of order and executor."""
    digest = hashlib.sha256(f"{seed}\0{canonical}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# --- parameters ---------------------------------------------------------------------------------
def _validate_value(method: Method, name: str, value: ParamValue, where: str) -> None:
    p = method.param(name)
    for v in (e.value for e in value) if isinstance(value, list) else (value,):
        p.validate(v, where)


def _check_parameters(recipe: Recipe, methods: dict[str, Method]) -> None:
    main = methods["*"]
    for name, value in recipe.parameters.items():
        _validate_value(main, name, value, "parameters")
    for comp, pol in recipe.components.items():
        if isinstance(pol, ComponentMethod):
            for name, value in pol.parameters.items():
                _validate_value(methods[comp], name, value, f"components.{comp}.parameters")
    in_use = list(dict.fromkeys(methods.values()))
    per_model = [(f"models[{i}] ({e.label})", e.parameters) for i, e in enumerate(recipe.models)]
    for i, sl in enumerate(recipe.slices or []):
        for name, value in sl.parameters.items():
            _validate_value(main, name, value, f"slices[{i}].parameters")
        per_model += [(f"slices[{i}].sources[{j}] ({src.model})", src.parameters) for j, src in enumerate(sl.sources)]
    for where, params in per_model:
        for name, value in params.items():
            owners = [m for m in in_use if any(p.name == name for p in m.params)]
            if not owners:
                names = sorted({p.name for m in in_use for p in m.params if p.per_model})
                raise OmnimergeError(
                    f"{where}: unknown parameter '{name}' for method "
                    f"{', '.join(m.name for m in in_use)}; per-model parameters: {', '.join(names) or 'none'}"
                )
            for m in owners:
                if not m.param(name).per_model:
                    raise OmnimergeError(
                        f"{where}: '{name}' is a global parameter of method '{m.name}'; "
                        "set it under `parameters:`, not per model"
                    )
                _validate_value(m, name, value, where)


def _check_model_count(recipe: Recipe, methods: dict[str, Method]) -> None:
    n = len(recipe.models)
    for comp, m in methods.items():
        lo, hi = m.min_models, m.max_models
        if n < lo or (hi is not None and n > hi):
            where = "method" if comp == "*" else f"components.{comp}.method"
            want = f"exactly {lo}" if lo == hi else (f"{lo} to {hi}" if hi is not None else f"at least {lo}")
            besides = " besides the base" if m.needs_base else ""
            raise OmnimergeError(f"{where}: '{m.name}' merges {want} model(s){besides} under `models:`, the recipe "
                                 f"lists {n}")


def resolve_params(method: Method, key: str, entries: list[ModelEntry], component_params: dict[str, ParamValue],
                   global_params: dict[str, ParamValue]) -> dict[str, Any]:
    """Parameter values for one canonical key: per model > component > recipe > default."""
    out: dict[str, Any] = {}
    for p in method.params:
        shared = pick(component_params.get(p.name), key) if p.name in component_params else None
        if shared is None and p.name in global_params:
            shared = pick(global_params[p.name], key)
        if shared is None:
            shared = p.default
        if p.per_model:
            vals = []
            for e in entries:
                v = pick(e.parameters[p.name], key) if p.name in e.parameters else None
                vals.append(p.validate(shared if v is None else v, e.label))
            out[p.name] = vals
        else:
            out[p.name] = p.validate(shared, "parameters")
    return out


# --- building the plan --------------------------------------------------------------------------
def build_plan(recipe: Recipe | dict, *, relative_to: str | Path | None = None, allow_pickle: bool = False) -> Plan:
    recipe = parse_recipe(recipe)
    rel = Path(relative_to) if relative_to else None
    methods: dict[str, Method] = {"*": get_method(recipe.method)}
    for comp in COMPONENTS:
        pol = recipe.policy(comp)
        if isinstance(pol, ComponentMethod):
            methods[comp] = get_method(pol.method)
        elif pol == "merge":
            methods[comp] = methods["*"]
    _check_parameters(recipe, methods)
    if recipe.slices:
        _check_sliced(recipe, methods)
    else:
        _check_model_count(recipe, methods)

    cache: dict[str, Checkpoint] = {}

    def load(spec: str, name: str | None = None, lora_base: str | None = None) -> Checkpoint:
        if spec not in cache:
            cache[spec] = load_checkpoint(spec, name=name, relative_to=rel, allow_pickle=allow_pickle,
                                          lora_base=lora_base)
        return cache[spec]

    models = [load(e.path, e.label, e.lora_base) for e in recipe.models]
    check_distinct_models(recipe.models, models, bool(recipe.allow_duplicate_models))
    by_label = {e.label: m for e, m in zip(recipe.models, models)} | {e.path: m for e, m in zip(recipe.models, models)}

    def ref(spec: str) -> Checkpoint:
        return by_label.get(spec) or load(spec)

    base = ref(recipe.base) if recipe.base else None
    for comp, m in methods.items():
        if m.needs_base and base is None and not recipe.slices:  # a slice may name its own base
            where = "method" if comp == "*" else f"components.{comp}.method"
            raise OmnimergeError(f"{where}: '{m.name}' needs a `base:` model (task vectors are θ_i − θ_base); add one")
    if recipe.skeleton or recipe.skeletons:  # several skeletons: this plans the first; build_plans all
        skeleton = ref(recipe.skeleton or recipe.skeletons[0])
    else:
        vlm = [m for m in ([base] if base else []) + models if m.family.kind in ("vlm", "audio")]
        skeleton = vlm[0] if vlm else (base or models[0])
    if skeleton.lora is not None:
        raise OmnimergeError(f"skeleton '{skeleton.name}' is a LoRA adapter; use its base model folder as skeleton")
    tok = ref(recipe.tokenizer_source).path if recipe.tokenizer_source else skeleton.path

    notes = [f"{c.name}: {c.note}" for c in dict.fromkeys([skeleton, *models] + ([base] if base else [])) if c.note]
    inputs = ([base] if base else []) + models
    facts = InputFacts(lora_experts=bool(models) and all(m.lora is not None for m in models))
    layers = plan_layers(recipe, methods["*"], ref, skeleton) if recipe.slices else None
    vocabulary, vocab_base = None, None
    if recipe.tokenizer is not None:
        vocab_base = ref(recipe.tokenizer.base) if recipe.tokenizer.base else base
        merged = inputs + [s.checkpoint for o in layers or [] for s in o.sources]
        vocabulary = build_vocabulary(recipe.tokenizer, vocab_base or skeleton, merged, ref)
    if vocabulary is not None:
        tok = skeleton.path  # the tokenizer is written from the vocabulary; the processor files are the skeleton's
    planner = _Planner(recipe, methods, ref, skeleton, base, inputs, facts, layers, vocabulary,
                       DTYPES[recipe.out_dtype] if recipe.out_dtype else None, vocab_base)
    jobs = planner.jobs()
    calibration = _check_calibration(recipe, methods, rel, skeleton)
    plan = Plan(recipe, skeleton, base, models, tok, jobs, notes, DTYPES[recipe.dtype], cache | by_label, calibration)
    plan.layers, plan.vocabulary = layers, vocabulary
    return plan


def _check_sliced(recipe: Recipe, methods: dict[str, Method]) -> None:
    """What a recipe with ``slices:`` cannot do, said before any file is opened."""
    if recipe.policy("language") != "merge":
        raise OmnimergeError("components.language: with `slices:` the language layers are the slices' (stacked, and "
                             "merged with the recipe's method); remove the language policy")
    learning = sorted({m.name for m in methods.values() if m.needs_calibration})
    if learning:
        raise OmnimergeError(f"method {', '.join(learning)} learns from calibration samples of whole models; it cannot "
                             "merge restacked layers (`slices:`). Use a data-free method")


def resolve_source_params(method: Method, key: str, per_input: list[tuple[str, list[dict[str, ParamValue]], str]],
                          shared: list[dict[str, ParamValue]]) -> dict[str, Any]:
    """Parameter values for one output tensor whose inputs are given one by one (restacked layers): a per-model
    parameter is looked up, for each input, in its own dicts then the shared ones, all matched against that
    input's key (``per_input``: (label, dicts in precedence order, input key)); a shared parameter in
    ``shared`` matched against the output key ``key`` (mergekit's rule). Then the default."""
    def first(dicts: list[dict[str, ParamValue]], name: str, k: str):
        for d in dicts:
            if name in d:
                v = pick(d[name], k)
                if v is not None:
                    return v
        return None

    out: dict[str, Any] = {}
    for p in method.params:
        if p.per_model:
            vals = []
            for label, dicts, in_key in per_input:
                v = first(dicts + shared, p.name, in_key)
                vals.append(p.validate(p.default if v is None else v, label))
            out[p.name] = vals
        else:
            v = first(shared, p.name, key)
            out[p.name] = p.validate(p.default if v is None else v, "parameters")
    return out


@dataclass
class _Planner:
    """The jobs of one output: the skeleton's tensors in order, its decoder layers replaced by the stacked
    ones when the recipe has ``slices:``, the token rows realigned when it has ``tokenizer:``."""

    recipe: Recipe
    methods: dict[str, Method]
    ref: Any
    skeleton: Checkpoint
    base: Checkpoint | None
    inputs: list[Checkpoint]
    facts: InputFacts
    layers: list[OutputLayer] | None
    vocabulary: OutputVocabulary | None
    out_dtype: torch.dtype | None
    vocab_base: Checkpoint | None = None  # whose rows win for tokens several merged models share
    checked_layers: bool = False

    def jobs(self) -> list[Job]:
        jobs: list[Job] = []
        stacked = False
        for raw in self.skeleton.source.keys():
            canon = self.skeleton.raw_to_canon[raw]
            if self.layers is not None and layer_index(canon) is not None:
                if not stacked:
                    jobs += self.layer_jobs()
                    stacked = True
                continue
            jobs.append(self.job(raw, canon))
        return jobs

    def target(self, dtype: torch.dtype) -> torch.dtype:
        return (self.out_dtype or dtype) if dtype.is_floating_point else dtype

    def job(self, raw: str, canon: str) -> Job:
        """The job of one skeleton tensor outside the stacked layers."""
        skeleton, recipe = self.skeleton, self.recipe
        comp = component_of(canon)
        dtype, shape = skeleton.source.info(raw)
        pol = recipe.policy(comp)
        job = Job(raw, canon, comp, tuple(shape), self.target(dtype), Action.COPY, source=skeleton, note="keep")
        aligned = self.vocabulary is not None and canon in VOCAB_KEYS and dtype.is_floating_point
        if isinstance(pol, Take):
            src = self.ref(pol.take)
            _require(src, canon, shape, raw, comp, skeleton, rows_ok=aligned)
            job.source, job.note = src, f"take {src.name}"
        elif pol != "keep" and not dtype.is_floating_point:
            job.note = f"keep ({dtype} is not a float type)"
        elif pol != "keep":
            return self.merge_job(job, raw, shape, pol, aligned)
        if aligned:  # kept or taken rows, realigned to the output vocabulary
            return self.realigned_copy(job, job.source)
        return job

    def merge_job(self, job: Job, raw: str, shape, pol, aligned: bool) -> Job:
        recipe, canon, comp = self.recipe, job.canonical, job.component
        method = self.methods[comp]
        comp_params = pol.parameters if isinstance(pol, ComponentMethod) else {}
        glob = recipe.parameters if method is self.methods["*"] else {}
        if self.layers is None:
            if comp == "language" and not self.checked_layers:
                _check_layers(self.inputs, self.skeleton)
                self.checked_layers = True
            rows = None
            for m in self.inputs:
                rows = _require(m, canon, shape, raw, comp, self.skeleton, rows_ok=canon in ROW_ALIGNED) or rows
            job.action, job.method, job.note = Action.MERGE, method, ""
            job.params = method.resolved(resolve_params(method, canon, recipe.models, comp_params, glob), self.facts)
            job.seed = tensor_seed(recipe.seed, canon)
            if aligned:
                job.reads = tuple((m, canon) for m in self.inputs)
                job.with_base = self.base is not None
                return self.realign(job, [m for m, _ in job.reads], self.vocab_base)
            job.rows = rows
            if rows is not None:
                job.note = f"rows 0..{rows - 1} merged, the rest kept (vocabulary sizes differ)"
            return job
        # a sliced recipe: what comes before the layers (embeddings, towers) from the first slice's sources,
        # what comes after (final norm, lm_head) from the last slice's (as mergekit plans them)
        after = comp in ("language", "lm_head")
        at = len(recipe.slices) - 1 if after else 0
        sl = recipe.slices[at]
        inputs, with_base = slice_inputs(recipe, sl, at, method, self.ref)
        rows = None
        for _, m in inputs:
            rows = _require(m, canon, shape, raw, comp, self.skeleton, rows_ok=canon in ROW_ALIGNED) or rows
        shared = ([sl.parameters] if method is self.methods["*"] else []) + [comp_params, glob]
        job.reads = tuple((m, canon) for _, m in inputs)
        job.with_base = with_base
        job.note = f"from slices[{at}]"
        self.set_merge(job, method, self.per_input(sl, inputs, with_base, lambda _j: canon), shared)
        if aligned:
            return self.realign(job, [m for _, m in inputs], inputs[0][1] if with_base else self.vocab_base)
        if job.action is Action.MERGE and rows is not None:
            job.rows = rows
            job.note += f"; rows 0..{rows - 1} merged, the rest kept (vocabulary sizes differ)"
        elif job.action is Action.COPY and rows is not None:
            raise OmnimergeError(
                f"{job.source.describe(canon)} has {job.source.info(canon)[1][0]} token rows, the skeleton "
                f"'{self.skeleton.name}' ({self.skeleton.path}) {shape[0]}: the output's config would not match its "
                "embeddings. Make the model of the first (last) slice the skeleton, or set `tokenizer: {source: "
                "base}` to realign the rows to one vocabulary")
        return job

    def per_input(self, sl, inputs, with_base: bool, key_of) -> list[tuple[str, list[dict], str]]:
        """(label, parameter dicts in precedence order, input key) of each model input of a slice (not the base)."""
        out = []
        for j, m in inputs[1:] if with_base else inputs:
            src = sl.sources[j]
            entry = _entry(self.recipe, src.model)
            out.append((src.model, [src.parameters] + ([entry.parameters] if entry else []), key_of(j)))
        return out

    def set_merge(self, job: Job, method: Method, per_input, shared) -> None:
        """``job`` merges its ``reads`` with ``method``; passthrough with scale 1 is a plain copy."""
        params = method.resolved(resolve_source_params(method, job.canonical, per_input, shared), self.facts)
        dtype = job.reads[0][0].info(job.reads[0][1])[0]
        job.out_dtype = self.target(dtype)
        if method.name == "passthrough" and (params["scale"] == [1.0] or not dtype.is_floating_point):
            (src, key), = job.reads
            job.action, job.source, job.source_key, job.reads = Action.COPY, src, (None if key == job.canonical
                                                                                   else key), None
            return
        job.action, job.method, job.params = Action.MERGE, method, params
        job.seed = tensor_seed(self.recipe.seed, job.canonical)

    def layer_jobs(self) -> list[Job]:
        """One job per tensor of every stacked layer, in layer order and the skeleton's tensor order."""
        recipe, method = self.recipe, self.methods["*"]
        suffixes = [m.group(1) for c in self.skeleton.raw_to_canon.values()
                    if (m := re.match(r"^language\.layers\.0\.(.+)$", c))]
        glob = recipe.parameters
        jobs = []
        for layer in self.layers:
            sl = recipe.slices[layer.slice]
            inputs = [(s.index, s.checkpoint) for s in layer.sources]
            for suffix in suffixes:
                canon = f"language.layers.{layer.index}.{suffix}"
                src0 = layer.sources[0]
                _, shape = src0.checkpoint.info(src0.key(suffix))
                job = Job(output_key(self.skeleton, canon), canon, "language", tuple(shape), torch.float32,
                          Action.MERGE, note=f"slices[{layer.slice}]")
                job.reads = tuple((s.checkpoint, s.key(suffix)) for s in layer.sources)
                job.with_base = layer.with_base
                keys = {s.index: s.key(suffix) for s in layer.sources}
                self.set_merge(job, method, self.per_input(sl, inputs, layer.with_base, keys.get),
                               [sl.parameters, glob])
                jobs.append(job)
        return jobs

    def realign(self, job: Job, inputs: list[Checkpoint], base: Checkpoint | None) -> Job:
        """``job`` (a merge of ``inputs``) on rows realigned to the output vocabulary."""
        job.align = self.vocabulary.alignment(inputs, base, self.ref)
        job.shape = (self.vocabulary.size, *job.shape[1:])
        job.rows = None
        if job.action is Action.COPY:  # passthrough: still a merge, of one realigned input
            return self.realigned_copy(job, job.source)
        job.note = (job.note + "; " if job.note else "") + "rows realigned to the output vocabulary"
        return job

    def realigned_copy(self, job: Job, src: Checkpoint) -> Job:
        method = get_method("passthrough")
        dtype = src.info(job.canonical)[0]
        job.action, job.method, job.params = Action.MERGE, method, {"scale": [1.0]}
        job.reads, job.with_base, job.source, job.source_key = ((src, job.canonical),), False, None, None
        job.out_dtype = self.target(dtype)
        job.seed = tensor_seed(self.recipe.seed, job.canonical)
        job.align = self.vocabulary.alignment([src], None, self.ref)
        job.shape = (self.vocabulary.size, *src.info(job.canonical)[1][1:])
        job.note = f"{src.name}'s rows realigned to the output vocabulary"
        return job


def _check_calibration(recipe: Recipe, methods: dict[str, Method], rel: Path | None,
                       skeleton: Checkpoint) -> list[list[Sample]] | None:
    """Every model's calibration samples, validated, when a method learns from them (None otherwise)."""
    needing = sorted({m.name for m in methods.values() if m.needs_calibration})
    if not needing:
        return None
    settings = recipe.calibration or CalibrationOptions()
    samples = []
    for i, e in enumerate(recipe.models):
        if not e.calibration:
            raise OmnimergeError(
                f"models[{i}] ({e.label}): method {', '.join(needing)} learns from unlabeled samples of each model; "
                "add `calibration: samples.jsonl` to every model (one {\"text\": ..., \"image\": ...} per line)"
            )
        path = Path(e.calibration)
        if not path.is_absolute() and rel is not None:
            path = rel / path
        samples.append(load_samples(path, limit=settings.samples, images=skeleton.family.kind == "vlm"))
    return samples


def _require(m: Checkpoint, canon: str, shape, raw: str, comp: str, skeleton: Checkpoint,
             rows_ok: bool = False) -> int | None:
    """Check that ``m`` has ``canon`` with the skeleton's shape; returns the shared row count if only rows differ."""
    if not m.has(canon):
        raise OmnimergeError(
            f"model '{m.name}' ({m.path}) has no tensor for '{canon}' (skeleton tensor '{raw}', component "
            f"'{comp}'). Set `components: {{{comp}: keep}}` to keep the skeleton's, or check that the models "
            "share an architecture"
        )
    _, s = m.info(canon)
    if tuple(s) == tuple(shape):
        return None
    if rows_ok and len(s) == len(shape) and tuple(s[1:]) == tuple(shape[1:]):
        return min(s[0], shape[0])
    raise OmnimergeError(
        f"shape mismatch for '{canon}': {m.describe(canon)} is {tuple(s)}, the skeleton's "
        f"'{raw}' ({skeleton.path}) is {tuple(shape)}. The models must share an architecture; "
        f"otherwise set `components: {{{comp}: keep}}`"
    )


def _check_layers(inputs: list[Checkpoint], skeleton: Checkpoint) -> None:
    want = skeleton.layer_count()
    for m in inputs:
        got = m.layer_count()
        if got != want:
            raise OmnimergeError(
                f"model '{m.name}' ({m.path}) has {got} decoder layers, the skeleton '{skeleton.name}' has {want}; "
                "merging needs the same layer count (a layer-dropping or depth-upscaled model cannot be "
                "aligned layer by layer)"
            )


# --- several skeletons (modality merging) -------------------------------------------------------
# Vision-, audio- and video-LLMs fine-tuned from one base LLM share its language backbone. A recipe
# with ``skeletons: [a, b, c]`` is planned as one ordinary single-skeleton merge per skeleton (each
# output's omnimerge.yaml names its own skeleton and reproduces it alone); run/outputs/skeletons.py
# computes what they share once.
_HUB_REV = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+@")


def _entry(recipe: Recipe, spec: str):
    """The model entry that ``spec`` names (by name, then by path), if any."""
    return next((e for e in recipe.models if e.name == spec), None) or \
        next((e for e in recipe.models if e.path == spec), None)


def _label(recipe: Recipe, spec: str, ckpt: Checkpoint) -> str:
    """The output subfolder of one skeleton: its model entry's `name`, else its folder (or hub repo) name."""
    entry = _entry(recipe, spec)
    if entry is not None and entry.name:
        label = entry.name
    else:
        label = Path(spec.split("@", 1)[0] if _HUB_REV.match(spec) else spec).name
        if label in ("", ".", ".."):
            label = ckpt.path.name
    if label.startswith(".") or "/" in label or "\\" in label:
        raise OmnimergeError(f"skeletons: '{spec}' would be written to OUT/{label}, which is not a plain folder name; "
                             "list the model under `models` with a `name:` to label its output")
    return label


def _backbone(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Language tensors and their shapes, then the width (not the rows: vocabularies may differ) of
    the embedding and the head, in the checkpoint's order."""
    shapes = {c: tuple(ckpt.info(c)[1]) for c in ckpt.canon_to_raw if component_of(c) == "language"}
    for c in ("embed.weight", "lm_head.weight"):
        if ckpt.has(c):
            shapes[c] = tuple(ckpt.info(c)[1][1:])
    return shapes


def _where(ckpt: Checkpoint, canon: str) -> str:
    return ckpt.source.describe(ckpt.raw_key(canon))


def _check_shared_backbone(skeletons: dict[str, Checkpoint]) -> None:
    """Every skeleton must have the first one's language backbone: same tensors, same shapes."""
    (first_label, first), *rest = skeletons.items()
    want = _backbone(first)
    fix = ("modality merging needs skeletons built on one base LLM (the same language backbone); merge models "
           "of different backbones separately")
    for label, ck in rest:
        if ck.layer_count() != first.layer_count():
            raise OmnimergeError(
                f"skeletons: '{label}' ({ck.path}) has {ck.layer_count()} decoder layers, '{first_label}' "
                f"({first.path}) has {first.layer_count()}; {fix}")
        got = _backbone(ck)
        for key in list(want) + [k for k in got if k not in want]:
            if key not in got or key not in want:
                (has, h), (lacks, l) = ((first, first_label), (ck, label)) if key not in got else \
                    ((ck, label), (first, first_label))
                raise OmnimergeError(f"skeletons: '{key}' is in '{h}' ({_where(has, key)}) but not in '{l}' "
                                     f"({lacks.path}); {fix}")
            if got[key] != want[key]:
                what = "width" if key in ("embed.weight", "lm_head.weight") else "shape"
                raise OmnimergeError(
                    f"skeletons: the {what} of '{key}' differs: {want[key]} in '{first_label}' ({_where(first, key)}), "
                    f"{got[key]} in '{label}' ({_where(ck, key)}); {fix}")


def build_plans(recipe: Recipe | dict, *, relative_to: str | Path | None = None,
                allow_pickle: bool = False) -> dict[str, Plan]:
    """One plan per skeleton of a recipe with ``skeletons:``, keyed by output label (OUT/<label>).

    Checks, before anything is read, that the labels are distinct folder names and that every
    skeleton has the same language backbone (tensors and shapes), naming the files that differ.
    """
    recipe = parse_recipe(recipe)
    if not recipe.skeletons:
        raise OmnimergeError("the recipe has no `skeletons:` list; use omnimerge.plan.build_plan for one output")
    rel = Path(relative_to) if relative_to else None
    skeletons: dict[str, Checkpoint] = {}
    specs: dict[str, str] = {}
    for spec in recipe.skeletons:
        entry = _entry(recipe, spec)
        ck = load_checkpoint(entry.path if entry else spec, name=spec, relative_to=rel, allow_pickle=allow_pickle,
                             lora_base=entry.lora_base if entry else None)
        label = _label(recipe, spec, ck)
        if label in skeletons:
            raise OmnimergeError(
                f"skeletons: '{specs[label]}' and '{spec}' would both be written to OUT/{label}; give them "
                "distinct folder names, or list them under `models` with distinct `name:`s")
        skeletons[label], specs[label] = ck, spec
    _check_shared_backbone(skeletons)
    return {label: build_plan(recipe.model_copy(update={"skeleton": spec, "skeletons": None}), relative_to=rel,
                              allow_pickle=allow_pickle)
            for label, spec in specs.items()}
