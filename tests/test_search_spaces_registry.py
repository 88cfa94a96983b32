"""Every registered space: builds every choice it declares (sampled) and exports; dense
parents, baselines at matched nonzeros / FLOPs, and the supernets of the differentiable
strategies."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

from search_spaces.baselines import BASELINES, build_baseline
from search_spaces.counting import count_model
from search_spaces.ops import SPARSE_LAYERS, SparseConv2d, sparse_layers
from search_spaces.spaces import get_space, list_spaces
from search_spaces.sparse_ift import ift_width_factor
from search_spaces.supernet import Supernet

SPACES = list_spaces()
SUPERNET_SPACES = ("mbv2-sparse", "darts-sparse")


def _covering_archs(space, rng: random.Random) -> list[dict]:
    """Archs that together use every value of every choice at least once."""
    choices = space.choices
    longest = max(len(values) for values in choices.values())
    archs = []
    for i in range(longest):
        arch = space.sample(rng)
        for key, values in choices.items():
            arch[key] = values[i % len(values)]
        archs.append(arch)
    return archs


def test_the_issue_spaces_are_registered():
    assert {"mbv2-sparse", "darts-sparse", "sparse-ift"} <= set(SPACES)
    for name in SPACES:
        space = get_space(name)
        assert name in space.describe() and space.description


@pytest.mark.parametrize("name", SPACES)
def test_every_declared_choice_builds_runs_and_exports(name):
    space = get_space(name)
    for key, values in space.choices.items():
        assert isinstance(values, tuple) and values, key
        assert json.loads(json.dumps(list(values))) == list(values)
    x = torch.randn(2, 1, 32, 32)
    archs = _covering_archs(space, random.Random(0))
    for index, arch in enumerate(archs):
        arch = json.loads(json.dumps(arch))
        torch.manual_seed(index)
        model = space.build(arch, num_classes=10, in_channels=1, image_size=32).eval()
        out = model(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
        if index < 2:  # export is the slow part: the first two archs
            exported = torch.export.export(model, (x,))
            torch.testing.assert_close(exported.module()(x), out)


@pytest.mark.parametrize("name", SPACES)
def test_dense_parent_has_no_sparse_layer_and_the_same_shape(name):
    space = get_space(name)
    arch = space.sample(random.Random(3))
    parent = space.dense_parent(arch)
    assert space.validate(parent) == parent
    model = space.build(parent, 10, 1, 32)
    assert not sparse_layers(model)
    assert model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 10)


def test_darts_sparse_primitives_are_sparse_pointwise_convs():
    space = get_space("darts-sparse")
    arch = space.sample(random.Random(0))
    for cell_type in ("normal", "reduce"):
        for j in range(4):
            arch[f"{cell_type}.n{j}.op0"] = "sparse_sep_conv_3x3"
            arch[f"{cell_type}.n{j}.op1"] = "sparse_dil_conv_5x5"
    model = space.build(arch, 10, 1, 32)
    layers = sparse_layers(model)
    # Per cell 4 nodes x (2 + 1) sparse 1x1 convs, in 5 cells.
    assert len(layers) == 5 * 4 * 3
    for _name, layer in layers:
        assert isinstance(layer, SparseConv2d) and layer.kernel_size == (1, 1)
        assert layer.pattern == "block"
    depthwise = [m for m in model.modules() if type(m) is nn.Conv2d and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels for m in depthwise)


def test_sparse_ift_widens_at_iso_flops():
    space = get_space("sparse-ift")
    base = {"sparsity": 0.0, "block": "4x1", "expand": 4, "kernel": 3, "width": 1.0}

    def pointwise_macs(model) -> float:
        macs = 0.0

        def hook(module, _inputs, output):
            nonlocal macs
            if module.kernel_size == (1, 1):
                kept = module.mask.sum() if isinstance(module, SPARSE_LAYERS) else 1.0
                per = kept if isinstance(module, SPARSE_LAYERS) else module.weight.numel()
                macs += float(per) * output.shape[-1] * output.shape[-2]

        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        hooks = [m.register_forward_hook(hook) for m in convs]
        model.eval()(torch.zeros(1, 1, 32, 32))
        for h in hooks:
            h.remove()
        return macs

    dense = space.build(base, 10, 1, 32)
    dense_macs = pointwise_macs(dense)
    widths = [dense.classifier.in_features]
    for sparsity in (0.5, 0.75, 0.9):
        model = space.build(dict(base, sparsity=sparsity), 10, 1, 32)
        widths.append(model.classifier.in_features)
        # Channel counts round to multiples of 4, so iso-FLOPs holds to rounding.
        assert pointwise_macs(model) == pytest.approx(dense_macs, rel=0.2)
        assert model.classifier.in_features == pytest.approx(
            64 * ift_width_factor(sparsity), abs=4
        )
    assert widths == sorted(widths) and widths[-1] > 2 * widths[0]


@pytest.mark.parametrize("name", ["mbv2-sparse", "darts-sparse"])
def test_baselines_match_nonzeros_and_flops(name):
    space = get_space(name)
    arch = space.sample(random.Random(5))
    if name == "mbv2-sparse":
        arch.update({f"s{i}.op": "sparse" for i in range(1, 5)})
        arch.update({f"s{i}.sparsity": 0.9 for i in range(1, 5)})
    else:
        arch.update(
            {"normal.n0.op0": "sparse_sep_conv_5x5", "reduce.n1.op1": "sparse_sep_conv_5x5"}
        )
        arch.update({"normal.sparsity": 0.9, "reduce.sparsity": 0.9, "channels": 16})
    candidate = space.build(arch, 10, 1, 32)
    counts = count_model(candidate, torch.zeros(1, 1, 32, 32), count="kept")
    nnz, macs = counts.nnz, counts.macs
    built = {kind: build_baseline(space, arch, kind, 10, 1, 32) for kind in BASELINES}
    dense = built["dense"]
    assert not sparse_layers(dense.model) and dense.nnz > nnz and dense.macs > macs
    for kind in ("dense-then-prune", "random", "random-erk"):
        assert built[kind].method == ("global" if kind == "dense-then-prune" else kind)
        assert built[kind].nnz == nnz
    small = built["small-dense"]
    assert not sparse_layers(small.model) and small.width_scale < 1.0
    assert small.nnz == pytest.approx(nnz, rel=0.15)
    ift = built["sparse-ift"]
    assert ift.width_scale > 1.0 and sparse_layers(ift.model)
    assert ift.macs == pytest.approx(dense.macs, rel=0.15)
    for baseline in built.values():
        assert baseline.model.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="unknown baseline"):
        build_baseline(space, arch, "pruned-lottery", 10, 1, 32)


@pytest.mark.parametrize("name", SUPERNET_SPACES)
def test_supernet_trains_its_arch_and_weights_and_derives_a_valid_arch(name):
    space = get_space(name)
    torch.manual_seed(0)
    net = space.supernet(10, 1, 32)
    assert isinstance(net, Supernet)
    arch_params = net.arch_parameters()
    weights = net.weight_parameters()
    assert arch_params and weights
    assert not {id(p) for p in arch_params} & {id(p) for p in weights}
    assert {id(p) for p in arch_params} | {id(p) for p in weights} == {
        id(p) for p in net.parameters()
    }
    scores = [p for n, p in net.named_parameters() if n.endswith("scores")]
    assert scores, "the sparse candidates are parametric (learned scores)"
    x, y = torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,))
    before = [p.detach().clone() for p in arch_params]
    arch_opt = torch.optim.Adam(arch_params, lr=0.1)
    weight_opt = torch.optim.SGD(weights, lr=0.01)
    for _ in range(2):  # first-order DARTS: alternate the two
        for opt in (weight_opt, arch_opt):
            net.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in arch_params)
    assert all(s.grad is not None for s in scores)
    assert any(not torch.equal(a, b) for a, b in zip(arch_params, before, strict=True))
    arch = net.derive()
    assert space.validate(arch) == arch
    assert space.build(arch, 10, 1, 32).eval()(x).shape == (4, 10)
    probs = net.probabilities()
    assert all(sum(p) == pytest.approx(1.0) for p in probs.values())


def test_mbv2_supernet_derives_what_its_logits_favour():
    space = get_space("mbv2-sparse")
    net = space.supernet(10, 1, 32, fixed={"s1.block": "1x4", "s2.expand": 2})
    logits = net.named_arch_parameters()
    with torch.no_grad():
        logits["s1.op"].copy_(torch.tensor([0.0, 0, 0, 5, 0, 0]))  # sparse@0.8
        logits["s2.op"].copy_(torch.tensor([5.0, 0, 0, 0, 0, 0]))  # dense
        logits["s3.kernel"].copy_(torch.tensor([0.0, 5.0]))
    arch = net.derive()
    assert arch["s1.op"] == "sparse" and arch["s1.sparsity"] == 0.8
    assert arch["s1.block"] == "1x4" and arch["s2.expand"] == 2
    assert arch["s2.op"] == "dense" and arch["s3.kernel"] == 5
    with pytest.raises(ValueError, match="s9.op"):
        space.supernet(10, 1, 32, fixed={"s9.op": "dense"})
    with pytest.raises(ValueError, match="no supernet"):
        get_space("sparse-ift").supernet(10, 1, 32)
