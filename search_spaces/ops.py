"""Sparse layers (SparseConv2d, SparseLinear) and the mask logic behind every sparsity pattern.

All masks come from one pure function, `make_mask`, over the weight's matrix view
`weight.reshape(out, -1)` (rows = output channels, cols = inputs); the mask methods differ only
in the scores they hand it: `|w|` (magnitude), a fixed random draw (random), or learned scores
behind a straight-through top-k (the parametric op of DASS, scores as in HYDRA).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LAYER_METHODS",
    "PATTERNS",
    "SPARSE_LAYERS",
    "SparseConv2d",
    "SparseLinear",
    "check_sparsity",
    "make_mask",
    "parse_block",
    "score_mask",
    "sparse_layers",
]

PATTERNS = ("unstructured", "block", "nm", "channel")
# Where a layer's mask scores come from: |weight|, a fixed random draw, or learned scores.
LAYER_METHODS = ("magnitude", "random", "scores")


def parse_block(block: tuple[int, int] | list[int] | str) -> tuple[int, int]:
    """Return a block shape `(rows, cols)` from a tuple or a string such as "4x1"."""
    if isinstance(block, str):
        parts = block.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"bad block {block!r}; write it as ROWSxCOLS, e.g. '4x1'")
        rows, cols = (int(p) for p in parts)
    else:
        try:
            rows, cols = (int(v) for v in block)
        except (TypeError, ValueError):
            raise ValueError(f"bad block {block!r}; give (rows, cols), e.g. (4, 1)") from None
    if rows < 1 or cols < 1:
        raise ValueError(f"bad block {block!r}; both sides must be >= 1")
    return rows, cols


def check_sparsity(
    sparsity: float | None,
    pattern: str,
    block: tuple[int, int] | str | None,
    nm: tuple[int, int] | None,
) -> tuple[float, tuple[int, int] | None, tuple[int, int] | None]:
    """Validate a sparsity configuration; return `(sparsity, block, nm)` normalised.

    For `nm` the sparsity may be None (it is then 1 - n/m); if given it must equal 1 - n/m.
    """
    if pattern not in PATTERNS:
        raise ValueError(f"unknown sparsity pattern {pattern!r}; use one of {', '.join(PATTERNS)}")
    if pattern == "nm":
        if nm is None:
            raise ValueError("pattern 'nm' needs nm=(n, m), e.g. nm=(2, 4)")
        try:
            n, m = (int(v) for v in nm)
        except (TypeError, ValueError):
            raise ValueError(f"bad nm {nm!r}; give (n, m), e.g. (2, 4)") from None
        if not 1 <= n <= m:
            raise ValueError(f"bad nm {nm!r}; need 1 <= n <= m, e.g. (2, 4)")
        implied = 1.0 - n / m
        if sparsity is None:
            sparsity = implied
        elif abs(float(sparsity) - implied) > 1e-6:
            raise ValueError(
                f"sparsity {sparsity} contradicts nm={n}:{m} (which means {implied:g}); "
                "leave sparsity out or set it to 1 - n/m"
            )
        return implied, None, (n, m)
    if sparsity is None:
        raise ValueError(f"pattern {pattern!r} needs a sparsity in [0, 1), e.g. sparsity=0.8")
    sparsity = float(sparsity)
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} is out of range; use a value in [0, 1)")
    if pattern == "block":
        if block is None:
            raise ValueError("pattern 'block' needs block=(rows, cols), e.g. (4, 1)")
        return sparsity, parse_block(block), None
    return sparsity, None, None


def make_mask(
    weight2d: torch.Tensor,
    sparsity: float,
    pattern: str,
    block: tuple[int, int] | str | None = None,
    nm: tuple[int, int] | None = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return a 0/1 mask shaped like `weight2d` that keeps the highest-scoring units.

    A unit is an element, a block (score = sum, i.e. the L1 norm of the block by default),
    a whole output channel (row), or, for N:M, the best inputs of each group of M consecutive
    inputs in a row. `scores` defaults to `|weight2d|`. For `nm`, a sparsity below 1 - n/m
    keeps more per group (used by gradual pruning); the kept count never drops below n.
    """
    if weight2d.dim() != 2:
        raise ValueError(f"make_mask needs a 2-D weight view, got shape {tuple(weight2d.shape)}")
    if scores is None:
        scores = weight2d.detach().abs()
    elif scores.shape != weight2d.shape:
        raise ValueError(
            f"scores shape {tuple(scores.shape)} differs from weight {tuple(weight2d.shape)}"
        )
    scores = scores.detach().to(torch.float32)
    if pattern == "nm":
        if nm is None:
            raise ValueError("pattern 'nm' needs nm=(n, m), e.g. nm=(2, 4)")
        mask = _nm_mask(scores, sparsity, int(nm[0]), int(nm[1]))
    elif pattern == "unstructured":
        mask = _block_mask(scores, sparsity, (1, 1))
    elif pattern == "channel":
        mask = _block_mask(scores, sparsity, (1, scores.shape[1]))
    elif pattern == "block":
        if block is None:
            raise ValueError("pattern 'block' needs block=(rows, cols), e.g. (4, 1)")
        mask = _block_mask(scores, sparsity, parse_block(block))
    else:
        raise ValueError(f"unknown sparsity pattern {pattern!r}; use one of {', '.join(PATTERNS)}")
    return mask.to(dtype=weight2d.dtype if weight2d.is_floating_point() else torch.float32)


def _block_mask(scores: torch.Tensor, sparsity: float, block: tuple[int, int]) -> torch.Tensor:
    """Keep whole `block`-shaped tiles (ragged edge tiles included) by summed score.

    Tiles are taken best first; the number taken is the one whose element count lies closest
    to the target, so the density is within half a tile of it (at least one tile is kept).
    """
    rows, cols = scores.shape
    br, bc = block
    pad_r, pad_c = -rows % br, -cols % bc
    grid_r, grid_c = (rows + pad_r) // br, (cols + pad_c) // bc
    padded = F.pad(scores, (0, pad_c, 0, pad_r))
    tile_scores = padded.reshape(grid_r, br, grid_c, bc).sum(dim=(1, 3)).flatten()
    ones = F.pad(torch.ones_like(scores), (0, pad_c, 0, pad_r))
    tile_sizes = ones.reshape(grid_r, br, grid_c, bc).sum(dim=(1, 3)).flatten()

    order = torch.argsort(tile_scores, descending=True, stable=True)
    kept_elements = torch.cumsum(tile_sizes[order], dim=0)
    target = (1.0 - sparsity) * rows * cols
    n_tiles = int(torch.argmin((kept_elements - target).abs())) + 1

    tile_mask = torch.zeros(grid_r * grid_c, dtype=torch.float32, device=scores.device)
    tile_mask[order[:n_tiles]] = 1.0
    full = tile_mask.reshape(grid_r, 1, grid_c, 1).expand(grid_r, br, grid_c, bc)
    return full.reshape(grid_r * br, grid_c * bc)[:rows, :cols].contiguous()


def _nm_mask(scores: torch.Tensor, sparsity: float, n: int, m: int) -> torch.Tensor:
    """Keep the best `k` of every `m` consecutive inputs, k = clamp(round((1-s)*m), n, m).

    A ragged tail group of length L keeps ceil(k * L / m).
    """
    rows, cols = scores.shape
    keep = min(m, max(n, math.floor((1.0 - sparsity) * m + 0.5)))
    groups = -(-cols // m)
    pad = groups * m - cols
    padded = F.pad(scores, (0, pad), value=float("-inf")).reshape(rows, groups, m)
    order = torch.argsort(padded, dim=2, descending=True, stable=True)
    rank = torch.argsort(order, dim=2, stable=True)
    keep_per_group = torch.full((groups,), keep, dtype=torch.long, device=scores.device)
    tail = cols - (groups - 1) * m
    keep_per_group[-1] = math.ceil(keep * tail / m)
    mask = (rank < keep_per_group.view(1, groups, 1)).to(torch.float32)
    return mask.reshape(rows, groups * m)[:, :cols].contiguous()


class _StraightThroughMask(torch.autograd.Function):
    """Top-k mask of the scores in the forward pass; the identity in the backward pass."""

    @staticmethod
    def forward(ctx, scores, sparsity, pattern, block, nm):  # noqa: ARG004
        return make_mask(scores, sparsity, pattern, block, nm, scores=scores.detach().abs())

    @staticmethod
    def backward(ctx, grad):  # noqa: ARG004
        return grad, None, None, None, None


def score_mask(
    scores2d: torch.Tensor,
    sparsity: float,
    pattern: str,
    block: tuple[int, int] | None = None,
    nm: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The `make_mask` of `|scores2d|`, differentiable w.r.t. the scores (straight-through).

    This is HYDRA's top-k with DASS's sparsity as an argument: the loss gradient w.r.t. the
    mask flows unchanged to the scores, so a layer learns which units to keep.
    """
    if sparsity <= 0.0:
        return torch.ones_like(scores2d) + 0.0 * scores2d
    return _StraightThroughMask.apply(scores2d, float(sparsity), pattern, block, nm)


class _SparseMixin:
    """Mask state and methods shared by SparseConv2d and SparseLinear."""

    weight: torch.Tensor
    mask: torch.Tensor

    def _setup_sparsity(
        self,
        sparsity: float | None,
        pattern: str,
        block: tuple[int, int] | str | None,
        nm: tuple[int, int] | None,
        method: str = "magnitude",
    ) -> None:
        self.sparsity, self.block, self.nm = check_sparsity(sparsity, pattern, block, nm)
        self.pattern = pattern
        # The sparsity the mask is at now (below `sparsity` while pruning gradually).
        self.current_sparsity = self.sparsity
        # Multiplier of pruned weights in training (0 = masked; > 0 lets gradient reach them,
        # decayed to 0 by the trainer for Progressive Gradient Flow).
        self.pruned_scale = 0.0
        self.method = "magnitude"
        self.scores: nn.Parameter | None = None
        self.register_buffer("mask", torch.ones_like(self.weight, dtype=torch.float32))
        self.set_method(method)

    def set_method(self, method: str) -> None:
        """Choose where mask scores come from (`LAYER_METHODS`) and recompute the mask.

        "scores" adds a learned parameter `scores` initialised to `|weight|` (so the first
        mask is the magnitude mask); "random" draws fixed scores from torch's global RNG.
        """
        if method not in LAYER_METHODS:
            known = ", ".join(LAYER_METHODS)
            raise ValueError(f"unknown mask method {method!r} for a layer; use one of {known}")
        self.method = method
        if method == "scores" and self.scores is None:
            self.scores = nn.Parameter(self.weight.detach().abs().clone())
        if method == "random":
            self.register_buffer("random_scores", torch.rand_like(self.weight), persistent=False)
        self.update_mask(self.current_sparsity)

    def mask_scores(self) -> torch.Tensor:
        """The scores `make_mask` ranks for this layer's method, detached."""
        if self.method == "scores":
            return self.scores.detach().abs()
        if self.method == "random":
            return self.random_scores
        return self.weight.detach().abs()

    def masked_weight(self) -> torch.Tensor:
        """The weight with pruned entries zeroed; what the forward pass uses.

        In training a "scores" layer recomputes its mask from the scores (straight-through,
        so gradients reach them) and stores it; in eval the stored mask is used as is.
        """
        mask = self.mask
        if self.training and self.method == "scores":
            out = self.weight.shape[0]
            live = score_mask(
                self.scores.reshape(out, -1),
                self.current_sparsity,
                self.pattern,
                self.block,
                self.nm,
            ).reshape(self.weight.shape)
            with torch.no_grad():
                self.mask.copy_(live)
            mask = live
        if self.training and self.pruned_scale > 0.0:
            mask = mask + self.pruned_scale * (1.0 - mask.detach())
        return self.weight * mask

    def density(self) -> float:
        """Fraction of weights the mask keeps."""
        return float(self.mask.mean())

    @torch.no_grad()
    def update_mask(self, sparsity: float | None = None, scores: torch.Tensor | None = None):
        """Recompute the mask at `sparsity` (default: the target) from `scores` (default: the
        layer method's scores, `|weight|` for magnitude)."""
        if sparsity is None:
            sparsity = self.sparsity
        elif not 0.0 <= float(sparsity) < 1.0:
            raise ValueError(f"sparsity {sparsity} is out of range; use a value in [0, 1)")
        self.current_sparsity = float(sparsity)
        out = self.weight.shape[0]
        weight2d = self.weight.reshape(out, -1)
        if scores is None:
            scores = self.mask_scores()
        scores = scores.reshape(out, -1)
        mask = make_mask(weight2d, float(sparsity), self.pattern, self.block, self.nm, scores)
        self.mask.copy_(mask.reshape(self.mask.shape))

    def sparsity_repr(self) -> str:
        """Short text of the sparsity configuration, for `extra_repr`."""
        text = f"sparsity={self.sparsity:g}, pattern={self.pattern}"
        if self.block is not None:
            text += f", block={self.block[0]}x{self.block[1]}"
        if self.nm is not None:
            text += f", nm={self.nm[0]}:{self.nm[1]}"
        if self.method != "magnitude":
            text += f", method={self.method}"
        return text


class SparseLinear(_SparseMixin, nn.Linear):
    """nn.Linear whose weight is multiplied by a 0/1 mask of a given sparsity pattern."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        sparsity: float | None = None,
        pattern: str = "block",
        block: tuple[int, int] | str | None = (4, 1),
        nm: tuple[int, int] | None = None,
        method: str = "magnitude",
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._setup_sparsity(sparsity, pattern, block, nm, method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self.sparsity_repr()}"


class SparseConv2d(_SparseMixin, nn.Conv2d):
    """nn.Conv2d whose weight is multiplied by a 0/1 mask of a given sparsity pattern."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        groups: int = 1,
        bias: bool = True,
        *,
        sparsity: float | None = None,
        pattern: str = "block",
        block: tuple[int, int] | str | None = (4, 1),
        nm: tuple[int, int] | None = None,
        method: str = "magnitude",
    ) -> None:
        nn.Conv2d.__init__(
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            groups=groups,
            bias=bias,
        )
        self._setup_sparsity(sparsity, pattern, block, nm, method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self.sparsity_repr()}"


SPARSE_LAYERS = (SparseConv2d, SparseLinear)


def sparse_layers(model: nn.Module) -> list[tuple[str, SparseConv2d | SparseLinear]]:
    """Every sparse layer of `model` with its qualified name, in module order."""
    return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, SPARSE_LAYERS)]
