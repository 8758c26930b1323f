"""How a run goes: one frozen object from the CLI or the Python API down to the loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class RunOptions:
    force: bool = False  # replace an existing non-empty output folder
    dry_run: bool = False  # build and check the plan; write nothing
    device: str = "cpu"  # where tensors are computed: cpu, cuda, cuda:1, ...
    allow_pickle: bool = False  # read .bin/.pt checkpoints (torch.load with weights_only=True)
    progress: bool | None = None  # the progress bar: None = on a terminal, not in CI
    relative_to: str | Path | None = None  # relative paths in the recipe are relative to this folder
    as_lora: Any = None  # a rank rule: write the merged delta as a LoRA adapter over the base
    push_to_hub: str | None = None  # upload the output to this Hub repo afterwards
    private: bool = False  # ... as a private repo
    executor: str = "local"  # local (threads), or ray (the shards spread over a Ray cluster)
    ray_address: str | None = None  # the Ray cluster (default: $RAY_ADDRESS, else a local one)
    on_tensor: Callable[[Any], None] | None = None  # called with each output job once it is computed
