"""Training of one candidate with its masks: gradual pruning to each sparse layer's target.

Sparsity follows the cubic schedule of Zhu & Gupta ("To prune, or not to prune", 2017):
s_t = s_f * (1 - (1 - t / T)^3), from density 1 at step 0 to the target at step T (about 2/3
of training); masks are recomputed every few steps and stay fixed for the remaining steps.
The mask method (`search_spaces.masks.MASK_METHODS`) picks the scores (magnitude, random,
learned) and how sparsity is shared between layers; random masks are fixed from step 0.
With `nm_decay`, N:M layers are at N:M from step 0 while their pruned weights still take part,
scaled by a factor that decays from `nm_decay` to 0 on the same cubic schedule (the decaying
mask of "Progressive Gradient Flow for Robust N:M Sparsity Training", 2024).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from search_spaces.data import Dataset
from search_spaces.masks import MaskMethod, apply_method, set_masks
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
    method: str | None = None,
    nm_decay: float | None = None,
) -> TrainResult:
    """Train `model` in place on `data` with its masks pruned gradually to their targets.

    `method` is a name in `MASK_METHODS` ("magnitude", "global", "random", "random-erk",
    "scores"); None keeps each layer's own score source with per-layer targets. Under "global",
    "random" (uniform) and "random-erk" the layers' sparsities are reallocated at the same
    total kept count, and each layer's `sparsity` is set to its final allocation.
    Deterministic for a given seed on a given machine (it seeds torch's global RNG). Batch-norm
    statistics are recomputed once the masks are final. Returns accuracy and mean
    cross-entropy on the held-out split. The model ends on its original device, in eval mode,
    with pruned weights zeroed and every sparse layer at its (allocated) target density.
    """
    if epochs < 1:
        raise ValueError(f"epochs={epochs}; train for at least 1 epoch")
    if batch_size < 2:
        raise ValueError(f"batch_size={batch_size}; use at least 2 (batch norm needs it)")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"unknown optimizer {optimizer!r}; use adam or sgd")
    if nm_decay is not None and not 0.0 < nm_decay <= 1.0:
        raise ValueError(f"nm_decay={nm_decay} is out of range; use a value in (0, 1] or None")
    start = time.perf_counter()
    run_device = resolve_device(device)
    home_device = next(model.parameters()).device
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if method is None:
        spec = MaskMethod("layer-own", "", "layer", gradual=True)
    else:
        spec = apply_method(model, method)

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
    pruning = _Pruning([layer for _name, layer in layers], spec, end_step, nm_decay=nm_decay)

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

    pruning.update(0)
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
                pruning.update(step)
            pruning.zero_pruned()

    pruning.finish()
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


class _Pruning:
    """The mask schedule of one training run: which sparsities, when, and what to zero."""

    def __init__(
        self, layers: list[nn.Module], spec: MaskMethod, end_step: int, nm_decay: float | None
    ) -> None:
        self.layers = layers
        self.spec = spec
        self.end_step = end_step
        self.nm_decay = nm_decay
        self.targets = [layer.sparsity for layer in layers]
        self.final: list[float] = list(self.targets)

    def _decays(self, layer: nn.Module) -> bool:
        return self.nm_decay is not None and layer.pattern == "nm"

    def update(self, step: int) -> None:
        """Set every mask for `step` (random masks only once, at their final sparsity)."""
        if not self.spec.gradual and step > 0:
            return
        sparsities = [
            target
            if not self.spec.gradual or self._decays(layer)
            else pruning_sparsity(step, self.end_step, target)
            for layer, target in zip(self.layers, self.targets, strict=True)
        ]
        used = set_masks(self.layers, self.spec.allocation, sparsities)
        if step >= self.end_step or not self.spec.gradual:
            self.final = used
        for layer in self.layers:
            if self._decays(layer):
                layer.pruned_scale = (
                    self.nm_decay * (1.0 - min(step, self.end_step) / self.end_step) ** 3
                )

    @torch.no_grad()
    def zero_pruned(self) -> None:
        """Keep pruned weights at zero so momentum cannot revive them and ranking stays
        monotone; learned-score layers and decaying N:M layers keep theirs (they may return)."""
        for layer in self.layers:
            if layer.method != "scores" and layer.pruned_scale == 0.0:
                layer.weight.mul_(layer.mask)

    @torch.no_grad()
    def finish(self) -> None:
        """Fix every layer at its final sparsity with pruned weights zeroed."""
        for layer, sparsity in zip(self.layers, self.final, strict=True):
            layer.pruned_scale = 0.0
            layer.sparsity = sparsity
            layer.update_mask(sparsity)
            layer.weight.mul_(layer.mask)
