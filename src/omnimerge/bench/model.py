"""The benchmark's models: a tiny Qwen2-VL, its tokenizer and processor, and how they are saved.

Everything is built locally, from code, deterministically (docs/bench.md):

- :class:`~omnimerge.bench.config.BenchConfig` (re-exported here) holds every size and training
  setting of the benchmark and names trained models in a cache.
- :func:`build_tokenizer` trains a byte-level BPE on the tasks' own text (questions, answers, captions)
  with the Qwen-VL special tokens.
- :func:`build_base_model` builds a randomly initialised ``Qwen2VLForConditionalGeneration``.
- :class:`BenchProcessor` turns (prompt, image) pairs into the model's inputs, expanding the image pad
  token to the image's grid and returning ``mm_token_type_ids``; it never needs torchvision.

**Saved folders load with plain transformers.** :func:`save_checkpoint` writes safetensors, config,
generation config, tokenizer (with a chat template) and processor files. ``Qwen2VLProcessor`` cannot be
constructed without torchvision (its ``video_processor`` attribute is checked against
``VideoProcessorMixin``, which transformers only exposes with torchvision), so the folder's
``processor_config.json`` names ``PaddleOCRVLProcessor`` instead: a processor class of transformers
itself with exactly Qwen2-VL's image logic (image pad token from ``tokenizer.image_token``, expanded to
``image_grid_thw.prod() // merge_size**2`` copies, ``mm_token_type_ids`` returned) and no video
processor. Its image processor is ``Qwen2VLImageProcessorPil``. So
``transformers.AutoProcessor.from_pretrained(folder)`` works on a machine without torchvision and gives
the same ``input_ids`` / ``pixel_values`` / ``image_grid_thw`` / ``mm_token_type_ids`` as
:class:`BenchProcessor` (tested). :func:`load_processor` is the supported path inside omnimerge.
"""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
from pathlib import Path

import torch

from . import tasks as T
from .config import BENCH_VERSION, BenchConfig

__all__ = [
    "BENCH_VERSION", "BenchConfig", "SPECIAL_TOKENS", "IMAGE_PLACEHOLDER", "PAD", "IM_START", "IM_END",
    "build_tokenizer", "build_processor", "build_base_model", "make_vlm_config", "BenchProcessor",
    "load_processor", "save_checkpoint", "save_adapter", "load_model", "format_prompt", "is_adapter_folder",
    "quiet_transformers",
]

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
# Token i of this tuple has id i in every bench tokenizer.
SPECIAL_TOKENS = (PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
TOKEN_ID = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def format_prompt(question: str, image: bool) -> str:
    """The fixed prompt (what the chat template gives for one user turn + generation prompt)."""
    return f"{IM_START}user\n{IMAGE_PLACEHOLDER if image else ''}{question}{IM_END}\n{IM_START}assistant\n"


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's split of the rotary half-dimension into (t, h, w): 16:24:24 of 64 in the 7B model."""
    half = head_dim // 2
    t = max(1, round(half * 0.25))
    h = (half - t) // 2
    return [t, h, half - t - h]


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

def _corpus() -> list[str]:
    """The tokenizer's training text: every question template filled in, the answers, the base's
    descriptions. OCR strings are left out on purpose, so they tokenize one character per token (the
    alphabet is capitals and digits; digits are always single tokens, and no other text merges
    capitals)."""
    lines: list[str] = []
    colours, shapes = list(T.COLOURS), list(T.SHAPES)
    fills = dict(shape=shapes, colour=colours, label=list("ABCDE"))
    for task, qtypes in T.TEMPLATES.items():
        for templates in qtypes.values():
            for tpl in templates:
                if "{expr}" in tpl:
                    continue
                variants = [tpl]
                for key, values in fills.items():
                    if "{" + key + "}" in tpl:
                        variants = [v.replace("{" + key + "}", x) for v in variants for x in values]
                lines += variants * 2
    for task in T.TASKS + (T.CAPTION_TASK,):
        if not T.task(task).in_corpus:
            continue
        for item in T.generate(task, "train", 300, seed=12345, image_size=64):
            lines.append(item.question)
            lines.append(item.answer)
    from .data import DESCRIBE, dense_caption

    lines += list(DESCRIBE) * 20
    lines += [format_prompt("", False), "user", "assistant"] * 50
    for task in T.VISION_TASKS:
        for item in T.generate(task, "train", 200, seed=54321, image_size=64):
            if T.task(task).in_corpus:
                lines.append(dense_caption(item))
    lines += ["yes", "no", "top left", "top right", "bottom left", "bottom right"] * 4
    return lines


# Qwen2's pre-tokenizer: transformers maps model_type "qwen2" to ``Qwen2Tokenizer``, which rebuilds
# its pre-tokenizer from this regex whatever tokenizer.json says; training the BPE with the same one
# makes the text LLM's folder (loaded as Qwen2Tokenizer) and the VLM's (loaded as TokenizersBackend)
# tokenize identically. Digits are single pre-tokens, as in Qwen.
QWEN2_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


@functools.lru_cache(maxsize=8)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE ({tok.get_vocab_size()})")
    return tok.to_str()


def build_tokenizer(vocab_size: int = 640):
    """A byte-level BPE tokenizer (fast, ``PreTrainedTokenizerFast``) trained on the tasks' text, with
    the Qwen-VL special tokens at ids 0-6 (pad ``<|endoftext|>``, eos ``<|im_end|>``) and
    ``image_token``/``video_token`` attributes. Deterministic: same vocab_size -> same tokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_tokenizer_json(vocab_size))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=IM_END, chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": IMAGE_PAD, "video_token": VIDEO_PAD,
                              "vision_bos_token": VISION_START, "vision_eos_token": VISION_END},
        model_max_length=4096,
    )


# --------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------

def _image_processor(patch_size: int, merge_size: int, image_size: int):
    from transformers import Qwen2VLImageProcessorPil

    side = patch_size * merge_size
    return Qwen2VLImageProcessorPil(
        patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
        size={"shortest_edge": side * side, "longest_edge": max(image_size, 4 * side) ** 2})


class BenchProcessor:
    """Text + images -> Qwen2-VL inputs, without torchvision.

    ``processor(prompts, images)``: ``prompts`` are strings that contain the image placeholder
    ``<|vision_start|><|image_pad|><|vision_end|>`` once per image (see :func:`format_prompt`);
    ``images`` is a list with one PIL image (or None, for a text-only prompt) per prompt, or None.
    Returns a dict of tensors: ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` (1 on image pad
    tokens), and when there are images ``pixel_values`` (patches x 3·2·p²) and ``image_grid_thw``.
    Padding is on the ``padding_side`` (default left, for generation).
    """

    def __init__(self, tokenizer, image_processor=None):
        self.tokenizer = tokenizer
        self.image_processor = image_processor   # None: a text LLM's processor (text only)
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_id = tokenizer.convert_tokens_to_ids(IM_END)
        self.merge_size = image_processor.merge_size if image_processor is not None else None

    # -- pieces, used by training to build labels
    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def images_to_tensors(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        if self.image_processor is None:
            raise ValueError("this processor has no image processor (a text LLM's); it takes no images")
        out = self.image_processor(list(images), return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def image_token_count(self, grid_thw) -> int:
        return int(torch.as_tensor(grid_thw).prod()) // self.merge_size ** 2

    def expand(self, ids: list[int], n_image_tokens: int) -> list[int]:
        """Replace each image pad token of ``ids`` by ``n_image_tokens`` copies."""
        out: list[int] = []
        for i in ids:
            out.extend([i] * n_image_tokens if i == self.image_token_id else [i])
        return out

    def pad(self, rows: list[list[int]], padding_side: str = "left", extra: dict | None = None) -> dict:
        """Pad id rows to one length; also pads the rows of ``extra`` (name -> (rows, pad value))."""
        width = max(len(r) for r in rows)
        def fill(r, v):
            p = [v] * (width - len(r))
            return p + list(r) if padding_side == "left" else list(r) + p
        out = {"input_ids": torch.tensor([fill(r, self.pad_token_id) for r in rows], dtype=torch.long),
               "attention_mask": torch.tensor([fill([1] * len(r), 0) for r in rows], dtype=torch.long)}
        out["mm_token_type_ids"] = (out["input_ids"] == self.image_token_id).long() * out["attention_mask"]
        for name, (xrows, value) in (extra or {}).items():
            out[name] = torch.tensor([fill(r, value) for r in xrows], dtype=torch.long)
        return out

    def __call__(self, prompts, images=None, *, padding_side: str = "left") -> dict:
        if isinstance(prompts, str):
            prompts = [prompts]
            images = None if images is None else [images]
        images = list(images) if images is not None else [None] * len(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
        real = [im for im in images if im is not None]
        pixel_values = grid = None
        if real:
            pixel_values, grid = self.images_to_tensors(real)
        rows, k = [], 0
        for prompt, image in zip(prompts, images):
            ids = self.encode_text(prompt)
            n_pad = ids.count(self.image_token_id)
            if n_pad != (image is not None):
                raise ValueError(f"prompt has {n_pad} image placeholders for {int(image is not None)} image: {prompt!r}")
            if image is not None:
                ids = self.expand(ids, self.image_token_count(grid[k]))
                k += 1
            rows.append(ids)
        out = self.pad(rows, padding_side)
        if real:
            out["pixel_values"], out["image_grid_thw"] = pixel_values, grid
        return out

    def batch_decode(self, ids, **kw):
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True, **kw)

    # -- saving / loading
    def text_only(self) -> "BenchProcessor":
        """The same tokenizer without the image processor (what a text LLM's folder holds)."""
        return BenchProcessor(self.tokenizer, None)

    def save_pretrained(self, folder) -> Path:
        """Write tokenizer files, ``preprocessor_config.json`` (``Qwen2VLImageProcessorPil``) and
        ``processor_config.json`` (``PaddleOCRVLProcessor``, see the module docstring), so the folder
        loads with :func:`load_processor` and with ``transformers.AutoProcessor``. Without an image
        processor, only the tokenizer files."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(folder)
        if self.image_processor is None:
            return folder
        self.image_processor.save_pretrained(folder)
        ip = json.loads((folder / "preprocessor_config.json").read_text())
        ip["image_processor_type"] = "Qwen2VLImageProcessorPil"
        ip["processor_class"] = "PaddleOCRVLProcessor"
        (folder / "preprocessor_config.json").write_text(json.dumps(ip, indent=2, sort_keys=True) + "\n")
        ip_inline = {k: v for k, v in ip.items() if k != "processor_class"}
        proc = {"processor_class": "PaddleOCRVLProcessor", "image_processor": ip_inline}
        (folder / "processor_config.json").write_text(json.dumps(proc, indent=2, sort_keys=True) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder) -> "BenchProcessor":
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

        folder = Path(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        if not (folder / "preprocessor_config.json").is_file():
            return cls(tok, None)
        cfg = json.loads((folder / "preprocessor_config.json").read_text())
        keep = ("patch_size", "merge_size", "temporal_patch_size", "size", "image_mean", "image_std",
                "do_resize", "do_rescale", "do_normalize", "rescale_factor", "resample", "do_convert_rgb")
        ip = Qwen2VLImageProcessorPil(**{k: cfg[k] for k in keep if k in cfg})
        return cls(tok, ip)


def build_processor(cfg: BenchConfig) -> BenchProcessor:
    return BenchProcessor(build_tokenizer(cfg.vocab_size),
                          _image_processor(cfg.patch_size, cfg.merge_size, cfg.image_size))


def load_processor(folder) -> BenchProcessor:
    """The supported way to load a bench model's processor (tokenizer + Qwen2-VL image processor)."""
    return BenchProcessor.from_pretrained(folder)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

def make_vlm_config(cfg: BenchConfig):
    """The ``Qwen2VLConfig`` of the bench model."""
    from transformers import Qwen2VLConfig

    if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
    if cfg.image_size % (cfg.patch_size * cfg.merge_size):
        raise ValueError("image_size must be a multiple of patch_size * merge_size")
    ids = dict(pad_token_id=TOKEN_ID[PAD], bos_token_id=TOKEN_ID[PAD], eos_token_id=TOKEN_ID[IM_END])
    text = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=1024, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=cfg.rope_theta, mrope_section=_mrope_section(cfg.head_dim)),
        tie_word_embeddings=False, initializer_range=cfg.init_std, **ids)
    vision = dict(initializer_range=cfg.init_std, depth=cfg.vision_depth, embed_dim=cfg.vision_embed_dim, hidden_size=cfg.hidden_size,
                  num_heads=cfg.vision_heads, mlp_ratio=cfg.vision_mlp_ratio, patch_size=cfg.patch_size,
                  spatial_merge_size=cfg.merge_size, temporal_patch_size=2, in_channels=3)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=TOKEN_ID[IMAGE_PAD],
                           video_token_id=TOKEN_ID[VIDEO_PAD], vision_start_token_id=TOKEN_ID[VISION_START],
                           vision_end_token_id=TOKEN_ID[VISION_END], tie_word_embeddings=False,
                           initializer_range=cfg.init_std, **ids)
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    return config


def build_base_model(cfg: BenchConfig, seed: int | None = None):
    """A randomly initialised ``Qwen2VLForConditionalGeneration`` (float32, train mode off)."""
    from transformers import Qwen2VLForConditionalGeneration

    config = make_vlm_config(cfg)
    torch.manual_seed(cfg.seed if seed is None else seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config = generation_config()
    return model.float().eval()


def generation_config():
    from transformers import GenerationConfig

    return GenerationConfig(pad_token_id=TOKEN_ID[PAD], bos_token_id=TOKEN_ID[PAD], eos_token_id=TOKEN_ID[IM_END],
                            do_sample=False)


# --------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def quiet_transformers(errors_only: bool = False):
    """No transformers progress bars ("Loading weights", "Writing model shards") inside, nor peft's
    deprecation warning about transformers; ``errors_only``: transformers logs errors only, too (the
    bench's folders name PaddleOCRVLProcessor — Qwen2-VL's logic without torchvision, see the module
    doc — and transformers 5 warns about that class's registration whenever AutoProcessor loads one)."""
    from transformers.utils import logging as hf_logging

    was, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    if errors_only:
        hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():   # peft 0.21 asks transformers 5 a deprecated question; not ours
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was:
            hf_logging.enable_progress_bar()


def save_checkpoint(model, folder, processor: BenchProcessor, *, extra: dict | None = None) -> Path:
    """Write a self-contained model folder: ``model.safetensors``, ``config.json``,
    ``generation_config.json``, tokenizer and processor files (and ``bench.json`` with ``extra``).
    A PEFT model is merged into a plain model first (its LoRA weights folded in)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        import copy
        model = copy.deepcopy(model).merge_and_unload()
    model.generation_config = generation_config()
    with quiet_transformers():
        model.save_pretrained(folder)
    if getattr(model.config, "model_type", None) != "qwen2_vl":
        processor = processor.text_only()   # a text LLM's folder: tokenizer only
    processor.save_pretrained(folder)
    if extra is not None:
        (folder / "bench.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")
    return folder


def save_adapter(peft_model, folder, base_folder, *, extra: dict | None = None) -> Path:
    """Write a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) whose
    ``base_model_name_or_path`` is ``base_folder`` (absolute), plus the base's tokenizer/processor
    files so the adapter folder is usable on its own with PEFT."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base_folder = str(Path(base_folder).absolute())
    for cfg in peft_model.peft_config.values():
        cfg.base_model_name_or_path = base_folder
    peft_model.save_pretrained(folder)
    load_processor(base_folder).save_pretrained(folder)
    if extra is not None:
        (folder / "bench.json").write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")
    return folder


def is_adapter_folder(folder) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()


def load_model(folder, *, merge_adapter: bool = True):
    """Load a saved bench model: a Qwen2-VL or Qwen2 checkpoint folder, or a LoRA adapter folder
    (its base loaded from ``base_model_name_or_path``; merged into plain weights unless
    ``merge_adapter=False``). Returns the model in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, Qwen2VLForConditionalGeneration

    folder = Path(folder)
    if is_adapter_folder(folder):
        from peft import PeftModel

        base_path = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = load_model(base_path)
        with quiet_transformers():
            model = PeftModel.from_pretrained(base, folder)
        return (model.merge_and_unload() if merge_adapter else model).eval()
    config = AutoConfig.from_pretrained(folder)
    cls = Qwen2VLForConditionalGeneration if config.model_type == "qwen2_vl" else AutoModelForCausalLM
    with quiet_transformers():
        model = cls.from_pretrained(folder, dtype=torch.float32)
    return model.eval()
