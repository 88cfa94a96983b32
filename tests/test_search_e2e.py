"""End to end: `hwnas search` on the embedded defaults, through TVM and RPC, to a report."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from helpers import assert_one_line_error, hwnas, load_run


def test_search_writes_study_and_report(tmp_path: Path) -> None:
    """The defaults (mbv2-sparse, random, x86-local on a tracker and server the search starts
    for itself): one trial, its files, the study and the report. (A larger budget resuming the
    run is tested on tiny-sparse, in test_search_boards.py.)"""
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


def test_a_darts_search_completes_its_trials(tmp_path: Path) -> None:
    """`darts-sparse` on the digits: every candidate compiles to torch's output and is timed.
    Its cells' batch norms after poolings and concats were computed by TVM with the batch's
    statistics, and every trial failed its output check."""
    run = tmp_path / "darts"
    args = ["search", "--space", "darts-sparse", "--trials", "2", "--epochs", "1"]
    done = hwnas(*args, "--out", str(run), "--seed", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    study = load_run(run)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 2, [t.user_attrs.get("fail_reason") for t in study.trials]
    assert all(t.values[1] > 0 for t in complete)
