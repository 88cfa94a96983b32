"""What the tests share: the CLI as a user runs it, TVM's own tracker and server as a user
starts them, a run's study, and a device profile for this host's CPU."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import psutil

# The key under which conftest's `emulated_board` serves the emulated aarch64 board.
EMULATED_KEY = "qemu-aarch64-shared-test"


@dataclass(frozen=True)
class LocalProfile:
    """The fields of hw_profiles.profiles.Profile that compile reads."""

    target: dict
    family: str = "x86"
    host: dict | None = None
    cross_compiler: str | None = None
    name: str = "test/host"


def host_profile() -> LocalProfile:
    """A profile for this machine's CPU, as LLVM names it."""
    from tvm.target import codegen

    return LocalProfile(target={"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})


def hwnas(
    *args: str, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`hwnas ARGS...` in a fresh process (in environment `env`, default this one's), its
    output captured."""
    return subprocess.run(
        [sys.executable, "-m", "nas.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def load_run(run: Path) -> optuna.Study:
    """The study a search wrote into run directory `run`. Not while a search may be creating it:
    read `trial_states` then."""
    return optuna.load_study(study_name=run.name, storage=f"sqlite:///{run / 'study.db'}")


def trial_states(db: Path) -> list[str]:
    """The trials' states in number order, read without writing: opening the study through
    Optuna while the search creates it races with the search's own schema set-up."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return [row[0] for row in conn.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.Error:  # not created yet, or mid-creation
        return []


def assert_one_line_error(done: subprocess.CompletedProcess, *words: str) -> None:
    """Bad input: exit code 2 and one line that names the problem (each of `words`)."""
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("hwnas: error: ")
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in lines[0], lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = 120.0) -> None:
    """Polls `condition` (an exception counts as not yet) until it is true."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except Exception:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def processes_tagged(tag: str) -> list[psutil.Process]:
    """Live processes whose environment has HWNAS_TEST_TAG=`tag`: a process a test started with
    it, and all that process started."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("HWNAS_TEST_TAG") == tag and proc.status() != "zombie":
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def start_tracker(port: int) -> subprocess.Popen:
    """`python -m tvm.exec.rpc_tracker` on 127.0.0.1:port, as a user starts it. TVM serves from
    a worker process it forks, so the tracker gets its own process group: `stop` and `kill`
    end both."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tvm.exec.rpc_tracker",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--port-end",
            str(port + 1),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def start_server(port: int, key: str) -> subprocess.Popen:
    """`python -m tvm.exec.rpc_server --tracker 127.0.0.1:port --key KEY`, as on a board (in
    its own process group, like `start_tracker`)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tvm.exec.rpc_server",
            "--tracker",
            f"127.0.0.1:{port}",
            "--key",
            key,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL a process started in a process group of its own (`start_tracker`,
    `start_server`) and all it forked, and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def stop(*procs: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    """Send `sig` to each process group (see `start_tracker`); SIGKILL what is left after
    `timeout` seconds."""
    for proc in procs:
        if proc is None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        kill(proc)


def small_sparse_net():
    """A 3x3 conv (im2col + matmul), a depthwise conv, a sparse 1x1 conv fused into the
    depthwise conv it feeds (75%, layer "4"), a sparse 1x1 conv alone (75%, "8") and a sparse
    Linear (50%, "11"), in eval mode, for a (1, 3, 16, 16) input."""
    import torch
    from torch import nn

    from search_spaces.ops import SparseConv2d, SparseLinear

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.ReLU6(),
        SparseConv2d(8, 16, 1, sparsity=0.75, pattern="block", block=(4, 1)),
        nn.ReLU6(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16),
        nn.ReLU(),
        SparseConv2d(16, 12, 1, sparsity=0.75, pattern="block", block=(4, 1)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        SparseLinear(12, 10, sparsity=0.5, pattern="block", block=(1, 4)),
    )
    for module in model.modules():
        if isinstance(module, (SparseConv2d, SparseLinear)):
            module.update_mask()
    return model.eval()
