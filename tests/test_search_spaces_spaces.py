"""The space registry and `mbv2-sparse`: every choice builds, runs and exports."""

from __future__ import annotations

import json
import random

import pytest
import torch
from torch import nn

from search_spaces.ops import SparseConv2d, SparseLinear, parse_block, sparse_layers
from search_spaces.spaces import UnknownSpace, get_space, list_spaces

SPACE = "mbv2-sparse"


def _extremes(space) -> list[dict]:
    first = {key: values[0] for key, values in space.choices.items()}
    last = {key: values[-1] for key, values in space.choices.items()}
    all_sparse_small = dict(first, **{k: "sparse" for k in first if k.endswith(".op")})
    return [first, last, all_sparse_small]


def _archs(space, samples: int = 4) -> list[dict]:
    rng = random.Random(0)
    return _extremes(space) + [space.sample(rng) for _ in range(samples)]


def test_registry_lists_and_rejects_unknown():
    assert SPACE in list_spaces()
    assert get_space(SPACE).name == SPACE
    with pytest.raises(UnknownSpace, match="mbv2-sparse"):
        get_space("resnet-9000")
    assert issubclass(UnknownSpace, ValueError)


def test_choices_are_finite_json_tuples():
    space = get_space(SPACE)
    assert space.choices
    for key, values in space.choices.items():
        assert isinstance(values, tuple) and values, key
        assert json.loads(json.dumps(list(values))) == list(values)
    for index in range(1, 5):
        assert space.choices[f"s{index}.op"] == ("dense", "sparse")
        assert space.choices[f"s{index}.sparsity"] == (0.5, 0.7, 0.8, 0.9, 0.95)
        assert space.choices[f"s{index}.block"] == ("4x1", "16x1", "1x4")
    assert "classifier.sparsity" in space.choices


def test_sample_is_seeded_and_within_choices():
    space = get_space(SPACE)
    a = space.sample(random.Random(7))
    assert a == space.sample(random.Random(7))
    assert space.validate(a) == a
    draws = [space.sample(random.Random(seed)) for seed in range(5)]
    assert len({json.dumps(d, sort_keys=True) for d in draws}) > 1


def test_every_arch_builds_runs_and_exports():
    space = get_space(SPACE)
    x = torch.randn(2, 1, 32, 32)
    for arch in _archs(space, samples=3):
        arch = json.loads(json.dumps(arch))  # what a strategy hands over after storage
        model = space.build(arch, num_classes=10, in_channels=1, image_size=32).eval()
        out = model(x)
        assert out.shape == (2, 10)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), out)


def test_three_channel_and_small_images_build():
    space = get_space(SPACE)
    arch = space.sample(random.Random(1))
    model = space.build(arch, num_classes=4, in_channels=3, image_size=16).eval()
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 4)


def test_sparse_stages_use_the_chosen_block_and_dense_stages_none():
    space = get_space(SPACE)
    rng = random.Random(3)
    for _ in range(6):
        arch = space.sample(rng)
        model = space.build(arch, 10, 1, 32)
        for index, stage in enumerate(model.stages, start=1):
            sparse = [m for m in stage.modules() if isinstance(m, SparseConv2d)]
            convs = [m for m in stage.modules() if type(m) is nn.Conv2d]
            if arch[f"s{index}.op"] == "dense":
                assert not sparse
                continue
            # Expand and project of every block are sparse; the depthwise convs stay dense.
            assert len(sparse) == 2 * len(stage)
            assert all(m.groups == m.in_channels for m in convs)
            for layer in sparse:
                assert layer.kernel_size == (1, 1)
                assert layer.pattern == "block"
                assert layer.block == parse_block(arch[f"s{index}.block"])
                assert layer.sparsity == arch[f"s{index}.sparsity"]
                block_size = layer.block[0] * layer.block[1]
                assert abs(layer.density() - (1 - layer.sparsity)) * layer.mask.numel() <= (
                    block_size
                )
        head = arch["classifier.sparsity"]
        assert isinstance(model.classifier, SparseLinear) == (head > 0)
        names = [name for name, _ in sparse_layers(model)]
        assert ("classifier" in names) == (head > 0)


def test_macs_stay_small():
    space = get_space(SPACE)
    for arch in _extremes(space)[:2]:
        model = space.build(arch, 10, 1, 32)
        macs = 0

        def count(module, _inputs, output):
            nonlocal macs
            if isinstance(module, nn.Conv2d):
                macs += output.numel() * module.weight[0].numel()
            elif isinstance(module, nn.Linear):
                macs += module.weight.numel()

        hooks = [m.register_forward_hook(count) for m in model.modules()]
        model.eval()(torch.zeros(1, 1, 32, 32))
        for hook in hooks:
            hook.remove()
        assert 1e5 < macs < 1e7


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"s9.op": "dense"}, "s9.op"),
        ({"s2.sparsity": 0.6}, "s2.sparsity"),
        ({"s1.block": "8x8"}, "s1.block"),
        ({"s3.op": True}, "s3.op"),
        ({"classifier.sparsity": "0.5"}, "classifier.sparsity"),
    ],
)
def test_invalid_arch_names_the_key(change, key):
    space = get_space(SPACE)
    arch = dict(space.sample(random.Random(0)), **change)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        space.build(arch, 10, 1, 32)


def test_missing_key_is_named():
    space = get_space(SPACE)
    arch = space.sample(random.Random(0))
    del arch["s4.kernel"]
    with pytest.raises(ValueError, match=r"s4\.kernel"):
        space.validate(arch)
    with pytest.raises(ValueError, match="dict"):
        space.validate(["s1.op"])


def test_describe_lists_every_choice():
    space = get_space(SPACE)
    text = space.describe()
    assert SPACE in text
    for key, values in space.choices.items():
        line = next(line for line in text.splitlines() if line.split()[:1] == [key])
        for value in values:
            assert str(value) in line
