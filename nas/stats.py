"""Size figures of a candidate: parameters, nonzero weights and nonzero multiply-adds."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelStats:
    params: int
    nnz: int
    macs: int


def _effective_weight(module: nn.Module) -> torch.Tensor:
    mask = getattr(module, "mask", None)
    return module.weight if mask is None else module.weight * mask


def model_stats(model: nn.Module, example_input: torch.Tensor) -> ModelStats:
    """Counts parameters, nonzero parameters, and the multiply-adds that touch a nonzero weight."""
    params = sum(p.numel() for p in model.parameters())
    nnz = 0
    macs = 0
    hooks = []
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):

            def count(mod, _inputs, output):
                nonlocal macs
                weight_nnz = int((_effective_weight(mod) != 0).sum())
                # Every output element of one output channel uses that channel's weights once.
                per_channel = output.numel() // output.shape[1]
                macs += weight_nnz * per_channel

            hooks.append(module.register_forward_hook(count))
    for name, p in model.named_parameters():
        module = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if name.endswith("weight") and getattr(module, "mask", None) is not None:
            nnz += int((_effective_weight(module) != 0).sum())
        else:
            nnz += int((p != 0).sum())
    try:
        with torch.no_grad():
            model.eval()(example_input)
    finally:
        for h in hooks:
            h.remove()
    return ModelStats(params=params, nnz=nnz, macs=macs)
