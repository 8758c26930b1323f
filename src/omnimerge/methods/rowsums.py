"""Sums over a whole tensor that come out bit for bit the same whether the tensor is summed at once or a
row block at a time (run.blocks), whatever the block size, the thread count or the device.

A float sum depends on the order of its additions, and torch's reductions choose their order from the
shape they are given and the number of threads. The sums here fix the order instead:

* the tensor is cut into **rows along its last dimension** (``x.reshape(-1, x.shape[-1])``; a 0-d or
  1-D tensor is one row). A row block of the first dimension always holds whole such rows;
* each row is summed in **float64** by a fixed pairwise tree: the row is padded with zeros to a
  power-of-two width, then halved (``left + right``, an element-wise addition) until one column is
  left. Element-wise additions give the same bits whatever the shape or the threads;
* the tensor's total is the same tree over its row sums, in row order.

Products of two float32 values are exact in float64, so a dot product or a squared norm of float32
tensors rounds only in the tree. Row sums are computed ``CHUNK`` elements at a time (whole rows), so
the float64 temporaries stay small. :class:`RowSums` gathers the row sums of a tensor fed in row blocks
(the pre-pass of a method's per-tensor reduction, see ``registry.Reduction.when_blocked``).
"""

from __future__ import annotations

import torch

CHUNK = 1 << 20  # elements (whole rows) summed at a time


def rows_of(x: torch.Tensor) -> torch.Tensor:
    """``x`` as rows along its last dimension (a 0-d or 1-D tensor: one row)."""
    return x.reshape(1, -1) if x.ndim <= 1 else x.reshape(-1, x.shape[-1])


def tree_sums(rows: torch.Tensor) -> torch.Tensor:
    """The sum of each row of the 2-D ``rows`` in float64, by the fixed pairwise tree (see the module doc)."""
    x = rows.to(torch.float64)
    width = x.shape[1]
    if width == 0:
        return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    full = 1 << (width - 1).bit_length()
    if full != width:
        x = torch.nn.functional.pad(x, (0, full - width))
    while x.shape[1] > 1:
        half = x.shape[1] // 2
        x = x[:, :half] + x[:, half:]
    return x[:, 0]


def _chunked_row_sums(fn, *tensors: torch.Tensor) -> torch.Tensor:
    """The float64 row sums of ``fn`` of the tensors' float64 rows, taken ``CHUNK`` elements (whole rows) at a time."""
    rows = [rows_of(t) for t in tensors]
    per = max(1, CHUNK // max(rows[0].shape[1], 1))
    out = [tree_sums(fn(*(c.to(torch.float64) for c in chunk))) for chunk in zip(*(r.split(per) for r in rows))]
    return torch.cat(out) if len(out) != 1 else out[0]


def row_sums(x: torch.Tensor, fn=None) -> torch.Tensor:
    """The float64 sum of each row of ``fn(x)`` (default: ``x`` itself); ``fn`` is applied to float64
    chunks of whole rows, so that e.g. ``abs`` or a square costs a chunk, not a tensor."""
    return _chunked_row_sums(fn or (lambda c: c), x)


def dot_row_sums(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The float64 row sums of ``a · b`` (element-wise products, exact in float64 for float32 inputs)."""
    return _chunked_row_sums(torch.mul, a, b)


def total(sums: torch.Tensor) -> float:
    """The total of row sums (a 1-D float64 tensor, in row order), by the same tree."""
    if sums.numel() == 0:
        return 0.0
    return float(tree_sums(sums.reshape(1, -1))[0])


def tensor_sum(x: torch.Tensor, fn=None) -> float:
    """The block-independent sum of ``fn(x)`` over the whole tensor (see the module doc)."""
    return total(row_sums(x, fn))


def first_row(x: torch.Tensor, offset: int) -> int:
    """The index, among the rows along the last dimension, of the first row of the block of ``x`` that starts
    at flat index ``offset`` of its tensor."""
    return 0 if x.ndim <= 1 else offset // max(x.shape[-1], 1)


class RowSums:
    """Named row sums of one tensor, gathered block by block (in any order) and put in row order by ``done``."""

    def __init__(self):
        self.parts: dict[str, dict[int, torch.Tensor]] = {}

    def add(self, name: str, row: int, sums: torch.Tensor) -> None:
        """The row sums of rows ``row ..`` of the tensor for quantity ``name``."""
        self.parts.setdefault(name, {})[row] = sums.cpu()

    def rows(self, name: str) -> torch.Tensor:
        """Every row's sum of ``name``, in row order."""
        part = self.parts.get(name, {})
        return torch.cat([part[r] for r in sorted(part)]) if part else torch.zeros(0, dtype=torch.float64)

    def total(self, name: str) -> float:
        return total(self.rows(name))
