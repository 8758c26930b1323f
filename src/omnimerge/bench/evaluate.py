"""Accuracy of a bench model on a task: batched greedy decoding, scored with :func:`tasks.score`.

A model is a loaded ``Qwen2VLForConditionalGeneration`` / ``Qwen2ForCausalLM`` (or a PEFT model), or a
folder (a full checkpoint or a LoRA adapter folder; see :func:`~omnimerge.bench.model.load_model`).
Text-only items (``arithmetic``) are asked without an image, through the VLM's text path or through a
text LLM.

Decoding is a hand-written greedy loop with a KV cache (:func:`greedy_decode`): one prefill over the
left-padded batch with Qwen2-VL's 3-D M-RoPE positions from ``get_rope_index``, then one token per
step at position ``last + 1`` of each row, stopping when every row has produced ``<|im_end|>``.
``model.generate`` gives the same tokens (tested), but keeps M-RoPE state on the model between calls
(``rope_deltas``), re-validates its generation config on each call and is slower at this size; the
loop is explicit about positions and has no hidden state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from . import tasks as T
from .model import BenchProcessor, format_prompt, load_model, load_processor

__all__ = ["evaluate", "evaluate_tasks", "predict", "greedy_decode", "max_answer_tokens"]


def _is_vlm(model) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "qwen2_vl"


def _unwrap(model):
    """The transformers model under a PEFT wrapper (forward still goes through the LoRA layers)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def max_answer_tokens(items: Sequence[T.Item], processor: BenchProcessor) -> int:
    """Tokens of the longest answer, plus one for ``<|im_end|>``."""
    ids = processor.tokenizer([it.answer for it in items], add_special_tokens=False)["input_ids"]
    return max(len(i) for i in ids) + 1


@torch.no_grad()
def greedy_decode(model, inputs: dict, *, max_new_tokens: int, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Greedy continuation of a left-padded batch; returns the new tokens (batch x <= max_new_tokens),
    ``pad_token_id`` after each row's ``eos_token_id``."""
    inner = _unwrap(model)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    batch = ids.shape[0]
    kwargs = {}
    if _is_vlm(inner):
        if "pixel_values" in inputs:
            pos, _ = inner.model.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                                image_grid_thw=inputs["image_grid_thw"], attention_mask=mask)
            kwargs = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"],
                      "mm_token_type_ids": inputs["mm_token_type_ids"]}
        else:
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[None].expand(3, -1, -1)
        next_pos = pos.amax(dim=(0, 2)) + 1                      # (batch,)
    else:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        next_pos = pos.amax(dim=1) + 1
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **kwargs)
    cache = out.cache
    done = torch.zeros(batch, dtype=torch.bool)
    tokens = []
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        tokens.append(nxt)
        done |= nxt == eos_token_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
        p = next_pos[:, None]
        p = p[None].expand(3, -1, -1) if _is_vlm(inner) else p
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=p, cache=cache, use_cache=True)
        cache = out.cache
        next_pos = next_pos + 1
    return torch.stack(tokens, dim=1)


def predict(model, items: Sequence[T.Item], processor: BenchProcessor, *, batch_size: int = 150,
            max_new_tokens: int | None = None, use_generate: bool = False) -> list[str]:
    """The model's greedy answers to ``items`` (strings, special tokens removed)."""
    if not items:
        return []
    vlm = _is_vlm(_unwrap(model))
    if not vlm and any(it.image is not None for it in items):
        raise ValueError("a text-only model cannot answer items with images")
    max_new = max_new_tokens or max_answer_tokens(items, processor)
    eos, pad = processor.eos_token_id, processor.pad_token_id
    preds: list[str] = []
    model.eval()
    for s in range(0, len(items), batch_size):
        chunk = items[s:s + batch_size]
        inputs = processor([format_prompt(it.question, it.image is not None) for it in chunk],
                           [it.image for it in chunk], padding_side="left")
        if not vlm:
            inputs.pop("mm_token_type_ids")
        if use_generate:
            with torch.no_grad():
                gen = model.generate(**inputs, max_new_tokens=max_new, do_sample=False,
                                     eos_token_id=eos, pad_token_id=pad)
            new = gen[:, inputs["input_ids"].shape[1]:]
            if vlm:
                _unwrap(model).model.rope_deltas = None
        else:
            new = greedy_decode(model, inputs, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=pad)
        for row in new.tolist():
            if eos in row:
                row = row[:row.index(eos)]
            preds.append(processor.tokenizer.decode(row, skip_special_tokens=True))
    return preds


def _resolve(model_or_folder, processor):
    if isinstance(model_or_folder, (str, Path)):
        folder = Path(model_or_folder)
        model = load_model(folder)
        processor = processor or load_processor(folder)
        return model, processor
    if processor is None:
        raise ValueError("evaluate() needs the processor when given a model object")
    return model_or_folder, processor


def evaluate(model_or_folder, task: str, items: Sequence[T.Item], processor: BenchProcessor | None = None, *,
             batch_size: int = 150, return_predictions: bool = False):
    """Accuracy in [0, 1] of the model on ``items`` of ``task`` (greedy answers scored by
    :func:`tasks.score`). With ``return_predictions`` returns ``(accuracy, predictions)``."""
    if not items:
        raise ValueError("no items to evaluate")
    model, processor = _resolve(model_or_folder, processor)
    with torch.inference_mode():
        preds = predict(model, items, processor, batch_size=batch_size)
    acc = sum(T.score(task, p, it) for p, it in zip(preds, items)) / len(items)
    return (acc, preds) if return_predictions else acc


def evaluate_tasks(model_or_folder, test_sets: dict[str, Sequence[T.Item]], processor: BenchProcessor | None = None,
                   *, batch_size: int = 150) -> dict[str, float]:
    """Accuracy on each task of ``test_sets`` (task -> items); a text LLM is scored on text tasks only."""
    model, processor = _resolve(model_or_folder, processor)
    vlm = _is_vlm(_unwrap(model))
    return {task: evaluate(model, task, items, processor, batch_size=batch_size)
            for task, items in test_sets.items() if vlm or all(it.image is None for it in items)}
