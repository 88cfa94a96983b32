"""Load: 200 quick trials from three workers on three servers with one key keep every trial.

Slow (several minutes): `make test-all` or `pytest -m slow`. It prints the loop's overhead per
trial; benchmarks/RESULTS.md keeps the measured figures."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from hw_profiles.rpc import local_server, local_tracker


@pytest.mark.slow
def test_two_hundred_trials_from_three_workers_keep_every_trial(tmp_path: Path) -> None:
    run = tmp_path / "load"
    with (
        local_tracker() as tracker,
        local_server(tracker, "x86-local"),
        local_server(tracker, "x86-local"),
        local_server(tracker, "x86-local"),
    ):
        started = time.monotonic()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "nas.cli",
                "search",
                "--space",
                "tiny-sparse",
                "--epochs",
                "1",
                "--trials",
                "200",
                "--workers",
                "3",
                "--out",
                str(run),
                "--tracker",
                f"{tracker.host}:{tracker.port}",
            ],
            capture_output=True,
            text=True,
            timeout=3000,
        )
        wall = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name=run.name, storage=f"sqlite:///{run / 'study.db'}")
    trials = study.trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert 200 <= len(complete) <= 202  # a worker may start one as another finishes the last
    assert len(complete) == len(trials)  # nothing failed, nothing left RUNNING
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    fresh = [t for t in complete if "same_as_trial" not in t.user_attrs]
    overhead = [t.user_attrs["compile_s"] + t.user_attrs["measure_s"] for t in fresh]
    print(
        f"\n{len(complete)} trials in {wall:.0f} s ({3600 * len(complete) / wall:.0f}/h); "
        f"{len(fresh)} evaluated, {len(complete) - len(fresh)} reused; median overhead of an "
        f"evaluated trial {statistics.median(overhead):.2f} s"
    )
