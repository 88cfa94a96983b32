"""CUDA schedules of our kernels: the BSR matmul, its dense twin, depthwise conv and im2col.

Same signatures as the CPU kernels in `compile.kernels`. Matmuls: one thread per (batch, row
group of a block row, M column), threads of a warp on consecutive M columns, so that the
activation loads are coalesced and the weights of a block row are broadcast across the warp. A
block row is split into row groups only when the kernel would otherwise launch too few threads
to fill the GPU (small maps, tall blocks). At M == 1 (a Linear at batch 1) a warp takes a block
row: its lanes share out the row's blocks and add their sums with warp shuffles. Accumulators
live in registers; bias and activation are fused into the store.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from compile.kernels import (
    ACTIVATIONS,
    KERNEL_ATTRS,
    ConvGeometry,
    KernelSpec,
    _activate,
    _drop_unused_inputs,
    _epilogue,
    _finish,
    bsr_func,
    stored_blocks,
)

THREADS_PER_BLOCK = 128
# Threads a matmul launch should have to keep a large GPU busy (132 SMs x 256 on an H100);
# below this, block rows are split into row groups.
FILL_THREADS = 32768
WARP = 32
WARPS_PER_BLOCK = 4  # matrix-vector kernel: block rows per thread block


def _launch(work: int) -> tuple[int, int]:
    """(blocks, threads per block) covering `work` threads."""
    threads = max(1, min(THREADS_PER_BLOCK, work))
    return -(-work // threads), threads


def row_groups(spec: KernelSpec, rows_per_block: int) -> int:
    """How many threads share a block row's `rows_per_block` rows (a divisor of it): the fewest
    that give the launch FILL_THREADS threads, or one per row."""
    threads = spec.batch * spec.block_rows * spec.m
    for groups in range(1, rows_per_block + 1):
        if rows_per_block % groups == 0 and threads * groups >= FILL_THREADS:
            return groups
    return rows_per_block


@T.macro
def _store_rows(acc_buf, bias_buf, r_buf, y_buf, tb, row0, m, rows, n_rows, epilogue):
    """Rows row0 .. row0 + rows - 1 of Y (those below n_rows) at column m: the accumulators
    plus their bias, finished (`compile.kernels._finish`)."""
    for i in T.unroll(rows):
        row = T.bind(row0 + i)
        if row < n_rows:
            y_buf[tb, row, m] = _finish(acc_buf[i] + bias_buf[row], r_buf[tb, row, m], epilogue)


@dataclass(frozen=True)
class _Grid:
    """A matmul's threads: one per (batch, row group of a block row, M column)."""

    blocks: int  # thread blocks
    threads: int  # per thread block
    work: int  # threads that have an output
    m: int
    groups: int  # row groups per block row
    block_rows: int
    block_height: int  # rows per block row
    rows_per_thread: int
    rows: int  # N


def _thread_grid(spec: KernelSpec) -> _Grid:
    height = spec.block[0]
    groups = row_groups(spec, height)
    work = spec.batch * spec.block_rows * groups * spec.m
    return _Grid(
        *_launch(work), work, spec.m, groups, spec.block_rows, height, height // groups, spec.rows
    )


@T.macro
def _per_thread(body, args, bias_buf, r_buf, y_buf, grid, epilogue):
    """A matmul's threads (`_Grid`): each zeroes its rows' accumulators, has
    `body(*args, acc, batch, block row, first row of its group, column)` add to them, and
    stores them (`_store_rows`)."""
    for bx in T.thread_binding(grid.blocks, thread="blockIdx.x"):
        for tx in T.thread_binding(grid.threads, thread="threadIdx.x"):
            acc = T.alloc_buffer((grid.rows_per_thread,), "float32", scope="local")
            w = T.bind(bx * grid.threads + tx)
            if w < grid.work:
                m = T.bind(w % grid.m)
                g = T.bind(w // grid.m % grid.groups)
                rb = T.bind(w // (grid.m * grid.groups) % grid.block_rows)
                b = T.bind(w // (grid.m * grid.groups * grid.block_rows))
                for i in T.unroll(grid.rows_per_thread):
                    acc[i] = T.float32(0)
                body(*args, acc, b, rb, g * grid.rows_per_thread, m)
                _store_rows(
                    acc,
                    bias_buf,
                    r_buf,
                    y_buf,
                    b,
                    rb * grid.block_height + g * grid.rows_per_thread,
                    m,
                    grid.rows_per_thread,
                    grid.rows,
                    epilogue,
                )


def bsr_matmul_cuda(spec: KernelSpec) -> tirx.PrimFunc:
    """BSR W x X on a GPU: one thread per (batch, row group, m), a group's rows of a block row
    accumulated in registers over the row's blocks. M == 1: `bsr_matvec_cuda`."""
    if spec.m == 1:
        return bsr_matvec_cuda(spec)
    N, K = spec.rows, spec.cols
    BR, BC = spec.block
    NNZB, NRB = stored_blocks(), spec.block_rows
    grid = _thread_grid(spec)
    RT = grid.rows_per_thread
    epilogue = _epilogue(spec)

    @T.macro
    def block_row(x_buf, w_data, w_indices, w_indptr, acc_buf, tb, trb, r0, m):
        """Rows r0 .. r0 + RT - 1 of block row `trb`, over its blocks, at column m."""
        for p0 in range(w_indptr[trb + 1] - w_indptr[trb]):
            p = T.bind(w_indptr[trb] + p0)
            k0 = T.bind(w_indices[p])
            for c in T.unroll(BC):
                for i in T.unroll(RT):
                    acc_buf[i] = acc_buf[i] + w_data[p, r0 + i, c] * x_buf[tb, k0 + c, m]

    @T.macro
    def body(X, data, indices, indptr, bias, R, Y):
        _per_thread(block_row, (X, data, indices, indptr), bias, R, Y, grid, epilogue)

    return bsr_func("bsr_matmul", spec, K, N, (NNZB, BR, BC), NRB + 1, body)


def bsr_matvec_cuda(spec: KernelSpec) -> tirx.PrimFunc:
    """BSR W x x (M == 1) on a GPU: a warp per (batch, block row). Lane j takes the row's blocks
    j, j + 32, ...; the lanes' sums are added with warp shuffles and lane 0 stores the rows.
    A dense W comes as a BSR matrix with every block (`full_bsr`), as on the CPU."""
    B, N, K = spec.batch, spec.rows, spec.cols
    BR, BC = spec.block
    NNZB, NRB = stored_blocks(), spec.block_rows
    work = B * NRB
    warps = min(WARPS_PER_BLOCK, work)
    n_blocks = -(-work // warps)
    epilogue = _epilogue(spec)
    full = T.uint32(0xFFFFFFFF)

    @T.macro
    def body(X, data, indices, indptr, bias, R, Y):
        for bx in T.thread_binding(n_blocks, thread="blockIdx.x"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for lane in T.thread_binding(WARP, thread="threadIdx.x"):
                    acc = T.alloc_buffer((BR,), "float32", scope="local")
                    w = T.bind(bx * warps + ty)
                    if w < work:  # the same for the whole warp: every lane shuffles below
                        rb = T.bind(w % NRB)
                        b = T.bind(w // NRB)
                        start = T.bind(indptr[rb])
                        count = T.bind(indptr[rb + 1] - start)
                        for i in T.unroll(BR):
                            acc[i] = T.float32(0)
                        for j in range((count - lane + WARP - 1) // WARP):
                            p = T.bind(start + lane + j * WARP)
                            k0 = T.bind(indices[p])
                            for c in T.unroll(BC):
                                for i in T.unroll(BR):
                                    acc[i] = acc[i] + data[p, i, c] * X[b, k0 + c, 0]
                        for i in T.unroll(BR):
                            for s in T.unroll(5):
                                acc[i] = acc[i] + T.tvm_warp_shuffle_down(
                                    full, acc[i], 16 >> s, WARP, WARP
                                )
                        if lane == 0:
                            _store_rows(acc, bias, R, Y, b, rb * BR, 0, BR, N, epilogue)

    return bsr_func("bsr_matvec", spec, K, N, (NNZB, BR, BC), NRB + 1, body)


def dense_matmul_cuda(spec: KernelSpec) -> tirx.PrimFunc:
    """Dense twin of `bsr_matmul_cuda`: W packed as (N / bs_r, K, bs_r), no indirection. (At
    M == 1 the dense twin is `bsr_matvec_cuda` on a BSR matrix with every block.)"""
    B, N, K, M = spec.batch, spec.rows, spec.cols, spec.m
    BR = spec.block[0]
    NRB = spec.block_rows
    grid = _thread_grid(spec)
    RT = grid.rows_per_thread
    epilogue = _epilogue(spec)

    @T.macro
    def row_block(x_buf, w_data, acc_buf, tb, trb, r0, m):
        """Rows r0 .. r0 + RT - 1 of row block `trb`, over K, at column m."""
        for k in range(K):
            for i in T.unroll(RT):
                acc_buf[i] = acc_buf[i] + w_data[trb, k, r0 + i] * x_buf[tb, k, m]

    @T.prim_func(s_tir=True)
    def dense_matmul(
        X4: T.Buffer(spec.x_shape, "float32"),
        data: T.Buffer((NRB, K, BR), "float32"),
        bias: T.Buffer((N,), "float32"),
        R4: T.Buffer(spec.y_shape, "float32"),
        Y4: T.Buffer(spec.y_shape, "float32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        X = T.decl_buffer((B, K, M), "float32", data=X4.data)
        Y = T.decl_buffer((B, N, M), "float32", data=Y4.data)
        R = T.decl_buffer((B, N, M), "float32", data=R4.data)
        _per_thread(row_block, (X, data), bias, R, Y, grid, epilogue)

    return _drop_unused_inputs(dense_matmul, spec)


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
        T.func_attr(KERNEL_ATTRS)
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
                    Y[b, c, oh, ow] = _activate(acc[0] + bias[c], act)

    return depthwise_conv


def expand_depthwise_cuda(
    expand: KernelSpec, geo: ConvGeometry, activation: str = "none"
) -> tirx.PrimFunc:
    """A sparse 1x1 conv (`expand`) and the depthwise conv that reads its output (`geo`) in one
    kernel, one thread per depthwise output: each of its kh x kw inputs is expanded where it is
    read, from the expand weight's row in CSR form. An expanded value is made once per output
    that reads it (kh x kw times), which costs only the row's nonzeros; the expanded tensor
    never goes to memory and a launch goes away (a small net on a GPU is launch-bound).
    Takes the arrays of `compile.kernels.expand_depthwise_cpu`."""
    B, C, H, W = geo.batch, geo.channels, geo.height, geo.width
    K = expand.cols
    NNZ = tirx.Var("nnz", "int32")
    KH, KW = geo.kernel
    SH, SW = geo.stride
    PT, PL = geo.pad
    OH, OW = geo.out_height, geo.out_width
    work = B * C * OH * OW
    n_blocks, n_threads = _launch(work)
    act = ACTIVATIONS.index(activation)
    expand_act = ACTIVATIONS.index(expand.activation)

    @T.prim_func(s_tir=True)
    def expand_depthwise(
        X: T.Buffer((B, K, H, W), "float32"),
        data: T.Buffer((NNZ,), "float32"),
        indices: T.Buffer((NNZ,), "int32"),
        indptr: T.Buffer((C + 1,), "int32"),
        expand_bias: T.Buffer((C,), "float32"),
        weight: T.Buffer((C, KH, KW), "float32"),
        bias: T.Buffer((C,), "float32"),
        Y: T.Buffer((B, C, OH, OW), "float32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        for bx in T.thread_binding(n_blocks, thread="blockIdx.x"):
            for tx in T.thread_binding(n_threads, thread="threadIdx.x"):
                acc = T.alloc_buffer((2,), "float32", scope="local")  # depthwise, expanded
                w = T.bind(bx * n_threads + tx)
                if w < work:
                    ow = T.bind(w % OW)
                    oh = T.bind(w // OW % OH)
                    c = T.bind(w // (OW * OH) % C)
                    b = T.bind(w // (OW * OH * C))
                    p_lo = T.bind(indptr[c])
                    n_p = T.bind(indptr[c + 1] - p_lo)
                    acc[0] = T.float32(0)
                    for kh in T.unroll(KH):
                        for kw in T.unroll(KW):
                            ih = T.bind(oh * SH + kh - PT)
                            iw = T.bind(ow * SW + kw - PL)
                            if 0 <= ih and ih < H and 0 <= iw and iw < W:
                                acc[1] = expand_bias[c]
                                for p0 in range(n_p):
                                    acc[1] = (
                                        acc[1] + data[p_lo + p0] * X[b, indices[p_lo + p0], ih, iw]
                                    )
                                acc[0] = acc[0] + weight[c, kh, kw] * _activate(acc[1], expand_act)
                    Y[b, c, oh, ow] = _activate(acc[0] + bias[c], act)

    return expand_depthwise


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
        T.func_attr(KERNEL_ATTRS)
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
