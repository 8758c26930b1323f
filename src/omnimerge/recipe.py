"""The recipe: what to merge, how, and into which architecture. YAML or Python, checked by pydantic."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .dtypes import DTYPE_NAMES
from .errors import OmnimergeError
from .families.align import COMPONENTS

Scalar = Union[bool, int, float, str]
DTypeName = Literal[DTYPE_NAMES]
ComponentName = Literal[COMPONENTS]


class FilteredValue(BaseModel):
    """One entry of a per-key parameter list: ``{filter: <regex on canonical key>, value: ...}``.

    The first entry whose filter matches the canonical key (``re.search``) wins; an entry without a
    filter matches every key.
    """

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Scalar

    @field_validator("filter")
    @classmethod
    def _compiles(cls, v):
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"invalid regular expression {v!r}: {e}") from None
        return v


ParamValue = Union[Scalar, list[FilteredValue]]


def pick(value: ParamValue, key: str):
    """The value of a parameter for one canonical key; ``None`` when no filter entry matches."""
    if not isinstance(value, list):
        return value
    for entry in value:
        if entry.filter is None or re.search(entry.filter, key):
            return entry.value
    return None


class ModelEntry(BaseModel):
    """An input model: ``path`` (folder, LoRA adapter folder or cached hub id) plus per-model parameters.

    Any key besides ``path``, ``name``, ``lora_base`` and ``calibration`` is a per-model parameter of the
    method, e.g. ``weight: 0.3`` or ``density: [{filter: 'mlp', value: 0.5}, {value: 0.2}]``.
    """

    model_config = ConfigDict(extra="allow")
    path: str
    name: str | None = None
    lora_base: str | None = Field(None, description="base model of a LoRA adapter, if its adapter_config lacks one")
    calibration: str | None = Field(None, description="JSONL of unlabeled samples for data-aware methods")

    @property
    def label(self) -> str:
        return self.name or self.path

    @property
    def parameters(self) -> dict[str, ParamValue]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _params_are_values(self):
        _validated_params(self.model_extra, "per-model parameter")
        return self


def _validated_params(extra: dict | None, what: str) -> None:
    """Per-model (or per-source) parameters: each a scalar or a list of {filter, value} (checked in place)."""
    for k, v in (extra or {}).items():
        try:
            extra[k] = _PARAM_ADAPTER.validate_python(v)
        except ValidationError as e:
            reasons = "; ".join(err["msg"] for err in e.errors() if "regular expression" in err["msg"])
            raise ValueError(f"{what} '{k}': "
                             + (reasons or f"must be a scalar or a list of {{filter, value}}, got {v!r}")) from None


class SliceSource(BaseModel):
    """One layer range of one model in a slice: ``{model: <name or path>, layers: [start, end]}``, the
    decoder layers start..end−1 (``end`` excluded, as in Python and mergekit's ``layer_range``).

    Any other key is a parameter of the method for this model in this slice (``scale: 0.5``,
    ``weight: [{filter: mlp, value: 0.3}]``); its filters match the model's own keys."""

    model_config = ConfigDict(extra="allow")
    model: str
    layers: tuple[int, int]

    @property
    def parameters(self) -> dict[str, ParamValue]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _params_are_values(self):
        _validated_params(self.model_extra, "slice source parameter")
        return self


class Slice(BaseModel):
    """A run of output layers: layer i of the run comes from layer ``start + i`` of each source (merged with
    the recipe's method when there are several). ``{model: a, layers: [0, 8]}`` is short for
    ``{sources: [{model: a, layers: [0, 8]}]}``."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource] = Field(min_length=1)
    base: str | None = Field(None, description="the slice's base (one of its sources); default: the recipe's")
    parameters: dict[str, ParamValue] = {}

    @model_validator(mode="before")
    @classmethod
    def _one_source_shorthand(cls, data):
        if isinstance(data, dict) and "model" in data and "sources" not in data:
            return {"sources": [data]}
        return data

    @model_validator(mode="after")
    def _same_lengths(self):
        for j, s in enumerate(self.sources):
            if s.layers[1] <= s.layers[0] or s.layers[0] < 0:
                raise ValueError(f"sources[{j}] ({s.model}): layers {list(s.layers)} is empty or negative; give "
                                 "[start, end] with 0 <= start < end (end excluded)")
        lengths = {s.layers[1] - s.layers[0] for s in self.sources}
        if len(lengths) > 1:
            spans = ", ".join(f"{s.model} {list(s.layers)}" for s in self.sources)
            raise ValueError(f"the sources of a slice must span the same number of layers (merged layer by layer); "
                             f"got {spans}")
        return self


class ModelToken(BaseModel):
    """A token's row taken from one model's row of another token: ``{kind: model_token, model: m, token: 'x'}``
    (or ``token_id: 7``)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_of(self):
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of `token` and `token_id`")
        return self


class ZeroRow(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


class TokenRow(BaseModel):
    """Where one output token's embedding row comes from (mergekit's ``tokens:`` entries): ``source`` a model
    (its row of the token), ``{kind: zero}`` or ``{kind: model_token, ...}``; ``force``: use it for every model,
    even those that have the token."""

    model_config = ConfigDict(extra="forbid")
    source: Union[str, ZeroRow, ModelToken, None] = None
    force: bool = False


class Vocabulary(BaseModel):
    """The output vocabulary, with every input's embedding and lm_head rows realigned to it by token
    (mergekit's ``tokenizer:``). ``source``: ``union`` (every model's tokens), ``base`` (the base's tokenizer,
    else the first model's) or a model (its tokenizer)."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    base: str | None = Field(None, description="the model `source: base` names, whose rows also win for tokens that "
                             "several merged models share (default: the recipe's base, else the skeleton)")
    tokens: dict[str, TokenRow] = {}
    pad_to_multiple_of: int | None = Field(None, ge=1, le=1 << 20)


class ComponentMethod(BaseModel):
    """A component merged with a method of its own: ``{method: ties, parameters: {density: 0.5}}``."""

    model_config = ConfigDict(extra="forbid")
    method: str
    parameters: dict[str, ParamValue] = {}


class Take(BaseModel):
    """A component copied from one named input: ``{take: <model name or path>}``."""

    model_config = ConfigDict(extra="forbid")
    take: str


Policy = Union[Literal["merge", "keep"], Take, ComponentMethod]


class CalibrationOptions(BaseModel):
    """How data-aware methods use each model's ``calibration`` samples."""

    model_config = ConfigDict(extra="forbid")
    samples: int = Field(32, ge=1, le=100_000, description="samples per model (the first lines of its file)")
    batch_size: int = Field(4, ge=1, le=4096)
    max_tokens: int = Field(512, ge=1, le=1_000_000, description="longest sample, in tokens")


class Recipe(BaseModel):
    """A merge recipe. See docs/recipes.md for every field."""

    model_config = ConfigDict(extra="forbid")
    method: str
    models: list[ModelEntry] = Field(min_length=1)
    base: str | None = None
    skeleton: str | None = None
    skeletons: list[str] | None = Field(None, min_length=1, description="modality merging: one output per skeleton")
    parameters: dict[str, ParamValue] = {}
    components: dict[ComponentName, Policy] = {}
    dtype: DTypeName = "float32"
    out_dtype: DTypeName | None = None
    seed: int = 0
    tokenizer_source: str | None = None
    tokenizer: Vocabulary | None = Field(None, description="build the output vocabulary and realign embedding rows")
    slices: list[Slice] | None = Field(None, min_length=1, description="layer ranges stacked into the output")
    shard_size: Union[int, str] = "5GB"
    calibration: CalibrationOptions | None = None
    allow_duplicate_models: bool | None = Field(None, description="the same model may appear more than once in `models:`")
    copy_nonfinite: bool | None = Field(None, description="copy kept tensors that hold NaN/Inf as they are")

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data):
        """``tokenizer_source: union`` is ``tokenizer: {source: union}``; a recipe with ``slices:`` may leave
        out ``models:`` (then every model its slices name, in order)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("tokenizer_source") == "union":
            if data.get("tokenizer") is not None:
                raise ValueError("give `tokenizer_source` or `tokenizer`, not both")
            data["tokenizer"] = {"source": "union"}
            data.pop("tokenizer_source")
        if isinstance(data.get("slices"), list) and data.get("models") is None:
            specs: list[str] = []
            for sl in data["slices"]:
                srcs = sl.get("sources", [sl]) if isinstance(sl, dict) else []
                for src in srcs if isinstance(srcs, list) else []:
                    if isinstance(src, dict) and isinstance(src.get("model"), str) and src["model"] not in specs:
                        specs.append(src["model"])
            data["models"] = [{"path": m} for m in specs]
        return data

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, v):
        parse_size(v)
        return v

    @property
    def shard_bytes(self) -> int:
        return parse_size(self.shard_size)

    @model_validator(mode="after")
    def _one_kind_of_skeleton(self):
        if self.skeletons is not None:
            if self.skeleton is not None:
                raise ValueError("give `skeleton:` (one output) or `skeletons:` (one output per skeleton), not both")
            dup = sorted({s for s in self.skeletons if self.skeletons.count(s) > 1})
            if dup:
                raise ValueError(f"skeletons: {', '.join(dup)} listed more than once")
        return self

    @model_validator(mode="after")
    def _slices_name_models(self):
        if self.tokenizer is not None and self.tokenizer_source is not None:
            raise ValueError("give `tokenizer_source` (copy a model's tokenizer files) or `tokenizer` (build the "
                             "vocabulary and realign the embeddings), not both")
        if not self.slices:
            return self
        if self.skeletons is not None:
            raise ValueError("`slices:` builds one output; it cannot be combined with `skeletons:`")
        known = {e.name for e in self.models if e.name} | {e.path for e in self.models}
        for i, sl in enumerate(self.slices):
            for j, src in enumerate(sl.sources):
                if src.model not in known and src.model != self.base:
                    raise ValueError(f"slices[{i}].sources[{j}].model '{src.model}' is not the name or path of a "
                                     "model under `models:` (nor the base); list it there, or leave `models:` out")
            if sl.base is not None and sl.base not in [s.model for s in sl.sources]:
                raise ValueError(f"slices[{i}].base '{sl.base}' must be one of the slice's sources (its layers are "
                                 "the base of the slice's task vectors)")
        return self

    @model_validator(mode="after")
    def _each_model_once(self):
        seen: dict[str, int] = {}
        names: dict[str, int] = {}
        for i, entry in enumerate(self.models):
            if entry.name is not None:
                if entry.name in names:
                    raise ValueError(f"models[{i}].name '{entry.name}' is also the name of models[{names[entry.name]}]; "
                                     "give each model its own name")
                names[entry.name] = i
            key = same_spec_key(entry.path)
            if key in seen and not self.allow_duplicate_models:
                raise ValueError(duplicate_model_message(seen[key], i, entry.path))
            seen.setdefault(key, i)
        return self

    @model_validator(mode="after")
    def _values_fit_the_dtype(self):
        """Numbers the merge computes with must be representable in the compute dtype."""
        where_values = [(f"parameters.{k}", v) for k, v in self.parameters.items()]
        where_values += [(f"components.{c}.parameters.{k}", v) for c, pol in self.components.items()
                         if isinstance(pol, ComponentMethod) for k, v in pol.parameters.items()]
        where_values += [(f"models[{i}].{k}", v) for i, e in enumerate(self.models) for k, v in e.parameters.items()]
        for i, sl in enumerate(self.slices or []):
            where_values += [(f"slices[{i}].parameters.{k}", v) for k, v in sl.parameters.items()]
            where_values += [(f"slices[{i}].sources[{j}].{k}", v) for j, src in enumerate(sl.sources)
                             for k, v in src.parameters.items()]
        for where, value in where_values:
            for j, v in enumerate(value if isinstance(value, list) else [value]):
                v = v.value if isinstance(v, FilteredValue) else v
                at = f"{where}[{j}].value" if isinstance(value, list) else where
                check_number(v, at, self.dtype)
        return self

    def policy(self, component: str) -> Policy:
        return self.components.get(component, "merge" if component == "language" else "keep")


# the largest finite value and the smallest positive one of each compute dtype
_RANGES = {"float32": (3.4028234663852886e38, 1.401298464324817e-45),
           "float16": (65504.0, 5.960464477539063e-08),
           "bfloat16": (3.3895313892515355e38, 9.183549615799121e-41),
           "float64": (1.7976931348623157e308, 5e-324)}
_INT_MAX = 2**63 - 1


def check_number(v, where: str, dtype: str = "float32") -> None:
    """A parameter value that the merge can compute with in ``dtype``: finite, not so large that it
    overflows, not so small that it rounds to zero; integers within 64 bits."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return
    if isinstance(v, int):
        if abs(v) > _INT_MAX:
            raise ValueError(f"{where} = {v} does not fit in 64 bits; use a smaller number")
        return
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{where} = {v} is not a finite number; give a finite value")
    big, tiny = _RANGES[dtype]
    if abs(v) > big:
        raise ValueError(f"{where} = {v!r} overflows {dtype} (largest {big:.4g}), the merge's compute dtype; use a "
                         "smaller value" + (" or `dtype: float64`" if dtype != "float64" else ""))
    if v != 0 and abs(v) < tiny:
        raise ValueError(f"{where} = {v!r} rounds to 0 in {dtype}, the merge's compute dtype; use 0 or a larger value")


def same_spec_key(spec: str) -> str:
    """``spec`` normalised so that two spellings of one path (``./m``, ``m/``) compare equal."""
    if re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$", spec) and not os.path.exists(spec):
        return spec  # a hub id
    return os.path.normpath(os.path.expanduser(spec))


def duplicate_model_message(first: int, again: int, spec: str) -> str:
    return (f"models[{again}] ({spec}) is the same model as models[{first}]; listing a model twice gives it twice the "
            "weight. Remove one, or set `allow_duplicate_models: true` if that is meant")


def parse_size(v: int | str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a byte count -> bytes."""
    if isinstance(v, bool):
        raise ValueError(f"shard_size must be a byte count or a size like '5GB', got {v!r}")
    if isinstance(v, int):
        n = v
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i?)B?|B?)\s*", str(v), re.IGNORECASE)
        if not m:
            raise ValueError(f"shard_size {v!r}: use a byte count or a size like '5GB' or '500MB'")
        unit = (m.group(2) or " ").upper()
        base = 1024 if m.group(3) else 1000
        size = float(m.group(1)) * base ** " KMGT".index(unit)
        if not size < 2**63:
            raise ValueError(f"shard_size {v!r} is larger than any disk; use a size like '5GB'")
        n = int(size)
    if n <= 0:
        raise ValueError(f"shard_size must be positive, got {v!r}")
    if n > _INT_MAX:
        raise ValueError(f"shard_size {v!r} is larger than any disk; use a size like '5GB'")
    return n


from pydantic import TypeAdapter  # noqa: E402

_PARAM_ADAPTER = TypeAdapter(ParamValue)


def _format_errors(e: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid recipe"]
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith(("function-", "literal[", "union[")))
        lines.append(f"  - {loc or '(top level)'}: {err['msg']}")
    return "\n".join(lines)


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate a dict (or a Recipe) into a Recipe, with errors that name the field."""
    if isinstance(data, Recipe):
        return data
    if not isinstance(data, dict):
        raise OmnimergeError(f"{source}: a recipe must be a mapping of fields, got {type(data).__name__}")
    if "merge_method" in data:  # a mergekit configuration: translated field by field
        from .mergekit_yaml import from_mergekit

        data = from_mergekit(data, source)
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise OmnimergeError(_format_errors(e, source)) from None


MAX_RECIPE_BYTES = 10 << 20


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        if path.is_dir():
            raise OmnimergeError(f"{path}: is a folder; give the recipe's YAML file")
        with open(path, "rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise OmnimergeError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise OmnimergeError(f"{path}: over {MAX_RECIPE_BYTES >> 20} MB — not a recipe; give the recipe's YAML file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise OmnimergeError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the "
                             "recipe as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as e:
        raise OmnimergeError(f"{path}: not valid YAML ({e})") from None
    return parse_recipe(data, str(path))
