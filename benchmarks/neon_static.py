"""NEON inner loops, estimated statically: no aarch64 board here (qemu's timings are no
figures), so LLVM's own CPU models (`llvm-mca`) estimate the cycles of each kernel's hottest
loop, the innermost loop with the most FMA lanes: our sparse kernel's (per block) against our
dense kernel's (per k), per shape of `benchmarks/kernels.py` and block.

The estimate assumes every load hits L1 and every branch is predicted, and leaves out all but
that loop (tile set-up, stores, the matrix-vector kernel's per-row sums), so it bounds what a
board can do, no more: `ratio` is the dense loop's cycles per FMA lane over the sparse one's,
and a speedup at sparsity s can reach about ratio / (1 - s) at best.
Writes benchmarks/out/neon_static.json and the `## NEON inner loops` section of RESULTS.md.
Needs `llvm-mca` (Debian: llvm): ``python benchmarks/neon_static.py``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import tvm
from e2e import machine
from kernels import BLOCKS, OUT, SHAPES, Shape, block_sparse_weight, replace_section

from compile.bsr import to_bsr
from compile.kernels import BUILD_CONFIG, KernelSpec, matmul_kernel
from compile.rewrite import _dense_candidate

SECTION = "## NEON inner loops"
CPUS = ("cortex-a72", "cortex-a55")  # Raspberry Pi 4's out-of-order core; a small in-order one
_BRANCH = re.compile(r"^\s*(?:b\.\w+|cbn?z|tbn?z|b)\s+(?:.*,\s*)?(\.LBB\d+_\d+)\s*$")
_FMA = re.compile(r"^\s*(?:fmla|fmls|fmadd)\b(?:\s+v\d+\.(\d+)s)?")


def fma_loops(asm: str) -> list[list[str]]:
    """Innermost loops (no label inside) that hold an FMA: their instruction lines."""
    lines = asm.splitlines()
    labels = {
        m.group(1): i for i, text in enumerate(lines) if (m := re.match(r"^(\.LBB\d+_\d+):", text))
    }
    loops = []
    for end, line in enumerate(lines):
        m = _BRANCH.match(line)
        if not m or labels.get(m.group(1), end) >= end:
            continue
        inside = lines[labels[m.group(1)] + 1 : end + 1]
        if any(re.match(r"^\.LBB", text) for text in inside):
            continue
        body = [t for t in inside if t.strip() and not t.strip().startswith((".", "//", "@"))]
        if any(_FMA.match(t) for t in body):
            loops.append(body)
    return loops


def fma_lanes(body: list[str]) -> int:
    return sum(int(m.group(1) or 1) for t in body if (m := _FMA.match(t)))


def cycles(body: list[str], cpu: str, iterations: int = 200) -> float:
    """llvm-mca's cycles per iteration of the loop, run back to back."""
    done = subprocess.run(
        ["llvm-mca", "-mtriple=aarch64", f"-mcpu={cpu}", f"-iterations={iterations}"],
        input="\n".join(body) + "\n",
        capture_output=True,
        text=True,
        check=True,
    )
    return int(re.search(r"Total Cycles:\s*(\d+)", done.stdout).group(1)) / iterations


def cycles_per_lane(kernel, cpu: str) -> tuple[float, int]:
    """Cycles per FMA lane of the kernel's hottest loop, and that loop's instruction count."""
    target = tvm.target.Target(
        {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "mcpu": cpu}
    )
    with tvm.transform.PassContext(config=BUILD_CONFIG):
        asm = tvm.compile(kernel, target=target).mod.inspect_source("asm")
    body = max(fma_loops(asm), key=fma_lanes)
    return cycles(body, cpu) / fma_lanes(body), len(body)


def one_shape(shape: Shape, cpu: str) -> list[dict]:
    rng = np.random.default_rng(0)
    dense_w = rng.standard_normal((shape.rows, shape.cols)).astype(np.float32)
    bias = np.zeros(shape.rows, np.float32)
    dense = _dense_candidate(dense_w, bias, 1, shape.m, "none", "arm", 1, False)
    dense_cpl, _ = cycles_per_lane(matmul_kernel(dense.spec, "arm", dense=True, num_cores=1), cpu)
    rows = []
    for block in BLOCKS:
        bsr = to_bsr(block_sparse_weight(shape, 0.9, block, rng), block)
        spec = KernelSpec(1, shape.rows, shape.cols, shape.m, block, bsr.block_rows)
        cpl, size = cycles_per_lane(matmul_kernel(spec, "arm", dense=False, num_cores=1), cpu)
        rows.append(
            {
                "shape": shape.name,
                "cpu": cpu,
                "block": f"{block[0]}x{block[1]}",
                "sparse_cycles_per_lane": round(cpl, 4),
                "dense_cycles_per_lane": round(dense_cpl, 4),
                "sparse_loop_instructions": size,
                "ratio": round(dense_cpl / cpl, 3),
            }
        )
        print(rows[-1], flush=True)
    return rows


def write_results(result: dict) -> None:
    lines = [
        "| shape | block | "
        + " | ".join(f"{c}: sparse / dense cycles per lane, ratio" for c in CPUS)
        + " |",
        "| --- | --- |" + " ---: |" * len(CPUS),
    ]
    by_key = {(r["shape"], r["block"], r["cpu"]): r for r in result["rows"]}
    for shape in SHAPES:
        for block in BLOCKS:
            cells = []
            for cpu in CPUS:
                r = by_key[(shape.name, f"{block[0]}x{block[1]}", cpu)]
                cells.append(
                    f"{r['sparse_cycles_per_lane']:.3f} / {r['dense_cycles_per_lane']:.3f}, "
                    f"{r['ratio']:.2f}"
                )
            lines.append(f"| {shape.name} | {block[0]}x{block[1]} | " + " | ".join(cells) + " |")
    m = result["machine"]
    section = (
        f"{SECTION} (`benchmarks/neon_static.py`, estimated, not measured)\n\n"
        f"Run on {m['date']} with {result['llvm_mca']}. No aarch64 board here: LLVM's CPU models "
        "estimate the cycles of each kernel's hottest loop (the innermost loop with the most FMA "
        "lanes), assuming L1 hits and predicted branches. A ratio is the dense loop's cycles per "
        "FMA lane over the sparse loop's; the speedup at sparsity s is at most about "
        "ratio / (1 - s), before tile set-up, stores and per-row sums.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    replace_section(SECTION, section)


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    if shutil.which("llvm-mca") is None:
        sys.exit("llvm-mca is not installed: `apt-get install llvm` (Debian) provides it")
    version = subprocess.run(["llvm-mca", "--version"], capture_output=True, text=True).stdout
    llvm = re.search(r"LLVM version ([\d.]+)", version)
    rows = [row for shape in SHAPES for cpu in CPUS for row in one_shape(shape, cpu)]
    result = {
        "machine": machine(),
        "llvm_mca": f"llvm-mca {llvm.group(1) if llvm else '?'}",
        "cpus": list(CPUS),
        "rows": rows,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "neon_static.json").write_text(json.dumps(result, indent=1))
    write_results(result)


if __name__ == "__main__":
    main()
