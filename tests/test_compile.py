"""compile: BSR conversion, our sparse kernels and whole-model builds, all against torch/numpy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import relax
from tvm.target import codegen

import compile as hw_compile
from compile.bsr import block_fill, bsr_to_dense, choose_block, to_bsr
from compile.kernels import KernelSpec, sparse_matmul_kernel


@dataclass(frozen=True)
class LocalProfile:
    """The fields of hw_profiles.profiles.Profile that compile reads."""

    target: dict
    family: str = "x86"
    host: dict | None = None
    cross_compiler: str | None = None
    name: str = "test/host"


HOST = LocalProfile(target={"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})


def _mask(shape, sparsity: float, block: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """A 0/1 mask of `shape` whose zeros come in (rows x cols) blocks of the weight matrix."""
    rows, cols = shape[0], int(np.prod(shape[1:]))
    br, bc = block
    keep = torch.rand(-(-rows // br), -(-cols // bc), generator=gen) >= sparsity
    full = keep.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]
    return full.float().reshape(shape)


class MaskedConv2d(nn.Conv2d):
    """Stand-in for search_spaces.ops.SparseConv2d: a mask buffer, forward on weight * mask."""

    def __init__(self, *args, sparsity=0.9, block=None, seed=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.block = block
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("mask", _mask(self.weight.shape, sparsity, block or (1, 1), gen))

    def forward(self, x):
        return self._conv_forward(x, self.weight * self.mask, self.bias)


class MaskedLinear(nn.Linear):
    """Stand-in for search_spaces.ops.SparseLinear."""

    def __init__(self, *args, sparsity=0.9, block=None, seed=0, **kwargs):
        super().__init__(*args, **kwargs)
        self.block = block
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("mask", _mask(self.weight.shape, sparsity, block or (1, 1), gen))

    def forward(self, x):
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


# ---------------------------------------------------------------- BSR and block choice


@pytest.mark.parametrize("block", [(1, 1), (4, 1), (16, 1), (1, 4), (1, 8), (4, 4)])
def test_bsr_round_trip_on_odd_shapes(block):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((53, 37)).astype(np.float32)
    w[rng.random(w.shape) < 0.8] = 0
    w[8:24] = 0  # empty block rows
    bsr = to_bsr(w, block)
    assert np.array_equal(bsr_to_dense(bsr), w)
    assert bsr.indices.max() + block[1] <= 37  # partial last block column shifted in range
    assert bsr.indptr[-1] == bsr.nnz_blocks


def test_bsr_of_all_zero_matrix_has_no_blocks():
    bsr = to_bsr(np.zeros((5, 7), np.float32), (4, 1))
    assert bsr.nnz_blocks == 0 and not bsr.indptr.any()
    assert not bsr_to_dense(bsr).any()


def test_choose_block_prefers_declared_then_a_fitting_default():
    gen = torch.Generator().manual_seed(0)
    mask = _mask((64, 32), 0.7, (4, 1), gen).numpy()
    assert choose_block(mask, (1, 8)) == (1, 8)
    assert choose_block(mask, None) == (4, 1)
    assert block_fill(mask, (4, 1)) == 1.0
    unstructured = (np.random.default_rng(0).random((64, 32)) > 0.7).astype(np.float32)
    assert choose_block(unstructured, None) == (1, 1)


# ---------------------------------------------------------------- kernels alone


def _run_kernel(w, x, bias, block, activation):
    bsr = to_bsr(w, block)
    batch, k, m = x.shape
    spec = KernelSpec(
        batch, w.shape[0], k, m, bsr.block, len(bsr.data), bsr.block_rows, activation
    )
    lib = tvm.compile(sparse_matmul_kernel(spec, "x86", num_cores=2), target=HOST.target)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in (x, bsr.data, bsr.indices, bsr.indptr, bias)]
    out = tvm.runtime.tensor(np.full((batch, w.shape[0], m), np.nan, np.float32), dev)
    lib["bsr_matmul"](*args, out)
    return out.numpy()


@pytest.mark.parametrize(
    ("block", "sparsity", "batch", "m", "activation"),
    [
        ((1, 1), 0.0, 1, 49, "none"),
        ((1, 1), 0.99, 3, 49, "relu"),
        ((4, 1), 0.5, 1, 49, "relu6"),
        ((4, 1), 0.99, 3, 1, "none"),
        ((8, 1), 0.9, 1, 200, "none"),
        ((16, 1), 0.0, 3, 7, "relu"),
        ((16, 1), 0.9, 1, 49, "none"),
        ((1, 4), 0.7, 3, 49, "none"),
        ((1, 8), 0.9, 1, 130, "relu"),
        ((1, 8), 1.0, 1, 49, "none"),
    ],
)
def test_kernel_matches_numpy(block, sparsity, batch, m, activation):
    rng = np.random.default_rng(2)
    gen = torch.Generator().manual_seed(3)
    w = rng.standard_normal((53, 37)).astype(np.float32)
    w *= _mask(w.shape, sparsity, block, gen).numpy()
    w[16:32] = 0
    x = rng.standard_normal((batch, 37, m)).astype(np.float32)
    bias = rng.standard_normal(53).astype(np.float32)
    want = np.einsum("nk,bkm->bnm", w, x) + bias[None, :, None]
    want = {"none": want, "relu": np.maximum(want, 0), "relu6": np.clip(want, 0, 6)}[activation]
    got = _run_kernel(w, x, bias, block, activation)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# ---------------------------------------------------------------- whole builds


def _check_build(model, x, expect_sparse, expect_dense):
    model.eval()
    compiled = hw_compile.build(model, x, HOST)
    assert compiled.sparse_layers == expect_sparse
    assert compiled.dense_layers == expect_dense
    with torch.no_grad():
        want = model(x).numpy()
    got = compiled.run(x.numpy())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    return compiled


@pytest.mark.parametrize(
    ("sparsity", "batch", "block"),
    [(0.0, 1, None), (0.5, 3, (4, 1)), (0.99, 1, (16, 1)), (0.9, 3, (1, 4))],
)
def test_sparse_1x1_conv_matches_torch(sparsity, batch, block):
    torch.manual_seed(0)
    model = nn.Sequential(MaskedConv2d(37, 53, 1, sparsity=sparsity, block=block), nn.ReLU())
    x = torch.randn(batch, 37, 7, 7)
    if sparsity == 0.0:  # all-ones mask: stays dense
        compiled = _check_build(model, x, [], ["0"])
        assert compiled.dense_reasons == {"0": "mask is all ones"}
    else:
        compiled = _check_build(model, x, ["0"], [])
        info = compiled.kernels["0"]
        assert info["activation"] == "relu" and info["fused_bias"]
        assert tuple(info["block"]) == block


@pytest.mark.parametrize(("sparsity", "batch", "block"), [(0.99, 1, (4, 1)), (0.6, 3, (1, 8))])
def test_sparse_linear_matches_torch(sparsity, batch, block):
    torch.manual_seed(1)
    model = nn.Sequential(MaskedLinear(37, 53, sparsity=sparsity, block=block))
    compiled = _check_build(model, torch.randn(batch, 37), ["0"], [])
    assert compiled.kernels["0"]["fused_bias"]


class TinyNet(nn.Module):
    """Sparse 1x1 conv, depthwise conv, dense 3x3 conv, sparse classifier."""

    def __init__(self):
        super().__init__()
        self.pw = MaskedConv2d(3, 16, 1, sparsity=0.75, block=(4, 1))
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.conv = nn.Conv2d(16, 8, 3, padding=1)
        self.head = MaskedLinear(8, 5, sparsity=0.5)

    def forward(self, x):
        x = torch.relu(self.pw(x))
        x = nn.functional.relu6(self.dw(x))
        x = self.conv(x).mean((2, 3))
        return self.head(x)


def test_tiny_net_builds_exports_and_reloads(tmp_path):
    torch.manual_seed(2)
    model = TinyNet()
    x = torch.randn(2, 3, 9, 9)
    compiled = _check_build(model, x, ["pw", "head"], ["dw", "conv"])
    assert compiled.compile_seconds > 0
    path = compiled.export_library(tmp_path / "net.so")
    lib = tvm.runtime.load_module(str(path))
    vm = relax.VirtualMachine(lib, tvm.cpu())
    reloaded = vm["main"](tvm.runtime.tensor(x.numpy())).numpy()
    np.testing.assert_array_equal(reloaded, compiled.run(x.numpy()))


def test_strided_sparse_conv_stays_dense_with_a_reason():
    torch.manual_seed(3)
    model = nn.Sequential(MaskedConv2d(8, 8, 1, stride=2, sparsity=0.5))
    compiled = _check_build(model, torch.randn(1, 8, 6, 6), [], ["0"])
    assert "strided" in compiled.dense_reasons["0"]


# ---------------------------------------------------------------- errors


def test_compare_outputs_names_the_worst_element():
    want = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert hw_compile.compare_outputs(want.copy(), want) is None
    got = want.copy()
    got[2, 1] += 0.5
    message = hw_compile.compare_outputs(got, want)
    assert "(2, 1)" in message
    assert issubclass(hw_compile.OutputMismatch, hw_compile.CompileError)


def test_unsupported_family_is_a_compile_error():
    profile = LocalProfile(target={"kind": "cuda", "arch": "sm_90"}, family="cuda")
    with pytest.raises(hw_compile.CompileError, match="cuda"):
        hw_compile.build(nn.Linear(4, 2), torch.randn(1, 4), profile)
