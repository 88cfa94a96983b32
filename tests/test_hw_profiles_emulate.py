"""The emulated aarch64 board end to end: a real sysroot under qemu-user, TVM's stock RPC server
registered with a real local tracker, and a cross-compiled Relax module run on it."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
import tvm
from helpers import processes_tagged, wait_for
from tvm import relax, rpc
from tvm.support import cc, utils

from hw_profiles.emulate import BoardFiles, emulated_server, prepare_board
from hw_profiles.rpc import DeviceError, Tracker, tracker_summary

pytestmark = pytest.mark.arm

KEY = "arm64-qemu-test"
ARM_TARGET = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
AT_HWCAP, HWCAP_ASIMD, HWCAP_SVE = 16, 1 << 1, 1 << 22


@pytest.fixture(scope="module")
def board() -> BoardFiles:
    return prepare_board()


@pytest.fixture(scope="module")
def tracker(user_tracker: Tracker) -> Tracker:
    """The shared tracker (conftest)."""
    return user_tracker


def _hwcap(board: BoardFiles, **env: str) -> int:
    """AT_HWCAP as the board's Python sees it under the given environment."""
    code = f"import ctypes; print(ctypes.CDLL(None).getauxval({AT_HWCAP}))"
    environ = {k: v for k, v in os.environ.items() if k != "QEMU_CPU"} | env
    out = subprocess.run(
        [str(board.python), "-c", code], env=environ, capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def test_board_is_cached_and_defaults_to_a_cpu_without_sve(board: BoardFiles) -> None:
    assert prepare_board() == board
    assert (board.root / "board.json").is_file()
    default = _hwcap(board)
    assert default & HWCAP_ASIMD
    assert not default & HWCAP_SVE, "the wrapper's default CPU must not offer SVE"
    assert _hwcap(board, QEMU_CPU="max") & HWCAP_SVE  # the check above can fail


def test_unknown_cpu_is_refused(board: BoardFiles, tracker: Tracker) -> None:
    with pytest.raises(DeviceError, match="unknown CPU 'pentium'"):
        with emulated_server(tracker, KEY, cpu="pentium", board=board):
            pass


def _matmul_relu() -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 8), "float32"))
    w = relax.Var("w", relax.TensorType((8, 16), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.relu(relax.op.matmul(x, w)))
        bb.emit_func_output(out)
    return bb.get()


def test_cross_compiled_module_runs_on_the_emulated_board(
    board: BoardFiles, tracker: Tracker
) -> None:
    executable = tvm.compile(_matmul_relu(), target=tvm.target.Target(ARM_TARGET))
    workdir = utils.tempdir()
    lib_path = workdir.relpath("matmul_relu.so")
    executable.export_library(lib_path, fcompile=cc.cross_compiler("aarch64-linux-gnu-gcc"))
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((4, 8), dtype=np.float32)
    w_np = rng.standard_normal((8, 16), dtype=np.float32)

    with emulated_server(tracker, KEY, board=board):
        assert tracker_summary(tracker)[KEY]["free"] == 1
        client = rpc.connect_tracker(tracker.connect_host, tracker.port)
        remote = client.request(KEY, priority=1, session_timeout=0, max_retry=5)
        remote.upload(lib_path)
        dev = remote.cpu(0)
        vm = relax.VirtualMachine(remote.load_module("matmul_relu.so"), dev)
        x, w = tvm.runtime.tensor(x_np, dev), tvm.runtime.tensor(w_np, dev)
        result = vm["main"](x, w).numpy()
        timing = vm.time_evaluator("main", dev, number=2, repeat=1)(x, w)
        del vm, remote

    np.testing.assert_allclose(result, np.maximum(x_np @ w_np, 0), rtol=1e-5, atol=1e-5)
    assert timing.mean > 0
    # The server is gone after the block: the tracker drops it once it sees the connection close.
    wait_for(lambda: KEY not in tracker_summary(tracker), "the server gone from the tracker", 15)


_SERVE_UNTIL_KILLED = """
import sys, time
from hw_profiles.emulate import emulated_server
from hw_profiles.rpc import local_tracker
with local_tracker() as tracker, emulated_server(tracker, sys.argv[1]):
    print("serving", flush=True)
    time.sleep(600)
"""


def test_the_board_server_dies_with_a_killed_parent(board: BoardFiles) -> None:
    tag = uuid.uuid4().hex
    parent = subprocess.Popen(
        [sys.executable, "-c", _SERVE_UNTIL_KILLED, KEY],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "HWNAS_TEST_TAG": tag},
    )
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "serving"
        assert any("qemu" in proc.name() for proc in processes_tagged(tag))
        parent.kill()  # SIGKILL: the parent cannot stop what it started
        parent.wait(30)
        wait_for(lambda: not processes_tagged(tag), "the board's server to die too", 30)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(30)
