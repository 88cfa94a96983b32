"""Differentiable search: a latency table measured through a real tracker and server, DASS's
latency term, and NNI's DARTS / GumbelDARTS driving our supernets."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import nn

from hw_profiles.profiles import load_profile
from hw_profiles.rpc import Tracker, local_server, local_tracker
from nas.differentiable import (
    DifferentiableSettings,
    derive_several,
    differentiable_search,
    measure_latency_table,
    mixture_weights,
)
from nas.errors import UserError
from search_spaces.data import load_dataset
from search_spaces.ops import SparseConv2d
from search_spaces.spaces import Space, get_space
from search_spaces.supernet import MixedKernelDepthwise, MixedSparsityConv2d, Supernet

IMAGE = 32
OPS = ("dense", "sparse@0.5", "sparse@0.95")


class ToyNet(nn.Module):
    """Stem, one 1x1 conv (dense or block-sparse), one depthwise kxk, pool, classifier: the
    1x1 and the depthwise are big enough that dense@k7 is clearly slower than sparse@k3."""

    def __init__(self, arch: dict, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self._make_layers(arch, num_classes, in_channels)

    def _make_layers(self, arch: dict, num_classes: int, in_channels: int) -> None:
        self.arch = arch
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 2, 1), nn.ReLU())
        self.expand = nn.Sequential(self._pointwise(64, 256), nn.ReLU())
        self.depthwise = nn.Sequential(self._depthwise(256), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(256, num_classes)

    def _pointwise(self, i: int, o: int) -> nn.Module:
        if self.arch["op"] == "dense":
            return nn.Conv2d(i, o, 1, bias=False)
        return SparseConv2d(i, o, 1, bias=False, sparsity=self.arch["sparsity"], block=(4, 1))

    def _depthwise(self, c: int) -> nn.Module:
        k = self.arch["kernel"]
        return nn.Conv2d(c, c, k, 1, k // 2, groups=c, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.depthwise(self.expand(self.stem(x))))
        return self.head(torch.flatten(x, 1))


class ToySupernet(Supernet, ToyNet):
    def __init__(self, fixed: dict, num_classes: int, in_channels: int) -> None:
        Supernet.__init__(self)
        self._op = self.add_choice("op", OPS)
        self._kernel = self.add_choice("kernel", (3, 7))
        self._make_layers(fixed, num_classes, in_channels)

    def _pointwise(self, i: int, o: int) -> nn.Module:
        sparsities = [0.0 if c == "dense" else float(c.split("@")[1]) for c in OPS]
        return MixedSparsityConv2d(i, o, 1, self._op, sparsities, block=(4, 1))

    def _depthwise(self, c: int) -> nn.Module:
        return MixedKernelDepthwise(c, (3, 7), self._kernel)

    def derive(self) -> dict[str, Any]:
        op = self.best("op")
        arch = dict(self.arch, kernel=self.best("kernel"))
        if op == "dense":
            return {**arch, "op": "dense"}
        return {**arch, "op": "sparse", "sparsity": float(op.split("@")[1])}


class ToySpace(Space):
    """A space whose latency ranking is certain (not registered: tests only)."""

    name = "toy-differentiable"

    @property
    def choices(self) -> dict[str, tuple]:
        return {"op": ("dense", "sparse"), "sparsity": (0.5, 0.95), "kernel": (3, 7)}

    def _build(self, arch, num_classes, in_channels, image_size, width_scale) -> nn.Module:
        return ToyNet(arch, num_classes, in_channels)

    def supernet(self, num_classes, in_channels, image_size, fixed=None) -> ToySupernet:
        return ToySupernet(self._fixed(fixed, {}), num_classes, in_channels)


def quick_profile():
    """The local x86 profile with a short protocol (tests assert rankings, never timings)."""
    profile = load_profile("x86-local")
    protocol = dataclasses.replace(
        profile.protocol, warmup=2, min_repeat_ms=20, repeats=7, remeasure=1
    )
    return dataclasses.replace(profile, protocol=protocol)


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits", seed=0, image_size=IMAGE)
    data.train_x, data.train_y = data.train_x[:192], data.train_y[:192]
    return data


@pytest.fixture(scope="module")
def device(x86_device: Tracker):
    """The quick x86-local profile and the shared tracker that serves it (conftest)."""
    return quick_profile(), x86_device


@pytest.fixture(scope="module")
def toy_table(device, tmp_path_factory):
    profile, tracker = device
    space = ToySpace()
    torch.manual_seed(0)
    supernet = space.supernet(10, 1, IMAGE)
    cache = tmp_path_factory.mktemp("latency") / "table.json"
    table = measure_latency_table(space, supernet, profile, tracker, (1, 1, IMAGE, IMAGE), cache)
    return space, table, cache


def test_table_covers_every_candidate_and_ranks_measured_nets(toy_table, device):
    from nas.differentiable import _time_module

    space, table, _ = toy_table
    assert set(table.ms) == {"op", "kernel"}
    assert len(table.ms["op"]) == 3 and len(table.ms["kernel"]) == 2
    assert all(ms > 0 for times in table.ms.values() for ms in times)
    slow = {"op": "dense", "sparsity": 0.5, "kernel": 7}
    fast = {"op": "sparse", "sparsity": 0.95, "kernel": 3}
    assert table.predict(slow) > table.predict(fast)
    # The constant makes the cheapest net's prediction its measured latency.
    assert table.predict(table.cheapest_arch) == pytest.approx(table.cheapest_measured_ms)
    profile, tracker = device
    example = torch.randn(1, 1, IMAGE, IMAGE)
    measured = {
        name: _time_module(space.build(arch, 10, 1, IMAGE), example, profile, tracker, name)
        for name, arch in (("slow", slow), ("fast", fast))
    }
    assert measured["slow"] > measured["fast"]


def test_table_is_cached_so_a_resumed_search_measures_nothing(toy_table):
    space, table, cache = toy_table
    supernet = space.supernet(10, 1, IMAGE)
    dead = Tracker("127.0.0.1", 1)  # measuring anything would fail
    again = measure_latency_table(
        space, supernet, quick_profile(), dead, (1, 1, IMAGE, IMAGE), cache
    )
    assert again == table


def test_latency_gradient_reaches_every_arch_parameter(toy_table):
    space, table, _ = toy_table
    supernet = space.supernet(10, 1, IMAGE)
    table.expected_latency(supernet).backward()
    for name, alpha in supernet.named_arch_parameters().items():
        assert alpha.grad is not None and alpha.grad.abs().sum() > 0
        cheapest = min(range(len(table.ms[name])), key=table.ms[name].__getitem__)
        assert alpha.grad[cheapest] < 0  # raising the cheapest op's logit lowers latency


def test_mixture_weights_replace_softmax_in_the_forward_pass():
    supernet = ToySpace().supernet(10, 1, IMAGE).eval()
    x = torch.randn(2, 1, IMAGE, IMAGE)
    weights = {"op": torch.tensor([0.0, 0.0, 1.0]), "kernel": torch.tensor([1.0, 0.0])}
    with mixture_weights(supernet, weights):
        mixed = supernet(x)
    with torch.no_grad():
        for alpha, w in zip(supernet.arch_parameters(), weights.values(), strict=True):
            alpha.copy_(torch.log(w.clamp_min(1e-30)))
    assert torch.allclose(mixed, supernet(x), atol=1e-5)


def test_dass_with_a_tight_budget_derives_a_faster_arch(toy_table, digits):
    space, table, _ = toy_table
    settings = DifferentiableSettings(arch_lr=0.2, batch_size=32)
    tight = differentiable_search(
        "dass",
        space,
        digits,
        epochs=2,
        seed=0,
        latency_table=table,
        latency_weight=20.0,
        max_latency_ms=table.cheapest_ms(),
        settings=settings,
    )
    free = differentiable_search(
        "dass",
        space,
        digits,
        epochs=2,
        seed=0,
        latency_table=table,
        latency_weight=0.0,
        settings=settings,
    )
    assert tight.predicted_latency_ms == pytest.approx(table.cheapest_ms())
    assert tight.predicted_latency_ms <= free.predicted_latency_ms
    assert tight.history[-1]["expected_latency_ms"] < free.history[-1]["expected_latency_ms"]
    space.validate(tight.arch)


def test_derive_several_sweeps_the_budget(toy_table, digits):
    space, table, _ = toy_table
    outcomes = derive_several(
        "dass",
        space,
        digits,
        count=2,
        epochs=2,
        seed=0,
        latency_table=table,
        latency_weight=20.0,
        settings=DifferentiableSettings(arch_lr=0.2, batch_size=32),
    )
    budgets = [o.max_latency_ms for o in outcomes]
    assert budgets[0] == pytest.approx(table.cheapest_ms())
    assert budgets[1] == pytest.approx(table.priciest_ms())
    assert outcomes[0].predicted_latency_ms <= outcomes[1].predicted_latency_ms


@pytest.mark.parametrize("strategy", ["darts", "gumbel-darts"])
def test_nni_oneshot_derives_a_valid_arch(strategy, digits):
    space = get_space("mbv2-sparse")
    small = load_dataset("digits", seed=0, image_size=16)
    small.train_x, small.train_y = small.train_x[:128], small.train_y[:128]
    out = differentiable_search(strategy, space, small, epochs=1, seed=0)
    assert out.driven_by == "nni"
    assert space.validate(out.arch) == out.arch
    probs = out.history[-1]["probabilities"]
    assert set(probs) == {f"s{i}.{k}" for i in range(1, 5) for k in ("op", "kernel")}
    # NNI's arch step moved the logits off their initial near-uniform values.
    assert any(max(p) - min(p) > 1e-3 for p in probs.values())


def test_unknown_strategy_and_space_without_supernet_are_user_errors(digits):
    with pytest.raises(UserError, match="unknown differentiable strategy"):
        differentiable_search("nope", ToySpace(), digits, epochs=1, seed=0)
    with pytest.raises(UserError, match="has no supernet"):
        differentiable_search("dass", get_space("tiny-sparse"), digits, epochs=1, seed=0)


@pytest.mark.slow
def test_mbv2_table_ranks_dense_k5_above_sparse_k3(tmp_path):
    space = get_space("mbv2-sparse")
    fixed = {f"s{i}.{k}": v for i in range(1, 5) for k, v in (("expand", 6), ("width", 1.0))}
    supernet = space.supernet(10, 1, 32, fixed=fixed)
    profile = load_profile("x86-local")
    with local_tracker() as tracker, local_server(tracker, profile.key):
        table = measure_latency_table(
            space, supernet, profile, tracker, (1, 1, 32, 32), tmp_path / "t.json"
        )
    dense = dict(supernet.arch)
    sparse = dict(supernet.arch)
    for i in range(1, 5):
        dense.update({f"s{i}.op": "dense", f"s{i}.kernel": 5})
        sparse.update({f"s{i}.op": "sparse", f"s{i}.sparsity": 0.95, f"s{i}.kernel": 3})
    assert table.predict(dense) > table.predict(sparse)
