"""Find sparse layers, export a deploy copy, and rewrite them in Relax into our sparse kernels."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tvm import relax
from tvm.ir import Op

from compile.bsr import (
    BsrWeight,
    bsr_to_dense,
    choose_block,
    full_bsr,
    lockstep_rows,
    pack_dense,
    pad_indptr,
    pad_rows,
    to_bsr,
)
from compile.choose import KernelCandidate, KernelChooser
from compile.kernels import (
    MAX_COLUMNS,
    ConvGeometry,
    Kernel,
    KernelSpec,
    dense_block_rows,
    dense_matvec_rows,
    direct_offsets,
    expand_group,
    im2col_row,
    lockstep_group,
    matvec_row_blocks,
    matvec_row_chains,
    matvec_row_group,
    padded_plane,
    phase_shape,
    takes_by_column,
    takes_dilation,
    takes_lockstep,
    takes_narrow_indices,
    vector_unit,
)
from compile.objects import kernel_object, parse_unbuilt

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


def fold_batchnorm(model: nn.Module) -> list[str]:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d in an nn.Sequential into
    that conv's weight and bias (the BN becomes Identity); return the folded convs' names. Every
    other eval-mode batch norm becomes its scale and shift (`_batchnorm_as_scale_shift`).

    torch.export keeps BatchNorm as its own op (Relax `nn.batch_norm`), a whole extra pass over
    the activations; folded, it costs nothing. A row scaling keeps the sparsity pattern.
    """
    folded = []
    for seq_name, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (conv_key, conv), (bn_key, bn) in zip(children, children[1:], strict=False):
            if not (
                isinstance(conv, nn.Conv2d)
                and isinstance(bn, nn.BatchNorm2d)
                and bn.num_features == conv.out_channels
                and bn.running_mean is not None
                and bn.running_var is not None
            ):
                continue
            with torch.no_grad():
                scale, shift = _bn_scale_shift(bn)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
                conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
                conv.bias = nn.Parameter(bias * scale + shift)
            setattr(seq, bn_key, nn.Identity())
            folded.append(f"{seq_name}.{conv_key}" if seq_name else conv_key)
    _batchnorm_as_scale_shift(model)
    return folded


def _bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """What an eval-mode batch norm does per channel: x * scale + shift."""
    scale = torch.rsqrt(bn.running_var.float() + bn.eps)
    shift = -bn.running_mean.float() * scale
    if bn.affine:
        scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
    return scale, shift


class _ScaleShift(nn.Module):
    """An eval-mode batch norm as what it computes: x * scale + shift along dim 1."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        with torch.no_grad():
            scale, shift = _bn_scale_shift(bn)
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.reshape(shape) + self.shift.reshape(shape)


def _batchnorm_as_scale_shift(model: nn.Module) -> None:
    """Replace each eval-mode batch norm (1-D, 2-D, 3-D) that no conv absorbed (after a
    pooling, a concat, in a Linear head, ...) by `_ScaleShift`. TVM 0.27's torch frontend, run
    without decompositions (as the build runs it), computes an eval-mode batch norm with the
    batch's own statistics: a DARTS cell's unfolded BNs made the compiled net's outputs differ
    from torch's by as much as the outputs themselves."""
    for parent in list(model.modules()):
        for key, child in list(parent.named_children()):
            if (
                isinstance(child, nn.modules.batchnorm._BatchNorm)
                and not child.training
                and child.running_mean is not None
                and child.running_var is not None
            ):
                setattr(parent, key, _ScaleShift(child))


@dataclass
class LayerPlan:
    """How one Conv2d/Linear is computed: its kernel(s), constants and fused epilogue."""

    name: str
    kind: str  # "conv" | "linear" | "depthwise"
    impl: str  # "sparse" | "dense" | "depthwise"
    spec: KernelSpec | None  # matmul layers (conv and linear)
    geometry: ConvGeometry | None  # conv and depthwise layers
    constants: list[np.ndarray]  # kernel inputs after the activations, bias last
    input_var: str  # Relax var fed to the layer
    input_shape: tuple[int, ...]
    output_var: str  # last Relax var the kernel replaces (the layer, bias add or activation)
    activation: str = "none"
    fused_bias: bool = False
    residual_var: str | None = None  # a tensor added to the output (fused into the kernel)
    bsr: BsrWeight | None = None  # sparse layers, whichever kernel they got
    times_ms: dict[str, float] = field(default_factory=dict)  # sparse / dense, when timed
    kernel: Kernel | None = field(repr=False, default=None)
    # The kernel that writes the X the matmul kernel reads from the conv's input: im2col (a
    # conv that is not a plain 1x1, or a 1x1 conv's dense kernel reading rows padded off
    # pages), or a direct conv's padded planes (`pad`).
    x_copy: Kernel | None = field(repr=False, default=None)
    # A depthwise conv that computes the sparse 1x1 conv feeding it (`expand`) in its own kernel
    # takes that conv's input; the 1x1 conv's plan names it in `fused_into` and has no call.
    expand: LayerPlan | None = field(repr=False, default=None)
    fused_into: str | None = None
    # When the 1x1 conv had got its dense kernel: the fused kernel's time and the two calls'
    fusion_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class RewritePlan:
    """Every layer that got one of our kernels, why each sparse layer that did not get a sparse
    kernel stayed dense, and the layers left to TVM's default build (with the reason)."""

    layers: list[LayerPlan]
    dense_reasons: dict[str, str]
    untuned: dict[str, str] = field(default_factory=dict)

    @property
    def sparse(self) -> list[LayerPlan]:
        return [layer for layer in self.layers if layer.impl == "sparse"]


# A sparse layer whose nonzero rows hold at least this share of their weights is taken as
# channel-pruned and rebuilt as a smaller dense layer.
KEPT_ROWS_FILL = 0.95
# A kernel with less work than this (multiply-adds, or about 3 per copied element) runs on one
# core: a parallel loop's launch (about 1 us with two threads on the benchmark VM, more with
# more) is most of a small layer's time. mbv2-sparse at 32x32 on two threads: 0.057 ms with
# every kernel parallel, 0.041 with none, 0.037 with this rule (0.039 with 100_000); its dense
# twin 0.083 ms, as with every kernel parallel.
PARALLEL_MIN_MACS = 50_000

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
        # The conv2d(x, W) and matmul(x, permute_dims(W)) bindings, by W's var name (2-D W for
        # a matmul): searching the bindings once per layer took 0.3 s of a `darts-sparse`
        # candidate's build.
        self.layer_calls: dict[str, list[tuple[str, relax.Call]]] = {}
        for var_name, value in self.values.items():
            weight = self._layer_weight(value)
            if weight is not None:
                self.layer_calls.setdefault(weight.name, []).append((var_name, value))

    def only_consumer(self, name: str) -> tuple[str, relax.Call] | None:
        users = self.consumers.get(name, [])
        if len(users) != 1 or users[0] not in self.values:
            return None
        value = self.values[users[0]]
        return (users[0], value) if isinstance(value, relax.Call) else None

    def _layer_weight(self, value: relax.Expr) -> relax.Var | None:
        """W's var when `value` is conv2d(x, W) or matmul(x, permute_dims(W)) with a 2-D W."""
        if not isinstance(value, relax.Call) or len(value.args) < 2:
            return None
        w = value.args[1]
        if not isinstance(w, relax.Var):
            return None
        if value.op.same_as(_CONV2D):
            return w
        bound = self.values.get(w.name)
        if (
            value.op.same_as(_MATMUL)
            and isinstance(bound, relax.Call)
            and bound.op.same_as(_PERMUTE)
            and isinstance(bound.args[0], relax.Var)
            and len(_static_shape(bound.args[0]) or ()) == 2
        ):
            return bound.args[0]
        return None

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


def _conv_geometry(
    call: relax.Call, x_shape: tuple[int, ...], weight_shape: tuple[int, ...]
) -> tuple[ConvGeometry | None, str]:
    """The conv's geometry, or None and why none of our kernels computes it."""
    attrs = call.attrs
    if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
        return None, "layout other than NCHW/OIHW"
    if len(x_shape) != 4 or len(weight_shape) != 4:
        return None, "input is not NCHW"
    b, c, h, w = x_shape
    kh, kw = int(weight_shape[2]), int(weight_shape[3])
    sh, sw = (int(s) for s in attrs.strides)
    dh, dw = (int(d) for d in attrs.dilation)
    pt, pl, pb, pr = (int(p) for p in attrs.padding)
    oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    if oh < 1 or ow < 1:
        return None, "empty output"
    return ConvGeometry(b, c, h, w, (kh, kw), (sh, sw), (pt, pl), oh, ow, (dh, dw)), ""


def _epilogue(
    graph: _Graph, call_var: str, bias_name: str, weight_vars: dict[str, str], tensors, rows: int
) -> tuple[str, str, np.ndarray, bool]:
    """The bias add and ReLU/ReLU6 that follow a layer alone and can be fused into its kernel:
    (last var replaced, activation, bias, whether a bias add was fused)."""
    bias = np.zeros(rows, dtype=np.float32)
    out_var, activation, fused_bias = call_var, "none", False
    nxt = graph.only_consumer(out_var)
    if nxt is not None and nxt[1].op.same_as(_ADD) and bias_name in weight_vars:
        a, b = nxt[1].args
        other = b if isinstance(a, relax.Var) and a.name == out_var else a
        if graph.is_var_of(other, weight_vars[bias_name], through=_RESHAPE):
            bias = tensors[bias_name].astype(np.float32).reshape(rows)
            out_var, fused_bias = nxt[0], True
            nxt = graph.only_consumer(out_var)
    out_var, activation = _activation(graph, out_var)
    return out_var, activation, bias, fused_bias


def _activation(graph: _Graph, var: str) -> tuple[str, str]:
    """The ReLU or ReLU6 that alone reads `var`, as (its var, its name), else (var, "none")."""
    nxt = graph.only_consumer(var)
    if nxt is not None and nxt[1].op.same_as(_RELU):
        return nxt[0], "relu"
    if nxt is not None and nxt[1].op.same_as(_CLIP):
        lo, hi = (float(v.value) for v in nxt[1].args[1:3])
        if (lo, hi) == (0.0, 6.0):
            return nxt[0], "relu6"
    return var, "none"


def plan_rewrite(
    func: relax.Function,
    weight_vars: dict[str, str],
    tensors: dict[str, np.ndarray],
    layers: list[str],
    sparse: dict[str, tuple[int, int] | None],
    family: str,
    num_cores: int | None,
    avx512: bool,
    chooser: KernelChooser,
) -> RewritePlan:
    """Plan a kernel of ours for each Conv2d/Linear named in `layers` (torch module names).

    A sparse layer (in `sparse`) gets the faster of its sparse and dense kernels (`chooser`);
    every other layer its dense or depthwise kernel. `weight_vars` maps torch parameter names
    to Relax parameter var names; `tensors` maps them to the deploy copy's values.
    """
    graph = _Graph(func)
    plans: list[LayerPlan] = []
    fused_adds: set[str] = set()  # residual adds a layer's kernel computes
    dense_reasons: dict[str, str] = {}
    untuned: dict[str, str] = {}
    for name in layers:
        weight_name = f"{name}.weight"
        weight = tensors.get(weight_name)
        weight_var = weight_vars.get(weight_name)
        found = _find_layer_call(graph, weight_var) if weight_var else None
        if weight is None or found is None:
            untuned[name] = "weight not used by one conv2d or matmul in the exported graph"
            continue
        call_var, call = found
        x = call.args[0]
        x_shape = _static_shape(x)
        if x_shape is None or str(x.ty.dtype) != "float32" or weight.dtype != np.float32:
            untuned[name] = "input is not a static-shape float32 tensor"
            continue
        geometry = None
        if call.op.same_as(_CONV2D):
            geometry, problem = _conv_geometry(call, x_shape, weight.shape)
            groups = int(call.attrs.groups)
            if geometry is not None and groups == geometry.channels == weight.shape[0] > 1:
                kind = "depthwise"
            elif geometry is not None and groups != 1:
                geometry, problem = None, f"grouped convolution (groups={groups})"
            else:
                kind = "conv"
            if geometry is not None and not takes_dilation(kind, family, geometry):
                geometry, problem = None, "dilated convolution"
            if geometry is None:
                untuned[name] = problem
                continue
        else:
            if len(x_shape) < 1:
                untuned[name] = "scalar input"
                continue
            kind = "linear"
        rows = weight.shape[0]
        out_var, activation, bias, fused_bias = _epilogue(
            graph, call_var, f"{name}.bias", weight_vars, tensors, rows
        )
        residual_var, residual_first = None, False
        if kind == "conv":
            out_shape = (geometry.batch, rows, geometry.out_height, geometry.out_width)
            found_residual = _residual(graph, out_var, out_shape)
            # An add of two convs' outputs (a ResNet block's, with a conv on its shortcut) is
            # fused into the first of them; the second keeps its own output.
            if found_residual is not None and found_residual[0] not in fused_adds:
                out_var, residual_var = found_residual
                fused_adds.add(out_var)
                if activation == "none":  # one after the add takes the sum (ResNet blocks)
                    out_var, activation = _activation(graph, out_var)
                    residual_first = activation != "none"
        common = dict(
            name=name,
            kind=kind,
            geometry=geometry,
            input_var=x.name,
            input_shape=x_shape,
            output_var=out_var,
            activation=activation,
            fused_bias=fused_bias,
            residual_var=residual_var,
        )
        if kind == "depthwise":
            kh, kw = geometry.kernel
            cores = _cores(num_cores, _depthwise_macs(geometry))
            plan = LayerPlan(
                impl="depthwise",
                spec=None,
                constants=[np.ascontiguousarray(weight.reshape(rows, kh, kw)), bias],
                kernel=Kernel("depthwise", family, geometry, activation, cores, avx512),
                **common,
            )
            if name in sparse:
                dense_reasons[name] = "depthwise convolution (no sparse kernel)"
            plans.append(plan)
            continue
        matrix = weight.reshape(rows, -1)
        plain = kind == "conv" and _is_plain_1x1(geometry)
        # its dense kernel reads X through a padded copy; a sparse kernel reads it as it is
        copies = plain and _copies_off_pages(geometry, matrix.shape[1], family)
        args = (kind, geometry, x_shape, activation, residual_var is not None, residual_first)
        site = _layer_site(*args, plain and not copies, family, num_cores, avx512)
        im2col = None
        if (kind == "conv" and not plain) or copies:
            cores = _cores(num_cores, 3 * _depthwise_macs(geometry))  # per copied element
            im2col = Kernel("im2col", family, geometry, num_cores=cores, avx512=avx512)
        dense = replace(_dense_candidate(matrix, bias, site), copy=im2col)
        impl, choice, bsr = "dense", None, None
        if name in sparse:
            if not np.any(matrix == 0):
                dense_reasons[name] = "mask is all ones"
            else:
                bsr = to_bsr(matrix, choose_block(matrix != 0, sparse[name]))
                as_is, dense_as_is = site, dense  # the sparse kernels read X as it is
                if copies:
                    as_is = _layer_site(*args, True, family, num_cores, avx512)
                    dense_as_is = _dense_candidate(matrix, bias, as_is)
                sparse_candidate = _kept_rows_candidate(matrix, dense_as_is, num_cores)
                if (
                    sparse_candidate is None
                    and kind == "conv"
                    and takes_direct(geometry, site, bsr)
                ):
                    sparse_candidate = _direct_candidate(bsr, bias, site, geometry)
                elif sparse_candidate is None:
                    sparse_candidate = _sparse_candidate(matrix, bsr, bias, as_is)
                    sparse_candidate = replace(sparse_candidate, copy=dense_as_is.copy)
                density = float(np.count_nonzero(matrix)) / matrix.size
                choice = chooser.choose(sparse_candidate, dense, density, x_shape)
                if choice.impl == "sparse":
                    impl, dense = "sparse", sparse_candidate
                else:
                    dense_reasons[name] = f"dense kernel chosen: {choice.reason}"
        plan = LayerPlan(
            impl=impl,
            spec=dense.spec,
            constants=dense.constants,
            bsr=bsr,
            kernel=dense.kernel,
            x_copy=dense.copy,
            **common,
        )
        if choice is not None and choice.sparse_ms is not None:
            plan.times_ms = {"sparse": choice.sparse_ms, "dense": choice.dense_ms}
        plans.append(plan)
    _fuse_expand_depthwise(plans, graph, num_cores, chooser, dense_reasons)
    return RewritePlan(layers=plans, dense_reasons=dense_reasons, untuned=untuned)


def _fuse_expand_depthwise(
    plans: list[LayerPlan],
    graph: _Graph,
    num_cores: int | None,
    chooser: KernelChooser,
    dense_reasons: dict[str, str],
) -> None:
    """Give each depthwise conv fed only by a sparse plain 1x1 conv one kernel that computes
    both (`expand_depthwise_cpu`, `expand_depthwise_cuda`): the expanded tensor never goes to
    memory and a call goes away. Only sparse ones: a dense 1x1 conv reuses each input load
    across a tile of rows, which the fused kernel's channel-by-channel expansion cannot. Where
    the 1x1 conv's kernels were timed, the fused kernel is timed too, in turns with the two
    calls it would replace, and kept when it takes no longer:
    - a sparse 1x1 conv that got its dense kernel (faster alone) can still be fused: the call
      saved can outweigh the slower 1x1 conv (small layers on a GPU, where every launch costs
      a few microseconds);
    - one that got its sparse kernel can stay apart: at low sparsity the fused kernel's
      expansion row by row loses (CIFAR MobileNetV2, 1x1 convs 30% unstructured: 2.85 ms
      fused by rule, 2.76 ms not fused; docs/kernel-notes.md, session 22).
    Untimed (a forced choice, or the density rule), a sparse 1x1 conv is fused."""
    by_output = {plan.output_var: plan for plan in plans}
    for dw in plans:
        ex = by_output.get(dw.input_var)
        if (
            dw.kind != "depthwise"
            or ex is None
            or ex.bsr is None  # a dense layer
            or ex.kind != "conv"
            or not _is_plain_1x1(ex.geometry)  # im2col
            or ex.residual_var is not None
            or len(graph.consumers.get(ex.output_var, [])) != 1
        ):
            continue
        family, avx512 = dw.kernel.family, dw.kernel.avx512
        group = expand_group(ex.bsr.block, ex.bsr.rows, ex.spec.m, family, avx512)
        blocks = to_bsr(bsr_to_dense(ex.bsr), (group, 1))  # CSR rows or groups of channels
        spec = replace(
            ex.spec,
            in_hw=ex.spec.out_hw,  # X as it is (where the dense kernel read a copy too)
            x_row=0,
            block=(group, 1),
            block_rows=blocks.block_rows,
            kept_rows=False,
            by_column=False,
        )
        bias = ex.constants[-1]
        constants = [blocks.data.reshape(-1), blocks.indices, blocks.indptr, bias, *dw.constants]
        macs = _depthwise_macs(dw.geometry) + spec.batch * blocks.data.size * spec.m
        kernel = replace(dw.kernel, expand=spec, num_cores=_cores(num_cores, macs))
        if ex.times_ms:  # its kernels were timed: so is the fused kernel, against both calls
            geo = dw.geometry
            mid = (geo.batch, geo.channels, geo.height, geo.width)
            out = (geo.batch, geo.channels, geo.out_height, geo.out_width)
            density = blocks.data.size / (ex.bsr.rows * ex.bsr.cols)
            times = chooser.time_fusion(
                (kernel, constants),
                (dw.kernel, dw.constants),
                (ex.input_shape, mid, out),
                density,
                # after the padded copy of X its dense kernel reads, if any
                KernelCandidate(ex.kernel, ex.constants, ex.spec, ex.x_copy),
            )
            if times is not None:
                if times[0] > times[1]:
                    continue
                dw.fusion_ms = {"fused": times[0], "unfused": times[1]}
        if ex.impl != "sparse":
            if not dw.fusion_ms:  # dense by a rule or by request, or the fusion not timed
                continue
            ex.impl = "sparse"
            dense_reasons.pop(ex.name, None)
        dw.constants, dw.kernel = constants, kernel
        dw.input_var, dw.input_shape = ex.input_var, ex.input_shape
        dw.expand, ex.fused_into, ex.x_copy = ex, dw.name, None


def _residual(graph: _Graph, out_var: str, shape: tuple[int, ...]) -> tuple[str, str] | None:
    """When a conv's output `out_var` goes only into an add with another float32 tensor of its
    own `shape` (a residual connection), that add's var and the other tensor's var."""
    nxt = graph.only_consumer(out_var)
    if nxt is None or not nxt[1].op.same_as(_ADD):
        return None
    a, b = nxt[1].args
    if isinstance(a, relax.Var) and a.name == out_var:
        other = b
    elif isinstance(b, relax.Var) and b.name == out_var:
        other = a
    else:
        return None
    if (
        not isinstance(other, relax.Var)
        or other.name == out_var
        or _static_shape(other) != shape
        or str(other.ty.dtype) != "float32"
    ):
        return None
    return nxt[0], other.name


def _cores(num_cores: int | None, macs: int) -> int | None:
    """The cores a kernel with `macs` multiply-adds is built for (PARALLEL_MIN_MACS)."""
    return 1 if macs < PARALLEL_MIN_MACS else num_cores


def _depthwise_macs(geometry: ConvGeometry) -> int:
    """Multiply-adds of a depthwise conv; also the element count of the conv's im2col."""
    g = geometry
    return g.batch * g.channels * g.out_height * g.out_width * g.kernel[0] * g.kernel[1]


def _is_plain_1x1(geometry: ConvGeometry) -> bool:
    return geometry.kernel == (1, 1) and geometry.stride == (1, 1) and geometry.pad == (0, 0)


# Input channels from which a dense 1x1 conv on planes of whole 4 KB pages reads its input
# through a padded copy (`_copies_off_pages`): L1 is 8-way, and a tile reads its K rows at one
# offset of their pages.
COPY_OFF_PAGES_MIN_COLS = 16


def _copies_off_pages(geometry: ConvGeometry, cols: int, family: str) -> bool:
    """Whether a plain 1x1 conv with `cols` input channels, on its dense kernel, reads its
    input through the im2col kernel: a copy whose rows are padded off 4 KB pages (`im2col_row`).
    Rows that all start at the same offset in their pages share a few cache sets, and our
    dense kernel read them at 1.2-1.65x the time (the CIFAR MobileNetV2's 1x1 convs at 32x32,
    AVX2). With the copy that network's dense twin ran 1.04-1.05x faster: its expand convs
    alone 1.17-1.50x, its convs to 16 or 24 channels 0.98-1.15x (docs/kernel-notes.md,
    session 21). Sparse kernels read X as it is: they read few of its rows, and the copy would
    cost more than it saves. A sparse layer's choice times its dense kernel with the copy."""
    m = geometry.out_height * geometry.out_width
    return cols >= COPY_OFF_PAGES_MIN_COLS and im2col_row(m, family) != m


@dataclass(frozen=True)
class LayerSite:
    """What a layer's kernels are built for, besides its weights: the activations (batch,
    M), the fused epilogue, the conv's maps (`KernelSpec.in_hw`, `out_hw` and `residual`) and
    the target."""

    batch: int
    m: int
    activation: str
    family: str
    num_cores: int | None
    avx512: bool
    maps: tuple = (None, None, False)
    x_row: int = 0  # `KernelSpec.x_row`
    residual_first: bool = False  # `KernelSpec.residual_first`

    def spec(self, rows: int, cols: int, block: tuple[int, int], block_rows: int) -> KernelSpec:
        return KernelSpec(
            self.batch,
            rows,
            cols,
            self.m,
            block,
            block_rows,
            self.activation,
            *self.maps,
            x_row=self.x_row,
            residual_first=self.residual_first,
        )

    def kernel(self, op: str, spec: KernelSpec, macs: int) -> Kernel:
        """Kernel `op` for `spec`, built for one core when it has few multiply-adds."""
        cores = _cores(self.num_cores, macs)
        return Kernel(op, self.family, spec, num_cores=cores, avx512=self.avx512)


def _layer_site(
    kind: str,
    geometry: ConvGeometry | None,
    x_shape: tuple[int, ...],
    activation: str,
    residual: bool,
    residual_first: bool,
    reads_x: bool,
    family: str,
    num_cores: int | None,
    avx512: bool,
) -> LayerSite:
    """The site of a conv or Linear layer's matmul kernel. `residual_first`: the residual is
    added before the activation. `reads_x`: a plain 1x1 conv's kernel reads the conv's input
    as it is; else a conv's kernel reads the im2col output, whose rows may be padded
    (`im2col_row`)."""
    if kind != "conv":
        m = math.prod(x_shape[:-1])
        maps = ((), (), False) if m == 1 and len(x_shape) == 2 else (None, None, False)
        return LayerSite(1, m, activation, family, num_cores, avx512, maps)
    m = geometry.out_height * geometry.out_width
    # the kernels take the conv's 4-D tensors: no reshape calls around them
    hw = (geometry.out_height, geometry.out_width)
    maps = (hw if reads_x else None, hw, residual)
    x_row = 0 if reads_x or im2col_row(m, family) == m else im2col_row(m, family)
    return LayerSite(
        geometry.batch, m, activation, family, num_cores, avx512, maps, x_row, residual_first
    )


def _dense_candidate(matrix: np.ndarray, bias: np.ndarray, site: LayerSite) -> KernelCandidate:
    """The dense kernel for W (rows x cols): packed W, or all-blocks BSR when M == 1 (on a CPU
    also when M <= MAX_COLUMNS)."""
    rows, cols = matrix.shape
    family, m, avx512 = site.family, site.m, site.avx512
    # M == 1: the matrix-vector kernel (on a GPU a warp per row, four columns per lane); on a
    # CPU up to MAX_COLUMNS too (its columns variant).
    if m == 1 or family != "cuda" and m <= MAX_COLUMNS:
        block = (1, 4) if family == "cuda" else (dense_matvec_rows(rows, family, avx512, m), 1)
        bsr = full_bsr(matrix, block)
        spec = site.spec(rows, cols, bsr.block, bsr.block_rows)
        spec, consts = _bsr_arguments(spec, bsr, bias, family, sparse=False)
    else:
        nr = min(dense_block_rows(family, avx512), rows)
        consts = [pack_dense(matrix, nr), bias]
        spec = site.spec(rows, cols, (nr, 1), -(-rows // nr))
    kernel = site.kernel("dense", spec, site.batch * rows * cols * m)
    return KernelCandidate(kernel, consts, spec)


def _bsr_arguments(
    spec: KernelSpec, bsr: BsrWeight, bias: np.ndarray, family: str, sparse: bool = True
) -> tuple[KernelSpec, list[np.ndarray]]:
    """The spec and constants of a kernel walking `bsr` by block row: its indices as uint16
    where the kernel takes them so (`takes_narrow_indices`); a sparse W's block rows in
    lockstep groups where the kernel walks them so (`takes_lockstep`); else its rows padded
    with zero blocks to whole vectors (`matvec_row_blocks`) and its row starts to whole
    groups of rows (`matvec_row_group`) where it takes them so, and the FMA chains for its
    rows' lengths (`matvec_row_chains`)."""
    narrow = takes_narrow_indices(spec, family)
    if sparse and takes_lockstep(spec, family):
        spec = replace(spec, lockstep=True, narrow_indices=narrow)
        group = lockstep_group(spec.block, vector_unit(family).lanes)
        data, indices, pointers = lockstep_rows(bsr, group)
        return spec, [data, indices.astype(np.uint16 if narrow else np.int32), pointers, bias]
    row_blocks = matvec_row_blocks(spec, family)
    if row_blocks > 1:
        bsr = pad_rows(bsr, row_blocks)
        spec = replace(spec, whole_vectors=True)
    spec = replace(spec, chains=matvec_row_chains(spec, family, bsr.nnz_blocks / bsr.block_rows))
    indptr = pad_indptr(bsr.indptr, matvec_row_group(spec, family))
    if narrow:
        spec = replace(spec, narrow_indices=True)
        return spec, [bsr.data, bsr.indices.astype(np.uint16), indptr, bias]
    return spec, [bsr.data, bsr.indices, indptr, bias]


def _sparse_candidate(
    matrix: np.ndarray, bsr: BsrWeight, bias: np.ndarray, site: LayerSite
) -> KernelCandidate:
    """The sparse kernel for W (rows x cols) in BSR form `bsr`, walked by block row, or by
    column block (`takes_by_column`: then on W^T's BSR)."""
    rows, cols = matrix.shape
    spec = site.spec(rows, cols, bsr.block, bsr.block_rows)
    if takes_by_column(spec, bsr.nnz_blocks, site.family, site.avx512):
        by_column = to_bsr(np.ascontiguousarray(matrix.T), bsr.block[::-1])
        spec = replace(spec, block_rows=by_column.block_rows, by_column=True)
        consts = [by_column.data, by_column.indices, by_column.indptr, bias]
    else:
        spec, consts = _bsr_arguments(spec, bsr, bias, site.family)
    kernel = site.kernel("sparse", spec, site.batch * bsr.data.size * site.m)
    return KernelCandidate(kernel, consts, spec)


def takes_direct(geometry: ConvGeometry, site: LayerSite, bsr: BsrWeight) -> bool:
    """Whether a sparse conv that is not a plain 1x1 gets a direct kernel (`KernelSpec.direct`)
    instead of im2col and our sparse kernel: on a CPU, at strides up to 2 (the `pad` kernel's
    stride phases), in r x 1 blocks (a block's column is one im2col row), with at least as
    many taps as stride phases (a strided 1x1 conv's im2col output is smaller than its input),
    and with output rows of at least a vector (two when strided).
    The im2col output, taps / strides times the input, made our sparse kernel read X from L3
    (64->64 at 32x32, 3x3, 2.4 MB): the direct kernel reads the padded input instead, 1.5-2.3x
    faster at 16- to 56-wide output rows. Its tiles stay within an output row, and narrow rows
    lose (AVX2, 3x3 at 90%, direct against im2col): stride 1, 8-wide 1.04-1.14x, 7-wide 0.98x,
    4-wide 0.46x; stride 2, 16-wide 1.29x, 12-wide 1.10x, 8-wide 0.92-1.06x, 4-wide 0.46x
    (docs/kernel-notes.md, session 24)."""
    (kh, kw), (sh, sw) = geometry.kernel, geometry.stride
    lanes = vector_unit(site.family, site.avx512).lanes if site.family != "cuda" else 0
    return (
        lanes > 0
        and not _is_plain_1x1(geometry)  # its kernels read X as it is
        and max(sh, sw) <= 2
        and kh * kw >= sh * sw
        and geometry.out_width >= lanes * (1 if sh * sw == 1 else 2)
        and bsr.block[1] == 1
        and site.m > MAX_COLUMNS
    )


def _direct_candidate(
    bsr: BsrWeight, bias: np.ndarray, site: LayerSite, geometry: ConvGeometry
) -> KernelCandidate:
    """The direct sparse kernel of a conv (`takes_direct`), reading the input's padded planes
    (the `pad` kernel's copy): W's block indices as offsets in those planes."""
    spec = site.spec(bsr.rows, bsr.cols, bsr.block, bsr.block_rows)
    taps = geometry.kernel[0] * geometry.kernel[1]
    direct = (taps, geometry.out_width, phase_shape(geometry)[1])
    spec = replace(spec, in_hw=None, x_row=padded_plane(geometry), direct=direct)
    offsets = direct_offsets(bsr.indices, geometry)
    kernel = site.kernel("sparse", spec, site.batch * bsr.data.size * site.m)
    g = geometry
    cores = _cores(site.num_cores, 3 * g.batch * g.channels * g.height * g.width)
    pad = Kernel("pad", site.family, geometry, num_cores=cores, avx512=site.avx512)
    return KernelCandidate(kernel, [bsr.data, offsets, bsr.indptr, bias], spec, pad)


def _kept_rows_candidate(
    matrix: np.ndarray, dense: KernelCandidate, num_cores: int | None
) -> KernelCandidate | None:
    """A channel-pruned W (whole rows zero, the others nearly full) rebuilt as a smaller dense
    layer: `dense`, the layer's dense kernel, on the kept rows only, writing them to their rows
    of Y (see `KernelSpec.kept_rows`). None when W is not channel-pruned, or on a GPU or at
    M <= MAX_COLUMNS (where `dense` is not the packed dense kernel)."""
    rows, cols = matrix.shape
    row_nnz = np.count_nonzero(matrix, axis=1)
    kept = np.flatnonzero(row_nnz).astype(np.int32)
    if dense.kernel.family == "cuda" or dense.spec.m <= MAX_COLUMNS or not 0 < kept.size < rows:
        return None
    if row_nnz.sum() < KEPT_ROWS_FILL * kept.size * cols:
        return None
    pruned = np.flatnonzero(row_nnz == 0).astype(np.int32)
    nr = min(dense.spec.block[0], kept.size)
    bias = dense.constants[-1]
    spec = replace(dense.spec, block=(nr, 1), block_rows=-(-kept.size // nr), kept_rows=True)
    cores = _cores(num_cores, spec.batch * kept.size * cols * spec.m)
    kernel = replace(dense.kernel, shape=spec, num_cores=cores)
    constants = [pack_dense(matrix[kept], nr), kept, pruned, bias]
    return KernelCandidate(kernel, constants, spec, dense.copy)


def _find_layer_call(graph: _Graph, weight_var: str) -> tuple[str, relax.Call] | None:
    """The conv2d(x, W) or matmul(x, permute_dims(W)) binding that uses weight var `weight_var`."""
    matches = graph.layer_calls.get(weight_var, [])
    if len(matches) != 1 or not isinstance(matches[0][1].args[0], relax.Var):
        return None
    return matches[0]


def kernel_symbol(layer_name: str, impl: str = "sparse") -> str:
    """A TIR function name for one of a layer's kernels (`impl`: sparse, dense, im2col, ...)."""
    return f"{impl}_" + re.sub(r"\W", "_", layer_name)


@relax.expr_functor.mutator
class _LayerRewriter(relax.PyExprMutator):
    """Replaces each planned layer's output binding by calls to its kernel(s): on a CPU target
    by symbol (`call_dps_packed`) to a kernel built once into an object file (`objects`
    collects the files the library must link); on a GPU by `call_tir` to the PrimFunc, which
    TVM builds with the module."""

    def __init__(self, mod, plans: list[LayerPlan], target):
        super().__init__(mod)
        self.mod_ = mod
        self.plans = {p.output_var: p for p in plans if p.fused_into is None}
        self.inputs: dict[str, relax.Var] = {}
        self.target = target
        self.objects: dict[str, Path] = {}

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
        out = self._layer(plan, self.visit_expr(self.inputs[plan.input_var]))
        if isinstance(binding.var, relax.DataflowVar):
            new_var = self.builder_.emit(out)
        else:
            new_var = self.builder_.emit_output(out)
        self.set_var_remap(binding.var, new_var)
        return None

    def _call(self, kernel: Kernel, symbol: str, args: list, shape) -> relax.Var:
        out_ty = relax.TensorType(list(shape), "float32")
        if self.target.kind.name == "cuda":
            func = kernel.func().with_attr("global_symbol", symbol)
            gvar = self.builder_.add_func(func, symbol)
            return self.builder_.emit(relax.call_tir(gvar, args, out_ty))
        obj = kernel_object(kernel, self.target)
        self.objects[obj.symbol] = obj.path
        return self.builder_.emit(relax.call_dps_packed(obj.symbol, args, out_ty))

    def _layer(self, plan: LayerPlan, x: relax.Expr) -> relax.Expr:
        emit = self.builder_.emit
        consts = [relax.const(np.ascontiguousarray(c)) for c in plan.constants]
        symbol = kernel_symbol(plan.name, plan.impl)
        geo = plan.geometry
        if plan.kind == "depthwise":
            shape = (geo.batch, geo.channels, geo.out_height, geo.out_width)
            return self._call(plan.kernel, symbol, [x, *consts], shape)
        spec = plan.spec
        if plan.kind == "conv":
            if plan.x_copy is not None:
                copy_symbol = kernel_symbol(plan.name, plan.x_copy.op)
                x3 = self._call(plan.x_copy, copy_symbol, [x], spec.x_shape)
            elif spec.in_hw is None:
                x3 = emit(relax.op.reshape(x, spec.x_shape))
            else:  # the kernel reads the conv's input as it is: no reshape call
                x3 = x
            args = [x3, *consts]
            if plan.residual_var is not None:
                args.append(self.visit_expr(self.inputs[plan.residual_var]))
            y = self._call(plan.kernel, symbol, args, spec.y_shape)
            if spec.out_hw is not None:
                return y
            return relax.op.reshape(y, (geo.batch, spec.rows, geo.out_height, geo.out_width))
        if spec.in_hw == ():  # the kernel reads and writes (1, features) as they are
            return self._call(plan.kernel, symbol, [x, *consts], spec.y_shape)
        if spec.m == 1:
            x3 = emit(relax.op.reshape(x, (1, spec.cols, 1)))
        else:
            x2 = emit(relax.op.reshape(x, (spec.m, spec.cols)))
            x3 = emit(relax.op.reshape(relax.op.permute_dims(x2, [1, 0]), (1, spec.cols, spec.m)))
        y = self._call(plan.kernel, symbol, [x3, *consts], (1, spec.rows, spec.m))
        if spec.m > 1:
            y = emit(relax.op.permute_dims(relax.op.reshape(y, (spec.rows, spec.m)), [1, 0]))
        return relax.op.reshape(y, (*plan.input_shape[:-1], spec.rows))


def apply_rewrite(mod, plan: RewritePlan, target) -> tuple[object, list[Path]]:
    """The module with every planned layer computed by its kernel(s) for `target`, and the
    kernel object files its library must link (none on a GPU target)."""
    if not plan.layers:
        return mod, []
    called = [layer for layer in plan.layers if layer.fused_into is None]
    copies = [layer.x_copy for layer in called if layer.x_copy is not None]
    parse_unbuilt([*(layer.kernel for layer in called), *copies], target)
    rewriter = _LayerRewriter(mod, plan.layers, target)
    mod = rewriter.transform()
    return relax.transform.DeadCodeElimination(["main"])(mod), list(rewriter.objects.values())
