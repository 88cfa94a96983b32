"""CUDA schedules of our kernels: the BSR matmul, its dense twin, depthwise conv and im2col.

Same signatures as the CPU kernels in `compile.kernels`. One thread per output element (per
bs_r output rows for the matmuls), threads of a warp on consecutive M columns, so that the
activation loads are coalesced and the weights of a block row are broadcast across the warp.
The accumulators live in registers; bias and activation are fused into the store.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from compile.kernels import ACTIVATIONS, ConvGeometry, KernelSpec, stored_blocks

THREADS_PER_BLOCK = 128


def _launch(work: int) -> tuple[int, int]:
    """(blocks, threads per block) covering `work` threads."""
    threads = max(1, min(THREADS_PER_BLOCK, work))
    return -(-work // threads), threads


@T.macro
def _store(y_buf, tb, row, tm, value, act):
    if act == 0:
        y_buf[tb, row, tm] = value
    elif act == 1:
        y_buf[tb, row, tm] = T.max(value, T.float32(0))
    else:
        y_buf[tb, row, tm] = T.min(T.max(value, T.float32(0)), T.float32(6))


def bsr_matmul_cuda(spec: KernelSpec) -> tirx.PrimFunc:
    """BSR W x X on a GPU: one thread per (batch, block row, m), bs_r accumulators each."""
    B, N, K, M = spec.batch, spec.rows, spec.cols, spec.m
    BR, BC = spec.block
    NNZB, NRB = stored_blocks(), spec.block_rows
    work = B * NRB * M
    n_blocks, n_threads = _launch(work)
    act = ACTIVATIONS.index(spec.activation)

    @T.prim_func(s_tir=True)
    def bsr_matmul(
        X: T.Buffer((B, K, M), "float32"),
        data: T.Buffer((NNZB, BR, BC), "float32"),
        indices: T.Buffer((NNZB,), "int32"),
        indptr: T.Buffer((NRB + 1,), "int32"),
        bias: T.Buffer((N,), "float32"),
        Y: T.Buffer((B, N, M), "float32"),
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        for bx in T.thread_binding(n_blocks, thread="blockIdx.x"):
            for tx in T.thread_binding(n_threads, thread="threadIdx.x"):
                acc = T.alloc_buffer((BR,), "float32", scope="local")
                w = T.bind(bx * n_threads + tx)
                if w < work:
                    m = T.bind(w % M)
                    rb = T.bind(w // M % NRB)
                    b = T.bind(w // (M * NRB))
                    for i in T.unroll(BR):
                        acc[i] = T.float32(0)
                    for p0 in range(indptr[rb + 1] - indptr[rb]):
                        p = T.bind(indptr[rb] + p0)
                        k0 = T.bind(indices[p])
                        for c in T.unroll(BC):
                            for i in T.unroll(BR):
                                acc[i] = acc[i] + data[p, i, c] * X[b, k0 + c, m]
                    for i in T.unroll(BR):
                        if rb * BR + i < N:
                            _store(Y, b, rb * BR + i, m, acc[i] + bias[rb * BR + i], act)

    return bsr_matmul


def dense_matmul_cuda(spec: KernelSpec) -> tirx.PrimFunc:
    """Dense twin of `bsr_matmul_cuda`: W packed as (N / bs_r, K, bs_r), no indirection."""
    B, N, K, M = spec.batch, spec.rows, spec.cols, spec.m
    BR = spec.block[0]
    NRB = spec.block_rows
    work = B * NRB * M
    n_blocks, n_threads = _launch(work)
    act = ACTIVATIONS.index(spec.activation)

    @T.prim_func(s_tir=True)
    def dense_matmul(
        X: T.Buffer((B, K, M), "float32"),
        data: T.Buffer((NRB, K, BR), "float32"),
        bias: T.Buffer((N,), "float32"),
        Y: T.Buffer((B, N, M), "float32"),
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        for bx in T.thread_binding(n_blocks, thread="blockIdx.x"):
            for tx in T.thread_binding(n_threads, thread="threadIdx.x"):
                acc = T.alloc_buffer((BR,), "float32", scope="local")
                w = T.bind(bx * n_threads + tx)
                if w < work:
                    m = T.bind(w % M)
                    rb = T.bind(w // M % NRB)
                    b = T.bind(w // (M * NRB))
                    for i in T.unroll(BR):
                        acc[i] = T.float32(0)
                    for k in range(K):
                        for i in T.unroll(BR):
                            acc[i] = acc[i] + data[rb, k, i] * X[b, k, m]
                    for i in T.unroll(BR):
                        if rb * BR + i < N:
                            _store(Y, b, rb * BR + i, m, acc[i] + bias[rb * BR + i], act)

    return dense_matmul


def depthwise_conv_cuda(geo: ConvGeometry, activation: str = "none") -> tirx.PrimFunc:
    """Depthwise kxk conv on a GPU: one thread per output element, zero padding by bounds."""
    B, C, H, W = geo.batch, geo.channels, geo.height, geo.width
    KH, KW = geo.kernel
    SH, SW = geo.stride
    PT, PL = geo.pad
    OH, OW = geo.out_height, geo.out_width
    work = B * C * OH * OW
    n_blocks, n_threads = _launch(work)
    act = ACTIVATIONS.index(activation)

    @T.prim_func(s_tir=True)
    def depthwise_conv(
        X: T.Buffer((B, C, H, W), "float32"),
        weight: T.Buffer((C, KH, KW), "float32"),
        bias: T.Buffer((C,), "float32"),
        Y: T.Buffer((B, C, OH, OW), "float32"),
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        for bx in T.thread_binding(n_blocks, thread="blockIdx.x"):
            for tx in T.thread_binding(n_threads, thread="threadIdx.x"):
                acc = T.alloc_buffer((1,), "float32", scope="local")
                w = T.bind(bx * n_threads + tx)
                if w < work:
                    ow = T.bind(w % OW)
                    oh = T.bind(w // OW % OH)
                    c = T.bind(w // (OW * OH) % C)
                    b = T.bind(w // (OW * OH * C))
                    acc[0] = T.float32(0)
                    for kh in T.unroll(KH):
                        for kw in T.unroll(KW):
                            ih = T.bind(oh * SH + kh - PT)
                            iw = T.bind(ow * SW + kw - PL)
                            if 0 <= ih and ih < H and 0 <= iw and iw < W:
                                acc[0] = acc[0] + weight[c, kh, kw] * X[b, c, ih, iw]
                    if act == 0:
                        Y[b, c, oh, ow] = acc[0] + bias[c]
                    elif act == 1:
                        Y[b, c, oh, ow] = T.max(acc[0] + bias[c], T.float32(0))
                    else:
                        Y[b, c, oh, ow] = T.min(
                            T.max(acc[0] + bias[c], T.float32(0)), T.float32(6)
                        )

    return depthwise_conv


def im2col_cuda(geo: ConvGeometry) -> tirx.PrimFunc:
    """Unfold NCHW input into (B, C * kh * kw, OH * OW) columns: one thread per element."""
    B, C, H, W = geo.batch, geo.channels, geo.height, geo.width
    KH, KW = geo.kernel
    SH, SW = geo.stride
    PT, PL = geo.pad
    OH, OW = geo.out_height, geo.out_width
    work = B * C * KH * KW * OH * OW
    n_blocks, n_threads = _launch(work)

    @T.prim_func(s_tir=True)
    def im2col(
        X: T.Buffer((B, C, H, W), "float32"),
        Y: T.Buffer((B, C * KH * KW, OH * OW), "float32"),
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        # One input, one output: Relax checks such calls for a reshape pattern, which needs the
        # body to be a block.
        with T.sblock("root"):
            for bx in T.thread_binding(n_blocks, thread="blockIdx.x"):
                for tx in T.thread_binding(n_threads, thread="threadIdx.x"):
                    w = T.bind(bx * n_threads + tx)
                    if w < work:
                        j = T.bind(w % (OH * OW))
                        r = T.bind(w // (OH * OW) % (C * KH * KW))
                        b = T.bind(w // (OH * OW * C * KH * KW))
                        ih = T.bind(j // OW * SH + r // KW % KH - PT)
                        iw = T.bind(j % OW * SW + r % KW - PL)
                        Y[b, r, j] = T.if_then_else(
                            0 <= ih and ih < H and 0 <= iw and iw < W,
                            X[
                                b,
                                r // (KH * KW),
                                T.max(T.min(ih, H - 1), 0),
                                T.max(T.min(iw, W - 1), 0),
                            ],
                            T.float32(0),
                        )

    return im2col
