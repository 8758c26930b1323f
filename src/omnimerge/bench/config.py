"""The benchmark's settings (:class:`BenchConfig`) and the cache keys of the models they produce.

Every trained model of the zoo has its own key: a digest of the fields that decide it, of its parent's
key (an expert's parent is its setting's base) and of the code (docstrings and comments left out) of the modules that decide what
training produces (tasks, data, model, train). Changing an expert's learning rate therefore retrains
the experts and nothing above them; editing a task generator retrains everything. The preset values
below are not part of the code digest: they enter every key as field values.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BENCH_VERSION", "BenchConfig", "STAGE_FIELDS", "EVAL_FIELDS", "code_digest"]

# Bumped whenever a change to the model layer changes what training produces (invalidates caches).
BENCH_VERSION = 2

# The fields a zoo model depends on besides its parent's key. The pretrained base depends on every
# field not named here (so a new field retrains everything until it is listed).
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "instruct": ("instruct_steps", "instruct_lr", "instruct_items"),
    "full": ("expert_steps", "expert_lr", "train_items"),
    "lora": ("lora_steps", "lora_lr", "lora_r", "lora_alpha", "train_items"),
    "multitask": ("multitask_steps", "expert_lr", "train_items"),
    "multitask_lora": ("lora_multitask_steps", "lora_lr", "lora_r", "lora_alpha", "train_items"),
    "text_llm": ("text_steps", "text_lr", "text_batch_size", "train_items"),
}
# Fields that change what is merged or evaluated, never what is trained.
EVAL_FIELDS = ("val_items", "test_items", "expert_test_items", "eval_batch_size", "calibration_items",
               "calibration_sizes", "data_aware_steps")


@dataclass(frozen=True)
class BenchConfig:
    """Every size and setting of the benchmark's models and their training.

    ``*_steps`` are optimizer steps of ``batch_size`` items (``text_batch_size`` for the text LLM);
    ``train_items`` is the number of distinct training items drawn per task for the experts,
    ``instruct_items`` per task for the instruction stage; ``test_items`` / ``val_items`` the number
    evaluated per task.

    The zoo (see :mod:`.experiment`): the **pretrained base** (``base_*``) is the LoRA setting's base;
    the **instruct** model (``instruct_*``: the base trained briefly on every task) is the full
    setting's base; **experts** are fine-tuned from their setting's base with small learning rates
    and short schedules (``expert_*`` full, ``lora_*`` LoRA); each setting's **multi-task** model is
    trained from the same base on the union of its experts' data with the same recipe.
    """

    # language backbone (Qwen2 architecture)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    rope_theta: float = 10000.0
    vocab_size: int = 640  # the corpus saturates at 603 BPE tokens; the rest are unused rows, as in Qwen
    # vision tower (Qwen2-VL ViT) and images
    vision_depth: int = 2
    vision_embed_dim: int = 64
    vision_heads: int = 4
    vision_mlp_ratio: int = 2
    image_size: int = 64
    patch_size: int = 8
    merge_size: int = 2
    init_std: float = 0.08  # initializer_range of the text and vision configs (HF's 0.02 learns slower here)
    # optimisation
    batch_size: int = 16
    text_batch_size: int = 32  # the text LLM's batches (a text-only step costs about a third of an image step)
    base_steps: int = 2000
    instruct_steps: int = 400
    expert_steps: int = 300
    lora_steps: int = 300
    multitask_steps: int = 1000
    lora_multitask_steps: int = 1000
    text_steps: int = 800     # the text LLM (arithmetic learns slowly: 0.50 after 1250 steps of 32 in a probe)
    base_lr: float = 3e-3
    instruct_lr: float = 1e-3
    expert_lr: float = 1.05e-4   # rms(τ) of the full fine-tunes at 1.2e-4 was 2.21e-3, over the 2e-3 of the regime
    lora_lr: float = 1.2e-4
    text_lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_frac: float = 0.05
    min_lr_frac: float = 0.1
    grad_clip: float = 1.0
    base_data: str = "dense"          # the base's pretraining descriptions: "dense" or "generic"
    base_items: int = 16000           # items in the base's pretraining set
    base_task_fraction: float = 0.25  # share of them that are the tasks' own items
    lora_r: int = 16
    lora_alpha: int = 32
    # data and seeds
    instruct_items: int = 400   # per vision task: the instruction stage's small pool
    train_items: int = 4000     # per task: the experts' (and the multi-task models') training sets
    val_items: int = 50
    test_items: int = 300
    # the zoo's models are scored on this many test items (at least ``test_items``), so that each expert's margin
    # over the base and its rivals is measured finely; merges are compared with the zoo on the first
    # ``test_items`` of them, which every merge is scored on
    expert_test_items: int = 1000
    seed: int = 0           # model initialisation and training order
    data_seed: int = 0      # task generation
    eval_batch_size: int = 250
    # data-aware merging: unlabeled validation questions per expert (the main rows), the other sample
    # counts reported for each data-aware method, and (0: the method's own default) a cap on the
    # optimisation steps of methods that learn coefficients (AdaMerging), for the smoke presets only
    calibration_items: int = 32
    calibration_sizes: tuple[int, ...] = (8, 64)
    data_aware_steps: int = 0

    def __post_init__(self):
        sizes = self.calibration_sizes
        if isinstance(sizes, str):        # --set calibration_sizes=8,64
            sizes = [v for v in sizes.replace(" ", "").split(",") if v]
        if isinstance(sizes, int):
            sizes = [sizes]
        try:
            sizes = tuple(int(v) for v in sizes)
        except (TypeError, ValueError):
            raise ValueError(f"calibration_sizes must be sample counts, e.g. 8,64; got {self.calibration_sizes!r}") from None
        if any(v < 1 for v in sizes) or self.calibration_items < 1 or self.data_aware_steps < 0:
            raise ValueError("calibration_items and calibration_sizes must be >= 1, data_aware_steps >= 0")
        object.__setattr__(self, "calibration_sizes", sizes)

    @classmethod
    def full(cls) -> "BenchConfig":
        """The preset of ``omnimerge bench``."""
        return cls()

    @classmethod
    def quick(cls) -> "BenchConfig":
        """The preset of ``omnimerge bench --quick`` (a few minutes): a smaller model, fewer steps and
        items. A smoke run of the whole pipeline, not a measurement: its experts are barely trained."""
        return cls(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                   vision_depth=1, vision_embed_dim=32, vision_heads=2,
                   base_steps=200, instruct_steps=40, expert_steps=40, lora_steps=40, multitask_steps=60,
                   lora_multitask_steps=60, text_steps=60, expert_lr=1e-3, lora_lr=3e-3,
                   base_items=2000, instruct_items=100, train_items=400, val_items=20, test_items=50, expert_test_items=0,
                   calibration_items=8, calibration_sizes=(), data_aware_steps=50)

    @classmethod
    def micro(cls) -> "BenchConfig":
        """The smallest model the pipeline runs (the test suite's bench): 32 px images, one layer,
        a handful of steps. Exercises every stage; measures nothing."""
        return cls(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                   vision_depth=1, vision_embed_dim=16, vision_heads=2, image_size=32, batch_size=8,
                   text_batch_size=8, base_steps=4, instruct_steps=2, expert_steps=2, lora_steps=2,
                   multitask_steps=2, lora_multitask_steps=2, text_steps=2, base_items=40, instruct_items=4,
                   train_items=8, val_items=4, test_items=6, expert_test_items=9, calibration_items=2, calibration_sizes=(3,),
                   data_aware_steps=2)

    def replace(self, **changes) -> "BenchConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BenchConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown BenchConfig fields: {', '.join(unknown)}")
        return cls(**data)

    def cache_key(self, *, code: bool = True) -> str:
        """A stable 16-hex-digit digest of every field, ``BENCH_VERSION`` and (``code=True``) the
        source of the modules that decide what training produces: names the run's zoo folder."""
        data = {"bench_version": BENCH_VERSION, "config": self.to_dict()}
        if code:
            data["code"] = code_digest()
        return _digest(data)

    def base_fields(self) -> dict:
        """The fields the pretrained base depends on (all but the later stages' and evaluation's)."""
        later = {f for fields in STAGE_FIELDS.values() for f in fields} | set(EVAL_FIELDS)
        return {k: v for k, v in self.to_dict().items() if k not in later}

    def model_key(self, stage: str, parent_key: str | None = None, task: str | None = None) -> str:
        """The cache key of one zoo model: ``stage`` ("base", or a key of :data:`STAGE_FIELDS`), its
        fields, its parent's key and its task, with ``BENCH_VERSION`` and the code digest."""
        if stage == "base":
            fields = self.base_fields()
        elif stage in STAGE_FIELDS:
            if parent_key is None:
                raise ValueError(f"a {stage} model needs its parent's key")
            fields = {k: getattr(self, k) for k in STAGE_FIELDS[stage]}
        else:
            raise ValueError(f"unknown stage {stage!r}; expected 'base' or one of {sorted(STAGE_FIELDS)}")
        return _digest({"bench_version": BENCH_VERSION, "code": code_digest(), "stage": stage, "task": task,
                        "parent": parent_key, "fields": fields})

    @property
    def zoo_test_items(self) -> int:
        """Test items per task the zoo's models are scored on."""
        return max(self.test_items, self.expert_test_items)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def image_tokens(self) -> int:
        """Visual tokens per image (after the 2x2 merge)."""
        return (self.image_size // (self.patch_size * self.merge_size)) ** 2


def _digest(data) -> str:
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# The modules that decide what training produces: every task, the training sets, the model, training.
TRAINING_SOURCES = ("tasks", "data.py", "model.py", "train.py")


def _code_of(path: Path) -> str:
    """The code of one module without its docstrings and comments (``ast.dump``), so that editing
    prose never retrains the zoo; a change to any statement does."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False)


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 of the code (docstrings and comments left out) of :data:`TRAINING_SOURCES`."""
    here = Path(__file__).parent
    files = []
    for name in TRAINING_SOURCES:
        path = here / name
        files += sorted(path.glob("*.py")) if path.is_dir() else [path]
    h = hashlib.sha256()
    for path in files:
        h.update(path.relative_to(here).as_posix().encode() + b"\0" + _code_of(path).encode() + b"\0")
    return h.hexdigest()
