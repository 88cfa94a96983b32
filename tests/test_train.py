"""Training with gradual magnitude pruning: learns digits, ends at target, is deterministic."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from nas.train import (
    TrainingDiverged,
    pruning_sparsity,
    resolve_device,
    train_model,
)
from search_spaces.data import Dataset, load_dataset
from search_spaces.ops import SparseConv2d, SparseLinear, sparse_layers
from search_spaces.spaces import get_space


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset("digits", seed=0)


def _subset(data: Dataset, n_train: int, n_val: int) -> Dataset:
    return dataclasses.replace(
        data,
        train_x=data.train_x[:n_train],
        train_y=data.train_y[:n_train],
        val_x=data.val_x[:n_val],
        val_y=data.val_y[:n_val],
    )


class TinyNet(nn.Module):
    """A small model with one layer of each non-block pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = SparseConv2d(1, 16, 3, stride=2, padding=1, sparsity=0.5, pattern="channel")
        self.mix = SparseConv2d(16, 16, 1, pattern="nm", nm=(2, 4))
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = SparseLinear(256, 10, sparsity=0.8, pattern="unstructured")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.mix(torch.relu(self.conv(x))))
        return self.head(torch.flatten(self.pool(x), 1))


def test_pruning_schedule_is_cubic_from_zero_to_target():
    assert pruning_sparsity(0, 30, 0.9) == 0.0
    assert pruning_sparsity(30, 30, 0.9) == pytest.approx(0.9)
    assert pruning_sparsity(45, 30, 0.9) == pytest.approx(0.9)
    assert pruning_sparsity(15, 30, 0.8) == pytest.approx(0.8 * (1 - 0.5**3))
    values = [pruning_sparsity(t, 30, 0.9) for t in range(31)]
    assert values == sorted(values)
    # Cubic: most of the pruning happens early.
    assert values[10] - values[0] > values[30] - values[20]


def test_mbv2_learns_digits_in_two_epochs_and_ends_at_target(digits):
    space = get_space("mbv2-sparse")
    arch = {key: values[0] for key, values in space.choices.items()}
    blocks = ("4x1", "16x1", "1x4", "4x1")
    for index in range(1, 5):
        arch[f"s{index}.op"] = "sparse"
        arch[f"s{index}.sparsity"] = 0.8
        arch[f"s{index}.block"] = blocks[index - 1]
    arch["classifier.sparsity"] = 0.5
    torch.manual_seed(0)
    model = space.build(arch, digits.num_classes, digits.in_channels, 32)
    result = train_model(model, digits, epochs=2, seed=0)
    assert result.accuracy > 0.5
    assert result.loss == result.loss and result.loss > 0
    assert result.seconds > 0 and result.steps > 0
    layers = sparse_layers(model)
    assert len(layers) == 13 and set(result.densities) == {name for name, _ in layers}
    for name, layer in layers:
        block_size = layer.block[0] * layer.block[1]
        kept = float(layer.mask.sum())
        assert abs(kept - (1 - layer.sparsity) * layer.mask.numel()) <= block_size, name
        assert result.densities[name] == pytest.approx(layer.density())
        # Pruned weights are zero, so the stored weight is itself sparse.
        assert torch.all(layer.weight[layer.mask == 0] == 0)
    assert not model.training


def test_every_pattern_ends_exact_and_training_is_deterministic(digits):
    data = _subset(digits, 400, 120)
    results, states = [], []
    for _ in range(2):
        torch.manual_seed(1)
        model = TinyNet()
        results.append(train_model(model, data, epochs=2, seed=5, batch_size=32))
        states.append(model.state_dict())
    assert results[0].accuracy == results[1].accuracy
    assert results[0].loss == results[1].loss
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
    mask = states[0]["mix.mask"].reshape(16, 4, 4)
    assert torch.all(mask.sum(dim=2) == 2)
    conv_rows = states[0]["conv.mask"].reshape(16, -1)
    assert conv_rows.sum() == 8 * 9
    assert torch.all(conv_rows.min(1).values == conv_rows.max(1).values)
    assert states[0]["head.mask"].sum() == 512


def test_masks_go_gradually_from_dense_to_target(digits):
    data = _subset(digits, 640, 64)
    model = TinyNet()
    seen: list[float] = []
    model.head.register_forward_pre_hook(
        lambda module, _args: seen.append(module.density()) if module.training else None
    )
    result = train_model(model, data, epochs=3, seed=0, batch_size=32)
    assert len(seen) == result.steps == 60
    assert seen[0] == 1.0
    assert seen == sorted(seen, reverse=True)
    assert len(set(seen)) > 5  # many intermediate densities, not one jump
    end = round(2 / 3 * result.steps)
    first_at_target = next(i for i, d in enumerate(seen) if d == pytest.approx(0.2))
    # The target is reached at about 2/3 of training (cubic tail rounds off early) and held.
    assert 0.75 * end <= first_at_target <= end
    assert all(d == pytest.approx(0.2) for d in seen[first_at_target:])


def test_nan_loss_raises_training_diverged(digits):
    data = _subset(digits, 64, 32)
    data = dataclasses.replace(data, train_x=torch.full_like(data.train_x, float("nan")))
    with pytest.raises(TrainingDiverged, match="diverged"):
        train_model(TinyNet(), data, epochs=1, seed=0)
    assert issubclass(TrainingDiverged, RuntimeError)


def test_bad_arguments(digits):
    with pytest.raises(ValueError, match="epochs"):
        train_model(TinyNet(), digits, epochs=0, seed=0)
    with pytest.raises(ValueError, match="optimizer"):
        train_model(TinyNet(), digits, epochs=1, seed=0, optimizer="lbfgs")


def test_sgd_and_auto_device(digits):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    data = _subset(digits, 128, 64)
    model = TinyNet()
    result = train_model(model, data, epochs=1, seed=0, device="auto", optimizer="sgd", lr=0.05)
    assert 0.0 <= result.accuracy <= 1.0
    assert next(model.parameters()).device.type == "cpu"
