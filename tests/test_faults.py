"""Faults and bad input: the search goes on, failed trials keep their reasons, nothing is lost."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import psutil
import pytest
import torch
from helpers import (
    assert_one_line_error,
    free_port,
    hwnas,
    kill,
    load_run,
    start_server,
    start_tracker,
    stop,
    trial_states,
    wait_for,
)
from torch import nn

from hw_profiles.measure import measure_library
from hw_profiles.profiles import load_profile
from hw_profiles.rpc import (
    DeviceError,
    Tracker,
    _ask,
    _tracker_socket,
    check_tracker,
    local_server,
    tracker_summary,
)
from nas.config import SearchConfig
from nas.search import search
from search_spaces import spaces
from search_spaces.spaces import Space, register_space


class _Faulty(nn.Module):
    """A small conv net that misbehaves in one named way."""

    def __init__(self, fault: str, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.fault = fault
        self.conv = nn.Conv2d(in_channels, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x)).mean((2, 3))
        if self.fault == "nan":
            y = y * float("nan")
        elif self.fault == "mismatch" and torch.compiler.is_exporting():
            y = y + 1.0  # the compiled graph differs from what torch runs
        elif self.fault == "compile":
            y = y + torch.fft.fft2(x).real.mean((2, 3))  # no TVM import for FFTs
        return self.head(y)


class FaultSpace(Space):
    description = "test only: candidates that fail in a chosen way"

    @property
    def choices(self) -> dict[str, tuple]:
        return {"fault": ("none", "nan", "mismatch", "compile")}

    def _build(self, arch, num_classes, in_channels, image_size, width_scale=1.0):
        return _Faulty(arch["fault"], in_channels, num_classes)


@pytest.fixture
def fault_space() -> Iterator[None]:
    """The test-only space, registered for the test that uses it and removed after, so that
    the registry tests, which go through every registered space, never see it."""
    register_space("test-faults")(FaultSpace)
    yield
    spaces._REGISTRY.pop("test-faults")


FAULTS = {"nan": "TrainingDiverged", "mismatch": "OutputMismatch", "compile": "CompileError"}


def test_failing_candidates_are_recorded_and_the_search_goes_on(
    tmp_path: Path, fault_space: None, x86_device: Tracker
) -> None:
    config = SearchConfig(
        out=str(tmp_path / "faults"),
        space="test-faults",
        trials=len(FAULTS) + 1,
        epochs=1,
        tracker=str(x86_device),
    )
    config.run_dir.mkdir()
    study = optuna.create_study(
        study_name=config.study_name,
        storage=config.storage_url,
        directions=["maximize", "minimize"],
    )
    for fault in (*FAULTS, "none"):
        study.enqueue_trial({"fault": fault})
    lines: list[str] = []
    search(config, progress=lines.append)

    *failed, complete = optuna.load_study(
        study_name=config.study_name, storage=config.storage_url
    ).trials
    for trial, reason in zip(failed, FAULTS.values(), strict=True):
        assert trial.state == optuna.trial.TrialState.FAIL
        assert trial.user_attrs["fail_reason"].startswith(reason)
        assert any("failed" in line and reason in line for line in lines)
    assert complete.state == optuna.trial.TrialState.COMPLETE


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, x86_device: Tracker) -> Path:
    """A real run of one trial on the tiny space, for the tests that must not damage it."""
    run = tmp_path_factory.mktemp("runs") / "kept"
    done = hwnas(
        *("search", "--space", "tiny-sparse", "--trials", "1", "--epochs", "1"),
        *("--tracker", str(x86_device), "--out", str(run)),
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return run


def test_a_corrupt_study_database_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    run = tmp_path / "corrupt"
    run.mkdir()
    (run / "study.db").write_bytes(b"this is not sqlite" * 100)
    before = _digest(run / "study.db")
    done = hwnas("search", "--out", str(run), "--trials", "1")
    assert_one_line_error(done, "study.db")
    assert _digest(run / "study.db") == before
    assert sorted(p.name for p in run.iterdir()) == ["study.db"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--device", "x86-local,arm/rpi4"], ["arm/rpi4", "--tracker"]),
        (["--trials", "-3"], ["--trials"]),
        (["--max-latency-ms", "0"], ["--max-latency-ms"]),
        (["--strategy", "nope"], ["nope"]),
        (["--tracker", "127.0.0.1:1"], ["127.0.0.1:1"]),
        (["--dataset", "folder:/nonexistent"], ["/nonexistent"]),
    ],
)
def test_bad_input_leaves_a_finished_study_intact_and_resumable(
    finished_run: Path, args: list[str], words: list[str]
) -> None:
    before = _digest(finished_run / "study.db")
    listing = sorted(p.name for p in finished_run.rglob("*"))
    done = hwnas("search", "--space", "tiny-sparse", "--out", str(finished_run), *args)
    assert_one_line_error(done, *words)
    assert _digest(finished_run / "study.db") == before
    assert sorted(p.name for p in finished_run.rglob("*")) == listing


def test_out_naming_another_studys_directory_is_refused(
    finished_run: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "renamed"
    copy.mkdir()
    (copy / "study.db").write_bytes((finished_run / "study.db").read_bytes())
    before = _digest(copy / "study.db")
    done = hwnas("search", "--space", "tiny-sparse", "--out", str(copy))
    assert_one_line_error(done, "kept", "--out")
    assert _digest(copy / "study.db") == before


def test_bad_profiles_and_configs_are_one_line_errors(tmp_path: Path) -> None:
    bad_toml = tmp_path / "board.toml"
    bad_toml.write_text('description = "x"\nkey = \n')
    assert_one_line_error(
        hwnas("search", "--device", str(bad_toml), "--out", str(tmp_path / "a")), "board.toml"
    )
    missing_field = tmp_path / "nokey.toml"
    missing_field.write_text('description = "a board"\nfamily = "x86"\n[target]\nkind = "llvm"\n')
    assert_one_line_error(
        hwnas("search", "--device", str(missing_field), "--out", str(tmp_path / "b")), "key"
    )
    config = tmp_path / "search.toml"
    config.write_text('trials = "many"\n')
    assert_one_line_error(hwnas("search", "--config", str(config)), "trials")
    config.write_text("epochz = 3\n")
    assert_one_line_error(hwnas("search", "--config", str(config)), "epochz")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_unknown_device_key_at_a_users_tracker(tmp_path: Path, x86_device: Tracker) -> None:
    """The tracker serves x86-local only; a search for x86/avx2 names both keys."""
    done = hwnas(
        *("search", "--device", "x86/avx2", "--tracker", str(x86_device)),
        *("--out", str(tmp_path / "run")),
    )
    assert_one_line_error(done, "x86-avx2", "x86-local")
    assert not (tmp_path / "run").exists()


def test_an_unwritable_artifacts_directory_is_refused(finished_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "kept"  # the same study name, so only the artifacts stand in the way
    run.mkdir()
    for name in ("study.db", "config.toml"):
        (run / name).write_bytes((finished_run / name).read_bytes())
    (run / "trials").write_text("a file where the artifacts directory should be")
    before = _digest(run / "study.db")
    done = hwnas("search", "--space", "tiny-sparse", "--trials", "2", "--out", str(run))
    assert_one_line_error(done, "trials", "writable")
    assert _digest(run / "study.db") == before


def _busy_server_pid(server_pids: list[int]) -> int | None:
    """The server whose session worker is running: TVM's server listens in a popen worker (its
    child from the start), which forks one process per session."""
    for pid in server_pids:
        try:
            if any(worker.children() for worker in psutil.Process(pid).children()):
                return pid
        except psutil.NoSuchProcess:
            continue
    return None


def _build_slow_library(lib: Path) -> None:
    """A 256x256 matmul and relu, built for this machine into `lib`: long enough to time that
    a test can kill the server while it is busy."""
    import tvm
    from tvm.script import relax as R

    @tvm.script.ir_module
    class Slow:
        @R.function
        def main(x: R.Tensor((256, 256), "float32")) -> R.Tensor((256, 256), "float32"):
            y = R.matmul(x, x)
            return R.nn.relu(y)

    tvm.compile(Slow, target=tvm.target.Target({"kind": "llvm"})).export_library(str(lib))


def test_a_server_killed_mid_measurement_hands_its_work_to_another(
    tmp_path: Path, user_tracker: Tracker
) -> None:
    lib = tmp_path / "slow.so"
    _build_slow_library(lib)
    x = np.random.default_rng(0).standard_normal((256, 256)).astype("float32")
    key = "hwnas-test-handover"  # two servers of their own on the shared tracker
    profile = dataclasses.replace(load_profile("x86-local"), key=key)
    tracker = user_tracker
    result: dict[str, Any] = {}
    with local_server(tracker, key) as a, local_server(tracker, key) as b:
        thread = threading.Thread(
            target=lambda: result.update(m=measure_library(lib, [x], profile, tracker))
        )
        thread.start()
        deadline = time.monotonic() + 60
        while (victim := _busy_server_pid([a.pid, b.pid])) is None:
            assert time.monotonic() < deadline, "no server took the measurement"
            time.sleep(0.05)
        os.killpg(victim, signal.SIGKILL)
        thread.join(timeout=300)
        m = result["m"]
        assert m.error is None, m.error
        assert m.median_ms > 0
        # The survivor is free again, the killed one is gone from the tracker.
        back = {"free": 1, "busy": 0, "pending": 0}
        wait_for(lambda: tracker_summary(tracker)[key] == back, "the survivor alone", 15)


@contextlib.contextmanager
def _registered_but_gone(tracker: Tracker, key: str) -> Iterator[None]:
    """A free server under `key` at the tracker, as TVM's server registers one, whose process
    has stopped: nothing listens at its address."""
    from tvm.rpc import base

    port = free_port()
    with contextlib.closing(_tracker_socket(tracker, 5.0)) as sock:
        info = {"key": f"server:{key}", "addr": ["127.0.0.1", port]}
        for message in (
            [base.TrackerCode.UPDATE_INFO, info],
            [base.TrackerCode.PUT, key, [port, "gone"], None],
        ):
            assert _ask(sock, message) == base.TrackerCode.SUCCESS
        yield


def test_a_server_gone_since_it_registered_costs_a_retry_not_the_measurement(
    tmp_path: Path, user_tracker: Tracker
) -> None:
    """The tracker hands out the first free server under a key; if it has stopped since, the
    measurement asks again (the tracker has dropped it) and another server takes it."""
    lib = tmp_path / "slow.so"
    _build_slow_library(lib)
    x = np.random.default_rng(0).standard_normal((256, 256)).astype("float32")
    key = "hwnas-test-gone"
    profile = dataclasses.replace(load_profile("x86-local"), key=key)
    no_retry = dataclasses.replace(
        profile, protocol=dataclasses.replace(profile.protocol, retries=0)
    )
    # The gone server registered first, so it is first in line.
    with _registered_but_gone(user_tracker, key), local_server(user_tracker, key):
        gone = measure_library(lib, [x], no_retry, user_tracker)
        assert gone.error is not None and gone.error.startswith("request: cannot open a session")
    with _registered_but_gone(user_tracker, key), local_server(user_tracker, key):
        m = measure_library(lib, [x], profile, user_tracker)
        assert m.error is None, m.error
        assert m.median_ms > 0


def test_a_registered_server_that_takes_no_session_is_named_as_such(
    user_tracker: Tracker,
) -> None:
    """TVM's server stays registered when it stops serving; the error says so, not 'no server'."""
    from hw_profiles.rpc import request_session

    with local_server(user_tracker, "held"):
        session = request_session(user_tracker, "held", timeout_s=30)
        with pytest.raises(DeviceError, match="took no session"):
            request_session(user_tracker, "held", timeout_s=3)
        del session


def test_the_search_survives_its_tracker_restarting(tmp_path: Path) -> None:
    port = free_port()
    tracker_at = Tracker("127.0.0.1", port)
    tracker = start_tracker(port)
    server = search_proc = None
    run = tmp_path / "restart"
    try:
        wait_for(lambda: tracker_summary(tracker_at) is not None, "the tracker")
        server = start_server(port, "x86-local")
        wait_for(lambda: tracker_summary(tracker_at).get("x86-local"), "the server")
        err = tmp_path / "search.err"  # a file, not a pipe: a full pipe would stall the search
        with err.open("w") as log:
            search_proc = subprocess.Popen(
                [
                    sys.executable,
                    *("-m", "nas.cli", "search", "--space", "tiny-sparse", "--epochs", "1"),
                    *("--trials", "3", "--out", str(run), "--tracker", f"127.0.0.1:{port}"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + 300
        while "COMPLETE" not in trial_states(run / "study.db"):
            assert search_proc.poll() is None, f"the search ended early: {err.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.3)
        kill(tracker)  # with the worker TVM serves from: nothing answers on the port now
        with pytest.raises(DeviceError):
            check_tracker(tracker_at)
        tracker = start_tracker(port)
        search_proc.wait(timeout=600)
        assert search_proc.returncode == 0, err.read_text()[-3000:]
    finally:
        if search_proc is not None and search_proc.poll() is None:
            search_proc.kill()
        stop(server, tracker)
    study = load_run(run)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert len(complete) + len(failed) == 3
    assert len(complete) >= 2  # the trials after the restart were measured
    assert all(t.user_attrs["fail_reason"] for t in failed)
