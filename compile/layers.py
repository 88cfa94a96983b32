"""Each layer's kernel calls on their own: the calls a model makes for one Conv2d/Linear, as
plain data (`hw_profiles.measure.KernelCall`), to time layers on their device and to check a
layer against torch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import tvm

from compile.kernels import Kernel
from compile.rewrite import LayerPlan
from hw_profiles.measure import KernelCall


def layer_calls(
    plan: LayerPlan,
    x: np.ndarray,
    symbol_of: Callable[[Kernel], str],
    rng: np.random.Generator,
) -> list[KernelCall]:
    """The calls that compute layer `plan` on its input `x` (torch layout), as the model's
    graph makes them (see `compile.rewrite._LayerRewriter._layer`), each calling its kernel
    by `symbol_of(kernel)`.

    A conv that is not a plain 1x1 is two calls, a copy of its input (im2col, or a direct
    conv's padded planes) then the matmul: the matmul's first input is then random data of the
    copy's shape (what it is timed on), and `run_layer_calls` feeds it the copy instead. The
    reshapes and transposes the graph does around a kernel (views, or a transpose for a Linear
    over several rows) are done here on `x`; they are not calls."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    consts = tuple(np.ascontiguousarray(c) for c in plan.constants)
    geo, spec = plan.geometry, plan.spec
    if plan.kind == "depthwise":
        shape = (geo.batch, geo.channels, geo.out_height, geo.out_width)
        return [KernelCall(symbol_of(plan.kernel), (x, *consts), shape)]
    matmul_out = spec.y_shape
    if plan.kind == "conv":
        if spec.residual:  # zeros: the layer's own output, with the residual's read timed
            consts = (*consts, np.zeros(spec.y_shape, np.float32))
        if plan.x_copy is None:
            x3 = x.reshape(spec.x_shape)
            return [KernelCall(symbol_of(plan.kernel), (x3, *consts), matmul_out)]
        x3 = rng.standard_normal(spec.x_shape).astype(np.float32)
        return [
            KernelCall(symbol_of(plan.x_copy), (x,), spec.x_shape),
            KernelCall(symbol_of(plan.kernel), (x3, *consts), matmul_out),
        ]
    x3 = np.ascontiguousarray(x.reshape(spec.m, spec.cols).T.reshape(spec.x_shape))
    return [KernelCall(symbol_of(plan.kernel), (x3, *consts), spec.y_shape)]


def layer_output(plan: LayerPlan, y: np.ndarray) -> np.ndarray:
    """The last call's output `y` in the torch layer's layout."""
    geo, spec = plan.geometry, plan.spec
    if plan.kind == "depthwise":
        return y
    if plan.kind == "conv":
        return y.reshape(geo.batch, spec.rows, geo.out_height, geo.out_width)
    return y.reshape(spec.rows, spec.m).T.reshape(*plan.input_shape[:-1], spec.rows)


def run_layer_calls(functions: Mapping[str, Any], device: Any, calls: list[KernelCall]) -> Any:
    """Run a layer's `calls` in order on `device` (`functions` maps each symbol to its
    function: a loaded library), each call after the first on the previous call's output;
    the last output as a numpy array."""
    out = None
    for call in calls:
        first = out if out is not None else tvm.runtime.tensor(call.inputs[0], device)
        rest = [tvm.runtime.tensor(a, device) for a in call.inputs[1:]]
        out = tvm.runtime.tensor(np.zeros(call.output_shape, np.float32), device)
        functions[call.symbol](first, *rest, out)
    return out.numpy()
