"""The method registry: every merging method is a pure tensor function plus typed parameters.

A method function has the signature::

    fn(base: Tensor | None, models: list[Tensor], ctx: MethodContext, **params) -> Tensor

* ``base`` is the base tensor (None when the method has ``needs_base=False`` and no base is given),
  ``models`` the aligned expert tensors; all are float tensors of one shape, in the compute dtype,
  on the compute device — except that a method registered with ``models_as_read=True`` gets the
  models in the dtype they were read in (e.g. bfloat16) where that dtype promotes to the compute
  dtype: such a method uses a model only in arithmetic with the base (``m - base``), whose type
  promotion computes in the compute dtype and gives the same bits as converting first, without a
  full-size converted copy of every model (a third less memory for TIES on three bf16 experts).
* Parameters declared ``per_model=True`` arrive as a list with one value per model; the others
  arrive as one scalar.
* The result is the merged tensor (not a delta) with the same shape as the inputs.
* ``ctx.generator`` is the only source of randomness allowed (seeded per tensor by the run);
  ``ctx.info`` is a dict the method may fill with facts for report.json (e.g. the rank it chose).
* A data-aware method (registered with ``calibration=(kinds...)``) also gets ``ctx.stats``: one mapping
  per model of the statistics its calibration samples gave for this tensor (e.g. ``gram``, the
  Gram matrix of the layer's inputs, or ``fisher``, the diagonal Fisher). A tensor with no statistics
  (an embedding, a norm) gets an empty mapping, and the method says what it does then.
* A method that needs a quantity over *every* tensor it merges (TIES's ``trim: global``: one
  magnitude threshold per task vector over the whole model) declares a :class:`Reduction`. The run
  computes it in streaming passes over the inputs before the merge (``run.stream.prepass``) and
  hands each tensor's merge the result as ``ctx.reduction``. Called directly on tensors, the method
  gets ``ctx.reduction = None`` and computes the quantity over the tensor it is given.
* A method registered with ``elementwise`` (a predicate on its parameters) declares that, with those
  parameters, each output element depends only on the same element of its inputs, or on the row along
  the last dimension that holds it (DELLA's ranks), and on ``ctx.reduction``: the run may then merge a
  large tensor in row blocks, calling the method once per
  block with ``ctx.offset`` = the flat index of the block's first element in the whole tensor. Such a
  method draws randomness by element index (see ``gta.dare_keep_mask``), never from the order of draws,
  so its result does not depend on the block size. A :class:`Reduction` with ``when_blocked`` gives a
  blocked tensor a reduction of its own (TIES's ``trim: per_tensor`` threshold, Breadcrumbs' rank cuts,
  slerp's and Model Stock's norms and dot products); a sum it takes over the tensor must not depend on
  the blocks (``methods.rowsums``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol

import torch

from ..errors import OmnimergeError

_KINDS = {float: "float", int: "int", str: "str", bool: "bool"}


@dataclass
class MethodContext:
    """What a method may know besides its tensors: the canonical key, its RNG, a report dict."""

    key: str
    generator: torch.Generator
    info: dict[str, Any] = field(default_factory=dict)
    stats: tuple[dict[str, torch.Tensor], ...] | None = None  # per model, for data-aware methods
    reduction: Any = None  # the method's global reduction over its group of tensors (see the module doc)
    offset: int = 0  # flat index, in the whole tensor, of the first element of the inputs (row blocks)


@dataclass(frozen=True)
class InputFacts:
    """What the plan knows about a merge's inputs before reading a tensor, for parameters whose
    default depends on them (``auto`` values, resolved once per merge so every tensor agrees)."""

    lora_experts: bool = False  # every model is a LoRA adapter over the base


class Accumulator(Protocol):
    """A reduction in progress: fed every tensor of its group once per pass, until ``done``."""

    done: bool

    def feed(self, base: torch.Tensor, models: list[torch.Tensor], ctx: MethodContext, params: dict) -> None:
        """One tensor's inputs (as the method gets them), in this pass."""

    def next_pass(self) -> None:
        """Called after every tensor of the group has been fed in this pass."""

    def result(self) -> Any:
        """Once ``done``: what each tensor's merge gets as ``ctx.reduction``."""


@dataclass(frozen=True)
class Reduction:
    """A quantity over all the tensors a method merges, computed before the merge.

    ``group(params)``: the key of the group of tensors that share one result (tensors with the same
    key share it), or None when the tensor needs none; ``start(params)``: a fresh :class:`Accumulator`."""

    group: Callable[[dict[str, Any]], Hashable | None]
    start: Callable[[dict[str, Any]], Accumulator]
    # a tensor merged in row blocks whose ``group`` is None needs a reduction over itself alone when this says so
    when_blocked: Callable[[dict[str, Any]], bool] | None = None


@dataclass(frozen=True)
class Param:
    """A typed method parameter with a default and an allowed range."""

    name: str
    kind: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    choices: tuple[Any, ...] | None = None
    per_model: bool = False
    check: Callable[[Any], Any] | None = None  # custom validation (returns the value or raises ValueError)
    kind_text: str | None = None  # how `omnimerge methods` names the type when `check` is used
    range_doc: str | None = None  # what `check` accepts, in words

    def range_text(self) -> str:
        if self.range_doc is not None:
            return self.range_doc
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        lo = hi = ""
        if self.minimum is not None:
            lo = ("(" if self.exclusive_minimum else "[") + f"{self.minimum:g}"
        if self.maximum is not None:
            hi = f"{self.maximum:g}" + (")" if self.exclusive_maximum else "]")
        if lo and hi:
            return f"{lo}, {hi}"
        if lo:
            return f"{'>' if self.exclusive_minimum else '>='} {self.minimum:g}"
        if hi:
            return f"{'<' if self.exclusive_maximum else '<='} {self.maximum:g}"
        return "any"

    @property
    def type_name(self) -> str:
        return self.kind_text or _KINDS[self.kind]

    def validate(self, value: Any, where: str) -> Any:
        """Return ``value`` coerced to this parameter's type, or raise naming ``where``."""
        if self.check is not None:
            try:
                return self.check(value)
            except ValueError as e:
                raise OmnimergeError(f"{where}: parameter '{self.name}': {e}") from None
        kind = _KINDS[self.kind]
        if self.kind is bool:
            if not isinstance(value, bool):
                raise OmnimergeError(f"{where}: parameter '{self.name}' must be true or false, got {value!r}")
            return value
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise OmnimergeError(f"{where}: parameter '{self.name}' must be a number ({kind}), got {value!r}")
            if self.kind is int:
                if float(value) != int(value):
                    raise OmnimergeError(f"{where}: parameter '{self.name}' must be an integer, got {value!r}")
                value = int(value)
            else:
                value = float(value)
                if not math.isfinite(value):
                    raise OmnimergeError(f"{where}: parameter '{self.name}' must be finite, got {value!r}")
            bad = (
                (self.minimum is not None and (value < self.minimum or (self.exclusive_minimum and value == self.minimum)))
                or (self.maximum is not None and (value > self.maximum or (self.exclusive_maximum and value == self.maximum)))
            )
            if bad:
                raise OmnimergeError(
                    f"{where}: parameter '{self.name}' = {value!r} is out of range; allowed: {self.range_text()}"
                )
        elif self.kind is str and not isinstance(value, str):
            raise OmnimergeError(f"{where}: parameter '{self.name}' must be a string, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise OmnimergeError(
                f"{where}: parameter '{self.name}' = {value!r} is not allowed; choose {self.range_text()}"
            )
        return value


@dataclass(frozen=True)
class Method:
    """A registered merging method."""

    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    needs_base: bool
    reference: str
    summary: str
    min_models: int = 1  # how many models (besides the base) the method takes
    max_models: int | None = None
    models_as_read: bool = False  # models may arrive in their read dtype (see the module doc)
    # ``resolve(params, facts) -> params``: replaces ``auto`` values from the inputs' facts, once per merge
    resolve: Callable[[dict[str, Any], InputFacts], dict[str, Any]] | None = None
    defaults_from: str = ""  # where the defaults come from (the reference code, file and line)
    calibration: tuple[str, ...] = ()  # statistics the method needs from calibration samples (empty: data-free)
    reduction: Reduction | None = None  # a global pre-pass (see the module doc)
    elementwise: Callable[[dict[str, Any]], bool] | None = None  # may run over row blocks (see the module doc)

    def blockable(self, params: dict[str, Any]) -> bool:
        """Whether, with ``params``, the method may merge a tensor in row blocks."""
        return self.elementwise is not None and bool(self.elementwise(params))

    @property
    def needs_calibration(self) -> bool:
        return bool(self.calibration)

    def resolved(self, params: dict[str, Any], facts: InputFacts) -> dict[str, Any]:
        """``params`` with every ``auto`` value decided from ``facts`` (unchanged without a resolver)."""
        return dict(params) if self.resolve is None else self.resolve(dict(params), facts)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.params) or "none"
        raise OmnimergeError(f"method '{self.name}' has no parameter '{name}' (its parameters: {known})")

    def __call__(self, base, models, ctx: MethodContext, **params) -> torch.Tensor:
        """The method on one tensor; parameters not given take their declared defaults."""
        unknown = set(params) - {p.name for p in self.params}
        if unknown:
            raise TypeError(f"method '{self.name}': unexpected parameters: {', '.join(sorted(unknown))}")
        return self.fn(base, models, ctx, **{p.name: p.default for p in self.params} | params)


_REGISTRY: dict[str, Method] = {}


def register(name: str, *, params: tuple[Param, ...] = (), needs_base: bool, reference: str, summary: str,
             min_models: int = 1, max_models: int | None = None, models_as_read: bool = False,
             resolve: Callable[[dict[str, Any], InputFacts], dict[str, Any]] | None = None, defaults_from: str = "",
             calibration: tuple[str, ...] = (), reduction: Reduction | None = None,
             elementwise: Callable[[dict[str, Any]], bool] | bool | None = None):
    """Decorator: register ``fn`` as method ``name`` (taking min_models..max_models models besides the base;
    ``models_as_read``: see the module doc; ``resolve``: see :meth:`Method.resolved`; ``defaults_from``: the
    source of the defaults, shown by ``omnimerge methods``; ``calibration``: the statistics a data-aware method
    needs, see :class:`MethodContext`; ``elementwise``: True, or a predicate on the parameters, when the method may
    merge in row blocks, see the module doc)."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        if models_as_read and not needs_base:
            raise ValueError(f"method {name!r}: models_as_read needs a base (models are used as m - base)")
        _REGISTRY[name] = Method(name, fn, tuple(params), needs_base, reference, summary, min_models, max_models,
                                 models_as_read, resolve, defaults_from, tuple(calibration), reduction,
                                 (lambda params: True) if elementwise is True else elementwise or None)
        return fn

    return deco


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise OmnimergeError(f"unknown method '{name}'; known methods: {known} (see `omnimerge methods`)") from None


def list_methods() -> list[Method]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
