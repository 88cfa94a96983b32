"""count_model: the two ways of counting a model's nonzeros and MACs, on a net whose counts
follow from how it is built (a masked conv, a norm, a dense linear, some zero values)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from search_spaces.counting import count_model
from search_spaces.ops import SparseConv2d

SIDE = 6  # the conv keeps the image's size, so each conv weight is used SIDE * SIDE times


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        SparseConv2d(2, 4, 3, padding=1, sparsity=0.5, pattern="unstructured"),
        nn.BatchNorm2d(4),  # weight ones, bias zeros
        nn.Flatten(),
        nn.Linear(4 * SIDE * SIDE, 5),
    )
    conv, fc = net[0], net[3]
    mask = conv.mask.flatten()
    with torch.no_grad():
        conv.weight.view(-1)[mask.nonzero()[0]] = 0.0  # kept by the mask, zero in value
        conv.weight.view(-1)[(mask == 0).nonzero()[0]] = 1.0  # pruned, nonzero in value
        fc.weight[0, :3] = 0.0
        conv.bias.fill_(0.5)
        fc.bias.fill_(0.5)
    return net


def _image(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 2, SIDE, SIDE)


def test_kept_counts_what_the_masks_keep_whatever_the_values() -> None:
    net = _net()
    conv, fc = net[0], net[3]
    kept = int(conv.mask.sum())
    assert 0 < kept < conv.weight.numel()
    counts = count_model(net, _image(), count="kept")
    assert counts.params == sum(p.numel() for p in net.parameters())
    assert counts.nnz == kept + fc.weight.numel()  # conv and linear weights only
    assert counts.macs == kept * SIDE * SIDE + fc.weight.numel()


def test_nonzero_counts_every_nonzero_parameter_through_its_mask() -> None:
    net = _net()
    conv, fc = net[0], net[3]
    conv_nonzero = int(conv.mask.sum()) - 1
    fc_nonzero = fc.weight.numel() - 3
    biases = conv.bias.numel() + fc.bias.numel()
    norm_weights = 4  # the norm's zero biases do not count
    counts = count_model(net, _image(), count="nonzero")
    assert counts.nnz == conv_nonzero + fc_nonzero + biases + norm_weights
    assert counts.macs == conv_nonzero * SIDE * SIDE + fc_nonzero
    # MACs are those of the forward pass given: a batch of 3 does three images' work.
    assert count_model(net, _image(3), count="nonzero").macs == 3 * counts.macs


def test_the_model_keeps_its_training_mode() -> None:
    net = _net().train()
    count_model(net, _image(), count="kept")
    assert all(module.training for module in net.modules())
    net.eval()
    count_model(net, _image(), count="nonzero")
    assert not any(module.training for module in net.modules())
    with pytest.raises(ValueError, match="unknown count"):
        count_model(net, _image(), count="all")  # type: ignore[arg-type]
