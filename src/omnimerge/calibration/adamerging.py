"""AdaMerging's coefficients: learned by minimising the entropy of the merged model's predictions.

The merged model is θ(λ) = θ_base + Σ_i λ_{g,i} τ_i, with one coefficient per model and group g: one group
for the whole model (``task``-wise) or one per decoder layer plus one for everything else (``layer``-wise).
λ starts at ``init`` and Adam lowers the mean entropy of the next-token distribution where the answer
starts (the last position of each rendered sample: the generation prompt), over every model's unlabeled
samples, through the merged model itself (``torch.func.functional_call``). The base and every task vector
of the merged tensors are in memory during this stage (AdaMerging's definition needs them all at once).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from ..errors import OmnimergeError
from .collect import canonical_parameters

_LAYER = re.compile(r"^language\.layers\.(\d+)\.")


def group_of(canonical: str, granularity: str) -> str:
    if granularity == "task":
        return "all"
    m = _LAYER.match(canonical)
    return f"layer{m.group(1)}" if m else "rest"


def stacked_task_vectors(task_vectors, device) -> dict[str, torch.Tensor]:
    """``{key: (T, *shape)}`` float32 on ``device`` from one ``{key: τ_i}`` per model, or ``task_vectors``
    itself when it is already that mapping (no second copy: a stage builds the stacks directly)."""
    if isinstance(task_vectors, dict):
        return {k: v.to(device, torch.float32) for k, v in task_vectors.items()}
    return {k: torch.stack([tv[k].to(device, torch.float32) for tv in task_vectors]) for k in task_vectors[0]}


def answer_entropy(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the next-token distributions at each row's last non-padding position."""
    last = attention_mask.long().sum(-1) - 1
    if attention_mask.shape[-1] and bool((attention_mask[:, 0] == 0).any()):  # left padding: the last column
        last = torch.full_like(last, attention_mask.shape[-1] - 1)
    z = logits[torch.arange(logits.shape[0]), last].float()
    logp = torch.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def learn_coefficients(model, task_vectors: Sequence[dict[str, torch.Tensor]], batches: Sequence[Sequence[dict]], *,
                       granularity: str = "layer", init: float = 0.3, lr: float = 1e-3, steps: int = 100,
                       log: Callable[[str], None] | None = None, trace: list | None = None,
                       progress: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """λ for every canonical key the task vectors cover: ``{key: [λ_1, ..., λ_T]}``.

    ``model`` holds θ_base (modified by nothing: the merged weights are passed functionally); ``task_vectors``
    one ``{canonical key: τ_i}`` per model (or ``{canonical key: (T, *shape)}``, see :func:`stacked_task_vectors`); ``batches`` one list of rendered batches per model. Each step
    takes the next batch of every model and sums their entropies. ``trace`` (a list) receives the loss of
    every step; ``progress(done)`` is called after each."""
    if granularity not in ("layer", "task"):
        raise OmnimergeError(f"granularity must be layer or task, got {granularity!r}")
    device = next(model.parameters()).device
    stacked = stacked_task_vectors(task_vectors, device)
    T = len(batches)
    if not stacked or any(v.shape[0] != T for v in stacked.values()):
        raise ValueError("one set of task vectors and one list of batches per model")
    if any(not b for b in batches):
        raise OmnimergeError("every model needs at least one calibration sample")
    params = canonical_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [k for k in stacked if k in params]
    if not keys:
        raise OmnimergeError("no merged tensor of the task vectors is a parameter of the base model")
    groups = sorted({group_of(k, granularity) for k in keys})
    index = {g: i for i, g in enumerate(groups)}
    lam = torch.nn.Parameter(torch.full((len(groups), T), float(init), device=device))
    opt = torch.optim.Adam([lam], lr=lr)
    for p in model.parameters():
        p.requires_grad_(False)
    taus = {k: stacked[k] for k in keys}  # (T, *shape)
    del stacked
    model.train(False)

    def merged() -> dict[str, torch.Tensor]:
        out = {}
        for k in keys:
            coeff = lam[index[group_of(k, granularity)]]
            out[names[id(params[k])]] = params[k] + torch.tensordot(coeff, taus[k], dims=1)
        return out

    cursor = [0] * T
    for step in range(steps):
        weights = merged()
        loss = 0.0
        for i in range(T):
            batch = batches[i][cursor[i] % len(batches[i])]
            cursor[i] += 1
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            logits = torch.func.functional_call(model, weights, args=(), kwargs={**inputs, "use_cache": False},
                                                strict=False).logits
            loss = loss + answer_entropy(logits, inputs["attention_mask"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if trace is not None:
            trace.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1)
        if log and (step % 25 == 0 or step == steps - 1):
            log(f"adamerging step {step + 1}/{steps}: entropy {float(loss.detach()) / T:.4f}")
    final = lam.detach().cpu()
    return {k: final[index[group_of(k, granularity)]].tolist() for k in keys}
