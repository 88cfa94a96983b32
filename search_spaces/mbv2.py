"""`mbv2-sparse`: a small MobileNetV2-like space for 32x32 inputs with block-sparse stages.

Stem 3x3 conv (stride 2 from 32 px up), four stages of inverted residual blocks, global
average pool and a linear classifier. In a sparse stage the 1x1 expand and project convs are
SparseConv2d with the chosen block pattern; depthwise convs always stay dense.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from search_spaces.ops import SparseConv2d, SparseLinear, parse_block
from search_spaces.spaces import Space, register_space
from search_spaces.supernet import MixedKernelDepthwise, MixedSparsityConv2d, Supernet

__all__ = ["MBV2SparseSpace", "MBV2Supernet", "MobileNetV2Sparse"]

STEM_CHANNELS = 16
# (base output channels, blocks, stride of the first block) per stage.
STAGES = ((16, 1, 1), (24, 2, 2), (32, 2, 2), (64, 1, 2))
CHANNEL_MULTIPLE = 8

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
BLOCKS = ("4x1", "16x1", "1x4")
EXPANSIONS = (2, 4, 6)
KERNELS = (3, 5)
WIDTHS = (0.5, 0.75, 1.0)
CLASSIFIER_SPARSITIES = (0.0, 0.5, 0.7, 0.9)
# Along the inputs, which are a multiple of 8 here, so the classifier's blocks are never ragged.
CLASSIFIER_BLOCK = (1, 4)
# The supernet's candidates for a stage's op: dense, or sparse at each declared sparsity.
OP_CANDIDATES = ("dense",) + tuple(f"sparse@{s:g}" for s in SPARSITIES)


def _round_channels(channels: float, multiple: int = CHANNEL_MULTIPLE) -> int:
    """Round to the nearest multiple of `multiple` (at least one multiple)."""
    return max(multiple, int(channels / multiple + 0.5) * multiple)


class InvertedResidual(nn.Module):
    """1x1 expand -> kxk depthwise -> 1x1 project, with a skip when shapes allow.

    `pointwise(in, out)` and `depthwise(channels, stride)` make the convs, so the discrete
    network and the supernet share this block.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        hidden: int,
        pointwise: Callable[[int, int], nn.Module],
        depthwise: Callable[[int, int], nn.Module],
    ) -> None:
        super().__init__()
        self.use_skip = stride == 1 and in_ch == out_ch
        self.expand = nn.Sequential(pointwise(in_ch, hidden), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(
            depthwise(hidden, stride), nn.BatchNorm2d(hidden), nn.ReLU6()
        )
        self.project = nn.Sequential(pointwise(hidden, out_ch), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.use_skip else y


class MobileNetV2Sparse(nn.Module):
    """The network one `mbv2-sparse` arch describes.

    With `width_scale != 1` every channel count is scaled and rounded to a multiple of 4
    (finer than the usual 8, so that the baselines can match a parameter or MAC budget).
    Subclasses change the convs through `_pointwise` and `_depthwise`.
    """

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
        multiple = CHANNEL_MULTIPLE if width_scale == 1.0 else 4
        stem_ch = _round_channels(STEM_CHANNELS * width_scale, multiple)
        stem_stride = 2 if image_size >= 32 else 1
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, stem_ch, 3, stem_stride, 1, bias=False),
            nn.BatchNorm2d(stem_ch),
            nn.ReLU6(),
        )
        stages = []
        in_ch = stem_ch
        for index, (base, depth, stride) in enumerate(STAGES, start=1):
            key = f"s{index}"
            out_ch = _round_channels(base * arch[f"{key}.width"] * width_scale, multiple)
            blocks = []
            for j in range(depth):
                blocks.append(
                    InvertedResidual(
                        in_ch,
                        out_ch,
                        stride if j == 0 else 1,
                        in_ch * int(arch[f"{key}.expand"]),
                        lambda i, o, key=key: self._pointwise(key, i, o),
                        lambda c, st, key=key: self._depthwise(key, c, st),
                    )
                )
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        head_sparsity = float(arch["classifier.sparsity"])
        if head_sparsity > 0.0:
            self.classifier: nn.Linear = SparseLinear(
                in_ch, num_classes, sparsity=head_sparsity, block=CLASSIFIER_BLOCK
            )
        else:
            self.classifier = nn.Linear(in_ch, num_classes)

    def _pointwise(self, stage: str, in_ch: int, out_ch: int) -> nn.Module:
        if self.arch[f"{stage}.op"] == "dense":
            return nn.Conv2d(in_ch, out_ch, 1, bias=False)
        sparsity = float(self.arch[f"{stage}.sparsity"])
        block = parse_block(self.arch[f"{stage}.block"])
        return SparseConv2d(in_ch, out_ch, 1, bias=False, sparsity=sparsity, block=block)

    def _depthwise(self, stage: str, channels: int, stride: int) -> nn.Module:
        kernel = int(self.arch[f"{stage}.kernel"])
        return nn.Conv2d(
            channels, channels, kernel, stride, kernel // 2, groups=channels, bias=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.classifier(torch.flatten(x, 1))


class MBV2Supernet(Supernet, MobileNetV2Sparse):
    """`mbv2-sparse` supernet: per stage, op x sparsity ({dense, sparse@s...}, one shared
    weight with learned scores) and kernel are mixed; expansion, width, block and the
    classifier are fixed."""

    def __init__(
        self, fixed: dict[str, Any], num_classes: int, in_channels: int, image_size: int
    ) -> None:
        Supernet.__init__(self)
        self._alpha_of: dict[str, nn.Parameter] = {}
        for index in range(1, len(STAGES) + 1):
            key = f"s{index}"
            self._alpha_of[f"{key}.op"] = self.add_choice(f"{key}.op", OP_CANDIDATES)
            self._alpha_of[f"{key}.kernel"] = self.add_choice(f"{key}.kernel", KERNELS)
        self._make_layers(fixed, num_classes, in_channels, image_size, 1.0)

    def _pointwise(self, stage: str, in_ch: int, out_ch: int) -> nn.Module:
        sparsities = [0.0 if c == "dense" else float(c.split("@")[1]) for c in OP_CANDIDATES]
        return MixedSparsityConv2d(
            in_ch,
            out_ch,
            1,
            self._alpha_of[f"{stage}.op"],
            sparsities,
            block=parse_block(self.arch[f"{stage}.block"]),
        )

    def _depthwise(self, stage: str, channels: int, stride: int) -> nn.Module:
        return MixedKernelDepthwise(channels, KERNELS, self._alpha_of[f"{stage}.kernel"], stride)

    def derive(self) -> dict[str, Any]:
        arch = dict(self.arch)
        for index in range(1, len(STAGES) + 1):
            key = f"s{index}"
            op = self.best(f"{key}.op")
            if op == "dense":
                arch[f"{key}.op"] = "dense"
            else:
                arch[f"{key}.op"] = "sparse"
                arch[f"{key}.sparsity"] = float(op.split("@")[1])
            arch[f"{key}.kernel"] = self.best(f"{key}.kernel")
        return arch


@register_space("mbv2-sparse")
class MBV2SparseSpace(Space):
    """Four MobileNetV2 stages, each dense or block-sparse, plus a (sparse) classifier."""

    description = (
        "MobileNetV2-like net for 32x32 images; per stage dense or block-sparse 1x1 convs "
        "(depthwise stays dense), expansion, kernel and width; sparse classifier (0 = dense)"
    )

    @property
    def choices(self) -> dict[str, tuple]:
        choices: dict[str, tuple] = {}
        for index in range(1, len(STAGES) + 1):
            choices[f"s{index}.op"] = ("dense", "sparse")
            choices[f"s{index}.sparsity"] = SPARSITIES
            choices[f"s{index}.block"] = BLOCKS
            choices[f"s{index}.expand"] = EXPANSIONS
            choices[f"s{index}.kernel"] = KERNELS
            choices[f"s{index}.width"] = WIDTHS
        choices["classifier.sparsity"] = CLASSIFIER_SPARSITIES
        return choices

    def _build(
        self,
        arch: dict[str, Any],
        num_classes: int,
        in_channels: int,
        image_size: int,
        width_scale: float,
    ) -> nn.Module:
        return MobileNetV2Sparse(arch, num_classes, in_channels, image_size, width_scale)

    def dense_parent(self, arch: Mapping[str, Any]) -> dict[str, Any]:
        dense = self.validate(arch)
        for key in dense:
            if key.endswith(".op"):
                dense[key] = "dense"
        dense["classifier.sparsity"] = 0.0
        return dense

    def supernet(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        fixed: Mapping[str, Any] | None = None,
    ) -> MBV2Supernet:
        """Mixed per stage: op x sparsity and kernel; the rest from `fixed` (default: the
        first value of each choice, i.e. the smallest net)."""
        arch = self._fixed(fixed, {})
        return MBV2Supernet(arch, num_classes, in_channels, image_size)
