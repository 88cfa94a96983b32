"""k x k convolutions through hwnas (a dense conv as im2col and our dense matmul kernel, a
sparse one direct, from its input's zero-padded planes; the bias and ReLU fused), each a
one-layer model built whole and timed in the Relax VM, against torch and onnxruntime on the
dense conv. One thread. The shapes: 3x3 convs on a 32x32 map (whose im2col rows, 1024 floats,
are padded off 4 KB: `compile.kernels.im2col_row`) and on a 16x16 map, and a stem (3 -> 32
channels); dense, and 90% sparse in 4x1 and 16x1 blocks.
Writes benchmarks/out/convs.json and the `## k x k convolutions` section of RESULTS.md. Run
alone: ``python benchmarks/convs.py [--repeats 10]``.
"""

from __future__ import annotations

import argparse
import json

import torch
from e2e import OUT, HostProfile, call_timer, in_turns, linked, machine, ort_timer, vm_timer
from kernels import replace_section
from torch import nn

import compile as hw_compile
from compile.kernels import KERNEL_VERSION
from search_spaces.ops import SparseConv2d

# (name, in channels, out channels, map size)
SHAPES = (
    ("3x3 64->64 @32x32", 64, 64, 32),
    ("3x3 128->128 @16x16", 128, 128, 16),
    ("3x3 3->32 @32x32 (stem)", 3, 32, 32),
)
SPARSE = (("90% 4x1", (4, 1)), ("90% 16x1", (16, 1)))
HEADING = "## k x k convolutions"


def conv_model(cin: int, cout: int, block: tuple[int, int] | None) -> nn.Module:
    """A 3x3 conv (padding 1) and a ReLU: dense, or 90% sparse in `block` blocks."""
    torch.manual_seed(0)
    if block is None:
        conv = nn.Conv2d(cin, cout, 3, padding=1)
    else:
        conv = SparseConv2d(cin, cout, 3, padding=1, sparsity=0.9, block=block)
    return nn.Sequential(conv, nn.ReLU()).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10, help="rounds of timings in turns")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, timers = [], {}
    for shape, cin, cout, size in SHAPES:
        x = torch.randn(1, cin, size, size)
        variants = [("dense", None)] + ([] if cin < 16 else list(SPARSE))
        for label, block in variants:
            model = conv_model(cin, cout, block)
            choice = "sparse" if block else "auto"
            compiled = hw_compile.build(model, x, HostProfile(), kernel_choice=choice)
            rows.append({"shape": shape, "conv": label, "runtime": "hwnas"})
            timers[len(rows) - 1] = vm_timer(linked(compiled), x.numpy())
        dense = conv_model(cin, cout, None)
        with torch.no_grad():
            rows.append({"shape": shape, "conv": "dense", "runtime": "torch"})
            timers[len(rows) - 1] = call_timer(lambda m=dense, x=x: m(x))
            try:
                ort = ort_timer(dense, x)
            except ImportError:  # no onnxruntime: the row is left out
                ort = None
        if ort is not None:
            rows.append({"shape": shape, "conv": "dense", "runtime": "onnxruntime"})
            timers[len(rows) - 1] = ort
    with torch.no_grad():
        for index, (median, best) in in_turns(timers, args.repeats).items():
            rows[index].update(ms=median, best_ms=best)
    result = {
        "machine": machine(),
        "kernel_version": KERNEL_VERSION,
        "repeats": args.repeats,
        "rows": rows,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "convs.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    print(table)
    replace_section(HEADING, table)


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"{HEADING} (`benchmarks/convs.py`)",
        "",
        f"Taken on {m['cpu']} ({m['cores']} cores, {m['threads']} thread), {m['date']}, "
        f"KERNEL_VERSION {result['kernel_version']}: each "
        "conv (3x3, padding 1, then ReLU) a one-layer model, timed in turns "
        f"({result['repeats']} rounds; ms per call, median and best round). hwnas builds a "
        "dense conv as im2col and our dense kernel, a sparse one (its sparse kernel forced) "
        "direct: a copy of the input with zero-padded planes and our sparse kernel reading it "
        "(`KernelSpec.direct`, from KERNEL_VERSION 39); torch and onnxruntime run the dense "
        "conv.",
        "",
        "| shape | conv | runtime | ms (median) | ms (best round) |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['shape']} | {row['conv']} | {row['runtime']} | {row['ms']:.4f} | "
            f"{row['best_ms']:.4f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
