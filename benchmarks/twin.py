"""Sparse nets against their dense twin: issue 4's "never slower than the dense twin at any
sparsity", end to end. The CIFAR MobileNetV2 of `benchmarks/e2e.py` (`--net mobilenetv2`) with
every 1x1 conv and the classifier declared sparse at one pattern and sparsity, built by hwnas
with the per-layer kernel choice timed here (`kernel_choice="auto"`), and the same net dense
built by hwnas, all timed in turns in one process (`e2e.in_turns`), one thread. Each row says
how many of the 36 declared-sparse layers got their sparse kernel (alone or inside the
depthwise conv they feed). Writes benchmarks/out/twin.json and the table into
benchmarks/RESULTS.md (## Sparse nets against their dense twin). Run alone on a quiet machine:
``python benchmarks/twin.py [--repeats 15]``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from e2e import OUT, HostProfile, build_model, in_turns, linked, machine, vm_timer  # noqa: E402
from kernels import replace_section  # noqa: E402

import compile as hw_compile  # noqa: E402

SECTION = "## Sparse nets against their dense twin"

# (label, SparseConv2d / SparseLinear sparsity keywords), from nearly dense to very sparse.
PATTERNS = (
    ("unstructured 10%", {"pattern": "unstructured", "sparsity": 0.1}),
    ("unstructured 30%", {"pattern": "unstructured", "sparsity": 0.3}),
    ("unstructured 50%", {"pattern": "unstructured", "sparsity": 0.5}),
    ("unstructured 70%", {"pattern": "unstructured", "sparsity": 0.7}),
    ("unstructured 90%", {"pattern": "unstructured", "sparsity": 0.9}),
    ("N:M 2:4", {"pattern": "nm", "nm": (2, 4)}),
    ("4x1 blocks 30%", {"pattern": "block", "block": (4, 1), "sparsity": 0.3}),
    ("4x1 blocks 50%", {"pattern": "block", "block": (4, 1), "sparsity": 0.5}),
    ("4x1 blocks 70%", {"pattern": "block", "block": (4, 1), "sparsity": 0.7}),
    ("1x4 blocks 50%", {"pattern": "block", "block": (1, 4), "sparsity": 0.5}),
    ("channels 50%", {"pattern": "channel", "sparsity": 0.5}),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=15, help="rounds of the timing in turns")
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(1, 3, 32, 32)
    xn = x.numpy()
    rows, timers = [], {}
    load_avg = os.getloadavg()[0]
    for label, pattern in (("dense twin", None), *PATTERNS):
        model = build_model(pattern is not None, net="mobilenetv2", pattern=pattern)
        start = time.perf_counter()
        compiled = hw_compile.build(model, x, HostProfile())
        compile_s = time.perf_counter() - start
        compiled.check_output(compiled.run(xn))  # equal to torch's, or the timing is moot
        declared = sum(hasattr(module, "update_mask") for module in model.modules())
        rows.append(
            {
                "net": label,
                "compile_s": compile_s,
                "sparse_layers": len(compiled.sparse_layers),
                "declared_sparse": declared,
            }
        )
        timers[label] = vm_timer(linked(compiled), xn)
    times = in_turns(timers, args.repeats)
    for row in rows:
        row["ms"], row["best_ms"] = times[row["net"]]
    twin = rows[0]["ms"]
    for row in rows:
        row["twin_over_net"] = twin / row["ms"]
    result = {"machine": machine(), "load_avg": load_avg, "repeats": args.repeats, "rows": rows}
    OUT.mkdir(exist_ok=True)
    (OUT / "twin.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    print(table)
    m = result["machine"]
    replace_section(
        SECTION,
        f"{SECTION} (`benchmarks/twin.py`)\n\n"
        f"Taken on {m['cpu']} ({m['cores']} cores, load average {load_avg:.2f} when the run "
        f"started, {m['date']}), one thread, the nets timed in turns, {args.repeats} rounds: "
        "the CIFAR MobileNetV2 with every 1x1 conv and the classifier sparse as the row says, "
        "its kernels chosen per layer by timing them here, against the same net dense. A "
        "net none of whose layers got its sparse kernel runs the twin's kernels: its ratio "
        "is the run's noise.\n\n"
        f"{table}\n",
    )


def markdown(result: dict) -> str:
    lines = [
        "| net | ms (median) | ms (best round) | dense twin's time over the net's "
        "| layers on their sparse kernel | compile s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        declared = row["declared_sparse"]
        kept = f"{row['sparse_layers']} of {declared}" if declared else ""
        lines.append(
            f"| {row['net']} | {row['ms']:.3f} | {row['best_ms']:.3f} "
            f"| {row['twin_over_net']:.2f}x | {kept} | {row['compile_s']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
