"""`tiny-sparse`: a net of three layers that trains and compiles in seconds.

For quick checks of a device or a set-up (and the test suite): a strided 3x3 stem, one 1x1
conv that is dense or block-sparse, global average pool and a (sparse) classifier.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from search_spaces.ops import SparseConv2d, SparseLinear, parse_block
from search_spaces.spaces import Space, register_space

__all__ = ["TinySparseSpace"]


@register_space("tiny-sparse")
class TinySparseSpace(Space):
    """Stem, one dense or block-sparse 1x1 conv, pool, classifier."""

    description = "three-layer net for quick checks: one dense or block-sparse 1x1 conv"

    @property
    def choices(self) -> dict[str, tuple]:
        return {
            "width": (8, 16, 32),
            "op": ("dense", "sparse"),
            "sparsity": (0.5, 0.75, 0.9),
            "block": ("4x1", "1x4"),
            "classifier.sparsity": (0.0, 0.5),
        }

    def _build(
        self,
        arch: dict[str, Any],
        num_classes: int,
        in_channels: int,
        image_size: int,
        width_scale: float = 1.0,
    ) -> nn.Module:
        width = max(4, round(arch["width"] * width_scale))
        if arch["op"] == "sparse":
            conv = SparseConv2d(
                width,
                2 * width,
                1,
                sparsity=arch["sparsity"],
                pattern="block",
                block=parse_block(arch["block"]),
            )
        else:
            conv = nn.Conv2d(width, 2 * width, 1)
        if arch["classifier.sparsity"] > 0:
            head = SparseLinear(
                2 * width,
                num_classes,
                sparsity=arch["classifier.sparsity"],
                pattern="block",
                block=(1, 4),
            )
        else:
            head = nn.Linear(2 * width, num_classes)
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1),
            nn.ReLU(),
            conv,
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            head,
        )

    def dense_parent(self, arch: dict[str, Any]) -> dict[str, Any]:
        return {**self.validate(arch), "op": "dense", "classifier.sparsity": 0.0}
