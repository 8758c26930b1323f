"""Exact top-k selection without sorting: which entries of a tensor are its k largest.

TIES keeps the k = int(density · n) entries of largest magnitude of each task vector. Sorting (or
``torch.topk`` with a large k) costs O(n log n) and is the slowest step of a TIES merge; this module
finds the k-th largest value by *selection* instead, in a few linear passes:

1. sort a fixed-size sample of the entries (positions drawn from a fixed seed) and read off two
   values ``lo <= hi`` that bracket the k-th largest with very high probability (the sample's
   quantile ± 5 binomial standard deviations);
2. count the entries above ``hi`` and gather those in ``[lo, hi]`` (a small fraction of them);
3. if the k-th largest is among the gathered ones, ``kthvalue`` on them finds it; otherwise (the
   sample was unlucky; it never happens in practice, but the result must not depend on luck)
   ``kthvalue`` runs on all entries.

The result is **exact** — the same set of k entries whatever the sample — and deterministic: ties
at the k-th value are broken by position (the entries with the lowest flat indices are kept), so
the mask does not depend on threads, devices or the order of a sort.
"""

from __future__ import annotations

import math

import torch

SAMPLE = 1 << 16  # sample size; tensors up to 4 × this take the plain kthvalue route
_Z = 5.0  # half-width of the bracket, in binomial standard deviations of the sample rank


def _band(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, int] | None:
    """Positions (ascending) of the entries in a bracket [lo, hi] that holds the k-th largest entry,
    and the number of entries above ``hi``; None if the sample's bracket missed it."""
    n = flat.numel()
    gen = torch.Generator(device="cpu").manual_seed(n)
    sample = flat[torch.randint(n, (SAMPLE,), generator=gen).to(flat.device)].sort().values
    q = (n - k) / (n - 1)  # where the k-th largest sits, as a fraction of the ascending order
    half = _Z * math.sqrt(SAMPLE * q * (1 - q)) + 2
    lo_i, hi_i = math.floor(q * (SAMPLE - 1) - half), math.ceil(q * (SAMPLE - 1) + half)
    above, band = 0, None
    if hi_i < SAMPLE:
        over = flat > sample[hi_i]
        above = int(over.count_nonzero())  # (a bool .sum() widens to int64: several times slower)
        band = ~over
    if lo_i >= 0:
        band = flat >= sample[lo_i] if band is None else band.logical_and_(flat >= sample[lo_i])
    idx = band.nonzero().squeeze(1) if band is not None else torch.arange(n, device=flat.device)
    if not above < k <= above + idx.numel():
        return None
    return idx, above


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of ``values`` (1 <= k <= numel; no NaN), as a 0-d tensor. Exact."""
    flat = values.reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k = {k} is out of range for {n} values")
    found = _band(flat, k) if n > 4 * SAMPLE else None
    if found is None:
        return flat.kthvalue(n - k + 1).values  # kthvalue counts from the smallest
    idx, above = found
    return flat[idx].kthvalue(idx.numel() - (k - above) + 1).values


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``values`` (no NaN): exactly k entries are True.

    Ties at the k-th largest value are broken by position (lowest flat index first)."""
    n = values.numel()
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    flat = values.reshape(-1)
    found = _band(flat, k) if n > 4 * SAMPLE else None
    if found is None:
        idx, above = torch.arange(n, device=flat.device), 0
    else:
        idx, above = found
    cand = flat[idx]
    v = cand.kthvalue(cand.numel() - (k - above) + 1).values
    need = k - above - int((cand > v).count_nonzero())  # how many entries equal to v to keep (>= 1)
    ties = idx[cand == v]  # every entry equal to v lies in the band, in ascending position
    if ties.numel() == need:
        return (flat >= v).view(values.shape)
    keep = flat > v
    keep[ties[:need]] = True
    return keep.view(values.shape)
