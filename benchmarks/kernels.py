"""Kernel grid: our BSR kernel vs our dense kernel vs torch / onnxruntime dense vs scipy.sparse
and torch.sparse, per shape x sparsity x block, one thread each.

Shapes: MobileNetV2 1x1 convs (Y = W X, K = C_in, M = H * W) and a 512x512 Linear at batch 1
and 64. Every rate is *effective* GFLOP/s: 2 x nonzero MACs / time, whatever the method
computes, so rates compare directly; "speedup" is our dense kernel's time / the method's time.
The core's one-thread FMA peak is measured too (`peak_gflops`), and rates are set against it.
Writes benchmarks/out/kernels.json and the table into benchmarks/RESULTS.md (## Kernels).
Run alone on a quiet machine: ``python benchmarks/kernels.py [--quick]``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402
from e2e import machine  # noqa: E402
from tvm.script import tirx as T  # noqa: E402
from tvm.target import codegen  # noqa: E402

from compile.bsr import to_bsr  # noqa: E402
from compile.kernels import (  # noqa: E402
    _ON_STACK,
    BUILD_CONFIG,
    KERNEL_ATTRS,
    Kernel,
    vector_unit,
)
from compile.rewrite import LayerSite, _dense_candidate, _sparse_candidate  # noqa: E402

OUT = Path(__file__).parent / "out"
RESULTS = Path(__file__).parent / "RESULTS.md"
SECTION = "## Kernels"


@dataclass(frozen=True)
class Shape:
    """One layer: W is rows x cols, activations cols x m (m = H * W, or the Linear's batch)."""

    name: str
    kind: str  # "conv1x1" | "linear"
    rows: int
    cols: int
    m: int
    hw: int = 0  # conv spatial side


SHAPES = (
    Shape("conv 96->24 @32x32", "conv1x1", 24, 96, 1024, 32),
    Shape("conv 144->32 @14x14", "conv1x1", 32, 144, 196, 14),
    Shape("conv 384->64 @14x14", "conv1x1", 64, 384, 196, 14),
    Shape("linear 512x512 b1", "linear", 512, 512, 1),
    Shape("linear 512x512 b64", "linear", 512, 512, 64),
)
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
BLOCKS = ((4, 1), (16, 1), (1, 4))
METHODS = ("ours sparse", "ours dense", "torch dense", "ort dense", "scipy csr", "torch csr")
TARGET = {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": 1}


def time_fn(fn: Callable[[], object], min_ms: float, repeats: int) -> float:
    """Best over `repeats` of the mean per call, `number` calls chosen to last >= min_ms."""
    fn()
    number, start = 1, time.perf_counter()
    fn()
    one = max(time.perf_counter() - start, 1e-7)
    number = max(1, math.ceil(min_ms / 1e3 / one))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def block_sparse_weight(shape: Shape, sparsity: float, block, rng) -> np.ndarray:
    """W with exactly round(sparsity x blocks) whole blocks zeroed (last blocks may be ragged)."""
    br, bc = block
    nbr, nbc = -(-shape.rows // br), -(-shape.cols // bc)
    keep = np.zeros(nbr * nbc, bool)
    keep[rng.permutation(nbr * nbc)[: round((1 - sparsity) * nbr * nbc)]] = True
    mask = np.kron(keep.reshape(nbr, nbc), np.ones((br, bc)))[: shape.rows, : shape.cols]
    return (rng.standard_normal((shape.rows, shape.cols)) * mask).astype(np.float32)


def tvm_timer(
    kernel, inputs: list[np.ndarray], out_shape, min_ms: float, repeats: int
) -> Callable[[], float]:
    """Build `kernel` once; the returned function times it (seconds per call, best of
    `repeats` repeats of >= min_ms) each time it is called."""
    target = tvm.target.Target(TARGET)
    if isinstance(kernel, Kernel):
        kernel = kernel.func()
    with tvm.transform.PassContext(config=BUILD_CONFIG):
        lib = tvm.compile(kernel, target=target)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs]
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32), dev)
    name = str(kernel.attrs["global_symbol"])
    timer = lib.mod.time_evaluator(
        name, dev, number=1, repeat=repeats, min_repeat_ms=int(math.ceil(min_ms))
    )
    return lambda: float(min(timer(*args, out).results))


def ort_session(shape: Shape, w: np.ndarray):
    """A one-node ONNX model (1x1 Conv, or Gemm with W transposed) in onnxruntime, 1 thread."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    if shape.kind == "conv1x1":
        x_shape = [1, shape.cols, shape.hw, shape.hw]
        weight = numpy_helper.from_array(w.reshape(shape.rows, shape.cols, 1, 1), "W")
        node = helper.make_node("Conv", ["X", "W"], ["Y"])
    else:
        x_shape = [shape.m, shape.cols]
        weight = numpy_helper.from_array(w, "W")
        node = helper.make_node("Gemm", ["X", "W"], ["Y"], transB=1)
    graph = helper.make_graph(
        [node],
        "layer",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
    )
    return session, x_shape


def dense_baselines(
    shape: Shape, min_ms: float, repeats: int, rng
) -> tuple[dict[str, float], Callable[[], float]]:
    """Seconds per call of the dense methods (their time does not depend on the values), and
    a timer of our dense kernel (for the later passes, see `run_grid`)."""
    w = rng.standard_normal((shape.rows, shape.cols)).astype(np.float32)
    x = rng.standard_normal((1, shape.cols, shape.m)).astype(np.float32)
    bias = np.zeros(shape.rows, np.float32)
    ours = _dense_candidate(w, bias, LayerSite(1, shape.m, "none", "x86", 1, avx512()))
    ours_timer = tvm_timer(
        ours.kernel, [x, *ours.constants], (1, shape.rows, shape.m), min_ms, repeats
    )
    times = {"ours dense": ours_timer()}
    wt = torch.from_numpy(w)
    if shape.kind == "conv1x1":
        xt = torch.from_numpy(x).reshape(1, shape.cols, shape.hw, shape.hw)
        w4 = wt.reshape(shape.rows, shape.cols, 1, 1)
        torch_fn = lambda: torch.nn.functional.conv2d(xt, w4)  # noqa: E731
    else:
        xt = torch.from_numpy(np.ascontiguousarray(x[0].T))
        torch_fn = lambda: torch.nn.functional.linear(xt, wt)  # noqa: E731
    with torch.no_grad():
        times["torch dense"] = time_fn(torch_fn, min_ms, repeats)
    try:
        session, x_shape = ort_session(shape, w)
        feed = {"X": rng.standard_normal(x_shape).astype(np.float32)}
        times["ort dense"] = time_fn(lambda: session.run(None, feed), min_ms, repeats)
    except ImportError:
        times["ort dense"] = math.nan
    return times, ours_timer


def sparse_times(
    shape: Shape, w: np.ndarray, block, min_ms: float, repeats: int, rng
) -> tuple[dict[str, float], Callable[[], float]]:
    """Seconds per call of the sparse methods on W, and a timer of our sparse kernel (the one
    a build gives the layer: `compile.rewrite._sparse_candidate`)."""
    import scipy.sparse

    x = rng.standard_normal((1, shape.cols, shape.m)).astype(np.float32)
    bias = np.zeros(shape.rows, np.float32)
    site = LayerSite(1, shape.m, "none", "x86", 1, avx512())
    ours = _sparse_candidate(w, to_bsr(w, block), bias, site)
    inputs = [x, *ours.constants]
    ours_timer = tvm_timer(ours.kernel, inputs, (1, shape.rows, shape.m), min_ms, repeats)
    times = {"ours sparse": ours_timer()}
    csr = scipy.sparse.csr_matrix(w)
    x2 = np.ascontiguousarray(x[0])
    times["scipy csr"] = time_fn(lambda: csr @ x2, min_ms, repeats)
    wt, xt = torch.from_numpy(w).to_sparse_csr(), torch.from_numpy(x2)
    with torch.no_grad():
        times["torch csr"] = time_fn(lambda: torch.sparse.mm(wt, xt), min_ms, repeats)
    return times, ours_timer


def avx512() -> bool:
    return "avx512f" in set(codegen.llvm_get_cpu_features(tvm.target.Target(TARGET)))


def peak_gflops(min_ms: float, repeats: int, steps: int = 100_000) -> float:
    """This core's FMA peak, one thread, measured: a loop of vector FMAs on registers only
    (as many independent chains as our kernels give accumulators, enough to cover the FMA
    latency), built by the same LLVM for the same CPU. GFLOP/s = 2 x FMA lanes / time."""
    unit = vector_unit("x86", avx512())
    chains, lanes = unit.acc_registers, unit.lanes

    @T.prim_func(s_tir=True)
    def fma_peak(a: T.Buffer((2 * lanes,), "float32"), y: T.Buffer((chains * lanes,), "float32")):
        T.func_attr(KERNEL_ATTRS)
        acc = T.alloc_buffer((chains, lanes), "float32", scope="local", annotations=_ON_STACK)
        k = T.alloc_buffer((2, lanes), "float32", scope="local", annotations=_ON_STACK)
        for i in T.unroll(2):
            for j in T.vectorized(lanes):
                k[i, j] = a[i * lanes + j]
        for c in T.unroll(chains):
            for j in T.vectorized(lanes):
                acc[c, j] = k[0, j] + T.float32(c)
        for _ in range(steps):
            for c in T.unroll(chains):
                for j in T.vectorized(lanes):
                    acc[c, j] = acc[c, j] * k[0, j] + k[1, j]
        for c in T.unroll(chains):
            for j in T.vectorized(lanes):
                y[c * lanes + j] = acc[c, j]

    # acc -> acc * 0.999 + 0.001 stays near 1: no overflow, no denormals.
    a = np.concatenate([np.full(lanes, 0.999), np.full(lanes, 0.001)]).astype(np.float32)
    seconds = tvm_timer(fma_peak, [a], (chains * lanes,), min_ms, repeats)()
    return 2 * steps * chains * lanes / seconds / 1e9


def run_grid(shapes, sparsities, blocks, min_ms: float, repeats: int, passes: int = 2) -> list:
    """Every method on every (shape, sparsity, block). Our two kernels are timed in `passes`
    passes over a shape's grid and keep their best: on this VM a burst of load from elsewhere
    lasts seconds, longer than one timing's repeats, and made the same kernel take up to 2x
    longer in one run. Our dense kernel's time is its best over the shape's passes."""
    rows = []
    for shape in shapes:
        rng = np.random.default_rng(0)
        dense, dense_timer = dense_baselines(shape, min_ms, repeats, rng)
        cells = []
        for sparsity in sparsities:
            for block in blocks:
                w = block_sparse_weight(shape, sparsity, block, rng)
                times, sparse_timer = sparse_times(shape, w, block, min_ms, repeats, rng)
                cells.append((sparsity, block, int(np.count_nonzero(w)), times, sparse_timer))
        for _ in range(passes - 1):
            for *_, times, sparse_timer in cells:
                dense["ours dense"] = min(dense["ours dense"], dense_timer())
                times["ours sparse"] = min(times["ours sparse"], sparse_timer())
        for sparsity, block, nnz, sparse, _ in cells:
            times = {**dense, **sparse}
            ref = times["ours dense"]
            rows.append(
                {
                    "shape": asdict(shape),
                    "sparsity": sparsity,
                    "block": f"{block[0]}x{block[1]}",
                    "nnz": nnz,
                    "ms": {k: v * 1e3 for k, v in times.items()},
                    "gflops": {k: 2 * nnz * shape.m / v / 1e9 for k, v in times.items()},
                    "speedup_vs_ours_dense": {k: ref / v for k, v in times.items()},
                }
            )
            print(
                f"{shape.name:<22} {sparsity:>5} {block[0]}x{block[1]:<3} "
                + " ".join(f"{k}={v * 1e3:.4f}ms" for k, v in times.items()),
                flush=True,
            )
    return rows


def markdown(result: dict) -> str:
    """The grid as a table (effective GFLOP/s), then a summary of our sparse kernel's speedup."""
    head = " | ".join(METHODS)
    lines = [
        f"| shape | sparsity | block | {head} | ours sparse, of peak | ours sparse speedup "
        "| best other sparse speedup |",
        "| --- | ---: | --- |" + " ---: |" * (len(METHODS) + 3),
    ]
    peak = result["peak_gflops"]
    for row in result["rows"]:
        rates = " | ".join(f"{row['gflops'][m]:.1f}" for m in METHODS)
        speed = row["speedup_vs_ours_dense"]
        other = max(speed["scipy csr"], speed["torch csr"])
        lines.append(
            f"| {row['shape']['name']} | {row['sparsity']:.0%} | {row['block']} | {rates} | "
            f"{row['gflops']['ours sparse'] / peak:.0%} | {speed['ours sparse']:.2f}x | "
            f"{other:.2f}x |"
        )
    lines += ["", summary(result["rows"]), "", dense_summary(result)]
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """Geometric mean over shapes of our sparse kernel's speedup vs our dense kernel."""
    blocks = sorted({r["block"] for r in rows}, key=[f"{a}x{b}" for a, b in BLOCKS].index)
    sparsities = sorted({r["sparsity"] for r in rows})
    lines = [
        "Our sparse kernel's speedup over our dense kernel, geometric mean over the shapes:",
        "",
        "| block | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
        "| --- |" + " ---: |" * len(sparsities),
    ]
    for block in blocks:
        cells = []
        for s in sparsities:
            vals = [
                r["speedup_vs_ours_dense"]["ours sparse"]
                for r in rows
                if r["block"] == block and r["sparsity"] == s
            ]
            cells.append(f"{math.exp(np.mean(np.log(vals))):.2f}x")
        lines.append(f"| {block} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def dense_summary(result: dict) -> str:
    """The dense methods' real rates (2 x all of W's MACs / time) per shape, against the peak."""
    peak = result["peak_gflops"]
    dense = ("ours dense", "torch dense", "ort dense")
    lines = [
        f"The dense methods' rates counting all of W's multiply-adds (GFLOP/s, and their share "
        f"of this core's measured FMA peak, {peak:.1f} GFLOP/s):",
        "",
        "| shape | " + " | ".join(dense) + " |",
        "| --- |" + " ---: |" * len(dense),
    ]
    seen = set()
    for row in result["rows"]:
        shape = row["shape"]
        if shape["name"] in seen:
            continue
        seen.add(shape["name"])
        macs = shape["rows"] * shape["cols"] * shape["m"]
        cells = []
        for method in dense:
            rate = 2 * macs / (row["ms"][method] / 1e3) / 1e9
            cells.append(f"{rate:.1f} ({rate / peak:.0%})")
        lines.append(f"| {shape['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(table: str, result: dict) -> None:
    """Replace the `## Kernels` section of RESULTS.md (to the next `## ` or the end)."""
    m = result["machine"]
    section = (
        f"{SECTION} (`benchmarks/kernels.py`)\n\n"
        f"Taken on {m['cpu']} (LLVM mcpu {result['mcpu']}, AVX-512 "
        f"{'yes' if result['avx512'] else 'no'}; {m['cores']} cores, load average "
        f"{result['load_avg']:.2f} when the run started, {m['date']}): one thread per runtime, "
        f"best of {result['repeats']} repeats of >= {result['min_ms']:g} ms each (our two "
        f"kernels: best of {result.get('passes', 1)} such timings, in passes over the shape's "
        "grid). On a loaded "
        "machine absolute rates are pessimistic and noisy; compare within a row. Rates are "
        "effective GFLOP/s (2 x nonzero "
        "MACs / time) for every method; speedups are our dense kernel's time over the "
        "method's. scipy and torch.sparse get the same block-sparse matrix as CSR. This core's "
        f"FMA peak, one thread, measured (`peak_gflops`): {result['peak_gflops']:.1f} GFLOP/s; "
        "'of peak' is our sparse kernel's effective rate over it.\n\n"
        f"{table}\n"
    )
    replace_section(SECTION, section)


def replace_section(heading: str, section: str) -> None:
    """Put `section` in RESULTS.md in place of the one whose title starts with `heading` (up to
    the next `## ` or the end), or at the end when there is none."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = text.find(heading + " ")
    if start < 0:
        text = text.rstrip() + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("\n" + text[end + 1 :] if end >= 0 else "")
    RESULTS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="one shape, two sparsities (smoke test)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-ms", type=float, default=20.0, help="least time per repeat")
    parser.add_argument(
        "--passes", type=int, default=2, help="passes over a shape for our kernels (best kept)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        shapes, sparsities = SHAPES[1:2], (0.7, 0.9)
        min_ms, repeats = 5.0, 2
    else:
        shapes, sparsities = SHAPES, SPARSITIES
        min_ms, repeats = args.min_ms, args.repeats
    load_avg = os.getloadavg()[0]
    peak = peak_gflops(min_ms, repeats)
    rows = run_grid(shapes, sparsities, BLOCKS, min_ms, repeats, args.passes)
    peak = max(peak, peak_gflops(min_ms, repeats))
    result = {
        "peak_gflops": peak,
        "machine": machine(),
        "load_avg": load_avg,
        "repeats": repeats,
        "passes": args.passes,
        "min_ms": min_ms,
        "mcpu": TARGET["mcpu"],
        "avx512": avx512(),
        "rows": rows,
    }
    OUT.mkdir(exist_ok=True)
    name = "kernels-quick.json" if args.quick else "kernels.json"
    (OUT / name).write_text(json.dumps(result, indent=1))
    table = markdown(result)
    print(table)
    if not args.quick:
        write_results(table, result)


if __name__ == "__main__":
    main()
