"""Mask methods over a whole model: which scores rank the weights and how sparsity is shared.

A method is two things: the layers' score source (`|w|`, a fixed random draw, or learned
scores; see `search_spaces.ops.LAYER_METHODS`) and an allocation of per-layer sparsities with
the same total number of kept weights as the layers' own targets:

- "layer": every layer at its own target;
- "global": one magnitude threshold over all layers, each layer keeping at least a floor
  (global magnitude pruning with a minimum threshold, Gupta et al. 2022);
- "uniform": every layer at the same sparsity; "erk": Erdos-Renyi-Kernel densities,
  proportional to (sum of the weight's dims) / (product of its dims) (Liu et al. 2022,
  "The Unreasonable Effectiveness of Random Pruning").

N:M layers keep their fixed N:M sparsity under every allocation. The masks themselves always
come from `make_mask` via each layer's `update_mask`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from search_spaces.ops import SparseConv2d, SparseLinear, sparse_layers

__all__ = [
    "ALLOCATIONS",
    "MASK_METHODS",
    "MaskMethod",
    "allocate_sparsities",
    "apply_method",
    "get_method",
    "set_masks",
]

ALLOCATIONS = ("layer", "global", "uniform", "erk")
# Share of each layer's weights that global magnitude pruning always keeps.
GLOBAL_MIN_DENSITY = 0.02

SparseLayer = SparseConv2d | SparseLinear


@dataclass(frozen=True)
class MaskMethod:
    """A mask method: the layers' score source, the sparsity allocation, and whether masks
    are pruned gradually during training (False: fixed at the final sparsity from step 0)."""

    name: str
    scores: str
    allocation: str
    gradual: bool


MASK_METHODS: dict[str, MaskMethod] = {
    m.name: m
    for m in (
        MaskMethod("magnitude", "magnitude", "layer", gradual=True),
        MaskMethod("global", "magnitude", "global", gradual=True),
        MaskMethod("random", "random", "uniform", gradual=False),
        MaskMethod("random-erk", "random", "erk", gradual=False),
        MaskMethod("scores", "scores", "layer", gradual=True),
    )
}


def get_method(name: str) -> MaskMethod:
    """The mask method registered as `name`."""
    try:
        return MASK_METHODS[name]
    except KeyError:
        known = ", ".join(MASK_METHODS)
        raise ValueError(f"unknown mask method {name!r}; use one of {known}") from None


def apply_method(model: nn.Module, method: str) -> MaskMethod:
    """Set every sparse layer's score source to `method`'s (adds learned scores if needed)."""
    spec = get_method(method)
    for _name, layer in sparse_layers(model):
        layer.set_method(spec.scores)
    return spec


def _erk_raw(layer: SparseLayer) -> float:
    shape = layer.weight.shape
    return sum(shape) / math.prod(shape)


def allocate_sparsities(
    layers: list[SparseLayer],
    targets: list[float],
    allocation: str,
    *,
    min_density: float = GLOBAL_MIN_DENSITY,
) -> list[float]:
    """Per-layer sparsities that keep as many weights in total as `targets` would.

    `targets[i]` is layer i's own sparsity (its target, or a point on a pruning schedule).
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; use one of {', '.join(ALLOCATIONS)}")
    if len(layers) != len(targets):
        raise ValueError(f"{len(layers)} layers but {len(targets)} target sparsities")
    result = list(targets)
    free = [i for i, layer in enumerate(layers) if layer.pattern != "nm"]
    if allocation == "layer" or not free:
        return result
    sizes = {i: layers[i].weight.numel() for i in free}
    budget = sum((1.0 - targets[i]) * sizes[i] for i in free)
    total = sum(sizes.values())
    if allocation == "uniform":
        densities = {i: budget / total for i in free}
    elif allocation == "erk":
        densities = _erk_densities({i: _erk_raw(layers[i]) for i in free}, sizes, budget)
    else:
        scores = {i: layers[i].mask_scores().flatten() for i in free}
        densities = _global_densities(scores, budget, min_density)
    for i in free:
        kept = min(sizes[i], max(1, round(densities[i] * sizes[i])))
        result[i] = 1.0 - kept / sizes[i]
    return result


def _erk_densities(
    raw: dict[int, float], sizes: dict[int, int], budget: float
) -> dict[int, float]:
    """Densities eps * raw[i], capped at 1, with sum(density * size) == budget."""
    dense: set[int] = set()
    while True:
        rest = budget - sum(sizes[i] for i in dense)
        scale = sum(raw[i] * sizes[i] for i in raw if i not in dense)
        eps = rest / scale if scale > 0 else 0.0
        over = {i for i in raw if i not in dense and eps * raw[i] > 1.0}
        if not over:
            return {i: 1.0 if i in dense else eps * raw[i] for i in raw}
        dense |= over


def _global_densities(
    scores: dict[int, torch.Tensor], budget: float, min_density: float
) -> dict[int, float]:
    """Keep every weight above one threshold across layers, at least a floor per layer."""
    floors = {i: max(1, math.ceil(min_density * len(s))) for i, s in scores.items()}
    ordered = {i: torch.sort(s, descending=True).values for i, s in scores.items()}

    def kept_at(threshold: float) -> dict[int, int]:
        counts = {}
        for i, values in ordered.items():
            above = int((values >= threshold).sum())
            counts[i] = min(len(values), max(floors[i], above))
        return counts

    everything = torch.cat(list(ordered.values()))
    low, high = float(everything.min()), float(everything.max())
    if sum(kept_at(high).values()) >= budget:
        best = kept_at(high)
    else:
        # kept_at falls as the threshold rises; bisect for the largest that meets the budget.
        for _ in range(60):
            mid = (low + high) / 2
            if sum(kept_at(mid).values()) >= budget:
                low = mid
            else:
                high = mid
        best = kept_at(low)
    return {i: best[i] / len(scores[i]) for i in scores}


@torch.no_grad()
def set_masks(model_or_layers: nn.Module | list[SparseLayer], allocation: str, targets=None):
    """Recompute every sparse layer's mask under `allocation` (at `targets`, default each
    layer's own target); returns the sparsities used."""
    if isinstance(model_or_layers, nn.Module):
        layers = [layer for _name, layer in sparse_layers(model_or_layers)]
    else:
        layers = list(model_or_layers)
    if targets is None:
        targets = [layer.sparsity for layer in layers]
    sparsities = allocate_sparsities(layers, list(targets), allocation)
    for layer, sparsity in zip(layers, sparsities, strict=True):
        layer.update_mask(sparsity)
    return sparsities
