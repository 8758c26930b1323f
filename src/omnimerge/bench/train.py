"""Supervised training of the bench models: (image, question) -> answer, loss on the answer only.

- :func:`train` fine-tunes a ``Qwen2VLForConditionalGeneration`` (or the text-only ``Qwen2ForCausalLM``)
  on a list of :class:`~omnimerge.bench.tasks.Item`; with ``lora=True`` it wraps the model in a PEFT
  LoRA on the language backbone's q/k/v/o/gate/up/down projections and returns the PEFT model.
- What is trained (``trainable``): ``"all"`` (used for the base's pretraining) or ``"language"`` (the
  decoder layers and final norm: the ``language`` component, docs/recipes.md). Experts, the multi-task
  model and the text LLM train ``"language"``, so that everything else (embeddings, lm_head, vision
  tower, merger) is the base's in every model and a merge of the language backbone is the whole story.
- Deterministic: the same model, items, config and seed give bit-identical weights on the same machine
  and thread count (seeded data order, no dropout, AdamW, seeded LoRA init).
- The text LLM shares the base with the VLM: :func:`extract_text_model` copies the VLM's language
  backbone, embeddings and lm_head into a ``Qwen2ForCausalLM`` (same weights, same outputs on text).

The prompt is :func:`~omnimerge.bench.model.format_prompt` (one chat turn, image placeholder first);
the target is the answer followed by ``<|im_end|>``.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import tasks as T
from .data import (
    base_items, dense_caption, describe_items, expert_items, instruct_items, multitask_items, text_items,
)
from .model import (
    IM_END, BenchConfig, BenchProcessor, build_processor, format_prompt, load_model, load_processor,
    save_adapter, save_checkpoint,
)

__all__ = [
    "train", "train_base", "train_instruct", "train_expert", "train_multitask", "train_text_llm", "expert_steps",
    "Encoded", "encode_items", "collate", "LORA_TARGET", "trainable_parameters",
    "extract_text_model", "base_items", "instruct_items", "describe_items", "dense_caption", "expert_items", "multitask_items", "text_items",
    "save_checkpoint", "save_adapter", "load_model", "load_processor",
]

# The language backbone's linear layers (not the vision tower's qkv/proj/fc1/fc2, not lm_head).
LORA_TARGET = r"(.*\.)?layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


@dataclass
class Encoded:
    """One item, tokenized: prompt ids (image pad expanded), answer ids (+ <|im_end|>), its image.
    Images are turned into pixel values batch by batch (``collate``), so a large training set costs
    its PIL images' memory (12 KB per 64 px image) rather than float patches (98 KB)."""

    prompt: list[int]
    answer: list[int]
    image: object | None                # PIL image


def encode_items(items: Sequence[T.Item], processor: BenchProcessor) -> list[Encoded]:
    """Tokenize items (once; training then samples from the result)."""
    tok = processor.tokenizer
    prompts = [format_prompt(it.question, it.image is not None) for it in items]
    prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"]
    answer_ids = tok([it.answer + IM_END for it in items], add_special_tokens=False)["input_ids"]
    n_tokens: dict[tuple[int, int], int] = {}   # image size -> visual tokens
    out = []
    for it, p, a in zip(items, prompt_ids, answer_ids):
        if it.image is not None:
            size = it.image.size
            if size not in n_tokens:
                _, grid = processor.images_to_tensors([it.image])
                n_tokens[size] = processor.image_token_count(grid[0])
            p = processor.expand(p, n_tokens[size])
        out.append(Encoded(p, a, it.image))
    return out


def collate(batch: Sequence[Encoded], processor: BenchProcessor, *, vision: bool = True) -> dict:
    """A right-padded training batch with ``labels`` (-100 outside the answers). ``vision=False`` (a
    text LLM) drops the multimodal keys and refuses items with images."""
    rows = [e.prompt + e.answer for e in batch]
    labels = [[-100] * len(e.prompt) + e.answer for e in batch]
    out = processor.pad(rows, padding_side="right", extra={"labels": (labels, -100)})
    images = [e.image for e in batch if e.image is not None]
    if not vision:
        if images:
            raise ValueError("a text-only model cannot train on items with images")
        out.pop("mm_token_type_ids")
    elif images:
        out["pixel_values"], out["image_grid_thw"] = processor.images_to_tensors(images)
    return out


def _is_vlm(model) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) == "qwen2_vl"


def trainable_parameters(model, trainable: str) -> list[str]:
    """Names of the parameters that ``trainable`` ("all" or "language") selects."""
    names = [n for n, _ in model.named_parameters()]
    if trainable == "all":
        return names
    if trainable == "language":
        return [n for n in names if (".layers." in n or n.endswith("norm.weight")) and "visual" not in n]
    raise ValueError(f"trainable must be 'all' or 'language', got {trainable!r}")


def _schedule(step: int, steps: int, cfg: BenchConfig) -> float:
    warm = max(1, round(cfg.warmup_frac * steps))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))


def train(model, items: Sequence[T.Item], cfg: BenchConfig, *, steps: int, lr: float | None = None,
          lora: bool = False, trainable: str = "language", seed: int | None = None,
          processor: BenchProcessor | None = None, batch_size: int | None = None,
          history: list | None = None, log: Callable[[str], None] | None = None, log_every: int = 50,
          callback: Callable[[int, object, float], None] | None = None):
    """Fine-tune ``model`` on ``items`` for ``steps`` AdamW steps; returns the trained model (in eval
    mode). ``lora=True``: returns a PEFT model with a LoRA (``cfg.lora_r``/``cfg.lora_alpha``) on the
    language backbone's linear layers, everything else frozen (``trainable`` is then ignored).
    ``lr`` defaults to ``cfg.lora_lr`` for LoRA and ``cfg.expert_lr`` otherwise. ``history``, if a
    list, receives the loss of every step; ``callback(step, model, loss)`` is called after every step
    (e.g. to evaluate on a validation set; training resumes in train mode). The model is modified in
    place (except for the PEFT wrapper).
    """
    if steps < 0:
        raise ValueError("steps must be >= 0")
    if not items:
        raise ValueError("no items to train on")
    seed = cfg.seed if seed is None else seed
    processor = processor or build_processor(cfg)
    batch_size = batch_size or cfg.batch_size
    vision = _is_vlm(model)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none",
                          target_modules=LORA_TARGET, init_lora_weights=True)
        with warnings.catch_warnings():   # peft 0.21 asks transformers 5 a deprecated question; not ours
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, lcfg)
        params = [p for p in model.parameters() if p.requires_grad]
        lr = cfg.lora_lr if lr is None else lr
    else:
        chosen = set(trainable_parameters(model, trainable))
        params = []
        for n, p in model.named_parameters():
            p.requires_grad_(n in chosen)
            if n in chosen:
                params.append(p)
        lr = cfg.expert_lr if lr is None else lr
    data = encode_items(items, processor)
    if not vision and any(e.image is not None for e in data):
        raise ValueError("a text-only model cannot train on items with images")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=cfg.weight_decay)
    rng = random.Random(seed)
    order: list[int] = []
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        if len(order) < batch_size:
            perm = list(range(len(data)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[:batch_size], order[batch_size:]
        batch = collate([data[i] for i in idx], processor, vision=vision)
        for g in opt.param_groups:
            g["lr"] = lr * _schedule(step, steps, cfg)
        loss = model(**batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        value = float(loss.detach())
        if history is not None:
            history.append(value)
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"step {step + 1}/{steps} loss {value:.4f} ({time.perf_counter() - t0:.1f} s)")
        if callback is not None:
            with torch.no_grad():
                callback(step + 1, model, value)
            model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    if vision:  # generate() leaves M-RoPE deltas on the model; never let them leak between uses
        inner = model.get_base_model() if lora else model
        inner.model.rope_deltas = None
    return model.eval()


# --------------------------------------------------------------------------------------------
# The recipe: the bench's models, each from its config fields
# --------------------------------------------------------------------------------------------

def expert_steps(cfg: BenchConfig, task: str, *, lora: bool = False) -> int:
    """Optimizer steps of an expert: ``cfg.text_steps`` for a text-only task (a text-only step costs
    about half an image step), else ``cfg.lora_steps`` / ``cfg.expert_steps``."""
    if task in T.TEXT_TASKS:
        return cfg.text_steps
    return cfg.lora_steps if lora else cfg.expert_steps


def train_base(cfg: BenchConfig, processor: BenchProcessor | None = None, **kw):
    """The base VLM: a fresh model, every parameter trained on :func:`base_items`."""
    from .model import build_base_model

    return train(build_base_model(cfg), base_items(cfg), cfg, steps=cfg.base_steps, lr=cfg.base_lr,
                 trainable="all", processor=processor, **kw)


def train_instruct(base, cfg: BenchConfig, processor: BenchProcessor | None = None, **kw):
    """The full setting's base: the pretrained base (a model, modified in place, or a folder), every
    parameter trained briefly on :func:`instruct_items` (all tasks, a small pool): decent at each task,
    not saturated."""
    model = load_model(base) if isinstance(base, (str, Path)) else base
    return train(model, instruct_items(cfg), cfg, steps=cfg.instruct_steps, lr=cfg.instruct_lr, trainable="all",
                 processor=processor, **kw)


def train_expert(base, task: str, cfg: BenchConfig, *, lora: bool = False,
                 processor: BenchProcessor | None = None, **kw):
    """One task's expert from ``base`` (a model, modified in place, or a folder): the language
    backbone fully fine-tuned, or a LoRA (a PEFT model) with ``lora=True``."""
    model = load_model(base) if isinstance(base, (str, Path)) else base
    text = task in T.TEXT_TASKS
    lr = cfg.lora_lr if lora else (cfg.text_lr if text else cfg.expert_lr)
    return train(model, expert_items(cfg, task), cfg, steps=expert_steps(cfg, task, lora=lora), lr=lr,
                 lora=lora, processor=processor, **kw)


def train_multitask(base, cfg: BenchConfig, processor: BenchProcessor | None = None, *, lora: bool = False, **kw):
    """A setting's multi-task model (the upper bound): trained from the setting's base on the union of
    the experts' training sets with the experts' recipe: the language backbone fully at ``expert_lr``
    for ``multitask_steps``, or (``lora=True``) a LoRA at ``lora_lr`` for ``lora_multitask_steps``."""
    model = load_model(base) if isinstance(base, (str, Path)) else base
    if lora:
        return train(model, multitask_items(cfg), cfg, steps=cfg.lora_multitask_steps, lr=cfg.lora_lr, lora=True,
                     processor=processor, **kw)
    return train(model, multitask_items(cfg), cfg, steps=cfg.multitask_steps, lr=cfg.expert_lr,
                 processor=processor, **kw)


def train_text_llm(base, cfg: BenchConfig, processor: BenchProcessor | None = None, **kw):
    """The text LLM: the base VLM's language backbone as a ``Qwen2ForCausalLM``, fine-tuned on the
    text task(s)."""
    model = load_model(base) if isinstance(base, (str, Path)) else base
    return train(extract_text_model(model), text_items(cfg), cfg, steps=cfg.text_steps, lr=cfg.text_lr,
                 processor=processor, batch_size=cfg.text_batch_size, **kw)


# --------------------------------------------------------------------------------------------
# The text LLM: the VLM's language backbone as a Qwen2ForCausalLM
# --------------------------------------------------------------------------------------------

def text_config_of(vlm_config):
    """The ``Qwen2Config`` with the dimensions of a Qwen2-VL's language backbone."""
    from transformers import Qwen2Config

    t = vlm_config.get_text_config()
    rope = dict(t.rope_parameters or {})
    rope.pop("mrope_section", None)
    rope.setdefault("rope_type", "default")
    config = Qwen2Config(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, hidden_act=t.hidden_act,
        max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
        rope_parameters=rope, tie_word_embeddings=False, attention_dropout=0.0,
        pad_token_id=t.pad_token_id, bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id)
    config.architectures = ["Qwen2ForCausalLM"]
    return config


def extract_text_model(vlm):
    """A ``Qwen2ForCausalLM`` with the VLM's language backbone, embeddings and lm_head (copies).
    On text-only input its logits equal the VLM's: with equal t/h/w positions M-RoPE is 1-D RoPE."""
    from transformers import Qwen2ForCausalLM

    from .model import generation_config

    if not _is_vlm(vlm):
        raise ValueError("extract_text_model expects a Qwen2VLForConditionalGeneration")
    model = Qwen2ForCausalLM(text_config_of(vlm.config))
    state = {}
    for name, tensor in vlm.state_dict().items():
        if name.startswith("model.language_model."):
            state["model." + name[len("model.language_model."):]] = tensor.detach().clone()
        elif name == "lm_head.weight":
            state[name] = tensor.detach().clone()
    model.load_state_dict(state, strict=True)
    model.generation_config = generation_config()
    return model.float().eval()
