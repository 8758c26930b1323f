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
from dataclasses import dataclass, field

import torch

SAMPLE = 1 << 16  # sample size; tensors up to 4 × this take the plain kthvalue route
_Z = 5.0  # half-width of the bracket, in binomial standard deviations of the sample rank


def _band(flat: torch.Tensor, k: int) -> tuple[torch.Tensor, int] | None:
    """Positions (ascending) of the entries in a bracket [lo, hi] that holds the k-th largest entry,
    and the number of entries above ``hi``; None if the sample's bracket missed it."""
    n = flat.numel()
    gen = torch.Generator(device="cpu").manual_seed(n)
    sample = flat[torch.randint(n, (SAMPLE,), generator=gen).to(flat.device)]
    q = (n - k) / (n - 1)  # where the k-th largest sits, as a fraction of the ascending order
    half = _Z * math.sqrt(SAMPLE * q * (1 - q)) + 2
    lo_i, hi_i = math.floor(q * (SAMPLE - 1) - half), math.ceil(q * (SAMPLE - 1) + half)
    above, band = 0, None
    # the sample's order statistics by selection (kthvalue counts from 1), not a sort of the sample
    if hi_i < SAMPLE:
        over = flat > sample.kthvalue(hi_i + 1).values
        above = int(over.count_nonzero())  # (a bool .sum() widens to int64: several times slower)
        band = ~over
    if lo_i >= 0:
        lo = sample.kthvalue(lo_i + 1).values
        band = flat >= lo if band is None else band.logical_and_(flat >= lo)
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


def just_below(value: float | torch.Tensor, dtype: torch.dtype) -> float | None:
    """The largest ``dtype`` number below ``value`` (rounded to ``dtype`` first), as a Python float, so that
    ``x > just_below(v)`` is ``x >= v`` for every ``x`` of that dtype; None where torch has no ``nextafter``
    for the dtype or ``value`` is -inf."""
    if dtype not in (torch.float32, torch.float64):
        return None
    v = torch.as_tensor(value, dtype=dtype)
    below = torch.nextafter(v, torch.tensor(-math.inf, dtype=dtype))
    return float(below) if bool(below < v) else None


def top_k_cut(values: torch.Tensor, k: int) -> tuple[float, torch.Tensor | None]:
    """The ``k`` largest entries of ``values`` (no NaN) as a cut ``(above, extra)``: the entries greater than
    ``above``, plus the entries at the flat indices ``extra`` (ascending; None when there are none) — exactly k
    of them, ties at the k-th largest value broken by position (lowest flat index first), as in
    :func:`top_k_mask`. A cut applies to any slice of the tensor without a mask of the whole of it."""
    n = values.numel()
    if k <= 0:
        return math.inf, None
    if k >= n:
        return -math.inf, None
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
        below = just_below(v, v.dtype)
        if below is not None:
            return below, None
    return float(v), ties[:need]


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``values`` (no NaN): exactly k entries are True.

    Ties at the k-th largest value are broken by position (lowest flat index first)."""
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if k >= values.numel():
        return torch.ones_like(values, dtype=torch.bool)
    above, extra = top_k_cut(values, k)
    keep = values.reshape(-1) > above
    if extra is not None:
        keep[extra] = True
    return keep.view(values.shape)


# --- the k-th largest over many tensors, seen in streaming passes ------------------------------------
DIGIT_BITS = 16  # bits of the bit pattern resolved per pass: 2 passes for float32, 4 for float64
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
             torch.float64: torch.int64}


class _ChunkDigits:
    """Per chunk of the last pass: (tag, the last digits present, their counts), kept in two growable int32
    buffers rather than two small tensors per chunk. Small tensors that live through a pass, allocated
    between its large temporaries, keep the allocator from reusing the freed space: on a 152k-row embedding
    fed in 4 MiB blocks, four selections' small tensors (22 kB in all) grew the resident size by 0.8 GiB."""

    def __init__(self):
        self.buf = torch.empty(0, dtype=torch.int32)
        self.used = 0
        self.index: list[tuple] = []  # (tag, start, count)

    def append(self, tag, counts: torch.Tensor) -> None:
        present = counts.nonzero().squeeze(1)
        n = present.numel()
        need = self.used + 2 * n
        if need > self.buf.numel():
            grown = torch.empty(max(need, 2 * self.buf.numel(), 1 << 16), dtype=torch.int32)
            grown[:self.used] = self.buf[:self.used]
            self.buf = grown
        self.buf[self.used:self.used + n] = present
        self.buf[self.used + n:need] = counts[present]
        self.index.append((tag, self.used, n))
        self.used = need

    def __iter__(self):
        for tag, start, n in self.index:
            yield tag, self.buf[start:start + n], self.buf[start + n:start + 2 * n]


class _DigitPasses:
    """What both streamed selections share: the chunks' bit patterns histogrammed 16 bits per pass (the
    digits below the ones fixed so far), a digit fixed after each pass, and in the last pass each chunk's
    counts of the last digit, which tell how many values equal to the result come before each chunk."""

    def __init__(self):
        self.n = 0
        self.prefix = 0  # the digits fixed so far
        self.resolved = 0  # how many bits of the pattern they cover
        self.bits: int | None = None
        self.hist: torch.Tensor | None = None
        self._chunks = _ChunkDigits()

    def _histogram(self, values: torch.Tensor, tag, keep_last_digits: bool) -> None:
        if self.bits is None:
            self.dtype = values.dtype
            self.bits = torch.finfo(values.dtype).bits
        elif values.dtype != self.dtype:
            raise ValueError(f"every chunk must be {self.dtype}, got {values.dtype}")
        if self.resolved == 0:
            self.n += values.numel()
        patterns = values.reshape(-1).view(_INT_VIEW[values.dtype])
        shift = self.bits - self.resolved - DIGIT_BITS
        if self.resolved:
            patterns = patterns[(patterns >> (shift + DIGIT_BITS)) == self.prefix]
        digits = ((patterns >> shift) & ((1 << DIGIT_BITS) - 1)).to(torch.int64)
        counts = torch.bincount(digits.cpu(), minlength=1 << DIGIT_BITS)
        if keep_last_digits and self.resolved + DIGIT_BITS == self.bits:
            self._chunks.append(tag, counts)
        self.hist = counts if self.hist is None else self.hist.add_(counts)

    def _fix(self, digit: int) -> bool:
        """Fix the next digit; True when the whole pattern is known."""
        self.prefix = (self.prefix << DIGIT_BITS) | digit
        self.resolved += DIGIT_BITS
        self.hist = None
        return self.resolved == self.bits

    def _value(self) -> float:
        pattern = torch.tensor([self.prefix], dtype=torch.int64).to(_INT_VIEW[self.dtype])
        return float(pattern.view(self.dtype)[0])

    def _equal_before(self, digit: int) -> dict:
        """Per chunk tag, how many values equal to the fixed pattern (last digit ``digit``) come before it."""
        before, seen = {}, 0
        for tag, present, counts in self._chunks:
            before[tag] = seen
            at = torch.searchsorted(present, digit)
            if at < present.numel() and int(present[at]) == digit:
                seen += int(counts[at])
        self._chunks = _ChunkDigits()
        return before


class StreamedKthLargest(_DigitPasses):
    """The exact k-th largest of non-negative floats that arrive in chunks (tensors), over several
    passes over the same chunks, in memory independent of their number: k = int(``fraction`` · N),
    N the number of values (counted in the first pass).

    A non-negative float's bit pattern, read as an integer, orders like the float. Each pass
    histograms the next 16-bit digit of the patterns that share the digits already fixed (65,536
    counters), and fixes the digit where the k-th largest lies; after ``bits / 16`` passes the whole
    pattern, so the value itself, is known: exact, with no sampling. ``threshold`` is then that value,
    or +inf when k = 0 (nothing is kept) and 0 when k = N (everything is).

    ``exact_count``: keep exactly k values, as :func:`top_k_mask` does — when more values equal the
    threshold than the k-th largest leaves room for, ``ties`` (how many of them to keep, the first ones
    in feed order) and ``ties_before[tag]`` (how many come before the chunk fed with ``tag``) tell each
    chunk which to keep. The last pass keeps each chunk's counts of the last digit (the non-zero ones)
    to know them without another pass. ``ties`` is None when every value equal to the threshold is kept."""

    def __init__(self, fraction: float, exact_count: bool = False):
        super().__init__()
        self.fraction = fraction
        self.exact_count = exact_count
        self.k: int | None = None  # how many of the largest are still above the digits being resolved
        self.threshold: float | None = None
        self.ties: int | None = None
        self.ties_before: dict = {}

    @property
    def done(self) -> bool:
        return self.threshold is not None

    def feed(self, values: torch.Tensor, tag=None) -> None:
        """One chunk of non-negative values (any shape), in the current pass (``tag``: see the class doc)."""
        if not self.done:
            self._histogram(values, tag, self.exact_count)

    def next_pass(self) -> None:
        """After every chunk was fed in this pass: fix the next digit (or finish)."""
        if self.done:
            return
        if self.k is None:
            self.k = int(self.fraction * self.n)
            if self.k <= 0 or self.k >= self.n:
                self.threshold = math.inf if self.k <= 0 else 0.0
                return
        # the digit d with (count above d) < k <= (count above d) + hist[d], from the largest digit down
        from_top = self.hist.flip(0).cumsum(0)
        i = int(torch.searchsorted(from_top, torch.tensor(self.k)))
        digit = (1 << DIGIT_BITS) - 1 - i
        self.k -= int(from_top[i - 1]) if i > 0 else 0
        equal = int(self.hist[digit])  # values sharing the digits fixed so far (all of the pattern, at the end)
        if self._fix(digit):
            self.threshold = self._value()
            before = self._equal_before(digit)
            if self.exact_count and self.k < equal:  # keep only the first k of the values equal to it
                self.ties, self.ties_before = self.k, before


# --- the m smallest, in ascending (value, position) order, seen in streaming passes ----------------
@dataclass(frozen=True)
class RankCut:
    """The entries of rank < m in the ascending order of non-negative values, ties by position (a stable
    ascending sort's first m): every entry below ``value``, and of the entries equal to it the first ``take``
    by flat index; ``before[tag]`` is how many entries equal to ``value`` come before the chunk fed with
    ``tag``. m = 0 is ``RankCut(0.0, 0)`` (nothing), m = n ``RankCut(inf, 0)`` (everything)."""

    value: float
    take: int = 0
    before: dict = field(default_factory=dict)

    def mask(self, values: torch.Tensor, tag=0) -> torch.Tensor:
        """Which of ``values`` (the chunk fed with ``tag``, or the whole tensor with tag 0) have rank < m."""
        below = values < self.value
        left = self.take - self.before.get(tag, 0)
        if left > 0:
            equal = (values.reshape(-1) == self.value).nonzero().squeeze(1)[:left]
            below.view(-1)[equal] = True
        return below


class StreamedRankCut(_DigitPasses):
    """The exact :class:`RankCut` of the m = ``m_of(n)`` smallest of n non-negative floats that arrive in chunks,
    in flat-index order, over several passes over the same chunks (n is counted in the first pass).

    As :class:`StreamedKthLargest`, from the smallest: each pass histograms the next 16-bit digit of the bit
    patterns that share the digits already fixed and fixes the digit where the m-th smallest lies. The last
    pass keeps each chunk's counts of the last digit, which give ``before`` without another pass."""

    def __init__(self, m_of):
        super().__init__()
        self.m_of = m_of
        self.m: int | None = None  # how many of the smallest still lie within the digits fixed so far
        self.cut: RankCut | None = None

    @property
    def done(self) -> bool:
        return self.cut is not None

    def feed(self, values: torch.Tensor, tag=0) -> None:
        if not self.done:
            self._histogram(values, tag, True)

    def next_pass(self) -> None:
        if self.done:
            return
        if self.m is None:
            self.m = self.m_of(self.n)
            if self.m <= 0 or self.m >= self.n:
                self.cut = RankCut(0.0) if self.m <= 0 else RankCut(math.inf)
                self._chunks = _ChunkDigits()
                return
        # the digit d with (count below d) < m <= (count below d) + hist[d], from the smallest digit up
        below = self.hist.cumsum(0)
        digit = int(torch.searchsorted(below, torch.tensor(self.m)))
        self.m -= int(below[digit - 1]) if digit > 0 else 0
        if self._fix(digit):
            self.cut = RankCut(self._value(), self.m, self._equal_before(digit))
