"""Datasets: digits split and normalisation, CIFAR-10 batch files, image folders, bad specs."""

from __future__ import annotations

import pickle
import sys

import numpy as np
import pytest
import torch

from search_spaces.data import DatasetError, load_dataset


def test_digits_shapes_split_and_normalisation():
    data = load_dataset("digits", seed=0)
    assert data.name == "digits" and data.num_classes == 10 and data.in_channels == 1
    assert data.train_x.shape[1:] == (1, 32, 32) and data.train_x.dtype == torch.float32
    assert data.train_y.dtype == torch.int64
    total = len(data.train_y) + len(data.val_y)
    assert total == 1797
    assert abs(len(data.val_y) / total - 0.2) < 0.01
    # Stratified: every class in both splits, in about the same proportion.
    train_share = torch.bincount(data.train_y, minlength=10) / len(data.train_y)
    val_share = torch.bincount(data.val_y, minlength=10) / len(data.val_y)
    assert torch.all((train_share - val_share).abs() < 0.02)
    assert abs(float(data.train_x.mean())) < 1e-3
    assert abs(float(data.train_x.std()) - 1.0) < 1e-2


def test_digits_split_is_fixed_by_the_seed():
    a, b, c = (load_dataset("digits", seed=s, image_size=16) for s in (0, 0, 1))
    assert a.train_x.shape[-2:] == (16, 16)
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.val_y, b.val_y)
    assert not torch.equal(a.val_x, c.val_x)


def _write_cifar(root, images_per_batch: int = 6, bad: str | None = None) -> None:
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        if name == bad:
            (root / name).write_bytes(b"not a pickle")
            continue
        batch = {
            b"data": rng.integers(0, 256, size=(images_per_batch, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, size=images_per_batch)],
        }
        with (root / name).open("wb") as handle:
            pickle.dump(batch, handle)


def test_cifar10_batches_load(tmp_path):
    _write_cifar(tmp_path)
    data = load_dataset(f"cifar10:{tmp_path}")
    assert data.name == "cifar10" and data.in_channels == 3 and data.num_classes == 10
    assert data.train_x.shape == (30, 3, 32, 32) and data.val_x.shape == (6, 3, 32, 32)
    assert torch.allclose(data.train_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert load_dataset(f"cifar10:{tmp_path}", image_size=16).val_x.shape[-1] == 16


def test_folder_dataset_loads(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            pixels = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
            image_module.fromarray(pixels).save(tmp_path / cls / f"{i}.png")
    data = load_dataset(f"folder:{tmp_path}", image_size=16)
    assert data.num_classes == 2 and data.in_channels == 3
    assert len(data.train_y) + len(data.val_y) == 10
    assert set(data.val_y.tolist()) == {0, 1}
    assert data.train_x.shape[1:] == (3, 16, 16)


def test_folder_without_pillow_says_so(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DatasetError, match="pip install pillow"):
        load_dataset(f"folder:{tmp_path}")


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("mnist", "unknown dataset spec"),
        ("", "empty dataset spec"),
        ("digits:extra", "unknown dataset spec"),
        ("cifar10:", "lacks a path"),
        ("cifar10:/no/such/dir", "does not exist"),
        ("folder:/no/such/dir", "does not exist"),
    ],
)
def test_bad_specs_raise_one_line_dataset_error(spec, fragment):
    with pytest.raises(DatasetError, match=fragment) as info:
        load_dataset(spec)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_incomplete_or_malformed_cifar_directory(tmp_path):
    with pytest.raises(DatasetError, match="data_batch_1"):
        load_dataset(f"cifar10:{tmp_path}")
    _write_cifar(tmp_path, bad="data_batch_3")
    with pytest.raises(DatasetError, match="not a CIFAR-10 python batch"):
        load_dataset(f"cifar10:{tmp_path}")


def test_folder_needs_classes_with_images(tmp_path):
    pytest.importorskip("PIL")
    (tmp_path / "only").mkdir()
    with pytest.raises(DatasetError, match="class sub-directories"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no PNG/JPEG"):
        load_dataset(f"folder:{tmp_path}")
