"""Sparse ops, sparsity patterns and masks, model search spaces and datasets (torch only)."""

from __future__ import annotations

from search_spaces.baselines import BASELINES, Baseline, build_baseline
from search_spaces.counting import COUNT_MODES, ModelCounts, count_model
from search_spaces.data import Dataset, DatasetError, load_dataset
from search_spaces.masks import MASK_METHODS, MaskMethod, allocate_sparsities, set_masks
from search_spaces.ops import (
    LAYER_METHODS,
    SPARSE_LAYERS,
    SparseConv2d,
    SparseLinear,
    make_mask,
    score_mask,
    sparse_layers,
)
from search_spaces.spaces import Space, UnknownSpace, get_space, list_spaces, register_space
from search_spaces.supernet import Supernet

__all__ = [
    "BASELINES",
    "COUNT_MODES",
    "LAYER_METHODS",
    "MASK_METHODS",
    "SPARSE_LAYERS",
    "Baseline",
    "MaskMethod",
    "ModelCounts",
    "Supernet",
    "allocate_sparsities",
    "build_baseline",
    "count_model",
    "score_mask",
    "set_masks",
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
