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
        for k, v in (self.model_extra or {}).items():
            try:
                self.model_extra[k] = _PARAM_ADAPTER.validate_python(v)
            except ValidationError as e:
                reasons = "; ".join(err["msg"] for err in e.errors() if "regular expression" in err["msg"])
                raise ValueError(f"per-model parameter '{k}': "
                                 + (reasons or f"must be a scalar or a list of {{filter, value}}, got {v!r}")) from None
        return self


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
    shard_size: Union[int, str] = "5GB"
    calibration: CalibrationOptions | None = None
    allow_duplicate_models: bool | None = Field(None, description="the same model may appear more than once in `models:`")
    copy_nonfinite: bool | None = Field(None, description="copy kept tensors that hold NaN/Inf as they are")

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
