"""Rank rules: how many singular directions a low-rank method keeps, one grammar for all of them.

A rule is an integer (that many, capped at the matrix rank), a ratio in (0, 1] of min(m, n),
or a name: ``knee``, ``participation_sqrt``, ``gavish_donoho``, ``stable_rank``, ``entropy``,
``energy:<p>``. Rules that look at a spectrum take the singular values in descending order
(or the square roots of a Gram matrix's eigenvalues, which are the same numbers).
"""

from __future__ import annotations

import math
from typing import Union

import torch

RankRule = Union[int, float, str]
NAMED = ("knee", "participation_sqrt", "gavish_donoho", "stable_rank", "entropy")


RULE_DOC = "integer >= 1, ratio in (0, 1], knee, participation_sqrt, gavish_donoho, stable_rank, entropy, energy:<p>"


def rank_param(name: str = "rank", default: RankRule = "knee", help: str = "rank rule", per_model: bool = False):
    """A registry Param that takes a rank rule."""
    from .registry import Param

    return Param(name, str, default, help, check=check_rank_rule, kind_text="rank rule", range_doc=RULE_DOC,
                 per_model=per_model)


def check_rank_rule(value) -> RankRule:
    """Validate a rule as written in a recipe; returns it normalised or raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"rank rule must be an integer, a ratio in (0, 1] or a name, got {value!r}")
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and value > 1):
        if int(value) < 1:
            raise ValueError(f"an integer rank must be >= 1, got {value!r}")
        return int(value)
    if isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ValueError(f"a rank ratio must be in (0, 1], got {value!r}")
        return value
    if isinstance(value, str):
        if value in NAMED:
            return value
        if value.startswith("energy:"):
            try:
                p = float(value.split(":", 1)[1])
            except ValueError:
                p = -1.0
            if 0.0 < p <= 1.0:
                return value
            raise ValueError(f"'{value}': energy:<p> needs p in (0, 1], e.g. energy:0.9")
    raise ValueError(
        f"unknown rank rule {value!r}; use an integer, a ratio in (0, 1], energy:<p>, or one of {', '.join(NAMED)}"
    )


def knee(s: torch.Tensor) -> int:
    """The point of the normalised spectrum farthest from the chord joining its ends (k >= 1)."""
    r = s.numel()
    if r <= 2:
        return 1
    s = s.double()
    x = torch.arange(r, dtype=torch.float64) / (r - 1)
    y = (s - s[-1]) / (s[0] - s[-1] + 1e-12 * max(float(s[0]), 1e-300))
    d = (x * (y[-1] - y[0]) - (y - y[0])).abs()
    return max(1, int(torch.argmax(d)))


def participation_sqrt(s: torch.Tensor) -> int:
    s = s.double()
    total = float((s * s).sum())
    return max(1, math.ceil(float(s.sum()) ** 2 / total - 1e-9)) if total > 0 else 1


def gavish_donoho_omega(beta: float) -> float:
    """ω(β) of Gavish & Donoho's optimal hard threshold for an unknown noise level."""
    return 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43


def gavish_donoho(s: torch.Tensor, shape: tuple[int, int]) -> int:
    m, n = shape[-2], shape[-1]
    beta = min(m, n) / max(m, n)
    tau = gavish_donoho_omega(beta) * float(torch.quantile(s.double(), 0.5))  # the true median
    return max(1, int((s.double() > tau).sum()))


def stable_rank(s: torch.Tensor) -> int:
    s = s.double()
    return max(1, math.ceil(float((s * s).sum() / (s[0] * s[0] + 1e-300)) - 1e-9)) if float(s[0]) > 0 else 1


def entropy(s: torch.Tensor) -> int:
    """Roy & Vetterli's effective rank exp(H(p)), p = σ / Σσ, rounded up."""
    s = s.double()
    total = float(s.sum())
    if total <= 0:
        return 1
    p = s / total
    p = p[p > 0]
    return max(1, math.ceil(math.exp(float(-(p * p.log()).sum())) - 1e-9))


def energy(s: torch.Tensor, fraction: float) -> int:
    e = (s.double() ** 2).cumsum(0)
    if float(e[-1]) <= 0:
        return 1
    return max(1, int(torch.searchsorted(e, fraction * e[-1] * (1 - 1e-12))) + 1)


def needs_spectrum(rule: RankRule) -> bool:
    return isinstance(rule, str)


def choose_rank(rule: RankRule, shape: tuple[int, ...], s: torch.Tensor | None = None) -> int:
    """The rank a rule picks for a matrix of ``shape`` (…, m, n) with descending singular values ``s``."""
    r = min(shape[-2], shape[-1])
    if isinstance(rule, bool):
        raise ValueError(f"rank rule must be an integer, a ratio in (0, 1] or a name, got {rule!r}")
    if isinstance(rule, float) and rule > 1 and rule.is_integer():
        rule = int(rule)  # as check_rank_rule reads it
    if isinstance(rule, int):
        return max(1, min(rule, r))
    if isinstance(rule, float):
        return max(1, min(r, int(rule * r)))
    if s is None:
        raise ValueError(f"rank rule {rule!r} needs the singular values")
    s = s[:r]
    if rule == "knee":
        k = knee(s)
    elif rule == "participation_sqrt":
        k = participation_sqrt(s)
    elif rule == "gavish_donoho":
        k = gavish_donoho(s, shape)
    elif rule == "stable_rank":
        k = stable_rank(s)
    elif rule == "entropy":
        k = entropy(s)
    elif rule.startswith("energy:"):
        k = energy(s, float(rule.split(":", 1)[1]))
    else:
        raise ValueError(f"unknown rank rule {rule!r}")
    return max(1, min(k, r))
