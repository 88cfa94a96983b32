"""compile for CUDA: our GPU kernels' index math (run with serial loops on the CPU), builds for
sm_80 / sm_90 that carry our kernels, and, on a machine with a GPU, the outputs against torch."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
import tvm
from torch import nn

import compile as hw_compile
from compile import cuda_kernels
from compile.bsr import full_bsr, pack_dense, to_bsr
from compile.cuda_kernels import (
    bsr_matmul_cuda,
    dense_matmul_cuda,
    depthwise_conv_cuda,
    expand_depthwise_cuda,
    im2col_cuda,
    row_groups,
)
from compile.kernels import ConvGeometry, KernelSpec
from hw_profiles.profiles import load_profile
from search_spaces.ops import SparseConv2d, SparseLinear

CPU = tvm.target.Target({"kind": "llvm"})


def _on_cpu(func) -> tvm.runtime.Module:
    """`func` with its blockIdx/threadIdx loops made serial, built for the CPU: the same index
    arithmetic and guards as on the GPU, one thread after another."""
    text = func.script()
    serial = re.sub(r'T\.thread_binding\((\w+), thread="\w+\.x"\)', r"T.serial(\1)", text)
    assert serial != text, "the kernel has no thread bindings"
    return tvm.compile(tvm.script.from_source(serial), target=CPU)


def _call(func, inputs, out_shape) -> np.ndarray:
    lib = _on_cpu(func)
    out = tvm.runtime.tensor(np.full(out_shape, np.nan, np.float32))
    lib[str(func.attrs["global_symbol"])](*[tvm.runtime.tensor(a) for a in inputs], out)
    return out.numpy()


def _close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


ACTS = {"none": lambda y: y, "relu": lambda y: np.maximum(y, 0), "relu6": lambda y: y.clip(0, 6)}


def _matmul_case(batch: int, m: int, activation: str):
    """W (53 x 37, 80% zero, rows 8-23 empty), X, bias and the expected output."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((53, 37)).astype(np.float32)
    w[rng.random(w.shape) < 0.8] = 0
    w[8:24] = 0  # empty block rows
    x = rng.standard_normal((batch, 37, m)).astype(np.float32)
    bias = rng.standard_normal(53).astype(np.float32)
    want = ACTS[activation](np.einsum("nk,bkm->bnm", w, x) + bias[None, :, None])
    return w, x, bias, want


def test_row_groups_split_block_rows_only_to_fill_the_gpu():
    small = KernelSpec(1, 96, 16, 256, (16, 1), 6)  # 1536 threads at one per block row
    assert row_groups(small, 16) == 16  # one thread per row: still under FILL_THREADS
    big = dataclasses.replace(small, batch=32)  # 49152 threads: enough already
    assert row_groups(big, 16) == 1
    assert row_groups(dataclasses.replace(small, batch=8), 16) == 4  # 8 x 1536 x 4 >= 32768
    assert row_groups(dataclasses.replace(small, batch=8), 1) == 1


@pytest.mark.parametrize(
    ("block", "batch", "m", "activation", "fill"),
    [
        ((4, 1), 2, 49, "relu", None),
        ((4, 1), 2, 49, "none", 2000),  # two threads per block row, two rows each
        ((16, 1), 1, 200, "none", None),
        ((16, 1), 1, 200, "relu", 3000),  # four threads per block row, four rows each
        ((1, 4), 3, 2, "relu6", None),
    ],
)
def test_cuda_matmul_kernels_match_numpy(block, batch, m, activation, fill, monkeypatch):
    if fill is not None:
        monkeypatch.setattr(cuda_kernels, "FILL_THREADS", fill)
    w, x, bias, want = _matmul_case(batch, m, activation)
    bsr = to_bsr(w, block)
    spec = KernelSpec(batch, 53, 37, m, block, bsr.block_rows, activation)
    sparse = _call(bsr_matmul_cuda(spec), [x, bsr.data, bsr.indices, bsr.indptr, bias], want.shape)
    _close(sparse, want)
    dense_spec = dataclasses.replace(spec, block=(4, 1), block_rows=14)
    dense = _call(dense_matmul_cuda(dense_spec), [x, pack_dense(w, 4), bias], want.shape)
    _close(dense, want)


@pytest.mark.parametrize(("dense", "first"), [(False, False), (True, False), (False, True)])
def test_cuda_matmul_reads_conv_tensors_and_adds_the_residual(dense, first):
    """A 1x1 conv's (batch, channels, 7, 7) tensors as they are, the residual added after
    the activation, or before it (`residual_first`): no reshape or add kernels around ours."""
    w, x, bias, y = _matmul_case(2, 49, "none")
    residual = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    want = ACTS["relu6"](y + residual) if first else ACTS["relu6"](y) + residual
    maps = {"in_hw": (7, 7), "out_hw": (7, 7), "residual": True, "residual_first": first}
    x4, r4, want4 = (a.reshape(2, -1, 7, 7) for a in (x, residual, want))
    if dense:
        spec = KernelSpec(2, 53, 37, 49, (4, 1), 14, "relu6", **maps)
        func, consts = dense_matmul_cuda(spec), [pack_dense(w, 4), bias]
    else:
        bsr = to_bsr(w, (16, 1))
        spec = KernelSpec(2, 53, 37, 49, (16, 1), bsr.block_rows, "relu6", **maps)
        func, consts = bsr_matmul_cuda(spec), [bsr.data, bsr.indices, bsr.indptr, bias]
    _close(_call(func, [x4, *consts, r4], want4.shape), want4)


@pytest.mark.parametrize(("kernel", "stride", "pad"), [(3, 2, 1), (5, 1, 2), (3, 1, 0)])
def test_cuda_depthwise_and_im2col_match_torch(kernel, stride, pad):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 9, 11)
    geo_out = nn.functional.conv2d(x, torch.zeros(6, 1, kernel, kernel), None, stride, pad, 1, 6)
    oh, ow = geo_out.shape[2:]
    geo = ConvGeometry(2, 6, 9, 11, (kernel, kernel), (stride, stride), (pad, pad), oh, ow)
    w, b = torch.randn(6, 1, kernel, kernel), torch.randn(6)
    want = nn.functional.conv2d(x, w, b, stride, pad, 1, 6).clamp(0, 6).numpy()
    args = [x.numpy(), w.reshape(6, kernel, kernel).numpy(), b.numpy()]
    _close(_call(depthwise_conv_cuda(geo, "relu6"), args, want.shape), want)
    cols = nn.functional.unfold(x, kernel, padding=pad, stride=stride).numpy()
    _close(_call(im2col_cuda(geo), [x.numpy()], cols.shape), cols)


@pytest.mark.parametrize(
    ("batch", "size", "stride", "pad", "acts"),
    [
        (1, (8, 8), 1, 1, ("relu6", "relu6")),
        (2, (9, 7), 2, 1, ("relu", "none")),
        (1, (5, 6), 1, 0, ("none", "relu")),
    ],
)
def test_cuda_expand_depthwise_kernel_matches_torch(batch, size, stride, pad, acts):
    """The sparse 1x1 conv expanded where the depthwise conv reads it: odd sizes, stride 2, no
    padding, an empty and a full expand channel."""
    rng = np.random.default_rng(5)
    (h, w), (k, c) = size, (11, 21)
    x = torch.from_numpy(rng.standard_normal((batch, k, h, w)).astype(np.float32))
    ew = rng.standard_normal((c, k)).astype(np.float32) * (rng.random((c, k)) < 0.2)
    ew[3], ew[4] = 0, rng.standard_normal(k)
    eb, dw, db = (rng.standard_normal(s).astype(np.float32) for s in (c, (c, 3, 3), c))
    mid = nn.functional.conv2d(x, torch.from_numpy(ew)[:, :, None, None], torch.from_numpy(eb))
    mid = torch.from_numpy(ACTS[acts[0]](mid.numpy()))
    dw_out = nn.functional.conv2d(mid, torch.from_numpy(dw)[:, None], None, stride, pad, 1, c)
    want = ACTS[acts[1]](dw_out.numpy() + db[:, None, None])
    oh, ow = want.shape[2:]
    geo = ConvGeometry(batch, c, h, w, (3, 3), (stride, stride), (pad, pad), oh, ow)
    expand = KernelSpec(batch, c, k, h * w, (1, 1), c, acts[0], (h, w), (h, w))
    csr = to_bsr(ew, (1, 1))
    args = [x.numpy(), csr.data.reshape(-1), csr.indices, csr.indptr, eb, dw, db]
    _close(_call(expand_depthwise_cuda(expand, geo, acts[1]), args, want.shape), want)


class FusedNet(nn.Module):
    """A sparse expand conv read only by a depthwise conv (fused), then a plain sparse one."""

    def __init__(self):
        super().__init__()
        self.expand = SparseConv2d(8, 32, 1, sparsity=0.9, pattern="block", block=(16, 1))
        self.dw = nn.Conv2d(32, 32, 3, 2, 1, groups=32)
        self.project = SparseConv2d(32, 8, 1, sparsity=0.9, pattern="block", block=(4, 1))
        for layer in (self.expand, self.project):
            layer.update_mask()

    def forward(self, x):
        x = nn.functional.relu6(self.dw(nn.functional.relu6(self.expand(x))))
        return self.project(x)


def test_cuda_build_fuses_the_expand_conv_into_the_depthwise_conv():
    compiled = hw_compile.build(
        FusedNet().eval(),
        torch.randn(1, 8, 10, 10),
        load_profile("cuda/h100"),
        kernel_choice="sparse",
    )
    assert compiled.kernels["expand"]["fused_into"] == "dw"
    assert compiled.kernels["dw"]["fused_expand"] == "expand"
    source = compiled.device_source("cuda")
    kernels = re.findall(r"__global__ void __launch_bounds__\(\d+\) (\w+)\([^)]*\) \{", source)
    assert sorted(kernels) == ["depthwise_dw_kernel", "sparse_project_kernel"], kernels


class CudaNet(nn.Module):
    """A sparse 1x1 conv, a depthwise conv, a sparse 1x1 conv with a residual, a sparse strided
    3x3 conv (im2col), a dense 3x3 conv, a sparse classifier: every kernel of ours, plus glue
    ops left to dlight."""

    def __init__(self):
        super().__init__()
        self.pw = SparseConv2d(8, 32, 1, sparsity=0.8, pattern="block", block=(4, 1))
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.mix = SparseConv2d(32, 32, 1, sparsity=0.8, pattern="block", block=(4, 1))
        self.down = SparseConv2d(32, 32, 3, 2, 1, sparsity=0.9, pattern="block", block=(16, 1))
        self.conv = nn.Conv2d(32, 16, 3, padding=1)
        self.head = SparseLinear(16, 10, sparsity=0.75, pattern="block", block=(1, 4))
        for layer in (self.pw, self.mix, self.down, self.head):
            layer.update_mask()

    def forward(self, x):
        x = torch.relu(self.pw(x))
        x = x + nn.functional.relu6(self.dw(x))
        x = x + self.mix(x)  # a residual our kernel adds
        x = self.conv(self.down(x)).mean((2, 3))
        return self.head(x)


@pytest.mark.parametrize("profile_name", ["cuda/a100", "cuda/h100"])
def test_cuda_build_carries_our_kernels(profile_name, tmp_path):
    profile = load_profile(profile_name)
    torch.manual_seed(1)
    model, x = CudaNet().eval(), torch.randn(1, 8, 12, 12)
    compiled = hw_compile.build(model, x, profile, kernel_choice="sparse")
    assert compiled.sparse_layers == ["pw", "mix", "down", "head"]
    assert compiled.dense_layers == ["dw", "conv"]
    assert compiled.kernels["mix"]["fused_residual"]
    source = compiled.device_source("cuda")
    for kernel in ("pw", "mix", "down", "head"):
        assert re.search(rf"__global__ void .*\bsparse_{kernel}_kernel\(", source), kernel
    assert "im2col_down_kernel(" in source and "depthwise_dw_kernel(" in source
    # the 1x1 convs read and write 4-D tensors and the mix conv adds its residual: no reshape
    # kernels; left to dlight are the depthwise conv's residual add and the mean
    kernels = re.findall(r"__global__ void __launch_bounds__\(\d+\) (\w+)\([^)]*\) \{", source)
    glue = [k for k in kernels if not re.match(r"(sparse|dense|im2col|depthwise)_", k)]
    assert sorted(glue) == ["add_kernel", "mean_kernel"], kernels
    assert "dense_conv_kernel(" in source and "im2col_conv_kernel(" in source
    # the classifier at batch 1 is a matrix-vector product: a warp per block row
    head = re.search(r"sparse_head_kernel\([^)]*\) \{(.*?)\n\}", source, re.DOTALL)
    assert head and "__shfl_down_sync" in head.group(1)
    lib = compiled.export_library(tmp_path / "model.so")
    assert lib.stat().st_size > 0
    if not compiled.host_runnable:
        with pytest.raises(hw_compile.CompileError, match="does not run on this host"):
            compiled.run(np.zeros((1, 8, 12, 12), np.float32))


def _local_gpu_profile():
    gpu = tvm.cuda(0)
    if not gpu.exist:
        pytest.skip("no CUDA GPU on this machine")
    arch = "sm_" + gpu.compute_version.replace(".", "")
    base = load_profile("cuda/h100")
    return dataclasses.replace(base, target={**base.target, "arch": arch})


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("block", "batch", "activation"),
    [((4, 1), 1, "relu"), ((16, 1), 2, "none"), ((1, 4), 3, "relu6"), ((2, 2), 1, "none")],
)
def test_cuda_matvec_kernel_matches_numpy_on_the_gpu(block, batch, activation):
    """M == 1: warps share out a block row and add with shuffles, which only a GPU runs. With
    every block stored (the dense twin's form) a row has more blocks than a warp has lanes."""
    profile = _local_gpu_profile()
    target = tvm.target.Target(profile.target, host="llvm")
    gpu = tvm.cuda(0)
    w, x, bias, want = _matmul_case(batch, 1, activation)
    for bsr in (to_bsr(w, block), full_bsr(w, block)):
        spec = KernelSpec(batch, 53, 37, 1, block, bsr.block_rows, activation)
        func = bsr_matmul_cuda(spec)
        lib = tvm.compile(func, target=target)
        args = [x, bsr.data, bsr.indices, bsr.indptr, bias]
        out = tvm.runtime.tensor(np.full(want.shape, np.nan, np.float32), gpu)
        lib[str(func.attrs["global_symbol"])](*[tvm.runtime.tensor(a, gpu) for a in args], out)
        _close(out.numpy(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_cuda_fused_build_runs_on_the_gpu_like_torch(batch):
    torch.manual_seed(4)
    model, x = FusedNet().eval(), torch.randn(batch, 8, 10, 10)
    compiled = hw_compile.build(model, x, _local_gpu_profile(), kernel_choice="sparse")
    assert compiled.kernels["dw"]["fused_expand"] == "expand"
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(compiled.run(x.numpy()), want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_cuda_build_runs_on_the_gpu_like_torch(tmp_path):
    profile = _local_gpu_profile()
    torch.manual_seed(2)
    model = CudaNet().eval()
    x = torch.randn(2, 8, 12, 12)
    compiled = hw_compile.build(model, x, profile)  # runs on the GPU and compares with torch
    assert compiled.host_runnable
    for name in ("pw", "mix", "down", "head"):  # both kernels timed on this GPU, faster kept
        info = compiled.kernels[name]
        assert info["sparse_ms"] > 0 and info["dense_ms"] > 0
        faster = "sparse" if info["sparse_ms"] <= info["dense_ms"] else "dense"
        assert info["impl"] == faster, name
    with torch.no_grad():
        want = model(x).numpy()
    got = compiled.run(x.numpy())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    lib = tvm.runtime.load_module(str(compiled.export_library(tmp_path / "model.so")))
    vm = tvm.relax.VirtualMachine(lib, tvm.cuda(0))
    reloaded = vm["main"](tvm.runtime.tensor(x.numpy(), tvm.cuda(0))).numpy()
    np.testing.assert_allclose(reloaded, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
