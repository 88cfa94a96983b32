"""compile.build on random nets: sparse and dense layers of every pattern, strides, paddings,
odd sizes and batches in random combinations, each built for this host (and for the emulated
aarch64 board) and run against torch. The default run builds a few; `-m slow` a hundred."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from helpers import EMULATED_KEY, host_profile
from torch import nn

import compile as hw_compile
from hw_profiles.profiles import load_profile
from search_spaces.ops import SparseConv2d, SparseLinear

BLOCKS = [(1, 1), (2, 1), (4, 1), (8, 1), (16, 1), (1, 2), (1, 4), (1, 8), (2, 2), (4, 4)]


def _sparsity(r: random.Random) -> dict:
    """A random pattern and sparsity, as a user declares them on a sparse layer."""
    kind = r.choice(["block", "block", "unstructured", "nm", "channel"])
    if kind == "nm":
        return {"pattern": "nm", "nm": r.choice([(1, 4), (2, 4), (1, 8)])}
    sparsity = r.choice([0.0, 0.5, 0.8, 0.9, 0.95, 0.99])
    if kind == "block":
        return {"pattern": "block", "block": r.choice(BLOCKS), "sparsity": sparsity}
    return {"pattern": kind, "sparsity": sparsity}


def _masked(layer: nn.Module) -> nn.Module:
    layer.weight.data.normal_()
    layer.update_mask()
    return layer


def _conv(r: random.Random, cin: int, cout: int, k: int, stride: int, pad: int, groups: int = 1):
    bias = r.random() < 0.6
    if groups == 1 and r.random() < 0.7:
        return _masked(SparseConv2d(cin, cout, k, stride, pad, bias=bias, **_sparsity(r)))
    return nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=bias)


def _norm_act(r: random.Random, channels: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    if r.random() < 0.4:
        bn = nn.BatchNorm2d(channels)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.bias.data.uniform_(-1, 1)
        layers.append(bn)
    return layers + [r.choice([nn.Identity(), nn.ReLU(), nn.ReLU6()])]


class _Inverted(nn.Module):
    """MobileNetV2's block: 1x1 expand, depthwise k x k, 1x1 project, a residual where the
    shapes allow."""

    def __init__(self, r: random.Random, cin: int, cout: int, k: int, stride: int, pad: int):
        super().__init__()
        mid = cin * r.choice([1, 2, 4, 6])
        self.expand = nn.Sequential(_conv(r, cin, mid, 1, 1, 0), *_norm_act(r, mid))
        self.depthwise = nn.Sequential(
            _conv(r, mid, mid, k, stride, pad, groups=mid), *_norm_act(r, mid)
        )
        self.project = _conv(r, mid, cout, 1, 1, 0)
        self.residual = cin == cout and stride == 1 and 2 * pad == k - 1

    def forward(self, x):
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class _RandomNet(nn.Module):
    """Up to four random blocks (inverted residual, k x k conv, depthwise conv), then global
    pooling or a flatten, and a Linear."""

    def __init__(self, r: random.Random, channels: int, height: int, width: int):
        super().__init__()
        blocks: list[nn.Module] = []
        for _ in range(r.randint(1, 4)):
            kind = r.choice(["inverted", "inverted", "conv", "depthwise"])
            k = r.choice([3, 3, 5] if kind == "inverted" else [1, 3, 3, 5])
            stride, pad = r.choice([1, 1, 2]), r.choice([k // 2, k // 2, 0])
            out_h = (height + 2 * pad - k) // stride + 1
            out_w = (width + 2 * pad - k) // stride + 1
            if out_h < 1 or out_w < 1:
                continue
            if kind == "inverted":
                out = r.choice([channels, channels, r.randint(1, 40)])
                blocks.append(_Inverted(r, channels, out, k, stride, pad))
            elif kind == "conv":
                out = r.randint(1, 40)
                blocks += [_conv(r, channels, out, k, stride, pad), *_norm_act(r, out)]
            else:
                out = channels
                blocks += [
                    _conv(r, channels, out, k, stride, pad, groups=channels),
                    *_norm_act(r, out),
                ]
            channels, height, width = out, out_h, out_w
        self.body = nn.Sequential(*blocks)
        self.pool = r.random() < 0.7
        features = channels if self.pool else channels * height * width
        classes = r.randint(1, 30)
        if r.random() < 0.7:
            self.head = _masked(SparseLinear(features, classes, **_sparsity(r)))
        else:
            self.head = nn.Linear(features, classes)

    def forward(self, x):
        x = self.body(x)
        return self.head(x.mean((2, 3)) if self.pool else x.flatten(1))


def random_case(seed: int) -> tuple[nn.Module, torch.Tensor, str]:
    """Net `seed`, an input for it and the kernel choice to build it with."""
    r = random.Random(seed)
    torch.manual_seed(seed)
    size = r.choice([r.randint(1, 20), 4, 8, 16, 32])
    height, width = size, size if r.random() < 0.7 else r.randint(1, 20)
    channels = r.randint(1, 24)
    model = _RandomNet(r, channels, height, width).eval()
    x = torch.randn(r.choice([1, 1, 2, 3]), channels, height, width)
    return model, x, r.choice(["sparse", "sparse", "dense", "auto"])


def _check_random_net(seed: int) -> None:
    model, x, choice = random_case(seed)
    compiled = hw_compile.build(model, x, host_profile(), kernel_choice=choice)  # checks, too
    with torch.no_grad():
        want = model(x).numpy()
    got = compiled.run(x.numpy())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("seed", [5, 9, 18, 21])
def test_random_nets_build_like_torch(seed):
    _check_random_net(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2000, 2100))
def test_many_random_nets_build_like_torch(seed):
    _check_random_net(seed)


@pytest.mark.arm
@pytest.mark.parametrize("seed", [2, 3, 5])
def test_random_nets_run_on_the_emulated_board_like_torch(seed, tmp_path, emulated_board):
    """The NEON kernels (4-lane tiles and rows) on random nets, run on the board: seed 2 has
    2x2 maps at batch 2, seed 3 dense 1x1 convs on 32x32 maps (read through a padded copy),
    seed 5 a fused expand conv, an im2col conv and a channel-pruned layer."""
    model, x, choice = random_case(seed)
    profile = load_profile("arm/qemu-aarch64")
    compiled = hw_compile.build(model, x, profile, kernel_choice=choice)
    lib = compiled.export_library(tmp_path / "model.so")
    remote = dataclasses.replace(profile, key=EMULATED_KEY)  # conftest serves it
    compiled.check_remote(lib, remote, emulated_board)  # OutputMismatch if it differs
