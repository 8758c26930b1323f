"""Layer stacking (``slices:``): which input layers make each output layer, checked before anything is
written, and the output config that goes with them.

A recipe's slices are read in order; slice k contributes ``end − start`` output layers, layer i of the
slice coming from layer ``start + i`` of each of its sources (merged with the recipe's method when there
are several, copied — times ``scale`` — with ``passthrough``). Layer i of a slice of n layers sits at
t = i / (n − 1) of the slice (t = 1 for a one-layer slice): mergekit's position for gradients.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .checkpoints.checkpoint import Checkpoint, text_config
from .errors import OmnimergeError
from .methods import Method
from .recipe import Recipe, Slice

_LAYER_KEY = re.compile(r"^language\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class LayerSource:
    """One input of an output layer: layer ``layer`` of ``checkpoint`` (``spec``: the recipe's name for it)."""

    checkpoint: Checkpoint
    layer: int
    spec: str
    params: dict  # the slice source's own parameters
    index: int  # its position in the slice's `sources`

    def key(self, suffix: str) -> str:
        return f"language.layers.{self.layer}.{suffix}"


@dataclass(frozen=True)
class OutputLayer:
    """Output decoder layer ``index``: from slice ``slice`` at position ``t``; ``sources`` in the method's
    order (the slice's base first when the method needs one)."""

    index: int
    slice: int
    t: float
    sources: tuple[LayerSource, ...]
    with_base: bool


def layer_suffixes(ck: Checkpoint, layer: int) -> dict[str, str]:
    """``{suffix: canonical key}`` of one decoder layer (suffix: ``self_attn.q_proj.weight``)."""
    out = {}
    for canon in ck.canon_to_raw:
        m = _LAYER_KEY.match(canon)
        if m and int(m.group(1)) == layer:
            out[m.group(2)] = canon
    return out


def slice_inputs(recipe: Recipe, sl: Slice, i: int, method: Method,
                 ref: Callable[[str], Checkpoint]) -> tuple[list[tuple[int, Checkpoint]], bool]:
    """A slice's sources as (source index, checkpoint) in the method's order, the base first when the method
    needs one, and whether it does. Checks the base and the model count."""
    where = f"slices[{i}]"
    order = list(range(len(sl.sources)))
    with_base = method.needs_base
    if with_base:
        base = sl.base or recipe.base
        if base is None:
            raise OmnimergeError(f"{where}: method '{method.name}' needs a base (task vectors are θ_i − θ_base); set "
                                 "`base:` in the recipe or in the slice")
        at = [j for j, s in enumerate(sl.sources) if s.model == base]
        if not at:
            raise OmnimergeError(
                f"{where}: the base '{base}' is not one of the slice's sources, so the slice has no base layers for "
                f"'{method.name}'; add `{{model: {base}, layers: [...]}}` to its sources (or set the slice's `base:`)")
        order = at[:1] + [j for j in order if j != at[0]]
    n = len(order) - (1 if with_base else 0)
    lo, hi = method.min_models, method.max_models
    if n < lo or (hi is not None and n > hi):
        want = f"exactly {lo}" if lo == hi else (f"{lo} to {hi}" if hi is not None else f"at least {lo}")
        besides = " besides the base" if with_base else ""
        fix = (" — passthrough stacks layers: give each slice one source" if method.name == "passthrough" else "")
        raise OmnimergeError(f"{where}: '{method.name}' merges {want} model(s){besides}, the slice has {n}{fix}")
    return [(j, ref(sl.sources[j].model)) for j in order], with_base


def plan_layers(recipe: Recipe, method: Method, ref: Callable[[str], Checkpoint],
                skeleton: Checkpoint) -> list[OutputLayer]:
    """Every output decoder layer of a sliced recipe, in order, with every check that needs no arithmetic:
    layer ranges inside each model, and each stacked layer of the skeleton's structure (tensors and shapes)."""
    template = _template(skeleton)
    out: list[OutputLayer] = []
    for i, sl in enumerate(recipe.slices):
        inputs, with_base = slice_inputs(recipe, sl, i, method, ref)
        for j, ck in inputs:
            _check_range(sl, i, j, ck)
        n = sl.sources[0].layers[1] - sl.sources[0].layers[0]
        for pos in range(n):
            srcs = tuple(LayerSource(ck, sl.sources[j].layers[0] + pos, sl.sources[j].model, sl.sources[j].parameters,
                                     j) for j, ck in inputs)
            for j, src in zip((j for j, _ in inputs), srcs):
                _check_structure(src, template, skeleton, f"slices[{i}].sources[{j}]")
            out.append(OutputLayer(len(out), i, pos / (n - 1) if n > 1 else 1.0, srcs, with_base))
    return out


def _template(skeleton: Checkpoint) -> dict[str, tuple[int, ...]]:
    layer0 = layer_suffixes(skeleton, 0)
    if not layer0:
        raise OmnimergeError(f"skeleton '{skeleton.name}' ({skeleton.path}) has no decoder layers to stack "
                             "(`slices:` restacks the language model's layers)")
    return {suffix: tuple(skeleton.info(canon)[1]) for suffix, canon in layer0.items()}


def _check_range(sl: Slice, i: int, j: int, ck: Checkpoint) -> None:
    start, end = sl.sources[j].layers
    n = ck.layer_count()
    if end > n:
        raise OmnimergeError(
            f"slices[{i}].sources[{j}]: layers [{start}, {end}] of '{sl.sources[j].model}' ({ck.path}) reach past its "
            f"{n} decoder layers (0..{n - 1}); the range is [start, end] with end excluded, at most [0, {n}]")


def _check_structure(src: LayerSource, template: dict[str, tuple[int, ...]], skeleton: Checkpoint,
                     where: str) -> None:
    ck = src.checkpoint
    have = layer_suffixes(ck, src.layer)
    fix = ("layers stacked into one model must have the skeleton's structure: stack layers of models of one "
           "architecture and width")
    missing = sorted(set(template) - set(have))
    extra = sorted(set(have) - set(template))
    if missing or extra:
        what = (f"lacks {', '.join(missing[:3])}" if missing else f"has {', '.join(extra[:3])}, which")
        raise OmnimergeError(
            f"{where}: layer {src.layer} of '{src.spec}' ({ck.path}) {what} the skeleton '{skeleton.name}' layers "
            f"{'have' if missing else 'do not have'}; {fix}")
    for suffix, canon in have.items():
        shape = tuple(ck.info(canon)[1])
        if shape != template[suffix]:
            raise OmnimergeError(
                f"{where}: {ck.describe(canon)} is {shape}, the skeleton '{skeleton.name}' layers' "
                f"'{suffix}' is {template[suffix]} ({skeleton.path}); the hidden sizes differ — {fix}")


def output_key(skeleton: Checkpoint, canon: str) -> str:
    """The skeleton's raw name for an output layer tensor, also past the skeleton's own layer count
    (``language.layers.40.mlp.up_proj.weight`` -> ``model.layers.40.mlp.up_proj.weight``)."""
    m = _LAYER_KEY.match(canon)
    suffix = m.group(2)
    raw0 = skeleton.raw_key(f"language.layers.0.{suffix}")
    prefix = raw0[: len(raw0) - len(suffix)]
    if not prefix.endswith("layers.0."):
        raise OmnimergeError(f"{skeleton.path}: cannot name layer tensors after '{raw0}'")
    return prefix[: -len("0.")] + m.group(1) + "." + suffix


# --- the output config --------------------------------------------------------------------------
INDEX_LISTS = ("mlp_only_layers",)  # lists of layer indices (not one entry per layer): remapped


def restack_config(cfg: dict, layers: list[OutputLayer], skeleton: Checkpoint) -> None:
    """Rewrite ``cfg`` (the skeleton's config.json, in place) for the stacked layers: ``num_hidden_layers``,
    and every per-layer list (``layer_types`` and any list with one entry per layer), each output layer
    taking its source layer's entry from its source model's config; layer-index lists (``mlp_only_layers``)
    are remapped."""
    text = text_config(cfg)
    old = skeleton.layer_count()
    for c in {id(cfg): cfg, id(text): text}.values():
        if "num_hidden_layers" in c:
            c["num_hidden_layers"] = len(layers)
    for key, value in list(text.items()):
        if not isinstance(value, list):
            continue
        if key in INDEX_LISTS:
            text[key] = [o.index for o in layers if _source_entry(o.sources[0], key, index_list=True)]
        elif len(value) == old and "layer" in key:
            text[key] = [_source_entry(o.sources[0], key, fallback=value) for o in layers]


def _source_entry(src: LayerSource, key: str, fallback: list | None = None, index_list: bool = False):
    ck = src.checkpoint
    own = text_config(ck.config).get(key)
    if index_list:
        return isinstance(own, list) and src.layer in own
    if isinstance(own, list) and len(own) == ck.layer_count():
        return own[src.layer]
    return fallback[min(src.layer, len(fallback) - 1)]
