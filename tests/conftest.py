"""Devices the test modules share. Starting a TVM tracker or server takes two imports of TVM
(TVM forks a worker that imports it again), seconds each on a small machine, so the tests that
only need *a* device attach to these; the tests whose point is starting, stopping or losing a
device start their own."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from helpers import EMULATED_KEY, free_port, start_server, start_tracker, stop, wait_for

from hw_profiles.profiles import load_profile
from hw_profiles.rpc import Tracker, tracker_summary


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test`) the workers share the machine's cores: torch's default
    of a thread per core would oversubscribe them, and its OpenMP threads spin while they wait,
    which made the in-process training tests several times slower than one worker."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(workers)))


@pytest.fixture(scope="session")
def user_tracker() -> Iterator[Tracker]:
    """A tracker on 127.0.0.1 started with TVM's own command, as a user starts one; the tests
    attach servers of their own keys to it."""
    port = free_port()
    proc = start_tracker(port)
    tracker = Tracker("127.0.0.1", port)
    try:
        wait_for(lambda: tracker_summary(tracker) is not None, "the shared tracker")
        yield tracker
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def x86_device(user_tracker: Tracker) -> Iterator[Tracker]:
    """`user_tracker` with this machine served under the key of the x86-local profile by TVM's
    own `rpc_server`, as a user serves a board: `hwnas search --tracker` runs on it."""
    key = load_profile("x86-local").key
    proc = start_server(user_tracker.port, key)
    try:
        wait_for(lambda: tracker_summary(user_tracker)[key]["free"], "the shared x86 server")
        yield user_tracker
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def emulated_board(user_tracker: Tracker) -> Iterator[Tracker]:
    """`user_tracker` with the emulated aarch64 board (qemu-user) served under EMULATED_KEY."""
    from hw_profiles.emulate import emulated_server

    with emulated_server(user_tracker, EMULATED_KEY, cpu="cortex-a72"):
        yield user_tracker
