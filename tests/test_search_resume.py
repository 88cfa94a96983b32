"""Resume after SIGKILL, several workers on one study, repeatable proposals under a seed."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from helpers import load_run, processes_tagged, trial_states

from hw_profiles.profiles import load_profile
from hw_profiles.rpc import Tracker
from nas.config import SearchConfig
from nas.search import INTERRUPTED, open_study
from nas.strategies import STRATEGIES, distributions, make_sampler
from search_spaces.spaces import get_space

TINY = ["--space", "tiny-sparse", "--epochs", "1"]
COMPLETE = (optuna.trial.TrialState.COMPLETE,)


def hwnas_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "nas.cli", *args]


def test_sigkilled_search_resumes_without_losing_or_repeating_a_trial(tmp_path: Path) -> None:
    """Killed while trial 1 runs, after trial 0 finished; the same command finishes the run."""
    run = tmp_path / "killed"
    args = hwnas_args("search", *TINY, "--trials", "2", "--out", str(run), "--seed", "5")
    tag = uuid.uuid4().hex
    proc = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HWNAS_TEST_TAG": tag},
    )
    deadline = time.monotonic() + 600
    try:
        # Kill it once a trial has finished and the next one is under way.
        while True:
            assert proc.poll() is None, "the search ended before it could be killed"
            assert time.monotonic() < deadline, "no trial finished in time"
            states = trial_states(run / "study.db")
            if "COMPLETE" in states and states[-1] == "RUNNING":
                break
            time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()

    before = {t.number: t.values for t in load_run(run).get_trials(states=COMPLETE)}
    assert before
    # The tracker and server it started went with it.
    gone = time.monotonic() + 30
    while processes_tagged(tag) and time.monotonic() < gone:
        time.sleep(0.5)
    assert not processes_tagged(tag)

    done = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    study = load_run(run)
    complete = study.get_trials(states=COMPLETE)
    assert len(complete) == 2
    # Finished trials are kept as they were, and none was evaluated again.
    assert {t.number: t.values for t in complete if t.number in before} == before
    archs = [
        tuple(sorted(t.params.items())) for t in complete if "same_as_trial" not in t.user_attrs
    ]
    assert len(archs) == len(set(archs))
    # The trial the kill interrupted is failed with that reason, and nothing is left RUNNING.
    failed = study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert [t.user_attrs["fail_reason"] for t in failed] == [INTERRUPTED]
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))


def test_two_workers_share_one_study_without_duplicate_work(
    tmp_path: Path, x86_device: Tracker
) -> None:
    run = tmp_path / "workers"
    # Worker 0 starts its trials once the second worker has set up (`_wait_until_ready`), so
    # both get some of the five.
    args = ("--trials", "5", "--workers", "2", "--tracker", str(x86_device), "--out", str(run))
    done = subprocess.run(
        hwnas_args("search", *TINY, *args),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    study = load_run(run)
    complete = study.get_trials(states=COMPLETE)
    # At most one trial over budget: a worker may start one while another finishes the last.
    assert 5 <= len(complete) <= 6
    assert len({t.user_attrs["worker"] for t in complete}) == 2
    evaluated = [t for t in complete if "same_as_trial" not in t.user_attrs]
    archs = [tuple(sorted(t.params.items())) for t in evaluated]
    assert len(archs) == len(set(archs))
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert (run / "report.html").exists()


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_one_seed_proposes_the_same_archs(strategy: str) -> None:
    choices = get_space("mbv2-sparse").choices
    dists = distributions(choices)

    def proposals(seed: int) -> list[dict]:
        study = optuna.create_study(
            directions=["maximize", "minimize"], sampler=make_sampler(strategy, seed, choices)
        )
        archs = []
        for i in range(6):
            trial = study.ask(dists)
            archs.append(trial.params)
            study.tell(trial, [i / 10, 1.0 + (i % 3)])
        return archs

    assert proposals(11) == proposals(11)
    assert proposals(11) != proposals(12)


def test_a_differentiable_searchs_worker_waits_for_the_derived_archs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers other than the first evaluate the archs the supernet search derives: they wait
    for them to be enqueued instead of sampling archs of their own."""
    import threading

    import nas.search

    monkeypatch.setattr(nas.search, "DERIVED_POLL_S", 0.05)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize"])
    derived = threading.Timer(
        0.5,
        lambda: optuna.load_study(study_name="s", storage=storage).set_user_attr(
            "derived_archs", [{"a": 1}]
        ),
    )
    lines: list[str] = []
    derived.start()
    try:
        nas.search._wait_for_derived_archs(study, lines.append)
    finally:
        derived.cancel()
    assert study.user_attrs["derived_archs"] == [{"a": 1}]
    assert any("waiting" in line for line in lines)
    lines.clear()
    nas.search._wait_for_derived_archs(study, lines.append)  # already there: no wait
    assert not lines


def test_a_trial_killed_before_it_named_its_worker_is_failed_on_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A search killed between asking for a trial and recording itself on it leaves a RUNNING
    trial with no worker: once older than the grace, it is failed as interrupted (so it neither
    stays RUNNING nor counts against the budget); a live worker's trial is left alone."""
    import nas.search

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage, directions=["maximize"])
    unnamed = study.ask()
    live = study.ask()
    live.set_user_attr("worker", nas.search._worker_id())
    nas.search.fail_orphaned_trials(study)
    assert study.trials[unnamed.number].state == optuna.trial.TrialState.RUNNING  # too young

    monkeypatch.setattr(nas.search, "ASK_GRACE_S", -1.0)
    nas.search.fail_orphaned_trials(study)
    trials = study.trials
    assert trials[unnamed.number].state == optuna.trial.TrialState.FAIL
    assert trials[unnamed.number].user_attrs["fail_reason"] == INTERRUPTED
    assert trials[live.number].state == optuna.trial.TrialState.RUNNING
    assert nas.search.counted_trials(study) == 1


def _read_until(url: str, polling, stop) -> None:
    """What optuna-dashboard, or a script showing a run's progress, does to the run's database
    (and opening a database that does not exist yet creates it and its tables)."""
    while not stop.is_set():
        with contextlib.suppress(Exception):
            optuna.get_all_study_names(url)
        polling.set()


def test_a_new_study_opens_while_another_process_opens_its_database(tmp_path: Path) -> None:
    space = get_space("tiny-sparse")
    profiles = [load_profile("x86-local")]
    context = multiprocessing.get_context("spawn")
    for i in range(3):
        config = SearchConfig(out=str(tmp_path / f"run{i}"), space="tiny-sparse")
        polling, stop = context.Event(), context.Event()
        reader = context.Process(target=_read_until, args=(config.storage_url, polling, stop))
        reader.start()
        try:
            assert polling.wait(60)
            study = open_study(config, space, profiles)  # creates the run's directory
        finally:
            stop.set()
            reader.join(30)
        assert study.study_name == f"run{i}"
        assert optuna.get_all_study_names(config.storage_url) == [f"run{i}"]
