"""RPC devices and measurement against a real TVM tracker and server on 127.0.0.1 (no mocks):
subprocesses come and go with their context managers, a real library is timed, and device
failures come back as data."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from hw_profiles import (
    DeviceError,
    Measurement,
    Tracker,
    check_device,
    check_tracker,
    format_check,
    format_devices,
    load_profile,
    local_server,
    local_tracker,
    measure_library,
    parse_tracker,
    request_session,
    tracker_summary,
)
from hw_profiles.measure import _calibrate_number
from hw_profiles.profiles import Profile

KEY = "hwnas-test-cpu"
SIZE = 32


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def _group_alive(pgid: int) -> bool:
    """A process of the group runs (a zombie, awaiting init's reaping, does not)."""
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return False


def _free(tracker: Tracker, key: str) -> int:
    return tracker_summary(tracker).get(key, {}).get("free", 0)


@pytest.fixture(scope="module")
def tracker(user_tracker: Tracker) -> Iterator[Tracker]:
    """The shared tracker (conftest), with a server of this module's own key."""
    with local_server(user_tracker, KEY):
        yield user_tracker


@pytest.fixture(scope="module")
def profile() -> Profile:
    """The host CPU with a short protocol, served under the test key."""
    base = load_profile("x86/local")
    quick = dataclasses.replace(
        base.protocol, warmup=2, min_repeat_ms=5.0, repeats=5, remeasure=1, timeout_s=60.0
    )
    return dataclasses.replace(base, key=KEY, protocol=quick)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Relax module computing x @ w + 1, built for the host like `compile` builds models."""
    import tvm
    from tvm import relax

    shape = relax.TensorType((SIZE, SIZE), "float32")
    builder = relax.BlockBuilder()
    x, w = relax.Var("x", shape), relax.Var("w", shape)
    with builder.function("main", [x, w]):
        with builder.dataflow():
            y = builder.emit(relax.op.matmul(x, w))
            out = builder.emit_output(relax.op.add(y, relax.const(1.0, "float32")))
        builder.emit_func_output(out)
    executable = tvm.compile(builder.get(), target=tvm.target.Target({"kind": "llvm"}))
    path = tmp_path_factory.mktemp("lib") / "matmul.so"
    executable.export_library(str(path))
    return path


def _inputs(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((SIZE, SIZE)).astype(np.float32) for _ in range(2)]


def _assert_sane(m: Measurement, profile: Profile) -> None:
    assert m.error is None, m.error
    assert m.ok and m.key == profile.key
    assert m.median_ms is not None and m.median_ms > 0
    assert m.p10_ms is not None and m.p90_ms is not None and m.cv is not None
    assert m.p10_ms <= m.median_ms <= m.p90_ms
    assert m.cv >= 0 and m.number >= 1 and m.repeats == profile.protocol.repeats
    # `number` was calibrated so that one repeat lasts at least min_repeat_ms (or hit the cap).
    assert m.number * m.median_ms >= 0.5 * profile.protocol.min_repeat_ms or m.number > 10_000


@pytest.mark.parametrize("cold", [1.0, 1.1, 1.6, 40.0])
def test_calibration_makes_a_repeat_last_about_min_repeat_ms(cold: float) -> None:
    """`number` is scaled by what each calibration round took: a first call slower than the
    rest (cold caches) costs a round, not a repeat twice as long as asked."""
    protocol = load_profile("x86-local").protocol
    per_call_s = 63e-6
    calls: list[int] = []

    def timer(number: int, repeat: int, cooldown_ms: float) -> np.ndarray:
        calls.append(number)  # each call's time is per_call_s, the very first `cold` times that
        first = cold if len(calls) == 1 else 1.0
        return np.full(repeat, per_call_s * (number - 1 + first) / number)

    number = _calibrate_number(timer, protocol)
    assert protocol.min_repeat_ms <= number * per_call_s * 1e3 <= 1.15 * protocol.min_repeat_ms
    assert len(calls) <= 3


@pytest.mark.parametrize("text", ["127.0.0.1:9190", "tracker.lab:80", "[::1]:9190"])
def test_parse_tracker_accepts_host_port(text: str) -> None:
    tracker = parse_tracker(text)
    assert tracker.port == int(text.rsplit(":", 1)[1])
    assert tracker.host == text.rsplit(":", 1)[0].strip("[]")


@pytest.mark.parametrize("text", ["", "9190", "host:", ":9190", "host:port", "host:70000"])
def test_parse_tracker_rejects_bad_forms(text: str) -> None:
    with pytest.raises(DeviceError, match="HOST:PORT"):
        parse_tracker(text)


def test_check_tracker_on_a_closed_port_fails_fast() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        started = time.monotonic()
        with pytest.raises(DeviceError, match="hwnas devices tracker"):
            check_tracker(Tracker("127.0.0.1", port))
    # TVM's own client retries a refused tracker for 60 s; ours must give up at once.
    assert time.monotonic() - started < 30


def test_server_is_listed_free(tracker: Tracker) -> None:
    summary = tracker_summary(tracker)
    assert summary[KEY]["free"] >= 1 and summary[KEY]["pending"] == 0


def test_a_server_in_a_session_is_listed_busy(tracker: Tracker, profile: Profile) -> None:
    """A board that is measuring stays in `hwnas devices list`, as busy (TVM's tracker counts
    it neither free nor pending until the session ends)."""
    session = request_session(tracker, KEY, 30.0)
    try:
        assert tracker_summary(tracker)[KEY] == {"free": 0, "busy": 1, "pending": 0}
        listing = format_devices(tracker_summary(tracker), [profile], tracker).splitlines()
        assert [line.split()[:4] for line in listing if line.startswith(KEY)] == [
            [KEY, "0", "1", "0"]
        ]
    finally:
        del session
    assert _wait_for(lambda: tracker_summary(tracker)[KEY] == {"free": 1, "busy": 0, "pending": 0})


def test_context_managers_stop_their_processes() -> None:
    with local_tracker() as tr:
        with local_server(tr, "hwnas-test-brief") as server:
            assert tracker_summary(tr)["hwnas-test-brief"]["free"] == 1
            assert _group_alive(server.pid)
        assert not _group_alive(server.pid)
        assert _wait_for(lambda: "hwnas-test-brief" not in tracker_summary(tr), 10)
    with pytest.raises(DeviceError):
        check_tracker(tr)


def test_measure_library_times_a_real_library(
    tracker: Tracker, profile: Profile, library: Path
) -> None:
    measurement = measure_library(library, _inputs(), profile, tracker)
    _assert_sane(measurement, profile)
    # The session is released: the server registers as free again.
    assert _wait_for(lambda: _free(tracker, KEY) >= 1, 15)


def test_session_runs_the_library_correctly(tracker: Tracker, library: Path) -> None:
    from tvm import relax, runtime

    remote = request_session(tracker, KEY, timeout_s=20)
    remote.upload(str(library))
    dev = remote.cpu(0)
    vm = relax.VirtualMachine(remote.load_module(library.name), dev)
    x, w = _inputs(1)
    got = vm["main"](runtime.tensor(x, dev), runtime.tensor(w, dev)).numpy()
    np.testing.assert_allclose(got, x @ w + 1, rtol=1e-4, atol=1e-4)


def test_unknown_key_is_an_error_not_a_hang(
    tracker: Tracker, profile: Profile, library: Path
) -> None:
    nobody = dataclasses.replace(profile, key="hwnas-test-nobody")
    measurement = measure_library(library, _inputs(), nobody, tracker, request_timeout_s=2)
    assert not measurement.ok and measurement.median_ms is None
    assert measurement.error.startswith("request:") and "hwnas-test-nobody" in measurement.error
    with pytest.raises(DeviceError, match="hwnas-test-nobody"):
        request_session(tracker, "hwnas-test-nobody", timeout_s=1)


def test_failures_name_their_step(
    tracker: Tracker, profile: Profile, library: Path, tmp_path: Path
) -> None:
    missing = measure_library(tmp_path / "none.so", _inputs(), profile, tracker)
    assert missing.error is not None and missing.error.startswith("upload:")
    garbage = tmp_path / "garbage.so"
    garbage.write_bytes(b"not a shared library")
    bad_lib = measure_library(garbage, _inputs(), profile, tracker)
    assert bad_lib.error is not None and bad_lib.error.startswith("load:")
    too_few = measure_library(library, _inputs()[:1], profile, tracker)
    assert too_few.error is not None and too_few.error.startswith("warmup:")
    closed = measure_library(library, _inputs(), profile, Tracker("127.0.0.1", 1))
    assert closed.error is not None and "cannot reach the RPC tracker" in closed.error
    # None of these left the device busy.
    assert _wait_for(lambda: _free(tracker, KEY) >= 1, 15)


def test_check_device_runs_the_probe(tracker: Tracker, profile: Profile) -> None:
    result = check_device(profile, tracker, size=64)
    assert result.ok, result.error
    assert result.gflops is not None and result.gflops > 0
    assert result.max_error is not None and result.max_error < 1e-4
    assert result.cv is not None and result.cv >= 0
    assert format_check(result).startswith("ok")
    listing = format_devices(tracker_summary(tracker), [profile], tracker)
    assert KEY in listing and profile.name in listing


def test_check_device_reports_a_missing_device(tracker: Tracker, profile: Profile) -> None:
    nobody = dataclasses.replace(profile, key="hwnas-test-absent")
    result = check_device(nobody, tracker, size=16, request_timeout_s=1)
    assert not result.ok and result.error.startswith("request:")
    assert format_check(result).startswith("FAIL")


def test_server_started_the_way_a_user_would(
    tracker: Tracker, profile: Profile, library: Path
) -> None:
    key = "hwnas-test-user"
    command = [sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", str(tracker)]
    command += ["--key", key, "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        assert _wait_for(lambda: _free(tracker, key) >= 1, 60), "user's server never registered"
        user = dataclasses.replace(profile, key=key)
        _assert_sane(measure_library(library, _inputs(), user, tracker), user)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def test_a_step_past_its_limit_is_an_error(
    tracker: Tracker, profile: Profile, library: Path
) -> None:
    # Calibrating to 300 ms repeats cannot finish within a 0.05 s step limit.
    slow = dataclasses.replace(profile.protocol, min_repeat_ms=300.0, timeout_s=0.05)
    hasty = dataclasses.replace(profile, protocol=slow)
    measurement = measure_library(library, _inputs(), hasty, tracker)
    assert not measurement.ok and "no answer within 0.05s" in measurement.error
    # The abandoned session ends (the server enforces its own limit) and the device is back.
    assert _wait_for(lambda: _free(tracker, KEY) >= 1, 30)


@pytest.mark.gpu
def test_check_device_on_the_local_gpu() -> None:
    import tvm

    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA device visible to TVM")
    arch = "sm_" + tvm.cuda(0).compute_version.replace(".", "")
    base = load_profile("cuda/h100")
    gpu = dataclasses.replace(
        base, key="hwnas-test-gpu", target={**base.target, "arch": arch}, cross_compiler=None
    )
    with local_tracker() as tr, local_server(tr, gpu.key):
        result = check_device(gpu, tr, size=256)
    assert result.ok, result.error
    assert result.gflops is not None and result.gflops > 0


def test_two_servers_with_one_key_share_the_work(
    tracker: Tracker, profile: Profile, library: Path
) -> None:
    """While one server is held by a session, a measurement under the same key is served by
    the other; with both held, the next request waits and names the key when it gives up."""
    key = "hwnas-test-pair"
    pair = dataclasses.replace(profile, key=key)
    with local_server(tracker, key), local_server(tracker, key):
        assert tracker_summary(tracker)[key]["free"] == 2
        held = request_session(tracker, key, timeout_s=30.0)
        try:
            assert tracker_summary(tracker)[key]["free"] == 1
            m = measure_library(library, _inputs(), pair, tracker)
            _assert_sane(m, pair)
            other = request_session(tracker, key, timeout_s=30.0)
            try:
                busy = measure_library(library, _inputs(), pair, tracker, request_timeout_s=2.0)
                assert busy.error is not None and busy.error.startswith("request")
            finally:
                del other
        finally:
            del held
        wait_for_free = time.monotonic() + 30
        while tracker_summary(tracker)[key]["free"] < 2 and time.monotonic() < wait_for_free:
            time.sleep(0.2)
        assert tracker_summary(tracker)[key]["free"] == 2
