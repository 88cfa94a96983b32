"""Find sparse layers, export a deploy copy, and rewrite them in Relax into our sparse kernels."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tvm import relax
from tvm.ir import Op

from compile.bsr import BsrWeight, choose_block, to_bsr
from compile.kernels import KernelSpec, sparse_matmul_kernel

try:
    from search_spaces.ops import SPARSE_LAYERS
except ImportError:  # search_spaces.ops not written yet: recognise sparse layers by their mask
    SPARSE_LAYERS = ()


def is_sparse_layer(module: nn.Module) -> bool:
    """A `SPARSE_LAYERS` instance, or a Conv2d/Linear carrying a `mask` shaped like its weight."""
    if SPARSE_LAYERS and isinstance(module, SPARSE_LAYERS):
        return True
    mask = getattr(module, "mask", None)
    return (
        isinstance(module, (nn.Conv2d, nn.Linear))
        and isinstance(mask, torch.Tensor)
        and mask.shape == module.weight.shape
    )


def masked_weight(module: nn.Module) -> torch.Tensor:
    """The weight the layer really multiplies with (weight * mask)."""
    if hasattr(module, "masked_weight"):
        return module.masked_weight().detach()
    return (module.weight * module.mask).detach()


def deploy_copy(model: nn.Module) -> tuple[nn.Module, dict[str, tuple[int, int] | None]]:
    """A copy of `model` in which every sparse layer is a plain Conv2d/Linear holding its masked
    weight, and the sparse layers' names with their declared block shapes."""
    deploy = copy.deepcopy(model).eval()
    sparse: dict[str, tuple[int, int] | None] = {}
    for name, module in list(deploy.named_modules()):
        if not name or not is_sparse_layer(module):
            continue
        if isinstance(module, nn.Conv2d):
            plain: nn.Module = nn.Conv2d(
                module.in_channels,
                module.out_channels,
                module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                groups=module.groups,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            )
        else:
            plain = nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None
            )
        with torch.no_grad():
            plain.weight.copy_(masked_weight(module))
            if module.bias is not None:
                plain.bias.copy_(module.bias.detach())
        parent_name, _, child = name.rpartition(".")
        parent = deploy.get_submodule(parent_name) if parent_name else deploy
        setattr(parent, child, plain.eval())
        block = getattr(module, "block", None)
        usable = isinstance(block, (tuple, list)) and len(block) == 2
        sparse[name] = (int(block[0]), int(block[1])) if usable else None
    return deploy, sparse


@dataclass
class SparseLayerPlan:
    """How one sparse layer is computed: its kernel, BSR constants and fused epilogue."""

    name: str
    kind: str  # "conv1x1" | "linear"
    bsr: BsrWeight
    bias: np.ndarray
    spec: KernelSpec
    input_var: str  # Relax var fed to the layer
    input_shape: tuple[int, ...]
    output_var: str  # last Relax var the kernel replaces (the layer, bias add or activation)
    fused_bias: bool = False
    kernel: object = field(repr=False, default=None)  # tvm.tirx.PrimFunc


@dataclass
class RewritePlan:
    """The sparse layers that got a kernel and the reason each other sparse layer stayed dense."""

    layers: list[SparseLayerPlan]
    dense_reasons: dict[str, str]


_CONV2D = Op.get("relax.nn.conv2d")
_MATMUL = Op.get("relax.matmul")
_PERMUTE = Op.get("relax.permute_dims")
_RESHAPE = Op.get("relax.reshape")
_ADD = Op.get("relax.add")
_RELU = Op.get("relax.nn.relu")
_CLIP = Op.get("relax.clip")


def _static_shape(expr: relax.Expr) -> tuple[int, ...] | None:
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return tuple(int(d) for d in ty.shape.values)
    except (TypeError, AttributeError):
        return None


class _Graph:
    """The bindings of a Relax function indexed by var name, with each var's consumers."""

    def __init__(self, func: relax.Function):
        self.values: dict[str, relax.Expr] = {}
        self.consumers: dict[str, list[str]] = {}
        for block in func.body.blocks:
            for binding in block.bindings:
                name = binding.var.name
                if name in self.values:
                    raise ValueError(f"duplicate Relax var name {name}")
                self.values[name] = binding.value
                for var in relax.analysis.free_vars(binding.value):
                    self.consumers.setdefault(var.name, []).append(name)
        for var in relax.analysis.free_vars(func.body.body):
            self.consumers.setdefault(var.name, []).append("<output>")

    def only_consumer(self, name: str) -> tuple[str, relax.Call] | None:
        users = self.consumers.get(name, [])
        if len(users) != 1 or users[0] not in self.values:
            return None
        value = self.values[users[0]]
        return (users[0], value) if isinstance(value, relax.Call) else None

    def is_var_of(self, expr: relax.Expr, name: str, through: Op | None = None) -> bool:
        """Whether `expr` is the var `name`, or a var bound to `through(name, ...)`."""
        if not isinstance(expr, relax.Var):
            return False
        if expr.name == name:
            return True
        value = self.values.get(expr.name)
        return (
            through is not None
            and isinstance(value, relax.Call)
            and value.op.same_as(through)
            and isinstance(value.args[0], relax.Var)
            and value.args[0].name == name
        )


def _conv_problem(call: relax.Call, weight_shape: tuple[int, ...]) -> str | None:
    attrs = call.attrs
    if len(weight_shape) != 4 or tuple(weight_shape[2:]) != (1, 1):
        return f"{weight_shape[2]}x{weight_shape[3]} kernel (only 1x1 convolutions)"
    if int(attrs.groups) != 1:
        return f"grouped convolution (groups={int(attrs.groups)})"
    if [int(s) for s in attrs.strides] != [1, 1]:
        return "strided convolution"
    if any(int(p) for p in attrs.padding) or [int(d) for d in attrs.dilation] != [1, 1]:
        return "padded or dilated convolution"
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return "layout other than NCHW/OIHW"
    return None


def plan_rewrite(
    func: relax.Function,
    weight_vars: dict[str, str],
    tensors: dict[str, np.ndarray],
    sparse: dict[str, tuple[int, int] | None],
    family: str,
    num_cores: int | None,
    avx512: bool,
) -> RewritePlan:
    """Find each sparse layer's conv2d/matmul in `func` and decide its kernel and epilogue.

    `weight_vars` maps torch parameter names to Relax parameter var names; `tensors` maps the
    torch parameter names to the deploy copy's values.
    """
    graph = _Graph(func)
    layers: list[SparseLayerPlan] = []
    dense: dict[str, str] = {}
    for name, declared in sparse.items():
        weight_name = f"{name}.weight"
        weight = tensors[weight_name]
        if not np.any(weight == 0):
            dense[name] = "mask is all ones"
            continue
        weight_var = weight_vars.get(weight_name)
        found = _find_layer_call(graph, weight_var) if weight_var else None
        if found is None:
            dense[name] = "weight not used by a conv2d or matmul in the exported graph"
            continue
        call_var, call = found
        x = call.args[0]
        x_shape = _static_shape(x)
        if x_shape is None or str(x.ty.dtype) != "float32" or weight.dtype != np.float32:
            dense[name] = "input is not a static-shape float32 tensor"
            continue
        if call.op.same_as(_CONV2D):
            problem = _conv_problem(call, weight.shape)
            if problem or len(x_shape) != 4:
                dense[name] = problem or "input is not NCHW"
                continue
            kind, batch, m = "conv1x1", x_shape[0], x_shape[2] * x_shape[3]
        else:
            if len(x_shape) < 1:
                dense[name] = "scalar input"
                continue
            kind, batch, m = "linear", 1, math.prod(x_shape[:-1])
        matrix = weight.reshape(weight.shape[0], -1)
        rows, cols = matrix.shape
        bias = np.zeros(rows, dtype=np.float32)
        out_var, activation, fused_bias = call_var, "none", False
        bias_name = f"{name}.bias"
        nxt = graph.only_consumer(out_var)
        if nxt is not None and nxt[1].op.same_as(_ADD) and bias_name in weight_vars:
            a, b = nxt[1].args
            other = b if isinstance(a, relax.Var) and a.name == out_var else a
            if graph.is_var_of(other, weight_vars[bias_name], through=_RESHAPE):
                bias = tensors[bias_name].astype(np.float32)
                out_var, fused_bias = nxt[0], True
                nxt = graph.only_consumer(out_var)
        if nxt is not None and nxt[1].op.same_as(_RELU):
            out_var, activation = nxt[0], "relu"
        elif nxt is not None and nxt[1].op.same_as(_CLIP):
            lo, hi = (float(v.value) for v in nxt[1].args[1:3])
            if (lo, hi) == (0.0, 6.0):
                out_var, activation = nxt[0], "relu6"
        bsr = to_bsr(matrix, choose_block(matrix != 0, declared))
        spec = KernelSpec(
            batch=batch,
            rows=rows,
            cols=cols,
            m=m,
            block=bsr.block,
            nnz_storage=len(bsr.data),
            block_rows=bsr.block_rows,
            activation=activation,
        )
        plan = SparseLayerPlan(
            name=name,
            kind=kind,
            bsr=bsr,
            bias=bias,
            spec=spec,
            input_var=x.name,
            input_shape=x_shape,
            output_var=out_var,
            fused_bias=fused_bias,
        )
        kernel = sparse_matmul_kernel(spec, family, num_cores, avx512)
        plan.kernel = kernel.with_attr("global_symbol", kernel_symbol(name))
        layers.append(plan)
    return RewritePlan(layers=layers, dense_reasons=dense)


def _find_layer_call(graph: _Graph, weight_var: str) -> tuple[str, relax.Call] | None:
    """The conv2d(x, W) or matmul(x, permute_dims(W)) binding that uses weight var `weight_var`."""
    matches = []
    for var_name, value in graph.values.items():
        if not isinstance(value, relax.Call) or len(value.args) < 2:
            continue
        w = value.args[1]
        if value.op.same_as(_CONV2D) and graph.is_var_of(w, weight_var):
            matches.append((var_name, value))
        elif value.op.same_as(_MATMUL) and isinstance(w, relax.Var) and w.name != weight_var:
            bound = graph.values.get(w.name)
            if (
                isinstance(bound, relax.Call)
                and bound.op.same_as(_PERMUTE)
                and graph.is_var_of(bound.args[0], weight_var)
                and len(_static_shape(bound.args[0]) or ()) == 2
            ):
                matches.append((var_name, value))
    if len(matches) != 1 or not isinstance(matches[0][1].args[0], relax.Var):
        return None
    return matches[0]


def kernel_symbol(layer_name: str) -> str:
    """A TIR function name for a layer's kernel."""
    return "sparse_" + re.sub(r"\W", "_", layer_name)


@relax.expr_functor.mutator
class _SparseRewriter(relax.PyExprMutator):
    """Replaces each planned layer's output binding by reshapes around a call_tir to its kernel."""

    def __init__(self, mod, plans: list[SparseLayerPlan]):
        super().__init__(mod)
        self.mod_ = mod
        self.plans = {p.output_var: p for p in plans}
        self.inputs: dict[str, relax.Var] = {}

    def transform(self):
        func = self.mod_["main"]
        for param in func.params:
            self.inputs[param.name] = param
        updated = self.visit_expr(func)
        self.builder_.update_func(self.mod_.get_global_var("main"), updated)
        return self.builder_.get()

    def visit_var_binding_(self, binding):
        name = binding.var.name
        self.inputs[name] = binding.var
        plan = self.plans.get(name)
        if plan is None:
            return super().visit_var_binding_(binding)
        x = self.visit_expr(self.inputs[plan.input_var])
        emit = self.builder_.emit
        spec = plan.spec
        gvar = self.builder_.add_func(plan.kernel, kernel_symbol(plan.name))
        if plan.kind == "conv1x1":
            b, _, h, w = plan.input_shape
            x3 = emit(relax.op.reshape(x, (b, spec.cols, h * w)))
        else:
            x2 = emit(relax.op.reshape(x, (spec.m, spec.cols)))
            x3 = emit(relax.op.reshape(relax.op.permute_dims(x2, [1, 0]), (1, spec.cols, spec.m)))
        consts = [
            relax.const(plan.bsr.data),
            relax.const(plan.bsr.indices),
            relax.const(plan.bsr.indptr),
            relax.const(plan.bias),
        ]
        out_ty = relax.TensorType([spec.batch, spec.rows, spec.m], "float32")
        y = emit(relax.call_tir(gvar, [x3, *consts], out_ty))
        if plan.kind == "conv1x1":
            out = relax.op.reshape(y, (b, spec.rows, h, w))
        else:
            y2 = emit(relax.op.permute_dims(relax.op.reshape(y, (spec.rows, spec.m)), [1, 0]))
            out = relax.op.reshape(y2, (*plan.input_shape[:-1], spec.rows))
        if isinstance(binding.var, relax.DataflowVar):
            new_var = emit(out)
        else:
            new_var = self.builder_.emit_output(out)
        self.set_var_remap(binding.var, new_var)
        return None


def apply_rewrite(mod, plan: RewritePlan):
    """The module with every planned sparse layer computed by its kernel."""
    if not plan.layers:
        return mod
    mod = _SparseRewriter(mod, plan.layers).transform()
    return relax.transform.DeadCodeElimination(["main"])(mod)
