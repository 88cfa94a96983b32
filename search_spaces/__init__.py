"""Sparse ops, sparsity patterns and masks, model search spaces and datasets (torch only)."""

from __future__ import annotations

from search_spaces.data import Dataset, DatasetError, load_dataset
from search_spaces.ops import (
    SPARSE_LAYERS,
    SparseConv2d,
    SparseLinear,
    make_mask,
    sparse_layers,
)
from search_spaces.spaces import Space, UnknownSpace, get_space, list_spaces, register_space

__all__ = [
    "SPARSE_LAYERS",
    "Dataset",
    "DatasetError",
    "Space",
    "SparseConv2d",
    "SparseLinear",
    "UnknownSpace",
    "get_space",
    "list_spaces",
    "load_dataset",
    "make_mask",
    "register_space",
    "sparse_layers",
]
