"""`mbv2-sparse`: a small MobileNetV2-like space for 32x32 inputs with block-sparse stages.

Stem 3x3 conv (stride 2 from 32 px up), four stages of inverted residual blocks, global
average pool and a linear classifier. In a sparse stage the 1x1 expand and project convs are
SparseConv2d with the chosen block pattern; depthwise convs always stay dense.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from search_spaces.ops import SparseConv2d, SparseLinear, parse_block
from search_spaces.spaces import Space, register_space

__all__ = ["MobileNetV2Sparse", "MBV2SparseSpace"]

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


def _round_channels(channels: float) -> int:
    """Round to the nearest multiple of CHANNEL_MULTIPLE (at least one multiple)."""
    return max(CHANNEL_MULTIPLE, int(channels / CHANNEL_MULTIPLE + 0.5) * CHANNEL_MULTIPLE)


def _pointwise(in_ch: int, out_ch: int, sparse: tuple[float, tuple[int, int]] | None) -> nn.Conv2d:
    if sparse is None:
        return nn.Conv2d(in_ch, out_ch, 1, bias=False)
    sparsity, block = sparse
    return SparseConv2d(in_ch, out_ch, 1, bias=False, sparsity=sparsity, block=block)


class InvertedResidual(nn.Module):
    """1x1 expand -> kxk depthwise -> 1x1 project, with a skip when shapes allow."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        expansion: int,
        kernel: int,
        sparse: tuple[float, tuple[int, int]] | None,
    ) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.use_skip = stride == 1 and in_ch == out_ch
        self.expand = nn.Sequential(
            _pointwise(in_ch, hidden, sparse), nn.BatchNorm2d(hidden), nn.ReLU6()
        )
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
        )
        self.project = nn.Sequential(_pointwise(hidden, out_ch, sparse), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.use_skip else y


class MobileNetV2Sparse(nn.Module):
    """The network one `mbv2-sparse` arch describes."""

    def __init__(
        self, arch: dict[str, Any], num_classes: int, in_channels: int, image_size: int
    ) -> None:
        super().__init__()
        stem_stride = 2 if image_size >= 32 else 1
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, STEM_CHANNELS, 3, stem_stride, 1, bias=False),
            nn.BatchNorm2d(STEM_CHANNELS),
            nn.ReLU6(),
        )
        stages = []
        in_ch = STEM_CHANNELS
        for index, (base, depth, stride) in enumerate(STAGES, start=1):
            key = f"s{index}"
            out_ch = _round_channels(base * arch[f"{key}.width"])
            sparse = None
            if arch[f"{key}.op"] == "sparse":
                sparse = (float(arch[f"{key}.sparsity"]), parse_block(arch[f"{key}.block"]))
            blocks = []
            for j in range(depth):
                blocks.append(
                    InvertedResidual(
                        in_ch,
                        out_ch,
                        stride if j == 0 else 1,
                        int(arch[f"{key}.expand"]),
                        int(arch[f"{key}.kernel"]),
                        sparse,
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.classifier(torch.flatten(x, 1))


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
        self, arch: dict[str, Any], num_classes: int, in_channels: int, image_size: int
    ) -> nn.Module:
        return MobileNetV2Sparse(arch, num_classes, in_channels, image_size)
