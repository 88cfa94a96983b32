"""Block-sparse-row (BSR) weights: conversion from a dense matrix and block-shape choice."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

# Block shapes the default choice tries, fastest kernels first (row blocks reuse each
# activation row across the block's rows; see TVM_NOTES.md).
DEFAULT_BLOCKS: tuple[tuple[int, int], ...] = ((16, 1), (8, 1), (4, 1), (1, 8), (1, 4), (1, 1))
# A candidate block shape "fits" the mask when at most this share of its stored values is padding.
MIN_FILL = 0.95
# Declared block shapes larger than this many elements are not unrolled; the default is used.
MAX_BLOCK_ELEMENTS = 64


@dataclass(frozen=True)
class BsrWeight:
    """A weight matrix (rows x cols) stored as BSR blocks of `block` = (bs_r, bs_c).

    `indices[p]` is the first column of block p (not its block-column number): a last, partial
    block column is shifted left so that it ends at `cols`, its values shifted with it.
    Rows past `rows` in the last block row are zero padding and are never written out.
    """

    data: np.ndarray  # (nnzb, bs_r, bs_c) float32; one zero block when the matrix is empty
    indices: np.ndarray  # (nnzb,) int32 column starts
    indptr: np.ndarray  # (block_rows + 1,) int32
    rows: int
    cols: int
    block: tuple[int, int]
    nnz_blocks: int

    @property
    def block_rows(self) -> int:
        return len(self.indptr) - 1


def to_bsr(matrix: np.ndarray, block: tuple[int, int]) -> BsrWeight:
    """Convert a dense 2-D float matrix to BSR with the given block shape."""
    rows, cols = matrix.shape
    bs_r, bs_c = block
    if not (1 <= bs_c <= cols):
        raise ValueError(f"block columns {bs_c} must be between 1 and the matrix's {cols} columns")
    n_br = -(-rows // bs_r)
    n_bc = -(-cols // bs_c)
    padded = np.zeros((n_br * bs_r, n_bc * bs_c), dtype=np.float32)
    padded[:rows, :cols] = matrix
    blocks = padded.reshape(n_br, bs_r, n_bc, bs_c).transpose(0, 2, 1, 3)
    nonzero = np.any(blocks != 0, axis=(2, 3))
    block_row, block_col = np.nonzero(nonzero)
    data = np.ascontiguousarray(blocks[block_row, block_col], dtype=np.float32)
    starts = block_col.astype(np.int64) * bs_c
    overhang = starts + bs_c - cols
    for p in np.nonzero(overhang > 0)[0]:
        # The overhanging columns hold padding zeros; rolling moves them to the front.
        data[p] = np.roll(data[p], int(overhang[p]), axis=1)
        starts[p] -= overhang[p]
    indptr = np.zeros(n_br + 1, dtype=np.int32)
    np.cumsum(nonzero.sum(axis=1), out=indptr[1:])
    nnz_blocks = len(data)
    if nnz_blocks == 0:
        data = np.zeros((1, bs_r, bs_c), dtype=np.float32)
        starts = np.zeros(1, dtype=np.int64)
    return BsrWeight(
        data=data,
        indices=starts.astype(np.int32),
        indptr=indptr,
        rows=rows,
        cols=cols,
        block=(bs_r, bs_c),
        nnz_blocks=nnz_blocks,
    )


def bsr_to_dense(weight: BsrWeight) -> np.ndarray:
    """Rebuild the dense matrix (for checks and diagnostics)."""
    bs_r, bs_c = weight.block
    out = np.zeros((weight.block_rows * bs_r, weight.cols), dtype=np.float32)
    for br in range(weight.block_rows):
        for p in range(weight.indptr[br], weight.indptr[br + 1]):
            c0 = int(weight.indices[p])
            out[br * bs_r : (br + 1) * bs_r, c0 : c0 + bs_c] += weight.data[p]
    return out[: weight.rows]


def block_fill(mask: np.ndarray, block: tuple[int, int]) -> float:
    """Share of the stored values that are real nonzeros when `mask` is blocked by `block`."""
    rows, cols = mask.shape
    bs_r, bs_c = block
    n_br, n_bc = -(-rows // bs_r), -(-cols // bs_c)
    padded = np.zeros((n_br * bs_r, n_bc * bs_c), dtype=bool)
    padded[:rows, :cols] = mask != 0
    blocks = padded.reshape(n_br, bs_r, n_bc, bs_c).any(axis=(1, 3))
    stored = int(blocks.sum()) * bs_r * bs_c
    return 1.0 if stored == 0 else float(padded.sum()) / stored


def choose_block(mask: np.ndarray, declared: tuple[int, int] | None) -> tuple[int, int]:
    """The layer's declared block when usable, else the first default block that fits the mask."""
    rows, cols = mask.shape
    if declared is not None:
        bs_r, bs_c = int(declared[0]), int(declared[1])
        if 1 <= bs_r and 1 <= bs_c <= cols and bs_r * bs_c <= MAX_BLOCK_ELEMENTS:
            return (min(bs_r, rows), bs_c)
    for bs_r, bs_c in DEFAULT_BLOCKS:
        if bs_r <= rows and bs_c <= cols and block_fill(mask, (bs_r, bs_c)) >= MIN_FILL:
            return (bs_r, bs_c)
    return (1, 1)


def pack_dense(matrix: np.ndarray, bs_r: int) -> np.ndarray:
    """The dense kernel's weight layout: (rows / bs_r, cols, bs_r), the last row block zero-padded,
    so that each step over k reads bs_r contiguous weights."""
    rows, cols = matrix.shape
    n_br = -(-rows // bs_r)
    padded = np.zeros((n_br * bs_r, cols), dtype=np.float32)
    padded[:rows] = matrix
    return np.ascontiguousarray(padded.reshape(n_br, bs_r, cols).transpose(0, 2, 1))


def full_bsr(matrix: np.ndarray, block: tuple[int, int]) -> BsrWeight:
    """`matrix` in BSR form with every block stored, zero or not (a dense matrix's BSR twin)."""
    pattern = to_bsr(np.ones(matrix.shape, dtype=np.float32), block)
    bs_r, bs_c = block
    padded = np.zeros((pattern.block_rows * bs_r, matrix.shape[1]), dtype=np.float32)
    padded[: matrix.shape[0]] = matrix
    data = np.empty_like(pattern.data)
    for br in range(pattern.block_rows):
        for p in range(pattern.indptr[br], pattern.indptr[br + 1]):
            c0 = int(pattern.indices[p])
            # pattern.data is 0 where a shifted last block overlaps its neighbour.
            data[p] = pattern.data[p] * padded[br * bs_r : (br + 1) * bs_r, c0 : c0 + bs_c]
    return BsrWeight(
        data=data,
        indices=pattern.indices,
        indptr=pattern.indptr,
        rows=pattern.rows,
        cols=pattern.cols,
        block=pattern.block,
        nnz_blocks=pattern.nnz_blocks,
    )


def pad_indptr(indptr: np.ndarray, group: int) -> np.ndarray:
    """`indptr` with its last entry repeated to whole groups of `group` rows (empty rows)."""
    extra = -(len(indptr) - 1) % group
    return np.concatenate([indptr, np.full(extra, indptr[-1], indptr.dtype)]) if extra else indptr


def pad_rows(weight: BsrWeight, multiple: int) -> BsrWeight:
    """`weight` with zero blocks after each block row's last, so that every block row holds a
    whole multiple of `multiple` blocks. A zero block repeats its row's last column start, so
    that it reads x values the row reads anyway."""
    counts = np.diff(weight.indptr)
    extra = -counts % multiple
    if not extra.any():
        return weight
    at = np.repeat(weight.indptr[1:], extra)  # before the next row's first block
    stored = slice(0, weight.nnz_blocks)
    data = np.insert(weight.data[stored], at, 0.0, axis=0)
    indices = np.insert(weight.indices[stored], at, weight.indices[at - 1])
    indptr = np.zeros_like(weight.indptr)
    np.cumsum(counts + extra, out=indptr[1:])
    return replace(weight, data=data, indices=indices, indptr=indptr, nnz_blocks=len(data))


def lockstep_rows(weight: BsrWeight, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`weight`'s blocks as the lockstep matrix-vector kernel reads them
    (`compile.kernels.bsr_matvec_lockstep_cpu`): block rows sorted by their block count, most
    first, in groups of `group`; each row padded with zero blocks to its group's longest; a
    group's blocks stored step by step (block s of the group's row j at the group's start +
    s * group + j). A zero block repeats its row's last column start (0 in an empty row).
    Returns (data, indices, pointers): the groups' starts (groups + 1 entries), then each
    group's block rows in slot order (-1 past the last)."""
    counts = np.diff(weight.indptr)
    n_groups = -(-weight.block_rows // group)
    order = np.argsort(-counts, kind="stable")
    rows = np.full(n_groups * group, -1, np.int32)
    rows[: len(order)] = order
    steps = np.zeros(n_groups * group, np.int64)
    steps[: len(order)] = counts[order]
    steps = steps.reshape(n_groups, group).max(axis=1)
    starts = np.zeros(n_groups + 1, np.int32)
    np.cumsum(steps * group, out=starts[1:])
    data = np.zeros((int(starts[-1]), *weight.data.shape[1:]), weight.data.dtype)
    indices = np.zeros(int(starts[-1]), weight.indices.dtype)
    for slot, row in enumerate(order):
        g, j = divmod(slot, group)
        lo, hi = weight.indptr[row], weight.indptr[row + 1]
        at = starts[g] + j + group * np.arange(steps[g])
        data[at[: hi - lo]] = weight.data[lo:hi]
        indices[at[: hi - lo]] = weight.indices[lo:hi]
        indices[at[hi - lo :]] = weight.indices[hi - 1] if hi > lo else 0
    return data, indices, np.concatenate([starts, rows])
