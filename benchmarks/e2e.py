"""End to end: a net with sparse 1x1 convs (90%, 16x1 blocks) and a sparse classifier (90%,
1x4) through hwnas, against its dense twin through hwnas, TVM's default build, torch and
onnxruntime.

The net (``--net``): `mbv2-sparse`, the search space's MobileNetV2 (16-64 channels, 2.9 M
MACs), or `mobilenetv2`, the CIFAR-size MobileNetV2 that issue 4's goals were set on (channels
32-1280, 89 M MACs, 92% of them in 1x1 convs), or `resnet20`, the CIFAR ResNet-20 (16-64
channels, 41 M MACs, nearly all in 3x3 convs), whose 3x3 convs after the stem are sparse
instead (90%, 4x1 blocks). One thread each, or N with ``--threads N``
(TVM_NUM_THREADS is set before TVM starts its pool; hwnas builds for N cores). The input is
32x32, or S x S with ``--size S`` (56 gives the feature maps of an ImageNet-size MobileNet's
later stages: 28, 14 and 7). Writes benchmarks/out/e2e.json (e2e-mobilenetv2.json,
e2e-Nthreads.json, e2e-sizeS.json) and prints a markdown table. The runtimes are timed in
turns, `--repeats` rounds (see `in_turns`); each row has the median and the best round. Run
alone: ``python benchmarks/e2e.py [--net NET] [--repeats 20] [--threads N] [--size S]``.
"""

from __future__ import annotations

import argparse
import os


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="threads for every runtime")
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument(
        "--net", choices=("mbv2-sparse", "mobilenetv2", "resnet20"), default="mbv2-sparse"
    )
    return parser


# Read before TVM starts its thread pool (at import).
THREADS = _parser().parse_args().threads if __name__ == "__main__" else 1
os.environ.setdefault("TVM_NUM_THREADS", str(THREADS))

import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.relax.frontend.torch import from_exported_program  # noqa: E402
from tvm.target import codegen  # noqa: E402

import compile as hw_compile  # noqa: E402
from search_spaces.mbv2 import InvertedResidual  # noqa: E402
from search_spaces.ops import SparseConv2d, SparseLinear  # noqa: E402
from search_spaces.spaces import get_space  # noqa: E402

OUT = Path(__file__).parent / "out"


class HostProfile:
    """The Profile fields compile.build reads: this host's CPU, THREADS cores."""

    family = "x86"
    host = None
    cross_compiler = None
    name = "bench/host"
    target = {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": THREADS}


def machine() -> dict:
    """CPU model, thread count and date for the results table."""
    model = platform.processor()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "threads": THREADS,
        "date": datetime.date.today().isoformat(),
    }


def arch(sparse: bool) -> dict:
    """Expansion 6, kernel 3, width 1 in every stage; sparse stages at 90% with 16x1 blocks."""
    a = {}
    for i in range(1, 5):
        a.update(
            {
                f"s{i}.op": "sparse" if sparse else "dense",
                f"s{i}.sparsity": 0.9,
                f"s{i}.block": "16x1",
                f"s{i}.expand": 6,
                f"s{i}.kernel": 3,
                f"s{i}.width": 1.0,
            }
        )
    a["classifier.sparsity"] = 0.9 if sparse else 0.0
    return a


# The CIFAR MobileNetV2 (width 1): a 3x3 stem of 32 channels at stride 1, then (expansion,
# channels, blocks, stride of the first block) per stage, then a 1x1 conv to 1280 channels.
# Every block has an expand conv, the first one too (expansion 1): 89.0 M MACs at 32x32.
MOBILENETV2 = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def mobilenetv2(sparse: bool, pattern: dict | None = None) -> torch.nn.Module:
    """The CIFAR MobileNetV2; `sparse`: every 1x1 conv 90% with 16x1 blocks and the
    classifier 90% with 1x4 blocks, as `arch` makes the `mbv2-sparse` net, or all of them
    with `pattern` (SparseConv2d's sparsity keywords, e.g. {"pattern": "unstructured",
    "sparsity": 0.5})."""
    nn = torch.nn

    def pointwise(in_ch: int, out_ch: int) -> nn.Module:
        if sparse:
            kw = pattern or {"sparsity": 0.9, "block": (16, 1)}
            return SparseConv2d(in_ch, out_ch, 1, bias=False, **kw)
        return nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def depthwise(channels: int, stride: int) -> nn.Module:
        return nn.Conv2d(channels, channels, 3, stride, 1, groups=channels, bias=False)

    layers = [nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
    in_ch = 32
    for expansion, channels, blocks, stride in MOBILENETV2:
        for j in range(blocks):
            hidden = in_ch * expansion
            block = InvertedResidual(
                in_ch, channels, stride if j == 0 else 1, hidden, pointwise, depthwise
            )
            layers.append(block)
            in_ch = channels
    layers += [pointwise(in_ch, 1280), nn.BatchNorm2d(1280), nn.ReLU6()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if sparse:
        layers.append(SparseLinear(1280, 10, **(pattern or {"sparsity": 0.9, "block": (1, 4)})))
    else:
        layers.append(nn.Linear(1280, 10))
    return nn.Sequential(*layers)


class BasicBlock(torch.nn.Module):
    """ResNet's two 3x3 convs with batch norm, and a shortcut: the input, or a strided 1x1
    conv where the shape changes; ReLU after the sum."""

    def __init__(self, conv3x3, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        nn = torch.nn
        self.a = nn.Sequential(conv3x3(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch), nn.ReLU())
        self.b = nn.Sequential(conv3x3(out_ch, out_ch, 1), nn.BatchNorm2d(out_ch))
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b(self.a(x)) + self.shortcut(x))


def resnet20(sparse: bool) -> torch.nn.Module:
    """The CIFAR ResNet-20: a 3x3 stem of 16 channels, three stages of three blocks (16, 32,
    64 channels; the second and third start at stride 2), pooling and a Linear. `sparse`:
    every 3x3 conv after the stem 90% in 4x1 blocks, the classifier 90% in 1x4 blocks."""
    nn = torch.nn

    def conv3x3(in_ch: int, out_ch: int, stride: int) -> nn.Module:
        if sparse:
            kw = {"sparsity": 0.9, "block": (4, 1)}
            return SparseConv2d(in_ch, out_ch, 3, stride, 1, bias=False, **kw)
        return nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)

    layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    in_ch = 16
    for channels, stride in ((16, 1), (32, 2), (64, 2)):
        for j in range(3):
            layers.append(BasicBlock(conv3x3, in_ch, channels, stride if j == 0 else 1))
            in_ch = channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if sparse:
        layers.append(SparseLinear(64, 10, sparsity=0.9, block=(1, 4)))
    else:
        layers.append(nn.Linear(64, 10))
    return nn.Sequential(*layers)


def build_model(
    sparse: bool, size: int = 32, net: str = "mbv2-sparse", pattern: dict | None = None
) -> torch.nn.Module:
    """`net` with its masks made (seeded); `pattern`: the sparse layers' (`mobilenetv2` only)."""
    torch.manual_seed(0)
    if net == "mobilenetv2":
        model = mobilenetv2(sparse, pattern)
    elif net == "resnet20":
        model = resnet20(sparse)
    else:
        model = get_space("mbv2-sparse").build(arch(sparse), 10, 3, size)
    for module in model.modules():
        if hasattr(module, "update_mask"):
            module.update_mask()
    return model.eval()


def call_timer(fn, number: int = 20):
    """A timer for `fn`: each call of it returns the mean ms of `number` calls of `fn` (after
    two warm-up calls, made now)."""
    fn()
    fn()

    def timer() -> float:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - start) / number * 1e3

    return timer


def vm_timer(executable, x: np.ndarray, number: int = 200):
    """A timer for a Relax executable's `main` on `x`: ms per call, the mean of `number`."""
    dev = tvm.cpu()
    vm = relax.VirtualMachine(executable, dev)
    arg = tvm.runtime.tensor(x, dev)
    timer = vm.time_evaluator("main", dev, number=number, repeat=1)
    return lambda: float(timer(arg).results[0]) * 1e3


def ort_timer(model: torch.nn.Module, x: torch.Tensor):
    """A timer (`call_timer`) for `model` on `x` in onnxruntime, THREADS threads, exported
    through torch's ONNX exporter. Raises ImportError without onnxruntime."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(model, (x,), str(path), dynamo=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name, xn = session.get_inputs()[0].name, x.numpy()
    return call_timer(lambda: session.run(None, {name: xn}))


def in_turns(timers: dict, rounds: int) -> dict:
    """Every timer called once per round, in turns, so that the seconds-long bursts of outside
    load on a shared machine hit them alike (timed one after the other, the 32x32 sparse net
    read 0.044 or 0.065 ms depending on the stretch it fell in). (median, best) ms per key."""
    times: dict = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            times[name].append(timer())
    return {name: (float(np.median(v)), float(np.min(v))) for name, v in times.items()}


def linked(compiled):
    """The compiled model's library as deployed (the model linked with its kernels' objects)."""
    with tempfile.TemporaryDirectory() as tmp:
        return tvm.runtime.load_module(str(compiled.export_library(Path(tmp) / "model.so")))


KINDS = ("depthwise (+ fused expand)", "1x1 convs + classifier", "k x k convs")


def layer_breakdown(compiled, model: torch.nn.Module, repeats: int) -> dict:
    """Each layer's kernel call(s) timed alone (300 calls x `repeats`, median), summed by kind:
    depthwise convs (with the sparse expand convs computed inside them), the other 1x1 convs
    (some read a copy of X: an im2col call) and the classifier, the k x k convs (the stem of
    the MobileNets; with their copy of X: im2col, or a direct conv's padded planes)."""
    modules = dict(model.named_modules())
    dev = tvm.cpu()
    by_kind = dict.fromkeys(KINDS, 0.0)
    with tempfile.TemporaryDirectory() as tmp:
        calls = compiled.export_layer_library(Path(tmp) / "layers.so")
        lib = tvm.runtime.load_module(str(Path(tmp) / "layers.so"))
        for name, layer in calls.items():
            ms = 0.0
            for call in layer:
                out = np.zeros(call.output_shape, np.float32)
                args = [tvm.runtime.tensor(a, dev) for a in (*call.inputs, out)]
                timer = lib.time_evaluator(call.symbol, dev, number=300, repeat=repeats)
                ms += float(np.median(timer(*args).results)) * 1e3
            info = compiled.kernels[name]
            if info["impl"] == "depthwise":
                by_kind[KINDS[0]] += ms
            elif getattr(modules[name], "kernel_size", (1, 1)) != (1, 1):
                by_kind[KINDS[2]] += ms
            else:
                by_kind[KINDS[1]] += ms
    return {"sum_ms": sum(by_kind.values()), **by_kind}


def main() -> None:
    args = _parser().parse_args()
    torch.set_num_threads(THREADS)
    x = torch.randn(1, 3, args.size, args.size)
    xn = x.numpy()
    rows, timers = [], {}

    sparse_label = "sparse 90% 4x1" if args.net == "resnet20" else "sparse 90% 16x1"
    for label, sparse in ((sparse_label, True), ("dense twin", False)):
        model = build_model(sparse, args.size, args.net)
        start = time.perf_counter()
        compiled = hw_compile.build(model, x, HostProfile())
        compile_s = time.perf_counter() - start
        compiled.check_output(compiled.run(xn))  # equal to torch's, or the timing is moot
        rows.append(
            {
                "net": label,
                "runtime": "hwnas (our kernels)",
                "compile_s": compile_s,
                "sparse_layers": len(compiled.sparse_layers),
                "layers": layer_breakdown(compiled, model, 5),
            }
        )
        timers[len(rows) - 1] = vm_timer(linked(compiled), xn)
    dense = build_model(False, args.size, args.net)
    with torch.no_grad():
        rows.append({"net": "dense twin", "runtime": "torch eager"})
        timers[len(rows) - 1] = call_timer(lambda: dense(x))
        exported = torch.export.export(dense, (x,))
    try:
        timer = ort_timer(dense, x)
        rows.append({"net": "dense twin", "runtime": "onnxruntime"})
        timers[len(rows) - 1] = timer
    except Exception as exc:  # onnxruntime or the ONNX exporter missing
        rows.append({"net": "dense twin", "runtime": "onnxruntime", "error": str(exc)[:200]})
    with torch.no_grad():
        for index, (median, best) in in_turns(timers, args.repeats).items():
            rows[index].update(ms=median, best_ms=best)

    # TVM's default build is 15-30x slower than ours: timed on its own, in fewer rounds.
    mod = from_exported_program(exported, unwrap_unit_return_tuple=True)
    start = time.perf_counter()
    default = tvm.compile(mod, target=tvm.target.Target(HostProfile.target))
    compile_s = time.perf_counter() - start
    median, best = in_turns({0: vm_timer(default, xn, 5)}, max(2, args.repeats // 5))[0]
    rows.append(
        {
            "net": "dense twin",
            "runtime": "TVM default build",
            "ms": median,
            "best_ms": best,
            "compile_s": compile_s,
        }
    )

    result = {
        "machine": machine(),
        "net": args.net,
        "repeats": args.repeats,
        "size": args.size,
        "rows": rows,
    }
    OUT.mkdir(exist_ok=True)
    name = "e2e.json" if args.net == "mbv2-sparse" else f"e2e-{args.net}.json"
    if THREADS != 1:
        name = name.replace(".json", f"-{THREADS}threads.json")
    if args.size != 32:
        name = name.replace(".json", f"-size{args.size}.json")
    (OUT / name).write_text(json.dumps(result, indent=1))
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = [
        "| net | runtime | ms (median) | ms (best round) | compile s |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        ms = f"{row['ms']:.3f} | {row['best_ms']:.3f}" if "ms" in row else row.get("error", "?")
        compile_s = f"{row['compile_s']:.1f}" if "compile_s" in row else ""
        lines.append(f"| {row['net']} | {row['runtime']} | {ms} | {compile_s} |")
    kinds = list(KINDS)
    lines += [
        "",
        f"| net | model (ms) | sum of layers (ms) | {' | '.join(kinds)} |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        if "layers" in row:
            parts = row["layers"]
            by_kind = " | ".join(f"{parts[kind]:.3f}" for kind in kinds)
            lines.append(f"| {row['net']} | {row['ms']:.3f} | {parts['sum_ms']:.3f} | {by_kind} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
