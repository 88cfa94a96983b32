"""Per-layer times on the device: a model's layer kernels linked into one library, each layer's
output equal to torch's, and each layer timed through a real tracker and rpc_server (no mocks,
no timing asserted)."""

from __future__ import annotations

import dataclasses
import gc
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import tvm
from helpers import EMULATED_KEY, small_sparse_net, wait_for
from torch import nn

import compile as hw_compile
from compile.layers import layer_output, run_layer_calls
from hw_profiles.measure import KernelCall, measure_layers
from hw_profiles.profiles import Profile, load_profile
from hw_profiles.rpc import Tracker, request_session, tracker_summary

KEY = load_profile("x86-local").key  # conftest's `x86_device` serves it


def _quick(profile: Profile, key: str) -> Profile:
    """`profile` served under `key`, with a protocol short enough for a test."""
    quick = dataclasses.replace(
        profile.protocol, warmup=1, min_repeat_ms=2.0, repeats=3, remeasure=0, timeout_s=120.0
    )
    return dataclasses.replace(profile, key=key, protocol=quick)


def _layer_inputs(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, np.ndarray]:
    """Each named layer's input when the model runs on `x`."""
    captured: dict[str, np.ndarray] = {}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda _m, args, _out, name=name: captured.__setitem__(name, args[0].numpy())
        )
        for name in names
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return captured


def _torch_layer(model: nn.Module, name: str, x: np.ndarray, activation: str) -> np.ndarray:
    """The layer's output in torch, with the activation its kernel fused."""
    with torch.no_grad():
        y = model.get_submodule(name)(torch.from_numpy(x))
    if activation == "relu":
        y = torch.relu(y)
    elif activation == "relu6":
        y = torch.clamp(y, 0, 6)
    return y.numpy()


def _check_layers(compiled, model, x, calls, run) -> None:
    """Every layer's calls, run by `run(calls)`, give torch's layer output (a depthwise conv
    with a fused expand conv: both layers' output, from the expand conv's input)."""
    inputs = _layer_inputs(model, x, list(compiled.kernels))
    plans = {plan.name: plan for plan in compiled.layer_plans}
    for name, layer in calls.items():
        chain = [plans[name].expand.name, name] if plans[name].expand else [name]
        expected = inputs[chain[0]]
        for step in chain:
            activation = compiled.kernels[step]["activation"]
            expected = _torch_layer(model, step, expected, activation)
        got = layer_output(plans[name], run(layer))
        assert hw_compile.compare_outputs(got, expected) is None, name


@pytest.fixture(scope="module")
def built() -> tuple[nn.Module, torch.Tensor, hw_compile.CompiledModel]:
    model = small_sparse_net()
    x = torch.randn(1, 3, 16, 16)
    compiled = hw_compile.build(model, x, load_profile("x86/local"), kernel_choice="sparse")
    return model, x, compiled


@pytest.fixture(scope="module")
def tracker(x86_device: Tracker) -> Tracker:
    """The shared tracker with this machine served under KEY (conftest)."""
    return x86_device


def test_layer_library_gives_each_layers_torch_output(built, tmp_path: Path) -> None:
    model, x, compiled = built
    assert set(compiled.sparse_layers) == {"4", "8", "11"}
    assert compiled.kernels["4"]["fused_into"] == "6"
    assert compiled.kernels["6"]["fused_expand"] == "4"
    path = tmp_path / "layers.so"
    inputs = _layer_inputs(model, x, [plan.name for plan in compiled.layer_plans])
    calls = compiled.export_layer_library(path, inputs=inputs)
    # Every Conv2d/Linear in model order; the 3x3 conv is its im2col and its matmul, and the
    # expand conv "4" is computed (and timed) inside the depthwise conv "6", on its input.
    assert list(calls) == ["0", "2", "6", "8", "11"]
    assert [len(layer) for layer in calls.values()] == [2, 1, 1, 1, 1]
    np.testing.assert_array_equal(calls["6"][0].inputs[0], inputs["4"])
    assert all(isinstance(call, KernelCall) for layer in calls.values() for call in layer)
    lib = tvm.runtime.load_module(str(path))
    _check_layers(compiled, model, x, calls, lambda layer: run_layer_calls(lib, tvm.cpu(), layer))
    # Without inputs: random data of each layer's input shape, the same for the same seed.
    again = compiled.export_layer_library(tmp_path / "random.so", seed=3)
    first = again["0"][0].inputs[0]
    assert first.shape == (1, 3, 16, 16) and not np.array_equal(first, inputs["0"])
    same = compiled.export_layer_library(tmp_path / "random.so", seed=3)["0"][0].inputs[0]
    np.testing.assert_array_equal(first, same)
    with pytest.raises(hw_compile.CompileError, match="not the layer's"):
        compiled.export_layer_library(tmp_path / "bad.so", inputs={"2": inputs["0"]})


def test_every_layer_is_timed_on_the_device(built, tracker: Tracker, tmp_path: Path) -> None:
    _, _, compiled = built
    profile = _quick(load_profile("x86/local"), KEY)
    path = tmp_path / "layers.so"
    calls = compiled.export_layer_library(path)
    times = measure_layers(path, calls, profile, tracker)
    assert times.ok, times.error
    assert list(times.ms) == ["0", "2", "6", "8", "11"]
    assert all(math.isfinite(ms) and ms > 0 for ms in times.ms.values())
    assert times.repeats == 3 and times.key == KEY
    # The session is released: the server is free again once it has told the tracker.
    wait_for(lambda: tracker_summary(tracker)[KEY]["free"] >= 1, "the server back", 15)


def test_layers_are_timed_in_rounds(built, tracker: Tracker, tmp_path: Path, monkeypatch) -> None:
    """After every call's warm-up and calibration, the calls are timed one round after another,
    each once a round, so that a burst of load on the device falls on every layer alike."""
    from hw_profiles import measure

    _, _, compiled = built
    profile = _quick(load_profile("x86/local"), KEY)
    path = tmp_path / "layers.so"
    calls = compiled.export_layer_library(path)
    symbols = [call.symbol for layer in calls.values() for call in layer]
    timed: list[tuple[str, int]] = []
    evaluator = measure._evaluator

    def recording(module, name, device, args):
        timer = evaluator(module, name, device, args)

        def call(number: int, repeat: int, cooldown_ms: float):
            timed.append((name, repeat))
            return timer(number, repeat, cooldown_ms)

        return call

    monkeypatch.setattr(measure, "_evaluator", recording)
    times = measure_layers(path, calls, profile, tracker)
    assert times.ok, times.error
    assert times.repeats == 3
    rounds = timed[-3 * len(symbols) :]
    assert rounds == [(symbol, 1) for symbol in symbols] * 3
    assert all(math.isfinite(ms) and ms > 0 for ms in times.ms.values())


def test_layer_failures_come_back_as_data(built, tracker: Tracker, tmp_path: Path) -> None:
    _, _, compiled = built
    profile = _quick(load_profile("x86/local"), KEY)
    missing = measure_layers(tmp_path / "none.so", {}, profile, tracker)
    assert not missing.ok and missing.error.startswith("upload:")
    path = tmp_path / "layers.so"
    calls = compiled.export_layer_library(path)
    wrong = {"fc": [KernelCall("no_such_symbol", calls["11"][0].inputs, (1, 10, 1))]}
    once = dataclasses.replace(profile, protocol=dataclasses.replace(profile.protocol, retries=0))
    failed = measure_layers(path, wrong, once, tracker)
    assert not failed.ok and failed.ms == {}
    assert failed.error.startswith("warmup layer 'fc' (no_such_symbol):"), failed.error


@pytest.mark.parametrize(
    ("profile_name", "machine"), [("cuda/h100", 62), ("cuda/jetson-orin", 183)]
)
def test_cuda_layer_library_holds_every_layers_kernels(
    profile_name: str, machine: int, tmp_path: Path
) -> None:
    """On a CUDA target the layers' kernels are built into one library with their device
    code, for the profile's host (x86-64, or aarch64 on a Jetson); the calls are the same as
    on a CPU (run on a GPU: the `gpu` test below)."""
    model, x = small_sparse_net(), torch.randn(1, 3, 16, 16)
    compiled = hw_compile.build(model, x, load_profile(profile_name), kernel_choice="sparse")
    path = tmp_path / "layers.so"
    calls = compiled.export_layer_library(path)
    assert list(calls) == ["0", "2", "6", "8", "11"]
    assert [len(layer) for layer in calls.values()] == [2, 1, 1, 1, 1]
    library = path.read_bytes()
    assert library[:4] == b"\x7fELF" and library[18] == machine  # e_machine
    symbols = {call.symbol for layer in calls.values() for call in layer}
    assert len(symbols) == 6  # im2col, and five distinct kernels
    for symbol in symbols:  # the host function, and its kernel in the device code
        assert symbol.encode() in library and f"{symbol}_kernel".encode() in library, symbol


def _local_gpu_profile(key: str) -> Profile:
    """The H100 profile for this machine's GPU, served under `key`."""
    gpu = tvm.cuda(0)
    if not gpu.exist:
        pytest.skip("no CUDA GPU on this machine")
    base = load_profile("cuda/h100")
    arch = "sm_" + gpu.compute_version.replace(".", "")
    return _quick(dataclasses.replace(base, target={**base.target, "arch": arch}), key)


@pytest.mark.gpu
def test_layers_are_timed_on_the_gpu(tracker: Tracker, tmp_path: Path) -> None:
    """The CUDA layer library gives each layer's torch output on the GPU, and the local
    rpc_server (which serves this machine's GPU too) times every layer on it."""
    profile = _local_gpu_profile(KEY)
    model, x = small_sparse_net(), torch.randn(1, 3, 16, 16)
    compiled = hw_compile.build(model, x, profile, kernel_choice="sparse")
    path = tmp_path / "layers.so"
    inputs = _layer_inputs(model, x, [plan.name for plan in compiled.layer_plans])
    calls = compiled.export_layer_library(path, inputs=inputs)
    lib = tvm.runtime.load_module(str(path))
    run = lambda layer: run_layer_calls(lib, tvm.cuda(0), layer)  # noqa: E731
    _check_layers(compiled, model, x, calls, run)
    times = measure_layers(path, calls, profile, tracker)
    assert times.ok, times.error
    assert list(times.ms) == ["0", "2", "6", "8", "11"]
    assert all(math.isfinite(ms) and ms > 0 for ms in times.ms.values())


@pytest.mark.arm
def test_layers_are_timed_on_the_emulated_arm_board(
    tmp_path: Path, emulated_board: Tracker
) -> None:
    """Cross-compiled for aarch64: the layer library gives torch's layer outputs on the board
    and every layer gets a time there."""
    key = EMULATED_KEY
    profile = _quick(load_profile("arm/qemu-aarch64"), key)
    model, x = small_sparse_net(), torch.randn(1, 3, 16, 16)
    compiled = hw_compile.build(model, x, profile, kernel_choice="sparse")
    path = tmp_path / "layers.so"
    inputs = _layer_inputs(model, x, [plan.name for plan in compiled.layer_plans])
    calls = compiled.export_layer_library(path, inputs=inputs)
    assert path.read_bytes()[18] == 183  # e_machine EM_AARCH64

    def check_on_board(tr: Tracker) -> None:
        remote = request_session(tr, key, timeout_s=60)
        remote.upload(str(path))
        lib, dev = remote.load_module(path.name), remote.cpu(0)
        _check_layers(compiled, model, x, calls, lambda layer: run_layer_calls(lib, dev, layer))

    check_on_board(emulated_board)
    gc.collect()  # the session is released: the board has one server
    times = measure_layers(path, calls, profile, emulated_board)
    assert times.ok, times.error
    assert list(times.ms) == ["0", "2", "6", "8", "11"]
    assert all(math.isfinite(ms) and ms > 0 for ms in times.ms.values())
