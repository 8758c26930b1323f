"""Run part of a model's language decoder: from the hidden state entering one decoder layer to the one
entering a later layer (or the final norm), without computing the layers before.

RegMean++ merges layer by layer, and the statistics of layer l come from the model merged up to l. Running
the whole model again for every layer would cost L(L + 1)/2 layer passes; instead the hidden state entering
layer l is kept from the previous step and substituted at layer l, the layers before it are skipped, and the
pass stops where the next hidden state is taken. The model's own forward still runs (embeddings, vision
tower, position ids, masks, Qwen3-VL's deepstack additions), so this works for any family whose decoder
calls its layers in order with the hidden state as the first argument.
"""

from __future__ import annotations

import torch


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the wanted hidden state is taken."""


def _passthrough(hidden_states, *args, **kwargs):
    return hidden_states


def entry_module(model, index: int) -> torch.nn.Module:
    """Decoder layer ``index``, or the final norm when ``index`` is the layer count."""
    decoder = model.get_decoder()
    layers = decoder.layers
    if index < len(layers):
        return layers[index]
    if index == len(layers) and getattr(decoder, "norm", None) is not None:
        return decoder.norm
    raise ValueError(f"no decoder module {index}: the decoder has {len(layers)} layers")


def layer_count(model) -> int:
    return len(model.get_decoder().layers)


def run_span(model, inputs: dict, *, start: int = 0, hidden: torch.Tensor | None = None,
             stop: int | None = None) -> torch.Tensor | None:
    """Run ``model`` on ``inputs``. With ``hidden``: the decoder layers before ``start`` are skipped and module
    ``start`` (:func:`entry_module`) receives ``hidden`` as its hidden state. With ``stop``: the pass ends at
    module ``stop`` and returns the hidden state entering it (else the pass runs to the end; returns None)."""
    decoder = model.get_decoder()
    handles = []
    skipped = []
    taken: list[torch.Tensor] = []
    try:
        if hidden is not None:
            for j in range(start):
                layer = decoder.layers[j]
                layer.forward = _passthrough  # an instance attribute: the class's forward is back after
                skipped.append(layer)

            def substitute(_module, args):
                return (hidden.to(args[0].device, args[0].dtype),) + tuple(args[1:])

            handles.append(entry_module(model, start).register_forward_pre_hook(substitute))
        if stop is not None:
            def take(_module, args):
                taken.append(args[0])
                raise _Stop

            handles.append(entry_module(model, stop).register_forward_pre_hook(take))
        try:
            model(**inputs, use_cache=False)
        except _Stop:
            return taken[0]
        return None
    finally:
        for h in handles:
            h.remove()
        for layer in skipped:
            del layer.forward
