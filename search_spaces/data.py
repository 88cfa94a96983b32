"""Datasets for training candidates: `load_dataset("digits" | "cifar10:PATH" | "folder:PATH")`.

Every dataset comes back as in-memory NCHW float32 tensors, normalised with the training
split's per-channel mean and std, resized to `image_size` x `image_size`.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Dataset", "DatasetError", "load_dataset"]

VAL_FRACTION = 0.2
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DatasetError(ValueError):
    """A dataset spec that cannot be loaded; the message names the problem and the fix."""


@dataclass
class Dataset:
    """A train split and a held-out split as tensors (x: NCHW float32, y: int64)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    in_channels: int
    name: str

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])


def load_dataset(spec: str = "digits", seed: int = 0, image_size: int = 32) -> Dataset:
    """Load a dataset by spec.

    - `digits`: scikit-learn's 8x8 handwritten digits (no download), upscaled bilinearly to
      `image_size`, kept at 1 channel (the spaces take `in_channels`); a stratified 20%
      held-out split fixed by `seed`.
    - `cifar10:PATH`: the CIFAR-10 python batches in PATH (data_batch_1..5 for training,
      test_batch held out; `seed` is unused), 3 channels.
    - `folder:PATH`: one sub-directory per class holding PNG/JPEG images (needs Pillow),
      converted to RGB; a stratified 20% held-out split fixed by `seed`.
    """
    if not isinstance(spec, str) or not spec:
        raise DatasetError("empty dataset spec; use digits, cifar10:PATH or folder:PATH")
    if image_size < 8:
        raise DatasetError(f"image_size={image_size} is too small; use at least 8")
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return _load_digits(seed, image_size)
    if kind in ("cifar10", "folder"):
        if not arg:
            raise DatasetError(f"dataset spec {spec!r} lacks a path; write {kind}:PATH")
        path = Path(arg).expanduser()
        if not path.is_dir():
            raise DatasetError(f"{kind} dataset directory {str(path)!r} does not exist; fix PATH")
        if kind == "cifar10":
            return _load_cifar10(path, image_size)
        return _load_folder(path, seed, image_size)
    raise DatasetError(f"unknown dataset spec {spec!r}; use digits, cifar10:PATH or folder:PATH")


def _finish(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    num_classes: int,
    image_size: int,
    name: str,
) -> Dataset:
    """Resize NCHW float arrays to `image_size`, normalise by train statistics, wrap."""
    tx = _resize(torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32)), image_size)
    vx = _resize(torch.from_numpy(np.ascontiguousarray(val_x, dtype=np.float32)), image_size)
    mean = tx.mean(dim=(0, 2, 3), keepdim=True)
    std = tx.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return Dataset(
        train_x=((tx - mean) / std).contiguous(),
        train_y=torch.as_tensor(train_y, dtype=torch.int64),
        val_x=((vx - mean) / std).contiguous(),
        val_y=torch.as_tensor(val_y, dtype=torch.int64),
        num_classes=num_classes,
        in_channels=int(tx.shape[1]),
        name=name,
    )


def _resize(x: torch.Tensor, image_size: int) -> torch.Tensor:
    if x.shape[-2:] == (image_size, image_size):
        return x
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)


def _split(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    if counts.min() < 2:
        raise DatasetError(
            f"class {int(counts.argmin())} has {int(counts.min())} image(s); "
            "every class needs at least 2 for a held-out split"
        )
    try:
        return train_test_split(x, y, test_size=VAL_FRACTION, stratify=y, random_state=seed)
    except ValueError as exc:
        raise DatasetError(
            f"cannot split {len(y)} images into a stratified {VAL_FRACTION:.0%} held-out set "
            f"({str(exc).splitlines()[0]}); add more images per class"
        ) from None


def _load_digits(seed: int, image_size: int) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None] / 16.0
    y = digits.target.astype(np.int64)
    train_x, val_x, train_y, val_y = _split(x, y, seed)
    return _finish(train_x, train_y, val_x, val_y, 10, image_size, "digits")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DatasetError(
            f"CIFAR-10 file {str(path)!r} is missing; point cifar10:PATH at the extracted "
            "cifar-10-batches-py directory"
        )
    try:
        with path.open("rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
        images = data.reshape(len(labels), 3, 32, 32)
    except Exception as exc:  # any unreadable or misshapen pickle is the same user error
        raise DatasetError(
            f"CIFAR-10 file {str(path)!r} is not a CIFAR-10 python batch ({type(exc).__name__}); "
            "re-extract cifar-10-python.tar.gz"
        ) from None
    return images, labels


def _load_cifar10(root: Path, image_size: int) -> Dataset:
    parts = [_read_cifar_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    val_x, val_y = _read_cifar_batch(root / "test_batch")
    train_x = np.concatenate([p[0] for p in parts]).astype(np.float32) / 255.0
    train_y = np.concatenate([p[1] for p in parts])
    if max(train_y.max(), val_y.max()) > 9 or min(train_y.min(), val_y.min()) < 0:
        raise DatasetError(
            f"CIFAR-10 labels in {str(root)!r} fall outside 0..9; re-extract the batches"
        )
    return _finish(
        train_x, train_y, val_x.astype(np.float32) / 255.0, val_y, 10, image_size, "cifar10"
    )


def _load_folder(root: Path, seed: int, image_size: int) -> Dataset:
    try:
        from PIL import Image
    except ImportError:
        raise DatasetError(
            "folder datasets need Pillow to read images; install it with `pip install pillow`"
        ) from None
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DatasetError(
            f"{str(root)!r} has {len(classes)} class sub-directories; a folder dataset needs "
            "one sub-directory of images per class, at least 2"
        )
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        files = sorted(f for f in (root / cls).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(
                f"class directory {str(root / cls)!r} holds no PNG/JPEG images; add some or "
                "remove it"
            )
        for file in files:
            try:
                with Image.open(file) as img:
                    rgb = img.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
            except Exception as exc:  # an undecodable file is the user's to fix
                raise DatasetError(
                    f"cannot read image {str(file)!r} ({type(exc).__name__}); remove or replace it"
                ) from None
            images.append(np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0)
            labels.append(label)
    x = np.stack(images)
    y = np.asarray(labels, dtype=np.int64)
    train_x, val_x, train_y, val_y = _split(x, y, seed)
    return _finish(train_x, train_y, val_x, val_y, len(classes), image_size, f"folder:{root}")
