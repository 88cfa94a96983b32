"""Our TensorIR kernels, one schedule per target family: BSR (sparse) and packed dense weight x
activations, depthwise convolution and im2col.

A matmul kernel computes ``Y[b, n, m] = act(sum_k W[n, k] * X[b, k, m] + bias[n]) (+ R[b, n, m])``
with W in BSR form (see `compile.bsr`) or packed dense. A 1x1 NCHW convolution is this with
K = C_in and M = H * W (on CPUs the kernel takes the 4-D tensors as they are, and a following
residual add R is fused); a Linear is this with the activations transposed (K = in_features,
M = batch rows).
"""

from __future__ import annotations

import inspect
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

from tvm import tirx
from tvm.script import tirx as T
from tvm.script.parser.core.parser import ScriptMacro


def _find_parser(macro: ScriptMacro):
    """The parser a macro call belongs to: the first frame up the stack whose globals hold it.
    TVM 0.27's own search (`ScriptMacro._find_parser_def`) builds `inspect.getouterframes`,
    which reads the source lines of every frame on the stack at every macro call; our macros
    nest up to seven deep, and that took 80-90% of the time to make a kernel (our dense
    kernel 1.2-3.0 s, now 0.2-0.25 s; a sparse one 0.7-1.0 -> 0.1 s, a depthwise 0.4 ->
    0.07 s). The same search, over the frames alone; the kernels' TVMScript is the same. Set
    on the class, for every TVMScript macro in the process (`cuda_kernels` included)."""
    frame = inspect.currentframe()
    while frame is not None:
        parser = frame.f_globals.get(ScriptMacro.parser_object_name)
        if parser is not None:
            return parser
        frame = frame.f_back
    raise RuntimeError(f"{ScriptMacro.parser_object_name} not available")


ScriptMacro._find_parser_def = _find_parser

ACTIVATIONS = ("none", "relu", "relu6")
# TVM 0.27 turns every local buffer into a TVMBackendAllocWorkspace heap block; LLVM then cannot
# prove the accumulator tile does not alias the inputs and stores it after every FMA (~4x
# slower). This annotation keeps it a stack alloca that LLVM promotes to registers; it only
# survives when the build runs under `BUILD_CONFIG` (StorageRewrite drops annotations).
_ON_STACK = {"disable_lower_builtin": True}
BUILD_CONFIG = {"tirx.disable_storage_rewrite": True}
# Every kernel's attributes: its buffers never overlap, so LLVM may keep values in registers
# and move loads across stores (with it, TVM's LLVM codegen gives the kernel's body a function
# of its own whose pointer parameters are `noalias`); it is scheduled, so nothing schedules it
# again; and Relax fuses nothing into it (op_pattern 8, opaque). The names are TVM 0.27's: up
# to KERNEL_VERSION 32 the kernels carried "tir.noalias" and "tir.is_scheduled", which TVM
# 0.27 ignores.
KERNEL_ATTRS = {"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}
# Part of every cache key (kernel timings, built kernels): bump it when a kernel or its tiling
# changes, so that nothing built or timed before is used.
KERNEL_VERSION = 44


@dataclass(frozen=True)
class KernelSpec:
    """Static shape and fused epilogue of one sparse layer's kernel."""

    batch: int
    rows: int  # N: output features / channels
    cols: int  # K: input features / channels
    m: int  # columns of the activation matrix (H * W, or the Linear's batch rows)
    block: tuple[int, int]
    block_rows: int
    activation: str = "none"
    # A conv's X and Y are its (batch, channels, height, width) tensors, read as (batch,
    # channels, m) inside the kernel: no reshape call around it. (): a Linear's (1, features)
    # at m == 1. None: (batch, channels, m).
    in_hw: tuple[int, ...] | None = None
    out_hw: tuple[int, ...] | None = None
    # A residual tensor (Y's shape) added after the activation: an extra input before Y.
    residual: bool = False
    # Dense kernel of a channel-pruned layer: W holds only the kept rows, and two int32 arrays
    # (kept rows, pruned rows) follow it; a pruned row's output is its bias, activated.
    kept_rows: bool = False
    # 1 x c blocks walked by column block (`bsc_matmul_cpu`): the arrays are W^T's BSR in
    # c x 1 blocks (a block's index is its row of W), and block_rows counts column blocks.
    by_column: bool = False
    # The block indices come as uint16 (`takes_narrow_indices`): the matrix-vector kernel
    # reads the column starts of two or four blocks with one load.
    narrow_indices: bool = False
    # Every block row holds whole vectors of the matrix-vector kernel's blocks, zero blocks
    # added (`matvec_row_blocks`, `compile.bsr.pad_rows`): no single blocks left over.
    whole_vectors: bool = False
    # The matrix-vector kernel's FMA chains per row, chosen for W's row lengths
    # (`matvec_chains`); 0: as many as rows of any length take.
    chains: int = 0
    # X's row length when it is longer than m: an im2col output whose rows are padded off
    # whole 4 KB pages (`im2col_row`); the columns past m are never read. 0: m.
    x_row: int = 0
    # A k x k conv computed from its zero-padded input (`pad_cpu`), without im2col: (taps,
    # out_width, phase_width). X is then (batch, channels, x_row), each channel's padded plane
    # split by stride phase (`phase_shape`); W's columns are the im2col rows (channel, kh, kw),
    # and a block's index is where its column's values for output row 0 start in X
    # (`direct_offsets`). Output row oh's values start phase_width * oh further on.
    direct: tuple[int, int, int] | None = None
    # The residual is added before the activation, which applies to the sum (a ResNet block's
    # ReLU after its add), not after it.
    residual_first: bool = False
    # The matrix-vector kernel walks the block rows in groups, in lockstep
    # (`takes_lockstep`, `bsr_matvec_lockstep_cpu`, `compile.bsr.lockstep_rows`): `indptr`
    # then holds the groups' starts and their rows.
    lockstep: bool = False

    @property
    def x_width(self) -> int:
        """The length of X's rows as a matmul kernel views them (`x_row`, or m)."""
        return self.x_row or self.m

    @property
    def x_shape(self) -> tuple[int, ...]:
        cols = self.cols // self.direct[0] if self.direct else self.cols
        return (self.batch, cols, *_spatial(self.in_hw, self.x_width))

    @property
    def y_shape(self) -> tuple[int, ...]:
        return (self.batch, self.rows, *_spatial(self.out_hw, self.m))


def stored_blocks() -> tirx.Var:
    """The number of blocks a BSR kernel's `data` holds: symbolic, read from the array's shape
    when the kernel runs, so one built kernel serves every mask with the same shape and block."""
    return tirx.Var("nnzb", "int32")


def _dim(name: str) -> tirx.Var:
    """A CPU kernel's size read from its arrays' shapes when it runs (rows, cols, channels):
    the same built kernel then serves every layer that differs only in these."""
    return tirx.Var(name, "int32")


def _io_shapes(spec: KernelSpec, cols, rows) -> tuple[tuple, tuple]:
    """X's and Y's buffer shapes with the symbolic row and column counts."""
    x = (spec.batch, cols, *_spatial(spec.in_hw, spec.x_width))
    return x, (spec.batch, rows, *_spatial(spec.out_hw, spec.m))


# Bytes in a page: rows of X this long, or a whole number of them, start at the same offset
# in their pages (`im2col_row`).
PAGE = 4096


def im2col_row(m: int, family: str) -> int:
    """Row length of an im2col output with m columns, which its matmul reads as X: m, or on a
    CPU m + 16 when a row of m floats is a whole number of 4 KB pages (32x32 and 64x64 output
    maps). Rows that all start at the same offset in their pages made our matmul kernels
    1.1-1.3x slower: AVX2, 64 x 576 at M = 1024 against 1000, 1008 and 1040, dense
    1.24-1.30x, 16x1 and 1x4 at 90% 1.06-1.25x. 16 more floats shift each row by one cache
    line."""
    if family == "cuda" or (m * 4) % PAGE:
        return m
    return m + 16


def _spatial(hw: tuple[int, ...] | None, m: int) -> tuple[int, ...]:
    return (m,) if hw is None else hw


@dataclass(frozen=True)
class Tiling:
    """Per-shape schedule parameters: M-tile width, the most parallel chunks (fewer when there
    is less work), and the block rows whose accumulators are live at once (a tall block, such
    as 16x1, is computed in passes of `sub_rows` rows so that its tile stays in registers and
    is at least two vectors wide)."""

    tile_m: int
    chunks: int
    sub_rows: int = 0  # 0: the whole block
    parallel: bool = True  # False: one core (see `_chunk_loop`)
    lanes: int = 8  # float32 lanes of a vector register: a tile row is done in such pieces


@dataclass(frozen=True)
class VectorUnit:
    """A CPU's float32 SIMD registers as the tile choice sees them: lanes per register, the
    registers given to accumulators (the rest hold weights and activations), widest M tile."""

    lanes: int
    acc_registers: int
    widest: int

    @property
    def acc_budget(self) -> int:
        return self.lanes * self.acc_registers


# Per vector ISA. NEON (aarch64): 32 registers of 128 bits (4 floats); half hold
# accumulators, so a 4x1 block gets a 4 x 16 tile and a 16x1 block two 8 x 8 passes.
VECTOR_UNITS: dict[str, VectorUnit] = {
    "avx512": VectorUnit(lanes=16, acc_registers=16, widest=128),  # 32 zmm registers
    "avx2": VectorUnit(lanes=8, acc_registers=12, widest=128),  # 16 ymm registers
    "neon": VectorUnit(lanes=4, acc_registers=16, widest=32),  # 32 v registers
}


def vector_unit(family: str, avx512: bool = True) -> VectorUnit:
    """The vector unit our CPU kernels target for a family (`x86` with/without AVX-512, `arm`)."""
    if family == "x86":
        return VECTOR_UNITS["avx512" if avx512 else "avx2"]
    if family == "arm":
        return VECTOR_UNITS["neon"]
    raise KeyError(family)


def choose_tiling(
    family: str,
    spec: KernelSpec,
    num_cores: int | None = None,
    avx512: bool = True,
    dense: bool = False,
) -> Tiling:
    """Pick the M tile (accumulators kept in registers) and parallel chunk count for a shape,
    for our sparse kernel or (`dense`) our dense one."""
    unit = vector_unit(family, avx512)
    bs_r = spec.block[0]
    # Two vectors per row (fewer when M is narrower): with one, every FMA needs its own weight
    # broadcast, and a 16x1 block on AVX2 ran 1.2-1.3x slower in 8 x 8 passes than in 4 x 16.
    vectors = min(2, -(-spec.m // unit.lanes))
    sub_rows = bs_r
    while sub_rows > 1 and sub_rows % 2 == 0 and sub_rows * vectors * unit.lanes > unit.acc_budget:
        sub_rows //= 2
    per_row = max(1, unit.acc_budget // sub_rows)
    # Vectors per row: a power of two, or 3 (4 rows x 24 on AVX2: 12 accumulators beat the
    # 8 of 4 x 16, whose FMA chains just cover the FMA latency; 4x1 and 16x1 blocks at 95% on
    # 384->64 went 1.06-1.08x faster, our dense 1x1 convs 1.1-1.17x, the sparse kernel on
    # M = 64 and 128 1.03-1.3x). Rows of 6 or 12 vectors (2x2 and 1x4 blocks) were slower
    # than 4 and 8. See `_in_pieces` for how a row is written.
    # The dense kernel takes 3 only from M = 160 on: at M = 64 and 128 LLVM's code for it did
    # two steps over K per loop trip and kept the 12 accumulators on the stack, loaded and
    # stored every trip (3.5-4x slower; LLVM's unroll and interleave options did not change it).
    vectors = max(1, per_row // unit.lanes)
    if vectors != 3 or spec.m < (160 if dense else 3 * unit.lanes):
        vectors = 1 << (vectors.bit_length() - 1)
    tile = min(vectors * unit.lanes, unit.widest, spec.m)
    # A few chunks per core balance load; each chunk allocates its accumulators once.
    return Tiling(tile, _max_chunks(num_cores), sub_rows, num_cores != 1, unit.lanes)


def _max_chunks(num_cores: int | None) -> int:
    return 4 * (num_cores or 16)


def _chunk_loop(parallel: bool):
    """The loop over a kernel's chunks: parallel, or serial for a kernel built for one core.
    A parallel loop launches the thread pool even when one thread does all the work, which
    cost about 1 us with two threads on the benchmark VM (0.03 us with one)."""
    return T.parallel if parallel else T.serial


# A work index over (batch, rows) split into its batch and row. The row count is read from the
# arrays, so the split is a division at run time, avoided at batch 1 (the usual case): an
# integer division per work item costs a sparse kernel much of its time.
def _outer(w, rows, batch: int):
    return T.int32(0) if batch == 1 else w // rows


def _inner(w, rows, batch: int):
    return w if batch == 1 else w % rows


def _activate(value, act: int):
    """`value` through activation number `act` (an index into ACTIVATIONS)."""
    if act == 1:
        return T.max(value, T.float32(0))
    if act == 2:
        return T.min(T.max(value, T.float32(0)), T.float32(6))
    return value


def _epilogue(spec: KernelSpec) -> tuple[int, bool, bool]:
    """What `_finish` does to a matmul kernel's outputs: (activation number, residual or not,
    residual before the activation)."""
    return ACTIVATIONS.index(spec.activation), spec.residual, spec.residual_first


# `_finish` passing the values as they are (a dense kernel's partial sums over K blocks).
NO_EPILOGUE = (0, False, False)


def _finish(value, residual, epilogue: tuple[int, bool, bool]):
    """An output: `value` through the activation, plus `residual` when there is one (or
    `value` plus `residual` through the activation, see `KernelSpec.residual_first`).
    `epilogue`: from `_epilogue`."""
    act, has_residual, first = epilogue
    if has_residual and first:
        return _activate(value + residual, act)
    out = _activate(value, act)
    return out + residual if has_residual else out


def _out_row(row_map, row):
    """Y's row for accumulator row `row`: itself, or `row_map[row]` (kept rows only)."""
    return row if row_map is None else row_map[row]


# A tile row of `width` is done in vector pieces: width // lanes whole registers, then the
# rest (fewer than `lanes`) as one piece. A row vectorized as one wider vector kept the
# accumulators out of registers: one 24-lane vector ran 4-6x slower than three 8-lane loops,
# and a 20-lane tile or a 12- or 14-lane tail up to 10x slower than its pieces.
@T.macro
def _in_pieces(op, args, width, lanes):
    """`op(*args, offset, n)` for each piece of a row of `width`: `width // lanes` whole
    registers, then the rest (Python ints: the branch is taken when the kernel is written)."""
    for v in T.unroll(width // lanes):
        op(*args, v * lanes, lanes)
    if width % lanes > 0:
        op(*args, width - width % lanes, width % lanes)


@T.macro
def _bias_piece(acc_buf, bias_buf, i, row, off, lanes):
    for j in T.vectorized(lanes):
        acc_buf[i, off + j] = bias_buf[row]


@T.macro
def _fma_piece(acc_buf, i, weight, x_buf, tb, k, m0, off, lanes):
    for j in T.vectorized(lanes):
        acc_buf[i, off + j] = acc_buf[i, off + j] + weight * x_buf[tb, k, m0 + off + j]


def _x_row(k, first):
    """The row of an X buffer that holds X's row k: k, or k - first in a packed block."""
    return k if first is None else k - first


@T.macro
def _copy_piece(xp, x_buf, tb, k, k0, m0, off, lanes):
    for j in T.vectorized(lanes):
        xp[0, k, off + j] = x_buf[tb, k0 + k, m0 + off + j]


@T.macro
def _zero_piece(acc_buf, i, off, lanes):
    for j in T.vectorized(lanes):
        acc_buf[i, off + j] = T.float32(0)


@T.macro
def _add_piece(acc_buf, i, other, off, lanes):
    for j in T.vectorized(lanes):
        acc_buf[i, off + j] = acc_buf[i, off + j] + acc_buf[other, off + j]


def _copies(rows: int, width: int, lanes: int) -> int:
    """Copies of a `rows` x `width` tile's accumulators so that about 8 FMA chains are in flight
    (4 cycles of FMA latency, 2 FMAs a cycle): more than one only for a narrow tile (small M).
    Consecutive terms of a sum go to different copies, summed before the store."""
    return max(1, min(4, 8 // (rows * -(-width // lanes))))


@T.macro
def _zero_copies(acc_buf, rows, copies, width, lanes):
    """Rows `rows` .. `rows * copies - 1` of acc_buf (copies 1.. of a tile) to zero."""
    for i in T.unroll(rows * (copies - 1)):
        _in_pieces(_zero_piece, (acc_buf, rows + i), width, lanes)


@T.macro
def _sum_copies(acc_buf, rows, copies, width, lanes):
    """Copies 1.. of a tile's `rows` accumulator rows added into copy 0."""
    for h in T.unroll(copies - 1):
        for i in T.unroll(rows):
            _in_pieces(_add_piece, (acc_buf, i, (h + 1) * rows + i), width, lanes)


@T.macro
def _over_copies(op, args, lo, count, copies):
    """`op(*args, lo + e, h)` for e = 0 .. count - 1: consecutive terms into copies h = 0 ..
    copies - 1 of the accumulators (independent FMA chains), the rest into copy 0."""
    for q in range(count // copies):
        for h in T.unroll(copies):
            op(*args, lo + q * copies + h, h)
    for r in range(count % copies):
        op(*args, lo + count // copies * copies + r, 0)


@T.macro
def _row_loop(op, args, lo, hi, step, short):
    """`op(*args, i)` for i = lo, lo + step, ... below `hi`. Rows that may be `short` (a
    sparse W's, a few blocks at high sparsity) get a `while` loop: TVM marks the back edge of
    every `for` loop as all but certain, so LLVM unrolls it, with a set-up and a remainder
    loop at each entry however few its trips. Long rows (a dense W's) keep the `for` loop.
    So do NEON's (unmeasured): llvm-mca's in-order Cortex-A55 rates the loop without LLVM's
    unrolling 12-25% dearer per block (4x1, 16x1, 1x4 at batch 1), its out-of-order A72 the
    same."""
    if short:
        i = T.alloc_buffer((1,), "int32", scope="local", annotations=_ON_STACK)
        i[0] = lo
        while i[0] < hi:
            op(*args, i[0])
            i[0] = i[0] + step
    else:
        for q in range((hi - lo) // step):
            op(*args, lo + q * step)


@T.macro
def _store_piece(acc_buf, res_buf, y_buf, tb, r, i, m0, epilogue, off, lanes):
    for j in T.vectorized(lanes):
        y_buf[tb, r, m0 + off + j] = _finish(
            acc_buf[i, off + j], res_buf[tb, r, m0 + off + j], epilogue
        )


@T.macro
def _init_tile(acc_buf, bias_buf, row0, rows, width, lanes, n_rows, row_map):
    """Start `rows` x `width` accumulators at their rows' bias (saves an add per output in
    the epilogue; a row past the last, never stored, reads the last row's bias)."""
    for i in T.unroll(rows):
        _in_pieces(
            _bias_piece,
            (acc_buf, bias_buf, i, _out_row(row_map, T.min(row0 + i, n_rows - 1))),
            width,
            lanes,
        )


@T.macro
def _load_piece(acc_buf, y_buf, tb, r, i, m0, off, lanes):
    for j in T.vectorized(lanes):
        acc_buf[i, off + j] = y_buf[tb, r, m0 + off + j]


@T.macro
def _load_tile(acc_buf, y_buf, tb, row0, m0, rows, width, lanes, n_rows, row_map):
    """Start `rows` x `width` accumulators at the partial sums a tile stored in Y (a row past
    the last, never stored, reads the last row)."""
    for i in T.unroll(rows):
        r = T.bind(_out_row(row_map, T.min(row0 + i, n_rows - 1)))
        _in_pieces(_load_piece, (acc_buf, y_buf, tb, r, i, m0), width, lanes)


@T.macro
def _store_tile(
    acc_buf, res_buf, y_buf, tb, row0, m0, rows, width, lanes, n_rows, epilogue, guard, row_map
):
    """Write `rows` x `width` accumulators (which started at the bias, see `_init_tile`)
    through the activation to Y (to the rows `row_map` names when it is not None); then add
    `res_buf` when there is a residual. `epilogue`: from `_epilogue`."""
    for i in T.unroll(rows):
        if not guard or row0 + i < n_rows:
            r = T.bind(_out_row(row_map, row0 + i))
            _in_pieces(
                _store_piece, (acc_buf, res_buf, y_buf, tb, r, i, m0, epilogue), width, lanes
            )


def _drop_unused_inputs(func: tirx.PrimFunc, spec: KernelSpec) -> tirx.PrimFunc:
    """Our matmul kernels are written with every optional input: the residual `R4` (viewed as
    `R` at the top of the body) and a channel-pruned layer's `kept` and `pruned` rows. Drop
    the ones `spec` does not use (the body then never reads them)."""
    unused = set()
    if not spec.residual:
        unused |= {"R4", "R"}
    if not spec.kept_rows:
        unused |= {"kept", "pruned"}
    params = [p for p in func.params if p.name not in unused]
    body = [
        stmt
        for stmt in func.body.seq
        if not (isinstance(stmt, tirx.DeclBuffer) and stmt.buffer.name in unused)
    ]
    return tirx.PrimFunc(params, tirx.SeqStmt(body), func.ret_type, func.attrs)


def bsr_func(name, spec, K, N, data_shape, n_pointers, body, index="int32") -> tirx.PrimFunc:
    """BSR kernel `name` for `spec`: the parameters all our BSR kernels take (X; W's `data`,
    `indices` and `indptr`; bias; the residual R; Y), less those `spec` does not use, around
    `body`, a macro over (X, data, indices, indptr, bias, R, Y) with X, R and Y viewed as
    (batch, rows, columns), X's rows `spec.x_width` long. K, N: W's columns and rows (symbolic
    on CPUs, read from the arrays); `n_pointers`: indptr's length. TVMScript takes parameters
    only as written out, so the kernels share this one signature."""
    B, M = spec.batch, spec.m
    xs, ys = _io_shapes(spec, K, N)
    # A direct conv's blocks index X's channel planes as one row (`KernelSpec.direct`). Made
    # here: a tuple assigned in the function's body would be a TIR variable per entry, and
    # X's row length a variable instead of a constant (the session-24 kernels lost 1.2-1.5x
    # so on the 1x1 convs of the kernels grid at 95%).
    xv = (B, 1, K * spec.x_width) if spec.direct is not None else (B, K, spec.x_width)

    @T.prim_func(s_tir=True)
    def kernel(
        X4: T.Buffer(xs, "float32"),
        data: T.Buffer(data_shape, "float32"),
        indices: T.Buffer((data_shape[0],), index),
        indptr: T.Buffer((n_pointers,), "int32"),
        bias: T.Buffer((N,), "float32"),
        R4: T.Buffer(ys, "float32"),
        Y4: T.Buffer(ys, "float32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        X = T.decl_buffer(xv, "float32", data=X4.data)
        Y = T.decl_buffer((B, N, M), "float32", data=Y4.data)
        R = T.decl_buffer((B, N, M), "float32", data=R4.data)
        body(X, data, indices, indptr, bias, R, Y)

    return _drop_unused_inputs(kernel.with_attr("global_symbol", name), spec)


def bsr_matmul_cpu(spec: KernelSpec, tiling: Tiling) -> tirx.PrimFunc:
    """CPU schedule (x86 AVX2/AVX-512, ARM NEON): bs_r x tile_m accumulators in registers,
    parallel over (batch x block row x M tile), unrolled over the block, vectorized over M.
    Rows, columns and stored blocks are read from the arrays (only B, M, the block and the
    activation are built in)."""
    B, M = spec.batch, spec.m
    N, K, NP = _dim("n"), _dim("k"), _dim("block_rows_plus_one")
    BR, BC = spec.block
    NNZB, NRB = stored_blocks(), NP - 1
    MT, L = tiling.tile_m, tiling.lanes
    SR = tiling.sub_rows or BR
    direct = spec.direct is not None
    if direct:  # tiles within an output row; a work item is a row (`KernelSpec.direct`)
        _, OW, WP = spec.direct
        MT = direct_tile(OW, MT, L)
        n_full, tail, n_mt = OW // MT, OW % MT, M // OW
    else:
        OW = WP = 0
        n_full = M // MT
        tail = M % MT
        n_mt = n_full + (1 if tail else 0)
    # The tail tile's first column in a row. Assigned in a macro, even a Python int is a TIR
    # variable (its let statement in every tile loop): computed here.
    TAIL_AT = n_full * MT
    work = B * NRB * n_mt
    n_chunks = T.max(T.min(tiling.chunks, work), 1)
    chunk_loop = _chunk_loop(tiling.parallel)
    per_chunk = (work + n_chunks - 1) // n_chunks
    has_tail = tail > 0
    guard = BR > 1  # the last block row may overhang the rows
    epilogue = _epilogue(spec)

    # A narrow tile (small M) has few accumulators, each FMA chain waiting on the FMA's
    # latency: it gets copies (`_copies`). The block's columns go to different copies (1 x c
    # blocks), or consecutive blocks do. 512x512 at 90%, M = 2, 4 and 16: 1x4 blocks 1.3-1.9x
    # faster, 2x2 and 1x1 1.3-1.5x, 4x1 (M = 2, 4) 1.2x. Only an M narrower than a full tile
    # gets copies (it is then the only tile). A tail tile never does: its latency hides behind
    # the full tiles of its block row (with copies, 1x4 at M = 196 was 1.2x slower).
    CH = _copies(SR, MT, L)

    @T.macro
    def block_fmas(acc_buf, x_buf, w_data, w_indices, tb, s, m0, width, ch, index, h):
        """Block `index`'s FMAs into copy h of the accumulators (its column c into copy c % ch
        when ch divides the block's columns). `m0`: the tile's first column of X (a direct
        conv's: its offset in a channel plane)."""
        p = T.bind(index)
        k0 = T.bind(w_indices[p])
        for c in T.unroll(BC):
            for i in T.unroll(SR):
                _in_pieces(
                    _fma_piece,
                    (
                        acc_buf,
                        i if ch == 1 else (c % ch if BC % ch == 0 else h) * SR + i,
                        w_data[p, s * SR + i, c],
                        x_buf,
                        tb,
                        0 if direct else k0 + c,
                        k0 + m0 if direct else m0,
                    ),
                    width,
                    L,
                )

    @T.macro
    def tile(
        acc_buf,
        x_buf,
        w_data,
        w_indices,
        bias_buf,
        r_buf,
        y_buf,
        tb,
        row0,
        s,
        blocks,
        m0,
        xm0,
        width,
        ch,
    ):
        """One SR x width tile at (row0, m0), reading X from column `xm0` (m0, or a direct
        conv's offset in a channel plane); `blocks`: the block row's (first, count); `ch`
        copies of its accumulators (rows h * SR + i of acc_buf)."""
        p_lo, n_p = blocks
        _init_tile(acc_buf, bias_buf, row0, SR, width, L, N, None)
        if ch == 1:
            # A zero-based loop plus an offset: a non-zero range start inside a parallel body
            # miscompiled once (TVM_NOTES.md).
            for p0 in range(n_p):
                block_fmas(acc_buf, x_buf, w_data, w_indices, tb, s, xm0, width, 1, p_lo + p0, 0)
        else:
            _zero_copies(acc_buf, SR, ch, width, L)
            if BC % ch == 0:
                for p0 in range(n_p):
                    block_fmas(
                        acc_buf, x_buf, w_data, w_indices, tb, s, xm0, width, ch, p_lo + p0, 0
                    )
            else:
                _over_copies(
                    block_fmas,
                    (acc_buf, x_buf, w_data, w_indices, tb, s, xm0, width, ch),
                    p_lo,
                    n_p,
                    ch,
                )
            _sum_copies(acc_buf, SR, ch, width, L)
        _store_tile(acc_buf, r_buf, y_buf, tb, row0, m0, SR, width, L, N, epilogue, guard, None)

    @T.macro
    def block_row(bufs, acc_tail, w_indptr, tb, trb, mt_lo, mt_hi):
        """M tiles [mt_lo, mt_hi) of one block row: what depends on the row only (its blocks,
        its bias) is read once, not once per tile. The narrower tail tile has accumulators of
        its own: sharing the wide tile's, its FMAs were blended into wide registers one by one."""
        p_lo = T.bind(w_indptr[trb])
        n_p = T.bind(w_indptr[trb + 1] - p_lo)
        for s in range(BR // SR):  # passes over the block's rows, SR at a time
            row0 = T.bind(trb * BR + s * SR)
            if not guard or row0 < N:  # a pass wholly past the last row has nothing to do
                if direct:  # [mt_lo, mt_hi) are output rows, each n_full tiles and the tail
                    for oh0 in range(mt_hi - mt_lo):
                        y0 = T.bind((mt_lo + oh0) * OW)
                        x0 = T.bind((mt_lo + oh0) * WP)
                        for i in range(n_full):
                            tile(*bufs, tb, row0, s, (p_lo, n_p), y0 + i * MT, x0 + i * MT, MT, CH)
                        if has_tail:
                            tile(
                                acc_tail,
                                *bufs[1:],
                                tb,
                                row0,
                                s,
                                (p_lo, n_p),
                                y0 + TAIL_AT,
                                x0 + TAIL_AT,
                                tail,
                                1,
                            )
                else:
                    for mt0 in range(T.min(mt_hi, n_full) - mt_lo):
                        m0 = T.bind((mt_lo + mt0) * MT)
                        tile(*bufs, tb, row0, s, (p_lo, n_p), m0, m0, MT, CH)
                    if has_tail:
                        if mt_hi == n_mt:
                            tile(
                                acc_tail,
                                *bufs[1:],
                                tb,
                                row0,
                                s,
                                (p_lo, n_p),
                                TAIL_AT,
                                TAIL_AT,
                                tail,
                                1,
                            )

    @T.macro
    def body(X, data, indices, indptr, bias, R, Y):
        # The parallel loop runs over chunks so that the accumulators are allocated once per
        # chunk, not once per work item (a local buffer in a parallel body is a heap alloc).
        # A chunk's work items, (batch, block row, M tile) in that order, are walked block row
        # by block row.
        for t in chunk_loop(n_chunks):
            acc = T.alloc_buffer((SR * CH, MT), "float32", scope="local", annotations=_ON_STACK)
            acc_tail = T.alloc_buffer(
                (SR, max(tail, 1)), "float32", scope="local", annotations=_ON_STACK
            )
            lo = T.bind(t * per_chunk)
            hi = T.bind(T.min(lo + per_chunk, work))
            if lo < hi:
                r_lo = T.bind(lo // n_mt)
                for r0 in range((hi - 1) // n_mt + 1 - r_lo):
                    rbb = T.bind(r_lo + r0)
                    b = T.bind(_outer(rbb, NRB, B))
                    rb = T.bind(_inner(rbb, NRB, B))
                    mt_lo = T.bind(T.max(lo - rbb * n_mt, 0))
                    mt_hi = T.bind(T.min(hi - rbb * n_mt, n_mt))
                    block_row(
                        (acc, X, data, indices, bias, R, Y), acc_tail, indptr, b, rb, mt_lo, mt_hi
                    )

    return bsr_func("bsr_matmul", spec, K, N, (NNZB, BR, BC), NP, body)


def direct_tile(out_width: int, tile: int, lanes: int) -> int:
    """A direct conv's M tile (`KernelSpec.direct`), within an output row of `out_width`: the
    whole row when it is at most `tile` wide, else the widest whole number of vectors up to
    `tile` that divides the row, else `tile` (and a tail)."""
    if out_width <= tile:
        return out_width
    for width in range(tile - tile % lanes, lanes - 1, -lanes):
        if out_width % width == 0:
            return width
    return tile


def dense_block_rows(family: str, avx512: bool = True) -> int:
    """Rows of W per register tile in the dense kernel (8 x 32 accumulators on AVX-512)."""
    return 8 if family == "x86" and avx512 else 4


def dense_matvec_rows(rows: int, family: str, avx512: bool = True, columns: int = 1) -> int:
    """Rows per block of a dense W in the matrix-vector kernel or its columns variant (an
    all-blocks BSR matrix): the tallest of 1, 2 and 4 vectors, at most 32, that pads W's rows by
    at most 1/8 more than one vector does and leaves `columns` x rows accumulators in the
    registers. A block's index and x load serve more FMAs: on AVX2, 512x512 took 20.0 us
    with 8 x 1 blocks, 16.9 with 16 x 1 and 15.5 with 32 x 1; 10x512 0.56, 0.41 (16) and 0.76
    us (32, padded to 32 rows)."""
    unit = vector_unit(family, avx512)
    least = -(-rows // unit.lanes) * unit.lanes
    fits = [
        r
        for r in (unit.lanes, 2 * unit.lanes, 4 * unit.lanes)
        if r <= 32 and columns * r <= unit.acc_budget and -(-rows // r) * r * 8 <= least * 9
    ]
    return max(fits)


# X larger than this (bytes) is walked by our dense kernel (`dense_matmul_cpu`) tile by tile,
# K in blocks (`K_BLOCK`). Where X fits in L2 its row-block-major order was as fast or faster
# (Linear 512x512 at batch 64, X 128 KB: tile by tile re-reads W's 1 MB, 0.89-0.93x).
TILE_MAJOR_X_BYTES = 512 * 1024
# Rows of K per block where X is walked tile by tile: for one block of K, every work item of
# a chunk, the partial sums kept in Y; then the next block. A tile's rows of X for the block
# are packed (K_BLOCK x tile_m floats, 24 KB on AVX2) when its first row block comes, and
# every row block reads them from L1; W's rows for the block (N x K_BLOCK) stay in L2 while
# the tiles go by. X's own rows are 1 KB or more apart, so unpacked they fall in a few L1
# sets. AVX2, one thread, our dense kernel on 3x3 convs' im2col outputs: 128->128 at 16x16 (K
# = 1152) 62 -> 87 GFLOP/s, 256->256 and 512->512 at 8x8 1.1-1.2x, 64->64 at 32x32 (K = 576)
# unchanged. Blocks without packing: 1.2x on 128->128. Blocks of 192 or 384 rows were as fast
# as 256, 128 a little slower.
K_BLOCK = 256


def dense_matmul_cpu(spec: KernelSpec, tiling: Tiling) -> tirx.PrimFunc:
    """Dense twin of `bsr_matmul_cpu`: W packed as (N / bs_r, K, bs_r), no index indirection;
    bs_r x tile_m accumulators in registers, parallel over (batch x row block x M tile).
    Rows, columns and row blocks are read from the arrays.

    With `spec.kept_rows` (a channel-pruned layer rebuilt as a smaller dense one), W holds only
    the kept rows, their results go to the rows `kept` names, and the `pruned` rows get their
    bias through the activation (plus the residual)."""
    B, M = spec.batch, spec.m
    N, K, NRB = _dim("n"), _dim("k"), _dim("block_rows")
    NK, NPR = _dim("kept_rows"), _dim("pruned_rows")
    BR = spec.block[0]
    MT, L = tiling.tile_m, tiling.lanes
    n_full, tail = M // MT, M % MT
    n_mt = n_full + (1 if tail else 0)
    work = B * NRB * n_mt
    n_chunks = T.max(T.min(tiling.chunks, work), 1)
    chunk_loop = _chunk_loop(tiling.parallel)
    per_chunk = (work + n_chunks - 1) // n_chunks
    has_tail = tail > 0
    guard = BR > 1 or spec.kept_rows
    epilogue = _epilogue(spec)
    n_rows = NK if spec.kept_rows else N
    # Work items go tile by tile (every row block of an M tile, then the next tile), K in
    # blocks, when X outgrows L2 (`TILE_MAJOR_X_BYTES`, `K_BLOCK`).
    XM = spec.x_width
    tile_major = T.Cast("int64", K) * XM * 4 > TILE_MAJOR_X_BYTES

    # Copies of a narrow tile's accumulators (`_copies`): consecutive k go to different copies
    # (512x512 on AVX2, M = 2, 4 and 8: 1.5x faster; M = 7: 1.1x).
    CH = _copies(BR, MT, L)

    @T.macro
    def k_fmas(acc_buf, xs, w_data, trb, width, k, h):
        """Column k of the row block's W times row k of X, into copy h of the accumulators.
        xs = (buffer, batch, first column, first row): X (first row None), or a block of X's
        rows packed (`pack`; its row 0 is X's row `first row`)."""
        for i in T.unroll(BR):
            _in_pieces(
                _fma_piece,
                (acc_buf, h * BR + i, w_data[trb, k, i], xs[0], xs[1], _x_row(k, xs[3]), xs[2]),
                width,
                L,
            )

    @T.macro
    def pack(xp, x_buf, tb, m0, width, ks):
        """X's rows ks[0] .. ks[1] - 1, columns m0 .. m0 + width - 1, into xp's first rows."""
        for k in range(ks[1] - ks[0]):
            _in_pieces(_copy_piece, (xp, x_buf, tb, k, ks[0], m0), width, L)

    def row_map(kept_buf):
        """Y's row for each accumulator row (`_out_row`): the kept rows, or None (the same
        row). A Python-level choice: a TVMScript var cannot hold None."""
        return kept_buf if spec.kept_rows else None

    @T.macro
    def store(acc_buf, r_buf, y_buf, kept_buf, tb, row0, m0, width, how):
        """The tile to Y through `how`: the epilogue, or `NO_EPILOGUE` for partial sums."""
        _store_tile(
            acc_buf,
            r_buf,
            y_buf,
            tb,
            row0,
            m0,
            BR,
            width,
            L,
            n_rows,
            how,
            guard,
            row_map(kept_buf),
        )

    @T.macro
    def tile(acc_buf, xs, io, tb, trb, m0, width, ch, ks):
        """The tile's sums over k0 <= k < k1, ks = (k0, k1, first, last): X's rows read from
        `xs` (see `k_fmas`), io = (W's data, bias, R, Y, kept rows). Started at the bias if
        `first`, else at the partial sums in Y; through the epilogue if `last`, else stored as
        they are (Python bools for `first` and `last` decide when the kernel is written)."""
        if ks[2]:
            _init_tile(acc_buf, io[1], trb * BR, BR, width, L, n_rows, row_map(io[4]))
        else:
            _load_tile(acc_buf, io[3], tb, trb * BR, m0, BR, width, L, n_rows, row_map(io[4]))
        if ch == 1:
            for k in range(ks[0], ks[1]):
                k_fmas(acc_buf, xs, io[0], trb, width, k, 0)
        else:
            _zero_copies(acc_buf, BR, ch, width, L)
            _over_copies(k_fmas, (acc_buf, xs, io[0], trb, width), ks[0], ks[1] - ks[0], ch)
            _sum_copies(acc_buf, BR, ch, width, L)
        if ks[3]:
            store(acc_buf, io[2], io[3], io[4], tb, trb * BR, m0, width, epilogue)
        else:
            store(acc_buf, io[2], io[3], io[4], tb, trb * BR, m0, width, NO_EPILOGUE)

    @T.macro
    def by_rows(acc, acc_tail, x_buf, io, t, ks):
        """Chunk t's work items, row block by row block, over all of K (`ks`, see `tile`)."""
        for w0 in range(per_chunk):
            w = T.bind(t * per_chunk + w0)
            if w < work:
                b = T.bind(_outer(w // n_mt, NRB, B))
                rb = T.bind(_inner(w // n_mt, NRB, B))
                mt = T.bind(w % n_mt)
                if has_tail:
                    if mt < n_full:
                        tile(acc, (x_buf, b, mt * MT, None), io, b, rb, mt * MT, MT, CH, ks)
                    else:
                        tile(acc_tail, (x_buf, b, mt * MT, None), io, b, rb, mt * MT, tail, 1, ks)
                else:
                    tile(acc, (x_buf, b, mt * MT, None), io, b, rb, mt * MT, MT, CH, ks)

    @T.macro
    def packed_tile(acc_buf, xp, x_buf, io, b, rb, w0, m0, width, ch, ks):
        """`tile` on X's rows packed into xp, packed first at the tile's first row block (or
        the chunk's first work item)."""
        if T.Or(rb == 0, w0 == 0):
            pack(xp, x_buf, b, m0, width, ks)
        tile(acc_buf, (xp, 0, 0, ks[0]), io, b, rb, m0, width, ch, ks)

    @T.macro
    def by_tiles(acc, acc_tail, xp, x_buf, io, t, ks):
        """Chunk t's work items over K's rows `ks` (see `tile`), tile by tile; a tile's rows
        of X are packed into xp (`K_BLOCK` x `MT`) before its first row block."""
        for w0 in range(per_chunk):
            w = T.bind(t * per_chunk + w0)
            if w < work:
                b = T.bind(_outer(w % (B * NRB), NRB, B))
                rb = T.bind(_inner(w % (B * NRB), NRB, B))
                mt = T.bind(w // (B * NRB))
                if has_tail:
                    if mt < n_full:
                        packed_tile(acc, xp, x_buf, io, b, rb, w0, mt * MT, MT, CH, ks)
                    else:
                        packed_tile(acc_tail, xp, x_buf, io, b, rb, w0, mt * MT, tail, 1, ks)
                else:
                    packed_tile(acc, xp, x_buf, io, b, rb, w0, mt * MT, MT, CH, ks)

    @T.macro
    def chunk(x_buf, io, t, by_tile):
        """Chunk t's work items: row block by row block, or (`by_tile`) tile by tile with K in
        blocks of `K_BLOCK` rows."""
        acc = T.alloc_buffer((BR * CH, MT), "float32", scope="local", annotations=_ON_STACK)
        acc_tail = T.alloc_buffer(
            (BR, max(tail, 1)), "float32", scope="local", annotations=_ON_STACK
        )
        if by_tile:
            # Viewed as 3-D, as `_fma_piece` reads X; a 3-D stack array did not build.
            panel = T.alloc_buffer((K_BLOCK, MT), "float32", scope="local", annotations=_ON_STACK)
            xp = T.decl_buffer((1, K_BLOCK, MT), "float32", data=panel.data)
            for q in range((K + K_BLOCK - 1) // K_BLOCK):
                k0 = T.bind(q * K_BLOCK)
                k1 = T.bind(T.min(K, k0 + K_BLOCK))
                by_tiles(acc, acc_tail, xp, x_buf, io, t, (k0, k1, k0 == 0, k1 == K))
        else:
            by_rows(acc, acc_tail, x_buf, io, t, (0, K, True, True))

    @T.macro
    def fill_pruned(bias_buf, r_buf, y_buf, rows, q, width, m0):
        """Y's pruned row rows[q % NPR] of batch q // NPR: bias through the activation."""
        r = T.bind(rows[q % NPR])
        for j in T.vectorized(width):
            y_buf[q // NPR, r, m0 + j] = _finish(bias_buf[r], r_buf[q // NPR, r, m0 + j], epilogue)

    XS, YS = _io_shapes(spec, K, N)

    @T.prim_func(s_tir=True)
    def dense_matmul(
        X4: T.Buffer(XS, "float32"),
        data: T.Buffer((NRB, K, BR), "float32"),
        kept: T.Buffer((NK,), "int32"),
        pruned: T.Buffer((NPR,), "int32"),
        bias: T.Buffer((N,), "float32"),
        R4: T.Buffer(YS, "float32"),
        Y4: T.Buffer(YS, "float32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        X = T.decl_buffer((B, K, XM), "float32", data=X4.data)
        Y = T.decl_buffer((B, N, M), "float32", data=Y4.data)
        R = T.decl_buffer((B, N, M), "float32", data=R4.data)
        if tile_major:
            for t in chunk_loop(n_chunks):
                chunk(X, (data, bias, R, Y, kept), t, True)
        else:
            for t in chunk_loop(n_chunks):
                chunk(X, (data, bias, R, Y, kept), t, False)
        if spec.kept_rows:
            for q in chunk_loop(B * NPR):
                for mt in range(n_full):
                    fill_pruned(bias, R, Y, pruned, q, MT, mt * MT)
                if has_tail:
                    fill_pruned(bias, R, Y, pruned, q, tail, n_full * MT)

    return _drop_unused_inputs(dense_matmul, spec)


def _lane_sum(buf, base, lanes: int):
    """buf[base] + ... + buf[base + lanes - 1], as one expression."""
    total = buf[base]
    for c in range(1, lanes):
        total = total + buf[base + c]
    return total


def _row_sums(vectors: list):
    """R vectors of R lanes (R a power of two) -> one vector whose lane r is the sum of
    vectors[r]: a tree of shuffles and vector adds. Each level adds two vectors into one,
    each segment's first halves against its second halves, the two vectors' segments side by
    side (so that past the first level the shuffles stay within 128-bit halves); a last
    shuffle puts the rows in order. Written as one sum per lane instead, the matrix-vector
    kernel on 512x512 at 90-95% ran as fast with 1x2 and 1x4 blocks but 1.1-1.25x slower with
    1x8 and 1.9-2.1x with 1x16 (AVX2)."""
    lanes = len(vectors)
    items = [(v, [r]) for r, v in enumerate(vectors)]  # (vector, its rows segment by segment)
    seg = lanes
    while len(items) > 1:
        seg //= 2  # the new segments' size
        merged = []
        for (a, rows_a), (b, rows_b) in zip(items[0::2], items[1::2], strict=True):
            lo, hi, rows = [], [], []
            for j, base in enumerate(range(0, lanes, 2 * seg)):
                lo += [base + t for t in range(seg)] + [lanes + base + t for t in range(seg)]
                hi += [base + seg + t for t in range(seg)]
                hi += [lanes + base + seg + t for t in range(seg)]
                rows += [rows_a[j], rows_b[j]]
            merged.append((tirx.Shuffle([a, b], lo) + tirx.Shuffle([a, b], hi), rows))
        items = merged
    total, rows = items[0]
    return tirx.Shuffle([total], [rows.index(r) for r in range(lanes)])


# Column starts below this fit a uint16 (see `takes_narrow_indices`).
NARROW_INDEX_LIMIT = 1 << 16


def _walks_matvec(spec: KernelSpec, family: str) -> bool:
    """Whether the layer's kernel is the CPU matrix-vector kernel (`bsr_matvec_cpu`)."""
    return family != "cuda" and spec.m == 1 and not spec.by_column


def takes_narrow_indices(spec: KernelSpec, family: str) -> bool:
    """Whether the layer's kernel takes its block indices as uint16: the CPU matrix-vector
    kernel (M == 1), when every column start fits. At M == 1 a block's few multiply-adds come
    with a load of its index and of its x values, and the loads bound the kernel. AVX2,
    Linear 512x512 at 80-95%: 4x1 blocks (two indices per load) 1.1-1.15x faster, 2x2 and
    1x1 (four per load) 1.03-1.13x, 1x4 1.04-1.06x, 16x1 unchanged. One word of four shared
    by two 4x1 vectors was no faster than two words of two."""
    return _walks_matvec(spec, family) and spec.cols <= NARROW_INDEX_LIMIT


def _row_group(block: tuple[int, int]) -> int:
    """Rows of W in one work item of the matrix-vector kernel: c for 1 x c blocks (their sums
    go out as one vector), else 1."""
    return block[1] if block[0] == 1 else 1


def _blocks_per_vector(block: tuple[int, int], lanes: int) -> int:
    """Blocks the matrix-vector kernel takes to one vector of at most 8 of `lanes`: a 4x1
    block fills half an AVX2 register, so two blocks' weights are one load and one FMA."""
    return max(1, min(lanes, 8) // (block[0] * block[1]))


def matvec_row_blocks(spec: KernelSpec, family: str) -> int:
    """The multiple of blocks every block row holds when the layer's kernel is the CPU
    matrix-vector kernel and takes several blocks to a vector (`_blocks_per_vector`; AVX-512
    takes 8 lanes as AVX2 does), else 1. The build adds zero blocks (`compile.bsr.pad_rows`,
    `KernelSpec.whole_vectors`), and the kernel has no single blocks left over after a row's
    vectors: AVX2, 512x512 at 90-95%, 1x4 1.00-1.05x, 4x1 1.00-1.07x, 2x2 1.01-1.02x, 1x2
    1.02-1.04x, 1x1 1.01-1.04x faster, for 3-14% more blocks at 95%."""
    if not _walks_matvec(spec, family):
        return 1
    return _blocks_per_vector(spec.block, vector_unit(family).lanes)


def matvec_chains(block: tuple[int, int], lanes: int, row_blocks: float | None = None) -> int:
    """FMA chains per row in the matrix-vector kernel, for blocks of `block` on a vector unit
    of `lanes`, when a block row holds `row_blocks` blocks on average (None: rows of any
    length).

    Small blocks: a lone FMA chain would wait on its latency, so a row's vectors go to up to 4
    chains. The rows of a group of 1 x c rows (`_row_group`) are chains of their own; with
    4 chains each as well, their accumulators left the registers (1x4 at 95%, 512x512 at
    batch 1: 1.12-1.25x slower). A short row has fewer: its vectors go round the chains at
    least twice, on average. Otherwise its blocks fell to the kernel's code for the last
    vectors, one chain each (AVX2, 512x512 at 95%, against 4 chains: 2x2 1.07-1.08x, 2x1
    1.09-1.11x, 1x1 (2 chains) 1.07x and (1 chain) 1.14x faster; at 50-70% 0.9-0.97x as
    fast with 2 chains, which the rule keeps at 4 there)."""
    per_vector = _blocks_per_vector(block, lanes)
    chains = max(1, min(4, 32 // (per_vector * block[0] * block[1])) // _row_group(block))
    while row_blocks is not None and chains > 1 and 2 * chains * per_vector > row_blocks:
        chains //= 2
    return chains


def matvec_row_chains(spec: KernelSpec, family: str, row_blocks: float) -> int:
    """`matvec_chains` for the layer's kernel when it is the CPU matrix-vector kernel, else 0
    (`KernelSpec.chains`)."""
    if not _walks_matvec(spec, family):
        return 0
    return matvec_chains(spec.block, vector_unit(family).lanes, row_blocks)


def matvec_row_group(spec: KernelSpec, family: str) -> int:
    """Rows of W in one work item of the layer's kernel when it is the CPU matrix-vector
    kernel (`_row_group`), else 1. With more than one, the kernel takes `indptr` padded to
    whole groups (`compile.bsr.pad_indptr`) and reads every group's row starts without a
    bound check (AVX2, 512x512 at 80-95%: 1x4 1.02-1.07x, 1x2 1.09x, 1x8 1.12x faster than
    with it)."""
    return _row_group(spec.block) if _walks_matvec(spec, family) else 1


def _column_start(indices, p, j: int | tirx.PrimExpr, count: int, narrow: bool):
    """Block p + j's column start, j < count of blocks read together. Narrow (uint16) indices
    come in words of up to four, one load each (LLVM keeps the word in a general register and
    shifts the fields out); wide ones one load each."""
    if not narrow:
        return indices[p + j]
    per_word = min(count, 4)
    if per_word == 1:
        return T.Cast("int32", indices[p + j])
    word_type = "int32" if per_word == 2 else "int64"
    word = T.reinterpret(word_type, indices[T.ramp(p + j // 4 * 4, 1, per_word)])
    # j is a Python int, or an unrolled loop's variable (folded once the loop is unrolled)
    shift = (
        tirx.const(16 * (j % 4), word_type)
        if isinstance(j, int)
        else T.Cast(word_type, 16 * (j % 4))
    )
    mask = tirx.const(0xFFFF, word_type)
    return T.Cast("int32", T.shift_right(word, shift) & mask)


def bsr_matvec_cpu(
    spec: KernelSpec, tiling: Tiling, lanes: int = 8, short: bool = True
) -> tirx.PrimFunc:
    """M == 1 (a Linear at batch 1, a 1x1 conv on a 1x1 map): vectorized over the block's
    bs_r x bs_c values instead of M; parallel over (batch x block row). With 1 x c blocks a
    work item is c rows, whose sums go out as one vector. Blocks smaller than a vector of
    `lanes` (at most 8) are taken several to a vector. Rows, columns and blocks are read
    from the arrays."""
    B = spec.batch
    N, K, NP = _dim("n"), _dim("k"), _dim("block_rows_plus_one")
    BR, BC = spec.block
    NNZB, NRB = stored_blocks(), NP - 1
    # 1 x c blocks: a row's sum is a horizontal add of its vector; RG rows' sums are made
    # together, as one transposed vector, instead of one shuffle chain and scalar store each.
    RG = _row_group(spec.block)
    n_groups = (NRB + RG - 1) // RG
    work = B * n_groups
    n_chunks = T.max(T.min(tiling.chunks, work), 1)
    chunk_loop = _chunk_loop(tiling.parallel)
    per_chunk = (work + n_chunks - 1) // n_chunks
    guard = BR > 1
    epilogue = _epilogue(spec)

    E = BR * BC
    # P blocks per vector (their x values are shuffled into one vector, `x_vector`).
    P = _blocks_per_vector(spec.block, lanes)
    V = P * E
    WHOLE = spec.whole_vectors
    if WHOLE and P == 1:
        raise ValueError(f"{spec.block} blocks go one to a vector: no rows of whole vectors")
    CH = spec.chains or matvec_chains(spec.block, lanes)
    # Per row: CH chains of V, and with P > 1 an E-wide sum in front of them (the blocks
    # left over after whole vectors, and then the row's total).
    SPAN = CH * V + (E if P > 1 else 0)
    INDEX = "uint16" if spec.narrow_indices else "int32"

    @T.macro
    def block(acc_buf, w_data, w_indices, x_buf, tb, a0, p):
        k0 = T.bind(T.Cast("int32", w_indices[p]))
        for e in T.vectorized(E):
            acc_buf[a0 + e] = (
                acc_buf[a0 + e] + w_data[p, e // BC, e % BC] * x_buf[tb, k0 + e % BC, 0]
            )

    def x_vector(x_buf, w_indices, tb, p):
        """x under blocks p .. p + P - 1, lane for lane of their weights: block j's columns
        x[k_j : k_j + BC] once per block row (x_buf: X flat). An explicit shuffle: written as
        a vectorized loop, each lane's index and value became a load of its own."""
        parts = []
        for j in range(P):
            k = tb * K + _column_start(w_indices, p, j, P, spec.narrow_indices)
            if BC == 1:
                parts.append(tirx.Broadcast(x_buf[k], E) if E > 1 else x_buf[k])
            else:
                parts += [x_buf[tirx.Ramp(k, 1, BC)]] * BR
        return tirx.Shuffle(parts, list(range(V)))

    @T.macro
    def blocks(acc_buf, w_flat, w_indices, x_buf, tb, a0, p):
        """Blocks p .. p + P - 1 into one V-wide chain (their weights are contiguous)."""
        acc_buf[T.ramp(a0, 1, V)] = acc_buf[T.ramp(a0, 1, V)] + w_flat[
            T.ramp(p * E, 1, V)
        ] * x_vector(x_buf, w_indices, tb, p)

    @T.macro
    def chain_blocks(acc_buf, w_data, w_indices, x_buf, tb, a0, p):
        """Blocks p .. p + CH - 1, one to each of the CH chains."""
        for ch in T.unroll(CH):
            block(acc_buf, w_data, w_indices, x_buf, tb, a0 + ch * E, p + ch)

    @T.macro
    def chain_vectors(acc_buf, w_flat, w_indices, x_flat, tb, c0, p):
        """CH vectors of P blocks from p on, one to each chain."""
        for ch in T.unroll(CH):
            blocks(acc_buf, w_flat, w_indices, x_flat, tb, c0 + ch * V, p + ch * P)

    @T.macro
    def row_chains(acc_buf, w_data, w_indices, x_buf, tb, p_lo, n_p, a0):
        """P == 1: the row's blocks into CH chains from acc_buf[a0] on, summed into the first."""
        # One vector per chain: zeroing all CH * E at once made LLVM keep the chains packed
        # in wider registers, inserting and extracting every block.
        for ch in T.unroll(CH):
            for e in T.vectorized(E):
                acc_buf[a0 + ch * E + e] = T.float32(0)
        # The block's bs_r x bs_c values are contiguous: one vector per block, CH blocks at a
        # time into CH accumulators (independent FMA chains).
        p_mid = T.bind(p_lo + n_p // CH * CH)
        _row_loop(
            chain_blocks, (acc_buf, w_data, w_indices, x_buf, tb, a0), p_lo, p_mid, CH, short
        )
        for r in range(n_p % CH):
            block(acc_buf, w_data, w_indices, x_buf, tb, a0, p_mid + r)
        for ch in T.unroll(CH - 1):  # the chains' sum, a vector add each
            for e in T.vectorized(E):
                acc_buf[a0 + e] = acc_buf[a0 + e] + acc_buf[a0 + (ch + 1) * E + e]

    def rounds_of_chains(n_p):
        """A row's blocks in whole rounds of the CH chains: all of them in rows of whole
        vectors into one chain (1x4 1.02-1.06x faster than rounding). A function, since an
        assignment in a macro is a mutable scalar allocated on every pass (kernel notes)."""
        return n_p if WHOLE and CH == 1 else n_p // (CH * P) * (CH * P)

    @T.macro
    def row_vectors(acc_buf, w_data, w_flat, w_indices, x_buf, x_flat, tb, p_lo, n_p, a0):
        """P > 1: the row's blocks P to a vector into CH chains after acc_buf[a0 : a0 + E],
        the rest one by one into acc_buf[a0 : a0 + E], and the row's sum there."""
        c0 = T.bind(a0 + E)
        if not WHOLE:
            for e in T.vectorized(E):
                acc_buf[a0 + e] = T.float32(0)
        for ch in T.unroll(CH):
            for e in T.vectorized(V):
                acc_buf[c0 + ch * V + e] = T.float32(0)
        _row_loop(
            chain_vectors,
            (acc_buf, w_flat, w_indices, x_flat, tb, c0),
            p_lo,
            p_lo + rounds_of_chains(n_p),
            CH * P,
            short,
        )
        rest = T.bind(n_p % (CH * P))
        p_rest = T.bind(p_lo + n_p - rest)
        for ch in T.unroll(CH - 1):  # fewer than CH whole vectors left: one to a chain
            if ch < rest // P:
                blocks(acc_buf, w_flat, w_indices, x_flat, tb, c0 + ch * V, p_rest + ch * P)
        if not WHOLE:  # the last blocks, fewer than a vector
            for r in range(rest % P):
                block(acc_buf, w_data, w_indices, x_buf, tb, a0, p_rest + rest // P * P + r)
        for ch in T.unroll(CH - 1):
            for e in T.vectorized(V):
                acc_buf[c0 + e] = acc_buf[c0 + e] + acc_buf[c0 + (ch + 1) * V + e]
        if WHOLE:  # (0 + v is not v for v = -0: zeroing and adding would be two operations)
            for e in T.vectorized(E):
                acc_buf[a0 + e] = acc_buf[c0 + e]
        for j in T.unroll(1 if WHOLE else 0, P):
            for e in T.vectorized(E):
                acc_buf[a0 + e] = acc_buf[a0 + e] + acc_buf[c0 + j * E + e]

    @T.macro
    def row_block(acc_buf, w_data, w_flat, w_indices, w_indptr, x_buf, x_flat, tb, rb, a0):
        """Block row `rb`'s blocks times x, summed into acc_buf[a0 : a0 + E] (the SPAN entries
        from a0 on are its chains). A row past W's last, in the last group of 1 x c rows, has
        no blocks: `indptr` comes padded (`compile.bsr.pad_indptr`)."""
        p_lo = T.bind(w_indptr[rb])
        n_p = T.bind(w_indptr[rb + 1] - p_lo)
        if P > 1:
            row_vectors(acc_buf, w_data, w_flat, w_indices, x_buf, x_flat, tb, p_lo, n_p, a0)
        else:
            row_chains(acc_buf, w_data, w_indices, x_buf, tb, p_lo, n_p, a0)

    @T.macro
    def put_row(value, bias_buf, r_buf, y_buf, tb, row):
        """Y's `row`: its sum `value` plus its bias, finished."""
        y_buf[tb, row, 0] = _finish(value + bias_buf[row], r_buf[tb, row, 0], epilogue)

    @T.macro
    def body(X, data, indices, indptr, bias, R, Y):
        W = T.decl_buffer((NNZB * E,), "float32", data=data.data)
        XF = T.decl_buffer((B * K,), "float32", data=X.data)
        if RG > 1:
            assert NRB % RG == 0, "indptr must cover whole groups of rows (pad_indptr)"
        for t in chunk_loop(n_chunks):
            acc = T.alloc_buffer((RG * SPAN,), "float32", scope="local", annotations=_ON_STACK)
            red = T.alloc_buffer((BR, 1), "float32", scope="local", annotations=_ON_STACK)
            sums = T.alloc_buffer((RG,), "float32", scope="local", annotations=_ON_STACK)
            for w0 in range(per_chunk):
                w = T.bind(t * per_chunk + w0)
                if w < work:
                    b = T.bind(_outer(w, n_groups, B))
                    g = T.bind(_inner(w, n_groups, B))
                    if RG > 1:  # RG rows of 1 x c blocks: lane r of `red` is row g * RG + r
                        for r in T.unroll(RG):
                            row_block(
                                acc, data, W, indices, indptr, X, XF, b, g * RG + r, r * SPAN
                            )
                        if RG & (RG - 1) == 0:
                            sums[T.ramp(0, 1, RG)] = _row_sums(
                                [acc[T.ramp(r * SPAN, 1, BC)] for r in range(RG)]
                            )
                        else:  # 1x3, 1x5, ...: one sum per lane
                            for r in T.vectorized(RG):
                                sums[r] = _lane_sum(acc, r * SPAN, BC)
                        if g * RG + RG <= N:
                            for r in T.vectorized(RG):
                                put_row(sums[r], bias, R, Y, b, g * RG + r)
                        else:
                            for r in range(N - g * RG):
                                put_row(sums[r], bias, R, Y, b, g * RG + r)
                    else:
                        row_block(acc, data, W, indices, indptr, X, XF, b, g, 0)
                        if BC == 1 and (not guard or g * BR + BR <= N):
                            # A whole block row of a row block: its rows are the vector's lanes.
                            for e in T.vectorized(BR):
                                put_row(acc[e], bias, R, Y, b, g * BR + e)
                        else:
                            _init_tile(red, bias, g * BR, BR, 1, 1, N, None)
                            for i in T.unroll(BR):
                                for c in T.unroll(BC):
                                    red[i, 0] = red[i, 0] + acc[i * BC + c]
                            _store_tile(
                                red, R, Y, b, g * BR, 0, BR, 1, 1, N, epilogue, guard, None
                            )

    return bsr_func("bsr_matvec", spec, K, N, (NNZB, BR, BC), NP, body, INDEX)


# Vectors of accumulators in a group of the lockstep matrix-vector kernel: one FMA chain each.
LOCKSTEP_VECTORS = 4
# The widest 1 x c blocks the lockstep kernel takes: a wider slot's lanes are summed one by one
# (1x16 on AVX2, 512x512 at 95%: 0.69x the row-by-row kernel, whose 16 rows' sums are a tree).
LOCKSTEP_COLUMNS = 8


def lockstep_group(block: tuple[int, int], lanes: int) -> int:
    """Block rows in one group of `bsr_matvec_lockstep_cpu`: LOCKSTEP_VECTORS vectors of
    `_blocks_per_vector` rows each (eight 4x1 rows on AVX2, four on NEON)."""
    return _blocks_per_vector(block, lanes) * LOCKSTEP_VECTORS


def takes_lockstep(spec: KernelSpec, family: str) -> bool:
    """Whether a sparse layer's matrix-vector kernel walks its block rows in lockstep groups
    (`bsr_matvec_lockstep_cpu`): r x 1 blocks, and 1 x c up to LOCKSTEP_COLUMNS wide, on a
    CPU. Against the row-by-row kernel (`bsr_matvec_cpu`), AVX2, 512x512 at 50-95%: 4x1
    1.10-1.27x, 16x1 1.09-1.23x, 8x1 1.20-1.66x, 1x1 1.09-1.47x, 1x4 1.14-1.32x, 1x2
    1.06-1.47x, 1x8 1.08-1.21x (docs/kernel-notes.md, session 25)."""
    return _walks_matvec(spec, family) and (
        spec.block[1] == 1 or spec.block[0] == 1 and spec.block[1] <= LOCKSTEP_COLUMNS
    )


def bsr_matvec_lockstep_cpu(
    spec: KernelSpec, tiling: Tiling, lanes: int = 8, short: bool = True
) -> tirx.PrimFunc:
    """M == 1 with r x 1 or 1 x c blocks, G block rows at a time (`lockstep_group`): each
    group's rows hold the same number of blocks (`compile.bsr.lockstep_rows` sorts the rows
    by their count and pads each to its group's longest with zero blocks), stored step by
    step, so that one step's G blocks, one from each row, are LOCKSTEP_VECTORS vectors of
    weights (`_blocks_per_vector` rows' blocks in each) and as many FMA chains. One loop
    for G rows, and no sum across chains: an r x 1 slot's lanes are its rows' sums, a 1 x c
    slot's lanes are summed into its row's (c slots at a time by `_row_sums`).
    `indptr` holds the groups' starts in blocks (groups + 1 entries), then each group's G
    block rows of W in slot order (-1 past W's last)."""
    B = spec.batch
    N, K, NP = _dim("n"), _dim("k"), _dim("block_rows_plus_one")
    BR, BC = spec.block
    if BR > 1 and BC > 1:
        raise ValueError(f"{spec.block} blocks: the lockstep kernel takes r x 1 or 1 x c blocks")
    NNZB = stored_blocks()
    E = BR * BC
    P = _blocks_per_vector(spec.block, lanes)
    V = P * E
    G = P * LOCKSTEP_VECTORS
    n_groups = (NP - 1) // (G + 1)
    work = B * n_groups
    n_chunks = T.max(T.min(tiling.chunks, work), 1)
    chunk_loop = _chunk_loop(tiling.parallel)
    per_chunk = (work + n_chunks - 1) // n_chunks
    epilogue = _epilogue(spec)
    INDEX = "uint16" if spec.narrow_indices else "int32"
    # 1 x c slots summed c at a time as a tree (c a power of two dividing G), else lane by lane
    TREE = BC > 1 and BC & (BC - 1) == 0 and G % BC == 0

    def x_vector(x_flat, w_indices, tb, p, v):
        """x under vector v's blocks of the step at p, lane for lane of their weights. The
        step's column starts are read in words of four (narrow indices)."""
        parts = []
        for j in range(P):
            k = tb * K + _column_start(w_indices, p, v * P + j, G, spec.narrow_indices)
            if BC > 1:
                parts.append(x_flat[tirx.Ramp(k, 1, BC)])
            else:
                parts.append(tirx.Broadcast(x_flat[k], BR) if BR > 1 else x_flat[k])
        return tirx.Shuffle(parts, list(range(V)))

    @T.macro
    def step(acc_buf, w_flat, w_indices, x_flat, tb, p):
        """The step's G blocks from p on, V weights into each of the chains."""
        for v in T.unroll(LOCKSTEP_VECTORS):
            acc_buf[T.ramp(v * V, 1, V)] = acc_buf[T.ramp(v * V, 1, V)] + w_flat[
                T.ramp((p + v * P) * E, 1, V)
            ] * x_vector(x_flat, w_indices, tb, p, v)

    @T.macro
    def put_rows(acc_buf, bias_buf, r_buf, y_buf, tb, j, rb):
        """Block row rb's sums, slot j's lanes of the accumulators, to Y."""
        for e in T.vectorized(BR):
            y_buf[tb, rb * BR + e, 0] = _finish(
                acc_buf[j * BR + e] + bias_buf[rb * BR + e], r_buf[tb, rb * BR + e, 0], epilogue
            )

    @T.macro
    def put_part(acc_buf, bias_buf, r_buf, y_buf, tb, j, rb):
        """The rows of block row rb that W has (its last block row overhangs)."""
        for e in T.unroll(BR):
            if rb * BR + e < N:
                y_buf[tb, rb * BR + e, 0] = _finish(
                    acc_buf[j * BR + e] + bias_buf[rb * BR + e],
                    r_buf[tb, rb * BR + e, 0],
                    epilogue,
                )

    @T.macro
    def put_sum(sums_buf, bias_buf, r_buf, y_buf, tb, j, row):
        y_buf[tb, row, 0] = _finish(sums_buf[j] + bias_buf[row], r_buf[tb, row, 0], epilogue)

    @T.macro
    def body(X, data, indices, indptr, bias, R, Y):
        W = T.decl_buffer((NNZB * E,), "float32", data=data.data)
        XF = T.decl_buffer((B * K,), "float32", data=X.data)
        for t in chunk_loop(n_chunks):
            acc = T.alloc_buffer((G * E,), "float32", scope="local", annotations=_ON_STACK)
            sums = T.alloc_buffer((G,), "float32", scope="local", annotations=_ON_STACK)
            for w0 in range(per_chunk):
                w = T.bind(t * per_chunk + w0)
                if w < work:
                    b = T.bind(_outer(w, n_groups, B))
                    g = T.bind(_inner(w, n_groups, B))
                    for v in T.unroll(LOCKSTEP_VECTORS):
                        for e in T.vectorized(V):
                            acc[v * V + e] = T.float32(0)
                    _row_loop(step, (acc, W, indices, XF, b), indptr[g], indptr[g + 1], G, short)
                    if TREE:
                        for q in T.unroll(G // BC):
                            sums[T.ramp(q * BC, 1, BC)] = _row_sums(
                                [acc[T.ramp((q * BC + r) * BC, 1, BC)] for r in range(BC)]
                            )
                    elif BC > 1:
                        for j in T.unroll(G):
                            sums[j] = _lane_sum(acc, j * BC, BC)
                    for j in T.unroll(G):
                        rb = T.bind(indptr[n_groups + 1 + g * G + j])
                        if rb >= 0:
                            if BC > 1:
                                put_sum(sums, bias, R, Y, b, j, rb)
                            elif BR == 1 or rb * BR + BR <= N:
                                put_rows(acc, bias, R, Y, b, j, rb)
                            else:
                                put_part(acc, bias, R, Y, b, j, rb)

    return bsr_func("bsr_matvec_lockstep", spec, K, N, (NNZB, BR, BC), NP, body, INDEX)


# The most columns `bsr_matvec_columns_cpu` takes. AVX2, 512x512, interleaved against the
# M-vectorized kernels: M = 2-5 1.1-2.7x faster (16x1 and 8x1 blocks at 90 and 95%) and a dense
# W 2.1-3.4x; at M = 6 16x1 blocks were 0.86-0.95x, at M = 8 8x1 0.73-0.8x.
MAX_COLUMNS = 5


def takes_columns(spec: KernelSpec, family: str, avx512: bool = True) -> bool:
    """Whether `bsr_matvec_columns_cpu` is the kernel for `spec` (CPU families)."""
    unit = vector_unit(family, avx512)
    BR, BC = spec.block
    return (
        2 <= spec.m <= MAX_COLUMNS
        and not spec.kept_rows
        and BC == 1
        and BR % unit.lanes == 0
        and spec.m * BR <= unit.acc_budget
    )


def bsr_matvec_columns_cpu(spec: KernelSpec, tiling: Tiling, unit: VectorUnit) -> tirx.PrimFunc:
    """A few columns (`takes_columns`: a Linear at batch 2-5) of W in r x 1 blocks at least
    a vector tall, such as a dense W as an all-blocks BSR matrix: vectorized over the block's
    rows, as the matrix-vector kernel, not over M (an M of 2 fills a quarter of an AVX2
    vector). A block's weights are loaded once for all M columns. Each column has CH copies
    of its accumulators (consecutive blocks into different copies, summed before the store).
    Parallel over (batch x block row)."""
    B, MC = spec.batch, spec.m
    N, K, NP = _dim("n"), _dim("k"), _dim("block_rows_plus_one")
    BR = spec.block[0]
    L = unit.lanes
    NNZB, NRB = stored_blocks(), NP - 1
    work = B * NRB
    n_chunks = T.max(T.min(tiling.chunks, work), 1)
    chunk_loop = _chunk_loop(tiling.parallel)
    per_chunk = (work + n_chunks - 1) // n_chunks
    epilogue = _epilogue(spec)
    # Copy h of column c is accumulator row h * MC + c; the copies fill the registers given to
    # accumulators, at most 4 (8 FMA chains or more with two or more vectors per block).
    CH = max(1, min(4, unit.acc_budget // (MC * BR)))

    @T.macro
    def block_piece(acc_buf, w_data, x_buf, tb, k0, p, h, off, lanes):
        for c in T.unroll(MC):
            for j in T.vectorized(lanes):
                acc_buf[h * MC + c, off + j] = (
                    acc_buf[h * MC + c, off + j] + w_data[p, off + j, 0] * x_buf[tb, k0, c]
                )

    @T.macro
    def block(acc_buf, w_data, w_indices, x_buf, tb, p, h):
        k0 = T.bind(w_indices[p])
        _in_pieces(block_piece, (acc_buf, w_data, x_buf, tb, k0, p, h), BR, L)

    @T.macro
    def store_piece(acc_buf, bias_buf, r_buf, y_buf, tb, row0, c, off, lanes):
        for j in T.vectorized(lanes):
            y_buf[tb, row0 + off + j, c] = _finish(
                acc_buf[c, off + j] + bias_buf[row0 + off + j],
                r_buf[tb, row0 + off + j, c],
                epilogue,
            )

    @T.macro
    def body(X, data, indices, indptr, bias, R, Y):
        for t in chunk_loop(n_chunks):
            acc = T.alloc_buffer((CH * MC, BR), "float32", scope="local", annotations=_ON_STACK)
            for w0 in range(per_chunk):
                w = T.bind(t * per_chunk + w0)
                if w < work:
                    b = T.bind(_outer(w, NRB, B))
                    rb = T.bind(_inner(w, NRB, B))
                    p_lo = T.bind(indptr[rb])
                    n_p = T.bind(indptr[rb + 1] - p_lo)
                    for i in T.unroll(CH * MC):
                        _in_pieces(_zero_piece, (acc, i), BR, L)
                    _over_copies(block, (acc, data, indices, X, b), p_lo, n_p, CH)
                    _sum_copies(acc, MC, CH, BR, L)
                    row0 = T.bind(rb * BR)
                    if row0 + BR <= N:
                        for c in T.unroll(MC):
                            _in_pieces(store_piece, (acc, bias, R, Y, b, row0, c), BR, L)
                    else:  # the last block row overhangs W's rows
                        for i in T.unroll(BR):
                            if row0 + i < N:
                                for c in T.unroll(MC):
                                    Y[b, row0 + i, c] = _finish(
                                        acc[c, i] + bias[row0 + i], R[b, row0 + i, c], epilogue
                                    )

    return bsr_func("bsr_matvec_columns", spec, K, N, (NNZB, BR, 1), NP, body)


# 1 x c blocks at M > 1 (4 <= c <= 8) are walked by column block (`bsc_matmul_cpu`) when a
# column block holds at least c blocks on average. Walked by block row, each block reads its c
# rows of X (from L2 on these shapes) for one FMA per vector loaded; walked by column block,
# the c rows are loaded once into registers for all the column block's blocks. AVX2,
# interleaved against the row walk on the kernel grid's M > 1 shapes (50-95%): 1x4 1.06-2.04x
# from 4.8 blocks a column block on (at 1.2-3.2 blocks 0.25-1.04x), 1x8 1.13-1.83x from 7.2
# on (0.88-0.99x at 4.8-6.4). 1x2 is left out: 1.05-1.71x at 50-70% but 0.76-0.96x at 80-95%.
BY_COLUMN_BLOCKS = (4, 8)
# Its N x tile accumulators live on the stack, and in L1 up to 32 KB.
BY_COLUMN_MAX_SCRATCH = 64 * 1024


def by_column_tile(family: str, avx512: bool = True) -> int:
    """M tile of `bsc_matmul_cpu`: c rows of X of this width stay in registers, with a vector
    of weights and a tile row of sums (AVX2 and NEON 16, AVX-512 32; AVX2, 1x4: 8 and 24 were
    slower)."""
    unit = vector_unit(family, avx512)
    return unit.lanes * (2 if family == "x86" else 4)


def takes_by_column(spec: KernelSpec, stored: int, family: str, avx512: bool = True) -> bool:
    """Whether a sparse layer in 1 x c blocks (`stored` of them) gets `bsc_matmul_cpu`."""
    if family not in ("x86", "arm"):
        return False
    BR, BC = spec.block
    return (
        BR == 1
        and BY_COLUMN_BLOCKS[0] <= BC <= BY_COLUMN_BLOCKS[1]
        and spec.m >= vector_unit(family, avx512).lanes
        and not spec.kept_rows
        and spec.rows * by_column_tile(family, avx512) * 4 <= BY_COLUMN_MAX_SCRATCH
        and stored >= BC * -(-spec.cols // BC)
    )


def bsc_matmul_cpu(spec: KernelSpec, tiling: Tiling, tile: int) -> tirx.PrimFunc:
    """1 x c blocks walked by column block (`takes_by_column`): for each M tile, every row's
    sums start at its bias in a scratch tile (N x tile, contiguous); each column block's c rows
    of X are loaded once into registers and every block of the column adds its c FMAs per
    vector into its row of the scratch; then the scratch goes to Y through the epilogue.
    `data`, `indices`, `indptr`: W^T's BSR in c x 1 blocks. Parallel over (batch x M tile)."""
    B, M = spec.batch, spec.m
    N, K, NP = _dim("n"), _dim("k"), _dim("block_rows_plus_one")
    BC = spec.block[1]
    NNZB, NCB = stored_blocks(), NP - 1
    MT, L = min(tile, M), tiling.lanes
    n_full = M // MT
    tail = M % MT
    n_mt = n_full + (1 if tail else 0)
    work = B * n_mt
    n_chunks = T.max(T.min(tiling.chunks, work), 1)
    chunk_loop = _chunk_loop(tiling.parallel)
    per_chunk = (work + n_chunks - 1) // n_chunks
    epilogue = _epilogue(spec)

    @T.macro
    def x_piece(xr_buf, x_buf, tb, k, c, m0, off, lanes):
        for j in T.vectorized(lanes):
            xr_buf[c, off + j] = x_buf[tb, k, m0 + off + j]

    @T.macro
    def block_piece(acc_buf, xr_buf, w_data, i, p, off, lanes):
        for j in T.vectorized(lanes):
            acc_buf[i, off + j] = acc_buf[i, off + j] + _column_sum(w_data, xr_buf, p, off + j, BC)

    @T.macro
    def tile_fn(
        acc_buf, xr_buf, x_buf, w_data, w_indices, w_indptr, bias_buf, r_buf, y_buf, tb, m0, width
    ):
        for i in range(N):
            _in_pieces(_bias_piece, (acc_buf, bias_buf, i, i), width, L)
        for cb in range(NCB):
            for c in T.unroll(BC):
                if cb * BC + c < K:  # the last column block may overhang K (zero weights)
                    _in_pieces(x_piece, (xr_buf, x_buf, tb, cb * BC + c, c, m0), width, L)
                else:
                    _in_pieces(_zero_piece, (xr_buf, c), width, L)
            p_lo = T.bind(w_indptr[cb])
            for p0 in range(w_indptr[cb + 1] - p_lo):
                p = T.bind(p_lo + p0)
                i = T.bind(w_indices[p])
                _in_pieces(block_piece, (acc_buf, xr_buf, w_data, i, p), width, L)
        for i in range(N):
            _in_pieces(_store_piece, (acc_buf, r_buf, y_buf, tb, i, i, m0, epilogue), width, L)

    @T.macro
    def body(X, data, indices, indptr, bias, R, Y):
        for t in chunk_loop(n_chunks):
            # The scratch is sized by the layer's rows (kept in this kernel's key, see Kernel).
            # It is allocated as whole vectors, so that LLVM aligns it to a vector: TVM aligns
            # a float32 stack buffer to at most 16 bytes, and with the stack 16 bytes off a
            # 32-byte boundary half of the AVX2 loads and stores of its rows straddled two
            # cache lines. That depended on where the process's stack began: 1x4 at 95% on the
            # Linear at batch 64 took 25-27 or 30-32 us from process to process, now 26.
            vectors = T.alloc_buffer(
                (-(-spec.rows * MT // L),), f"float32x{L}", scope="local", annotations=_ON_STACK
            )
            acc = T.decl_buffer((spec.rows, MT), "float32", data=vectors.data)
            xr = T.alloc_buffer((BC, MT), "float32", scope="local", annotations=_ON_STACK)
            for w0 in range(per_chunk):
                w = T.bind(t * per_chunk + w0)
                if w < work:
                    b = T.bind(_outer(w, n_mt, B))
                    mt = T.bind(_inner(w, n_mt, B))
                    if mt < n_full:
                        tile_fn(acc, xr, X, data, indices, indptr, bias, R, Y, b, mt * MT, MT)
                    if tail > 0:
                        if mt == n_full:
                            tile_fn(
                                acc, xr, X, data, indices, indptr, bias, R, Y, b, n_full * MT, tail
                            )

    return bsr_func("bsc_matmul", spec, K, N, (NNZB, BC, 1), NP, body)


def _column_sum(w_data, xr_buf, p, col, columns: int):
    """Block p's `columns` weights times the X rows held in xr_buf, at column `col`."""
    total = w_data[p, 0, 0] * xr_buf[0, col]
    for c in range(1, columns):
        total = total + w_data[p, c, 0] * xr_buf[c, col]
    return total


@dataclass(frozen=True)
class ConvGeometry:
    """A 2-D convolution's spatial shape: NCHW input, kernel, stride, top/left padding, output,
    and the taps' dilation (dilated convs: depthwise kernels on CPUs only)."""

    batch: int
    channels: int
    height: int
    width: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad: tuple[int, int]  # top, left (bottom/right follow from the output size)
    out_height: int
    out_width: int
    dilation: tuple[int, int] = (1, 1)

    @property
    def padded_height(self) -> int:
        """Rows of the zero-padded input plane the output actually reads."""
        return (self.out_height - 1) * self.stride[0] + (self.kernel[0] - 1) * self.dilation[0] + 1

    @property
    def padded_width(self) -> int:
        return (self.out_width - 1) * self.stride[1] + (self.kernel[1] - 1) * self.dilation[1] + 1


def _chunks(work, num_cores: int | None) -> tuple:
    n_chunks = T.max(T.min(work, _max_chunks(num_cores)), 1)
    return n_chunks, (work + n_chunks - 1) // n_chunks


@T.macro
def _each_channel(t, per_chunk, batch, channels, bufs, fill, fill_args, use, use_args, overlap):
    """The (batch, channel) pairs of chunk `t` (see `_chunks`), each in two steps:
    `fill(buf, *fill_args, b, c)` writes the pair's input into `buf`, `use(buf, *use_args, b,
    c)` reads it. `bufs` is zeroed first: padding stays zero, as a fill rewrites only the input
    positions. With `overlap`, `bufs` holds two buffers, and the next pair's fill goes to one
    before this pair's use of the other. For a small plane that the use reads in straight-line
    code, filled and used in one buffer, LLVM forwarded the fill's stores to the use's loads
    as shuffles (74 a channel at 8x8, and spills: twice the FMAs' time)."""
    # An assignment in a macro declares a TIR variable: `size` lives in a 4-byte workspace
    # (`TVMBackendAllocWorkspace` once a chunk). Written as a constant instead, the two halves
    # were picked with cmovs and 8x8 and 16x16/2 maps ran 5% slower, 4x4 3% faster: left as is.
    size = bufs.shape[0] // 2 if overlap else bufs.shape[0]
    for e in T.vectorized(bufs.shape[0]):
        bufs[e] = T.float32(0)
    first = T.bind(t * per_chunk)
    if overlap and first < batch * channels:
        buf0 = T.decl_buffer((size,), "float32", data=bufs.data, scope="local")
        fill(buf0, *fill_args, _outer(first, channels, batch), _inner(first, channels, batch))
    for w0 in range(per_chunk):
        w = T.bind(first + w0)
        if w < batch * channels:
            b = T.bind(_outer(w, channels, batch))
            c = T.bind(_inner(w, channels, batch))
            if not overlap:
                fill(bufs, *fill_args, b, c)
                use(bufs, *use_args, b, c)
            else:
                if w0 + 1 < per_chunk and w + 1 < batch * channels:
                    after = T.decl_buffer(
                        (size,),
                        "float32",
                        data=bufs.data,
                        elem_offset=(1 - w0 % 2) * size,
                        scope="local",
                    )
                    fill(
                        after,
                        *fill_args,
                        _outer(w + 1, channels, batch),
                        _inner(w + 1, channels, batch),
                    )
                this = T.decl_buffer(
                    (size,),
                    "float32",
                    data=bufs.data,
                    elem_offset=(w0 % 2) * size,
                    scope="local",
                )
                use(this, *use_args, b, c)


def _phase_interior(phase: int, pad: int, size: int, stride: int, count: int) -> tuple[int, int]:
    """The first index and count of a phase's positions that hold input (not padding): position
    p of phase `phase` is input index p * stride + phase - pad, for p in [0, count)."""
    first = max(0, -(-(pad - phase) // stride))
    end = min(count, (size - 1 + pad - phase) // stride + 1)
    return first, max(0, end - first)


def _phases(geo: ConvGeometry) -> list[tuple[int, ...]]:
    """The stride phases of a conv's padded input plane (`phase_shape`), each (index, row
    phase, column phase, first row holding input, rows, first column holding input, columns)."""
    (SH, SW), (PT, PL) = geo.stride, geo.pad
    PR, PW = phase_shape(geo)
    return [
        (
            pr * SW + pc,
            pr,
            pc,
            *_phase_interior(pr, PT, geo.height, SH, PR),
            *_phase_interior(pc, PL, geo.width, SW, PW),
        )
        for pr in range(SH)
        for pc in range(SW)
    ]


@dataclass(frozen=True)
class _DepthwiseParts:
    """The per-channel steps of our CPU depthwise kernel, shared by `depthwise_conv_cpu` and
    `expand_depthwise_cpu` (and `im2col_cpu`): `load(buf, x_buf, x_flat, start, b, c)`
    copies input plane (b, c) of `x_buf` (which `x_flat` views flat, the plane at `start`)
    into the zero-bordered buffer `buf` (`buf_size` floats, zeroed once), a `phase_size` part
    per stride phase of rows `phase_width` wide; `compute(buf, acc, weight, bias, y_buf, b, c)`
    writes output plane (b, c) from it, with `acc` an `acc_shape` register tile.
    `put_row(buf, src, s0, row)` stores one input row, held in src[s0 .. s0 + width), where
    `load` would put it (None where it cannot). `one_group`: `compute` is one register group
    of rows, straight-line code (the channels then overlap, see `_each_channel`)."""

    load: object
    compute: object
    buf_size: int
    acc_shape: tuple[int, int]
    put_row: object | None
    phase_size: int
    phase_width: int
    one_group: bool

    @property
    def bufs_size(self) -> int:
        """Floats a kernel allocates for `_each_channel`'s buffers: two buffers when the
        channels overlap (`one_group`), else one."""
        return self.buf_size * (2 if self.one_group else 1)


def _depthwise_parts(
    geo: ConvGeometry, activation: str, lanes: int, plain: bool = True
) -> _DepthwiseParts:
    """Each input plane is copied once into a zero-bordered buffer split by stride phase (for
    stride 2, the even and odd rows/columns apart), so every tap reads a contiguous run; strided
    columns are split by a vector shuffle. Output rows are computed in register groups that
    share each loaded input row between the taps of the rows it feeds, vectorized over the
    output row; bias and activation fused. Small maps at stride 1 go without the padding
    (`plain`, below); im2col, which reads the phase layout, passes plain=False."""
    H, W = geo.height, geo.width
    KH, KW = geo.kernel
    SH, SW = geo.stride
    PT, PL = geo.pad
    OH, OW = geo.out_height, geo.out_width
    DH, DW = geo.dilation
    DR = (KH - 1) * DH // SH  # reach of the taps' rows inside one phase
    PR, PW = phase_shape(geo)  # one phase's rows and columns
    PP = PR * PW
    phases = _phases(geo)
    # Output rows per register group: about 8 vector registers of accumulators.
    RG = max(1, min(OH, 8 * lanes // max(OW, lanes)))
    n_groups, tail = OH // RG, OH % RG
    act = ACTIVATIONS.index(activation)

    @T.macro
    def load_phase(buf, x_buf, tb, tc, ph):
        """Copy the input positions of phase `ph` into its part of `buf`."""
        if ph[4] > 0 and ph[6] == 1:
            for r in range(ph[4]):
                buf[ph[0] * PP + (ph[3] + r) * PW + ph[5]] = x_buf[
                    tb, tc, (ph[3] + r) * SH + ph[1] - PT, ph[5] * SW + ph[2] - PL
                ]
        elif ph[4] > 0 and ph[6] > 1 and SW == 1:
            for r in range(ph[4]):
                for q in T.vectorized(ph[6]):
                    buf[ph[0] * PP + (ph[3] + r) * PW + ph[5] + q] = x_buf[
                        tb, tc, (ph[3] + r) * SH + ph[1] - PT, ph[5] + q + ph[2] - PL
                    ]
        elif ph[4] > 0 and ph[6] > 1:
            # One contiguous load of the row's span, then every SW-th lane: a shuffle, where
            # a strided load would be one scalar load per lane.
            for r in range(ph[4]):
                buf[T.ramp(ph[0] * PP + (ph[3] + r) * PW + ph[5], 1, ph[6])] = T.Shuffle(
                    [
                        x_buf[
                            tb,
                            tc,
                            (ph[3] + r) * SH + ph[1] - PT,
                            T.ramp(ph[5] * SW + ph[2] - PL, 1, SW * (ph[6] - 1) + 1),
                        ]
                    ],
                    [SW * i for i in range(ph[6])],
                )

    # An output row is done in vector pieces, whole registers then the rest, as a matmul tile
    # row (`_in_pieces`): as one 14-lane vector a 14x14 map cost 1.6x as much per output as
    # a 16x16 one.
    @T.macro
    def tap_piece(acc, i, buf, src, w, j0, n):
        for j in T.vectorized(n):
            acc[i, j0 + j] = acc[i, j0 + j] + w * buf[src + j0 + j]

    @T.macro
    def put_piece(acc, bias, y_buf, tb, tc, oh, i, j0, n):
        for j in T.vectorized(n):
            y_buf[tb, tc, oh, j0 + j] = _activate(acc[i, j0 + j] + bias[tc], act)

    @T.macro
    def row_group(acc, buf, weight, bias, y_buf, tb, tc, oh0, rows):
        """Output rows oh0 .. oh0 + rows - 1: each phase row loaded once for all its taps."""
        for i in T.unroll(rows):
            _in_pieces(_zero_piece, (acc, i), OW, lanes)
        # Tap (kh, kw) reads the padded input (kh * DH, kw * DW) on from an output position.
        for r in T.unroll(rows + DR):
            for kh in T.unroll(KH):
                for kw in T.unroll(KW):
                    if r - kh * DH // SH >= 0 and r - kh * DH // SH < rows:
                        src = T.bind(
                            ((kh * DH % SH) * SW + kw * DW % SW) * PP
                            + (oh0 + r) * PW
                            + kw * DW // SW
                        )
                        _in_pieces(
                            tap_piece,
                            (acc, r - kh * DH // SH, buf, src, weight[tc, kh, kw]),
                            OW,
                            lanes,
                        )
        for i in T.unroll(rows):
            _in_pieces(put_piece, (acc, bias, y_buf, tb, tc, oh0 + i, i), OW, lanes)

    P0, P1, P2, P3 = (phases + [phases[0]] * 3)[:4]  # macros take one phase each
    if len(phases) > 4:
        raise ValueError(f"depthwise stride {geo.stride} is not supported (at most 2 x 2)")

    @T.macro
    def load_phases(buf, x_buf, tb, tc):
        load_phase(buf, x_buf, tb, tc, P0)
        if len(phases) > 1:
            load_phase(buf, x_buf, tb, tc, P1)
        if len(phases) > 2:
            load_phase(buf, x_buf, tb, tc, P2)
        if len(phases) > 3:
            load_phase(buf, x_buf, tb, tc, P3)

    @T.macro
    def compute(buf, acc, weight, bias, y_buf, tb, tc):
        for g in range(n_groups):
            row_group(acc, buf, weight, bias, y_buf, tb, tc, g * RG, RG)
        if tail > 0:
            row_group(acc, buf, weight, bias, y_buf, tb, tc, n_groups * RG, tail)

    # put_row: each column phase's (phase column, first position, count), and each row phase's
    # (first row, rows); the row phase of an input row is only known when the kernel runs.
    col_phases = [(pc, *_phase_interior(pc, PL, W, SW, PW)) for pc in range(SW)]
    R0, R1 = ([ph[3:5] for ph in phases[::SW]] * 2)[:2]
    C0, C1 = (col_phases * 2)[:2]

    @T.macro
    def put_phase_row(buf, src, s0, row, col):
        """Row `row`'s positions of column phase `col` (held in src[s0 .. s0 + W))."""
        pr = T.bind((row + PT) % SH)
        prow = T.bind((row + PT) // SH)
        first = T.bind(T.Select(pr == 0, R0[0], R1[0]))
        if prow >= first and prow < first + T.Select(pr == 0, R0[1], R1[1]):
            start = T.bind((pr * SW + col[0]) * PP + prow * PW + col[1])
            if SW == 1:
                for q in T.vectorized(col[2]):
                    buf[start + q] = src[s0 + col[1] + q - PL]
            else:  # every SW-th column of the row: a shuffle of the row's vector
                buf[T.ramp(start, 1, col[2])] = T.Shuffle(
                    [src[T.ramp(s0, 1, W)]],
                    [(col[1] + i) * SW + col[0] - PL for i in range(col[2])],
                )

    @T.macro
    def put_row(buf, src, s0, row):
        put_phase_row(buf, src, s0, row, C0)
        if SW > 1:
            put_phase_row(buf, src, s0, row, C1)

    # Stride 1 or 2, and (for stride 2) every column phase at least two positions wide.
    fits = len(phases) <= 4 and all(ph[2] >= (2 if SW > 1 else 1) for ph in col_phases)
    # Strided columns: each input row loaded whole and split into its phases by put_row.
    by_rows = fits and SW > 1 and W <= 8 * lanes

    @T.macro
    def load(buf, x_buf, x_flat, start, tb, tc):
        if by_rows:
            for r in range(H):
                put_row(buf, x_flat, start + r * W, r)
        else:
            load_phases(buf, x_buf, tb, tc)

    # `plain`, for rows of half a vector or less at stride 1 with the output the input's size
    # (4x4 maps on AVX2, 2x2 on NEON): the buffer holds the plane as it is, each input row is
    # one load, and a tap's column shift is a shuffle of the row with zeros; each kernel row
    # sums into its own copy of the output rows (shorter FMA chains), added before the store.
    # From the padded buffer (4-lane loads at +1 and +2 floats, partly over the fill's stores)
    # 4x4 maps ran at under half the rate of 8x8 ones. AVX2, 960 channels: 11.4 -> 8.6 us
    # alone (the copies 1.05x of that), 11.8 -> 10.1 us with an expand conv fused in that has
    # no nonzeros (its nonzeros, four loads each, cost the same either way).
    if not (
        plain
        and SH == SW == 1
        and DH == DW == 1
        and (H, W) == (OH, OW)
        and 2 <= W <= lanes // 2
        and RG == OH
        and KW <= 5
    ):
        return _DepthwiseParts(
            load, compute, SH * SW * PP, (RG, OW), put_row if fits else None, PP, PW, RG == OH
        )

    def shifted(row, kw: int):
        """`row` (a vector of W) moved by tap kw's column offset, zeros shifted in."""
        lanes_from = [j + kw - PL if 0 <= j + kw - PL < W else W for j in range(W)]
        return T.Shuffle([row, T.Broadcast(T.float32(0), W)], lanes_from)

    @T.macro
    def plain_tap(acc, i, buf, r, w, kw):
        acc[i, T.ramp(0, 1, W)] = acc[i, T.ramp(0, 1, W)] + T.Broadcast(w, W) * shifted(
            buf[T.ramp(r * W, 1, W)], kw
        )

    @T.macro
    def plain_taps(acc, buf, weight, tc, r, kh):
        """Input row r's taps of kernel row kh, into output row r - kh + PT."""
        i = T.bind(kh * OH + r - kh + PT)  # kernel row kh's copy of the output row
        plain_tap(acc, i, buf, r, weight[tc, kh, 0], 0)
        if KW > 1:
            plain_tap(acc, i, buf, r, weight[tc, kh, 1], 1)
        if KW > 2:
            plain_tap(acc, i, buf, r, weight[tc, kh, 2], 2)
        if KW > 3:
            plain_tap(acc, i, buf, r, weight[tc, kh, 3], 3)
        if KW > 4:
            plain_tap(acc, i, buf, r, weight[tc, kh, 4], 4)

    @T.macro
    def plain_compute(buf, acc, weight, bias, y_buf, tb, tc):
        for i in T.unroll(KH * OH):
            _in_pieces(_zero_piece, (acc, i), OW, lanes)
        for r in T.unroll(H):
            for kh in T.unroll(KH):
                if r - kh + PT >= 0 and r - kh + PT < OH:
                    plain_taps(acc, buf, weight, tc, r, kh)
        for i in T.unroll(OH, KH * OH):
            _in_pieces(_add_piece, (acc, i % OH, i), OW, lanes)
        for i in T.unroll(OH):
            _in_pieces(put_piece, (acc, bias, y_buf, tb, tc, i, i), OW, lanes)

    @T.macro
    def plain_load(buf, x_buf, x_flat, start, tb, tc):
        for e in T.vectorized(H * W):
            buf[e] = x_flat[start + e]

    @T.macro
    def plain_put_row(buf, src, s0, row):
        for q in T.vectorized(W):
            buf[row * W + q] = src[s0 + q]

    return _DepthwiseParts(
        plain_load, plain_compute, H * W, (KH * OH, OW), plain_put_row, H * W, W, True
    )


def depthwise_conv_cpu(
    geo: ConvGeometry, activation: str = "none", num_cores: int | None = None, lanes: int = 8
) -> tirx.PrimFunc:
    """Depthwise kxk conv: parallel over (batch x channel), each channel's steps as
    `_depthwise_parts` describes. The channel count is read from the arrays."""
    B, C, H, W = geo.batch, _dim("c"), geo.height, geo.width
    KH, KW = geo.kernel
    OH, OW = geo.out_height, geo.out_width
    parts = _depthwise_parts(geo, activation, lanes)
    load, compute, ACC = parts.load, parts.compute, parts.acc_shape
    OVERLAP, BUFS = parts.one_group, parts.bufs_size
    n_chunks, per_chunk = _chunks(B * C, num_cores)
    chunk_loop = _chunk_loop(num_cores != 1)

    @T.macro
    def fill(buf, x_buf, x_flat, b, c):
        load(buf, x_buf, x_flat, (b * C + c) * H * W, b, c)

    @T.prim_func(s_tir=True)
    def depthwise_conv(
        X: T.Buffer((B, C, H, W), "float32"),
        weight: T.Buffer((C, KH, KW), "float32"),
        bias: T.Buffer((C,), "float32"),
        Y: T.Buffer((B, C, OH, OW), "float32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        Xf = T.decl_buffer((B * C * H * W,), "float32", data=X.data)
        for t in chunk_loop(n_chunks):
            bufs = T.alloc_buffer((BUFS,), "float32", scope="local", annotations=_ON_STACK)
            acc = T.alloc_buffer(ACC, "float32", scope="local", annotations=_ON_STACK)
            _each_channel(
                t, per_chunk, B, C, bufs, fill, (X, Xf), compute, (acc, weight, bias, Y), OVERLAP
            )

    return depthwise_conv


# Channels of a fused expand conv expanded together (`expand_depthwise_cpu`), see `expand_group`.
EXPAND_GROUP = 4


def expand_group(block: tuple[int, int], rows: int, m: int, family: str, avx512: bool) -> int:
    """How many channels the fused kernel expands together for an expand conv with `block`s,
    `rows` channels and m = H * W: EXPAND_GROUP where its blocks are r x 1 with whole groups in
    r and the plane is at most two registers (4x4 maps on AVX2, 2x2 on NEON), else 1 (CSR rows).
    A CSR nonzero on such a plane is four loads for two FMAs, and bound by them; a group's block
    is 7 loads for 8. On larger planes a nonzero's X row is more registers and the CSR rows are
    bound by their FMAs: groups were 0.8-1.03x there (8x8 to 32x32, AVX2), 1.22-1.34x at 4x4."""
    if family == "cuda" or block[1] != 1 or block[0] % EXPAND_GROUP or rows % EXPAND_GROUP:
        return 1
    return EXPAND_GROUP if m <= 2 * vector_unit(family, avx512).lanes else 1


def expand_depthwise_cpu(
    expand: KernelSpec,
    geo: ConvGeometry,
    activation: str = "none",
    num_cores: int | None = None,
    lanes: int = 8,
) -> tirx.PrimFunc:
    """A sparse 1x1 conv (`expand`: its batch, rows = channels, m = H * W and activation) and
    the depthwise conv that reads its output (`geo`, `activation`) in one kernel: parallel over
    (batch x channel), each channel's expanded plane is computed into a local buffer (it never
    goes to memory) and the depthwise conv runs on it as in `depthwise_conv_cpu`.

    Takes X (the expand conv's input), the expand weight in CSR form (values, column indices,
    row pointers: a channel costs its own nonzeros, whatever the layer's blocks) or, when
    `expand.block` is (G, 1) with G > 1, in BSR form with G x 1 blocks (values flat), the expand
    bias, the depthwise weight and bias, then Y. Sizes other than the geometry are read from the
    arrays.

    With G x 1 blocks the G channels of a block row are expanded together, when the first of
    them comes, into G planes: each block loads its X row once for G channels (a CSR nonzero
    loads it for one), and each channel's plane is then copied into the depthwise buffer."""
    B, K, C = geo.batch, _dim("k"), _dim("c")
    G = expand.block[0]
    NNZ, NP = _dim("nnz"), _dim("c_plus_one")
    NI = NNZ if G == 1 else _dim("nnz_blocks")
    H, W = geo.height, geo.width
    M = H * W
    KH, KW = geo.kernel
    OH, OW = geo.out_height, geo.out_width
    expand_act = ACTIVATIONS.index(expand.activation)
    parts = _depthwise_parts(geo, activation, lanes)
    load, compute, ACC = parts.load, parts.compute, parts.acc_shape
    OVERLAP, BUFS = parts.one_group, parts.bufs_size
    put_row = parts.put_row
    # Expanded positions per register tile: whole input rows when they can go straight into
    # the depthwise conv's buffer, else into a plane that `load` then copies. Only rows of
    # whole registers (or narrower than one), at most 4 registers wide, go straight: slicing
    # 12-, 14-, 28- or 56-wide rows out of the tile made 12x12 to 56x56 maps 2.2-3.6x slower
    # than the plane.
    if put_row is not None and W <= 4 * lanes and (W % lanes == 0 or W < lanes):
        MT = W * min(H, 8 * lanes // W)
    else:
        MT, put_row = min(M, 8 * lanes), None
    n_full, tail = M // MT, M % MT
    n_chunks, per_chunk = _chunks(B * C, num_cores)
    chunk_loop = _chunk_loop(num_cores != 1)
    # The expanded tile in vector pieces of EP lanes, whole registers then the rest (see
    # `_in_pieces`), when it goes to the plane; as one vector when its rows go straight into
    # the buffer (`put_row` slices them out of it: 7x7 maps were 6-14% slower in pieces).
    EP = lanes if put_row is None else MT

    @T.macro
    def bias_piece(eacc, value, j0, n):
        for j in T.vectorized(n):
            eacc[j0 + j] = value

    @T.macro
    def fma_piece(eacc, weight, x_buf, tb, k, m0, j0, n):
        for j in T.vectorized(n):
            eacc[j0 + j] = eacc[j0 + j] + weight * x_buf[tb, k, m0 + j0 + j]

    @T.macro
    def expand_tile(eacc, dest, x_buf, csr, tb, tc, m0, width):
        """Expanded channel tc at positions m0 .. m0 + width - 1, into `dest`: the plane, or
        (with put_row) the depthwise buffer. `csr`: the expand conv's values, column indices,
        row pointers and bias."""
        w_data, w_indices, w_indptr, bias_buf = csr
        _in_pieces(bias_piece, (eacc, bias_buf[tc]), width, EP)
        for p0 in range(w_indptr[tc + 1] - w_indptr[tc]):
            p = T.bind(w_indptr[tc] + p0)
            k = T.bind(w_indices[p])
            _in_pieces(fma_piece, (eacc, w_data[p], x_buf, tb, k, m0), width, EP)
        if put_row is None:
            for j in T.vectorized(width):
                dest[m0 + j] = _activate(eacc[j], expand_act)
        else:
            for j in T.vectorized(width):
                eacc[j] = _activate(eacc[j], expand_act)
            for r in T.unroll(width // W):
                put_row(dest, eacc, r * W, m0 // W + r)

    # G x 1 blocks: group tiles of GT positions, G x 2 registers of accumulators.
    GT = min(M, 2 * lanes)
    n_gfull, gtail = M // GT, M % GT

    @T.macro
    def plane_piece(planes, acc, i, m0, off, n):
        for j in T.vectorized(n):
            planes[i * M + m0 + off + j] = _activate(acc[i, off + j], expand_act)

    @T.macro
    def group_tile(acc, planes, x_buf, grp, tb, g0, m0, width):
        """Expanded channels g0 .. g0 + G - 1 at positions m0 .. m0 + width - 1, into their
        planes. `grp`: the expand conv's block values, column indices, block row pointers and
        bias."""
        w_data, w_indices, w_indptr, bias_buf = grp
        gb = T.bind(g0 // G)
        for i in T.unroll(G):
            _in_pieces(_bias_piece, (acc, bias_buf, i, g0 + i), width, lanes)
        for p0 in range(w_indptr[gb + 1] - w_indptr[gb]):
            p = T.bind(w_indptr[gb] + p0)
            k = T.bind(w_indices[p])
            for i in T.unroll(G):
                _in_pieces(_fma_piece, (acc, i, w_data[p * G + i], x_buf, tb, k, m0), width, lanes)
        for i in T.unroll(G):
            _in_pieces(plane_piece, (planes, acc, i, m0), width, lanes)

    @T.macro
    def group_fill(buf, gacc, planes, planes4, done, x_buf, grp, b, c):
        """Channel c's plane into the depthwise buffer, its block row's planes first expanded
        when they are not yet (`done` holds the (batch, first channel) expanded last)."""
        g0 = T.bind(c - c % G)
        if done[0] != b * C + g0:
            for mt in range(n_gfull):
                group_tile(gacc, planes, x_buf, grp, b, g0, mt * GT, GT)
            if gtail > 0:
                group_tile(gacc, planes, x_buf, grp, b, g0, M - gtail, gtail)
            done[0] = b * C + g0
        load(buf, planes4, planes, (c % G) * M, 0, c % G)

    @T.macro
    def fill(buf, eacc, plane, plane4, x_buf, csr, b, c):
        """Expand channel c into the depthwise buffer (or into the plane, then load that)."""
        # The expanded rows go straight into `buf` (put_row), or into `plane`.
        dest = plane if put_row is None else buf
        for mt in range(n_full):
            expand_tile(eacc, dest, x_buf, csr, b, c, mt * MT, MT)
        if tail > 0:
            expand_tile(eacc, dest, x_buf, csr, b, c, M - tail, tail)
        if put_row is None:
            load(buf, plane4, plane, 0, 0, 0)

    @T.macro
    def channels(t, bufs, fill_fn, fill_args, use_args):
        _each_channel(t, per_chunk, B, C, bufs, fill_fn, fill_args, compute, use_args, OVERLAP)

    @T.prim_func(s_tir=True)
    def expand_depthwise(
        X4: T.Buffer((B, K, H, W), "float32"),
        data: T.Buffer((NNZ,), "float32"),
        indices: T.Buffer((NI,), "int32"),
        indptr: T.Buffer((NP,), "int32"),
        expand_bias: T.Buffer((C,), "float32"),
        weight: T.Buffer((C, KH, KW), "float32"),
        bias: T.Buffer((C,), "float32"),
        Y: T.Buffer((B, C, OH, OW), "float32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        X = T.decl_buffer((B, K, M), "float32", data=X4.data)
        for t in chunk_loop(n_chunks):
            bufs = T.alloc_buffer((BUFS,), "float32", scope="local", annotations=_ON_STACK)
            acc = T.alloc_buffer(ACC, "float32", scope="local", annotations=_ON_STACK)
            if G > 1:
                gacc = T.alloc_buffer((G, GT), "float32", scope="local", annotations=_ON_STACK)
                planes = T.alloc_buffer((G * M,), "float32", scope="local", annotations=_ON_STACK)
                planes4 = T.decl_buffer((1, G, H, W), "float32", data=planes.data)
                done = T.alloc_buffer((1,), "int32", scope="local", annotations=_ON_STACK)
                done[0] = -1
                grp = (data, indices, indptr, expand_bias)
                channels(
                    t,
                    bufs,
                    group_fill,
                    (gacc, planes, planes4, done, X, grp),
                    (acc, weight, bias, Y),
                )
            else:
                eacc = T.alloc_buffer((MT,), "float32", scope="local", annotations=_ON_STACK)
                plane = T.alloc_buffer((M,), "float32", scope="local", annotations=_ON_STACK)
                plane4 = T.decl_buffer((1, 1, H, W), "float32", data=plane.data)
                csr = (data, indices, indptr, expand_bias)
                # Inline: a tuple of buffers bound to a name renames the buffers in the printed
                # TIR to the macro's parameter names (as `csr` does the expand conv's arrays).
                channels(t, bufs, fill, (eacc, plane, plane4, X, csr), (acc, weight, bias, Y))

    return expand_depthwise


def im2col_cpu(
    geo: ConvGeometry, num_cores: int | None = None, lanes: int = 8, row: int = 0
) -> tirx.PrimFunc:
    """Unfold an NCHW input into (B, C * kh * kw, OH * OW) columns (row order c, kh, kw, as in
    `weight.reshape(out, -1)`), so that any groups=1 conv becomes a matmul for our kernels.
    Rows are `row` long (`im2col_row`; 0: OH * OW): past OH * OW, what the matmul never reads.
    Each input plane is split by stride phase first (as in `depthwise_conv_cpu`), so every
    column row is a contiguous copy; strides above 2 read a zero-padded plane with strided
    loads. The channel count is read from the arrays."""
    B, C, H, W = geo.batch, _dim("c"), geo.height, geo.width
    KH, KW = geo.kernel
    SH, SW = geo.stride
    PT, PL = geo.pad
    OH, OW = geo.out_height, geo.out_width
    n_chunks, per_chunk = _chunks(B * C, num_cores)
    chunk_loop = _chunk_loop(num_cores != 1)
    if SH * SW <= 4:
        parts = _depthwise_parts(geo, "none", lanes, plain=False)
        load, BUF, PP, PW = parts.load, parts.buf_size, parts.phase_size, parts.phase_width

        @T.macro
        def fill(buf, x_buf, x_flat, tb, tc):
            load(buf, x_buf, x_flat, (tb * C + tc) * H * W, tb, tc)

        @T.macro
        def unfold(buf, y_buf, tb, tc):
            for kh in range(KH):
                for kw in range(KW):
                    ph = T.bind(((kh % SH) * SW + kw % SW) * PP + kw // SW)
                    for oh in range(OH):
                        for j in T.vectorized(OW):
                            y_buf[tb, (tc * KH + kh) * KW + kw, oh * OW + j] = buf[
                                ph + (oh + kh // SH) * PW + j
                            ]

    else:
        HP, WP = geo.padded_height, geo.padded_width
        rows, cols, BUF = min(H, HP - PT), min(W, WP - PL), HP * WP

        @T.macro
        def fill(buf, x_buf, x_flat, tb, tc):
            for r in range(rows):
                for q in T.vectorized(cols):
                    buf[(r + PT) * WP + q + PL] = x_buf[tb, tc, r, q]

        @T.macro
        def unfold(buf, y_buf, tb, tc):
            for kh in range(KH):
                for kw in range(KW):
                    for oh in range(OH):
                        for j in T.vectorized(OW):
                            y_buf[tb, (tc * KH + kh) * KW + kw, oh * OW + j] = buf[
                                (oh * SH + kh) * WP + j * SW + kw
                            ]

    ROW = row or OH * OW

    @T.prim_func(s_tir=True)
    def im2col(
        X: T.Buffer((B, C, H, W), "float32"),
        Y: T.Buffer((B, C * KH * KW, ROW), "float32"),
    ):
        T.func_attr(KERNEL_ATTRS)
        # One input, one output: Relax checks such calls for a reshape pattern, which
        # needs the body to be a block.
        with T.sblock("root"):
            Xf = T.decl_buffer((B * C * H * W,), "float32", data=X.data)
            for t in chunk_loop(n_chunks):
                buf = T.alloc_buffer((BUF,), "float32", scope="local", annotations=_ON_STACK)
                _each_channel(t, per_chunk, B, C, buf, fill, (X, Xf), unfold, (Y,), False)

    return im2col


def takes_dilation(op: str, family: str, geo: ConvGeometry) -> bool:
    """Whether a kernel `op` for `family` computes `geo`'s dilation: undilated convs always,
    dilated ones only on the CPU depthwise kernels (DARTS's dil_conv ops)."""
    return geo.dilation == (1, 1) or op == "depthwise" and family != "cuda"


def phase_shape(geo: ConvGeometry) -> tuple[int, int]:
    """Rows and columns of one stride phase of a conv's zero-padded input plane (the whole
    padded plane at stride 1): phase (pr, pc) holds the padded input's rows pr, pr + SH, ...
    and columns pc, pc + SW, ..., so that a tap (kh, kw) reads output row oh's inputs as one
    run, from row oh + kh * DH // SH of phase (kh * DH % SH, kw * DW % SW), column kw * DW // SW
    on (DH, DW: the dilation, 1 but in a dilated depthwise conv)."""
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel, geo.stride, geo.dilation
    return geo.out_height + (kh - 1) * dh // sh, geo.out_width + (kw - 1) * dw // sw


def padded_plane(geo: ConvGeometry) -> int:
    """Floats in one channel's zero-padded input plane, its stride phases one after another,
    as `pad_cpu` writes it."""
    rows, cols = phase_shape(geo)
    return geo.stride[0] * geo.stride[1] * rows * cols


@T.macro
def _zeros(buf, start, count: int):
    if count > 0:
        for j in T.vectorized(count):
            buf[start + j] = T.float32(0)


@T.macro
def _zero_around(buf, ph):
    """Zero what a phase of a padded plane holds around its input. `ph`: (first float, phase
    rows, columns, first input row, rows, first input column, columns), Python ints (an
    assignment in a macro would declare a TIR variable)."""
    if ph[4] == 0 or ph[6] == 0:
        _zeros(buf, ph[0], ph[1] * ph[2])
    else:
        _zeros(buf, ph[0], ph[3] * ph[2] + ph[5])
        for r in range(ph[4] - 1):
            _zeros(buf, ph[0] + (ph[3] + r) * ph[2] + ph[5] + ph[6], ph[2] - ph[6])
        _zeros(
            buf,
            ph[0] + (ph[3] + ph[4] - 1) * ph[2] + ph[5] + ph[6],
            (ph[1] - ph[3] - ph[4] + 1) * ph[2] - ph[5] - ph[6],
        )


def pad_cpu(geo: ConvGeometry, num_cores: int | None = None, lanes: int = 8) -> tirx.PrimFunc:
    """Copy an NCHW input into zero-padded planes split by stride phase (`phase_shape`), (B,
    C, `padded_plane`): what a direct conv's sparse kernel reads (`KernelSpec.direct`). Every
    float is written once: the input by the depthwise kernels' loader (strides up to 2), the
    zeros around it (zeroing the whole plane first made the copy 1.4-1.5x slower). The
    channel count is read from the arrays."""
    B, C, H, W = geo.batch, _dim("c"), geo.height, geo.width
    PLANE, (PR, PW) = padded_plane(geo), phase_shape(geo)
    load = _depthwise_parts(geo, "none", lanes, plain=False).load
    phases = [(ph[0] * PR * PW, PR, PW, *ph[3:]) for ph in _phases(geo)]
    P0, P1, P2, P3 = (phases + [phases[0]] * 3)[:4]  # macros take one phase each
    n_chunks, per_chunk = _chunks(B * C, num_cores)
    chunk_loop = _chunk_loop(num_cores != 1)

    @T.prim_func(s_tir=True)
    def pad(X: T.Buffer((B, C, H, W), "float32"), Y: T.Buffer((B, C, PLANE), "float32")):
        T.func_attr(KERNEL_ATTRS)
        # One input, one output: Relax checks such calls for a reshape pattern, which needs
        # the body to be a block.
        with T.sblock("root"):
            Xf = T.decl_buffer((B * C * H * W,), "float32", data=X.data)
            for t in chunk_loop(n_chunks):
                for w0 in range(per_chunk):
                    w = T.bind(t * per_chunk + w0)
                    if w < B * C:
                        plane = T.decl_buffer(
                            (PLANE,), "float32", data=Y.data, elem_offset=w * PLANE
                        )
                        _zero_around(plane, P0)
                        if len(phases) > 1:
                            _zero_around(plane, P1)
                        if len(phases) > 2:
                            _zero_around(plane, P2)
                        if len(phases) > 3:
                            _zero_around(plane, P3)
                        load(plane, X, Xf, w * H * W, _outer(w, C, B), _inner(w, C, B))

    return pad


def direct_offsets(bsr_indices, geo: ConvGeometry):
    """A direct conv's block indices (`KernelSpec.direct`): for each block's column of W, an
    im2col row (channel, kh, kw), where that row's values for output row 0 start in the
    padded planes of X (`pad_cpu`)."""
    (kh, kw), (sh, sw) = geo.kernel, geo.stride
    rows, cols = phase_shape(geo)
    channel, tap = divmod(bsr_indices.astype("int64"), kh * kw)
    r, q = tap // kw, tap % kw
    phase = (r % sh) * sw + q % sw
    offsets = channel * padded_plane(geo) + phase * rows * cols + (r // sh) * cols + q // sw
    return offsets.astype("int32")


FAMILIES = ("x86", "arm", "cuda")


def matmul_kernel(
    spec: KernelSpec,
    family: str,
    *,
    dense: bool,
    num_cores: int | None = None,
    avx512: bool = True,
) -> tirx.PrimFunc:
    """The scheduled matmul kernel for `spec`: sparse (BSR), dense (packed W), or, when M == 1,
    the matrix-vector kernel, and for M = 2-5 with tall enough r x 1 blocks its columns
    variant (`takes_columns`); a dense W then comes as a BSR matrix with every block. A
    `by_column` spec gets `bsc_matmul_cpu` (W^T's BSR)."""
    if family not in FAMILIES:
        raise KeyError(family)
    if spec.activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {spec.activation!r}")
    if family == "cuda":
        from compile.cuda_kernels import bsr_matmul_cuda, dense_matmul_cuda

        if spec.by_column:
            raise ValueError("by-column 1 x c kernels are CPU kernels")
        return dense_matmul_cuda(spec) if dense and spec.m > 1 else bsr_matmul_cuda(spec)
    tiling = choose_tiling(family, spec, num_cores, avx512, dense and spec.m > 1)
    if spec.by_column:
        return bsc_matmul_cpu(spec, tiling, by_column_tile(family, avx512))
    if spec.m == 1:
        # Sparse rows as `while` loops on x86 only, where it was measured (`_row_loop`).
        short = not dense and family == "x86"
        lanes = vector_unit(family, avx512).lanes
        if spec.lockstep:
            return bsr_matvec_lockstep_cpu(spec, tiling, lanes, short=short)
        return bsr_matvec_cpu(spec, tiling, lanes, short=short)
    if takes_columns(spec, family, avx512):
        return bsr_matvec_columns_cpu(spec, tiling, vector_unit(family, avx512))
    if dense:
        return dense_matmul_cpu(spec, tiling)
    return bsr_matmul_cpu(spec, tiling)


def sparse_matmul_kernel(
    spec: KernelSpec, family: str, num_cores: int | None = None, avx512: bool = True
) -> tirx.PrimFunc:
    """The scheduled sparse kernel for `spec` on a target family (`x86`, `arm`, `cuda`)."""
    return matmul_kernel(spec, family, dense=False, num_cores=num_cores, avx512=avx512)


def depthwise_kernel(
    geo: ConvGeometry,
    family: str,
    activation: str = "none",
    num_cores: int | None = None,
    avx512: bool = True,
    expand: KernelSpec | None = None,
) -> tirx.PrimFunc:
    """The depthwise conv kernel for a target family; with `expand`, the sparse 1x1 conv that
    feeds it computed inside it (`expand_depthwise_cpu`, `expand_depthwise_cuda`)."""
    if family == "cuda":
        from compile.cuda_kernels import depthwise_conv_cuda, expand_depthwise_cuda

        if expand is not None:
            return expand_depthwise_cuda(expand, geo, activation)
        return depthwise_conv_cuda(geo, activation)
    lanes = vector_unit(family, avx512).lanes
    if expand is not None:
        return expand_depthwise_cpu(expand, geo, activation, num_cores, lanes)
    return depthwise_conv_cpu(geo, activation, num_cores, lanes)


def im2col_kernel(
    geo: ConvGeometry, family: str, num_cores: int | None = None, avx512: bool = True
) -> tirx.PrimFunc:
    """The im2col kernel for a target family."""
    if family == "cuda":
        from compile.cuda_kernels import im2col_cuda

        return im2col_cuda(geo)
    row = im2col_row(geo.out_height * geo.out_width, family)
    return im2col_cpu(geo, num_cores, vector_unit(family, avx512).lanes, row)


KERNEL_OPS = ("sparse", "dense", "depthwise", "im2col", "pad")


@dataclass(frozen=True)
class Kernel:
    """One of our kernels, named by what it computes. Making the PrimFunc parses its TVMScript
    (about 0.2 s), so it is made only when needed (`func`, memoised); `key` names the kernel
    for the cache of built kernels (`compile.objects`), which usually makes parsing unneeded."""

    op: str  # one of KERNEL_OPS
    family: str
    shape: KernelSpec | ConvGeometry  # KernelSpec for matmuls, ConvGeometry otherwise
    activation: str = "none"  # depthwise (a matmul's is in its spec)
    num_cores: int | None = None
    avx512: bool = False
    # depthwise: the sparse 1x1 conv computed inside it (its input is then the kernel's)
    expand: KernelSpec | None = None

    def __post_init__(self) -> None:
        if self.op not in KERNEL_OPS:
            raise ValueError(f"kernel op must be one of {KERNEL_OPS}, got {self.op!r}")
        if isinstance(self.shape, ConvGeometry) and not takes_dilation(
            self.op, self.family, self.shape
        ):
            raise ValueError(f"dilated {self.op} kernels are not written for {self.family}")
        if self.family != "cuda":  # CPU kernels read these sizes from their arrays
            if isinstance(self.shape, KernelSpec):
                # A by-column kernel's scratch is sized by its rows: they stay.
                rows = self.shape.rows if self.shape.by_column else 0
                shape = replace(self.shape, rows=rows, cols=0, block_rows=0)
            else:
                shape = replace(self.shape, channels=0)
            object.__setattr__(self, "shape", shape)
            if self.expand is not None:
                expand = replace(self.expand, rows=0, cols=0, block_rows=0)
                object.__setattr__(self, "expand", expand)

    @property
    def key(self) -> str:
        return repr(self)

    def func(self) -> tirx.PrimFunc:
        return _make(self)


# Parsed kernels (the oldest dropped past MADE_KEPT), and parses asked for ahead
# (`parse_ahead`), made one at a time on a thread of their own.
MADE_KEPT = 1024
_made: dict[Kernel, tirx.PrimFunc] = {}
_ahead: dict[Kernel, Future] = {}
_lock = threading.Lock()
_AHEAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hwnas-parse")


def _after_fork() -> None:
    """A forked child has none of its parent's threads: a new parse thread, no parses ahead."""
    global _AHEAD, _lock
    _AHEAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hwnas-parse")
    _lock = threading.Lock()
    _ahead.clear()


os.register_at_fork(after_in_child=_after_fork)


def parse_ahead(kernels: list[Kernel]) -> None:
    """Start parsing `kernels` not parsed yet, in order, on a thread of their own, so that
    parsing one (Python, holding the interpreter's lock) overlaps building the one before
    (TVM's passes and LLVM, which release it): 4 sparse kernels parsed and built one after the
    other 1.76 s, overlapped 1.05 s. `Kernel.func` then takes the parse made or under way."""
    with _lock:
        for kernel in kernels:
            if kernel not in _made and kernel not in _ahead:
                _ahead[kernel] = _AHEAD.submit(_parse, kernel)


def _make(kernel: Kernel) -> tirx.PrimFunc:
    """`kernel`'s function: parsed before, under way (`parse_ahead`), or parsed now."""
    with _lock:
        func = _made.get(kernel)
        ahead = _ahead.pop(kernel, None)
    if func is not None:
        return func
    func = ahead.result() if ahead is not None else _parse_on_a_thread(kernel)
    with _lock:
        _made[kernel] = func
        while len(_made) > MADE_KEPT:
            del _made[next(iter(_made))]
    return func


def _parse_on_a_thread(kernel: Kernel) -> tirx.PrimFunc:
    """`kernel`'s function, parsed on a thread of its own. TVM 0.27's `T.prim_func` calls
    `inspect.stack()` (twice a kernel), which reads the source lines of every frame on the
    caller's stack and, for a frame whose file is no module's (`<frozen runpy>` under
    `python -m`), goes through all of `sys.modules`: 25-90 ms a call at 40 frames. A new
    thread's stack is a few frames deep (so is `parse_ahead`'s)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(_parse, kernel).result()


def _parse(kernel: Kernel) -> tirx.PrimFunc:
    if kernel.op in ("sparse", "dense"):
        return matmul_kernel(
            kernel.shape,
            kernel.family,
            dense=kernel.op == "dense",
            num_cores=kernel.num_cores,
            avx512=kernel.avx512,
        )
    if kernel.op == "depthwise":
        return depthwise_kernel(
            kernel.shape,
            kernel.family,
            kernel.activation,
            kernel.num_cores,
            kernel.avx512,
            kernel.expand,
        )
    if kernel.op == "pad":
        lanes = vector_unit(kernel.family, kernel.avx512).lanes
        return pad_cpu(kernel.shape, kernel.num_cores, lanes)
    return im2col_kernel(kernel.shape, kernel.family, kernel.num_cores, kernel.avx512)
