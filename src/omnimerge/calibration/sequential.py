"""RegMean++'s statistics: each layer's input Grams taken from the model merged so far.

RegMean collects every model's Grams on the model itself. RegMean++ (Nguyen et al., 2025) merges layer by
layer and takes the inputs of layer l from the *merged* model: the hidden state entering layer l is the
merged layers 0..l−1 applied to model i's samples; model i's own layer l then runs on it, and the inputs
its linear layers see (q/k/v, o, gate/up, down) give model i's Grams for layer l. Layer l is merged with
them (the plan's method, the same closed form as RegMean), put into the merged model, and the hidden state
entering layer l + 1 is computed through it. After the last layer, the final norm and the lm_head are one
more step, on the hidden state leaving the merged decoder.

Memory: one model (the skeleton, holding the merged layers as they are made), each model's hidden states
entering the current layer (tokens × hidden size × 4 bytes per model), one layer's Grams per model, and one
tensor of every model at a time while a layer is merged. Time: per layer and model two passes that run
one decoder layer (plus the embeddings and the vision tower, which the model's forward runs each time).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import OmnimergeError
from .collect import (StatisticsCache, canonical_parameters, collect_grams, decoder_linears, load_model,
                      merge_parts)
from .planned import planned_value
from .span import layer_count, run_span

HIDDEN = "omnimerge_hidden"  # the batch entry carrying the hidden state that enters the span


def _span_forward(start: int, stop: int | None) -> Callable[[object, dict], None]:
    def forward(model, inputs: dict) -> None:
        inputs = dict(inputs)
        hidden = inputs.pop(HIDDEN)
        run_span(model, inputs, start=start, hidden=hidden, stop=stop)
    return forward


def _unit_keys(params: dict, unit: int, layers: int) -> list[str]:
    """The canonical keys of decoder layer ``unit``, or (unit == layers) of the tail: the language tensors
    outside the layers (the final norm) and the lm_head."""
    if unit < layers:
        prefix = f"language.layers.{unit}."
        return [k for k in params if k.startswith(prefix)]
    return [k for k in params if not k.startswith("language.layers.") and k != "embed.weight"]


def _assign(params: dict, key: str, value: torch.Tensor) -> None:
    p = params[key]
    if tuple(value.shape) != tuple(p.shape):
        raise OmnimergeError(f"{key}: a tensor of shape {tuple(value.shape)} for the model's {tuple(p.shape)}; the "
                             "models must share the skeleton's architecture")
    with torch.no_grad():
        p.copy_(value.to(p.device, p.dtype))


def merged_grams(plan, method_keys: set[str], batches: Sequence[Sequence[dict]], writers: Sequence, *,
                 device: str = "cpu",
                 progress: Callable[[int], None] | None = None, log: Callable[[str], None] | None = None,
                 memory_budget: int = 2 << 30) -> None:
    """Collect RegMean++'s Grams for every model of ``plan`` (``batches``: each model's rendered samples) and
    hand them, layer by layer, to ``writers`` (one :class:`.collect.PartWriter` per model). ``method_keys``:
    the tensors whose merge takes these Grams; the other tensors of the merged model take their planned
    value without statistics."""
    by_key = {j.canonical: j for j in plan.jobs}
    model = load_model(plan.skeleton.path, device)
    try:
        params = canonical_parameters(model)
        linears = decoder_linears(model)
        layers = layer_count(model)
        if "embed.weight" in params and "embed.weight" in by_key:  # the merged model's embeddings
            _assign(params, "embed.weight", planned_value(plan, by_key["embed.weight"]))
        with torch.no_grad():
            hidden = [[run_span(model, _to(b, device), stop=0).cpu() for b in bs] for bs in batches]
        done = 0
        for unit in range(layers + 1):
            unit_keys = [k for k in _unit_keys(params, unit, layers) if k in by_key]
            unit_linears = {k: m for k, m in linears.items() if k in unit_keys}
            stop = unit + 1 if unit < layers else None
            stats = []
            for i, m in enumerate(plan.models):
                for k in unit_keys:  # model i's own layer, on the merged model's hidden states
                    _assign(params, k, (m if m.has(k) else plan.skeleton).read(k).float())
                rows = [{**b, HIDDEN: h} for b, h in zip(batches[i], hidden[i])]
                parts = list(collect_grams(model, rows, linears=unit_linears, forward=_span_forward(unit, stop),
                                           memory_budget=memory_budget)) if unit_linears else []
                for part, aliases in parts:
                    writers[i].add(part, aliases)
                stats.append(merge_parts(parts))
            for k in unit_keys:  # the merged layer
                job = by_key[k]
                use = tuple(s.get(k, {}) for s in stats) if k in method_keys else None
                _assign(params, k, planned_value(plan, job, use))
            if stop is not None:
                with torch.no_grad():
                    hidden = [[run_span(model, _to(b, device), start=unit, hidden=h, stop=stop).cpu()
                               for b, h in zip(bs, hs)] for bs, hs in zip(batches, hidden)]
            done += 1
            if progress:
                progress(done)
            if log and (unit % 8 == 0 or unit == layers):
                log(f"regmean_plusplus: {'layer ' + str(unit) if unit < layers else 'final norm and lm_head'} merged")
    finally:
        del model


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def merged_gram_files(plan, jobs, cache: StatisticsCache, device: str, renderer_batches, joint_key: str, log: Callable[[str], None] | None = None,
                      bar: Callable[[str, int], contextlib.AbstractContextManager] | None = None) -> list[Path]:
    """The statistics folders (one per model) of RegMean++ for ``plan``, cached under ``joint_key``."""
    paths = [cache.path(f"{joint_key}-{i}") for i in range(len(plan.models))]
    if all(p.is_dir() for p in paths):
        if log:
            log(f"regmean_plusplus: statistics reused from {paths[0].parent}")
        return paths
    batches = renderer_batches()
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(cache.writer(f"{joint_key}-{i}")) for i in range(len(plan.models))]
        advance = stack.enter_context(bar("regmean_plusplus layers", plan.skeleton.layer_count() + 1)) if bar \
            else (lambda _d: None)
        merged_grams(plan, {j.canonical for j in jobs}, batches, writers, device=device, progress=advance, log=log)
    return paths
