"""One 1x1-conv shape: our sparse kernel vs our dense kernel (through build) vs torch, in GFLOP/s.

Run alone on a quiet machine: ``python benchmarks/kernels.py [--sparsity 0.9] [--block 4x1]``.
Sparse GFLOP/s count only the nonzero multiply-adds; dense ones count them all.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import tvm
from torch import nn
from tvm.target import codegen

import compile as hw_compile
from compile.bsr import to_bsr
from compile.kernels import KernelSpec, sparse_matmul_kernel


class _Profile:
    family = "x86"
    host = None
    cross_compiler = None
    name = "bench/host"

    def __init__(self, threads: int):
        self.target = {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, default=32, help="H = W")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--block", default="4x1", help="rows x cols, e.g. 16x1 or 1x8")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    block = tuple(int(v) for v in args.block.split("x"))
    c, m = args.channels, args.size * args.size
    rng = np.random.default_rng(0)
    keep = rng.random((c // block[0], c // block[1])) >= args.sparsity
    w = rng.standard_normal((c, c)).astype(np.float32) * np.kron(keep, np.ones(block))
    w = w.astype(np.float32)
    x = rng.standard_normal((1, c, m)).astype(np.float32)
    target = tvm.target.Target(_Profile(args.threads).target)
    dev = tvm.cpu()

    bsr = to_bsr(w, block)
    spec = KernelSpec(1, c, c, m, bsr.block, len(bsr.data), bsr.block_rows)
    lib = tvm.compile(sparse_matmul_kernel(spec, "x86", args.threads), target=target)
    tensors = [tvm.runtime.tensor(a, dev) for a in (x, bsr.data, bsr.indices, bsr.indptr)]
    bias = tvm.runtime.tensor(np.zeros(c, np.float32), dev)
    out = tvm.runtime.tensor(np.zeros((1, c, m), np.float32), dev)
    timer = lib.mod.time_evaluator("bsr_matmul", dev, number=20, repeat=5)
    sparse_s = min(timer(*tensors, bias, out).results)

    conv = nn.Conv2d(c, c, 1, bias=False).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w).reshape(c, c, 1, 1))
    xt = torch.from_numpy(x).reshape(1, c, args.size, args.size)
    dense = hw_compile.build(conv, xt, _Profile(args.threads), check=False)
    vm = tvm.relax.VirtualMachine(dense.executable, dev)
    dense_s = min(
        vm.time_evaluator("main", dev, number=5, repeat=3)(tvm.runtime.tensor(xt.numpy())).results
    )

    torch.set_num_threads(args.threads)
    with torch.no_grad():
        for _ in range(3):
            conv(xt)
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(10):
                conv(xt)
            runs.append((time.perf_counter() - start) / 10)
    torch_s = min(runs)

    nnz, total = np.count_nonzero(w), c * c
    print(f"shape {c}x{c} x {m}, sparsity {args.sparsity}, block {args.block}")
    print(f"{'kernel':<22}{'ms':>9}{'GFLOP/s':>10}")
    for name, seconds, macs in [
        ("sparse (ours, nnz)", sparse_s, nnz),
        ("dense (hwnas kernel)", dense_s, total),
        ("dense (torch)", torch_s, total),
    ]:
        print(f"{name:<22}{seconds * 1e3:>9.3f}{2 * macs * m / seconds / 1e9:>10.1f}")


if __name__ == "__main__":
    main()
