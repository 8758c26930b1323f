"""A merge, or any fine-tune, written as a PEFT LoRA adapter over its base.

``merge --as-lora RULE`` and ``extract MODEL --base BASE`` both write a plan through :class:`LoraOutput`:
tensor by tensor, Δ = result − base (in the compute dtype, before any cast), and

* the weight of a Linear or Embedding layer → LoRA factors of rank k, k chosen by the rank rule
  (``methods/ranks.py``: an integer, a ratio of min(m, n) — ``1.0`` is full rank —, ``knee``,
  ``energy:<p>``, ...). Δ = U S Vᵀ; B = U_k S_k^½, A = S_k^½ V_kᵀ, so B A is the best rank-k
  approximation of Δ (exactly Δ at full rank) and both factors carry the same scale. Every module
  gets lora_alpha = its rank: PEFT's scale alpha / r is 1;
* a tied lm_head (no tensor of its own) gets the embedding's factors too, since PEFT adapts the
  input embedding and the output layer as two modules;
* the bias of a Linear layer → saved whole as the LoRA layer's new bias (``bias: lora_only``);
* any other changed parameter (norms, convolutions, fused MoE expert stacks) of a module without
  parameterised submodules → that module saved whole (``modules_to_save``), exact;
* anything else (a parameter held directly by a container module, e.g. LLaVA-OneVision's
  ``image_newline``, or a tensor that transformers does not build) cannot be carried: it is left
  out, named in a note, and report.json says which fraction of ‖Δ‖ was lost.

Module names are those of the base model as transformers builds it (on the meta device: no memory,
no weights), matched to the checkpoint's tensors through the family table's canonical keys — the
same mapping that reads LoRA adapters back (``checkpoints/peft_reader.py``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ...checkpoints.card import adapter_card, hub_id
from ...checkpoints.checkpoint import Checkpoint
from ...checkpoints.output import write_json
from ...checkpoints.peft_writer import AdapterWriter
from ...errors import OmnimergeError
from ...families.align import canonical_keys
from ...families.models import model_class
from ...methods import get_method
from ...methods.linalg import GRAM_MIN, truncate
from ...methods.ranks import RankRule, check_rank_rule, choose_rank, needs_spectrum
from ...plan import DTYPES, Action, Job, Plan, tensor_seed
from ...version import __version__
from ..compute import compute, read_inputs
from ..stream import MergeResult
from .checkpoint import component_policies, resolved_recipe


# --- the rank rule --------------------------------------------------------------------------------
def parse_rank(rank) -> RankRule:
    """A rank rule from the CLI or the API: ``16``, ``"16"``, ``0.25``, ``"1.0"``, ``"knee"``, ``"energy:0.9"``."""
    value = rank
    if isinstance(rank, str):
        text = rank.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                value = text
    try:
        return check_rank_rule(value)
    except ValueError as e:
        raise OmnimergeError(f"LoRA rank {rank!r}: {e}") from None


def lora_factors(delta: torch.Tensor, rule: RankRule, generator: torch.Generator | None = None):
    """(B, A, k): B (m × k) and A (k × n) with B A the best rank-k approximation of ``delta`` (m × n).

    Δ = U S Vᵀ, B = U_k S_k^½, A = S_k^½ V_kᵀ; k by ``rule``. Small matrices, and a fixed k above a
    quarter of min(m, n), take a full SVD. Otherwise ``linalg.truncate`` (the spectrum from the Gram
    matrix, then a randomized finder whose convergence the spectrum guarantees, or a projection on
    the Gram matrix's eigenvectors) gives the rank-k approximation, which is then factored exactly.
    """
    m, n = delta.shape
    r = min(m, n)
    if r < GRAM_MIN or (not needs_spectrum(rule) and 4 * choose_rank(rule, (m, n)) > r):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = choose_rank(rule, (m, n), s)
        u, s, vh = u[:, :k], s[:k], vh[:k]
    else:
        rank = (lambda sv: choose_rank(rule, (m, n), sv)) if needs_spectrum(rule) else choose_rank(rule, (m, n))
        approx, k = truncate(delta, rank, generator=generator)
        u, s, vh = _rank_k_svd(approx, k, generator)
    root = s.clamp_min(0).sqrt()
    return u * root, root[:, None] * vh, k


def _rank_k_svd(p: torch.Tensor, k: int, generator: torch.Generator | None):
    """U_k S_k V_kᵀ of a matrix of rank at most k: the range of P Ω for k Gaussian columns Ω is P's
    range, so Q Qᵀ P = P (Q = qr(P Ω)) and the SVD of the small Qᵀ P finishes it."""
    if generator is None or generator.device.type != "cpu":
        generator = torch.Generator().manual_seed(0)
    omega = torch.randn(p.shape[1], k, generator=generator, dtype=p.dtype).to(p.device)
    q, _ = torch.linalg.qr(p @ omega)
    ub, s, vh = torch.linalg.svd(q.mT @ p, full_matrices=False)
    return q @ ub, s, vh


# --- where each tensor lives in the model as transformers builds it ----------------------------------
@dataclass(frozen=True)
class Slot:
    module: str  # in-memory module name, e.g. model.language_model.layers.0.self_attn.q_proj
    param: str  # weight, bias, ...
    kind: str  # linear, embedding or other
    whole: bool  # the module has no parameterised submodules: it can be saved whole
    shape: tuple[int, ...]


def model_slots(base: Checkpoint) -> tuple[dict[str, Slot], list[str]]:
    """{canonical key: Slot} for the base's architecture, and the names of all its modules."""
    import transformers  # (a few seconds: only for a LoRA output)

    cls = model_class(base.config)
    try:
        config = transformers.AutoConfig.from_pretrained(base.path)
        with torch.device("meta"):
            model = cls(config)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds
        raise OmnimergeError(f"{base.path}: transformers cannot build {cls.__name__} from its config.json ({e}); "
                             "PEFT module names come from the model as transformers builds it") from None
    params: dict[str, Slot] = {}
    modules = []
    for name, module in model.named_modules():
        if name:
            modules.append(name)
        whole = not any(any(True for _ in c.parameters()) for c in module.children())
        kind = ("linear" if isinstance(module, torch.nn.Linear)
                else "embedding" if isinstance(module, torch.nn.Embedding) else "other")
        for pname, p in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            params[full] = Slot(name, pname, kind, whole and bool(name), tuple(p.shape))
    canon = canonical_keys(list(params), base.family)
    return {canon[k]: slot for k, slot in params.items()}, modules


# --- checks before anything is written ------------------------------------------------------------
def check_lora_plan(plan: Plan) -> Checkpoint:
    """The base that the adapter applies to: the recipe's base, with the output's architecture."""
    base = plan.base
    if base is None:
        raise OmnimergeError("--as-lora writes the merged delta over the recipe's `base:` model; the recipe has "
                             "no base. Add one, or write full weights")
    if base.lora is not None:
        raise OmnimergeError(f"--as-lora: the base '{base.name}' is itself a LoRA adapter; give its base model "
                             "folder as `base:`")
    if plan.layers is not None or plan.vocabulary is not None:
        what = "restacks the layers (`slices:`)" if plan.layers is not None else "changes the vocabulary (`tokenizer:`)"
        raise OmnimergeError(f"--as-lora: the recipe {what}, which an adapter over the base cannot express; write "
                             "full weights")
    sk = plan.skeleton
    if base.family.name != sk.family.name:
        raise OmnimergeError(
            f"--as-lora: the adapter applies to the base '{base.name}' ({base.family.name}), but the output has "
            f"the skeleton's architecture ({sk.family.name}, '{sk.name}'); an adapter cannot change the "
            "architecture. Use a base of the skeleton's architecture, or write full weights"
        )
    for job in plan.jobs:
        if not base.has(job.canonical):
            raise OmnimergeError(f"--as-lora: the base '{base.name}' ({base.path}) has no tensor for "
                                 f"'{job.canonical}' (output tensor '{job.out_key}'); an adapter can only change "
                                 "tensors that its base has")
        _, shape = base.info(job.canonical)
        if tuple(shape) != tuple(job.shape):
            raise OmnimergeError(f"--as-lora: {base.describe(job.canonical)} is {tuple(shape)}, the output's "
                                 f"'{job.out_key}' is {tuple(job.shape)}; an adapter cannot change a tensor's shape")
    return base


# --- the output -----------------------------------------------------------------------------------
def _norm2(t: torch.Tensor) -> float:
    return float(t.double().pow(2).sum())


class LoraOutput:
    """The sink that writes ``plan``'s result as a LoRA adapter over ``plan.base``.

    ``extracted`` ({"model": ..., "base": ...}) marks an ``extract`` run for the card and report."""

    def __init__(self, plan: Plan, rank, *, extracted: dict | None = None):
        self.plan, self.rule, self.extracted = plan, parse_rank(rank), extracted
        self.base = check_lora_plan(plan)
        self.slots, self.modules = model_slots(self.base)
        if plan.skeleton is not self.base and not extracted:
            plan.notes.append(f"the adapter applies to the base '{self.base.name}'; the skeleton "
                              f"'{plan.skeleton.name}' gives its tensors' values but not its config, tokenizer or "
                              "processor files")
        self.protect = plan.input_folders()
        self.total_bytes = plan.out_bytes
        self.space_bytes = None  # an adapter's size is known only once its ranks are
        self.total_tensors = len(plan.jobs)
        self.reductions: dict[str, Any] = {}
        self.report: dict[str, Any] = {}
        self.totals = {"delta": 0.0, "residual": 0.0, "lost": 0.0}
        self.lost: list[str] = []
        self.head_job = any(j.canonical == "lm_head.weight" for j in plan.jobs)
        self.writer: AdapterWriter | None = None
        self.summary: dict[str, Any] | None = None

    # --- the folder
    def work(self) -> list[tuple[Plan, Job]]:
        return [(self.plan, j) for j in self.plan.jobs]

    def open(self, tmp: Path) -> None:
        factor_dtype = DTYPES[self.plan.recipe.out_dtype] if self.plan.recipe.out_dtype else torch.float32
        self.writer = AdapterWriter(tmp, factor_dtype)

    def finish(self, tmp: Path, seconds: float) -> None:
        plan, base, writer = self.plan, self.base, self.writer
        _complete(writer, plan, base, self.slots)
        config = writer.close(base_model=_base_spec(plan), modules=self.modules)
        summary = self.summary = _summary(config, writer, self.totals, self.lost, self.rule)
        if self.lost:
            plan.notes.append(
                f"the adapter cannot carry {len(self.lost)} changed tensor(s) ({summary['lost_fraction']:.2%} of "
                f"the delta's norm), e.g. {self.lost[0]}: they are left out (see report.json)")
        head = self.slots.get("lm_head.weight")
        if base.tied_lm_head and not self.head_job and head is not None and head.module in writer.ranks:
            plan.notes.append("the base ties lm_head to the input embedding: the adapter updates both with the "
                              "same factors (PEFT's merge_and_unload would add the update twice to the tied matrix)")
        _side_files(plan, tmp, self.rule, summary, self.report, seconds, self.extracted)

    def result(self, out: Path, seconds: float) -> MergeResult:
        return MergeResult(out, self.plan, seconds, self.report, adapter=self.summary)

    # --- the loop
    def steps(self, device: str) -> list[Job]:
        return self.plan.jobs

    def read(self, job: Job):
        """The job's inputs and the base's tensor, or None when the job copies the base's own tensor."""
        plan = self.plan
        if job.action is Action.COPY and job.source is plan.base:
            return None
        inputs = read_inputs(plan, job)
        base = inputs[0] if job.action is Action.MERGE else plan.base.read(job.canonical)
        return inputs, base.to(plan.compute_dtype, copy=True)

    def compute(self, job: Job, got, device: str) -> dict[str, Any]:
        """The job's report entry; its factors (or whole tensor) are added to the adapter here (in memory:
        the adapter is written when it closes)."""
        entry: dict[str, Any] = {"canonical": job.canonical, "component": job.component, "shape": list(job.shape)}
        if got is None:
            return entry | {"as": "unchanged"}
        inputs, base_t = got
        plan = self.plan
        result, _ = compute(plan, dataclasses.replace(job, out_dtype=plan.compute_dtype), inputs, device,
                            self.reductions.get(job.canonical))
        del inputs
        delta = result.to(device) - base_t.to(device)
        del base_t
        if not bool(delta.any()):
            return entry | {"as": "unchanged"}
        entry.update(_store(self.writer, job, result, delta, self.slots.get(job.canonical), self.rule,
                            tensor_seed(plan.recipe.seed, job.canonical), self.base, self.slots, self.head_job))
        d2 = _norm2(delta)
        self.totals["delta"] += d2
        self.totals["residual"] += entry.get("residual", 0.0) ** 2
        if entry["as"] == "lost":
            self.totals["lost"] += d2
            self.lost.append(job.out_key)
        return entry

    def write(self, job: Job, entry) -> None:
        pass

    def record(self, job: Job, entry: dict[str, Any], seconds: float) -> list[Job]:
        entry["seconds"] = round(seconds, 6)
        self.report[job.out_key] = entry
        return [job]

    def close(self) -> None:
        pass

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


def _store(writer: AdapterWriter, job, result, delta, slot: Slot | None, rule, seed: int, base: Checkpoint,
           slots: dict[str, Slot], head_job: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"delta_norm": float(delta.double().norm())}
    if slot is None:
        return entry | {"as": "lost", "why": "transformers builds no parameter for this tensor"}
    entry["module"] = slot.module
    if slot.param == "weight" and slot.kind in ("linear", "embedding") and delta.ndim == 2:
        if delta.dtype not in (torch.float32, torch.float64):
            delta = delta.float()  # no half-precision SVD on the CPU
        b, a, k = lora_factors(delta, rule, torch.Generator().manual_seed(seed))
        b, a = b.to(writer.factor_dtype), a.to(writer.factor_dtype)
        residual = float((delta - b.to(delta.dtype) @ a.to(delta.dtype)).double().norm())
        writer.add_lora(slot.module, b, a, embedding=slot.kind == "embedding")
        head = slots.get("lm_head.weight")
        if job.canonical == "embed.weight" and base.tied_lm_head and not head_job and head and head.kind == "linear":
            writer.add_lora(head.module, b, a)
        return entry | {"as": "lora_embedding" if slot.kind == "embedding" else "lora", "rank": k,
                        "residual": residual}
    out = result.to(job.out_dtype).cpu()
    if slot.param == "bias" and slot.kind == "linear":
        writer.add_bias(slot.module, out)
        return entry | {"as": "bias"}
    if slot.whole:
        writer.add_saved(slot.module, slot.param, out)
        return entry | {"as": "module"}
    return entry | {"as": "lost", "why": f"'{slot.param}' is held by '{slot.module}', a module with submodules, "
                                         "which PEFT cannot save whole without them"}


def _complete(writer: AdapterWriter, plan: Plan, base: Checkpoint, slots: dict[str, Slot]) -> None:
    """Biases on layers whose weight did not change get a zero rank-1 update (PEFT loads a LoRA layer's
    bias only); modules saved whole get their unchanged parameters too."""
    weights = {s.module: s for s in slots.values() if s.param == "weight"}
    for module in sorted(writer.biases - set(writer.ranks)):
        m, n = weights[module].shape
        writer.add_lora(module, torch.zeros(m, 1), torch.zeros(1, n))
    by_module: dict[str, list[str]] = {}
    for canon, s in slots.items():
        by_module.setdefault(s.module, []).append(canon)
    for module, saved in sorted(writer.saved.items()):
        for canon in by_module[module]:
            s = slots[canon]
            if s.param not in saved and base.has(canon):
                writer.add_saved(module, s.param, base.read(canon))


def _base_spec(plan: Plan) -> str:
    """base_model_name_or_path: the hub id the recipe named, else the base's folder."""
    return hub_id(plan.recipe.base, plan.base.path) or str(plan.base.path)


def _summary(config: dict, writer: AdapterWriter, totals: dict, lost: list[str], rule) -> dict[str, Any]:
    delta = math.sqrt(totals["delta"])

    def frac(x: float) -> float:
        return math.sqrt(x) / delta if delta > 0 else 0.0

    ranks = list(writer.ranks.values())
    return {
        "rank_rule": rule,
        "r": config["r"],
        "ranks": {"min": min(ranks), "max": max(ranks), "mean": round(sum(ranks) / len(ranks), 3)},
        "lora_modules": len(writer.ranks),
        "embedding_modules": len(writer.embeddings),
        "biases": len(writer.biases),
        "modules_to_save": len(writer.saved),
        "lost_tensors": lost,
        "delta_norm": delta,
        "residual_fraction": frac(totals["residual"]),
        "lost_fraction": frac(totals["lost"]),
        "relative_error": frac(totals["residual"] + totals["lost"]),
        "factor_dtype": str(writer.factor_dtype).removeprefix("torch."),
        "bytes": writer.nbytes,
    }


def _side_files(plan: Plan, tmp: Path, rule, summary: dict, report: dict, seconds: float,
                extracted: dict | None) -> None:
    components = component_policies(plan)
    paths = {spec: ck.path for spec, ck in plan.refs.items()}
    if extracted:
        card = adapter_card(base=plan.recipe.base, rank=str(rule), summary=summary, paths=paths,
                            extracted_from=extracted["model"])
    else:
        recipe_yaml = yaml.safe_dump(resolved_recipe(plan), sort_keys=False)
        (tmp / "omnimerge.yaml").write_text(recipe_yaml)
        method = plan.recipe.method
        card = adapter_card(base=plan.recipe.base, rank=str(rule), summary=summary, paths=paths, method=method,
                            reference=get_method(method).reference, models=[e.path for e in plan.recipe.models],
                            recipe_yaml=recipe_yaml, components=components)
    (tmp / "README.md").write_text(card)
    write_json(tmp / "report.json", {
        "omnimerge_version": __version__,
        "kind": "lora_extract" if extracted else "lora_merge",
        "method": None if extracted else plan.recipe.method,
        "model": str(plan.models[0].path) if extracted else None,
        "base": str(plan.base.path),
        "models": [str(m.path) for m in plan.models],
        "components": None if extracted else components,
        "notes": plan.notes,
        "seconds": round(seconds, 3),
        "lora": summary,
        "tensors": report,
    })


def check_extract_pair(m: Checkpoint, b: Checkpoint) -> list[str]:
    """``extract``'s checks that MODEL is a fine-tune of BASE; returns MODEL's tensors that BASE lacks."""
    if m.family.name != b.family.name:
        raise OmnimergeError(f"extract: MODEL {m.path} is a {m.family.name} model, BASE {b.path} a {b.family.name} "
                             "one; an adapter applies to a model of its own architecture")
    for canon in b.canon_to_raw:
        if not m.has(canon):
            raise OmnimergeError(f"extract: MODEL {m.path} has no tensor for '{canon}' ({b.describe(canon)}); "
                                 "is BASE the model MODEL was fine-tuned from?")
        if tuple(m.info(canon)[1]) != tuple(b.info(canon)[1]):
            raise OmnimergeError(
                f"extract: {m.describe(canon)} is {tuple(m.info(canon)[1])}, {b.describe(canon)} is "
                f"{tuple(b.info(canon)[1])}; an adapter cannot change a tensor's shape (a resized vocabulary?)"
            )
    return sorted(set(m.canon_to_raw) - set(b.canon_to_raw))
