"""Training with every mask method: learns digits, ends structured at the matched total,
random masks stay fixed, learned scores move, N:M with a decaying gradient to pruned weights."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from test_search_spaces_masks import _kept_matches
from torch import nn

from nas.train import train_model
from search_spaces.data import Dataset, load_dataset
from search_spaces.masks import MASK_METHODS
from search_spaces.ops import SparseConv2d, SparseLinear, sparse_layers
from search_spaces.spaces import get_space


@pytest.fixture(scope="module")
def digits() -> Dataset:
    data = load_dataset("digits", seed=0)
    return dataclasses.replace(
        data,
        train_x=data.train_x[:640],
        train_y=data.train_y[:640],
        val_x=data.val_x[:200],
        val_y=data.val_y[:200],
    )


class PatternNet(nn.Module):
    """One layer of each pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = SparseConv2d(
            1, 16, 3, stride=2, padding=1, sparsity=0.5, pattern="unstructured"
        )
        self.rows = SparseConv2d(16, 16, 3, padding=1, sparsity=0.5, pattern="channel")
        self.block = SparseConv2d(16, 32, 1, sparsity=0.8, pattern="block", block=(4, 1))
        self.nm = SparseConv2d(32, 32, 1, pattern="nm", nm=(2, 4))
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = SparseLinear(512, 10, sparsity=0.8, pattern="unstructured")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.conv, self.rows, self.block, self.nm):
            x = torch.relu(layer(x))
        return self.head(torch.flatten(self.pool(x), 1))


def _kept(model: nn.Module) -> float:
    return sum(float(layer.mask.sum()) for _name, layer in sparse_layers(model))


@pytest.mark.parametrize("method", list(MASK_METHODS))
def test_every_method_learns_digits_and_ends_structured_at_the_matched_total(digits, method):
    torch.manual_seed(0)
    model = PatternNet()
    target_kept = _kept(model)
    densities: list[float] = []
    model.block.register_forward_pre_hook(
        lambda module, _args: densities.append(module.density()) if module.training else None
    )
    result = train_model(model, digits, epochs=2, seed=0, batch_size=32, method=method)
    assert result.accuracy > 0.5  # chance is 0.1
    for _name, layer in sparse_layers(model):
        _kept_matches(layer, layer.sparsity)
        assert torch.all(layer.weight[layer.mask == 0] == 0)
    # Reallocating methods move sparsity between layers but keep the total (up to rounding to
    # blocks and rows).
    assert abs(_kept(model) - target_kept) <= 0.05 * target_kept
    assert torch.all(model.nm.mask.reshape(32, 8, 4).sum(dim=2) == 2)
    if MASK_METHODS[method].gradual:
        assert densities[0] == 1.0 and densities[-1] < 0.3
    else:  # random masks are fixed from the first step
        assert len(set(densities)) == 1


def test_scores_method_learns_the_scores_and_ends_on_their_top_k(digits):
    torch.manual_seed(0)
    model = PatternNet()
    train_model(model, digits, epochs=1, seed=0, batch_size=32, method="scores")
    layer = model.block
    assert layer.method == "scores" and isinstance(layer.scores, nn.Parameter)
    assert not torch.allclose(layer.scores.abs(), layer.weight.abs())  # scores moved
    mask = layer.mask.clone()
    layer.update_mask()  # recompute from the learned scores at the target
    assert torch.equal(layer.mask, mask)


def test_nm_decay_lets_gradient_reach_pruned_weights_then_fixes_nm(digits):
    torch.manual_seed(0)
    model = PatternNet()
    seen: list[tuple[float, float, bool]] = []

    def record(module, _args):
        if module.training:
            pruned = module.weight[module.mask == 0]
            seen.append((module.pruned_scale, module.density(), bool(pruned.abs().sum() > 0)))

    model.nm.register_forward_pre_hook(record)
    train_model(model, digits, epochs=2, seed=0, batch_size=32, nm_decay=0.5)
    scales = [s for s, _d, _p in seen]
    assert scales[0] == pytest.approx(0.5) and scales == sorted(scales, reverse=True)
    assert scales[-1] == 0.0
    assert all(d == 0.5 for _s, d, _p in seen)  # at 2:4 from the first step
    assert any(alive for _s, _d, alive in seen[1:])  # pruned weights kept learning
    assert torch.all(model.nm.weight[model.nm.mask == 0] == 0)
    with pytest.raises(ValueError, match="nm_decay"):
        train_model(PatternNet(), digits, epochs=1, seed=0, nm_decay=1.5)
    with pytest.raises(ValueError, match="mask method"):
        train_model(PatternNet(), digits, epochs=1, seed=0, method="snip")


def test_darts_sparse_learns_digits_in_one_epoch(digits):
    space = get_space("darts-sparse")
    arch = space.sample(random.Random(1))
    arch.update({"channels": 8, "normal.n0.op0": "sparse_sep_conv_3x3"})
    torch.manual_seed(0)
    model = space.build(arch, 10, 1, 32)
    assert sparse_layers(model)
    result = train_model(model, digits, epochs=1, seed=0, batch_size=32)
    assert result.accuracy > 0.4
