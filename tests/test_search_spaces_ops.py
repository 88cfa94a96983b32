"""Sparse layers: every pattern hits its density, keeps its structure, and drives the forward."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from search_spaces.ops import (
    SPARSE_LAYERS,
    SparseConv2d,
    SparseLinear,
    make_mask,
    parse_block,
    sparse_layers,
)

# (pattern, block, nm); the block shapes include ragged edges on the layers below.
PATTERN_CASES = [
    ("unstructured", None, None),
    ("block", (1, 1), None),
    ("block", (4, 1), None),
    ("block", (16, 1), None),
    ("block", (1, 4), None),
    ("block", (1, 8), None),
    ("block", (2, 2), None),
    ("channel", None, None),
    ("nm", None, (2, 4)),
    ("nm", None, (2, 8)),
    ("nm", None, (1, 4)),
]

LAYERS = {
    "linear": lambda **kw: SparseLinear(50, 37, **kw),
    "linear-even": lambda **kw: SparseLinear(64, 32, **kw),
    "conv3x3": lambda **kw: SparseConv2d(10, 24, 3, padding=1, **kw),
    "conv1x1": lambda **kw: SparseConv2d(16, 32, 1, **kw),
    "conv-grouped": lambda **kw: SparseConv2d(8, 16, 3, groups=2, **kw),
}


def _unit_size(pattern: str, block, nm, shape: tuple[int, int]) -> int:
    if pattern == "block":
        return block[0] * block[1]
    if pattern == "channel":
        return shape[1]
    if pattern == "nm":
        return nm[1]
    return 1


def _assert_structure(mask2d: torch.Tensor, pattern: str, block, nm, sparsity: float) -> None:
    assert set(mask2d.unique().tolist()) <= {0.0, 1.0}
    rows, cols = mask2d.shape
    if pattern == "block":
        br, bc = block
        for r in range(0, rows, br):
            for c in range(0, cols, bc):
                tile = mask2d[r : r + br, c : c + bc]
                assert tile.min() == tile.max(), f"block at ({r}, {c}) is split"
    elif pattern == "channel":
        assert torch.all(mask2d.min(dim=1).values == mask2d.max(dim=1).values)
    elif pattern == "nm":
        n, m = nm
        keep = min(m, max(n, math.floor((1 - sparsity) * m + 0.5)))
        for c in range(0, cols, m):
            group = mask2d[:, c : c + m]
            expected = keep if group.shape[1] == m else math.ceil(keep * group.shape[1] / m)
            assert torch.all(group.sum(dim=1) == expected), f"group at column {c}"


@pytest.mark.parametrize("layer_name", list(LAYERS))
@pytest.mark.parametrize(("pattern", "block", "nm"), PATTERN_CASES)
def test_pattern_hits_density_and_keeps_structure(layer_name, pattern, block, nm):
    torch.manual_seed(0)
    sparsities = [None] if pattern == "nm" else [0.5, 0.8, 0.95]
    for sparsity in sparsities:
        layer = LAYERS[layer_name](sparsity=sparsity, pattern=pattern, block=block, nm=nm)
        mask2d = layer.mask.reshape(layer.weight.shape[0], -1)
        assert layer.mask.shape == layer.weight.shape
        assert layer.mask.dtype == torch.float32
        target = layer.sparsity
        _assert_structure(mask2d, pattern, block, nm, target)
        kept = float(mask2d.sum())
        expected = (1 - target) * mask2d.numel()
        if pattern == "nm":
            # Exact counts including the ragged tail were checked by the structure.
            n, m = nm
            assert target == pytest.approx(1 - n / m)
            if mask2d.shape[1] % m == 0:
                assert kept == expected
        else:
            assert abs(kept - expected) <= _unit_size(pattern, block, nm, mask2d.shape)
        assert layer.density() == pytest.approx(kept / mask2d.numel())


@pytest.mark.parametrize(("pattern", "block", "nm"), PATTERN_CASES)
def test_update_mask_keeps_structure_at_every_sparsity(pattern, block, nm):
    torch.manual_seed(1)
    layer = SparseConv2d(
        12, 40, 1, sparsity=0.5 if nm is None else None, pattern=pattern, block=block, nm=nm
    )
    previous = 2.0
    for sparsity in (0.0, 0.3, 0.6, 0.9):
        layer.update_mask(sparsity)
        mask2d = layer.mask.reshape(40, -1)
        _assert_structure(mask2d, pattern, block, nm, sparsity)
        assert layer.density() <= previous + 1e-9
        previous = layer.density()
    layer.update_mask(0.0)
    assert layer.density() == 1.0


def test_nm_never_keeps_fewer_than_n():
    layer = SparseLinear(16, 8, pattern="nm", nm=(2, 4), sparsity=None)
    layer.update_mask(0.9)
    assert torch.all(layer.mask.reshape(8, 4, 4).sum(dim=2) == 2)
    layer.update_mask(0.25)
    assert torch.all(layer.mask.reshape(8, 4, 4).sum(dim=2) == 3)


def test_block_score_is_the_l1_norm_of_the_block():
    weight = torch.zeros(8, 2)
    weight[0:4, 0] = torch.tensor([10.0, 0.0, 0.0, 0.0])  # L1 10, largest single value
    weight[4:8, 1] = torch.tensor([3.0, -3.0, 3.0, -3.0])  # L1 12
    mask = make_mask(weight, 7 / 8, "block", (4, 1))
    assert mask.sum() == 4
    assert torch.all(mask[4:8, 1] == 1)


def test_magnitude_picks_the_largest_and_scores_override():
    weight = torch.arange(1.0, 13.0).reshape(3, 4)
    mask = make_mask(weight, 0.75, "unstructured")
    assert mask.flatten().nonzero().flatten().tolist() == [9, 10, 11]
    scores = torch.flip(weight, dims=(0, 1))
    mask = make_mask(weight, 0.75, "unstructured", scores=scores)
    assert mask.flatten().nonzero().flatten().tolist() == [0, 1, 2]
    rows = make_mask(weight, 2 / 3, "channel")
    assert rows.sum(dim=1).tolist() == [0.0, 0.0, 4.0]


def test_ragged_nm_tail_keeps_ceil_share():
    mask = make_mask(torch.randn(5, 10), 0.5, "nm", nm=(2, 4))
    # Groups of 4, 4 and a tail of 2 that keeps ceil(2 * 2 / 4) = 1.
    assert mask[:, :8].reshape(5, 2, 4).sum(dim=2).eq(2).all()
    assert mask[:, 8:].sum(dim=1).eq(1).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda: SparseLinear(32, 16, sparsity=0.75, pattern="block", block=(4, 1)),
        lambda: SparseConv2d(8, 16, 3, padding=1, sparsity=0.5, pattern="nm", nm=(2, 4)),
        lambda: SparseConv2d(8, 16, 1, sparsity=0.5, pattern="channel"),
    ],
)
def test_forward_uses_the_mask(make):
    torch.manual_seed(2)
    layer = make()
    x = (
        torch.randn(2, layer.weight.shape[1], 6, 6)
        if layer.weight.dim() == 4
        else torch.randn(2, layer.weight.shape[1])
    )
    before = layer(x)
    pruned = (layer.mask == 0).nonzero()[0]
    kept = (layer.mask == 1).nonzero()[0]
    with torch.no_grad():
        layer.weight[tuple(pruned)] = 1000.0
    assert torch.equal(layer(x), before)
    with torch.no_grad():
        layer.weight[tuple(kept)] += 1000.0
    assert not torch.allclose(layer(x), before)
    assert torch.equal(layer.masked_weight(), layer.weight * layer.mask)


def test_sparse_layer_matches_dense_layer_with_masked_weight():
    torch.manual_seed(3)
    sparse = SparseConv2d(6, 8, 3, stride=2, padding=1, sparsity=0.7, pattern="unstructured")
    dense = nn.Conv2d(6, 8, 3, stride=2, padding=1)
    with torch.no_grad():
        dense.weight.copy_(sparse.masked_weight())
        dense.bias.copy_(sparse.bias)
    x = torch.randn(1, 6, 9, 9)
    torch.testing.assert_close(sparse(x), dense(x))


def test_mask_is_saved_and_restored():
    layer = SparseLinear(16, 8, sparsity=0.5)
    other = SparseLinear(16, 8, sparsity=0.5)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.mask, layer.mask)
    assert "mask" in layer.state_dict()


def test_sparse_layers_lists_names_in_order():
    model = nn.Sequential(
        SparseConv2d(3, 8, 1, sparsity=0.5),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 8, 1), SparseLinear(8, 4, sparsity=0.5, block=(1, 4))),
    )
    assert [name for name, _ in sparse_layers(model)] == ["0", "2.1"]
    assert all(isinstance(mod, SPARSE_LAYERS) for _, mod in sparse_layers(model))
    assert "block=1x4" in repr(model)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"sparsity": 0.5, "pattern": "diagonal"}, "unknown sparsity pattern"),
        ({"sparsity": 1.0}, "out of range"),
        ({"sparsity": -0.1}, "out of range"),
        ({}, "needs a sparsity"),
        ({"sparsity": 0.5, "pattern": "nm"}, "nm=(n, m)"),
        ({"sparsity": 0.8, "pattern": "nm", "nm": (2, 4)}, "contradicts"),
        ({"pattern": "nm", "nm": (5, 4)}, "1 <= n <= m"),
        ({"sparsity": 0.5, "block": (0, 4)}, "bad block"),
        ({"sparsity": 0.5, "block": "4by1"}, "bad block"),
        ({"sparsity": 0.5, "block": None}, "needs block"),
    ],
)
def test_bad_configuration_is_a_value_error(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        SparseLinear(16, 8, **kwargs)


def test_parse_block():
    assert parse_block("16x1") == (16, 1)
    assert parse_block((1, 4)) == (1, 4)
    assert SparseLinear(16, 8, sparsity=0.5, block="1x8").block == (1, 8)
