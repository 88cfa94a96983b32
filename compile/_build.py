"""`build`: torch model -> Relax -> sparse rewrite -> built library, checked against torch."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
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

from compile.choose import DeviceTimingFailed, KernelChooser, TimingJob
from compile.errors import CompileError, OutputMismatch
from compile.kernels import BUILD_CONFIG
from compile.layers import layer_calls, layer_output, run_layer_calls
from compile.objects import build_kernels, kernel_object, op_object, symbol_for
from compile.rewrite import (
    LayerPlan,
    RewritePlan,
    apply_rewrite,
    deploy_copy,
    fold_batchnorm,
    kernel_symbol,
    plan_rewrite,
)
from hw_profiles.measure import KernelCall

RTOL = 1e-4
# Absolute tolerance as a share of the largest expected magnitude (summation order differs).
ATOL_SCALE = 1e-4
SPARSE_FAMILIES = ("x86", "arm", "cuda")
# Rounds of timing on the device per build (see `build`).
MAX_DEVICE_ROUNDS = 3


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
    # Per Conv2d/Linear: impl (sparse | dense | depthwise | tvm-default), kind, activation,
    # fused_bias; sparse layers also block, nnz_blocks, density and, when timed (on this host
    # or on the device), sparse_ms / dense_ms (the per-layer choice between the two kernels).
    kernels: dict[str, dict[str, Any]]
    compile_seconds: float
    output_shape: tuple[int, ...]
    folded_batchnorm: list[str] = field(default_factory=list)  # convs that absorbed a BN
    # The example input and torch's output on it, kept to check the library on its device.
    example_input: np.ndarray | None = field(default=None, repr=False)
    expected_output: np.ndarray | None = field(default=None, repr=False)
    # Our kernels' object files (CPU targets), linked into the library (see compile.objects).
    objects: list[Path] = field(default_factory=list, repr=False)
    # How each Conv2d/Linear on our kernels is computed (model order), for per-layer timing.
    layer_plans: list[LayerPlan] = field(default_factory=list, repr=False)
    _vm: Any = field(default=None, repr=False)
    _library: Path | None = field(default=None, repr=False)  # exported for this host
    _workdir: Any = field(default=None, repr=False)

    @property
    def host_runnable(self) -> bool:
        return local_device(self.target) is not None

    def run(self, x: np.ndarray) -> np.ndarray:
        """Run the model on this host: x86 targets whose CPU features the host has, or CUDA
        targets when this host has a GPU of at least the target's architecture."""
        dev = local_device(self.target)
        if dev is None:
            raise CompileError(
                f"target {self.target.kind.name} ({self.family}) does not run on this host; "
                "export_library() it and run it on its device (check_remote)"
            )
        if self._vm is None:
            if self.family == "cuda":
                self._vm = relax.VirtualMachine(self.executable, dev)
            else:  # the kernels are in their object files: run the linked library
                self._vm = relax.VirtualMachine(tvm.runtime.load_module(self._host_lib()), dev)
        out = self._vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x, np.float32), dev))
        return out.numpy()

    def device_source(self, kind: str = "cuda") -> str:
        """The generated source of the library's `kind` modules (e.g. CUDA C), for inspection."""
        sources, stack = [], [self.executable.mod]
        while stack:
            module = stack.pop()
            if module.kind == kind:
                sources.append(module.inspect_source())
            stack.extend(module.imports)
        return "\n".join(sources)

    def check_output(self, got: np.ndarray) -> None:
        """Raise `OutputMismatch` unless `got` (the library's output on `example_input`, from
        wherever it ran) equals torch's within RTOL."""
        problem = compare_outputs(np.asarray(got), self.expected_output)
        if problem:
            raise OutputMismatch(f"on {self.target.kind.name} device: {problem}")

    def check_remote(self, lib_path: str | Path, profile, tracker) -> None:
        """Run the exported library `lib_path` on `profile`'s device (through `tracker`) on
        `example_input` and compare with torch's output; `OutputMismatch` when they differ, and
        `hw_profiles.measure.StepError` (naming the step) when the device fails."""
        from hw_profiles.measure import run_remote

        def body(remote, _enter) -> np.ndarray:
            return remote_output(remote)

        got = run_remote(lib_path, [self.example_input], profile, tracker, body)
        self.check_output(got)

    def export_library(self, path: str | Path) -> Path:
        """Write a shared library for the profile's device (cross-compiled when it says so)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self._library is not None:  # already linked here to run the check
            shutil.copyfile(self._library, path)
            return path
        fcompile = _cross_fcompile(self.cross_compiler)
        try:
            with _native_warnings_silenced():
                self.executable.export_library(
                    str(path), fcompile=fcompile, addons=[str(o) for o in self.objects]
                )
        except Exception as exc:  # the system or cross compiler failed
            raise CompileError(f"export to {path} failed: {str(exc).splitlines()[0]}") from exc
        return path

    def export_layer_library(
        self,
        path: str | Path,
        *,
        inputs: Mapping[str, np.ndarray] | None = None,
        seed: int = 0,
    ) -> dict[str, list[KernelCall]]:
        """Write the layers' kernels alone as one shared library for the profile's device (their
        object files linked, cross-compiled when the profile says so) and return, per layer
        (torch module name, model order), the calls that compute it: what
        `hw_profiles.measure.measure_layers` times. Each layer runs on `inputs[name]` (torch
        layout, e.g. captured with a forward hook), else on random data of its input shape
        (`seed` fixes it).

        A conv computed by a copy of its input (im2col, or a direct conv's padded planes) and
        the matmul is two calls, timed as their sum. Layers left to TVM's default build
        (`kernels[...]["impl"] == "tvm-default"`) have no kernel of ours and are left out. On a
        CPU target the library links the kernels' cached object files; on a CUDA target the
        kernels are built together into one module (host and device code).
        """
        if not self.layer_plans:
            raise CompileError("no layer of this model runs on our kernels: nothing to time")
        rng = np.random.default_rng(seed)
        kernels: dict[Any, str] = {}  # kernel -> symbol

        def symbol_of(kernel) -> str:
            kernels[kernel] = symbol_for(kernel, self.target)
            return kernels[kernel]

        calls: dict[str, list[KernelCall]] = {}
        for plan in self.layer_plans:
            if plan.fused_into is not None:  # computed (and timed) with the layer it feeds
                continue
            name = (plan.expand or plan).name  # a fused pair runs on the 1x1 conv's input
            x = (inputs or {}).get(name)
            if x is None:
                x = rng.standard_normal(plan.input_shape).astype(np.float32)
            elif tuple(x.shape) != plan.input_shape:
                raise CompileError(
                    f"input for layer {name!r} has shape {tuple(x.shape)}, "
                    f"not the layer's {plan.input_shape}"
                )
            calls[plan.name] = layer_calls(plan, x, symbol_of, rng)
        link_kernels(kernels, self.target, self.cross_compiler, path)
        return calls

    def _host_lib(self) -> str:
        if self._library is None:
            self._workdir = tempfile.TemporaryDirectory(prefix="hwnas-build-")
            path = self.export_library(Path(self._workdir.name) / "model.so")
            self._library = path
        return str(self._library)


def link_kernels(kernels: Mapping[Any, str], target, cross_compiler: str | None, path) -> Path:
    """Write `kernels` ({Kernel: symbol}, symbols from `symbol_for`) as one shared library for
    `target`: on a CPU their cached object files linked (cross-compiled when
    `cross_compiler` says so), on CUDA built together into one module."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fcompile = _cross_fcompile(cross_compiler)
    try:
        with _native_warnings_silenced():
            if target.kind.name == "cuda":
                built = build_kernels(dict(kernels), target)
                built.export_library(str(path), fcompile=fcompile)
            else:
                objects = [str(kernel_object(kernel, target).path) for kernel in kernels]
                (fcompile or cc.create_shared)(str(path), objects)
    except Exception as exc:  # the system or cross compiler failed
        raise CompileError(f"linking {path} failed: {str(exc).splitlines()[0]}") from exc
    return path


def _time_on_device(jobs: dict[str, TimingJob], profile, tracker, target) -> dict[str, float]:
    """ms per call of each job on `profile`'s device: the kernels linked into one library,
    uploaded once and timed in one session (`hw_profiles.measure.measure_layers`)."""
    from hw_profiles.measure import measure_layers

    rng = np.random.default_rng(0)
    symbols = {job[0]: symbol_for(job[0], target) for job in jobs.values()}
    calls = {
        name: [KernelCall(symbols[kernel], (rng.standard_normal(x).astype(np.float32), *c), y)]
        for name, (kernel, c, x, y) in jobs.items()
    }
    with tempfile.TemporaryDirectory(prefix="hwnas-choose-") as tmp:
        try:
            lib = link_kernels(symbols, target, profile.cross_compiler, Path(tmp) / "kernels.so")
        except CompileError as exc:
            raise DeviceTimingFailed(str(exc)) from exc
        times = measure_layers(lib, calls, profile, tracker)
    if not times.ok:
        raise DeviceTimingFailed(times.error)
    return times.ms


@contextlib.contextmanager
def _native_warnings_silenced() -> Iterator[None]:
    """TVM's C++ runtime logs a "Scope Saving" warning for every constant it serialises, which
    is noise to a user; its errors still arrive as Python exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def remote_output(remote) -> np.ndarray:
    """The output of "main" on a `hw_profiles.measure.RemoteVM`'s inputs, copied back here (a
    `run_remote` body; call `CompiledModel.check_output` on it, then time the same session)."""
    return remote.vm["main"](*remote.args).numpy()


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


# LLVM "features" that only tune code generation; every x86-64 CPU runs the code either way.
_TUNING_FEATURES = (
    "fast-",
    "slow-",
    "false-deps-",
    "no-bypass-",
    "idiom",
    "macrofusion",
    "branchfusion",
    "prefer-",
    "tuning-",
    "ermsb",
    "fsrm",
    "lea-",
    "pad-short",
    "sbb-dep",
    "insert-vzeroupper",
    "allow-light-256",
)


def _llvm_features(target: tvm.target.Target) -> set[str]:
    """The instruction-set features code for `target` may use."""
    return {f for f in codegen.llvm_get_cpu_features(target) if not f.startswith(_TUNING_FEATURES)}


def _cross_fcompile(compiler: str | None):
    """`export_library`'s compile function for a cross compiler (None: the host's). It names
    the compiler's target triple: a model whose every layer is ours has no LLVM module of its
    own, and TVM then built the library's import blob for the host (an x86 `devc.o` that the
    aarch64 linker refused)."""
    if not compiler:
        return None
    return cc.cross_compiler(compiler, get_target_triple=cc.get_target_by_dump_machine(compiler))


def _host_runnable(target: tvm.target.Target) -> bool:
    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "") or "")
    if triple and not triple.startswith("x86_64"):
        return False
    host = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    return _llvm_features(target) <= _llvm_features(host)


def runs_on_host(profile) -> bool:
    """Whether code built for `profile` runs on this machine (an x86 target whose CPU features
    this CPU has), so that a local rpc_server can time it."""
    return _host_runnable(_make_target(profile))


def local_device(target: tvm.target.Target):
    """The device of this host that runs `target`'s code, or None."""
    if target.kind.name == "cuda":
        gpu = tvm.cuda(0)
        if not gpu.exist:
            return None
        arch = str(target.attrs.get("arch", "") or "sm_0").removeprefix("sm_").rstrip("a")
        have = gpu.compute_version.replace(".", "")
        return gpu if int(have) >= int(arch or 0) else None
    return tvm.cpu() if _host_runnable(target) else None


def _num_cores(target: tvm.target.Target) -> int | None:
    value = target.attrs.get("num-cores")
    return int(value) if value is not None else None


def build(
    model: nn.Module,
    example_input: torch.Tensor,
    profile,
    *,
    check: bool = True,
    kernel_choice: str = "auto",
    tracker=None,
):
    """Compile `model` for `profile`: every Conv2d/Linear through our scheduled kernels (sparse
    layers through the faster of their sparse and dense kernels), BatchNorm folded.

    `kernel_choice` "auto" times both kernels of each sparse layer on host-runnable targets,
    and on other targets on `profile`'s device through `tracker` (a `hw_profiles.rpc.Tracker`;
    not on an emulated board, whose times are no figures), cached (see `compile.choose`);
    "sparse" or "dense" forces one. With `check`, the built library is run on
    `example_input` and compared with torch (rtol 1e-4); `OutputMismatch` names the worst
    element and sparse layer when they differ.
    """
    start = time.perf_counter()
    family = profile.family
    if family not in SPARSE_FAMILIES:
        raise CompileError(
            f"profile family {family!r} has no kernels; use an x86, arm or cuda profile"
        )
    target = _make_target(profile)
    runnable = local_device(target) is not None
    on_device = None
    if tracker is not None and not runnable and not profile.emulated:
        on_device = functools.partial(
            _time_on_device, profile=profile, tracker=tracker, target=target
        )
    try:
        chooser = KernelChooser(
            target, runnable, kernel_choice, defer=runnable, on_device=on_device
        )
    except ValueError as exc:
        raise CompileError(str(exc)) from exc
    avx512 = family == "x86" and "avx512f" in _llvm_features(target)
    was_training = model.training
    deploy, sparse = deploy_copy(model)
    folded = fold_batchnorm(deploy)
    try:
        with torch.no_grad():
            exported = torch.export.export(deploy, (example_input,))
        mod = from_exported_program(
            exported,
            keep_params_as_input=True,
            unwrap_unit_return_tuple=True,
            run_ep_decomposition=False,
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
    layer_names = [
        name
        for name, module in deploy.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    ]
    plan_args = (
        mod["main"],
        weight_vars,
        tensors,
        layer_names,
        sparse,
        family,
        _num_cores(target),
        avx512,
        chooser,
    )
    plan = plan_rewrite(*plan_args)
    # Kernels to be timed (on the device, or here: `KernelChooser.defer`) are timed together,
    # then the layers planned again with their times (which can ask for more: a 1x1 conv
    # found dense may fuse) or, when the device failed, with the density rule.
    for _ in range(MAX_DEVICE_ROUNDS):
        if not chooser.time_pending():
            break
        plan = plan_rewrite(*plan_args)
    if runnable and chooser.pending:  # rounds ran out: time the rest as the plan meets it
        chooser.defer, chooser.pending = False, {}
        plan = plan_rewrite(*plan_args)
    mod, objects = apply_rewrite(mod, plan, target)
    by_var = {weight_vars[name]: tvm.runtime.tensor(tensors[name]) for name in weight_vars}
    mod = relax.transform.BindParams("main", by_var)(mod)
    mod["main"] = mod["main"].without_attr("params")
    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    try:
        if target.kind.name == "llvm":
            mod, op_objects = _ops_as_objects(mod, target)
            objects = [*objects, *op_objects]
        with tvm.transform.PassContext(config=BUILD_CONFIG):
            executable = tvm.compile(mod, target=target, relax_pipeline=_relax_pipeline(target))
    except Exception as exc:
        raise CompileError(f"TVM build failed: {str(exc).splitlines()[0]}") from exc

    sparse_names = [layer.name for layer in plan.sparse]
    dense_names = [name for name in layer_names if name not in sparse_names]
    dense_reasons = {
        name: plan.dense_reasons.get(name) or plan.untuned.get(name, "?")
        for name in sparse
        if name not in sparse_names
    }
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
        dense_reasons=dense_reasons,
        kernels={
            **{layer.name: _kernel_info(layer) for layer in plan.layers},
            **{name: {"impl": "tvm-default", "reason": why} for name, why in plan.untuned.items()},
        },
        compile_seconds=0.0,
        output_shape=tuple(expected.shape),
        folded_batchnorm=folded,
        example_input=example_input.detach().cpu().numpy().astype(np.float32),
        expected_output=expected,
        objects=objects,
        layer_plans=plan.layers,
    )
    if check and compiled.host_runnable:
        got = compiled.run(compiled.example_input)
        problem = compare_outputs(got, expected)
        if problem:
            worst = worst_layer(deploy, example_input, plan, target)
            raise OutputMismatch(problem + (f"; worst layer: {worst}" if worst else ""))
    compiled.compile_seconds = time.perf_counter() - start
    return compiled


_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


@relax.expr_functor.mutator
class _OpsByObject(relax.PyExprMutator):
    """Replaces each `call_tir` of a legalized op by a call, by symbol, to that PrimFunc built
    once into a cached object file (`compile.objects.op_object`), as our kernels are called.
    Reshapes stay: TVM turns them into views."""

    def __init__(self, mod: tvm.IRModule, target) -> None:
        super().__init__(mod)
        self.mod_, self.target = mod, target
        self.objects: dict[str, Path] = {}

    def transform(self) -> tvm.IRModule:
        gvar = self.mod_.get_global_var("main")
        self.builder_.update_func(gvar, self.visit_expr(self.mod_["main"]))
        return self.builder_.get()

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (call.op.same_as(_CALL_TIR) and len(call.args) == 2):
            return call  # not a call_tir, or one with symbolic shape arguments
        func = self.mod_[call.args[0]]
        out_ty = call.ty_args[0]
        if relax.analysis.has_reshape_pattern(func) or not isinstance(out_ty, relax.TensorType):
            return call
        obj = op_object(func, self.target)
        self.objects[obj.symbol] = obj.path
        return relax.call_dps_packed(obj.symbol, call.args[1], out_ty)


def _ops_as_objects(mod: tvm.IRModule, target) -> tuple[tvm.IRModule, list[Path]]:
    """The module with Relax's remaining ops legalized and each of their PrimFuncs called from
    a cached object file (`_OpsByObject`), and those files (the PrimFuncs left uncalled go in
    `_relax_pipeline`). Built with the model, TVM's PrimFuncs for pooling, concats or dilated
    convs took 40% of a warm build of a `darts-sparse` candidate (LLVM, every build)."""
    legalize = tvm.transform.Sequential(  # as TVM's pipeline legalizes them (`_relax_pipeline`)
        [
            relax.backend.DispatchSampling(),
            relax.backend.DispatchSortScan(),
            relax.transform.LegalizeOps(),
        ]
    )
    with target:
        rewriter = _OpsByObject(legalize(mod), target)
    return rewriter.transform(), list(rewriter.objects.values())


@tvm.transform.module_pass(opt_level=0, name="hwnas.DropUncalledPrimFuncs")
def _drop_uncalled_prim_funcs(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    called = {
        gvar
        for func in mod.functions.values()
        if isinstance(func, relax.Function)
        for gvar in relax.analysis.all_global_vars(func)
    }
    kept = {
        gvar: func
        for gvar, func in mod.functions.items()
        if isinstance(func, relax.Function) or gvar in called
    }
    return tvm.IRModule(kept, attrs=mod.attrs)


def _relax_pipeline(target: tvm.target.Target):
    """TVM's default pipeline; on a CPU followed by dropping the PrimFuncs nothing calls. TVM
    turns each legalized reshape into a view (no copy) but still compiles its PrimFunc: that
    was about half of a small model's build time."""
    if target.kind.name != "llvm":
        return "default"
    return tvm.transform.Sequential(
        [relax.pipeline.default_build_pipeline(), _drop_uncalled_prim_funcs]
    )


def _kernel_info(layer: LayerPlan) -> dict[str, Any]:
    info: dict[str, Any] = {
        "impl": layer.impl,
        "kind": layer.kind,
        "activation": layer.activation,
        "fused_bias": layer.fused_bias,
        "fused_residual": layer.residual_var is not None,
        "im2col": layer.x_copy is not None and layer.x_copy.op == "im2col",
    }
    if layer.spec is not None and layer.spec.direct:  # a k x k conv without im2col
        info["direct"] = True
    if layer.spec is not None and layer.spec.residual_first:  # ReLU after the residual add
        info["residual_first"] = True
    if layer.spec is not None and layer.spec.lockstep:  # batch 1, block rows in groups
        info["lockstep"] = True
    if layer.fused_into is not None:
        info["fused_into"] = layer.fused_into
    if layer.expand is not None:
        info["fused_expand"] = layer.expand.name
        # channels the kernel expands together (1: one CSR row at a time)
        info["expand_group"] = layer.kernel.expand.block[0]
    if layer.fusion_ms:  # its 1x1 conv was fused although its dense kernel was faster alone
        info["fused_ms"] = layer.fusion_ms["fused"]
        info["unfused_ms"] = layer.fusion_ms["unfused"]
    if layer.spec is not None and layer.spec.kept_rows:  # channel-pruned, rebuilt smaller
        info["kept_rows"] = int(layer.constants[1].size)
    if layer.spec is not None and layer.spec.by_column:  # 1 x c blocks walked by column
        info["by_column"] = True
    if layer.bsr is not None:
        rows, cols = layer.bsr.rows, layer.bsr.cols
        info["block"] = list(layer.bsr.block)
        info["nnz_blocks"] = layer.bsr.nnz_blocks
        info["density"] = float(np.count_nonzero(layer.bsr.data)) / (rows * cols)
    if layer.times_ms:
        info["sparse_ms"] = layer.times_ms["sparse"]
        info["dense_ms"] = layer.times_ms["dense"]
    return info


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


def _layer_reference(module: nn.Module, x: torch.Tensor, plan: LayerPlan) -> np.ndarray:
    with torch.no_grad():
        y = module(x)
    if plan.activation == "relu":
        y = torch.relu(y)
    elif plan.activation == "relu6":
        y = torch.clamp(y, 0, 6)
    return y.detach().cpu().numpy()


def run_layer_kernel(plan: LayerPlan, x: np.ndarray, target) -> np.ndarray:
    """Build and run one layer's kernel(s) alone on the layer's input `x` (for diagnostics)."""
    symbols = {plan.kernel: kernel_symbol(plan.name, plan.impl)}
    if plan.x_copy is not None:
        symbols[plan.x_copy] = kernel_symbol(plan.name, plan.x_copy.op)
    lib = build_kernels(symbols, target)
    calls = layer_calls(plan, x, symbols.__getitem__, np.random.default_rng(0))
    return layer_output(plan, run_layer_calls(lib, local_device(target), calls))


def worst_layer(deploy: nn.Module, example_input, plan: RewritePlan, target) -> str | None:
    """Name the layer whose kernel differs most from torch on its own captured input, in the
    deploy copy (sparse layers masked, BatchNorm folded) that the kernels were made from."""
    if not plan.layers:
        return None
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        deploy.get_submodule(layer.name).register_forward_hook(
            lambda _m, inputs, _out, name=layer.name: captured.__setitem__(name, inputs[0])
        )
        for layer in plan.layers
    ]
    try:
        with torch.no_grad():
            deploy(example_input)
    finally:
        for hook in hooks:
            hook.remove()
    worst_name, worst_err = None, -1.0
    for layer in plan.layers:
        first = layer.expand or layer  # a fused expand conv is checked with its depthwise conv
        x = captured.get(first.name)
        if x is None or layer.fused_into is not None:
            continue
        expected = _layer_reference(deploy.get_submodule(first.name), x, first)
        if layer.expand is not None:
            y = torch.from_numpy(expected)
            expected = _layer_reference(deploy.get_submodule(layer.name), y, layer)
        got = run_layer_kernel(layer, x.detach().cpu().numpy(), target)
        scale = max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
        err = float(np.max(np.abs(got - expected), initial=0.0)) / scale
        if err > worst_err:
            worst_name, worst_err = layer.name, err
    impl = next(layer.impl for layer in plan.layers if layer.name == worst_name)
    return f"{worst_name!r} ({impl} kernel, max error {worst_err:.3g} of its output)"


__all__ = [
    "CompiledModel",
    "build",
    "compare_outputs",
    "kernel_symbol",
    "local_device",
    "remote_output",
    "worst_layer",
]
