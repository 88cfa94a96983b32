"""Turn a run's Optuna study into one self-contained HTML report (compute, then render)."""

from __future__ import annotations

from pathlib import Path

from reports.info import (
    FailedTrial,
    HypervolumePoint,
    ReportError,
    ReportInfo,
    TrialPoint,
    build_info,
)
from reports.render import render_html

__all__ = [
    "FailedTrial",
    "HypervolumePoint",
    "ReportError",
    "ReportInfo",
    "TrialPoint",
    "build_info",
    "render_html",
    "write_report",
]


def write_report(
    run_dir: str | Path, out: str | Path | None = None, *, study_name: str | None = None
) -> Path:
    """Write the study's report to ``out``, by default ``<run_dir>/report.html``."""
    info = build_info(run_dir, study_name=study_name)
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(info), encoding="utf-8")
    return path
