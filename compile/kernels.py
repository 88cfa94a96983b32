"""Our sparse TensorIR kernels: BSR weight x dense activations, one schedule per target family.

Every kernel computes ``Y[b, n, m] = act(sum_k W[n, k] * X[b, k, m] + bias[n])`` with W in BSR
form (see `compile.bsr`). A 1x1 NCHW convolution is this with K = C_in and M = H * W; a Linear is
this with the activations transposed (K = in_features, M = batch rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

ACTIVATIONS = ("none", "relu", "relu6")


@dataclass(frozen=True)
class KernelSpec:
    """Static shape and fused epilogue of one sparse layer's kernel."""

    batch: int
    rows: int  # N: output features / channels
    cols: int  # K: input features / channels
    m: int  # columns of the activation matrix (H * W, or the Linear's batch rows)
    block: tuple[int, int]
    nnz_storage: int  # blocks stored in `data` (at least 1)
    block_rows: int
    activation: str = "none"


@dataclass(frozen=True)
class Tiling:
    """Per-shape schedule parameters: M-tile width and number of parallel chunks."""

    tile_m: int
    chunks: int


def choose_tiling(
    family: str, spec: KernelSpec, num_cores: int | None = None, avx512: bool = True
) -> Tiling:
    """Pick the M tile (accumulators kept in registers) and parallel chunk count for a shape."""
    if family == "x86" and avx512:
        acc_budget, vector, widest = 256, 16, 128  # 32 AVX-512 registers of 16 floats
    elif family == "x86":
        acc_budget, vector, widest = 96, 8, 128  # 16 AVX2 registers of 8 floats
    elif family == "arm":
        acc_budget, vector, widest = 64, 4, 32  # 32 NEON registers of 4 floats, half for acc
    else:
        raise KeyError(family)
    bs_r = spec.block[0]
    tile = max(vector, min(widest, acc_budget // bs_r // vector * vector))
    tile = min(tile, spec.m)
    n_tiles = -(-spec.m // tile)
    work = spec.batch * spec.block_rows * n_tiles
    # A few chunks per core balance load; each chunk allocates its accumulators once.
    chunks = min(work, 4 * (num_cores or 16))
    return Tiling(tile_m=tile, chunks=max(1, chunks))


def bsr_matmul_cpu(spec: KernelSpec, tiling: Tiling) -> tirx.PrimFunc:
    """CPU schedule (x86 AVX2/AVX-512, ARM NEON): bs_r x tile_m accumulators in registers,
    parallel over (batch x block row x M tile), unrolled over the block, vectorized over M."""
    B, N, K, M = spec.batch, spec.rows, spec.cols, spec.m
    BR, BC = spec.block
    NNZB, NRB = spec.nnz_storage, spec.block_rows
    MT = tiling.tile_m
    n_full = M // MT
    tail = M % MT
    n_mt = n_full + (1 if tail else 0)
    work = B * NRB * n_mt
    n_chunks = min(tiling.chunks, work)
    per_chunk = -(-work // n_chunks)
    has_tail = tail > 0
    guard_rows = NRB * BR > N
    act = ACTIVATIONS.index(spec.activation)

    @T.macro
    def tile(acc_buf, x_buf, w_data, w_indices, w_indptr, bias_buf, y_buf, tb, trb, m0, width):
        for i in T.unroll(BR):
            for j in T.vectorized(width):
                acc_buf[i, j] = T.float32(0)
        # A zero-based loop plus an offset: a non-zero range start inside a parallel body
        # miscompiled once (TVM_NOTES.md).
        for p0 in range(w_indptr[trb + 1] - w_indptr[trb]):
            p = T.bind(w_indptr[trb] + p0)
            k0 = T.bind(w_indices[p])
            for c in T.unroll(BC):
                for i in T.unroll(BR):
                    for j in T.vectorized(width):
                        acc_buf[i, j] = acc_buf[i, j] + w_data[p, i, c] * x_buf[tb, k0 + c, m0 + j]
        for i in T.unroll(BR):
            if not guard_rows or trb * BR + i < N:
                for j in T.vectorized(width):
                    if act == 0:
                        y_buf[tb, trb * BR + i, m0 + j] = acc_buf[i, j] + bias_buf[trb * BR + i]
                    elif act == 1:
                        y_buf[tb, trb * BR + i, m0 + j] = T.max(
                            acc_buf[i, j] + bias_buf[trb * BR + i], T.float32(0)
                        )
                    else:
                        y_buf[tb, trb * BR + i, m0 + j] = T.min(
                            T.max(acc_buf[i, j] + bias_buf[trb * BR + i], T.float32(0)),
                            T.float32(6),
                        )

    @T.prim_func(s_tir=True)
    def bsr_matmul(
        X: T.Buffer((B, K, M), "float32"),
        data: T.Buffer((NNZB, BR, BC), "float32"),
        indices: T.Buffer((NNZB,), "int32"),
        indptr: T.Buffer((NRB + 1,), "int32"),
        bias: T.Buffer((N,), "float32"),
        Y: T.Buffer((B, N, M), "float32"),
    ):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True, "op_pattern": 8})
        # The parallel loop runs over chunks so that the accumulators are allocated once per
        # chunk, not once per work item (a local buffer in a parallel body is a heap alloc).
        for t in T.parallel(n_chunks):
            acc = T.decl_buffer((BR, MT), "float32", scope="local")
            for w0 in range(per_chunk):
                w = T.bind(t * per_chunk + w0)
                if w < work:
                    b = T.bind(w // (NRB * n_mt))
                    rb = T.bind(w // n_mt % NRB)
                    mt = T.bind(w % n_mt)
                    if has_tail:
                        if mt < n_full:
                            tile(acc, X, data, indices, indptr, bias, Y, b, rb, mt * MT, MT)
                        else:
                            tile(acc, X, data, indices, indptr, bias, Y, b, rb, mt * MT, tail)
                    else:
                        tile(acc, X, data, indices, indptr, bias, Y, b, rb, mt * MT, MT)

    return bsr_matmul


# One schedule per target family; CUDA slots in here with its own function.
SCHEDULES: dict[str, Callable[[KernelSpec, Tiling], tirx.PrimFunc]] = {
    "x86": bsr_matmul_cpu,
    "arm": bsr_matmul_cpu,
}


def sparse_matmul_kernel(
    spec: KernelSpec, family: str, num_cores: int | None = None, avx512: bool = True
) -> tirx.PrimFunc:
    """The scheduled sparse kernel for `spec` on a target family (`x86`, `arm`)."""
    if family not in SCHEDULES:
        raise KeyError(family)
    if spec.activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {spec.activation!r}")
    return SCHEDULES[family](spec, choose_tiling(family, spec, num_cores, avx512))
