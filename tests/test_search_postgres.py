"""Workers sharing one study in PostgreSQL (`--storage`), as workers on several machines would.

`make test` starts Debian's PostgreSQL on 127.0.0.1 (scripts/test-postgres.sh) and sets
HWNAS_TEST_POSTGRES to its URL."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import optuna
import pytest

from hw_profiles.rpc import Tracker

URL = os.environ.get("HWNAS_TEST_POSTGRES")
# Worker 0 starts its trials once the second worker has set up, so both get some of these.
TRIALS = "5"
pytestmark = pytest.mark.skipif(
    not URL, reason="HWNAS_TEST_POSTGRES is not set: run `make test`, which starts PostgreSQL"
)


def test_two_workers_share_a_postgresql_study_and_the_report_reads_it(
    tmp_path: Path, x86_device: Tracker
) -> None:
    run = tmp_path / f"pg-{uuid.uuid4().hex[:8]}"
    try:
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
                TRIALS,
                "--workers",
                "2",
                "--storage",
                URL,
                "--tracker",
                str(x86_device),
                "--out",
                str(run),
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert not (run / "study.db").exists()
        study = optuna.load_study(study_name=run.name, storage=URL)
        complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        assert int(TRIALS) <= len(complete) <= int(TRIALS) + 1
        assert len({t.user_attrs["worker"] for t in complete}) == 2
        assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
        assert run.name in (run / "report.html").read_text()
    finally:
        if run.name in optuna.get_all_study_names(URL):
            optuna.delete_study(study_name=run.name, storage=URL)
