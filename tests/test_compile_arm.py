"""compile for aarch64 NEON: a cross-compiled mbv2-sparse library run on the emulated board
(qemu-user, TVM's stock RPC server, a real local tracker) gives torch's output."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import EMULATED_KEY, free_port, small_sparse_net
from torch import nn

import compile as hw_compile
from compile.kernels import K_BLOCK, TILE_MAJOR_X_BYTES, KernelSpec, choose_tiling
from hw_profiles.profiles import load_profile
from hw_profiles.rpc import Tracker
from search_spaces.ops import SparseConv2d, SparseLinear
from search_spaces.spaces import get_space


def test_neon_tiles_fill_half_the_vector_registers():
    def tile(block: tuple[int, int], m: int = 1024) -> tuple[int, int]:
        chosen = choose_tiling("arm", KernelSpec(1, 64, 64, m, block, 64 // block[0]))
        return chosen.sub_rows, chosen.tile_m

    # 16 of 32 128-bit registers hold accumulators: rows x tile_m = 64 floats, two vectors
    # per row at least (a 16x1 block goes in two 8-row passes).
    assert tile((4, 1)) == (4, 16)
    assert tile((16, 1)) == (8, 8)
    assert tile((1, 4)) == (1, 32)  # capped: one activation row of 8 vectors per block column
    assert tile((4, 1), m=6) == (4, 6)


def _mbv2_arch() -> dict:
    space = get_space("mbv2-sparse")
    arch = {name: values[0] for name, values in space.choices.items()}
    # Stage 4's 1x4 blocks at 80%: enough blocks a column block for the by-column kernel.
    for stage, (sparsity, block) in enumerate(
        [(0.5, "4x1"), (0.9, "4x1"), (0.8, "16x1"), (0.8, "1x4")], start=1
    ):
        arch |= {f"s{stage}.op": "sparse", f"s{stage}.sparsity": sparsity}
        arch[f"s{stage}.block"] = block
    arch["classifier.sparsity"] = 0.7
    return arch


@pytest.mark.arm
def test_mbv2_sparse_runs_on_the_emulated_board(tmp_path, emulated_board):
    profile = load_profile("arm/qemu-aarch64")
    torch.manual_seed(0)
    model = get_space("mbv2-sparse").build(
        _mbv2_arch(), num_classes=10, in_channels=3, image_size=32
    )
    model.eval()
    compiled = hw_compile.build(model, torch.randn(1, 3, 32, 32), profile)
    assert not compiled.host_runnable
    # Not timed on this host: sparse at >= 70% sparsity, so stage 1 (50%) stays dense.
    assert compiled.sparse_layers and all(
        not name.startswith("stages.0.") for name in compiled.sparse_layers
    )
    assert "classifier" in compiled.sparse_layers
    assert any(name.startswith("stages.0.") for name in compiled.dense_reasons)
    assert compiled.kernels["stages.3.0.expand.0"].get("by_column")
    lib = compiled.export_library(tmp_path / "model.so")
    assert lib.read_bytes()[:4] == b"\x7fELF" and lib.read_bytes()[18] == 183  # EM_AARCH64

    remote_profile = dataclasses.replace(profile, key=EMULATED_KEY)  # conftest serves it
    compiled.check_remote(lib, remote_profile, emulated_board)  # OutputMismatch if it differs
    # The same check fails on a wrong output.
    wrong = compiled.expected_output + 0.1 * np.abs(compiled.expected_output).max()
    with pytest.raises(hw_compile.OutputMismatch, match="differs from torch"):
        compiled.check_output(wrong)


@pytest.mark.arm
def test_small_blocks_at_batch_one_run_on_the_emulated_board(tmp_path, emulated_board):
    """The matrix-vector kernel walks block rows in lockstep groups
    (`bsr_matvec_lockstep_cpu`), blocks narrower than a NEON register several to a vector
    (unstructured 1x1: four, 16 rows a group; 2x1: two), 4x1 blocks one to a vector (4 rows
    a group, 22 rows: the last block row overhangs), and 1x4 rows' lanes summed four rows at
    a time (`_row_sums`). Their shuffles are NEON code only the board runs. The dense layers'
    matrix-vector kernel and its columns variant take blocks of up to four registers."""
    torch.manual_seed(5)
    model = nn.Sequential(
        SparseLinear(37, 64, sparsity=0.7, pattern="unstructured"),
        nn.ReLU(),
        SparseLinear(64, 20, sparsity=0.6, pattern="block", block=(2, 1)),
        nn.ReLU(),
        SparseLinear(20, 10, sparsity=0.5, pattern="block", block=(1, 4)),  # 2 groups + 2 rows
        nn.ReLU(),
        SparseLinear(10, 22, sparsity=0.5, pattern="block", block=(4, 1)),
    )
    for layer in (model[0], model[2], model[4], model[6]):
        layer.update_mask()
    model.eval()
    profile = load_profile("arm/qemu-aarch64")
    remote_profile = dataclasses.replace(profile, key=EMULATED_KEY)
    # Dense: W as an all-blocks BSR matrix, in blocks one to four vectors tall; at batch 3
    # through the matrix-vector kernel's columns variant.
    for choice, batch in (("sparse", 1), ("dense", 1), ("dense", 3)):
        x = torch.randn(batch, 37)
        compiled = hw_compile.build(model, x, profile, kernel_choice=choice)
        assert compiled.sparse_layers == (["0", "2", "4", "6"] if choice == "sparse" else [])
        if choice == "sparse":
            assert all(compiled.kernels[n].get("lockstep") for n in "0246")
        lib = compiled.export_library(tmp_path / f"{choice}{batch}.so")
        compiled.check_remote(lib, remote_profile, emulated_board)  # OutputMismatch if it differs


@pytest.mark.arm
def test_a_dense_conv_with_a_large_im2col_output_runs_on_the_emulated_board(
    tmp_path, emulated_board
):
    """A 3x3 conv whose im2col output (288 x 1040 floats) is over `TILE_MAJOR_X_BYTES`: our
    dense kernel goes over K in two blocks, each tile's rows of X packed first, in NEON
    tiles."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1), nn.ReLU()).eval()
    profile = load_profile("arm/qemu-aarch64")
    compiled = hw_compile.build(model, torch.randn(1, 32, 32, 32), profile)
    assert compiled.kernels["0"]["im2col"]
    assert 288 * 1040 * 4 > TILE_MAJOR_X_BYTES and 288 > K_BLOCK
    lib = compiled.export_library(tmp_path / "conv.so")
    remote_profile = dataclasses.replace(profile, key=EMULATED_KEY)
    compiled.check_remote(lib, remote_profile, emulated_board)  # OutputMismatch if it differs


@pytest.mark.arm
def test_direct_sparse_convs_run_on_the_emulated_board(tmp_path, emulated_board):
    """Sparse 3x3 convs in r x 1 blocks read their input's padded planes, not im2col
    (`KernelSpec.direct`): 4x1 blocks in NEON tiles of 16 on 32-wide rows, then at stride 2
    (four phase planes) on 16-wide rows, and 16x1 blocks in two passes of 8 rows on 6-wide
    rows (a tile of 4 lanes and 2), a residual add fused."""
    torch.manual_seed(8)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = SparseConv2d(8, 16, 3, padding=1, sparsity=0.8, block=(4, 1))
            self.s = SparseConv2d(16, 16, 3, stride=2, padding=1, sparsity=0.8, block=(4, 1))
            self.b = SparseConv2d(16, 16, 3, padding=1, sparsity=0.7, block=(16, 1))

        def forward(self, x):
            y = torch.relu(self.s(torch.relu(self.a(x))))
            y = nn.functional.max_pool2d(y, 3, 3, 1)
            return torch.relu(self.b(y)) + y

    model = Net().eval()
    profile = load_profile("arm/qemu-aarch64")
    compiled = hw_compile.build(model, torch.randn(1, 8, 32, 32), profile, kernel_choice="sparse")
    assert all(compiled.kernels[name]["direct"] for name in ("a", "s", "b"))
    assert compiled.kernels["b"]["fused_residual"]
    lib = compiled.export_library(tmp_path / "direct.so")
    remote_profile = dataclasses.replace(profile, key=EMULATED_KEY)
    compiled.check_remote(lib, remote_profile, emulated_board)  # OutputMismatch if it differs


@pytest.mark.arm
def test_depthwise_convs_on_small_maps_run_on_the_emulated_board(tmp_path, emulated_board):
    """Depthwise convs whose rows are half a NEON register or less (2x2 maps: each row one
    load, the column shifts shuffles with zeros), the first after a sparse 1x1 conv in 4x1
    blocks (fused into it, its channels expanded in groups of four at 2x2), and on 4x4 maps
    (the padded buffer, the expand conv's CSR rows)."""
    torch.manual_seed(7)
    model = nn.Sequential(
        SparseConv2d(8, 24, 1, sparsity=0.75, pattern="block", block=(4, 1)),
        nn.ReLU6(),
        nn.Conv2d(24, 24, 3, padding=1, groups=24),
        nn.ReLU6(),
        nn.Conv2d(24, 24, 5, padding=2, groups=24),
    )
    model[0].update_mask()
    model.eval()
    profile = load_profile("arm/qemu-aarch64")
    remote_profile = dataclasses.replace(profile, key=EMULATED_KEY)
    for size in (2, 4):
        compiled = hw_compile.build(model, torch.randn(1, 8, size, size), profile)
        assert compiled.kernels["2"]["impl"] == compiled.kernels["4"]["impl"] == "depthwise"
        # the 1x1 conv fused in, its channels expanded four at a time where a plane is at
        # most two NEON registers (`expand_group`)
        assert compiled.kernels["2"]["fused_expand"] == "0"
        assert compiled.kernels["2"]["expand_group"] == (4 if size == 2 else 1)
        lib = compiled.export_library(tmp_path / f"dw{size}.so")
        compiled.check_remote(lib, remote_profile, emulated_board)  # OutputMismatch if it differs


def _times(compiled) -> dict[str, tuple[float, float]]:
    """Each sparse layer's (sparse_ms, dense_ms), for the layers whose kernels were timed."""
    return {
        name: (info["sparse_ms"], info["dense_ms"])
        for name, info in compiled.kernels.items()
        if "sparse_ms" in info
    }


@pytest.mark.arm
def test_sparse_or_dense_is_timed_on_the_board(tmp_path, monkeypatch, emulated_board):
    """On a board this machine cannot run, each sparse layer's sparse and dense kernels are
    timed on the board (all in one session), kept in the table, and found there again without
    the board. Without the board and the table, the density rule decides and says why."""
    monkeypatch.setenv("HWNAS_CACHE", str(tmp_path / "cache"))
    emulated = load_profile("arm/qemu-aarch64")
    quick = dataclasses.replace(
        emulated.protocol, warmup=1, min_repeat_ms=2.0, repeats=3, remeasure=0
    )
    # The emulated board served as a real one (an emulated board's times choose nothing).
    board = dataclasses.replace(emulated, key=EMULATED_KEY, protocol=quick, emulated=False)
    model, x = small_sparse_net(), torch.randn(1, 3, 16, 16)

    compiled = hw_compile.build(model, x, board, tracker=emulated_board)
    times = _times(compiled)
    assert sorted(times) == ["11", "4", "8"]
    assert all(sparse > 0 and dense > 0 for sparse, dense in times.values())
    for name, (sparse, dense) in times.items():  # the faster kernel is kept
        # (or the sparse one inside the depthwise conv it feeds, when that was timed faster)
        fused = compiled.kernels.get(compiled.kernels[name].get("fused_into"), {})
        assert (name in compiled.sparse_layers) == (sparse <= dense or "fused_ms" in fused)
    table = json.loads((tmp_path / "cache" / "kernel_times.json").read_text())
    assert sum('"aarch64-linux-gnu"' in key for key in table) >= 3
    lib = compiled.export_library(tmp_path / "model.so")
    compiled.check_remote(lib, board, emulated_board)

    nobody = Tracker("127.0.0.1", free_port())  # no tracker listens there
    again = hw_compile.build(model, x, board, tracker=nobody)
    assert _times(again) == times and again.sparse_layers == compiled.sparse_layers

    monkeypatch.setenv("HWNAS_CACHE", str(tmp_path / "empty-cache"))
    untimed = hw_compile.build(model, x, board, tracker=nobody)
    assert _times(untimed) == {} and untimed.sparse_layers == ["4", "8"]  # 75%: sparse
    assert "timing on the device failed" in untimed.dense_reasons["11"]
    # An emulated board's times choose nothing: the density rule.
    emulated_build = hw_compile.build(
        model, x, dataclasses.replace(board, emulated=True), tracker=emulated_board
    )
    assert _times(emulated_build) == {}
    assert "not timed on this host" in emulated_build.dense_reasons["11"]
