"""Expert Merging's coefficients: learned so that the merged model matches each expert on the expert's samples.

The merged model is θ(λ) = θ_base + Σ_i λ_{g,i} τ_i with λ = sigmoid(w) in (0, 1), one coefficient per model
and group g: every merged matrix (``tensor``, the reference's default), every decoder layer (``layer``), or
the whole model (``task``). On model i's samples x the loss is

    CE_i = t² · mean over tokens of −Σ_v softmax(z_i / t)_v · log softmax(z(λ) / t)_v      (logits z)
    H_i  = mean over the listed hidden states of mean((h(λ) − h_i)²)                          (hidden states h)

and the objective is mean_i (CE_i + hidden_weight · H_i) + reg_weight · Σ_{g,i} |λ_{g,i} − init| / G,
G the number of groups: the merged model's next-token distributions and hidden states pulled toward each
expert's on that expert's inputs, and the coefficients toward their start. AdamW (weight decay 1e-5),
cosine-annealed with warm restarts (T_0 50, T_mult 2, floor 0.1·lr), gradients clipped to norm 1; one
step takes one batch of every model. Defaults are the reference's (Littleor/ExpertMerging, see
docs/methods.md). Only 2-D tensors of the language backbone get coefficients (the reference excludes
norms, biases, embeddings, the lm_head and the vision tower); the method gives the others
θ_base + init · Σ τ_i.

The experts' targets (logits, and hidden states when asked) are computed first, one expert at a time, and
cached on disk in float16 (the reference runs in fp16); the optimisation then holds the base model and the
task vectors of the merged tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from ..errors import OmnimergeError
from .adamerging import stacked_task_vectors
from .collect import canonical_parameters

EXPERT_PARAMS = ("granularity", "init", "lr", "epochs", "temperature", "reg_weight", "hidden_weight",
                 "hidden_layers")
_LAYER = re.compile(r"^language\.layers\.(\d+)\.")


def parse_hidden_layers(value: str) -> tuple[int, ...] | str:
    """``none`` -> (), ``all`` -> "all", ``"0,4,8"`` -> (0, 4, 8): indices into the model's hidden states (0: the
    embeddings' output, i: the output of decoder layer i)."""
    text = str(value).strip().lower()
    if text in ("", "none"):
        return ()
    if text == "all":
        return "all"
    try:
        out = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"hidden_layers must be none, all or comma-separated layer indices, got {value!r}") from None
    if any(i < 0 for i in out):
        raise ValueError(f"hidden_layers must be non-negative indices, got {value!r}")
    return out


def _layers(value: str, count: int) -> tuple[int, ...]:
    parsed = parse_hidden_layers(value)
    if parsed == "all":
        return tuple(range(1, count))
    bad = [i for i in parsed if i >= count]
    if bad:
        raise OmnimergeError(f"hidden_layers {bad} out of range: the model has hidden states 0..{count - 1}")
    return parsed


def expert_targets(model, batches: Sequence[dict], hidden_layers: str = "none"
                   ) -> Iterator[tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]]:
    """One part per batch: ``{"batch<b>": {"logits": (B, S, V), "hidden<k>": (B, S, d), ...}}`` in float16."""
    device = next(model.parameters()).device
    parsed = parse_hidden_layers(hidden_layers)
    with torch.no_grad():
        for b, batch in enumerate(batches):
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out = model(**inputs, use_cache=False, output_hidden_states=bool(parsed))
            entry = {"logits": out.logits.to(torch.float16).cpu()}
            if parsed:
                for k in _layers(hidden_layers, len(out.hidden_states)):
                    entry[f"hidden{k}"] = out.hidden_states[k].to(torch.float16).cpu()
            yield {f"batch{b}": entry}, {}


class TargetReader:
    """An expert's cached targets, read one batch at a time: ``reader[b]`` -> ``{"logits": ..., "hidden<k>": ...}``
    in float32."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.files = sorted(self.folder.glob("part-*.safetensors"))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, b: int) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        with safe_open(self.files[b], "pt") as fh:
            return {name.rpartition("::")[2]: fh.get_tensor(name).float() for name in fh.keys()}


def group_of(canonical: str, granularity: str) -> str:
    if granularity == "task":
        return "all"
    if granularity == "tensor":
        return canonical
    m = _LAYER.match(canonical)
    return f"layer{m.group(1)}" if m else "rest"


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """t² · mean over the masked positions of −Σ softmax(teacher/t) · log softmax(student/t)."""
    keep = mask.bool()
    p = torch.softmax(teacher[keep].float() / temperature, dim=-1)
    logq = torch.log_softmax(student[keep].float() / temperature, dim=-1)
    return -(p * logq).sum(-1).mean() * temperature ** 2


def hidden_mse(student: Sequence[torch.Tensor], teacher: dict[str, torch.Tensor], layers: Sequence[int],
               mask: torch.Tensor) -> torch.Tensor:
    """Mean over ``layers`` of the mean squared difference of the hidden states at the masked positions."""
    keep = mask.bool()
    losses = [((student[k][keep].float() - teacher[f"hidden{k}"].to(student[k].device)[keep]) ** 2).mean()
              for k in layers]
    return torch.stack(losses).mean()


def learn_expert_coefficients(model, task_vectors: Sequence[dict[str, torch.Tensor]], batches: Sequence[Sequence[dict]],
                              targets: Sequence[Sequence[dict[str, torch.Tensor]]], *, granularity: str = "tensor",
                              init: float = 0.1, lr: float = 0.5, epochs: int = 1, temperature: float = 1.0,
                              reg_weight: float = 5.0, hidden_weight: float = 1.0, hidden_layers: str = "none",
                              log: Callable[[str], None] | None = None, trace: list | None = None,
                              progress: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """λ for every canonical key that gets coefficients: ``{key: [λ_1, ..., λ_T]}``.

    ``model`` holds θ_base (the merged weights are passed functionally); ``task_vectors`` one
    ``{canonical key: τ_i}`` per model (or the stacks, see :func:`.adamerging.stacked_task_vectors`); ``batches`` one list of rendered batches per model and ``targets``
    the expert's outputs on them (:func:`expert_targets`, :class:`TargetReader`). Each step takes the next
    batch of every model; ``epochs`` passes over the longest list. ``trace`` receives the objective at the
    start of every step."""
    if granularity not in ("tensor", "layer", "task"):
        raise OmnimergeError(f"granularity must be tensor, layer or task, got {granularity!r}")
    if not 0.0 < init < 1.0:
        raise OmnimergeError(f"init must lie in (0, 1) (the coefficients are sigmoids), got {init}")
    device = next(model.parameters()).device
    stacked = stacked_task_vectors(task_vectors, device)
    T = len(batches)
    if not stacked or len(targets) != T or any(v.shape[0] != T for v in stacked.values()):
        raise ValueError("one set of task vectors, one list of batches and one of targets per model")
    if any(not b for b in batches) or any(len(b) != len(t) for b, t in zip(batches, targets)):
        raise OmnimergeError("every model needs at least one calibration batch, and a target for each")
    params = canonical_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [k for k in stacked
            if k in params and params[k].dim() >= 2 and k not in ("embed.weight", "lm_head.weight")]
    if not keys:
        raise OmnimergeError("no merged matrix of the language backbone is a parameter of the base model")
    groups = sorted({group_of(k, granularity) for k in keys})
    index = {g: i for i, g in enumerate(groups)}
    start = torch.full((len(groups), T), float(init), device=device)
    raw = torch.nn.Parameter(torch.logit(start))
    opt = torch.optim.AdamW([raw], lr=lr, weight_decay=1e-5, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=50, T_mult=2, eta_min=lr * 0.1)
    for p in model.parameters():
        p.requires_grad_(False)
    taus = {k: stacked[k] for k in keys}  # (T, *shape)
    del stacked
    model.train(False)

    def merged(lam: torch.Tensor) -> dict[str, torch.Tensor]:
        return {names[id(params[k])]: params[k] + torch.tensordot(lam[index[group_of(k, granularity)]], taus[k], dims=1)
                for k in keys}

    steps = epochs * max(len(b) for b in batches)
    for step in range(steps):
        lam = torch.sigmoid(raw)
        weights = merged(lam)
        loss = 0.0
        for i in range(T):
            b = step % len(batches[i])
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batches[i][b].items()}
            target = targets[i][b]
            layers = sorted(int(k[len("hidden"):]) for k in target if k.startswith("hidden"))
            out = torch.func.functional_call(model, weights, args=(),
                                             kwargs={**inputs, "use_cache": False,
                                                     "output_hidden_states": bool(layers)}, strict=False)
            mask = inputs["attention_mask"]
            if out.logits.shape != target["logits"].shape:
                raise OmnimergeError(f"the merged model's logits are {tuple(out.logits.shape)}, expert {i}'s "
                                     f"{tuple(target['logits'].shape)}; the models must share one vocabulary")
            term = soft_cross_entropy(out.logits, target["logits"].to(device), mask, temperature)
            if layers and hidden_weight:
                term = term + hidden_weight * hidden_mse(out.hidden_states, target, layers, mask)
            loss = loss + term / T
        reg = (lam - start).abs().sum() / len(groups)
        loss = loss + reg_weight * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([raw], max_norm=1.0)
        opt.step()
        sched.step()
        if trace is not None:
            trace.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1)
        if log and (step % 10 == 0 or step == steps - 1):
            log(f"expert_merging step {step + 1}/{steps}: objective {float(loss.detach()):.4f}")
    final = torch.sigmoid(raw.detach()).cpu()
    return {k: final[index[group_of(k, granularity)]].tolist() for k in keys}


def expert_objective(model, task_vectors, batches, targets, coefficients: dict[str, list[float]], *,
                     temperature: float = 1.0, reg_weight: float = 5.0, hidden_weight: float = 1.0,
                     init: float = 0.1) -> float:
    """The objective :func:`learn_expert_coefficients` minimises, at ``coefficients`` (``{key: [λ_i]}``), over
    every batch of every model (the regulariser counts each key as one group)."""
    params = canonical_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    device = next(model.parameters()).device
    T = len(task_vectors)
    weights = {names[id(params[k])]: params[k] + sum(c * task_vectors[i][k].to(device) for i, c in enumerate(v))
               for k, v in coefficients.items()}
    total = 0.0
    with torch.no_grad():
        for i in range(T):
            part = 0.0
            for b, batch in enumerate(batches[i]):
                inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                target = targets[i][b]
                layers = sorted(int(k[len("hidden"):]) for k in target if k.startswith("hidden"))
                out = torch.func.functional_call(model, weights, args=(), kwargs={
                    **inputs, "use_cache": False, "output_hidden_states": bool(layers)}, strict=False)
                term = soft_cross_entropy(out.logits, target["logits"].to(device), inputs["attention_mask"], temperature)
                if layers and hidden_weight:
                    term = term + hidden_weight * hidden_mse(out.hidden_states, target, layers,
                                                             inputs["attention_mask"])
                part += float(term)
            total += part / len(batches[i]) / T
    reg = sum(abs(c - init) for v in coefficients.values() for c in v) / max(1, len(coefficients))
    return total + reg_weight * reg
