"""The checkpoint-folder output: safetensors shards, their index, the skeleton's config, tokenizer and
processor files, the resolved recipe (omnimerge.yaml), the model card and report.json."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ...checkpoints.card import model_card
from ...checkpoints.output import is_tokenizer_file, model_files, shard_filenames, write_json
from ...checkpoints.safetensors_io import StreamingSafetensorsWriter
from ...methods import get_method
from ...plan import Action, Job, Plan
from ...recipe import ComponentMethod, Take
from ...version import __version__
from ..blocks import Block, BlockedReport, blockable, blocks, compute_block, read_block
from ..compute import compute_many, group_steps, read_step
from ..stream import MergeResult


class ShardWriter:
    """Writes a plan's tensors in order into its shard files, opening each shard when its first tensor
    comes (and closing the one before). A tensor comes whole (``write``) or in row pieces (``write_rows``)."""

    def __init__(self, folder: Path, shards: list[list[Job]], names: list[str]):
        self.folder, self.shards, self.names = folder, shards, names
        self.writers: list[StreamingSafetensorsWriter] = []
        self._left = 0

    def _next_shard_if_due(self) -> None:
        if self._left == 0:
            if self.writers:
                self.writers[-1].close()
            shard = self.shards[len(self.writers)]
            self.writers.append(StreamingSafetensorsWriter(self.folder / self.names[len(self.writers)],
                                                           [(j.out_key, j.out_dtype, j.shape) for j in shard]))
            self._left = len(shard)

    def write(self, job: Job, tensor: torch.Tensor) -> None:
        self._next_shard_if_due()
        self.writers[-1].write(job.out_key, tensor)
        self._left -= 1

    def write_rows(self, job: Job, rows: torch.Tensor, start: int) -> None:
        """Rows ``start ..`` of the job's tensor (pieces come in order, the first at row 0)."""
        if start == 0:
            self._next_shard_if_due()
        if self.writers[-1].write_rows(job.out_key, rows):
            self._left -= 1

    def close(self) -> None:
        if self.writers:
            self.writers[-1].close()

    def abort(self) -> None:
        for w in self.writers:
            w.abort()


@dataclass
class CheckpointOutput:
    """A merged model's folder. ``only``: the indices of the shards this sink writes (all when None;
    the Ray executor runs one shard per worker)."""

    plan: Plan
    only: list[int] | None = None
    reductions: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None

    def __post_init__(self):
        self.shards = self.plan.shards()
        self.names = shard_filenames(len(self.shards))
        self.shard_of = {j.out_key: self.names[s] for s, shard in enumerate(self.shards) for j in shard}
        self.protect = self.plan.input_folders()
        self.total_bytes = self.space_bytes = self.plan.out_bytes
        self.total_tensors = len(self.plan.jobs)
        self._writer: ShardWriter | None = None
        self._blocked = BlockedReport()

    # --- the folder
    def work(self) -> list[tuple[Plan, Job]]:
        return [(self.plan, j) for j in self.plan.jobs]

    def open(self, tmp: Path) -> None:
        self.folder = tmp

    def part(self, index: int) -> "CheckpointOutput":
        """The sink that writes shard ``index`` alone (into this sink's folder)."""
        return CheckpointOutput(self.plan, [index], self.reductions, folder=self.folder)

    def finish(self, tmp: Path, seconds: float) -> None:
        write_side_files(self.plan, tmp, self.shards, self.names, self.report, seconds)

    def result(self, out: Path, seconds: float) -> MergeResult:
        return MergeResult(out, self.plan, seconds, self.report)

    # --- the loop
    def steps(self, device: str) -> list[list[Job] | Block]:
        """Groups of jobs computed together, and the row blocks of the large element-wise merges (run.blocks)."""
        which = range(len(self.shards)) if self.only is None else self.only
        shards = [self.shards[i] for i in which]
        self._writer = ShardWriter(self.folder, shards, [self.names[i] for i in which])
        out: list[list[Job] | Block] = []
        for shard in shards:
            for step in group_steps(self.plan, shard, device):
                if len(step) == 1 and blockable(self.plan, step[0]):
                    out.extend(blocks(self.plan, step[0]))
                else:
                    out.append(step)
        return out

    def read(self, step: list[Job] | Block):
        if isinstance(step, Block):
            return read_block(self.plan, step)
        return read_step(self.plan, step)

    def compute(self, step: list[Job] | Block, inputs, device: str):
        if isinstance(step, Block):
            return compute_block(self.plan, step, inputs, device, self.reductions.get(step.job.canonical))
        return compute_many(self.plan, step, inputs, device, self.reductions)

    def write(self, step: list[Job] | Block, results) -> None:
        if isinstance(step, Block):
            self._writer.write_rows(step.job, results[0], step.start)
            return
        for job, (t, _) in zip(step, results):
            self._writer.write(job, t)

    def record(self, step: list[Job] | Block, results, seconds: float) -> list[Job]:
        if isinstance(step, Block):
            done = self._blocked.add(step, results[1], seconds)
            if done is None:
                return []
            job = step.job
            self.report[job.out_key] = tensor_report(self.plan, job, done[0], done[1], self.shard_of[job.out_key])
            return [job]
        for job, (_, info) in zip(step, results):
            self.report[job.out_key] = tensor_report(self.plan, job, info, seconds / len(step),
                                                     self.shard_of[job.out_key])
        return step

    def close(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()


def tensor_report(plan: Plan, job: Job, info: dict, seconds: float, shard: str) -> dict[str, Any]:
    """One tensor's entry in report.json."""
    r: dict[str, Any] = {"canonical": job.canonical, "component": job.component, "action": job.action,
                         "shape": list(job.shape), "dtype": str(job.out_dtype).removeprefix("torch."), "shard": shard}
    if job.action is Action.MERGE:
        r["method"] = job.method.name
        r["params"] = job.params
        if job.rows is not None:
            r["rows_merged"] = job.rows
    else:
        r["source"] = job.source.name
        r["source_path"] = str(job.source.path)
        if job.source_key is not None:
            r["source_canonical"] = job.source_key
        r["policy"] = job.note
    r.update(info)
    r["seconds"] = round(seconds, 6)
    return r


def policy_text(pol) -> str:
    """A component's policy as the card and report name it: merge, keep, take MODEL or a method."""
    if isinstance(pol, Take):
        return f"take {pol.take}"
    if isinstance(pol, ComponentMethod):
        return pol.method
    return pol


def component_policies(plan: Plan) -> dict[str, str]:
    return {c: policy_text(plan.recipe.policy(c)) for c in sorted({j.component for j in plan.jobs})}


def write_side_files(plan: Plan, tmp: Path, shards: list[list[Job]], names: list[str], report: dict,
                     seconds: float, extra: dict[str, Any] | None = None) -> None:
    """Index, config (with the output dtype), the skeleton's tokenizer/processor files, omnimerge.yaml,
    the model card and report.json (``extra``: more top-level report entries)."""
    if len(shards) > 1:
        weight_map = {j.out_key: names[s] for s, shard in enumerate(shards) for j in shard}
        write_json(tmp / "model.safetensors.index.json",
                   {"metadata": {"total_size": plan.out_bytes}, "weight_map": weight_map})
    for name, src in model_files(plan.skeleton.path, plan.tokenizer_source).items():
        if plan.vocabulary is None or not is_tokenizer_file(name):
            shutil.copy2(src, tmp / name)
    if plan.vocabulary is not None:
        plan.vocabulary.save(tmp)
    if plan.recipe.out_dtype or plan.rewrites_config:
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        if plan.recipe.out_dtype:
            _set_dtype(cfg, plan.recipe.out_dtype)
        plan.edit_config(cfg)
        write_json(cfg_path, cfg)
    recipe_yaml = yaml.safe_dump(resolved_recipe(plan), sort_keys=False)
    (tmp / "omnimerge.yaml").write_text(recipe_yaml)
    components = component_policies(plan)
    method = plan.recipe.method
    card = model_card(method=method, reference=get_method(method).reference,
                      base=plan.recipe.base, models=[e.path for e in plan.recipe.models],
                      skeleton=str(plan.skeleton.name), recipe_yaml=recipe_yaml, components=components,
                      paths={spec: ck.path for spec, ck in plan.refs.items()})
    (tmp / "README.md").write_text(card)
    write_json(tmp / "report.json", {
        "omnimerge_version": __version__,
        "method": method,
        "skeleton": str(plan.skeleton.path),
        "base": str(plan.base.path) if plan.base else None,
        "models": [str(m.path) for m in plan.models],
        "components": components,
        "notes": plan.notes,
        "seconds": round(seconds, 3),
        "bytes_written": plan.out_bytes,
        "tensors": report,
        **(extra or {}),
    })


def _set_dtype(cfg: dict, dtype: str) -> None:
    for c in [cfg] + [v for v in cfg.values() if isinstance(v, dict) and "model_type" in v]:
        if "torch_dtype" in c:
            c["torch_dtype"] = dtype
        c["dtype"] = dtype


def resolved_recipe(plan: Plan) -> dict:
    """The recipe with every path made absolute: what omnimerge.yaml records."""
    data = plan.recipe.model_dump(mode="json", exclude_none=True)

    def absolute(spec: str) -> str:
        return str(plan.refs[spec].path) if spec in plan.refs else spec

    for entry in data["models"]:
        entry["path"] = absolute(entry["path"])
    for sl in data.get("slices") or []:  # names and paths alike become the absolute path (as `base` does)
        for src in sl["sources"]:
            src["model"] = absolute(src["model"])
        if sl.get("base"):
            sl["base"] = absolute(sl["base"])
    vocab = data.get("tokenizer") or {}
    if vocab.get("source") not in (None, "union", "base"):
        vocab["source"] = absolute(vocab["source"])
    if vocab.get("base"):
        vocab["base"] = absolute(vocab["base"])
    for row in (vocab.get("tokens") or {}).values():
        if isinstance(row.get("source"), str):
            row["source"] = absolute(row["source"])
        elif isinstance(row.get("source"), dict) and row["source"].get("model"):
            row["source"]["model"] = absolute(row["source"]["model"])
    for k in ("base", "skeleton", "tokenizer_source"):
        if data.get(k):
            data[k] = absolute(data[k])
    data["skeleton"] = str(plan.skeleton.path)
    return data
