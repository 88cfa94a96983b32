"""`build`: torch model -> Relax -> sparse rewrite -> built library, checked against torch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tvm
from torch import nn
from tvm import relax
from tvm.relax.frontend.torch import from_exported_program
from tvm.support import cc
from tvm.target import codegen

from compile.errors import CompileError, OutputMismatch
from compile.rewrite import (
    RewritePlan,
    SparseLayerPlan,
    apply_rewrite,
    deploy_copy,
    kernel_symbol,
    plan_rewrite,
)

RTOL = 1e-4
# Absolute tolerance as a share of the largest expected magnitude (summation order differs).
ATOL_SCALE = 1e-4
SPARSE_FAMILIES = ("x86", "arm")


@dataclass
class CompiledModel:
    """A built model: runs on numpy input (host targets) and exports a deployable library."""

    executable: Any = field(repr=False)  # tvm.runtime.Executable
    target: Any = field(repr=False)  # tvm.target.Target
    family: str
    cross_compiler: str | None
    sparse_layers: list[str]
    dense_layers: list[str]
    dense_reasons: dict[str, str]
    kernels: dict[str, dict[str, Any]]  # per sparse layer: kind, block, nnz_blocks, activation
    compile_seconds: float
    output_shape: tuple[int, ...]
    _vm: Any = field(default=None, repr=False)

    @property
    def host_runnable(self) -> bool:
        return _host_runnable(self.target)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run the model on this host (x86 targets whose CPU features the host has)."""
        if not self.host_runnable:
            raise CompileError(
                f"target {self.target} does not run on this host; export_library() it and "
                "measure it on its device"
            )
        if self._vm is None:
            self._vm = relax.VirtualMachine(self.executable, tvm.cpu())
        out = self._vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x, np.float32), tvm.cpu()))
        return out.numpy()

    def export_library(self, path: str | Path) -> Path:
        """Write a shared library for the profile's device (cross-compiled when it says so)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fcompile = cc.cross_compiler(self.cross_compiler) if self.cross_compiler else None
        try:
            self.executable.export_library(str(path), fcompile=fcompile)
        except Exception as exc:  # the system or cross compiler failed
            raise CompileError(f"export to {path} failed: {str(exc).splitlines()[0]}") from exc
        return path


def _make_target(profile) -> tvm.target.Target:
    target = dict(profile.target)
    if target.get("mcpu") == "native":
        target["mcpu"] = codegen.llvm_get_system_cpu()
    if target.get("num-cores") == "auto":
        del target["num-cores"]
    try:
        if profile.host:
            return tvm.target.Target(target, host=dict(profile.host))
        return tvm.target.Target(target)
    except Exception as exc:
        raise CompileError(
            f"profile {getattr(profile, 'name', '?')}: invalid target {target}: "
            f"{str(exc).splitlines()[0]}; fix the profile's [target] table"
        ) from exc


def _llvm_features(target: tvm.target.Target) -> set[str]:
    return set(codegen.llvm_get_cpu_features(target))


def _host_runnable(target: tvm.target.Target) -> bool:
    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or "")
    if triple and not triple.startswith("x86_64"):
        return False
    host = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    return _llvm_features(target) <= _llvm_features(host)


def _num_cores(target: tvm.target.Target) -> int | None:
    value = target.attrs.get("num-cores")
    return int(value) if value is not None else None


def build(model: nn.Module, example_input: torch.Tensor, profile, *, check: bool = True):
    """Compile `model` for `profile` with our sparse kernels for its sparse layers.

    With `check`, the built library is run on `example_input` and compared with torch
    (rtol 1e-4); `OutputMismatch` names the worst element and sparse layer when they differ.
    """
    start = time.perf_counter()
    family = profile.family
    if family not in SPARSE_FAMILIES:
        raise CompileError(
            f"profile family {family!r} has no sparse kernels yet; use an x86 or arm profile"
        )
    target = _make_target(profile)
    avx512 = family == "x86" and "avx512f" in _llvm_features(target)
    was_training = model.training
    deploy, sparse = deploy_copy(model)
    try:
        with torch.no_grad():
            exported = torch.export.export(deploy, (example_input,))
        mod = from_exported_program(
            exported, keep_params_as_input=True, unwrap_unit_return_tuple=True
        )
    except Exception as exc:
        raise CompileError(
            f"could not export the model: {str(exc).splitlines()[0]}; the model's forward must "
            "be traceable by torch.export"
        ) from exc

    weight_vars: dict[str, str] = {}
    for spec in exported.graph_signature.input_specs:
        if spec.kind == torch.export.graph_signature.InputKind.PARAMETER:
            weight_vars[spec.target] = spec.arg.name
    tensors = {name: value.detach().cpu().numpy() for name, value in exported.state_dict.items()}
    plan = plan_rewrite(
        mod["main"], weight_vars, tensors, sparse, family, _num_cores(target), avx512
    )
    mod = apply_rewrite(mod, plan)
    by_var = {weight_vars[name]: tvm.runtime.tensor(tensors[name]) for name in weight_vars}
    mod = relax.transform.BindParams("main", by_var)(mod)
    mod["main"] = mod["main"].without_attr("params")
    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    try:
        executable = tvm.compile(mod, target=target)
    except Exception as exc:
        raise CompileError(f"TVM build failed: {str(exc).splitlines()[0]}") from exc

    sparse_names = [layer.name for layer in plan.layers]
    dense_names = [
        name
        for name, module in deploy.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear)) and name not in sparse_names
    ]
    with torch.no_grad():
        expected = model.eval()(example_input).detach().cpu().numpy()
    model.train(was_training)
    compiled = CompiledModel(
        executable=executable,
        target=target,
        family=family,
        cross_compiler=profile.cross_compiler,
        sparse_layers=sparse_names,
        dense_layers=dense_names,
        dense_reasons=plan.dense_reasons,
        kernels={
            layer.name: {
                "kind": layer.kind,
                "block": list(layer.bsr.block),
                "nnz_blocks": layer.bsr.nnz_blocks,
                "density": float(np.count_nonzero(layer.bsr.data))
                / (layer.spec.rows * layer.spec.cols),
                "activation": layer.spec.activation,
                "fused_bias": layer.fused_bias,
            }
            for layer in plan.layers
        },
        compile_seconds=0.0,
        output_shape=tuple(expected.shape),
    )
    if check and compiled.host_runnable:
        got = compiled.run(example_input.detach().cpu().numpy())
        problem = compare_outputs(got, expected)
        if problem:
            worst = worst_sparse_layer(model, example_input, plan, target)
            raise OutputMismatch(problem + (f"; worst sparse layer: {worst}" if worst else ""))
    compiled.compile_seconds = time.perf_counter() - start
    return compiled


def compare_outputs(got: np.ndarray, expected: np.ndarray) -> str | None:
    """None when `got` matches `expected` within RTOL and a magnitude-scaled atol, else why not."""
    if got.shape != expected.shape:
        return f"output shape {got.shape} differs from torch's {expected.shape}"
    atol = ATOL_SCALE * max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
    excess = np.abs(got - expected) - (atol + RTOL * np.abs(expected))
    if not np.any(excess > 0) and np.all(np.isfinite(got)):
        return None
    worst = np.unravel_index(int(np.argmax(np.nan_to_num(excess, nan=np.inf))), got.shape)
    return (
        f"output differs from torch at index {tuple(int(i) for i in worst)}: got "
        f"{got[worst]:.6g}, expected {expected[worst]:.6g} (rtol {RTOL}, atol {atol:.3g})"
    )


def _layer_reference(module: nn.Module, x: torch.Tensor, plan: SparseLayerPlan) -> np.ndarray:
    with torch.no_grad():
        y = module(x)
    if plan.spec.activation == "relu":
        y = torch.relu(y)
    elif plan.spec.activation == "relu6":
        y = torch.clamp(y, 0, 6)
    return y.detach().cpu().numpy()


def run_layer_kernel(plan: SparseLayerPlan, x: np.ndarray, target) -> np.ndarray:
    """Build and run one layer's kernel alone on the layer's input `x` (for diagnostics)."""
    spec = plan.spec
    if plan.kind == "conv1x1":
        x3 = x.reshape(spec.batch, spec.cols, spec.m)
    else:
        x3 = x.reshape(spec.m, spec.cols).T.reshape(1, spec.cols, spec.m)
    lib = tvm.compile(plan.kernel, target=target)
    dev = tvm.cpu()
    args = [
        np.ascontiguousarray(a)
        for a in (x3, plan.bsr.data, plan.bsr.indices, plan.bsr.indptr, plan.bias)
    ]
    out = tvm.runtime.tensor(np.zeros((spec.batch, spec.rows, spec.m), np.float32), dev)
    lib[kernel_symbol(plan.name)](*[tvm.runtime.tensor(a, dev) for a in args], out)
    y = out.numpy()
    if plan.kind == "conv1x1":
        return y.reshape(spec.batch, spec.rows, *plan.input_shape[2:])
    return y.reshape(spec.rows, spec.m).T.reshape(*plan.input_shape[:-1], spec.rows)


def worst_sparse_layer(model: nn.Module, example_input, plan: RewritePlan, target) -> str | None:
    """Name the sparse layer whose kernel differs most from torch on its own captured input."""
    if not plan.layers:
        return None
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        model.get_submodule(layer.name).register_forward_hook(
            lambda _m, inputs, _out, name=layer.name: captured.__setitem__(name, inputs[0])
        )
        for layer in plan.layers
    ]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    worst_name, worst_err = None, -1.0
    for layer in plan.layers:
        x = captured.get(layer.name)
        if x is None:
            continue
        expected = _layer_reference(model.get_submodule(layer.name), x, layer)
        got = run_layer_kernel(layer, x.detach().cpu().numpy(), target)
        scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
        err = float(np.max(np.abs(got - expected), initial=0.0)) / scale
        if err > worst_err:
            worst_name, worst_err = layer.name, err
    return f"{worst_name!r} (max error {worst_err:.3g} of its output's magnitude)"


__all__ = ["CompiledModel", "build", "compare_outputs", "kernel_symbol"]
