"""`darts-sparse`: the DARTS cell (Liu et al. 2019) with sparse variants of its conv primitives,
as in DASS (Mousavi et al., "DASS: Differentiable Architecture Search for Sparse Neural
Networks", 2023).

A network is a stem, `CELLS` cells (reduction cells at 1/3 and 2/3 of the depth), global
pooling and a linear classifier. A cell has two inputs (the two previous cells' outputs) and
`NODES` nodes; each node sums two ops applied to two earlier states and the cell outputs all
nodes concatenated. The `sparse_*` primitives are separable / dilated convs whose 1x1
pointwise convs are SparseConv2d (depthwise convs stay dense), the layers our compiler runs
with sparse kernels. Kept small (channels 8 or 16) so that an epoch on digits is quick on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from search_spaces.ops import SparseConv2d, parse_block
from search_spaces.spaces import Space, register_space
from search_spaces.supernet import Supernet

__all__ = ["DartsNetwork", "DartsSparseSpace", "DartsSupernet", "PRIMITIVES"]

PRIMITIVES = (
    "skip_connect",
    "max_pool_3x3",
    "avg_pool_3x3",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
    "sparse_sep_conv_3x3",
    "sparse_sep_conv_5x5",
    "sparse_dil_conv_3x3",
    "sparse_dil_conv_5x5",
)
# The supernet also mixes in "none" (a zero op); a derived arch never uses it.
SUPERNET_PRIMITIVES = ("none", *PRIMITIVES)
CELL_TYPES = ("normal", "reduce")
NODES = 4
CELLS = 5
STEM_MULTIPLIER = 3
SPARSITIES = (0.5, 0.7, 0.9)
BLOCKS = ("4x1", "1x4")
CHANNELS = (8, 16)

PointwiseFactory = Callable[[int, int], nn.Module]


class FactorizedReduce(nn.Module):
    """Halve the spatial size with two offset stride-2 1x1 convs (DARTS's reducing skip)."""

    def __init__(self, in_ch: int, out_ch: int, affine: bool = True) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(in_ch, out_ch // 2, 1, stride=2, bias=False)
        self.conv_b = nn.Conv2d(in_ch, out_ch - out_ch // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
        return self.bn(torch.cat([self.conv_a(x), self.conv_b(shifted)], dim=1))


def _relu_conv_bn(in_ch: int, out_ch: int, affine: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.ReLU(), nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch, affine=affine)
    )


def _depthwise(channels: int, kernel: int, stride: int, dilation: int = 1) -> nn.Conv2d:
    padding = dilation * (kernel // 2)
    return nn.Conv2d(
        channels, channels, kernel, stride, padding, dilation=dilation, groups=channels, bias=False
    )


class Zero(nn.Module):
    """The "none" op: zeros of the output's shape."""

    def __init__(self, stride: int) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride] * 0.0


def make_primitive(
    name: str, channels: int, stride: int, pointwise: PointwiseFactory, affine: bool = True
) -> nn.Module:
    """One DARTS primitive on `channels` channels; `pointwise` makes its 1x1 convs (dense or
    sparse, chosen by the caller from the name's `sparse_` prefix)."""
    c = channels
    if name == "none":
        return Zero(stride)
    if name == "skip_connect":
        return nn.Identity() if stride == 1 else FactorizedReduce(c, c, affine)
    if name == "max_pool_3x3":
        return nn.MaxPool2d(3, stride, 1)
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride, 1, count_include_pad=False)
    base = name.removeprefix("sparse_")
    kernel = int(base[-1])
    if base.startswith("sep_conv"):
        return nn.Sequential(
            nn.ReLU(),
            _depthwise(c, kernel, stride),
            pointwise(c, c),
            nn.BatchNorm2d(c, affine=affine),
            nn.ReLU(),
            _depthwise(c, kernel, 1),
            pointwise(c, c),
            nn.BatchNorm2d(c, affine=affine),
        )
    if base.startswith("dil_conv"):
        return nn.Sequential(
            nn.ReLU(),
            _depthwise(c, kernel, stride, dilation=2),
            pointwise(c, c),
            nn.BatchNorm2d(c, affine=affine),
        )
    raise ValueError(f"unknown DARTS primitive {name!r}; use one of {', '.join(PRIMITIVES)}")


class Cell(nn.Module):
    """A discrete cell: per node two (input state, op) pairs, summed."""

    def __init__(
        self,
        genes: list[tuple[int, str, int, str]],
        prev_prev: int,
        prev: int,
        channels: int,
        reduction: bool,
        reduction_prev: bool,
        make_op: Callable[[str, int, int], nn.Module],
    ) -> None:
        super().__init__()
        self.pre0 = (
            FactorizedReduce(prev_prev, channels)
            if reduction_prev
            else _relu_conv_bn(prev_prev, channels)
        )
        self.pre1 = _relu_conv_bn(prev, channels)
        self.inputs = [(g[0], g[2]) for g in genes]
        self.ops = nn.ModuleList()
        for in0, op0, in1, op1 in genes:
            for source, name in ((in0, op0), (in1, op1)):
                stride = 2 if reduction and source < 2 else 1
                self.ops.append(make_op(name, channels, stride))

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        for j, (in0, in1) in enumerate(self.inputs):
            states.append(self.ops[2 * j](states[in0]) + self.ops[2 * j + 1](states[in1]))
        return torch.cat(states[2:], dim=1)


class MixedCell(nn.Module):
    """A supernet cell: every node takes every earlier state through a softmax-mixed op."""

    def __init__(
        self,
        alphas: list[nn.Parameter],
        prev_prev: int,
        prev: int,
        channels: int,
        reduction: bool,
        reduction_prev: bool,
        make_op: Callable[[str, int, int], nn.Module],
    ) -> None:
        super().__init__()
        self.pre0 = (
            FactorizedReduce(prev_prev, channels, affine=False)
            if reduction_prev
            else _relu_conv_bn(prev_prev, channels, affine=False)
        )
        self.pre1 = _relu_conv_bn(prev, channels, affine=False)
        self._alphas = alphas  # owned by the supernet
        self.edges = nn.ModuleList()
        for j in range(NODES):
            for source in range(j + 2):
                stride = 2 if reduction and source < 2 else 1
                ops = nn.ModuleList()
                for name in SUPERNET_PRIMITIVES:
                    op = make_op(name, channels, stride)
                    if "pool" in name:
                        op = nn.Sequential(op, nn.BatchNorm2d(channels, affine=False))
                    ops.append(op)
                self.edges.append(ops)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        edge = 0
        for j in range(NODES):
            total = 0.0
            for source in range(j + 2):
                probs = torch.softmax(self._alphas[edge], dim=0)
                for p, name, op in zip(probs, SUPERNET_PRIMITIVES, self.edges[edge], strict=True):
                    if name != "none":  # zero contributes nothing
                        total = total + p * op(states[source])
                edge += 1
            states.append(total)
        return torch.cat(states[2:], dim=1)


class DartsNetwork(nn.Module):
    """Stem, cells (reduction at 1/3 and 2/3 of the depth), pooling and classifier."""

    def __init__(
        self,
        arch: dict[str, Any],
        num_classes: int,
        in_channels: int,
        image_size: int,
        width_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self._make_layers(arch, num_classes, in_channels, image_size, width_scale)

    def _make_layers(
        self,
        arch: dict[str, Any],
        num_classes: int,
        in_channels: int,
        image_size: int,
        width_scale: float,
    ) -> None:
        self.arch = arch
        channels = max(2, round(int(arch["channels"]) * width_scale))
        stem = STEM_MULTIPLIER * channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem, 3, 2 if image_size >= 32 else 1, 1, bias=False),
            nn.BatchNorm2d(stem),
        )
        prev_prev, prev, current = stem, stem, channels
        self.cells = nn.ModuleList()
        reduction_prev = False
        reductions = {CELLS // 3, 2 * CELLS // 3}
        for index in range(CELLS):
            reduction = index in reductions
            if reduction:
                current *= 2
            cell = self._make_cell(
                "reduce" if reduction else "normal",
                prev_prev,
                prev,
                current,
                reduction,
                reduction_prev,
            )
            self.cells.append(cell)
            reduction_prev = reduction
            prev_prev, prev = prev, NODES * current
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(prev, num_classes)

    def _pointwise_factory(self, cell_type: str, name: str) -> PointwiseFactory:
        if not name.startswith("sparse_"):
            return lambda i, o: nn.Conv2d(i, o, 1, bias=False)
        sparsity = float(self.arch[f"{cell_type}.sparsity"])
        block = parse_block(self.arch["block"])
        method = self._sparse_method()
        return lambda i, o: SparseConv2d(
            i, o, 1, bias=False, sparsity=sparsity, block=block, method=method
        )

    def _sparse_method(self) -> str:
        return "magnitude"

    def _make_op(self, cell_type: str, affine: bool) -> Callable[[str, int, int], nn.Module]:
        def make(name: str, channels: int, stride: int) -> nn.Module:
            factory = self._pointwise_factory(cell_type, name)
            return make_primitive(name, channels, stride, factory, affine)

        return make

    def _make_cell(
        self,
        cell_type: str,
        prev_prev: int,
        prev: int,
        channels: int,
        reduction: bool,
        reduction_prev: bool,
    ) -> nn.Module:
        genes = [
            tuple(self.arch[f"{cell_type}.n{j}.{part}"] for part in ("in0", "op0", "in1", "op1"))
            for j in range(NODES)
        ]
        return Cell(
            genes,
            prev_prev,
            prev,
            channels,
            reduction,
            reduction_prev,
            self._make_op(cell_type, True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = s1 = self.stem(x)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1)
        return self.classifier(torch.flatten(self.pool(s1), 1))


class DartsSupernet(Supernet, DartsNetwork):
    """The `darts-sparse` supernet: one logit vector per cell type and edge
    (`normal.n{j}.from{i}`) over "none" + the primitives; sparse primitives are DASS
    parametric sparse ops (learned scores, straight-through top-k at the cell's sparsity).
    Sparsity, block and channels are fixed."""

    def __init__(
        self, fixed: dict[str, Any], num_classes: int, in_channels: int, image_size: int
    ) -> None:
        Supernet.__init__(self)
        self._cell_alphas: dict[str, list[nn.Parameter]] = {}
        for cell_type in CELL_TYPES:
            self._cell_alphas[cell_type] = [
                self.add_choice(f"{cell_type}.n{j}.from{source}", SUPERNET_PRIMITIVES)
                for j in range(NODES)
                for source in range(j + 2)
            ]
        self._make_layers(fixed, num_classes, in_channels, image_size, 1.0)

    def _sparse_method(self) -> str:
        return "scores"

    def _make_cell(
        self,
        cell_type: str,
        prev_prev: int,
        prev: int,
        channels: int,
        reduction: bool,
        reduction_prev: bool,
    ) -> nn.Module:
        return MixedCell(
            self._cell_alphas[cell_type],
            prev_prev,
            prev,
            channels,
            reduction,
            reduction_prev,
            self._make_op(cell_type, False),
        )

    def derive(self) -> dict[str, Any]:
        """Per node the two strongest incoming edges (by their best non-"none" weight), each
        with its best non-"none" primitive, as in DARTS."""
        arch = dict(self.arch)
        for cell_type in CELL_TYPES:
            for j in range(NODES):
                best: list[tuple[float, int, str]] = []
                for source in range(j + 2):
                    probs = torch.softmax(
                        self.named_arch_parameters()[f"{cell_type}.n{j}.from{source}"].detach(),
                        dim=0,
                    )[1:]
                    k = int(torch.argmax(probs))
                    best.append((float(probs[k]), source, PRIMITIVES[k]))
                best.sort(key=lambda item: -item[0])
                (_, in0, op0), (_, in1, op1) = sorted(best[:2], key=lambda item: item[1])
                arch.update(
                    {
                        f"{cell_type}.n{j}.in0": in0,
                        f"{cell_type}.n{j}.op0": op0,
                        f"{cell_type}.n{j}.in1": in1,
                        f"{cell_type}.n{j}.op1": op1,
                    }
                )
        return arch


@register_space("darts-sparse")
class DartsSparseSpace(Space):
    """DARTS normal and reduction cells with SparseConv2d variants of the conv primitives."""

    description = (
        "DARTS cells (5 cells, 4 nodes) whose primitives include sparse separable/dilated "
        "convs (block-sparse 1x1 convs, as in DASS); per cell type a sparsity"
    )

    @property
    def choices(self) -> dict[str, tuple]:
        choices: dict[str, tuple] = {}
        for cell_type in CELL_TYPES:
            for j in range(NODES):
                sources = tuple(range(j + 2))
                choices[f"{cell_type}.n{j}.in0"] = sources
                choices[f"{cell_type}.n{j}.op0"] = PRIMITIVES
                choices[f"{cell_type}.n{j}.in1"] = sources
                choices[f"{cell_type}.n{j}.op1"] = PRIMITIVES
            choices[f"{cell_type}.sparsity"] = SPARSITIES
        choices["block"] = BLOCKS
        choices["channels"] = CHANNELS
        return choices

    def _build(
        self,
        arch: dict[str, Any],
        num_classes: int,
        in_channels: int,
        image_size: int,
        width_scale: float,
    ) -> nn.Module:
        return DartsNetwork(arch, num_classes, in_channels, image_size, width_scale)

    def dense_parent(self, arch: Mapping[str, Any]) -> dict[str, Any]:
        dense = self.validate(arch)
        for key, value in dense.items():
            if isinstance(value, str) and value.startswith("sparse_"):
                dense[key] = value.removeprefix("sparse_")
        return dense

    def supernet(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        fixed: Mapping[str, Any] | None = None,
    ) -> DartsSupernet:
        """Mixed on every edge of both cell types; sparsity, block and channels from `fixed`
        (default: each choice's first value, i.e. 8 channels)."""
        return DartsSupernet(self._fixed(fixed, {}), num_classes, in_channels, image_size)
