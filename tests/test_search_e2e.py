"""End to end: `hwnas search` on the embedded defaults, through TVM and RPC, to a report."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from helpers import assert_one_line_error, hwnas, load_run

from hw_profiles.profiles import load_profile
from hw_profiles.rpc import Tracker, tracker_summary


def test_search_writes_study_and_report(tmp_path: Path) -> None:
    """The defaults (mbv2-sparse, random, x86-local on a tracker and server the search starts
    for itself): one trial, its files, the study and the report. (A larger budget resuming the
    run is tested on tiny-sparse, in the attached-device test.)"""
    run = tmp_path / "demo"
    args = ["search", "--trials", "1", "--epochs", "1", "--out", str(run), "--seed", "3"]
    done = hwnas(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[1/1]" in done.stdout

    study = load_run(run)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 1, [t.user_attrs.get("fail_reason") for t in study.trials]
    assert study.metric_names == ["accuracy", "latency_ms"]
    for t in complete:
        accuracy, latency = t.values
        assert 0.0 <= accuracy <= 1.0
        assert latency > 0
        attrs = t.user_attrs
        assert set(attrs["arch"]) == set(t.params)
        # The classifier is always a SparseLinear, so every candidate runs a sparse kernel.
        assert attrs["sparse_layers"] >= 1
        assert attrs["nnz"] < attrs["params"]
        assert attrs["latency_p10_ms"] <= latency <= attrs["latency_p90_ms"]
        for key in ("compile_s", "measure_s", "latency_cv", "macs"):
            assert key in attrs
        assert (run / "trials" / str(t.number) / "model.so").exists()
    assert study.user_attrs["space"] == "mbv2-sparse"
    assert "trials = 1" in (run / "config.toml").read_text()

    report = run / "report.html"
    assert report.exists()
    html = report.read_text()
    assert "<svg" in html or "plotly" in html.lower()

    rerender = hwnas("report", str(run))
    assert rerender.returncode == 0, rerender.stderr
    assert report.exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--space", "no-such-space"], "no-such-space"),
        (["--strategy", "annealing"], "annealing"),
        (["--device", "no/such-board"], "no/such-board"),
        (["--trials", "0"], "--trials"),
        (["--dataset", "cifar10:/nonexistent/cifar"], "/nonexistent/cifar"),
        (["--tracker", "127.0.0.1:1"], "127.0.0.1:1"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, args: list[str], words: str
) -> None:
    run = tmp_path / "bad"
    done = hwnas("search", "--out", str(run), *args, timeout=120)
    assert_one_line_error(done, words)
    assert not run.exists()


def test_search_on_two_devices_has_one_latency_objective_each(tmp_path: Path) -> None:
    run = tmp_path / "two"
    done = hwnas(
        "search",
        "--space",
        "tiny-sparse",
        "--epochs",
        "1",
        "--trials",
        "1",
        "--device",
        "x86-local,x86/avx2",
        "--layer-times",
        "--out",
        str(run),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    study = load_run(run)
    assert study.metric_names == ["accuracy", "latency_ms:x86/local", "latency_ms:x86/avx2"]
    (trial,) = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trial.values) == 3 and all(v > 0 for v in trial.values[1:])
    per_device = trial.user_attrs["per_device"]
    assert list(per_device) == ["x86/local", "x86/avx2"]
    for name, figures in per_device.items():
        assert figures["latency_p10_ms"] <= figures["latency_ms"] <= figures["latency_p90_ms"]
        assert list(figures["layer_ms"]) == list(figures["kernels"])  # timed on each device
        assert (run / "trials" / "0" / name.replace("/", "-") / "model.so").exists()
    # Resuming with other devices would mix objectives: refused, and the study stays.
    again = hwnas("search", "--space", "tiny-sparse", "--trials", "2", "--out", str(run))
    assert again.returncode == 2
    assert "--device" in again.stderr
    assert len(load_run(run).trials) == 1


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


@pytest.mark.slow
def test_dass_enqueues_derived_archs_with_predicted_latency(tmp_path: Path) -> None:
    run = tmp_path / "dass"
    done = hwnas(
        "search",
        "--space",
        "mbv2-sparse",
        "--strategy",
        "dass",
        "--epochs",
        "1",
        "--trials",
        "2",
        "--out",
        str(run),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    study = load_run(run)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 2
    assert all(t.user_attrs["predicted_latency_ms"] > 0 for t in complete)
    assert (run / "latency_table.json").exists()


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
    assert tracker_summary(x86_device)[key]["free"] == 1

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
