"""Turn a run's Optuna study into one self-contained HTML report (compute, then render)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from reports.compare import ComparisonInfo, RunSummary, build_comparison_info
from reports.info import (
    DeviceFront,
    FailedTrial,
    HypervolumePoint,
    LayerDetail,
    ReportError,
    ReportInfo,
    TrialPoint,
    build_info,
)
from reports.render import render_comparison_html, render_html

__all__ = [
    "ComparisonInfo",
    "DeviceFront",
    "FailedTrial",
    "HypervolumePoint",
    "LayerDetail",
    "ReportError",
    "ReportInfo",
    "RunSummary",
    "TrialPoint",
    "build_comparison_info",
    "build_info",
    "render_comparison_html",
    "render_html",
    "write_comparison",
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


def write_comparison(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Write one page comparing the runs (their fronts and hypervolume over trials) to ``out``."""
    info = build_comparison_info(run_dirs)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_comparison_html(info), encoding="utf-8")
    return path
