"""Inner loops estimated statically, for the CPUs we have no board of: NEON (qemu's timings are
no figures) and AVX-512 (this machine has none). LLVM's own CPU models (`llvm-mca`) estimate
the cycles of each kernel's hottest loop, the innermost loop with the most FMA lanes: our
sparse kernel's (per block) against our dense kernel's (per k), per shape of
`benchmarks/kernels.py` and block. AVX2 on this machine's core (znver3) is estimated too, to
set the estimate beside what `benchmarks/kernels.py` measures.

The estimate assumes every load hits L1 and every branch is predicted, and leaves out all but
that loop (tile set-up, stores, the matrix-vector kernel's per-row sums), so it bounds what a
core can do, no more: `ratio` is the dense loop's cycles per FMA lane over the sparse one's,
and a speedup at sparsity s can reach about ratio / (1 - s) at best.
Writes benchmarks/out/static_loops.json and the `## Inner loops, estimated` section of
RESULTS.md. Needs `llvm-mca` (Debian: llvm): ``python benchmarks/static_loops.py``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import tvm
from e2e import machine
from kernels import BLOCKS, OUT, SHAPES, Shape, block_sparse_weight, replace_section

from compile.bsr import to_bsr
from compile.kernels import BUILD_CONFIG, matmul_kernel
from compile.rewrite import LayerSite, _dense_candidate, _sparse_candidate

SECTION = "## Inner loops, estimated"


@dataclass(frozen=True)
class Core:
    """A CPU model of llvm-mca, and how our kernels are built and read for it."""

    cpu: str  # LLVM's name, for the build and for llvm-mca
    family: str  # our target family
    avx512: bool
    mtriple: str
    branch: re.Pattern  # a conditional or plain jump to a local label (group 1)
    fma: re.Pattern  # an FMA instruction

    def target(self) -> tvm.target.Target:
        config = {"kind": "llvm", "mtriple": self.mtriple, "mcpu": self.cpu}
        if self.family == "arm":
            config["mattr"] = ["+neon"]
        return tvm.target.Target(config)

    def lanes(self, line: str) -> int:
        """FMA lanes of an instruction line (0: not an FMA)."""
        m = self.fma.match(line)
        if not m:
            return 0
        if self.family == "arm":
            return int(m.group(1) or 1)
        if m.group(1) == "ss":
            return 1
        return 16 if "%zmm" in line else 8 if "%ymm" in line else 4


_ARM_BRANCH = re.compile(r"^\s*(?:b\.\w+|cbn?z|tbn?z|b)\s+(?:.*,\s*)?(\.LBB\d+_\d+)\s*$")
_ARM_FMA = re.compile(r"^\s*(?:fmla|fmls|fmadd)\b(?:\s+v\d+\.(\d+)s)?")
_X86_BRANCH = re.compile(r"^\s*j\w+\s+(\.LBB\d+_\d+)\s*$")
_X86_FMA = re.compile(r"^\s*vfn?m(?:add|sub)(?:132|213|231)(ps|ss)\b")


def _arm(cpu: str) -> Core:
    return Core(cpu, "arm", False, "aarch64-linux-gnu", _ARM_BRANCH, _ARM_FMA)


def _x86(cpu: str, avx512: bool) -> Core:
    return Core(cpu, "x86", avx512, "x86_64-linux-gnu", _X86_BRANCH, _X86_FMA)


# Raspberry Pi 4's out-of-order core and a small in-order one; a Skylake server core with
# AVX-512 (two 512-bit FMA units); this machine's core with AVX2.
CORES = (
    _arm("cortex-a72"),
    _arm("cortex-a55"),
    _x86("skylake-avx512", True),
    _x86("znver3", False),
)


def fma_loops(asm: str, core: Core) -> list[list[str]]:
    """Innermost loops (no label inside) that hold an FMA: their instruction lines."""
    lines = asm.splitlines()
    labels = {
        m.group(1): i for i, text in enumerate(lines) if (m := re.match(r"^(\.LBB\d+_\d+):", text))
    }
    loops = []
    for end, line in enumerate(lines):
        m = core.branch.match(line)
        if not m or labels.get(m.group(1), end) >= end:
            continue
        inside = lines[labels[m.group(1)] + 1 : end + 1]
        if any(re.match(r"^\.LBB", text) for text in inside):
            continue
        body = [t for t in inside if t.strip() and not t.strip().startswith((".", "//", "@", "#"))]
        if any(core.lanes(t) for t in body):
            loops.append(body)
    return loops


def fma_lanes(body: list[str], core: Core) -> int:
    return sum(core.lanes(t) for t in body)


def cycles(body: list[str], core: Core, iterations: int = 200) -> float:
    """llvm-mca's cycles per iteration of the loop, run back to back."""
    done = subprocess.run(
        [
            "llvm-mca",
            f"-mtriple={core.mtriple.split('-')[0]}",
            f"-mcpu={core.cpu}",
            f"-iterations={iterations}",
        ],
        input="\n".join(body) + "\n",
        capture_output=True,
        text=True,
        check=True,
    )
    return int(re.search(r"Total Cycles:\s*(\d+)", done.stdout).group(1)) / iterations


def cycles_per_lane(kernel, core: Core) -> tuple[float, int]:
    """Cycles per FMA lane of the kernel's hottest loop, and that loop's instruction count."""
    with tvm.transform.PassContext(config=BUILD_CONFIG):
        asm = tvm.compile(kernel, target=core.target()).mod.inspect_source("asm")
    body = max(fma_loops(asm, core), key=lambda b: fma_lanes(b, core))
    return cycles(body, core) / fma_lanes(body, core), len(body)


def one_shape(shape: Shape, core: Core) -> list[dict]:
    rng = np.random.default_rng(0)
    dense_w = rng.standard_normal((shape.rows, shape.cols)).astype(np.float32)
    bias = np.zeros(shape.rows, np.float32)
    site = LayerSite(1, shape.m, "none", core.family, 1, core.avx512)
    dense = _dense_candidate(dense_w, bias, site)
    dense_kernel = matmul_kernel(
        dense.spec, core.family, dense=True, num_cores=1, avx512=core.avx512
    )
    dense_cpl, _ = cycles_per_lane(dense_kernel, core)
    rows = []
    for block in BLOCKS:
        w = block_sparse_weight(shape, 0.9, block, rng)
        sparse = _sparse_candidate(w, to_bsr(w, block), bias, site)  # the kernel a build uses
        cpl, size = cycles_per_lane(sparse.kernel.func(), core)
        rows.append(
            {
                "shape": shape.name,
                "cpu": core.cpu,
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
    cpus = result["cpus"]
    lines = [
        "| shape | block | " + " | ".join(f"{c}: sparse / dense, ratio" for c in cpus) + " |",
        "| --- | --- |" + " ---: |" * len(cpus),
    ]
    by_key = {(r["shape"], r["block"], r["cpu"]): r for r in result["rows"]}
    for shape in SHAPES:
        for block in BLOCKS:
            cells = []
            for cpu in cpus:
                r = by_key[(shape.name, f"{block[0]}x{block[1]}", cpu)]
                cells.append(
                    f"{r['sparse_cycles_per_lane']:.3f} / {r['dense_cycles_per_lane']:.3f}, "
                    f"{r['ratio']:.2f}"
                )
            lines.append(f"| {shape.name} | {block[0]}x{block[1]} | " + " | ".join(cells) + " |")
    m = result["machine"]
    section = (
        f"{SECTION} (`benchmarks/static_loops.py`, not measured)\n\n"
        f"Run on {m['date']} with {result['llvm_mca']}. No aarch64 board and no AVX-512 core "
        "here: LLVM's CPU models estimate the cycles of each kernel's hottest loop (the "
        "innermost loop with the most FMA lanes), assuming L1 hits and predicted branches. A "
        "cell is the sparse loop's and the dense loop's cycles per FMA lane, and their ratio "
        "(dense over sparse); the speedup at sparsity s is at most about ratio / (1 - s), "
        "before tile set-up, stores and per-row sums. AVX2 (znver3) is this machine's core, "
        "to compare the estimate with the measured `## Kernels`.\n\n" + "\n".join(lines) + "\n"
    )
    replace_section(SECTION, section)


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    if shutil.which("llvm-mca") is None:
        sys.exit("llvm-mca is not installed: `apt-get install llvm` (Debian) provides it")
    version = subprocess.run(["llvm-mca", "--version"], capture_output=True, text=True).stdout
    llvm = re.search(r"LLVM version ([\d.]+)", version)
    rows = [row for shape in SHAPES for core in CORES for row in one_shape(shape, core)]
    result = {
        "machine": machine(),
        "llvm_mca": f"llvm-mca {llvm.group(1) if llvm else '?'}",
        "cpus": [core.cpu for core in CORES],
        "rows": rows,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "static_loops.json").write_text(json.dumps(result, indent=1))
    write_results(result)


if __name__ == "__main__":
    main()
