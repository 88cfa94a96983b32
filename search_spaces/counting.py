"""Size figures of a model: its parameters, its nonzero entries and the multiply-adds on them,
counted one of two ways (`count`): by the values a trained model holds, or by what its masks
keep whatever the values (the budget that baselines are matched on)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = ["COUNT_MODES", "CountMode", "ModelCounts", "count_model"]

CountMode = Literal["nonzero", "kept"]
COUNT_MODES: tuple[CountMode, ...] = ("nonzero", "kept")


@dataclass(frozen=True)
class ModelCounts:
    """`params`: every parameter entry; `nnz`: the entries counted (see `count_model`); `macs`:
    the multiply-adds of one forward pass of the example input that use a counted weight."""

    params: int
    nnz: int
    macs: int


def _counted_weights(module: nn.Module, count: CountMode) -> int:
    """Entries of `module.weight` that count: nonzero after its mask ("nonzero"), or kept by its
    mask, all of an unmasked weight ("kept")."""
    mask = getattr(module, "mask", None)
    if count == "kept":
        return module.weight.numel() if mask is None else int(mask.count_nonzero())
    weight = module.weight if mask is None else module.weight * mask
    return int(weight.count_nonzero())


def _nonzero_parameters(model: nn.Module) -> int:
    """Nonzero entries of every parameter (biases, norms and mask scores included), each masked
    weight taken through its mask."""
    total = 0
    for name, param in model.named_parameters():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if attr == "weight" and getattr(module, "mask", None) is not None:
            total += _counted_weights(module, "nonzero")
        else:
            total += int(param.count_nonzero())
    return total


@torch.no_grad()
def count_model(model: nn.Module, example_input: torch.Tensor, *, count: CountMode) -> ModelCounts:
    """Parameters, counted entries and MACs of `model` on `example_input` (run once in eval
    mode; the model's training mode is restored).

    count="nonzero" (a trained candidate's trial attrs): `nnz` is every nonzero parameter entry,
    biases and norms included, weights through their masks; a MAC counts if its weight is
    nonzero. count="kept" (baselines' budgets): `nnz` is the conv and linear weight entries that
    their masks keep (all of a dense layer's), whatever their values; a MAC counts if its weight
    is kept.
    """
    if count not in COUNT_MODES:
        raise ValueError(f"unknown count {count!r}; use one of {', '.join(COUNT_MODES)}")
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    macs = 0

    def add_macs(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        nonlocal macs
        # Every output element of one output channel uses that channel's weights once.
        macs += _counted_weights(module, count) * (output.numel() // output.shape[1])

    hooks = [layer.register_forward_hook(add_macs) for layer in layers]
    was_training = model.training
    try:
        model.eval()(example_input)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if count == "kept":
        nnz = sum(_counted_weights(layer, count) for layer in layers)
    else:
        nnz = _nonzero_parameters(model)
    return ModelCounts(sum(p.numel() for p in model.parameters()), nnz, macs)
