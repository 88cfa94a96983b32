"""Baselines for a sparse candidate, built from its arch so the trial loop can evaluate them.

- "dense": the dense parent (every sparse choice made dense);
- "dense-then-prune": the candidate trained dense, then pruned gradually by global magnitude
  to the same total nonzero count (train it with `method="global"`);
- "random" / "random-erk": a random mask at the same total nonzero count, uniform or ERK layer
  ratios, fixed from the start (`method="random"` / `"random-erk"`);
- "small-dense": the dense parent narrowed until its nonzero weights match the candidate's;
- "sparse-ift": the candidate widened until its sparse MACs match the dense parent's
  (Sparse-IFT's iso-FLOP widening).

Each comes back as a `Baseline`: the model, the mask method to hand to `nas.train.train_model`,
the width scale used and the model's nonzero weights and MACs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from search_spaces.counting import count_model
from search_spaces.spaces import Space

__all__ = ["BASELINES", "Baseline", "build_baseline"]

BASELINES = ("dense", "dense-then-prune", "random", "random-erk", "small-dense", "sparse-ift")
# Width scales tried when matching a budget: a geometric grid, refined by bisection.
_SEARCH_STEPS = 14
_MIN_SCALE, _MAX_SCALE = 0.1, 8.0


@dataclass
class Baseline:
    """One baseline of an arch: its model, the mask method to train it with (None = the
    layers' own), the width scale applied, and its kept weights and MACs per image
    (`count_model(..., count="kept")`)."""

    kind: str
    arch: dict[str, Any]
    model: nn.Module
    method: str | None
    width_scale: float
    nnz: int
    macs: int


def _match_width(
    build: Callable[[float], nn.Module], measure: Callable[[nn.Module], int], target: int
) -> tuple[float, nn.Module]:
    """The width scale (and its model) whose measure is closest to `target`; the measure is
    taken to grow with the scale."""
    low, high = _MIN_SCALE, _MAX_SCALE
    best: tuple[float, float, nn.Module] | None = None
    for _ in range(_SEARCH_STEPS):
        scale = math.sqrt(low * high)
        model = build(scale)
        value = measure(model)
        error = abs(math.log(max(value, 1) / target))
        if best is None or error < best[0]:
            best = (error, scale, model)
        if value < target:
            low = scale
        elif value > target:
            high = scale
        else:
            break
    assert best is not None
    return best[1], best[2]


def build_baseline(
    space: Space,
    arch: Mapping[str, Any],
    kind: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
) -> Baseline:
    """The `kind` baseline (one of `BASELINES`) of `arch` in `space`, ready to train."""
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; use one of {', '.join(BASELINES)}")
    arch = space.validate(arch)
    shape = (num_classes, in_channels, image_size)

    image = torch.zeros(1, in_channels, image_size, image_size)

    def stats(model: nn.Module) -> tuple[int, int]:
        counts = count_model(model, image, count="kept")
        return counts.nnz, counts.macs

    def make(kind_arch: dict, model: nn.Module, method: str | None, scale: float) -> Baseline:
        nnz, macs = stats(model)
        return Baseline(kind, kind_arch, model, method, scale, nnz, macs)

    if kind in ("dense-then-prune", "random", "random-erk"):
        method = "global" if kind == "dense-then-prune" else kind
        return make(arch, space.build(arch, *shape), method, 1.0)
    parent = space.dense_parent(arch)
    if kind == "dense":
        return make(parent, space.build(parent, *shape), None, 1.0)
    if kind == "small-dense":
        target, _ = stats(space.build(arch, *shape))
        scale, model = _match_width(
            lambda s: space.build(parent, *shape, width_scale=s),
            lambda m: stats(m)[0],
            target,
        )
        return make(parent, model, None, scale)
    _, target = stats(space.build(parent, *shape))
    scale, model = _match_width(
        lambda s: space.build(arch, *shape, width_scale=s), lambda m: stats(m)[1], target
    )
    return make(arch, model, None, scale)
