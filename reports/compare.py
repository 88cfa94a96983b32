"""Several runs (strategies) on one page: their fronts together and their hypervolume over
trials against one common reference point, so that the curves compare.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from reports.info import (
    REFERENCE_LATENCY_FACTOR,
    HypervolumePoint,
    ReportError,
    ReportInfo,
    TrialPoint,
    build_info,
    hypervolume_history,
)


@dataclass
class RunSummary:
    """One run of the comparison, measured against the comparison's common reference."""

    label: str
    info: ReportInfo
    strategy: str
    device: str
    hypervolume: float
    hypervolume_history: list[HypervolumePoint]
    most_accurate: TrialPoint | None
    fastest: TrialPoint | None

    @property
    def n_trials(self) -> int:
        """Trials that finished, completed or failed (what the run's budget paid for)."""
        return len(self.info.trials) + len(self.info.failed)


@dataclass
class ComparisonInfo:
    """Everything the comparison page renders; computed once, asserted on by tests."""

    runs: list[RunSummary]
    reference_latency_ms: float | None
    accuracy_scale: float
    warnings: list[str] = field(default_factory=list)


def build_comparison_info(
    run_dirs: Sequence[str | Path], *, study_names: Sequence[str | None] | None = None
) -> ComparisonInfo:
    """Read every run and measure each one's fronts against one shared reference point.

    The reference latency is 1.1 x the slowest completed trial of all runs (on each run's first
    device), so a larger hypervolume means a better front in every run's terms.
    """
    if not run_dirs:
        raise ReportError("no run to compare; pass one or more run directories")
    names = list(study_names) if study_names is not None else [None] * len(run_dirs)
    if len(names) != len(run_dirs):
        raise ReportError("pass one study name per run directory, or none")
    infos = [build_info(run, study_name=name) for run, name in zip(run_dirs, names, strict=True)]

    latencies = [p.latency_ms for info in infos for p in info.trials]
    reference = max(latencies) * REFERENCE_LATENCY_FACTOR if latencies else None
    scale = max((info.accuracy_scale for info in infos), default=1.0)
    labels = _unique_labels(infos)
    runs = []
    for label, info in zip(labels, infos, strict=True):
        history = hypervolume_history(info.trials, reference, scale) if reference else []
        runs.append(
            RunSummary(
                label=label,
                info=info,
                strategy=str(info.study_attrs.get("strategy", "unknown")),
                device=info.devices[0].device if info.devices else "unknown",
                hypervolume=history[-1].hypervolume if history else 0.0,
                hypervolume_history=history,
                most_accurate=max(info.trials, key=lambda p: (p.accuracy, -p.latency_ms))
                if info.trials
                else None,
                fastest=min(info.trials, key=lambda p: (p.latency_ms, -p.accuracy))
                if info.trials
                else None,
            )
        )
    return ComparisonInfo(runs, reference, scale, _warnings(runs))


def _unique_labels(infos: Sequence[ReportInfo]) -> list[str]:
    """The run directory's name, with its parent (then an index) when two names collide."""
    labels = [info.run_dir.name or str(info.run_dir) for info in infos]
    if len(set(labels)) < len(labels):
        labels = [f"{info.run_dir.parent.name}/{info.run_dir.name}".lstrip("/") for info in infos]
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return unique


def _warnings(runs: Sequence[RunSummary]) -> list[str]:
    notes = []
    devices = sorted({r.device for r in runs})
    if len(devices) > 1:
        notes.append(
            f"The runs were measured on different devices ({', '.join(devices)}); their "
            "latencies, and so their hypervolumes, do not compare."
        )
    datasets = sorted({str(r.info.study_attrs.get("dataset", "?")) for r in runs})
    if len(datasets) > 1:
        notes.append(
            f"The runs used different datasets ({', '.join(datasets)}); their accuracies do "
            "not compare."
        )
    for r in runs:
        if not r.info.trials:
            notes.append(f"Run {r.label} has no completed trial yet.")
    return notes
