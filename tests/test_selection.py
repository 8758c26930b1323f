"""Exact top-k by selection (TIES' trim): the same set as a full stable sort, ties broken by position."""

from __future__ import annotations

import pytest
import torch

from omnimerge.methods import selection
from omnimerge.methods.selection import just_below, kth_largest, top_k_cut, top_k_mask

N = 5 * selection.SAMPLE  # above 4 × SAMPLE: the sampled route


def by_sorting(values: torch.Tensor, k: int) -> torch.Tensor:
    """The definition: the k largest, ties at the k-th value taken in order of position (a stable sort)."""
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[torch.sort(-values.reshape(-1), stable=True).indices[:k]] = True
    return mask.view(values.shape)


def cases(seed: int):
    g = torch.Generator().manual_seed(seed)
    yield "continuous", torch.randn(N, generator=g).abs()
    # task vectors of bf16 weights: few distinct magnitudes, thousands of entries equal to the k-th
    yield "bf16", ((torch.randn(N, generator=g) * 0.02).bfloat16().float()
                   - (torch.randn(N, generator=g) * 0.02).bfloat16().float()).abs()
    yield "integers", torch.randint(0, 5, (N,), generator=g).float()
    yield "matrix", torch.randn(300, 1200, generator=g).abs()


@pytest.mark.parametrize("density", [1e-5, 0.01, 0.2, 0.5, 0.9, 0.99999])
def test_top_k_mask_is_the_stable_sort_definition(density):
    for name, values in cases(int(density * 1e5)):
        k = int(density * values.numel())
        mask = top_k_mask(values, k)
        assert mask.shape == values.shape and int(mask.sum()) == k, name
        assert torch.equal(mask, by_sorting(values, k)), name
        assert kth_largest(values, k) == values.reshape(-1).sort(descending=True).values[k - 1], name


@pytest.mark.parametrize("density", [1e-5, 0.3, 0.99999])
def test_top_k_cut_is_the_stable_sort_definition(density):
    """The cut (greater than ``above``, plus the ``extra`` positions) keeps the set of the definition; without
    ties beyond the count it has no extra positions."""
    for name, values in cases(int(density * 1e5) + 1):
        k = int(density * values.numel())
        above, extra = top_k_cut(values, k)
        keep = values.reshape(-1) > above
        if extra is not None:
            assert bool((extra[1:] > extra[:-1]).all()) and not bool(keep[extra].any()), name
            keep[extra] = True
        assert torch.equal(keep.view(values.shape), by_sorting(values, k)), name
    assert top_k_cut(torch.tensor([1.0, 2.0]), 0) == (float("inf"), None)
    assert top_k_cut(torch.tensor([1.0, 2.0]), 2)[0] == float("-inf")
    above, extra = top_k_cut(torch.tensor([3.0, 1.0, 3.0, 2.0]), 2)   # both 3s: no extra positions
    assert extra is None and 2.0 < above < 3.0


def test_just_below():
    for dtype in (torch.float32, torch.float64):
        for v in (1.0, 0.1, 1e-30, 0.0, 3.4e38 if dtype == torch.float32 else 1e300):
            b = just_below(v, dtype)
            x = torch.tensor(v, dtype=dtype)
            assert torch.tensor(b, dtype=dtype) < x and float(torch.nextafter(torch.tensor(b, dtype=dtype), x)) == float(x)
    assert just_below(float("-inf"), torch.float32) is None
    assert just_below(1.0, torch.bfloat16) is None
    # 0.1 is not a float32: the float32 rounding of it is what a float32 comparison uses
    assert just_below(0.1, torch.float32) == float(torch.nextafter(torch.tensor(0.1), torch.tensor(0.0)))


def test_exact_even_when_the_sample_misses(monkeypatch):
    # a bracket of ±2 sample ranks misses the k-th largest most of the time: the full selection takes over
    monkeypatch.setattr(selection, "_Z", 0.0)
    for seed in range(5):
        for name, values in cases(seed):
            k = int(0.3 * values.numel())
            assert torch.equal(top_k_mask(values, k), by_sorting(values, k)), name


def test_small_inputs_and_edges():
    v = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])
    assert top_k_mask(v, 2).tolist() == [True, False, True, False, False]  # ties: lowest positions first
    assert top_k_mask(v, 0).tolist() == [False] * 5
    assert top_k_mask(v, 5).tolist() == [True] * 5
    assert top_k_mask(v, 7).tolist() == [True] * 5
    assert top_k_mask(v, 4).tolist() == [True, False, True, True, True]
    assert float(kth_largest(v, 4)) == 2.0
    with pytest.raises(ValueError):
        kth_largest(v, 0)


# --- the k-th largest over many tensors, in streaming passes (TIES's global trim) ----------------------
def streamed(chunks: list[torch.Tensor], fraction: float) -> tuple[float, int]:
    s = selection.StreamedKthLargest(fraction)
    passes = 0
    while not s.done:
        for c in chunks:
            s.feed(c)
        s.next_pass()
        passes += 1
    return s.threshold, passes


def brute_force(chunks: list[torch.Tensor], fraction: float) -> float:
    """The definition: the k-th largest of all values together, k = int(fraction · N)."""
    values = torch.cat([c.reshape(-1) for c in chunks])
    n, k = values.numel(), int(fraction * values.numel())
    return float("inf") if k <= 0 else 0.0 if k >= n else float(values.kthvalue(n - k + 1).values)


@pytest.mark.parametrize("dtype,passes", [(torch.float32, 2), (torch.float64, 4), (torch.bfloat16, 1)])
def test_streamed_kth_largest_is_the_global_kthvalue(dtype, passes):
    g = torch.Generator().manual_seed(7)
    for trial in range(24):
        shapes = [tuple(int(x) for x in torch.randint(1, 40, (int(torch.randint(1, 4, (), generator=g)),),
                                                      generator=g)) for _ in range(int(torch.randint(1, 7, (), generator=g)))]
        chunks = [(torch.randn(s, generator=g) * 10.0 ** float(torch.randint(-4, 2, (), generator=g))).abs().to(dtype)
                  for s in shapes]
        if trial % 4 == 0:  # many equal values (bf16 task vectors, zeros of a DARE drop)
            chunks = [c.float().mul(4).round().div(4).to(dtype) for c in chunks]
        if trial % 5 == 0:
            chunks[0].zero_()
        fraction = float(torch.rand((), generator=g)) if trial % 7 else (0.0, 1.0, 1e-9)[trial % 3]
        got, n_passes = streamed(chunks, fraction)
        assert got == brute_force(chunks, fraction), (trial, fraction)
        k, n = int(fraction * sum(c.numel() for c in chunks)), sum(c.numel() for c in chunks)
        assert n_passes == (1 if k <= 0 or k >= n else passes)
