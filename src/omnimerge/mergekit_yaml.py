"""mergekit's YAML, read as an omnimerge recipe: the translation of every field, with mergekit's conventions.

A mapping with a top-level ``merge_method`` is a mergekit configuration. ``from_mergekit`` turns it into the
fields of an omnimerge Recipe so that the merge computes what mergekit 0.1.5 computes for it:

* method names map one to one (``linear`` is our ``average``); mergekit's defaults, which differ from ours
  (``density: 1``, ``normalize``/``rescale`` per method), are written out explicitly;
* ``base_model`` is removed from the models of the methods that need a base (mergekit skips its task vector
  and its parameters) and of those that take one if given (``nuslerp``, ``multislerp``), and added to the
  models of ``linear`` and ``karcher`` when it is not listed (mergekit adds it: for them it is one more input);
* DARE's ``density`` (a keep probability) becomes our drop rate ``p = 1 − density``; ``rescale: true`` is our
  ``rescale: l1`` (match the task vector's L1 norm), ``false`` is ``none``;
* parameter values keep mergekit's precedence (model > slice > global > mergekit's default); filters
  (substrings of mergekit's tensor names such as ``model.layers.3.mlp.up_proj.weight``) become regular
  expressions on our canonical keys (``language.layers.3.mlp.up_proj.weight``); gradients (a list of
  numbers interpolated over the decoder layers) become one entry per layer, which needs the layer count,
  read from the base model (or the first model);
* every component is merged (mergekit merges every tensor, embeddings and lm_head included);
* ``dtype`` is the dtype mergekit computes in: omnimerge computes in float32 (float64 if asked) and writes
  ``out_dtype`` (or ``dtype`` when ``out_dtype`` is absent).

What cannot be translated is refused with an OmnimergeError naming the field and the fix. Fields that have
no effect here (``int8_mask``, ``chat_template: auto``, parameters the method ignores in mergekit too) are
accepted; the ones that would surprise are logged as notes (logger ``omnimerge.mergekit``, printed on
stderr when logging is not configured).
docs/mergekit.md maps every field.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .dtypes import DTYPE_NAMES
from .errors import OmnimergeError
from .families.align import COMPONENTS

COMPONENTS_ALL_MERGED = dict.fromkeys(COMPONENTS, "merge")
REQUIRED = object()  # a mergekit parameter without a default
log = logging.getLogger("omnimerge.mergekit")


# --- values -------------------------------------------------------------------------------------
def _num(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise OmnimergeError(f"{where}: expected a number, got {v!r}")
    try:
        return float(v)
    except ValueError:
        raise OmnimergeError(f"{where}: expected a number, got {v!r}") from None


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise OmnimergeError(f"{where}: expected true or false, got {v!r}")
    return v


def _keep(v: Any, where: str) -> Any:
    return _num(v, where)


def _int(v: Any, where: str) -> int:
    n = _num(v, where)
    if n != int(n):
        raise OmnimergeError(f"{where}: expected an integer, got {v!r}")
    return int(n)


def _density_to_p(v: Any, where: str) -> float:
    d = _num(v, where)
    if not 0 < d <= 1:
        raise OmnimergeError(f"{where}: DARE density (the fraction kept) must be in (0, 1], got {d!r}")
    return 0.0 if d >= 1 else 1.0 - d


def _rescale(v: Any, where: str) -> str:
    return "l1" if _bool(v, where) else "none"


@dataclass(frozen=True)
class MkParam:
    """A parameter of a mergekit method: its default there, and how it becomes ours."""

    name: str  # mergekit's name
    default: Any = REQUIRED
    ours: str | None = None  # our parameter's name (None: accepted, no effect)
    convert: Callable[[Any, str], Any] = _keep
    per_input: bool = False  # per model in mergekit (else shared: only global / slice parameters)


@dataclass(frozen=True)
class MkMethod:
    ours: str
    base: str  # "required", "optional" (the base when given, else none) or "ignored" (an ordinary input)
    params: tuple[MkParam, ...]
    min_non_base: int = 1
    max_non_base: int | None = None
    fixed: tuple[tuple[str, Any], ...] = ()  # our parameters set to mergekit's behaviour, whatever our default

    def param(self, name: str) -> MkParam | None:
        return next((p for p in self.params if p.name == name), None)


def _gta(ours: str, normalize: bool, rescale: bool, density: str | None, extra: tuple[MkParam, ...] = (),
         fixed: tuple[tuple[str, Any], ...] = ()) -> MkMethod:
    """mergekit's generalised task arithmetic family; ``density``: how its density reaches us; ``fixed``:
    our parameters that must take mergekit's behaviour."""
    dens = {
        None: MkParam("density", 1.0, None, per_input=True),  # task_arithmetic: no sparsification
        "density": MkParam("density", 1.0, "density", per_input=True),
        "p": MkParam("density", 1.0, "p", _density_to_p, per_input=True),
    }[density]
    return MkMethod(ours, "required", (
        MkParam("weight", REQUIRED, "weight", per_input=True),
        dens,
        MkParam("lambda", 1.0, "lambda"),
        MkParam("normalize", normalize, "normalize", _bool),
        MkParam("rescale", rescale, "rescale" if density is not None else None, _rescale),
        MkParam("int8_mask", False, None, _bool),
        *extra,
    ), fixed=fixed)


_GAMMA = MkParam("gamma", 0.01, "gamma", per_input=True)
_PER_TENSOR = (("trim", "per_tensor"),)  # mergekit's magnitude trim keeps each tensor's own top density
_EPSILON = MkParam("epsilon", 0.15, "epsilon", per_input=True)

# mergekit 0.1.5: mergekit/merge_methods/registry.py and the method modules (defaults as there).
METHODS: dict[str, MkMethod] = {
    "linear": MkMethod("average", "ignored", (MkParam("weight", REQUIRED, "weight", per_input=True),
                                              MkParam("normalize", True, "normalize", _bool))),
    "slerp": MkMethod("slerp", "required", (MkParam("t", REQUIRED, "t"),), 1, 1),
    "model_stock": MkMethod("model_stock", "required", (MkParam("filter_wise", False, "filter_wise", _bool),), 2),
    "task_arithmetic": _gta("task_arithmetic", False, False, None),
    "ties": _gta("ties", True, False, "density", fixed=_PER_TENSOR),
    "dare_linear": _gta("dare_linear", False, True, "p"),
    "dare_ties": _gta("dare_ties", False, True, "p", fixed=_PER_TENSOR),
    "breadcrumbs": _gta("breadcrumbs", False, False, "density", (_GAMMA,)),
    "breadcrumbs_ties": _gta("breadcrumbs_ties", False, False, "density", (_GAMMA,)),
    "della": _gta("della", True, True, "density", (_EPSILON,)),
    "della_linear": _gta("della_linear", False, True, "density", (_EPSILON,)),
    # mergekit 0.1.5's methods outside generalised task arithmetic (defaults: each method's module, see
    # omnimerge's methods/spherical.py and methods/selective.py for file and line)
    "nuslerp": MkMethod("nuslerp", "optional", (
        MkParam("weight", REQUIRED, "weight", per_input=True),
        MkParam("nuslerp_flatten", True, "flatten", _bool),
        MkParam("nuslerp_row_wise", False, "row_wise", _bool),
    ), 2, 2),
    "multislerp": MkMethod("multislerp", "optional", (
        MkParam("weight", REQUIRED, "weight", per_input=True),
        MkParam("normalize_weights", True, "normalize", _bool),
        MkParam("eps", 1e-8, "eps"),
    )),
    "karcher": MkMethod("karcher", "ignored", (MkParam("max_iter", 10, "max_iter", _int), MkParam("tol", 1e-5, "tol"))),
    "arcee_fusion": MkMethod("arcee_fusion", "required", (), 1, 1),
    "nearswap": MkMethod("nearswap", "required", (MkParam("t", REQUIRED, "t"),), 1, 1),
    "sce": MkMethod("sce", "required", (MkParam("select_topk", 1.0, "select_topk"),
                                        MkParam("int8_mask", False, None, _bool))),
    "ram": MkMethod("ram", "required", (MkParam("epsilon", 1e-5, "epsilon"),)),
    "ramplus_tl": MkMethod("ramplus_tl", "required", (MkParam("r", 0.1, "r"), MkParam("alpha", 0.2, "alpha"),
                                                      MkParam("epsilon", 1e-5, "epsilon"))),
    "passthrough": MkMethod("passthrough", "ignored", (MkParam("scale", 1.0, "scale", per_input=True),), 1, 1),
}
# Parameters of some supported mergekit method: a method that does not know one ignores it (as mergekit does).
_KNOWN_PARAMS = sorted({p.name for m in METHODS.values() for p in m.params})
_TOP_LEVEL = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
              "tokenizer_source", "tokenizer", "chat_template", "modules")


# --- filters and gradients ----------------------------------------------------------------------
# mergekit's names of the text decoder's tensors -> our canonical prefixes.
_PREFIXES = (("model.layers.", "language.layers."), ("model.norm.", "language.norm."),
             ("model.embed_tokens.", "embed."), ("lm_head.", "lm_head."))


def _overlaps(prefix: str, f: str) -> list[str | None]:
    """Where ``f`` starts inside ``prefix``: the rest of ``f`` after the prefix (None: ``f`` ends inside it)."""
    out: list[str | None] = []
    for p in range(len(prefix)):
        head = prefix[p:]
        if f.startswith(head):
            out.append(f[len(head):])
        elif head.startswith(f):
            out.append(None)
    return out


def filter_regex(f: str | None) -> str | None:
    """A regex on canonical keys matching exactly the keys whose mergekit name contains the substring ``f``.

    mergekit matches ``filter`` as a substring of its tensor name (``model.layers.3.self_attn.q_proj.weight``,
    ``model.embed_tokens.weight``, ``model.norm.weight``, ``lm_head.weight``); ours are regexes on canonical keys
    (``language.layers.3.self_attn.q_proj.weight``, ``embed.weight``, ...). A filter that touches none of
    the prefixes (``self_attn``, ``mlp``, ``q_proj``, ``layernorm``) stays a plain (escaped) substring. Tensors
    outside the text decoder (vision, projector) are matched against their canonical key.
    """
    if f is None or f == "*":
        return None
    if not any(_overlaps(mk, f) or _overlaps(c, f) for mk, c in _PREFIXES):
        return re.escape(f)
    alts = []
    for mk, canon in _PREFIXES:
        alts.append("^" + re.escape(canon) + ".*" + re.escape(f))
        for rest in _overlaps(mk, f):
            alts.append("^" + re.escape(canon) + ("" if rest is None else re.escape(rest)))
    outside = "|".join(re.escape(c) for _, c in _PREFIXES)
    alts.append(f"^(?!{outside}).*" + re.escape(f))
    return "|".join(dict.fromkeys(alts))


def _layer_and(i: int, rx: str | None) -> str:
    layer = rf"language\.layers\.{i}\."
    return "^" + layer if rx is None else f"^(?=.*(?:{rx})){layer}"


def _interpolate(values: list, t: float) -> Any:
    """mergekit's gradient: numbers interpolate linearly at t·(n−1); other values are picked at ⌊t·(n−1)⌋."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


@dataclass
class _Context:
    source: str
    relative_to: Path | None
    layer_spec: str | None  # the model whose layer count gradients use
    _layers: int | None = None
    fixed: list[tuple[int, float]] | None = None  # with slices: the layers a gradient spreads over, and their t

    def layers(self, where: str) -> int:
        if self._layers is None:
            if self.layer_spec is None:
                raise OmnimergeError(f"{where}: a gradient needs the layer count, and there is no model to read it from")
            self._layers = _layer_count(self.layer_spec, self.relative_to, where)
        return self._layers

    def positions(self, where: str) -> list[tuple[int, float]]:
        """(layer index in the filter's key space, t) of each layer a gradient spreads over."""
        if self.fixed is not None:
            return self.fixed
        n = self.layers(where)
        return [(i, i / (n - 1) if n > 1 else 1.0) for i in range(n)]

    def over(self, positions: list[tuple[int, float]]) -> "_Context":
        return _Context(self.source, self.relative_to, self.layer_spec, self._layers, positions)


def _layer_count(spec: str, relative_to: Path | None, where: str) -> int:
    from .checkpoints.checkpoint import load_checkpoint

    try:
        n = load_checkpoint(spec, relative_to=relative_to).layer_count()
    except OmnimergeError as e:
        raise OmnimergeError(f"{where}: needs the decoder layer count of '{spec}', which cannot be read: {e}") from None
    if n == 0:
        raise OmnimergeError(f"{where}: '{spec}' has no decoder layers to spread a gradient or a slice over")
    return n


def _entries(setting: Any, where: str, conv: Callable[[Any, str], Any], ctx: _Context) -> list[dict] | None:
    """A mergekit ParameterSetting -> our list of {filter, value} entries (None: no value, an empty list)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return [{"filter": None, "value": conv(setting, where)}]
    if not isinstance(setting, list):
        raise OmnimergeError(f"{where}: expected a value, a list of values (a gradient) or a list of "
                             f"{{filter, value}}, got {setting!r}")
    if not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        return _gradient(None, setting, where, conv, ctx)
    out: list[dict] = []
    for j, cond in enumerate(setting):
        w = f"{where}[{j}]"
        if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
            raise OmnimergeError(f"{w}: each entry of a conditional list is {{filter: <substring>, value: ...}}, "
                                 f"got {cond!r}")
        f = cond.get("filter")
        if f is not None and not isinstance(f, str):
            raise OmnimergeError(f"{w}.filter: expected a string, got {f!r}")
        rx = filter_regex(f)
        v = cond["value"]
        if isinstance(v, list):
            if not v or not all(isinstance(e, (bool, int, float, str)) for e in v):
                raise OmnimergeError(f"{w}.value: a gradient is a non-empty list of values, got {v!r}")
            out += _gradient(rx, v, f"{w}.value", conv, ctx)
        elif isinstance(v, (bool, int, float, str)):
            out.append({"filter": rx, "value": conv(v, f"{w}.value")})
        else:
            raise OmnimergeError(f"{w}.value: expected a value or a gradient, got {v!r}")
        if rx is None:
            break  # a catch-all: later entries are never reached (as in mergekit)
    return out


def _gradient(rx: str | None, values: list, where: str, conv, ctx: _Context) -> list[dict]:
    """Per-layer entries for layers 0..L−1 at t = i/(L−1) (t = 1 for one layer), then t = 0 for the rest
    (embeddings, final norm, lm_head: mergekit plans them outside the layers, at t = 0)."""
    positions = ctx.positions(where)
    for v in values:
        conv(v, where)  # each value must be valid for the parameter
    out = []
    for i, t in positions:
        out.append({"filter": _layer_and(i, rx), "value": _interpolate_conv(values, t, where, conv)})
    out.append({"filter": rx, "value": _interpolate_conv(values, 0.0, where, conv)})
    return out


def _interpolate_conv(values: list, t: float, where: str, conv) -> Any:
    """Interpolate in mergekit's value space (numbers as floats), then convert (e.g. density -> p)."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    raw = _interpolate([float(v) for v in values] if numeric else values, t)
    return conv(raw, where)


def _chain(settings: list[tuple[Any, str]], default: Any, conv, ctx: _Context) -> Any:
    """Our value for one parameter from mergekit settings in precedence order, then mergekit's default.

    mergekit falls through to the next setting when no filter matches; so does our list, as long as a
    catch-all ends it. Returns None when nothing is set and there is no default."""
    out: list[dict] = []
    for setting, where in settings:
        ents = _entries(setting, where, conv, ctx)
        if ents is None:
            continue
        out += ents
        if any(e["filter"] is None for e in ents):
            break
    else:
        if default is not REQUIRED:
            out.append({"filter": None, "value": conv(default, "default")})
    if not out:
        return None
    if len(out) == 1 and out[0]["filter"] is None:
        return out[0]["value"]
    return out


# --- models -------------------------------------------------------------------------------------
def _model_ref(ref: Any, where: str) -> dict:
    """mergekit's model reference (``path``, ``org/name@rev``, ``model+lora``) -> our ModelEntry fields."""
    if not isinstance(ref, str) or not ref:
        raise OmnimergeError(f"{where}: give the model as a string (a folder or a hub id, optionally "
                             f"`model+lora_adapter`), got {ref!r}")
    if "+" in ref:
        model, _, lora = ref.partition("+")
        if not model or not lora or "+" in lora:
            raise OmnimergeError(f"{where}: '{ref}': a model with a LoRA is written `base_model+adapter`")
        return {"path": lora, "lora_base": model, "name": ref}
    return {"path": ref}


@dataclass
class _Input:
    ref: str
    params: dict
    where: str


def _inputs_from_models(models: Any) -> list[_Input]:
    if not isinstance(models, list) or not models:
        raise OmnimergeError("models: a non-empty list of {model: ..., parameters: {...}}")
    out = []
    for i, m in enumerate(models):
        where = f"models[{i}]"
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise OmnimergeError(f"{where}: expected {{model: <path or hub id>, parameters: {{...}}}}, got {m!r}")
        extra = set(m) - {"model", "parameters"}
        if extra:
            raise OmnimergeError(f"{where}: unknown field(s) {', '.join(sorted(extra))}; a mergekit model entry has "
                                 "`model` and `parameters`")
        out.append(_Input(m["model"], _params_dict(m.get("parameters"), f"{where}.parameters"), where))
    return out


def _params_dict(p: Any, where: str) -> dict:
    if p is None:
        return {}
    if not isinstance(p, dict):
        raise OmnimergeError(f"{where}: expected a mapping of parameter names to values, got {p!r}")
    return p


@dataclass
class _Source:
    ref: str
    start: int
    end: int
    params: dict
    where: str


@dataclass
class _Slice:
    sources: list[_Source]
    base: str | None
    params: dict
    where: str


def _parse_slices(slices: Any, scope: str, notes: list[str]) -> list[_Slice]:
    """mergekit's ``slices:`` checked field by field."""
    if not isinstance(slices, list) or not slices:
        raise OmnimergeError(f"{scope}: a non-empty list of {{sources: [{{model: ..., layer_range: [start, end]}}]}}")
    out = []
    for i, s in enumerate(slices):
        w = f"{scope}[{i}]"
        if not isinstance(s, dict) or not isinstance(s.get("sources"), list) or not s["sources"]:
            raise OmnimergeError(f"{w}: expected {{sources: [{{model: ..., layer_range: [start, end]}}, ...]}}")
        extra = set(s) - {"sources", "base_model", "parameters", "residual_weight"}
        if extra:
            raise OmnimergeError(f"{w}: unknown field(s) {', '.join(sorted(extra))}")
        if s.get("residual_weight") is not None:
            notes.append(f"{w}.residual_weight: mergekit 0.1.5 reads it and does nothing with it; ignored")
        sources = []
        for j, src in enumerate(s["sources"]):
            ws = f"{w}.sources[{j}]"
            if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
                raise OmnimergeError(f"{ws}: expected {{model: ..., layer_range: [start, end], parameters: {{...}}}}")
            extra = set(src) - {"model", "layer_range", "parameters"}
            if extra:
                raise OmnimergeError(f"{ws}: unknown field(s) {', '.join(sorted(extra))}")
            lr = src["layer_range"]
            if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                 for x in lr) and 0 <= lr[0] < lr[1]):
                raise OmnimergeError(f"{ws}.layer_range: {lr!r}: give [start, end] with 0 <= start < end (end "
                                     "excluded)")
            _model_ref(src["model"], ws + ".model")
            sources.append(_Source(src["model"], lr[0], lr[1], _params_dict(src.get("parameters"),
                                                                            f"{ws}.parameters"), ws))
        lengths = {x.end - x.start for x in sources}
        if len(lengths) > 1:
            raise OmnimergeError(f"{w}: every source of a slice must span the same number of layers (mergekit "
                                 f"refuses this too); got {', '.join(f'{x.ref} {[x.start, x.end]}' for x in sources)}")
        base = s.get("base_model")
        if base is not None:
            _model_ref(base, f"{w}.base_model")
        out.append(_Slice(sources, base, _params_dict(s.get("parameters"), f"{w}.parameters"), w))
    return out


def _whole_models(slices: list[_Slice], ctx: _Context) -> bool:
    """One slice whose sources each span every layer of their model: the same as `models:`."""
    if len(slices) != 1:
        return False
    for x in slices[0].sources:
        if x.start != 0 or x.end != _layer_count(x.ref.partition("+")[0], ctx.relative_to, f"{x.where}.layer_range"):
            return False
    return True


def _check_param_names(mk: MkMethod, name: str, scopes: list[tuple[str, dict]], notes: list[str],
                       per_input: bool = False) -> None:
    for scope, params in scopes:
        for k in params:
            p = mk.param(k)
            if p is not None and (p.per_input or not per_input):
                continue
            if p is None and k not in _KNOWN_PARAMS:
                which = "per-model parameters" if per_input else "parameters"
                known = ", ".join(q.name for q in mk.params if q.per_input or not per_input) or "none"
                raise OmnimergeError(f"{scope}.{k}: not a parameter of mergekit's `{name}` (its {which}: {known})")
            what = (f"mergekit's `{name}` has no parameter '{k}'" if p is None else
                    f"'{k}' is a global parameter of mergekit's `{name}`, not a per-model one")
            notes.append(f"{scope}.{k}: {what}; ignored (mergekit ignores it too)")


# --- modules (VLMs: the language model, the vision tower and the projector as mergekit's modules) ----
_MODULE_COMPONENTS = {"vision_tower": "vision", "multi_modal_projector": "projector"}
_TEXT_MODULES = ("text_decoder", "default", "decoder")


def _split_modules(modules: Any, notes: list[str]) -> tuple[dict, str, dict[str, dict]]:
    """mergekit's ``modules:`` -> (the language module's definition, its name, the other modules by
    component)."""
    if not isinstance(modules, dict) or not modules:
        raise OmnimergeError("modules: a mapping of module names (text_decoder, vision_tower, multi_modal_projector) "
                             "to {models: [...]} or {slices: [...]}")
    text = [k for k in modules if k in _TEXT_MODULES]
    unknown = sorted(set(modules) - set(_TEXT_MODULES) - set(_MODULE_COMPONENTS))
    if unknown or len(text) != 1:
        raise OmnimergeError(
            f"modules: {'unknown module(s) ' + ', '.join(unknown) if unknown else 'exactly one language module'}; "
            "omnimerge reads the modules of mergekit's vision-language definitions: one of "
            f"{', '.join(_TEXT_MODULES)} (the language model), {', '.join(_MODULE_COMPONENTS)}")
    others = {}
    for k, v in modules.items():
        if not isinstance(v, dict) or set(v) - {"models", "slices", "parameters"} or \
                (v.get("models") is None) == (v.get("slices") is None):
            raise OmnimergeError(f"modules.{k}: expected {{models: [...]}} or {{slices: [...]}} (one of them), and "
                                 "optionally `parameters`")
        if k in _MODULE_COMPONENTS:
            others[_MODULE_COMPONENTS[k]] = v
    return modules[text[0]], text[0], others


def _module_policy(comp: str, mod: dict, mk: MkMethod, name: str, text_models: list[str], base_ref: str | None,
                   ctx: _Context, notes: list[str]) -> Any:
    """The component policy that makes a vision tower or projector module what mergekit makes it."""
    where = f"modules.{ {'vision': 'vision_tower', 'projector': 'multi_modal_projector'}[comp] }"
    if mod.get("slices") is not None:
        raise OmnimergeError(f"{where}.slices: omnimerge restacks only the language model's layers; give the "
                             "module `models:`")
    inputs = _inputs_from_models(mod["models"])
    refs = [i.ref for i in inputs]
    params = _params_dict(mod.get("parameters"), f"{where}.parameters")
    if mk.ours == "passthrough":
        if len(refs) != 1:
            raise OmnimergeError(f"{where}.models: passthrough takes exactly one model, got {len(refs)}")
        return {"take": refs[0]}
    same = (set(refs) | {base_ref}) == (set(text_models) | {base_ref})  # mergekit adds the base to both
    if any(i.params for i in inputs) or not same:
        raise OmnimergeError(f"{where}.models: omnimerge merges the {comp} over the same models, with the same "
                             "per-model parameters, as the language model; list the language model's models here "
                             "(or one model with `merge_method: passthrough`)")
    if not params:
        return "merge"
    _check_param_names(mk, name, [(f"{where}.parameters", params)], notes)
    ours = {p.ours: _chain([(params[p.name], f"{where}.parameters.{p.name}")], p.default, p.convert, ctx)
            for p in mk.params if p.ours is not None and not p.per_input and p.name in params}
    return {"method": mk.ours, "parameters": ours}


# --- the translation ----------------------------------------------------------------------------
def _dtype(v: Any, where: str) -> str:
    name = v[len("torch."):] if isinstance(v, str) and v.startswith("torch.") else v
    if name not in DTYPE_NAMES:
        raise OmnimergeError(f"{where}: {v!r} is not a dtype omnimerge writes; use one of {', '.join(DTYPE_NAMES)}")
    return name


def from_mergekit(data: dict, source: str = "recipe") -> dict:
    """Translate a mergekit configuration into the fields of an omnimerge Recipe (see the module docstring).

    ``source`` names the file in errors; relative model paths (for the layer counts that gradients and
    slices need) are resolved beside it when it is a file."""
    try:
        return _translate(data, source)
    except OmnimergeError as e:
        raise OmnimergeError(f"{source} (mergekit format): {e}") from None


def _translate(data: dict, source: str) -> dict:
    src = Path(source)
    relative_to = src.parent if src.is_file() else None
    unknown = set(data) - set(_TOP_LEVEL)
    if unknown:
        ours = unknown & {"method", "base", "skeleton", "components", "seed", "shard_size", "skeletons"}
        hint = (" — omnimerge's own fields cannot be mixed into a mergekit configuration; write an omnimerge "
                "recipe instead (docs/recipes.md)") if ours else ""
        raise OmnimergeError(f"unknown field(s) {', '.join(sorted(unknown))}; mergekit's fields that "
                             f"omnimerge reads: {', '.join(_TOP_LEVEL)}{hint}")
    name = data["merge_method"]
    if not isinstance(name, str) or name not in METHODS:
        raise OmnimergeError(f"merge_method {name!r} is not supported; omnimerge reads mergekit's "
                             f"{', '.join(METHODS)}")
    mk = METHODS[name]
    notes: list[str] = []
    given = [k for k in ("models", "slices", "modules") if data.get(k) is not None]
    if len(given) != 1:
        raise OmnimergeError("give exactly one of `models:`, `slices:` and `modules:`"
                             + (f", not {' and '.join(given)}" if given else " (nothing to merge)"))
    base_ref = data.get("base_model")
    if base_ref is not None:
        _model_ref(base_ref, "base_model")
        if "+" in base_ref:
            raise OmnimergeError(f"base_model: '{base_ref}': a base with a LoRA applied is not supported; merge the "
                                 "adapter into its model first (or give the adapter folder as a model)")
    probe = _Context(source, relative_to, None)
    glob = _params_dict(data.get("parameters"), "parameters")
    shared = [("parameters", glob)]  # shared parameter levels, the first wins
    text, others, scope = data, {}, ""
    if data.get("modules") is not None:
        text, mod_name, others = _split_modules(data["modules"], notes)
        scope = f"modules.{mod_name}."
        shared.insert(0, (f"{scope}parameters", _params_dict(text.get("parameters"), f"{scope}parameters")))
    if text.get("slices") is not None:
        slices = _parse_slices(text["slices"], f"{scope}slices", notes)
        if not _whole_models(slices, probe):
            recipe = _translate_sliced(slices, mk, name, base_ref, shared, probe, notes)
            return _finish(recipe, data, mk, name, base_ref, others, [], probe, notes)
        (sl,) = slices
        inputs = [_Input(x.ref, x.params, x.where) for x in sl.sources]
        shared.insert(0, (f"{sl.where}.parameters", sl.params))
        base_ref = sl.base or base_ref
    else:
        inputs = _inputs_from_models(text["models"])
    for i in inputs:
        _model_ref(i.ref, i.where + ".model")
    refs = [i.ref for i in inputs]
    dup = sorted({r for r in refs if refs.count(r) > 1})
    if dup:
        raise OmnimergeError(f"models: {', '.join(dup)} listed more than once (mergekit refuses this too)")
    if base_ref is not None and base_ref not in refs:
        inputs.append(_Input(base_ref, {}, "base_model"))  # mergekit adds the base to the inputs
    with_base = mk.base == "required" or (mk.base == "optional" and base_ref is not None)
    if with_base:
        if base_ref is None:
            raise OmnimergeError(f"mergekit's `{name}` needs `base_model:`")
        non_base = [i for i in inputs if i.ref != base_ref]
        for i in inputs:
            if i.ref == base_ref and i.params:
                notes.append(f"{i.where}: the parameters of the base model are ignored by `{name}` (as in mergekit)")
    else:
        non_base = inputs
    n = len(non_base)
    if n < mk.min_non_base or (mk.max_non_base is not None and n > mk.max_non_base):
        want = f"exactly {mk.min_non_base}" if mk.min_non_base == mk.max_non_base else f"at least {mk.min_non_base}"
        raise OmnimergeError(f"`{name}` merges {want} model(s) besides base_model, got {n}")

    layer_spec = base_ref or inputs[0].ref
    ctx = _Context(source, relative_to, layer_spec.partition("+")[0] if "+" in layer_spec else layer_spec)

    # parameters
    _check_param_names(mk, name, shared, notes)
    ours_params: dict[str, Any] = dict(mk.fixed)
    for p in mk.params:
        if p.ours is None:
            continue
        settings = [(params[p.name], f"{scope}.{p.name}") for scope, params in shared if p.name in params]
        value = _chain(settings, p.default, p.convert, ctx)
        if value is not None:
            ours_params[p.ours] = value
        elif not p.per_input:
            raise OmnimergeError(f"parameters.{p.name}: mergekit's `{name}` needs it (it has no default); add it")

    models_out = []
    for inp in non_base:
        entry = _model_ref(inp.ref, inp.where + ".model")
        _check_param_names(mk, name, [(f"{inp.where}.parameters", inp.params)], notes, per_input=True)
        for k, v in inp.params.items():
            p = mk.param(k)
            if p is None or not p.per_input or p.ours is None:
                continue
            entry[p.ours] = _chain([(v, f"{inp.where}.parameters.{k}")], REQUIRED, p.convert, ctx)
        for p in mk.params:
            if p.per_input and p.default is REQUIRED and p.ours not in entry and p.ours not in ours_params:
                raise OmnimergeError(
                    f"{inp.where} ('{inp.ref}'): mergekit's `{name}` needs `{p.name}` for every model (mergekit "
                    f"stops without it); add `parameters: {{{p.name}: ...}}` to the model or to the global parameters"
                )
        models_out.append(entry)

    recipe: dict[str, Any] = {"method": mk.ours, "models": models_out, "parameters": ours_params,
                              "components": dict(COMPONENTS_ALL_MERGED)}
    if with_base:
        recipe["base"] = base_ref
    # the output's architecture: the base, else the first model (for `model+adapter`, the model)
    recipe["skeleton"] = base_ref if base_ref is not None else inputs[0].ref.partition("+")[0]
    return _finish(recipe, data, mk, name, base_ref, others, [i.ref for i in inputs], ctx, notes)


def _translate_sliced(slices: list[_Slice], mk: MkMethod, name: str, base_ref: str | None,
                      shared: list[tuple[str, dict]], ctx: _Context, notes: list[str]) -> dict:
    """Layer stacking: each mergekit slice becomes a recipe slice. A gradient spreads over each slice's own
    layers (t = i/(n−1) within the slice, as in mergekit): shared parameters are written for the output
    layers, per-model ones (matched, as in mergekit, against the model's own tensor names) for each source,
    with the slice's and the global values folded in so that mergekit's precedence holds."""
    out_slices, positions, refs = [], [], []
    for sl in slices:
        n = sl.sources[0].end - sl.sources[0].start
        first = len(positions)
        positions += [(first + k, k / (n - 1) if n > 1 else 1.0) for k in range(n)]
        refs += [x.ref for x in sl.sources if x.ref not in refs]
    recipe_params: dict[str, Any] = dict(mk.fixed)
    _check_param_names(mk, name, shared + [(f"{sl.where}.parameters", sl.params) for sl in slices], notes)
    for p in mk.params:
        if p.ours is None or p.per_input:
            continue
        settings = [(params[p.name], f"{scope}.{p.name}") for scope, params in shared if p.name in params]
        value = _chain(settings, p.default, p.convert, ctx.over(positions))
        if value is None:
            raise OmnimergeError(f"parameters.{p.name}: mergekit's `{name}` needs it (it has no default); add it")
        recipe_params[p.ours] = value
    at = 0
    for sl in slices:
        n = sl.sources[0].end - sl.sources[0].start
        own = [(at + k, k / (n - 1) if n > 1 else 1.0) for k in range(n)]
        at += n
        base = sl.base or base_ref
        if mk.base == "required":
            if base is None:
                raise OmnimergeError(f"{sl.where}: mergekit's `{name}` needs `base_model:` (global or in the slice)")
            if base not in [x.ref for x in sl.sources]:
                raise OmnimergeError(f"{sl.where}: the base '{base}' is not one of the slice's sources, so the slice "
                                     f"has no base layers for `{name}`; add it to the sources with a layer_range")
        out = {"sources": []}
        if sl.base is not None and mk.base == "required":
            out["base"] = sl.base
        sp = {}
        for p in mk.params:
            if p.ours is not None and not p.per_input and p.name in sl.params:
                sp[p.ours] = _entries(sl.params[p.name], f"{sl.where}.parameters.{p.name}", p.convert,
                                      ctx.over(own)) or []
                sp[p.ours] = [e for e in sp[p.ours]]
        if sp:
            out["parameters"] = {k: v for k, v in sp.items() if v}
        for x in sl.sources:
            entry: dict[str, Any] = {"model": x.ref, "layers": [x.start, x.end]}
            is_base = mk.base == "required" and x.ref == base
            _check_param_names(mk, name, [(f"{x.where}.parameters", x.params)], notes, per_input=True)
            if is_base:
                if x.params:
                    notes.append(f"{x.where}: the parameters of the base model are ignored by `{name}` (as in "
                                 "mergekit)")
                out["sources"].append(entry)
                continue
            mine = [(x.start + k, t) for k, (_, t) in enumerate(own)]
            for p in mk.params:
                if p.ours is None or not p.per_input:
                    continue
                settings = [(x.params[p.name], f"{x.where}.parameters.{p.name}")] if p.name in x.params else []
                if p.name in sl.params:
                    settings.append((sl.params[p.name], f"{sl.where}.parameters.{p.name}"))
                settings += [(params[p.name], f"{scope}.{p.name}") for scope, params in shared if p.name in params]
                value = _chain(settings, p.default, p.convert, ctx.over(mine))
                if value is None:
                    raise OmnimergeError(f"{x.where} ('{x.ref}'): mergekit's `{name}` needs `{p.name}` for every "
                                         "model (mergekit stops without it); add it to the source, the slice or the "
                                         "global parameters")
                entry[p.ours] = value
            out["sources"].append(entry)
        out_slices.append(out)
    models = [_model_ref(r, "slices") for r in refs]  # sources name them by path (or `model+adapter`: the name)
    recipe: dict[str, Any] = {"method": mk.ours, "models": models, "slices": out_slices, "parameters": recipe_params,
                              "components": dict(COMPONENTS_ALL_MERGED)}
    if mk.base == "required" and base_ref is not None:
        recipe["base"] = base_ref
    recipe["skeleton"] = base_ref if base_ref is not None else slices[0].sources[0].ref.partition("+")[0]
    return recipe


def _vocabulary(data: dict, base_ref: str | None) -> dict | None:
    """mergekit's ``tokenizer_source`` / ``tokenizer`` -> our ``tokenizer:`` (the vocabulary built as mergekit
    builds it, the embedding rows realigned to it)."""
    tok, cfg = data.get("tokenizer_source"), data.get("tokenizer")
    if tok is not None and cfg is not None:
        raise OmnimergeError("give `tokenizer_source` or `tokenizer`, not both (mergekit refuses this too)")
    if cfg is not None:
        if not isinstance(cfg, dict) or set(cfg) - {"source", "tokens", "pad_to_multiple_of"}:
            raise OmnimergeError(f"tokenizer: expected {{source, tokens, pad_to_multiple_of}}, got {cfg!r}")
        out = {"source": cfg.get("source", "union")}
        if cfg.get("tokens") is not None:
            out["tokens"] = cfg["tokens"]
        if cfg.get("pad_to_multiple_of") is not None:
            out["pad_to_multiple_of"] = cfg["pad_to_multiple_of"]
    elif tok is not None:
        out = {"source": tok}
    else:
        return None
    if not isinstance(out["source"], str) or "+" in out["source"]:
        where = "tokenizer.source" if cfg is not None else "tokenizer_source"
        raise OmnimergeError(f"{where}: {out['source']!r}: give `union`, `base`, a model folder or a hub id")
    if base_ref is not None:
        out["base"] = base_ref
    return out


def _finish(recipe: dict, data: dict, mk: MkMethod, name: str, base_ref: str | None, others: dict[str, dict],
            text_models: list[str], ctx: _Context, notes: list[str]) -> dict:
    """The fields every translation shares: the other modules' policies, dtypes, tokenizer, chat template."""
    if not text_models:
        text_models = [x["model"] for x in recipe["slices"][0]["sources"]]
    for comp in ("vision", "projector"):
        if comp in others:
            recipe["components"][comp] = _module_policy(comp, others[comp], mk, name, text_models, base_ref, ctx,
                                                        notes)
        elif data.get("modules") is not None:
            recipe["components"][comp] = "keep"
            notes.append(f"modules: no {'vision_tower' if comp == 'vision' else 'multi_modal_projector'} module; "
                         "omnimerge keeps the skeleton's (mergekit would leave it out of the output)")
    dtype = _dtype(data["dtype"], "dtype") if data.get("dtype") is not None else None
    out_dtype = _dtype(data["out_dtype"], "out_dtype") if data.get("out_dtype") is not None else None
    recipe["dtype"] = "float64" if dtype == "float64" else "float32"
    if out_dtype or dtype:
        recipe["out_dtype"] = out_dtype or dtype
    vocab = _vocabulary(data, base_ref)
    if vocab is not None:
        recipe["tokenizer"] = vocab
    ct = data.get("chat_template")
    if ct is not None:
        if ct != "auto":
            raise OmnimergeError("chat_template: omnimerge copies the chat template of the skeleton (base_model, or "
                                 "the first model) or of the tokenizer source; remove `chat_template`, or set it in "
                                 "the output's tokenizer_config.json afterwards")
        notes.append("chat_template: auto: omnimerge copies the chat template of the skeleton (or the tokenizer "
                     "source)")
    for note in notes:
        log.warning("note: %s", note)
    return recipe
