"""`sparse-ift`: iso-FLOP sparse widening (Sparse Wide, Thangarasa et al. 2023) of mbv2.

The base is an `mbv2-sparse` network with every stage at one width, expansion and kernel.
At sparsity s every stage's 1x1 convs are block-sparse and every channel count grows by
k = 1 / sqrt(1 - s): a 1x1 conv whose inputs and outputs both grow by k does k^2 (1 - s) = 1
times the base's multiply-adds, so the pointwise convs stay at the dense base's FLOPs while the
network gets wider (the dense depthwise convs, stem and classifier grow by k).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from search_spaces.mbv2 import BLOCKS, EXPANSIONS, KERNELS, STAGES, WIDTHS, MobileNetV2Sparse
from search_spaces.spaces import Space, register_space

__all__ = ["SparseIFTSpace", "ift_width_factor"]

IFT_SPARSITIES = (0.0, 0.5, 0.75, 0.9)


def ift_width_factor(sparsity: float) -> float:
    """Width multiplier that keeps a sparse 1x1 conv at its dense FLOPs: 1 / sqrt(1 - s)."""
    return 1.0 / math.sqrt(1.0 - sparsity)


@register_space("sparse-ift")
class SparseIFTSpace(Space):
    """mbv2 widened at iso-FLOPs as its 1x1 convs get sparser (sparsity 0 = the dense base)."""

    description = (
        "Sparse-IFT wide mbv2: block-sparse 1x1 convs, every channel count x 1/sqrt(1-s) "
        "so the 1x1 convs keep the dense base's FLOPs"
    )

    @property
    def choices(self) -> dict[str, tuple]:
        return {
            "sparsity": IFT_SPARSITIES,
            "block": BLOCKS,
            "expand": EXPANSIONS,
            "kernel": KERNELS,
            "width": WIDTHS,
        }

    def mbv2_arch(self, arch: Mapping[str, Any]) -> dict[str, Any]:
        """The `mbv2-sparse` arch of the (unwidened) base network."""
        sparse = float(arch["sparsity"]) > 0.0
        base: dict[str, Any] = {}
        for index in range(1, len(STAGES) + 1):
            key = f"s{index}"
            base[f"{key}.op"] = "sparse" if sparse else "dense"
            base[f"{key}.sparsity"] = float(arch["sparsity"]) if sparse else 0.5
            base[f"{key}.block"] = arch["block"]
            base[f"{key}.expand"] = arch["expand"]
            base[f"{key}.kernel"] = arch["kernel"]
            base[f"{key}.width"] = arch["width"]
        base["classifier.sparsity"] = 0.0
        return base

    def _build(
        self,
        arch: dict[str, Any],
        num_classes: int,
        in_channels: int,
        image_size: int,
        width_scale: float,
    ) -> nn.Module:
        scale = width_scale * ift_width_factor(float(arch["sparsity"]))
        return MobileNetV2Sparse(
            self.mbv2_arch(arch), num_classes, in_channels, image_size, width_scale=scale
        )

    def dense_parent(self, arch: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.validate(arch), sparsity=0.0)
