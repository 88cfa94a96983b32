"""Training of one candidate with gradual magnitude pruning to each sparse layer's target.

Sparsity follows the cubic schedule of Zhu & Gupta ("To prune, or not to prune", 2017):
s_t = s_f * (1 - (1 - t / T)^3), from density 1 at step 0 to the target at step T (about 2/3
of training); masks are recomputed every few steps and stay fixed for the remaining steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from search_spaces.data import Dataset
from search_spaces.ops import sparse_layers

__all__ = ["TrainResult", "TrainingDiverged", "pruning_sparsity", "resolve_device", "train_model"]

PRUNE_FRACTION = 2 / 3
MASK_UPDATES = 20
EVAL_BATCH = 512
RECALIBRATION_SAMPLES = 2048


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class TrainResult:
    """Outcome of `train_model`: held-out accuracy and loss, wall seconds, final densities."""

    accuracy: float
    loss: float
    seconds: float
    densities: dict[str, float] = field(default_factory=dict)
    steps: int = 0


def resolve_device(device: str | torch.device) -> torch.device:
    """`"auto"` -> cuda when available else cpu; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pruning_sparsity(step: int, end_step: int, target: float) -> float:
    """Sparsity at `step` on the cubic schedule from 0 at step 0 to `target` at `end_step`."""
    if end_step <= 0 or step >= end_step:
        return target
    return target * (1.0 - (1.0 - step / end_step) ** 3)


def train_model(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int,
    seed: int,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    lr: float = 2e-2,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
) -> TrainResult:
    """Train `model` in place on `data` with its masks pruned gradually to their targets.

    Deterministic for a given seed on a given machine (it seeds torch's global RNG). Batch-norm
    statistics are recomputed once the masks are final. Returns accuracy and mean
    cross-entropy on the held-out split. The model ends on its original device, in eval mode,
    with pruned weights zeroed and every sparse layer at its target density.
    """
    if epochs < 1:
        raise ValueError(f"epochs={epochs}; train for at least 1 epoch")
    if batch_size < 2:
        raise ValueError(f"batch_size={batch_size}; use at least 2 (batch norm needs it)")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"unknown optimizer {optimizer!r}; use adam or sgd")
    start = time.perf_counter()
    run_device = resolve_device(device)
    home_device = next(model.parameters()).device
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)

    model.to(run_device)
    train_x, train_y = data.train_x.to(run_device), data.train_y.to(run_device)
    n = len(train_y)
    if n < 2:
        raise ValueError(f"the training split has {n} sample(s); training needs at least 2")
    # A trailing batch of one sample would break batch norm; drop it.
    steps_per_epoch = n // batch_size + (1 if n % batch_size >= 2 else 0)
    total_steps = epochs * steps_per_epoch
    end_step = max(1, round(PRUNE_FRACTION * total_steps))
    prune_every = max(1, end_step // MASK_UPDATES)
    layers = sparse_layers(model)

    params = model.parameters()
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(
            params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
        )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=total_steps, pct_start=0.15
    )

    _set_masks(layers, step=0, end_step=end_step)
    model.train()
    step = 0
    for _epoch in range(epochs):
        order = torch.randperm(n, generator=generator).to(run_device)
        for first in range(0, steps_per_epoch * batch_size, batch_size):
            idx = order[first : first + batch_size]
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx])
            if not math.isfinite(loss.item()):
                raise TrainingDiverged(
                    f"training diverged at step {step} (loss {loss.item()}); lower lr (now {lr})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            step += 1
            if step <= end_step and (step % prune_every == 0 or step == end_step):
                _set_masks(layers, step=step, end_step=end_step)
            _zero_pruned(layers)

    recalibrate_batchnorm(model, train_x, batch_size)
    accuracy, val_loss = evaluate(model, data.val_x, data.val_y)
    model.to(home_device)
    return TrainResult(
        accuracy=accuracy,
        loss=val_loss,
        seconds=time.perf_counter() - start,
        densities={name: layer.density() for name, layer in layers},
        steps=step,
    )


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """Recompute batch-norm running statistics as exact averages over `x` (up to
    RECALIBRATION_SAMPLES), since masks moved the activations faster than the running
    averages followed."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    for first in range(0, min(len(x), RECALIBRATION_SAMPLES), batch_size):
        batch = x[first : first + batch_size]
        if len(batch) >= 2:
            model(batch)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of `model` (set to eval mode) on `x`, `y`."""
    model.eval()
    device = next(model.parameters()).device
    correct, total_loss = 0, 0.0
    for first in range(0, len(y), EVAL_BATCH):
        xb, yb = x[first : first + EVAL_BATCH].to(device), y[first : first + EVAL_BATCH].to(device)
        logits = model(xb)
        total_loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(dim=1) == yb).sum())
    return correct / len(y), total_loss / len(y)


def _set_masks(layers: list[tuple[str, nn.Module]], step: int, end_step: int) -> None:
    for _name, layer in layers:
        layer.update_mask(pruning_sparsity(step, end_step, layer.sparsity))


@torch.no_grad()
def _zero_pruned(layers: list[tuple[str, nn.Module]]) -> None:
    """Keep pruned weights at zero so momentum cannot revive them and ranking stays monotone."""
    for _name, layer in layers:
        layer.weight.mul_(layer.mask)
