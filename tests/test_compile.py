"""compile: BSR conversion, our sparse kernels and whole-model builds, all against torch/numpy."""

from __future__ import annotations

import json
import os
import random
import re
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
import tvm
from helpers import LocalProfile, host_profile
from torch import nn
from tvm import relax

import compile as hw_compile
from compile._build import worst_layer
from compile.bsr import (
    BsrWeight,
    block_fill,
    bsr_to_dense,
    choose_block,
    lockstep_rows,
    pack_dense,
    pad_rows,
    to_bsr,
)
from compile.choose import CALL_MS, KernelCandidate, KernelChooser
from compile.kernels import (
    BUILD_CONFIG,
    K_BLOCK,
    TILE_MAJOR_X_BYTES,
    ConvGeometry,
    Kernel,
    KernelSpec,
    choose_tiling,
    direct_tile,
    expand_group,
    im2col_row,
    padded_plane,
    phase_shape,
    sparse_matmul_kernel,
    takes_by_column,
    takes_columns,
)
from compile.layers import layer_output, run_layer_calls
from compile.objects import build_kernels, load_kernel, prune
from compile.rewrite import (
    LayerSite,
    RewritePlan,
    _bsr_arguments,
    _dense_candidate,
    _sparse_candidate,
    deploy_copy,
    fold_batchnorm,
)

HOST = host_profile()


def _mask(shape, sparsity: float, block: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """A 0/1 mask of `shape` whose zeros come in (rows x cols) blocks of the weight matrix."""
    rows, cols = shape[0], int(np.prod(shape[1:]))
    br, bc = block
    keep = torch.rand(-(-rows // br), -(-cols // bc), generator=gen) >= sparsity
    full = keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]
    return full.float().reshape(shape)


class MaskedConv2d(nn.Conv2d):
    """Stand-in for search_spaces.ops.SparseConv2d: a mask buffer, forward on weight * mask."""

    def __init__(self, *args, sparsity=0.9, block=None, seed=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.block = block
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("mask", _mask(self.weight.shape, sparsity, block or (1, 1), gen))

    def forward(self, x):
        return self._conv_forward(x, self.weight * self.mask, self.bias)


class MaskedLinear(nn.Linear):
    """Stand-in for search_spaces.ops.SparseLinear."""

    def __init__(self, *args, sparsity=0.9, block=None, seed=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.block = block
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("mask", _mask(self.weight.shape, sparsity, block or (1, 1), gen))

    def forward(self, x):
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


# ---------------------------------------------------------------- BSR and block choice


@pytest.mark.parametrize("block", [(1, 1), (4, 1), (16, 1), (1, 4), (1, 8), (4, 4)])
def test_bsr_round_trip_on_odd_shapes(block):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((53, 37)).astype(np.float32)
    w[rng.random(w.shape) < 0.8] = 0
    w[8:24] = 0  # empty block rows
    bsr = to_bsr(w, block)
    assert np.array_equal(bsr_to_dense(bsr), w)
    assert bsr.indices.max() + block[1] <= 37  # partial last block column shifted in range
    assert bsr.indptr[-1] == bsr.nnz_blocks


def test_bsr_of_all_zero_matrix_has_no_blocks():
    bsr = to_bsr(np.zeros((5, 7), np.float32), (4, 1))
    assert bsr.nnz_blocks == 0 and not bsr.indptr.any()
    assert not bsr_to_dense(bsr).any()


def test_pad_rows_adds_zero_blocks_to_whole_multiples():
    w = np.zeros((12, 16), np.float32)
    w[0, [1, 5, 9]] = 1.0  # three blocks of 4x1 in block row 0, none in row 1, one in row 2
    w[8, 14] = 2.0
    bsr = to_bsr(w, (4, 1))
    padded = pad_rows(bsr, 2)
    np.testing.assert_array_equal(padded.indptr, [0, 4, 4, 6])
    np.testing.assert_array_equal(padded.indices, [1, 5, 9, 9, 14, 14])  # the last repeated
    assert padded.nnz_blocks == 6 and not padded.data[[3, 5]].any()
    np.testing.assert_array_equal(bsr_to_dense(padded), w)
    assert pad_rows(padded, 2) is padded
    empty = to_bsr(np.zeros((12, 16), np.float32), (4, 1))
    assert pad_rows(empty, 4) is empty


def test_lockstep_rows_sorts_pads_and_interleaves_block_rows():
    """Block rows in groups of 2, sorted by block count: rows 2 (3 blocks) and 0 (2), then
    row 3 (1) and row 1 (none), each padded to its group's longest with zero blocks that
    repeat the row's last column start, stored step by step; then the rows of each slot."""
    w = np.zeros((16, 16), np.float32)
    w[0:4, [3, 7]] = 1.0
    w[8:12, [1, 2, 9]] = 2.0
    w[12:16, 5] = 3.0
    data, indices, pointers = lockstep_rows(to_bsr(w, (4, 1)), 2)
    np.testing.assert_array_equal(pointers, [0, 6, 8, 2, 0, 3, 1])
    np.testing.assert_array_equal(indices, [1, 3, 2, 7, 9, 7, 5, 0])
    np.testing.assert_array_equal(data[:, 0, 0], [2, 1, 2, 1, 2, 0, 3, 0])
    three = lockstep_rows(to_bsr(w, (4, 1)), 3)[2]
    np.testing.assert_array_equal(three, [0, 9, 9, 2, 0, 3, 1, -1, -1])  # a slot past W's rows


def test_choose_block_prefers_declared_then_a_fitting_default():
    gen = torch.Generator().manual_seed(0)
    mask = _mask((64, 32), 0.7, (4, 1), gen).numpy()
    assert choose_block(mask, (1, 8)) == (1, 8)
    assert choose_block(mask, None) == (4, 1)
    assert block_fill(mask, (4, 1)) == 1.0
    unstructured = (np.random.default_rng(0).random((64, 32)) > 0.7).astype(np.float32)
    assert choose_block(unstructured, None) == (1, 1)


# ---------------------------------------------------------------- kernels alone


def _run_kernel(w, x, bias, block, activation, avx512=True):
    bsr = to_bsr(w, block)
    batch, k, m = x.shape
    spec = KernelSpec(batch, w.shape[0], k, m, bsr.block, bsr.block_rows, activation)
    # The arrays as a build passes them (uint16 indices for bsr_matvec, m == 1).
    spec, consts = _bsr_arguments(spec, bsr, bias, "x86")
    kernel = sparse_matmul_kernel(spec, "x86", num_cores=2, avx512=avx512)
    return _call_kernel(kernel, (x, *consts), (batch, w.shape[0], m))


def _call_kernel(func, inputs, out_shape) -> np.ndarray:
    """Build kernel `func` for this host and run it on `inputs`; its output (NaN where it
    wrote nothing)."""
    lib = tvm.compile(func, target=HOST.target)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs]
    out = tvm.runtime.tensor(np.full(out_shape, np.nan, np.float32), dev)
    lib[str(func.attrs["global_symbol"])](*args, out)
    return out.numpy()


@pytest.mark.parametrize(
    ("block", "sparsity", "batch", "m", "activation"),
    [
        ((1, 1), 0.0, 1, 49, "none"),
        ((1, 1), 0.99, 3, 49, "relu"),
        ((4, 1), 0.5, 1, 49, "relu6"),
        ((4, 1), 0.99, 3, 1, "none"),
        ((8, 1), 0.9, 1, 200, "none"),
        ((16, 1), 0.0, 3, 7, "relu"),
        ((16, 1), 0.9, 1, 49, "none"),
        ((1, 4), 0.7, 3, 49, "none"),
        ((1, 8), 0.9, 1, 130, "relu"),
        ((1, 8), 1.0, 1, 49, "none"),
        ((16, 1), 0.5, 2, 1, "relu6"),  # matrix-vector: whole block rows, then a part
        ((1, 4), 0.9, 1, 1, "relu"),
        # 1 x c blocks at M == 1: c rows' sums as one vector, 53 rows end in a partial group
        ((1, 4), 0.7, 3, 1, "relu6"),
        ((1, 8), 0.9, 2, 1, "none"),
        ((1, 2), 0.5, 1, 1, "relu"),
        ((1, 16), 0.6, 2, 1, "none"),  # 16 rows of 16 lanes summed (`_row_sums`), 3 + 5 rows
        ((1, 3), 0.5, 1, 1, "relu"),  # 3 rows: summed lane by lane
        # blocks smaller than a vector at M == 1: several to a vector, then the rest alone
        ((4, 1), 0.5, 1, 1, "none"),
        ((1, 1), 0.7, 2, 1, "relu"),
        ((2, 1), 0.6, 1, 1, "relu6"),
        # tile rows of whole vectors and a rest: 24 + 12 (8 + 4), 24 + 6, 16 + 4, 49 (6 x 8 + 1)
        ((4, 1), 0.8, 1, 36, "relu"),
        ((16, 1), 0.7, 2, 30, "none"),
        ((4, 1), 0.6, 1, 20, "relu6"),
        ((1, 4), 0.6, 1, 49, "relu"),
        # M narrower than a tile: copies of the accumulators, by block column (1 x c blocks,
        # c a multiple of the copies) or by block, with the blocks left over in copy 0
        ((1, 4), 0.7, 2, 4, "relu"),
        ((1, 4), 0.8, 1, 16, "none"),
        ((1, 8), 0.7, 1, 2, "relu"),
        ((4, 1), 0.6, 1, 3, "none"),
        ((2, 2), 0.5, 2, 4, "relu6"),
    ],
)
def test_kernel_matches_numpy(block, sparsity, batch, m, activation):
    _check_kernel(block, sparsity, batch, m, activation)


def _check_kernel(block, sparsity, batch, m, activation, avx512=True):
    """Our sparse kernel on a 53 x 37 W (block rows 16..31 empty) against numpy."""
    rng = np.random.default_rng(2)
    gen = torch.Generator().manual_seed(3)
    w = rng.standard_normal((53, 37)).astype(np.float32)
    w *= _mask(w.shape, sparsity, block, gen).numpy()
    w[16:32] = 0
    x = rng.standard_normal((batch, 37, m)).astype(np.float32)
    bias = rng.standard_normal(53).astype(np.float32)
    want = np.einsum("nk,bkm->bnm", w, x) + bias[None, :, None]
    want = {"none": want, "relu": np.maximum(want, 0), "relu6": np.clip(want, 0, 6)}[activation]
    got = _run_kernel(w, x, bias, block, activation, avx512)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize(("cols", "narrow"), [(65536, True), (65537, False)])
def test_matvec_block_indices_as_uint16_while_they_fit(cols, narrow):
    """At M == 1 the kernel reads its block indices as uint16 as long as every column start
    fits one; a Linear with more inputs keeps int32 indices. Blocks at the last columns and
    at the first, two to an AVX2 vector."""
    rng = np.random.default_rng(5)
    w = np.zeros((6, cols), np.float32)
    for c in (0, 3, 1000, 40000, cols - 2, cols - 1):
        w[:4, c] = rng.standard_normal(4)
        w[4:, cols - 1 - c] = rng.standard_normal(2)
    x = rng.standard_normal((1, cols, 1)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    site = LayerSite(1, 1, "none", "x86", 2, False)
    cand = _sparse_candidate(w, to_bsr(w, (4, 1)), bias, site)
    assert cand.spec.narrow_indices is narrow
    assert cand.constants[1].dtype == (np.uint16 if narrow else np.int32)
    assert int(cand.constants[1].max()) == cols - 1
    got = _call_kernel(cand.kernel.func(), (x, *cand.constants), (1, 6, 1))
    want = (w.astype(np.float64) @ x[0].astype(np.float64))[:, 0] + bias
    np.testing.assert_allclose(got[0, :, 0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize(
    ("block", "batch", "activation", "residual"),
    [
        ((4, 1), 1, "relu", "after"),  # 14 block rows: 2 groups of 8, two slots empty
        ((4, 1), 2, "relu6", "first"),
        ((16, 1), 1, "none", "after"),  # one block to a vector, 4 rows a group
        ((1, 1), 3, "relu", False),  # eight to a vector, 32 rows a group
        ((1, 4), 1, "relu6", "after"),  # a slot's 4 lanes summed, 4 slots at a time
        ((1, 8), 2, "none", "first"),  # one block to a vector, lane by lane
        ((1, 3), 1, "relu", False),  # three lanes a slot, summed lane by lane
    ],
)
def test_lockstep_matvec_kernel_matches_numpy(block, batch, activation, residual):
    """At M == 1 a sparse W in r x 1 or 1 x c blocks is walked in groups of block rows, in
    lockstep (`bsr_matvec_lockstep_cpu`): 53 x 300 with empty block rows and rows of every
    length up to all blocks, the last block row overhanging, a residual after or before the
    activation."""
    rng = np.random.default_rng(9)
    w = rng.standard_normal((53, 300)).astype(np.float32)
    w *= rng.random((53, 1)) ** 3 > rng.random((1, 300))  # row densities from 0 to 1
    w[16:32] = 0
    x = rng.standard_normal((batch, 300, 1)).astype(np.float32)
    r = rng.standard_normal((batch, 53, 1)).astype(np.float32)
    bias = rng.standard_normal(53).astype(np.float32)
    site = LayerSite(
        batch, 1, activation, "x86", 2, False, (None, None, bool(residual)), 0, residual == "first"
    )
    cand = _sparse_candidate(w, to_bsr(w, block), bias, site)
    assert cand.spec.lockstep and cand.spec.narrow_indices
    inputs = [x, *cand.constants] + ([r] if residual else [])
    got = _call_kernel(cand.kernel.func(), inputs, (batch, 53, 1))
    want = np.einsum("nk,bkm->bnm", w, x) + bias[None, :, None]
    if residual == "first":
        want = want + r
    want = {"none": want, "relu": np.maximum(want, 0), "relu6": np.clip(want, 0, 6)}[activation]
    if residual == "after":
        want = want + r
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize(("keep", "chains"), [(0.01, 1), (0.04, 2), (0.2, 4)])
def test_matvec_rows_get_fma_chains_for_their_length(keep, chains):
    """At M == 1 a row's vectors of 2x2 blocks (2 to an AVX2 vector) go to up to 4 FMA
    chains, fewer when the rows are short: 100 block columns with about 4 blocks a row take
    1 chain, 15 take 2, 59 take 4."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((29, 200)).astype(np.float32)
    w *= rng.random(w.shape) < keep
    bias = rng.standard_normal(29).astype(np.float32)
    cand = _sparse_candidate(w, to_bsr(w, (2, 2)), bias, LayerSite(1, 1, "none", "x86", 2, False))
    assert not cand.spec.lockstep and cand.spec.chains == chains
    x = rng.standard_normal((1, 200, 1)).astype(np.float32)
    got = _call_kernel(cand.kernel.func(), (x, *cand.constants), (1, 29, 1))
    want = w @ x[0, :, 0] + bias
    np.testing.assert_allclose(got[0, :, 0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize(
    ("block", "whole", "pointers"), [((2, 2), True, 28), ((1, 16), False, 65)]
)
def test_matvec_rows_come_padded_to_whole_vectors_and_groups(block, whole, pointers):
    """At M == 1 the row-by-row kernel (for blocks the lockstep kernel does not take) takes
    2x2 blocks two to an AVX2 vector, and 1x16 rows sixteen to a work item. The build pads
    each row with zero blocks to whole vectors, or `indptr` to whole groups of rows; the
    kernel reads neither a single block nor a row start past W's rows, and refuses an
    `indptr` that is not padded."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((53, 37)).astype(np.float32)
    w[:, 8:] *= rng.random((53, 29)) > 0.7
    bsr = to_bsr(w, block)
    cand = _sparse_candidate(
        w, bsr, np.zeros(53, np.float32), LayerSite(1, 1, "none", "x86", 2, False)
    )
    assert not cand.spec.lockstep and cand.spec.whole_vectors is whole
    data, indices, indptr = cand.constants[:3]
    rows = bsr.block_rows
    assert len(indptr) == pointers and np.all(indptr[rows:] == indptr[rows])
    if whole:  # rows with an odd number of blocks, padded
        assert np.any(np.diff(bsr.indptr) % 2) and np.all(np.diff(indptr) % 2 == 0)
    assert len(data) == indptr[-1]
    padded = BsrWeight(
        data, indices.astype(np.int32), indptr[: rows + 1], 53, 37, block, len(data)
    )
    np.testing.assert_array_equal(bsr_to_dense(padded), w)
    x = rng.standard_normal((1, 37, 1)).astype(np.float32)
    got = _call_kernel(cand.kernel.func(), (x, *cand.constants), (1, 53, 1))
    np.testing.assert_allclose(got[0], w @ x[0], rtol=1e-4, atol=1e-4)
    if not whole:
        unpadded = [*cand.constants[:2], bsr.indptr, *cand.constants[3:]]
        with pytest.raises(Exception, match="whole groups of rows"):
            _call_kernel(cand.kernel.func(), (x, *unpadded), (1, 53, 1))


@pytest.mark.parametrize(
    ("block", "sparsity", "batch", "m", "avx512"),
    [
        ((16, 1), 0.7, 2, 2, False),  # 53 rows: the last block row overhangs
        ((8, 1), 0.9, 1, 5, False),
        ((16, 1), 0.0, 1, 3, False),  # two copies of each column's sums, a block left over
        ((32, 1), 0.5, 3, 2, False),
        ((16, 1), 0.8, 1, 4, True),
    ],
)
def test_columns_kernel_matches_numpy(block, sparsity, batch, m, avx512):
    """A few columns with r x 1 blocks at least a vector tall: `bsr_matvec_columns_cpu`."""
    spec = KernelSpec(batch, 53, 37, m, block, -(-53 // block[0]))
    assert takes_columns(spec, "x86", avx512)
    _check_kernel(block, sparsity, batch, m, "relu6", avx512)


@pytest.mark.parametrize(
    ("block", "sparsity", "batch", "hw", "activation", "residual"),
    [
        ((1, 4), 0.3, 2, (7, 7), "relu6", False),  # K = 37: the last column block overhangs
        ((1, 8), 0.0, 1, (5, 6), "none", False),  # M = 30: a 16-wide tile and a 14-wide rest
        ((1, 4), 0.5, 1, (14, 14), "relu", "after"),  # 4-D tensors, a residual, two cores
        ((1, 4), 0.5, 2, (7, 7), "relu6", "first"),  # the residual added before the ReLU6
    ],
)
def test_by_column_kernel_matches_numpy(block, sparsity, batch, hw, activation, residual):
    """1 x c blocks walked by column block (`bsc_matmul_cpu`) on a 53 x 37 W with empty rows
    and an empty column block, the layer's conv tensors as they are, a residual added after
    or before the activation."""
    rng = np.random.default_rng(4)
    gen = torch.Generator().manual_seed(5)
    w = rng.standard_normal((53, 37)).astype(np.float32)
    w *= _mask(w.shape, sparsity, block, gen).numpy()
    w[16:32] = 0
    w[:, 8:16] = 0
    m = hw[0] * hw[1]
    x = rng.standard_normal((batch, 37, *hw)).astype(np.float32)
    r = rng.standard_normal((batch, 53, *hw)).astype(np.float32)
    bias = rng.standard_normal(53).astype(np.float32)
    maps = (hw, hw, bool(residual))
    site = LayerSite(
        batch, m, activation, "x86", 2, False, maps, residual_first=residual == "first"
    )
    cand = _sparse_candidate(w, to_bsr(w, block), bias, site)
    assert cand.spec.by_column
    inputs = [x, *cand.constants] + ([r] if residual else [])
    out = _call_kernel(cand.kernel.func(), inputs, (batch, 53, *hw))
    want = np.einsum("nk,bkm->bnm", w, x.reshape(batch, 37, m)) + bias[None, :, None]
    if residual == "first":
        want = want + r.reshape(batch, 53, m)
    want = {"none": want, "relu": np.maximum(want, 0), "relu6": np.clip(want, 0, 6)}[activation]
    if residual == "after":
        want = want + r.reshape(batch, 53, m)
    got = out.reshape(batch, 53, m)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _llvm_ir(kernel: Kernel) -> str:
    """The LLVM IR of one kernel, compiled for this host as a build compiles it."""
    return build_kernels({kernel: "kernel"}, HOST.target).mod.inspect_source("ll")


@pytest.mark.parametrize(
    ("avx512", "vector"), [(False, "<8 x float>], align 32"), (True, "<16 x float>], align 64")]
)
def test_by_column_scratch_is_aligned_to_a_vector(avx512, vector):
    """The by-column kernel's N x tile scratch lives on the stack and is read and written in
    whole vectors. TVM aligns a float32 stack buffer to 16 bytes at most, and in processes
    whose stack began 16 bytes off a vector boundary, half of those accesses straddled two
    cache lines (1.2x slower). The scratch is allocated as vectors, which LLVM aligns."""
    rng = np.random.default_rng(8)
    w = rng.standard_normal((53, 37)).astype(np.float32) * (rng.random((53, 37)) > 0.2)
    site = LayerSite(1, 64, "none", "x86", 1, avx512)
    cand = _sparse_candidate(w, to_bsr(w, (1, 4)), np.zeros(53, np.float32), site)
    assert cand.spec.by_column
    # 53 rows x 2 vectors of the M tile
    assert f"alloca [106 x {vector}" in _llvm_ir(cand.kernel)


@pytest.mark.parametrize(
    "kernel",
    [
        Kernel("sparse", "x86", KernelSpec(1, 64, 32, 1, (4, 1), 16)),  # matrix-vector
        Kernel("sparse", "x86", KernelSpec(1, 64, 32, 196, (1, 4), 64)),  # M-vectorized
        Kernel("dense", "x86", KernelSpec(1, 64, 32, 3, (1, 1), 64)),
        Kernel("depthwise", "x86", ConvGeometry(1, 8, 9, 9, (3, 3), (1, 1), (1, 1), 9, 9)),
    ],
    ids=["matvec", "matmul", "dense", "depthwise"],
)
def test_kernel_buffers_reach_llvm_as_noalias(kernel):
    """Our kernels tell TVM that their buffers never overlap, in the attribute TVM 0.27 reads
    ("tirx.noalias"; up to KERNEL_VERSION 32 they said "tir.noalias", which it ignores): its
    LLVM codegen then gives the body a function of its own with `noalias` pointers."""
    body = [
        line
        for line in _llvm_ir(kernel).splitlines()
        if line.startswith("define") and "_compute_(" in line
    ]
    assert len(body) == 1 and "ptr noalias" in body[0]


_AVX512 = {"kind": "llvm", "mcpu": "skylake-avx512"}
_NEON = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}


def _skip_check_kernels(family: str, avx512: bool) -> list[Kernel]:
    """One kernel of each kind a build makes, at 32x32 (the dense one's rows padded off 4 KB)."""
    hw = (32, 32)
    spec = KernelSpec(1, 0, 0, 1024, (4, 1), 0, "relu6", in_hw=hw, out_hw=hw)
    geometry = ConvGeometry(1, 0, 32, 32, (3, 3), (1, 1), (1, 1), 32, 32)
    expand = replace(spec, block=(1, 1))
    return [
        Kernel("sparse", family, spec, avx512=avx512),
        Kernel("sparse", family, replace(spec, block=(16, 1), residual=True), avx512=avx512),
        Kernel(
            "sparse", family, replace(spec, rows=32, block=(1, 4), by_column=True), avx512=avx512
        ),
        Kernel("dense", family, replace(spec, in_hw=None, x_row=1040), avx512=avx512),
        Kernel(
            "sparse",
            family,
            KernelSpec(1, 0, 0, 1, (1, 8), 0, narrow_indices=True, chains=1),
            avx512=avx512,
        ),
        Kernel("depthwise", family, geometry, "relu6", avx512=avx512),
        Kernel("depthwise", family, geometry, "relu6", avx512=avx512, expand=expand),
        Kernel("im2col", family, geometry, avx512=avx512),
        Kernel("pad", family, geometry, avx512=avx512),
        Kernel("pad", family, replace(geometry, stride=(2, 2), out_height=16, out_width=16)),
        Kernel(
            "sparse",
            family,
            replace(spec, in_hw=None, x_row=34 * 34, direct=(9, 32, 34)),
            avx512=avx512,
        ),
    ]


@pytest.mark.parametrize(
    ("family", "target", "avx512"),
    [("x86", None, False), ("x86", _AVX512, True), ("arm", _NEON, False)],
    ids=["host", "avx512", "neon"],
)
def test_skipped_passes_change_no_kernel(family, target, avx512):
    """The lowering passes a kernel build skips (`SKIPPED_CPU_PASSES`, to build faster) leave
    every kind of kernel's assembly as it is, byte for byte, on each CPU target family."""
    target = HOST.target if target is None else tvm.target.Target(target)
    for kernel in _skip_check_kernels(family, avx512):
        funcs = tvm.IRModule({"kernel": kernel.func().with_attr("global_symbol", "kernel")})
        with tvm.transform.PassContext(config=BUILD_CONFIG):
            full = tvm.compile(funcs, target=target).mod.inspect_source("asm")
        skipped = build_kernels({kernel: "kernel"}, target).mod.inspect_source("asm")
        assert skipped == full, kernel


def test_kernels_declare_no_variable_for_a_constant():
    """A Python value assigned in a kernel's TVMScript body is declared a TIR variable: X's
    view as a tuple there made X's row length a variable, and the sparse kernel on 1x1 convs
    1.2-1.5x slower (session 24 to 25). Only `_each_channel`'s `size` is one, measured."""
    lockstep = KernelSpec(1, 0, 0, 1, (4, 1), 0, "relu", narrow_indices=True, lockstep=True)
    conv = KernelSpec(1, 0, 0, 196, (1, 4), 0, "none", in_hw=(14, 14), out_hw=(14, 14))
    kernels = [*_skip_check_kernels("x86", False), Kernel("sparse", "x86", lockstep)]
    kernels += [Kernel(op, "x86", conv) for op in ("sparse", "dense")]
    constant = re.compile(r"^\s*(\w+): T\.int(?:32|64) = -?\d+$", re.MULTILINE)
    for kernel in kernels:
        names = set(constant.findall(kernel.func().script()))
        assert names <= ({"size"} if kernel.op in ("depthwise", "im2col") else set()), kernel


def test_a_kernel_is_parsed_on_a_shallow_stack(monkeypatch):
    """TVM's `T.prim_func` calls `inspect.stack()`, which reads the source of every frame on
    the stack (25-90 ms a call 40 frames deep under `python -m`); our kernels are parsed on a
    thread of their own, so the stack it reads is a few frames deep wherever the build was
    called."""
    import inspect

    from compile import kernels

    depths = []

    def stack(*args, **kwargs):
        frames = stack.wrapped(*args, **kwargs)
        depths.append(len(frames))
        return frames

    stack.wrapped = inspect.stack
    monkeypatch.setattr(inspect, "stack", stack)

    def deep(n: int):
        if n:
            return deep(n - 1)
        return kernels._parse_on_a_thread(
            Kernel("sparse", "x86", KernelSpec(1, 24, 40, 7, (4, 1), 6))
        )

    deep(200)
    assert depths and max(depths) < 100, depths


def test_by_column_rule():
    """1 x 4 and 1 x 8 blocks at M > 1 with at least c blocks a column block on average."""
    spec = KernelSpec(1, 64, 96, 196, (1, 4), 64)
    assert takes_by_column(spec, 4 * 24, "x86", False)
    assert not takes_by_column(spec, 4 * 24 - 1, "x86", False)  # too few blocks
    assert not takes_by_column(replace(spec, m=4), 96, "x86", False)  # M under a vector
    assert not takes_by_column(replace(spec, block=(1, 2)), 4 * 48, "x86", False)
    assert not takes_by_column(replace(spec, block=(4, 1)), 4 * 24, "x86", False)
    assert not takes_by_column(spec, 4 * 24, "cuda")
    assert not takes_by_column(replace(spec, rows=4096), 4096 * 24, "x86", False)  # scratch
    assert takes_by_column(replace(spec, block=(1, 8)), 8 * 12, "arm")


def test_kernel_macros_find_their_parser_without_reading_source_lines(monkeypatch):
    """Our kernels' macros find the TVMScript parser by walking the frames alone
    (`kernels._find_parser`), not through `inspect.getouterframes`, which reads the source
    lines of the whole stack at every macro call (80-90% of the time to make a kernel; TVM's
    `T.prim_func` still calls it, on a stack of its own)."""
    import inspect

    from tvm.script.parser.core.parser import ScriptMacro

    from compile import kernels

    calls = {"getouterframes": 0, "macro": 0}

    def counted(name, wrapped):
        def call(*args, **kwargs):
            calls[name] += 1
            return wrapped(*args, **kwargs)

        return call

    monkeypatch.setattr(
        inspect, "getouterframes", counted("getouterframes", inspect.getouterframes)
    )
    monkeypatch.setattr(ScriptMacro, "__call__", counted("macro", ScriptMacro.__call__))
    spec = KernelSpec(1, 24, 40, 7, (4, 1), 6, "relu6")
    func = kernels._parse_on_a_thread(Kernel("sparse", "x86", spec))
    assert "T.float32(6" in func.script()
    assert calls["macro"] >= 10 and calls["getouterframes"] <= 2, calls


# ---------------------------------------------------------------- whole builds


def _check_build(model, x, expect_sparse, expect_dense, kernel_choice="sparse"):
    model.eval()
    compiled = hw_compile.build(model, x, HOST, kernel_choice=kernel_choice)
    assert compiled.sparse_layers == expect_sparse
    assert compiled.dense_layers == expect_dense
    with torch.no_grad():
        want = model(x).numpy()
    got = compiled.run(x.numpy())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    return compiled


@pytest.mark.parametrize(
    ("sparsity", "batch", "block"),
    [(0.0, 1, None), (0.5, 3, (4, 1)), (0.99, 1, (16, 1)), (0.9, 3, (1, 4))],
)
def test_sparse_1x1_conv_matches_torch(sparsity, batch, block):
    torch.manual_seed(0)
    model = nn.Sequential(MaskedConv2d(37, 53, 1, sparsity=sparsity, block=block), nn.ReLU())
    x = torch.randn(batch, 37, 7, 7)
    if sparsity == 0.0:  # all-ones mask: stays dense
        compiled = _check_build(model, x, [], ["0"])
        assert compiled.dense_reasons == {"0": "mask is all ones"}
    else:
        compiled = _check_build(model, x, ["0"], [])
        info = compiled.kernels["0"]
        assert info["activation"] == "relu" and info["fused_bias"]
        assert tuple(info["block"]) == block
        # 1x4 at 90% on 53 rows: about 5 blocks a column block, walked by column block
        assert info.get("by_column", False) == (block == (1, 4))


@pytest.mark.parametrize("batch", [1, 2])
def test_channel_pruned_conv_is_rebuilt_as_a_smaller_dense_layer(batch):
    """Whole output channels pruned (rows of W): the dense kernel runs on the kept rows only;
    a pruned channel's output is its (BatchNorm-folded) bias through ReLU6, plus the residual."""
    torch.manual_seed(8)
    conv = MaskedConv2d(24, 24, 1, sparsity=0.7, block=(1, 24), bias=False)
    bn = nn.BatchNorm2d(24)
    bn.running_mean.uniform_(-1, 1)
    bn.bias.data.uniform_(-1, 1)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(conv, bn, nn.ReLU6())
            self.head = nn.Conv2d(24, 5, 1)

        def forward(self, x):
            return self.head(x + self.body(x))

    x = torch.randn(batch, 24, 7, 9)
    compiled = _check_build(Block(), x, ["body.0"], ["head"])
    info = compiled.kernels["body.0"]
    pruned = int((conv.mask.reshape(24, -1).sum(1) == 0).sum())
    assert 0 < pruned < 24 and info["kept_rows"] == 24 - pruned
    assert info["fused_residual"] and info["activation"] == "relu6"


class ResidualNet(nn.Module):
    """Residual adds after a sparse 1x1 conv (on either side of the add), after a dense 3x3
    conv's ReLU (im2col), on a 1x1 map, and one that must not be fused (a broadcast add)."""

    def __init__(self):
        super().__init__()
        self.pw = MaskedConv2d(12, 12, 1, sparsity=0.8, block=(4, 1))
        self.pw2 = MaskedConv2d(12, 12, 1, sparsity=0.5, block=(4, 1), seed=1)
        self.k3 = nn.Conv2d(12, 12, 3, padding=1)
        self.tiny = nn.Conv2d(12, 12, 1)
        self.bcast = nn.Conv2d(12, 12, 1)

    def forward(self, x):
        x = x + self.pw(x)
        x = self.pw2(x) + x
        x = torch.relu(self.k3(x)) + x
        y = x.mean((2, 3), keepdim=True)
        y = y + self.tiny(y)
        return self.bcast(x) + y


def test_residual_add_is_fused_into_the_conv_kernel():
    torch.manual_seed(3)
    model = ResidualNet()
    x = torch.randn(2, 12, 5, 6)
    compiled = _check_build(model, x, ["pw", "pw2"], ["k3", "tiny", "bcast"])
    fused = {name: info["fused_residual"] for name, info in compiled.kernels.items()}
    assert fused == {"pw": True, "pw2": True, "k3": True, "tiny": True, "bcast": False}
    assert compiled.kernels["k3"]["activation"] == "relu" and compiled.kernels["k3"]["im2col"]


class ResNetBlock(nn.Module):
    """ResNet's basic block: two 3x3 convs, a strided 1x1 conv on the shortcut, the ReLU (or
    ReLU6) after the sum of the two branches."""

    def __init__(self, sparse: bool, act):
        super().__init__()
        conv = (
            (lambda *a, **k: MaskedConv2d(*a, sparsity=0.8, block=(4, 1), **k))
            if sparse
            else nn.Conv2d
        )
        self.a = conv(8, 16, 3, 2, 1)
        self.b = conv(16, 16, 3, 1, 1)
        self.shortcut = nn.Conv2d(8, 16, 1, 2)
        self.act = act

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        return self.act(y + self.shortcut(x))


def _vm_ops(compiled) -> set[str]:
    """The functions the compiled model's VM calls besides its builtins and our kernels:
    what TVM built by default."""
    text = compiled.executable.as_text()
    return {n for n in re.findall(r"call\s+(\S+)", text) if not n.startswith(("vm.", "hwnas_"))}


@pytest.mark.parametrize(("sparse", "act"), [(True, torch.relu), (False, nn.functional.relu6)])
def test_a_resnet_block_runs_on_our_kernels_alone(sparse, act):
    """The add of two convs' outputs (the block's second conv, the shortcut's conv) is fused
    into one of them; the other conv keeps its own kernel (both claimed the add once, and one
    conv was left to TVM's default conv2d). The ReLU after the add is fused too: the residual
    goes in before the activation (`KernelSpec.residual_first`)."""
    torch.manual_seed(11)
    model = ResNetBlock(sparse, act)
    layers = ["a", "b", "shortcut"]
    compiled = _check_build(
        model,
        torch.randn(2, 8, 32, 32),
        layers[:2] if sparse else [],
        layers[2:] if sparse else layers,
    )
    assert _vm_ops(compiled) == set()
    info = compiled.kernels
    assert info["b"]["fused_residual"] and not info["shortcut"]["fused_residual"]
    assert info["b"]["residual_first"] and info["b"]["activation"] == (
        "relu" if sparse else "relu6"
    )
    assert "residual_first" not in info["a"] and "residual_first" not in info["shortcut"]
    assert info["a"]["activation"] == "relu" and info["shortcut"]["activation"] == "none"


@pytest.mark.parametrize(("sparsity", "batch", "block"), [(0.99, 1, (4, 1)), (0.6, 3, (1, 8))])
def test_sparse_linear_matches_torch(sparsity, batch, block):
    torch.manual_seed(1)
    model = nn.Sequential(MaskedLinear(37, 53, sparsity=sparsity, block=block))
    compiled = _check_build(model, torch.randn(batch, 37), ["0"], [])
    assert compiled.kernels["0"]["fused_bias"]


class TinyNet(nn.Module):
    """Sparse 1x1 conv, depthwise conv, dense 3x3 conv, sparse classifier."""

    def __init__(self):
        super().__init__()
        self.pw = MaskedConv2d(3, 16, 1, sparsity=0.75, block=(4, 1))
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.conv = nn.Conv2d(16, 8, 3, padding=1)
        self.head = MaskedLinear(8, 5, sparsity=0.5)

    def forward(self, x):
        x = torch.relu(self.pw(x))
        x = nn.functional.relu6(self.dw(x))
        x = self.conv(x).mean((2, 3))
        return self.head(x)


def test_tiny_net_builds_exports_and_reloads(tmp_path):
    torch.manual_seed(2)
    model = TinyNet()
    x = torch.randn(2, 3, 9, 9)
    compiled = _check_build(model, x, ["pw", "head"], ["dw", "conv"])
    assert compiled.compile_seconds > 0
    path = compiled.export_library(tmp_path / "net.so")
    lib = tvm.runtime.load_module(str(path))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    reloaded = vm["main"](tvm.runtime.tensor(x.numpy())).numpy()
    np.testing.assert_array_equal(reloaded, compiled.run(x.numpy()))


def test_some_sparse_convs_go_through_im2col():
    """A strided 1x1 conv (its im2col output is smaller than its input), 1 x c blocks (a
    block's columns are not one offset apart in the padded planes), stride 3 (more stride
    phases than the pad kernel writes) and output rows narrower than a vector go through
    im2col, not direct."""
    torch.manual_seed(3)
    model = nn.Sequential(
        MaskedConv2d(8, 8, 1, stride=2, sparsity=0.5),
        MaskedConv2d(8, 16, 3, stride=2, padding=1, sparsity=0.8, block=(1, 4)),
        MaskedConv2d(16, 16, 3, stride=3, padding=1, sparsity=0.8, block=(4, 1)),
        MaskedConv2d(16, 16, 3, padding=1, sparsity=0.8, block=(4, 1)),  # 4x4
    )
    compiled = _check_build(model, torch.randn(2, 8, 37, 37), ["0", "1", "2", "3"], [])
    assert all(info["im2col"] for info in compiled.kernels.values())
    assert not any("direct" in info for info in compiled.kernels.values())


class DirectConvNet(nn.Module):
    """A sparse k x k conv at stride 1, ReLU6, then a residual add when the shapes allow."""

    def __init__(self, cin, cout, kernel, pad, block, sparsity, stride=1):
        super().__init__()
        self.conv = MaskedConv2d(
            cin, cout, kernel, stride, pad, sparsity=sparsity, block=block, seed=3
        )

    def forward(self, x):
        y = nn.functional.relu6(self.conv(x))
        return y + x if y.shape == x.shape else y


@pytest.mark.parametrize(
    ("batch", "size", "cin", "cout", "kernel", "pad", "block", "sparsity", "stride"),
    [
        (1, (32, 32), 16, 16, 3, 1, (4, 1), 0.9, 1),  # 32-wide rows: two 16-wide tiles each
        (2, (9, 12), 5, 24, 5, 2, (16, 1), 0.7, 1),  # 16x1 over 24 rows: a half block row
        (1, (7, 28), 6, 6, (3, 1), (1, 0), (1, 1), 0.99, 1),  # 28: 24 wide and a tail of 4
        (1, (13, 10), 8, 12, 3, (0, 1), (4, 1), 0.5, 1),  # no top and bottom padding
        (2, (5, 6), 7, 7, 1, 1, (4, 1), 0.6, 1),  # a 1x1 conv with padding
        (1, (32, 32), 16, 32, 3, 1, (4, 1), 0.9, 2),  # stride 2: four phases of 17 x 17
        (2, (15, 21), 6, 8, 5, 2, (8, 1), 0.6, (2, 1)),  # row phases only, odd sizes
        (1, (8, 40), 4, 8, (2, 4), (0, 1), (1, 1), 0.7, (1, 2)),  # column phases, even taps
    ],
)
def test_sparse_kxk_convs_in_row_blocks_are_direct(
    batch, size, cin, cout, kernel, pad, block, sparsity, stride
):
    """A sparse conv at strides up to 2 that is not a plain 1x1, in r x 1 blocks, reads its
    input's zero-padded planes, split by stride phase (`pad`), with W's block indices as
    offsets in them, without im2col: odd sizes, rows wider than a tile, a tail tile, a half
    block row, asymmetric padding, a fused residual add, batch 2, empty block rows at 99%."""
    torch.manual_seed(9)
    model = DirectConvNet(cin, cout, kernel, pad, block, sparsity, stride)
    x = torch.randn(batch, cin, *size)
    compiled = _check_build(model, x, ["conv"], [])
    info = compiled.kernels["conv"]
    assert info["direct"] and not info["im2col"]
    residual = model.eval()(x).shape == x.shape
    assert info["activation"] == "relu6" and info["fused_residual"] == residual
    (plan,) = compiled.layer_plans
    assert plan.x_copy.op == "pad" and plan.spec.direct is not None


def test_direct_tiles_stay_within_an_output_row():
    """A direct conv's M tile: the whole row, or whole vectors that divide it, else the
    widest tile and a tail."""
    assert direct_tile(14, 24, 8) == 14
    assert direct_tile(32, 24, 8) == 16  # 24 and a tail of 8 were 1.3-1.5x slower
    assert direct_tile(48, 24, 8) == 24
    assert direct_tile(28, 24, 8) == 24
    assert direct_tile(32, 16, 4) == 16  # NEON


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "pad"),
    [
        ((32, 32), (3, 3), (1, 1), (1, 1)),
        ((5, 7), (5, 3), (1, 1), (2, 0)),
        ((4, 4), (3, 3), (1, 1), (0, 1)),
        ((32, 32), (3, 3), (2, 2), (1, 1)),
        ((9, 12), (5, 5), (2, 1), (2, 2)),
        ((7, 5), (3, 3), (1, 2), (0, 0)),  # input rows and columns the conv never reads
        ((2, 3), (3, 3), (2, 2), (1, 1)),  # a phase of one column, one with no input
    ],
)
def test_pad_kernel_writes_zero_padded_phase_planes(size, kernel, stride, pad):
    """The direct conv's copy: each channel's plane, zero-padded to the rows and columns the
    conv reads and split by stride phase, every element written (the output starts as NaN)."""
    rng = np.random.default_rng(4)
    geo = _geometry(2, 3, size, kernel, stride, pad)
    x = rng.standard_normal((2, 3, *size)).astype(np.float32)
    lib, symbol = load_kernel(Kernel("pad", "x86", geo, num_cores=2), HOST.target)
    dev = tvm.cpu()
    (sh, sw), (rows, cols) = stride, phase_shape(geo)
    out = tvm.runtime.tensor(np.full((2, 3, padded_plane(geo)), np.nan, np.float32), dev)
    lib[symbol](tvm.runtime.tensor(x, dev), out)
    (pt, pl), (h, w) = pad, size
    padded = np.zeros((2, 3, sh * rows + h + pt, sw * cols + w + pl), np.float32)
    padded[:, :, pt : pt + h, pl : pl + w] = x
    want = [padded[:, :, r::sh, q::sw][:, :, :rows, :cols] for r in range(sh) for q in range(sw)]
    got = out.numpy().reshape(2, 3, sh * sw, rows, cols)
    np.testing.assert_array_equal(got, np.stack(want, axis=2))


def test_a_direct_convs_choice_times_each_kernel_with_its_copy(tmp_path, monkeypatch):
    """The direct kernel reads the padded planes, its dense twin the im2col output: each is
    timed with its copy, and the cached times decide (edited to make the copies decide)."""
    monkeypatch.setenv("HWNAS_CACHE", str(tmp_path))
    torch.manual_seed(10)
    model = nn.Sequential(MaskedConv2d(16, 16, 3, padding=1, sparsity=0.9, block=(4, 1)))
    x = torch.randn(1, 16, 12, 12)
    hw_compile.build(model, x, HOST)
    path = tmp_path / "kernel_times.json"
    (key,) = json.loads(path.read_text())
    assert key.endswith("|4x1-direct|0.1|copied")
    entry = json.loads(path.read_text())[key]
    assert entry.keys() == {"sparse_ms", "sparse_copy_ms", "dense_ms", "dense_copy_ms"}
    for sparse_copy, impl in ((0.1, "sparse"), (0.3, "dense")):
        times = {"sparse_ms": 0.1, "sparse_copy_ms": sparse_copy}
        times |= {"dense_ms": 0.2, "dense_copy_ms": 0.1}
        path.write_text(json.dumps({key: times}))
        compiled = _check_build(
            model, x, *((["0"], []) if impl == "sparse" else ([], ["0"])), "auto"
        )
        info = compiled.kernels["0"]
        assert info["sparse_ms"] == pytest.approx(0.1 + sparse_copy)
        assert info["dense_ms"] == pytest.approx(0.3)
        assert info.get("direct", False) == (impl == "sparse") and info["im2col"] == (
            impl == "dense"
        )


def test_im2col_rows_are_padded_off_whole_pages():
    """An im2col output's rows (its matmul's X) get 16 more floats when they would be a whole
    number of 4 KB pages: rows that all start at one page offset made our matmuls slower."""
    assert im2col_row(1024, "x86") == 1040  # a 32x32 output map
    assert im2col_row(4096, "arm") == 4112  # 64x64
    assert im2col_row(1000, "x86") == 1000
    assert im2col_row(256, "x86") == 256  # 1 KB rows were not slower
    assert im2col_row(1024, "cuda") == 1024


def test_kxk_convs_on_a_32x32_map_read_padded_im2col_rows(tmp_path):
    """A 3x3 conv with a 32x32 output: the im2col rows are 1040 floats, the matmul (sparse or
    dense) reads the first 1024 of each, and the network and its layers one by one (the
    layer library, as a device times it) give torch's output. The dense conv's X (144 x 1040
    floats) is over `TILE_MAJOR_X_BYTES`: its kernel walks it tile by tile. (1 x 4 blocks: a
    sparse conv in r x 1 blocks is direct, without im2col.)"""
    torch.manual_seed(4)
    model = nn.Sequential(
        MaskedConv2d(4, 16, 3, padding=1, sparsity=0.75, block=(1, 4)),
        nn.ReLU(),
        nn.Conv2d(16, 8, 3, padding=1),
    ).eval()
    x = torch.randn(1, 4, 32, 32)
    compiled = _check_build(model, x, ["0"], ["2"])
    plans = {plan.name: plan for plan in compiled.layer_plans}
    assert [plans[n].spec.x_shape for n in ("0", "2")] == [(1, 36, 1040), (1, 144, 1040)]
    assert 144 * 1040 * 4 > TILE_MAJOR_X_BYTES
    calls = compiled.export_layer_library(tmp_path / "layers.so")
    assert calls["2"][0].output_shape == (1, 144, 1040)  # the im2col call
    lib = tvm.runtime.load_module(str(tmp_path / "layers.so"))
    x2 = torch.relu(model[0](x)).detach()
    got = layer_output(
        plans["2"],
        run_layer_calls(
            lib, tvm.cpu(), [replace(calls["2"][0], inputs=(x2.numpy(),)), calls["2"][1]]
        ),
    )
    np.testing.assert_allclose(got, model[2](x2).detach().numpy(), rtol=1e-4, atol=1e-4)


class PageRowsNet(nn.Module):
    """1x1 convs on a 32x32 map (planes of exactly one 4 KB page): dense from 8 channels,
    from 16, from 64 with a residual, and sparse."""

    def __init__(self):
        super().__init__()
        self.few = nn.Conv2d(8, 16, 1)
        self.wide = nn.Conv2d(16, 64, 1)
        self.same = nn.Conv2d(64, 64, 1, bias=False)
        self.sparse = MaskedConv2d(64, 16, 1, sparsity=0.8, block=(4, 1))

    def forward(self, x):
        y = torch.relu(self.wide(self.few(x)))
        y = y + self.same(y)
        return self.sparse(y)


@pytest.mark.parametrize(
    ("size", "kernel_choice", "copied"),
    [
        (32, "sparse", {"wide", "same"}),
        (32, "dense", {"wide", "same", "sparse"}),
        (16, "dense", set()),
    ],
)
def test_dense_1x1_convs_read_page_rows_through_a_padded_copy(size, kernel_choice, copied):
    """A dense 1x1 conv from 16 or more channels whose input planes are whole 4 KB pages
    reads them through im2col (a copy, rows of 1040 floats), also a sparse layer that got its
    dense kernel; from fewer channels, with its sparse kernel, or on other maps it reads them
    as they are. Its residual and ReLU stay fused."""
    torch.manual_seed(6)
    x = torch.randn(2, 8, size, size)
    sparse = ["sparse"] if kernel_choice == "sparse" else []
    dense = ["few", "wide", "same"] + (["sparse"] if kernel_choice == "dense" else [])
    compiled = _check_build(PageRowsNet(), x, sparse, dense, kernel_choice)
    assert {name for name, info in compiled.kernels.items() if info["im2col"]} == copied
    plans = {plan.name: plan for plan in compiled.layer_plans}
    m = size * size
    assert plans["same"].spec.x_shape == ((2, 64, m + 16) if copied else (2, 64, size, size))
    assert compiled.kernels["same"]["fused_residual"]
    assert compiled.kernels["wide"]["activation"] == "relu"


# ---------------------------------------------------------------- dense, depthwise, im2col


def test_tall_blocks_are_computed_in_passes_that_fit_the_registers():
    def tiling(
        block: tuple[int, int], avx512: bool, m: int = 1024, dense: bool = False
    ) -> tuple[int, int]:
        spec = KernelSpec(1, 64, 64, m, block, 64 // block[0])
        chosen = choose_tiling("x86", spec, 1, avx512, dense)
        return chosen.sub_rows, chosen.tile_m

    # AVX2: 12 of 16 ymm registers for accumulators, at least two vectors per row: a 16x1
    # block goes in four 4-row passes of three vectors; AVX-512 (16 zmm accumulators) in two
    # 8-row passes. Rows of more vectors take a power of two (6 or 12 were slower).
    assert tiling((16, 1), avx512=False) == (4, 24)
    assert tiling((4, 1), avx512=False) == (4, 24)
    assert tiling((4, 1), avx512=False, m=64) == (4, 24)
    assert tiling((4, 1), avx512=False, m=20) == (4, 16)  # 3 vectors from M = 24 on
    # Our dense kernel: 3 vectors only from M = 160 on.
    assert tiling((4, 1), avx512=False, m=128, dense=True) == (4, 16)
    assert tiling((4, 1), avx512=False, m=196, dense=True) == (4, 24)
    assert tiling((2, 2), avx512=False) == (2, 32)
    assert tiling((1, 4), avx512=False) == (1, 64)
    assert tiling((16, 1), avx512=True) == (8, 32)
    assert tiling((4, 1), avx512=True) == (4, 64)
    # An M of one vector or less: rows take the registers the second vector would have.
    assert tiling((16, 1), avx512=False, m=8) == (8, 8)


def test_kernel_cache_is_pruned_oldest_first_sparing_recent_files(tmp_path):
    now = time.time()
    ages = {"a": 3 * 86400, "b": 2 * 86400, "c": 60}  # seconds since last use
    for name, age in ages.items():
        path = tmp_path / f"hwnas_{name}.o"
        path.write_bytes(b"x" * 400)
        os.utime(path, (now - age, now - age))
    (tmp_path / "unrelated.txt").write_bytes(b"x" * 4000)  # not ours: never counted or deleted
    assert prune(tmp_path, max_bytes=1200) == []  # at the limit: nothing to do
    assert [p.name for p in prune(tmp_path, max_bytes=1000)] == ["hwnas_a.o"]
    # Over the limit, but the last file was used a minute ago: kept.
    assert [p.name for p in prune(tmp_path, max_bytes=100)] == ["hwnas_b.o"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hwnas_c.o", "unrelated.txt"]


@pytest.mark.parametrize(
    ("m", "batch", "avx512"),
    [
        (49, 2, True),
        (7, 1, True),
        (1, 3, True),
        (44, 1, True),
        (200, 1, True),
        # AVX2 tiles narrower than a full one: 2 or 4 copies of the accumulators over K = 37
        (4, 2, False),
        (7, 1, False),
        # M == 1: W as an all-blocks BSR matrix, 32-row blocks on AVX-512 (53 rows: one
        # block padded), 8-row ones on AVX2 (taller would pad more than 1/8)
        (1, 2, False),
        # M = 2-5: the same, through the matrix-vector kernel's columns variant
        (2, 2, False),
        (3, 1, True),
        (5, 1, False),
    ],
)
def test_dense_kernel_matches_numpy(m, batch, avx512):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((53, 37)).astype(np.float32)
    x = rng.standard_normal((batch, 37, m)).astype(np.float32)
    bias = rng.standard_normal(53).astype(np.float32)
    candidate = _dense_candidate(w, bias, LayerSite(batch, m, "relu6", "x86", 2, avx512))
    lib, symbol = load_kernel(candidate.kernel, HOST.target)  # through the object cache
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.full((batch, 53, m), np.nan, np.float32), dev)
    args = [tvm.runtime.tensor(a, dev) for a in (x, *candidate.constants)]
    lib[symbol](*args, out)
    want = np.clip(np.einsum("nk,bkm->bnm", w, x) + bias[None, :, None], 0, 6)
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("kept_rows", [False, True])
def test_dense_kernel_sums_a_large_x_in_blocks_of_k(kept_rows):
    """X over `TILE_MAJOR_X_BYTES`: the dense kernel takes K in blocks (two of `K_BLOCK` rows
    and a short one here), its partial sums in Y, and applies the activation and the residual
    once, after the last block. Batch 2, a narrow last M tile, a row block past the last row,
    and a channel-pruned W (its kept rows only) as well."""
    rng = np.random.default_rng(5)
    batch, rows, k, m = 2, 13, 2 * K_BLOCK + 89, 500
    assert k * m * 4 > TILE_MAJOR_X_BYTES
    w = rng.standard_normal((rows, k)).astype(np.float32)
    kept = np.array([0, 2, 3, 4, 7, 8, 9, 12], np.int32) if kept_rows else np.arange(rows)
    w[np.setdiff1d(np.arange(rows), kept)] = 0
    x = rng.standard_normal((batch, k, m)).astype(np.float32)
    bias = rng.standard_normal(rows).astype(np.float32)
    residual = rng.standard_normal((batch, rows, m)).astype(np.float32)
    weights = [pack_dense(w[kept], 4)]
    if kept_rows:
        weights += [kept, np.setdiff1d(np.arange(rows), kept).astype(np.int32)]
    spec = KernelSpec(
        batch, rows, k, m, (4, 1), -(-len(kept) // 4), "relu6", residual=True, kept_rows=kept_rows
    )
    # Built as a compile builds it (`BUILD_CONFIG`, through the object cache).
    lib, symbol = load_kernel(Kernel("dense", "x86", spec, num_cores=2), HOST.target)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.full((batch, rows, m), np.nan, np.float32), dev)
    lib[symbol](*[tvm.runtime.tensor(a, dev) for a in (x, *weights, bias, residual)], out)
    got = out.numpy()
    want = np.clip(np.einsum("nk,bkm->bnm", w, x) + bias[None, :, None], 0, 6) + residual
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _geometry(batch, channels, size, kernel, stride, pad) -> ConvGeometry:
    """A conv's geometry, its output size derived (padding `pad` on both sides)."""
    (h, w), (kh, kw) = size, kernel
    oh = (h + 2 * pad[0] - kh) // stride[0] + 1
    ow = (w + 2 * pad[1] - kw) // stride[1] + 1
    return ConvGeometry(batch, channels, h, w, kernel, stride, pad, oh, ow)


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "pad"),
    [
        ((16, 16), (3, 3), (1, 1), (1, 1)),
        ((16, 16), (3, 3), (2, 2), (1, 1)),
        ((9, 12), (5, 5), (2, 2), (2, 2)),
        ((7, 5), (3, 1), (2, 1), (0, 0)),
        ((2, 3), (3, 3), (1, 2), (2, 1)),
        ((1, 1), (3, 3), (2, 2), (1, 1)),
        ((14, 20), (3, 3), (1, 1), (1, 1)),  # output rows of 8 + 8 + 4 lanes
        ((4, 4), (3, 3), (1, 1), (1, 1)),  # rows of half a vector: shifts by shuffle
        ((4, 3), (5, 5), (1, 1), (2, 2)),
    ],
)
def test_depthwise_kernel_matches_torch(size, kernel, stride, pad):
    """Stride phases, odd sizes, pads wider than the input, a 1x1 map, rows of half a vector
    (4x4, 4x3: each row one load, the column shifts shuffles)."""
    rng = np.random.default_rng(7)
    (h, w), (kh, kw) = size, kernel
    geo = _geometry(2, 5, size, kernel, stride, pad)
    oh, ow = geo.out_height, geo.out_width
    x = rng.standard_normal((2, 5, h, w)).astype(np.float32)
    weight = rng.standard_normal((5, kh, kw)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    lib, symbol = load_kernel(Kernel("depthwise", "x86", geo, "relu6", 2), HOST.target)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.full((2, 5, oh, ow), np.nan, np.float32), dev)
    lib[symbol](*[tvm.runtime.tensor(a, dev) for a in (x, weight, bias)], out)
    t = torch.from_numpy
    want = nn.functional.conv2d(t(x), t(weight)[:, None], t(bias), stride, pad, groups=5)
    np.testing.assert_allclose(out.numpy(), want.clamp(0, 6).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "pad"),
    [
        ((32, 32), (3, 3), (2, 2), (1, 1)),
        ((9, 12), (5, 5), (1, 2), (2, 2)),
        ((7, 5), (3, 1), (2, 1), (0, 0)),
        ((2, 3), (3, 3), (2, 2), (1, 1)),
        ((11, 13), (4, 4), (3, 4), (1, 2)),
        ((32, 32), (3, 3), (1, 1), (1, 1)),  # 1024 columns: rows of 1040
    ],
)
def test_im2col_kernel_matches_torch_unfold(size, kernel, stride, pad):
    """Stride phases, a one-column phase, pads wider than the input, and strides above 2."""
    rng = np.random.default_rng(5)
    (h, w), (kh, kw) = size, kernel
    geo = _geometry(2, 3, size, kernel, stride, pad)
    oh, ow = geo.out_height, geo.out_width
    x = rng.standard_normal((2, 3, h, w)).astype(np.float32)
    lib, symbol = load_kernel(Kernel("im2col", "x86", geo, num_cores=2), HOST.target)
    dev = tvm.cpu()
    row = im2col_row(oh * ow, "x86")  # rows padded off whole pages: the rest is not written
    out = tvm.runtime.tensor(np.full((2, 3 * kh * kw, row), np.nan, np.float32), dev)
    lib[symbol](tvm.runtime.tensor(x, dev), out)
    want = nn.functional.unfold(torch.from_numpy(x), kernel, padding=pad, stride=stride)
    np.testing.assert_array_equal(out.numpy()[..., : oh * ow], want.numpy())


@pytest.mark.parametrize(
    ("batch", "size", "kernel", "stride", "pad", "acts"),
    [
        (1, (16, 16), (3, 3), (1, 1), (1, 1), ("relu6", "relu6")),
        (2, (9, 12), (5, 5), (2, 2), (2, 2), ("relu", "none")),
        (1, (7, 5), (3, 3), (2, 1), (1, 1), ("none", "relu")),
        (1, (1, 1), (3, 3), (1, 1), (1, 1), ("relu6", "none")),
        (2, (13, 10), (3, 3), (1, 1), (0, 1), ("relu6", "relu6")),
        (1, (3, 70), (1, 3), (1, 1), (0, 1), ("none", "none")),
        (2, (3, 3), (3, 3), (2, 2), (1, 1), ("relu", "relu6")),
        # 14-wide rows: through the plane, its tiles in 8-lane pieces and a 4-lane tail
        (1, (14, 14), (3, 3), (2, 2), (1, 1), ("relu6", "none")),
        (2, (4, 4), (3, 3), (1, 1), (1, 1), ("relu6", "relu6")),
        (1, (2, 4), (5, 3), (1, 1), (2, 1), ("relu", "none")),
    ],
)
def test_expand_depthwise_kernel_matches_torch(batch, size, kernel, stride, pad, acts):
    """A sparse 1x1 conv and the depthwise conv on its output in one kernel: odd sizes and
    channel counts, stride phases, batch 2, a 1x1 map, an empty and a full expand channel;
    expanded rows stored straight into the depthwise buffer's stride phases (a row tail, tiles
    of an odd row count, no top pad) or through a plane (rows wider than a register tile, a
    one-column phase)."""
    rng = np.random.default_rng(11)
    (h, w), (kh, kw), (k, c) = size, kernel, (11, 21)
    geo = _geometry(batch, c, size, kernel, stride, pad)
    oh, ow = geo.out_height, geo.out_width
    ew = rng.standard_normal((c, k)).astype(np.float32) * (rng.random((c, k)) < 0.2)
    ew[3], ew[4] = 0, rng.standard_normal(k)
    csr = to_bsr(ew, (1, 1))
    eb, dw, db = (rng.standard_normal(s).astype(np.float32) for s in (c, (c, kh, kw), c))
    x = rng.standard_normal((batch, k, h, w)).astype(np.float32)
    expand = KernelSpec(batch, c, k, h * w, (1, 1), c, acts[0], (h, w), (h, w))
    kern = Kernel("depthwise", "x86", geo, acts[1], 2, expand=expand)
    _check_expand_depthwise(kern, (oh, ow), x, (ew, csr, eb), (dw, db), stride, pad, acts)


def _check_expand_depthwise(kern, out_hw, x, expand, depthwise, stride, pad, acts, dilation=1):
    """The fused kernel `kern` on x against torch: `expand` = (its dense weight, the same in the
    kernel's BSR form, its bias), `depthwise` = (weight, bias), `acts` the two activations."""
    ew, blocks, eb = expand
    dw, db = depthwise
    lib, symbol = load_kernel(kern, HOST.target)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.full((x.shape[0], len(ew), *out_hw), np.nan, np.float32), dev)
    args = (x, blocks.data.reshape(-1), blocks.indices, blocks.indptr, eb, dw, db)
    lib[symbol](*[tvm.runtime.tensor(a, dev) for a in args], out)

    def act(y, name):
        return {"none": y, "relu": y.relu(), "relu6": y.clamp(0, 6)}[name]

    t = torch.from_numpy
    mid = act(nn.functional.conv2d(t(x), t(ew)[:, :, None, None], t(eb)), acts[0])
    want = act(
        nn.functional.conv2d(mid, t(dw)[:, None], t(db), stride, pad, dilation, groups=len(ew)),
        acts[1],
    )
    np.testing.assert_allclose(out.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "dilation", "pad", "fused"),
    [
        ((16, 16), (3, 3), (1, 1), (2, 2), (2, 2), False),  # DARTS's dil_conv_3x3
        ((16, 16), (5, 5), (2, 2), (2, 2), (4, 4), False),  # dil_conv_5x5 in a reduction cell
        ((9, 12), (3, 3), (2, 2), (2, 2), (2, 2), True),
        ((7, 5), (3, 3), (2, 1), (3, 2), (1, 2), False),  # odd dilation, narrow pads
        ((4, 4), (3, 3), (1, 1), (2, 2), (2, 2), True),  # 4x4 without the shifted rows
        ((32, 32), (5, 5), (2, 2), (2, 2), (4, 4), True),
    ],
)
def test_dilated_depthwise_kernels_match_torch(size, kernel, stride, dilation, pad, fused):
    """Dilated taps (DARTS's dil_conv ops), alone and with a sparse expand conv fused in: each
    tap reads its stride phase at its dilated offset."""
    rng = np.random.default_rng(13)
    (h, w), (kh, kw), c = size, kernel, 6
    oh = (h + 2 * pad[0] - (kh - 1) * dilation[0] - 1) // stride[0] + 1
    ow = (w + 2 * pad[1] - (kw - 1) * dilation[1] - 1) // stride[1] + 1
    geo = ConvGeometry(2, c, h, w, kernel, stride, pad, oh, ow, dilation)
    dw, db = (rng.standard_normal(s).astype(np.float32) for s in ((c, kh, kw), c))
    if fused:
        k = 5
        ew = rng.standard_normal((c, k)).astype(np.float32) * (rng.random((c, k)) < 0.5)
        eb = rng.standard_normal(c).astype(np.float32)
        x = rng.standard_normal((2, k, h, w)).astype(np.float32)
        expand = KernelSpec(2, c, k, h * w, (1, 1), c, "relu", (h, w), (h, w))
        kern = Kernel("depthwise", "x86", geo, "none", 2, expand=expand)
        args = ((ew, to_bsr(ew, (1, 1)), eb), (dw, db), stride, pad, ("relu", "none"))
        _check_expand_depthwise(kern, (oh, ow), x, *args, dilation=dilation)
        return
    x = rng.standard_normal((2, c, h, w)).astype(np.float32)
    lib, symbol = load_kernel(Kernel("depthwise", "x86", geo, "relu", 2), HOST.target)
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.full((2, c, oh, ow), np.nan, np.float32), dev)
    lib[symbol](*[tvm.runtime.tensor(a, dev) for a in (x, dw, db)], out)
    t = torch.from_numpy
    want = nn.functional.conv2d(t(x), t(dw)[:, None], t(db), stride, pad, dilation, groups=c)
    np.testing.assert_allclose(out.numpy(), want.relu().numpy(), rtol=1e-4, atol=1e-5)


def test_a_dilated_depthwise_conv_runs_on_our_kernel():
    """A DARTS dil_conv (ReLU, dilated depthwise conv, 1x1 conv) builds onto our depthwise
    kernel; a dilated conv that is not depthwise stays with TVM's own (checked against torch
    either way)."""
    torch.manual_seed(8)
    model = nn.Sequential(
        nn.ReLU(),
        nn.Conv2d(8, 8, 5, 2, padding=4, dilation=2, groups=8, bias=False),
        nn.Conv2d(8, 16, 1, bias=False),
        nn.Conv2d(16, 16, 3, padding=2, dilation=2),
    ).eval()
    compiled = hw_compile.build(model, torch.randn(1, 8, 16, 16), HOST)
    assert compiled.kernels["1"]["impl"] == "depthwise"
    assert compiled.kernels["3"] == {"impl": "tvm-default", "reason": "dilated convolution"}
    with pytest.raises(ValueError, match="dilated"):
        Kernel(
            "im2col",
            "x86",
            replace(_geometry(1, 2, (8, 8), (3, 3), (1, 1), (2, 2)), dilation=(2, 2)),
        )


@pytest.mark.parametrize(
    ("batch", "channels", "size", "kernel", "stride", "pad", "cores"),
    [
        (1, 20, (4, 4), (3, 3), (1, 1), (1, 1), 2),  # a chunk starts inside a group
        (2, 20, (4, 4), (5, 3), (1, 1), (2, 1), 3),
        (5, 4, (4, 4), (3, 3), (1, 1), (1, 1), 1),  # one group: again for the next batch
        (2, 20, (3, 3), (3, 3), (2, 2), (1, 1), 2),  # a 9-wide tile: a register and a lane
        (1, 20, (8, 7), (3, 3), (1, 1), (1, 1), 1),  # three tiles of 16 and a tail of 8
    ],
)
def test_expand_depthwise_kernel_with_channels_expanded_in_groups(
    batch, channels, size, kernel, stride, pad, cores
):
    """The fused kernel with the expand conv in 4 x 1 blocks (`expand_group`): the four channels
    of a block row expanded together, when the first of them comes (also in the middle of a
    group, where a chunk of channels starts there, and again for the next batch), an empty and
    a full block row."""
    rng = np.random.default_rng(12)
    (h, w), (kh, kw), (k, c) = size, kernel, (11, channels)
    geo = _geometry(batch, c, size, kernel, stride, pad)
    oh, ow = geo.out_height, geo.out_width
    mask = np.repeat(rng.random((c // 4, k)) < 0.3, 4, axis=0)
    ew = rng.standard_normal((c, k)).astype(np.float32) * mask
    if c > 4:
        ew[4:8], ew[12:16] = 0, rng.standard_normal((4, k))
    blocks = to_bsr(ew, (4, 1))
    eb, dw, db = (rng.standard_normal(s).astype(np.float32) for s in (c, (c, kh, kw), c))
    x = rng.standard_normal((batch, k, h, w)).astype(np.float32)
    expand = KernelSpec(batch, c, k, h * w, (4, 1), c // 4, "relu", (h, w), (h, w))
    kern = Kernel("depthwise", "x86", geo, "relu6", cores, expand=expand)
    acts = ("relu", "relu6")
    _check_expand_depthwise(kern, (oh, ow), x, (ew, blocks, eb), (dw, db), stride, pad, acts)


def test_expand_conv_in_row_blocks_is_expanded_in_groups_on_small_maps():
    """A 1x1 conv in 16 x 1 blocks fused into the depthwise conv it feeds: on a 4x4 map its
    channels are expanded four at a time, on an 8x8 map one CSR row at a time; both match
    torch."""
    torch.manual_seed(5)
    model = nn.Sequential(
        MaskedConv2d(16, 32, 1, sparsity=0.75, block=(16, 1), bias=False),
        nn.ReLU6(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32),
    )
    for size, group in ((4, 4), (8, 1)):
        compiled = _check_build(model, torch.randn(2, 16, size, size), ["0"], ["2"])
        assert compiled.kernels["2"]["fused_expand"] == "0"
        assert compiled.kernels["2"]["expand_group"] == group


def test_expand_group_takes_row_blocks_of_whole_groups_on_planes_of_two_registers():
    """Groups of 4 channels for r x 1 blocks with r a multiple of 4 and planes of at most two
    registers (16 floats on AVX2, 8 on NEON, 32 on AVX-512); CSR rows (1) otherwise and on a
    GPU."""
    assert expand_group((16, 1), 32, 16, "x86", False) == 4
    assert expand_group((4, 1), 32, 9, "x86", False) == 4
    assert expand_group((16, 1), 32, 64, "x86", False) == 1  # 8x8
    assert expand_group((16, 1), 32, 25, "x86", True) == 4  # 5x5 on AVX-512
    assert expand_group((16, 1), 32, 16, "arm", False) == 1
    assert expand_group((8, 1), 32, 4, "arm", False) == 4
    for block in ((2, 1), (1, 4), (1, 1), (6, 1)):
        assert expand_group(block, 36, 16, "x86", False) == 1
    assert expand_group((16, 1), 30, 16, "x86", False) == 1  # a last group would run past C
    assert expand_group((16, 1), 32, 16, "cuda", False) == 1


class ExpandNet(nn.Module):
    """Sparse 1x1 convs feeding depthwise convs: one alone (fused, BatchNorm folded), one whose
    output also feeds a residual add, and a dense one (neither fused)."""

    def __init__(self):
        super().__init__()
        self.ex = nn.Sequential(
            MaskedConv2d(8, 24, 1, sparsity=0.8, block=(4, 1), bias=False),
            nn.BatchNorm2d(24),
            nn.ReLU6(),
        )
        self.dw = nn.Conv2d(24, 24, 3, 2, 1, groups=24)
        self.ex2 = MaskedConv2d(24, 24, 1, sparsity=0.8, seed=1)
        self.dw2 = nn.Conv2d(24, 24, 3, 1, 1, groups=24)
        self.ex3 = nn.Conv2d(24, 24, 1)
        self.dw3 = nn.Conv2d(24, 24, 5, 1, 2, groups=24)

    def forward(self, x):
        x = nn.functional.relu6(self.dw(self.ex(x)))
        e = self.ex2(x)
        x = self.dw2(e) + e
        return self.dw3(self.ex3(x))


def test_sparse_expand_conv_is_fused_into_the_depthwise_conv_it_feeds():
    torch.manual_seed(4)
    model = ExpandNet().eval()
    model.ex[1].running_mean.uniform_(-1, 1)
    x = torch.randn(2, 8, 11, 13)
    names = ["ex.0", "dw", "ex2", "dw2", "ex3", "dw3"]
    compiled = _check_build(model, x, ["ex.0", "ex2"], ["dw", "dw2", "ex3", "dw3"])
    fused = {n: (i.get("fused_into"), i.get("fused_expand")) for n, i in compiled.kernels.items()}
    assert fused == {n: (None, None) for n in names} | {"ex.0": ("dw", None), "dw": (None, "ex.0")}
    assert compiled.kernels["ex.0"]["impl"] == "sparse" and compiled.kernels["dw"]["fused_bias"]
    # A fused pair is checked as one layer, from the expand conv's input, when outputs differ.
    deploy, _ = deploy_copy(model)
    fold_batchnorm(deploy)
    plan, target = RewritePlan(compiled.layer_plans, {}), tvm.target.Target(HOST.target)
    worst = worst_layer(deploy, x, plan, target)
    assert float(re.search(r"max error (\S+) of its output", worst).group(1)) < 1e-4
    dw = next(layer for layer in plan.layers if layer.name == "dw")
    dw.constants[3] = dw.constants[3] + 1.0  # the expand conv's bias
    assert worst_layer(deploy, x, plan, target).startswith("'dw' (depthwise kernel")


class DenseNet(nn.Module):
    """Every dense layer kind of mbv2-sparse: stem kxk, 1x1, depthwise 3x3/5x5 stride 1/2,
    BatchNorm, ReLU6, a residual, global pool and a Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16))
        self.dw3 = nn.Sequential(
            nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6()
        )
        self.pw = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24))
        self.dw5 = nn.Conv2d(24, 24, 5, 2, 2, groups=24)
        self.head = nn.Linear(24, 7)

    def forward(self, x):
        x = nn.functional.relu6(self.stem(x))
        x = self.pw(x + self.dw3(x))
        x = self.dw5(x).mean((2, 3))
        return self.head(x)


def test_small_layers_get_kernels_built_for_one_core():
    # A parallel loop's launch costs more than a small layer's work (PARALLEL_MIN_MACS).
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 64, 1), nn.Conv2d(64, 64, 1))
    compiled = _check_build(model, torch.randn(1, 3, 16, 16), [], ["0", "2", "3"])
    kernels = {plan.name: plan.kernel for plan in compiled.layer_plans}
    # 3 x 8 x 256 = 6 k multiply-adds; 131 k and 1 M: as many cores as the target has
    assert {name: k.num_cores for name, k in kernels.items()} == {"0": 1, "2": None, "3": None}
    assert "T.parallel" not in kernels["0"].func().script()
    assert "T.parallel" in kernels["3"].func().script()


def test_dense_layers_get_our_kernels_and_batchnorm_is_folded():
    torch.manual_seed(5)
    model = DenseNet()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # non-trivial running statistics
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 17, 17)
    compiled = _check_build(model, x, [], ["stem.0", "dw3.0", "pw.0", "dw5", "head"])
    impl = {name: info["impl"] for name, info in compiled.kernels.items()}
    assert impl == {
        "stem.0": "dense",
        "dw3.0": "depthwise",
        "pw.0": "dense",
        "dw5": "depthwise",
        "head": "dense",
    }
    assert sorted(compiled.folded_batchnorm) == ["dw3.0", "pw.0", "stem.0"]
    assert compiled.kernels["dw3.0"]["activation"] == "relu6"


class UnfoldedNormsNet(nn.Module):
    """Batch norms no conv absorbs: after a pooling, after a concat, in a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool_bn = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.BatchNorm2d(8, affine=False))
        self.cat_bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 12)
        self.fc_bn = nn.BatchNorm1d(12)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = self.cat_bn(torch.cat([y, self.pool_bn(y)], 1))
        return self.fc_bn(self.fc(y.mean((2, 3))))


def test_batch_norms_no_conv_absorbs_compute_with_the_running_statistics():
    """TVM's torch frontend (run without decompositions) computed an eval-mode batch norm with
    the batch's statistics; each unfolded one is now its scale and shift per channel."""
    torch.manual_seed(12)
    model = UnfoldedNormsNet()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    compiled = _check_build(model, torch.randn(2, 3, 9, 9), [], ["conv", "fc"])
    assert compiled.folded_batchnorm == []
    assert isinstance(model.cat_bn, nn.BatchNorm2d)  # the user's model is left as it was


def test_a_darts_candidate_compiles_to_torchs_output():
    """A `darts-sparse` candidate on the embedded digits' shape (1 x 8 x 8): its cells have
    batch norms after poolings and concats, which no conv absorbs."""
    from search_spaces.spaces import get_space

    space = get_space("darts-sparse")
    r = random.Random(1)
    arch = {name: r.choice(values) for name, values in space.choices.items()}
    torch.manual_seed(13)
    model = space.build(arch, 10, 1, 8)
    for module in model.modules():
        if hasattr(module, "update_mask"):
            module.update_mask()
    hw_compile.build(model.eval(), torch.randn(2, 1, 8, 8), HOST)  # OutputMismatch if it differs


def test_fold_batchnorm_keeps_the_sparsity_pattern():
    torch.manual_seed(6)
    conv = MaskedConv2d(8, 16, 1, sparsity=0.75, block=(4, 1))
    model = nn.Sequential(conv, nn.BatchNorm2d(16)).eval()
    model[1].running_var.uniform_(0.5, 2.0)
    deploy, _ = deploy_copy(model)
    assert fold_batchnorm(deploy) == ["0"]
    assert isinstance(deploy[1], nn.Identity)
    assert torch.equal(deploy[0].weight != 0, (conv.weight * conv.mask) != 0)
    x = torch.randn(1, 8, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), model(x), rtol=1e-5, atol=1e-5)


def test_tvms_own_ops_are_built_once_into_cached_objects(tmp_path, monkeypatch):
    """A dilated conv (none of our kernels takes it), a ReLU and a pooling are TVM's own
    PrimFuncs. Each is built once into the kernel cache and linked as our kernels are: a second
    model of the same shapes builds no TIR and links the same files."""
    monkeypatch.setenv("HWNAS_CACHE", str(tmp_path))

    def model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        conv = nn.Conv2d(3, 8, 3, padding=2, dilation=2)
        return nn.Sequential(conv, nn.ReLU(), nn.AvgPool2d(2), nn.Flatten()).eval()

    x = torch.randn(1, 3, 8, 8)
    first = hw_compile.build(model(1), x, HOST)  # checked against torch
    assert first.kernels["0"]["impl"] == "tvm-default"
    assert len(first.objects) >= 3
    built = sorted((tmp_path / "objects").glob("*.o"))
    second = hw_compile.build(model(2), x, HOST)
    assert sorted(second.objects) == sorted(first.objects)
    assert sorted((tmp_path / "objects").glob("*.o")) == built
    out = second.export_library(tmp_path / "model.so")  # runs on the TVM runtime alone
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out)), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy())).numpy()
    with torch.no_grad():
        np.testing.assert_allclose(got, model(2)(x).numpy(), rtol=1e-4, atol=1e-5)


def test_auto_choice_times_both_kernels_and_caches_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HWNAS_CACHE", str(tmp_path))
    torch.manual_seed(7)
    model = nn.Sequential(MaskedConv2d(32, 64, 1, sparsity=0.9, block=(16, 1)), nn.ReLU())
    x = torch.randn(1, 32, 8, 8)
    compiled = hw_compile.build(model, x, HOST)  # checked against torch either way
    info = compiled.kernels["0"]
    assert info["sparse_ms"] > 0 and info["dense_ms"] > 0
    faster = "sparse" if info["sparse_ms"] <= info["dense_ms"] else "dense"
    assert info["impl"] == faster
    assert (compiled.sparse_layers == ["0"]) == (faster == "sparse")
    table = json.loads((tmp_path / "kernel_times.json").read_text())
    assert len(table) == 1
    again = hw_compile.build(model, x, HOST)  # from the cache: the same decision and times
    assert again.kernels["0"] == info


def test_a_cold_build_parses_every_kernel_ahead_of_its_build(tmp_path, monkeypatch):
    """With an empty cache the layers are planned once with their timings left pending, then
    every kernel to time is parsed ahead, in order, on a thread of its own while the one
    before is built (`KernelChooser.defer`, `parse_unbuilt`), and the layers are planned
    again with their times. No kernel is parsed on demand; a second build parses nothing."""
    from compile import kernels, objects

    monkeypatch.setenv("HWNAS_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_made", {})
    on_demand = []
    parse = kernels._parse_on_a_thread
    monkeypatch.setattr(
        kernels, "_parse_on_a_thread", lambda kernel: on_demand.append(kernel) or parse(kernel)
    )
    ahead, asked = [], []
    monkeypatch.setattr(
        kernels, "_parse", lambda k, parse=kernels._parse: ahead.append(k) or parse(k)
    )
    monkeypatch.setattr(
        objects, "parse_ahead", lambda ks, ask=objects.parse_ahead: asked.append(ks) or ask(ks)
    )
    torch.manual_seed(9)
    model = nn.Sequential(
        MaskedConv2d(16, 32, 1, sparsity=0.9, block=(16, 1)),
        nn.ReLU(),
        MaskedConv2d(32, 24, 1, sparsity=0.8, block=(4, 1)),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(24 * 36, 10),
    ).eval()
    compiled = hw_compile.build(model, torch.randn(1, 16, 6, 6), HOST)
    # the two sparse kernels, the convs' dense one (the same for both), the Linear's
    assert on_demand == [] and len(set(ahead)) == len(ahead) == 4
    assert len(asked[0]) == 4  # both layers' timing jobs at once (the dense kernel twice)
    assert all(compiled.kernels[n]["sparse_ms"] > 0 for n in ("0", "2"))
    ahead.clear()
    hw_compile.build(model, torch.randn(1, 16, 6, 6), HOST)
    assert ahead == [] and on_demand == []


def test_a_forked_child_parses_kernels_ahead_too():
    """A child forked after a parse ahead has no parse thread of its parent's (threads do not
    survive a fork): it starts its own, and its parses ahead complete instead of waiting for
    ever."""
    from compile.kernels import parse_ahead

    first = Kernel("sparse", "x86", KernelSpec(1, 0, 0, 49, (4, 1), 0, "relu"))
    second = Kernel("sparse", "x86", KernelSpec(1, 0, 0, 47, (4, 1), 0, "relu"))
    parse_ahead([first])
    first.func()
    pid = os.fork()
    if pid == 0:  # the child: parse ahead, take the parse, leave at once
        code = 1
        try:
            parse_ahead([second])
            code = 0 if second.func() is not None else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's parse ahead never completed")
    assert os.waitstatus_to_exitcode(done[1]) == 0


@pytest.mark.parametrize(("size", "alone"), [(8, "dense"), (32, "dense"), (8, "sparse")])
def test_an_expand_conv_is_fused_when_the_pair_is_faster(size, alone, tmp_path, monkeypatch):
    """The kernel choice times a 1x1 conv's kernels alone; the fused kernel (the conv sparse,
    inside the depthwise conv) is then timed against the two calls (the conv's chosen kernel,
    sparse or dense, then the depthwise conv), and the faster way is kept. The cached times are
    edited to make each way the faster one. At 32x32 the dense kernel reads a padded copy of X
    (`_copies_off_pages`), timed with it; the fused kernel reads X as it is."""
    monkeypatch.setenv("HWNAS_CACHE", str(tmp_path))
    torch.manual_seed(8)
    model = nn.Sequential(
        MaskedConv2d(16, 48, 1, sparsity=0.9, block=(16, 1)),
        nn.ReLU6(),
        nn.Conv2d(48, 48, 3, 1, 1, groups=48),
    ).eval()
    x = torch.randn(1, 16, size, size)
    hw_compile.build(model, x, HOST)
    path = tmp_path / "kernel_times.json"
    table = {key: v for key, v in json.loads(path.read_text()).items() if "|fused|" not in key}
    (choice_key,) = table
    copied = size == 32
    assert choice_key.endswith("|copied") == copied
    assert ("dense_copy_ms" in table[choice_key]) == copied
    assert "sparse_copy_ms" not in table[choice_key]  # the sparse kernel reads X as it is
    # The conv alone: 0.5 ms on its faster kernel (the dense one 0.4 after a copy of 0.1 at
    # 32x32), 1.0 on the other.
    copy = 0.1 if copied else 0.0
    fast = 0.5 - copy
    dense_copy = {"dense_copy_ms": copy} if copied else {}
    table[choice_key] = {"sparse_ms": 1.0, "dense_ms": 1.0, f"{alone}_ms": fast, **dense_copy}
    conv = {"conv_ms": fast, **({"conv_copy_ms": copy} if copied else {})}
    path.write_text(json.dumps(table))
    hw_compile.build(model, x, HOST)  # times the fused kernel and the two calls, in turns
    (fused_key,) = (key for key in json.loads(path.read_text()) if "|fused|" in key)
    # the layer's sizes: a CPU kernel's key has none
    assert f"|1x16x{size}x{size}x48|" in fused_key
    assert fused_key.endswith("|copied") == copied
    assert json.loads(path.read_text())[fused_key].keys() == {"fused_ms", "depthwise_ms", *conv}
    for fused_ms, depthwise_ms, fuses in ((0.6, 0.2, True), (0.8, 0.2, False)):
        table = json.loads(path.read_text())
        table[fused_key] = {"fused_ms": fused_ms, "depthwise_ms": depthwise_ms, **conv}
        path.write_text(json.dumps(table))
        compiled = hw_compile.build(model, x, HOST)  # checked against torch either way
        info, dw = compiled.kernels["0"], compiled.kernels["2"]
        assert info["sparse_ms"] + info["dense_ms"] == 1.5
        if fuses:  # 0.6 ms against 0.5 + 0.2
            assert info["impl"] == "sparse" and info["fused_into"] == "2"
            saved = CALL_MS * (2 if copied else 1)  # the calls the fusion saves
            assert (dw["fused_ms"], dw["unfused_ms"]) == (0.6, pytest.approx(0.7 + saved))
            assert compiled.sparse_layers == ["0"] and "0" not in compiled.dense_reasons
            assert not info["im2col"]
        else:  # 0.8 ms against 0.7: the conv on its own kernel
            assert info["impl"] == alone and "fused_into" not in info
            assert info["im2col"] == copied
            assert "fused_expand" not in dw and "fused_ms" not in dw
            assert (compiled.sparse_layers == ["0"]) == (alone == "sparse")
            if alone == "dense":
                reason = compiled.dense_reasons["0"]
                assert ("(each with the copy of its input it reads)" in reason) == copied


def test_untimed_target_goes_sparse_above_the_threshold(tmp_path):
    target = tvm.target.Target(HOST.target)
    chooser = KernelChooser(target, host_runnable=False, directory=tmp_path)
    spec = KernelSpec(1, 8, 8, 4, (4, 1), 2)
    layer = KernelCandidate(Kernel("sparse", "x86", spec), [], spec)
    assert chooser.choose(layer, layer, density=0.1).impl == "sparse"
    chosen = chooser.choose(layer, layer, density=0.5)
    assert chosen.impl == "dense" and "not timed on this host" in chosen.reason
    assert not chooser.pending and not chooser.time_pending()
    with pytest.raises(ValueError, match="kernel_choice"):
        KernelChooser(tvm.target.Target(HOST.target), host_runnable=True, mode="fast")


def test_mbv2_sparse_all_layers_on_our_kernels():
    from search_spaces.spaces import get_space

    space = get_space("mbv2-sparse")
    arch = space.sample(random.Random(3))
    for i in range(1, 5):
        arch[f"s{i}.op"] = "sparse"
    arch["classifier.sparsity"] = 0.0
    torch.manual_seed(8)
    model = space.build(arch, num_classes=10, in_channels=3, image_size=32).eval()
    # build() checks the output against torch.
    compiled = hw_compile.build(model, torch.randn(1, 3, 32, 32), HOST, kernel_choice="sparse")
    assert all(info["impl"] != "tvm-default" for info in compiled.kernels.values())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(compiled.folded_batchnorm) == n_bn
    assert len(compiled.sparse_layers) == 12  # expand + project in all 6 blocks


# ---------------------------------------------------------------- errors


def test_compare_outputs_names_the_worst_element():
    want = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert hw_compile.compare_outputs(want.copy(), want) is None
    got = want.copy()
    got[2, 1] += 0.5
    message = hw_compile.compare_outputs(got, want)
    assert "(2, 1)" in message
    assert issubclass(hw_compile.OutputMismatch, hw_compile.CompileError)


def test_unsupported_family_is_a_compile_error():
    profile = LocalProfile(target={"kind": "rocm", "mcpu": "gfx90a"}, family="rocm")
    with pytest.raises(hw_compile.CompileError, match="'rocm' has no kernels"):
        hw_compile.build(nn.Linear(4, 2), torch.randn(1, 4), profile)
