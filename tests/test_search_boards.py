"""End to end: `hwnas search` on devices it does not start itself: a device the user attached
with TVM's own tracker and server (conftest's `x86_device`), and the emulated aarch64 board.
(Apart from test_search_e2e.py so that pytest-xdist can run the two files side by side.)"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from helpers import hwnas, load_run, wait_for

from hw_profiles.profiles import load_profile
from hw_profiles.rpc import Tracker, tracker_summary


@pytest.mark.arm
def test_search_on_the_emulated_arm_board(tmp_path: Path) -> None:
    """The whole loop on an aarch64 board under qemu: cross-compiled, checked against torch on
    the board, timed there."""
    run = tmp_path / "arm"
    done = hwnas(
        "search",
        "--space",
        "tiny-sparse",
        "--epochs",
        "1",
        "--trials",
        "1",
        "--device",
        "qemu-aarch64",
        "--out",
        str(run),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    study = load_run(run)
    (trial,) = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert trial.values[1] > 0
    assert study.user_attrs["emulated"] is True
    assert "not performance figures" in (run / "report.html").read_text()
    lib = (run / "trials" / str(trial.number) / "model.so").read_bytes()
    assert lib[:4] == b"\x7fELF" and lib[18] == 183  # e_machine EM_AARCH64


def test_a_baseline_run_evaluates_each_archs_baseline(tmp_path: Path, x86_device: Tracker) -> None:
    run = tmp_path / "small-dense"
    args = ["search", "--space", "tiny-sparse", "--epochs", "1", "--trials", "1"]
    args += ["--tracker", str(x86_device), "--out"]
    done = hwnas(*args, str(run), "--baseline", "small-dense")
    assert done.returncode == 0, done.stderr[-3000:]
    study = load_run(run)
    (trial,) = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert trial.user_attrs["baseline"] == "small-dense"
    assert trial.user_attrs["sparse_layers"] == 0  # a dense net, narrowed to the arch's nnz
    assert study.user_attrs["strategy"] == "random (small-dense baseline)"
    bad = hwnas(*args, str(tmp_path / "bad"), "--baseline", "medium-dense")
    assert bad.returncode == 2 and "medium-dense" in bad.stderr


# tpe's and nsga2's sampling is tested on a toy space (test_strategies.py); through the CLI
# they share random's path, so one Optuna sampler and the NNI adapter run here.
def test_strategies_compared_on_an_equal_budget(tmp_path: Path, x86_device: Tracker) -> None:
    group = tmp_path / "group"
    done = hwnas(
        "search",
        *("--space", "tiny-sparse", "--epochs", "1", "--trials", "50"),
        # Six seconds each: the first trial starts at once (the device is attached already),
        # so each strategy finishes at least one before its minutes run out, and far from 50.
        *("--budget-minutes", "0.1"),
        *("--strategy", "nsga2,nni-evolution", "--tracker", str(x86_device)),
        *("--out", str(group)),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for strategy in ("nsga2", "nni-evolution"):
        study = load_run(group / strategy)
        finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        assert 1 <= len(finished) < 50  # the minutes ran out before the trials did
        assert study.user_attrs["strategy"] == strategy
        assert (group / strategy / "report.html").exists()
    comparison = (group / "comparison.html").read_text()
    assert "nni-evolution" in comparison and "nsga2" in comparison


def test_search_on_a_device_the_user_attached_with_dense_twin_and_layer_times(
    tmp_path: Path, x86_device: Tracker
) -> None:
    """A tracker and a server started with TVM's own commands, as a user would start them
    (conftest's `x86_device`); the dense twin and the per-layer times are measured on
    request."""
    key = load_profile("x86-local").key
    run = tmp_path / "attached"
    args = ["search", "--space", "tiny-sparse", "--trials", "1", "--epochs", "1", "--seed", "1"]
    args += ["--dense-twin", "--layer-times", "--out", str(run), "--tracker", str(x86_device)]
    done = hwnas(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    (trial,) = load_run(run).get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    # The device is free again once the search is over: the session was released.
    wait_for(lambda: tracker_summary(x86_device)[key]["free"] == 1, "the device back", 15)

    trial_dir = run / "trials" / str(trial.number)
    config = (run / "config.toml").read_text()
    assert trial.user_attrs["dense_twin_ms"] > 0
    assert (trial_dir / "dense_twin.so").exists()
    assert "dense_twin = true" in config

    layer_ms = trial.user_attrs["layer_ms"]
    # Every layer on our kernels (stem, 1x1 conv, classifier) has its time from the device.
    assert list(layer_ms) == list(trial.user_attrs["kernels"]) and len(layer_ms) == 3
    assert all(ms > 0 for ms in layer_ms.values())
    assert "layer_ms_error" not in trial.user_attrs
    assert (trial_dir / "layers.so").exists()
    assert "layer_times = true" in config
    html = (run / "report.html").read_text()
    assert "Times measured on the device (x86/local)" in html
    assert "time on the device (ms)" in html
    assert html.count("class='time-bar'") == len(layer_ms)

    # The same command with a larger budget resumes: the finished trial stays, none is repeated.
    args[args.index("--trials") + 1] = "2"
    again = hwnas(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    study = load_run(run)
    resumed = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert [t.number for t in resumed] == [0, 1]
    assert resumed[0].values == trial.values
    assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
