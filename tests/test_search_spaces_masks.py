"""Mask methods: every pattern x method keeps its structure and density; allocations match the
total kept count; gradients reach learned scores (straight-through) and learn a support."""

from __future__ import annotations

import pytest
import torch
from test_search_spaces_ops import PATTERN_CASES, _assert_structure, _unit_size
from torch import nn

from search_spaces.masks import MASK_METHODS, allocate_sparsities, apply_method, set_masks
from search_spaces.ops import LAYER_METHODS, SparseConv2d, SparseLinear, score_mask


def _layer(pattern, block, nm, method, sparsity=0.7):
    return SparseConv2d(
        12,
        40,
        3,
        padding=1,
        sparsity=None if pattern == "nm" else sparsity,
        pattern=pattern,
        block=block,
        nm=nm,
        method=method,
    )


def _kept_matches(layer, sparsity) -> None:
    mask2d = layer.mask.reshape(layer.weight.shape[0], -1)
    _assert_structure(mask2d, layer.pattern, layer.block, layer.nm, sparsity)
    if layer.pattern != "nm":
        unit = _unit_size(layer.pattern, layer.block, layer.nm, mask2d.shape)
        assert abs(float(mask2d.sum()) - (1 - sparsity) * mask2d.numel()) <= unit


@pytest.mark.parametrize("method", LAYER_METHODS)
@pytest.mark.parametrize(("pattern", "block", "nm"), PATTERN_CASES)
def test_every_pattern_and_method_hits_density_and_keeps_structure(pattern, block, nm, method):
    torch.manual_seed(0)
    layer = _layer(pattern, block, nm, method)
    _kept_matches(layer, layer.sparsity)
    for sparsity in (0.3, 0.9) if pattern != "nm" else (layer.sparsity,):
        layer.update_mask(sparsity)
        _kept_matches(layer, sparsity)
    # A learned-score layer recomputes its mask in the training forward; still structured.
    layer.train()
    if method == "scores":
        with torch.no_grad():
            layer.scores.copy_(torch.randn_like(layer.scores))
    before = layer.mask.clone()
    layer(torch.randn(2, 12, 5, 5))
    _kept_matches(layer, layer.current_sparsity)
    assert torch.equal(layer.mask, before) == (method != "scores")
    # In eval the stored mask is used as is, whatever the scores do.
    layer.eval()
    if method == "scores":
        with torch.no_grad():
            layer.scores.copy_(torch.randn_like(layer.scores))
    stored = layer.mask.clone()
    layer(torch.randn(1, 12, 5, 5))
    assert torch.equal(layer.mask, stored)


def test_random_scores_are_fixed_and_differ_from_magnitude():
    torch.manual_seed(0)
    layer = SparseLinear(64, 32, sparsity=0.8, pattern="unstructured", method="random")
    first = layer.mask.clone()
    with torch.no_grad():
        layer.weight.mul_(-3.0).add_(1.0)
    layer.update_mask()
    assert torch.equal(layer.mask, first)  # random scores do not follow the weights
    layer.set_method("magnitude")
    assert not torch.equal(layer.mask, first)


def test_gradient_reaches_the_scores_straight_through():
    torch.manual_seed(1)
    layer = SparseLinear(16, 8, sparsity=0.5, pattern="block", block=(1, 4), method="scores")
    layer.train()
    x = torch.randn(5, 16)
    target = torch.randn(5, 8)
    loss = ((layer(x) - target) ** 2).sum()
    loss.backward()
    assert layer.scores.grad is not None and layer.scores.grad.abs().sum() > 0
    # Straight-through: d loss / d scores equals d loss / d mask = d loss / d W_eff * W.
    mask = layer.mask.clone()
    w_eff = (layer.weight.detach() * mask).requires_grad_()
    ((torch.nn.functional.linear(x, w_eff, layer.bias) - target) ** 2).sum().backward()
    torch.testing.assert_close(layer.scores.grad, w_eff.grad * layer.weight.detach())
    # Gradient reaches pruned units too, which is how they come back.
    assert layer.scores.grad[mask == 0].abs().sum() > 0


def test_learned_scores_find_the_support_of_a_sparse_teacher():
    torch.manual_seed(2)
    true = torch.zeros(4, 16)
    support = torch.rand(4, 16).argsort(dim=1)[:, :4]
    true.scatter_(1, support, 1.0)
    student = SparseLinear(16, 4, bias=False, sparsity=0.75, pattern="unstructured")
    with torch.no_grad():
        # Right values on the support, larger wrong values off it: magnitude picks wrongly.
        student.weight.copy_(torch.where(true > 0, 1.0, 2.0 * torch.sign(torch.randn(4, 16))))
    student.set_method("scores")
    assert float((student.mask * true).sum()) < 16
    student.weight.requires_grad_(False)
    opt = torch.optim.Adam([student.scores], lr=0.05)
    student.train()
    for _ in range(200):
        x = torch.randn(64, 16)
        loss = ((student(x) - x @ true.T) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(student.mask, true)


def test_score_mask_at_zero_sparsity_is_dense_and_differentiable():
    scores = torch.randn(4, 8, requires_grad=True)
    mask = score_mask(scores, 0.0, "unstructured")
    assert torch.equal(mask, torch.ones(4, 8))
    mask.sum().backward()
    assert scores.grad is not None


class _Mixed(nn.Module):
    """Layers of every pattern and very different sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.small = SparseConv2d(3, 16, 3, sparsity=0.6, pattern="unstructured")
        self.wide = SparseConv2d(64, 128, 1, sparsity=0.9, pattern="block", block=(4, 1))
        self.rows = SparseConv2d(32, 32, 3, sparsity=0.5, pattern="channel")
        self.nm = SparseConv2d(64, 64, 1, pattern="nm", nm=(2, 4))
        self.head = SparseLinear(256, 10, sparsity=0.8, pattern="block", block=(1, 4))

    def layers(self) -> list:
        return [self.small, self.wide, self.rows, self.nm, self.head]


def _budget(layers, targets) -> float:
    return sum((1 - t) * layer.weight.numel() for layer, t in zip(layers, targets, strict=True))


@pytest.mark.parametrize("method", list(MASK_METHODS))
def test_every_method_keeps_structure_and_the_total_kept_count(method):
    torch.manual_seed(3)
    model = _Mixed()
    layers = model.layers()
    targets = [layer.sparsity for layer in layers]
    spec = apply_method(model, method)
    used = set_masks(layers, spec.allocation)
    for layer, sparsity in zip(layers, used, strict=True):
        _kept_matches(layer, sparsity)
    kept = sum(float(layer.mask.sum()) for layer in layers)
    slack = sum(
        _unit_size(
            layer.pattern, layer.block, layer.nm, (layer.weight.shape[0], layer.mask[0].numel())
        )
        for layer in layers
    )
    assert abs(kept - _budget(layers, targets)) <= slack
    # N:M keeps its fixed sparsity under every allocation.
    assert torch.all(model.nm.mask.reshape(64, 16, 4).sum(dim=2) == 2)
    if spec.allocation == "layer":
        assert used == targets


def test_uniform_erk_and_global_allocations_differ_as_they_should():
    torch.manual_seed(4)
    model = _Mixed()
    layers = model.layers()
    targets = [layer.sparsity for layer in layers]
    free = [0, 1, 2, 4]

    uniform = allocate_sparsities(layers, targets, "uniform")
    assert max(uniform[i] for i in free) - min(uniform[i] for i in free) < 0.01

    erk = allocate_sparsities(layers, targets, "erk")
    # ERK: density proportional to (sum of dims) / (product of dims), so small layers are
    # kept denser: raw small 25/432, wide 194/8192, rows 70/9216.
    assert erk[0] < erk[1] < erk[2]
    ratio = (1 - erk[1]) / (1 - erk[2])
    assert ratio == pytest.approx((194 / 8192) / (70 / 9216), rel=0.02)
    assert _budget(layers, erk) == pytest.approx(_budget(layers, targets), rel=0.01)

    with torch.no_grad():
        model.rows.weight.mul_(100.0)  # one layer with far larger weights
    global_ = allocate_sparsities(layers, targets, "global", min_density=0.05)
    assert global_[2] < min(global_[i] for i in (0, 1, 4))
    assert all(1 - global_[i] >= 0.05 - 1e-9 for i in free)  # the floor holds
    assert _budget(layers, global_) == pytest.approx(_budget(layers, targets), rel=0.01)


def test_bad_method_names():
    with pytest.raises(ValueError, match="unknown mask method"):
        SparseLinear(8, 8, sparsity=0.5, method="lottery")
    with pytest.raises(ValueError, match="unknown mask method"):
        apply_method(_Mixed(), "lottery")
    with pytest.raises(ValueError, match="unknown allocation"):
        allocate_sparsities([], [], "even")
