"""The recipe: what to merge, how, and into which architecture. YAML or Python, checked by pydantic."""

from __future__ import annotations

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

    Any key besides ``path``, ``name`` and ``lora_base`` is a per-model parameter of the method,
    e.g. ``weight: 0.3`` or ``density: [{filter: 'mlp', value: 0.5}, {value: 0.2}]``.
    """

    model_config = ConfigDict(extra="allow")
    path: str
    name: str | None = None
    lora_base: str | None = Field(None, description="base model of a LoRA adapter, if its adapter_config lacks one")

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

    def policy(self, component: str) -> Policy:
        return self.components.get(component, "merge" if component == "language" else "keep")


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
        n = int(float(m.group(1)) * base ** " KMGT".index(unit))
    if n <= 0:
        raise ValueError(f"shard_size must be positive, got {v!r}")
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


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise OmnimergeError(f"{path}: cannot read the recipe ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise OmnimergeError(f"{path}: not valid YAML ({e})") from None
    return parse_recipe(data, str(path))
