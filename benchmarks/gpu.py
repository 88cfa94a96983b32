"""Our CUDA kernels and the `mbv2-sparse` net on the local GPU.

Kernels: per shape x sparsity x block, our BSR kernel against our dense CUDA kernel, torch
dense (cuDNN for the 1x1 convs, cuBLAS for the Linear) and torch CSR (cuSPARSE SpMM), all on
the GPU, each the best of `repeats` repeats of the mean over >= min_ms of calls. Rates are
effective GFLOP/s (2 x nonzero MACs / time) and speedups our dense kernel's time over the
method's, as in `kernels.py`. End to end: the net through hwnas (sparse, sparse with every
sparse kernel forced, and its dense twin) against torch eager on the GPU, at batch 1 and 32.
Writes benchmarks/out/gpu.json and the `## CUDA` section of RESULTS.md. Needs a CUDA GPU:
``python benchmarks/gpu.py [--quick | --e2e-only]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import tvm
from e2e import build_model, machine
from kernels import (
    BLOCKS,
    SHAPES,
    SPARSITIES,
    Shape,
    block_sparse_weight,
    replace_section,
    summary,
)

import compile as hw_compile
from compile.bsr import to_bsr
from compile.kernels import Kernel, KernelSpec
from compile.rewrite import LayerSite, _dense_candidate
from hw_profiles.profiles import load_profile

OUT = Path(__file__).parent / "out"
SECTION = "## CUDA"
METHODS = ("ours sparse", "ours dense", "torch dense", "torch csr")
# The CPU grid's shapes at batch 1, and the 1x1 convs again at batch 32 (a GPU's usual load).
GRID = [(s, 1) for s in SHAPES] + [(s, 32) for s in SHAPES if s.kind == "conv1x1"]


def gpu_target() -> dict:
    gpu = tvm.cuda(0)
    if not gpu.exist:
        raise SystemExit("no CUDA GPU on this machine: run benchmarks/gpu.py where there is one")
    return {"kind": "cuda", "arch": "sm_" + gpu.compute_version.replace(".", "")}


def time_torch(fn, min_ms: float, repeats: int) -> float:
    """Seconds per call: best over `repeats` of the mean of enough calls to last >= min_ms."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    number = max(1, math.ceil(min_ms / 1e3 / max(time.perf_counter() - start, 1e-6)))
    best = math.inf
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        best = min(best, begin.elapsed_time(end) / 1e3 / number)
    return best


def time_kernel(kernel: Kernel, inputs, out_shape, min_ms: float, repeats: int) -> float:
    func = kernel.func()
    lib = tvm.compile(func, target=tvm.target.Target(gpu_target(), host="llvm"))
    dev = tvm.cuda(0)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs]
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32), dev)
    name = str(func.attrs["global_symbol"])
    timer = lib.mod.time_evaluator(name, dev, number=1, repeat=repeats, min_repeat_ms=int(min_ms))
    timer(*args, out)  # warm-up: module load, first launch
    return float(min(timer(*args, out).results))


def grid_row(shape: Shape, batch: int, sparsity: float, block, dense: dict, args, rng) -> dict:
    w = block_sparse_weight(shape, sparsity, block, rng)
    x = rng.standard_normal((batch, shape.cols, shape.m)).astype(np.float32)
    bias = np.zeros(shape.rows, np.float32)
    y_shape = (batch, shape.rows, shape.m)
    bsr = to_bsr(w, block)
    spec = KernelSpec(batch, shape.rows, shape.cols, shape.m, bsr.block, bsr.block_rows)
    kernel = Kernel("sparse", "cuda", spec)
    inputs = [x, bsr.data, bsr.indices, bsr.indptr, bias]
    times = {"ours sparse": time_kernel(kernel, inputs, y_shape, args.min_ms, args.repeats)}
    # cuSPARSE multiplies a CSR matrix by one (cols x batch*m) matrix
    wt = torch.from_numpy(w).cuda().to_sparse_csr()
    xt = torch.from_numpy(x).cuda().permute(1, 0, 2).reshape(shape.cols, -1).contiguous()
    with torch.no_grad():
        times["torch csr"] = time_torch(lambda: torch.sparse.mm(wt, xt), args.min_ms, args.repeats)
    times = {**dense, **times}
    nnz = int(np.count_nonzero(w))
    ref = times["ours dense"]
    return {
        "shape": dataclasses.asdict(shape),
        "batch": batch,
        "sparsity": sparsity,
        "block": f"{block[0]}x{block[1]}",
        "nnz": nnz,
        "ms": {k: v * 1e3 for k, v in times.items()},
        "gflops": {k: 2 * nnz * batch * shape.m / v / 1e9 for k, v in times.items()},
        "speedup_vs_ours_dense": {k: ref / v for k, v in times.items()},
    }


def dense_times(shape: Shape, batch: int, args, rng) -> dict[str, float]:
    w = rng.standard_normal((shape.rows, shape.cols)).astype(np.float32)
    x = rng.standard_normal((batch, shape.cols, shape.m)).astype(np.float32)
    bias = np.zeros(shape.rows, np.float32)
    ours = _dense_candidate(w, bias, LayerSite(batch, shape.m, "none", "cuda", None, False))
    y_shape = (batch, shape.rows, shape.m)
    times = {
        "ours dense": time_kernel(
            ours.kernel, [x, *ours.constants], y_shape, args.min_ms, args.repeats
        )
    }
    wt = torch.from_numpy(w).cuda()
    if shape.kind == "conv1x1":
        xt = torch.from_numpy(x).cuda().reshape(batch, shape.cols, shape.hw, shape.hw)
        w4 = wt.reshape(shape.rows, shape.cols, 1, 1)
        fn = lambda: torch.nn.functional.conv2d(xt, w4)  # noqa: E731
    else:
        xt = torch.from_numpy(np.ascontiguousarray(x[0].T)).cuda()
        fn = lambda: torch.nn.functional.linear(xt, wt)  # noqa: E731
    with torch.no_grad():
        times["torch dense"] = time_torch(fn, args.min_ms, args.repeats)
    return times


def run_grid(grid, sparsities, args) -> list[dict]:
    rows = []
    for shape, batch in grid:
        rng = np.random.default_rng(0)
        dense = dense_times(shape, batch, args, rng)
        for sparsity in sparsities:
            for block in BLOCKS:
                row = grid_row(shape, batch, sparsity, block, dense, args, rng)
                rows.append(row)
                print(
                    f"{shape.name:<22} b{batch:<3} {sparsity:>5} {row['block']:<5}"
                    + " ".join(f"{k}={v:.4f}ms" for k, v in row["ms"].items()),
                    flush=True,
                )
    return rows


def end_to_end(batches, repeats: int) -> list[dict]:
    """The net through hwnas (built for this GPU) and through torch eager, per batch size; the
    sparse net also with every sparse layer forced onto its sparse kernel."""
    base = load_profile("cuda/h100")
    profile = dataclasses.replace(base, target={**base.target, **gpu_target()})
    dev = tvm.cuda(0)
    runs = (
        ("sparse 90% 16x1", True, "auto"),
        ("sparse 90% 16x1, sparse kernels forced", True, "sparse"),
        ("dense twin", False, "auto"),
    )
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 32, 32)
        for label, sparse, choice in runs:
            model = build_model(sparse)
            start = time.perf_counter()
            compiled = hw_compile.build(model, x, profile, kernel_choice=choice)
            compile_s = time.perf_counter() - start
            vm = tvm.relax.VirtualMachine(compiled.executable, dev)
            arg = tvm.runtime.tensor(x.numpy(), dev)
            timer = vm.time_evaluator("main", dev, number=50, repeat=repeats)
            timer(arg)
            ms = float(np.median(timer(arg).results)) * 1e3
            # each sparse layer's kernel and, where timed, both kernels' times (ms)
            chosen = {
                name: [k["impl"], k.get("sparse_ms"), k.get("dense_ms")]
                for name, k in compiled.kernels.items()
                if "sparse_ms" in k or k["impl"] == "sparse"
            }
            row = {"net": label, "runtime": "hwnas", "batch": batch, "ms": ms}
            rows.append({**row, "compile_s": compile_s, "layers": chosen})
            print(rows[-1], flush=True)
            if choice != "auto":
                continue
            model = model.cuda()
            xc = x.cuda()
            with torch.no_grad():
                ms = time_torch(lambda: model(xc), 20.0, repeats) * 1e3  # noqa: B023
            rows.append({"net": label, "runtime": "torch eager", "batch": batch, "ms": ms})
            print(rows[-1], flush=True)
    return rows


def markdown(result: dict) -> str:
    head = " | ".join(METHODS)
    lines = [
        f"| shape | batch | sparsity | block | {head} | ours sparse speedup | torch csr speedup |",
        "| --- | ---: | ---: | --- |" + " ---: |" * (len(METHODS) + 2),
    ]
    for row in result["rows"]:
        rates = " | ".join(f"{row['gflops'][m]:.1f}" for m in METHODS)
        speed = row["speedup_vs_ours_dense"]
        lines.append(
            f"| {row['shape']['name']} | {row['batch']} | {row['sparsity']:.0%} | {row['block']} "
            f"| {rates} | {speed['ours sparse']:.2f}x | {speed['torch csr']:.2f}x |"
        )
    lines += ["", summary(result["rows"]), "", "End to end (`mbv2-sparse`, 32x32 input), ms:", ""]
    lines += ["| net | runtime | batch | ms |", "| --- | --- | ---: | ---: |"]
    for row in result["e2e"]:
        lines.append(f"| {row['net']} | {row['runtime']} | {row['batch']} | {row['ms']:.4f} |")
    return "\n".join(lines)


def write_results(table: str, result: dict) -> None:
    m = result["machine"]
    section = (
        f"{SECTION} (`benchmarks/gpu.py`)\n\n"
        f"Taken on {result['gpu']} ({result['target']['arch']}), host {m['cpu']}, {m['date']}: "
        f"best of {result['repeats']} repeats of >= {result['min_ms']:g} ms each; rates are "
        "effective GFLOP/s (2 x nonzero MACs / time); speedups are our dense CUDA kernel's "
        "time over the method's. torch csr is cuSPARSE on the same block-sparse matrix.\n\n"
        f"{table}\n"
    )
    replace_section(SECTION, section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="two shapes, two sparsities")
    parser.add_argument("--e2e-only", action="store_true", help="skip the kernel grid")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-ms", type=float, default=10.0, help="least time per repeat")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for gpu.json")
    args = parser.parse_args()
    grid, sparsities = (GRID[1:2] + GRID[-1:], (0.7, 0.9)) if args.quick else (GRID, SPARSITIES)
    result = {
        "machine": machine(),
        "gpu": torch.cuda.get_device_name(0),
        "target": gpu_target(),
        "repeats": args.repeats,
        "min_ms": args.min_ms,
        "rows": [] if args.e2e_only else run_grid(grid, sparsities, args),
        "e2e": end_to_end((1, 32), args.repeats),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / ("gpu-quick.json" if args.quick else "gpu.json")).write_text(
        json.dumps(result, indent=1)
    )
    table = markdown(result)
    print(table)
    if not (args.quick or args.e2e_only):
        write_results(table, result)


if __name__ == "__main__":
    main()
