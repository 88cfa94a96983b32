"""Compute everything the HTML report shows from an Optuna study, as a plain dataclass tree.

The study layout is fixed by docs/contracts.md: directions ``[maximize accuracy, minimize
latency_ms]``, study attrs describing the run and trial attrs describing each candidate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

STUDY_FILE = "study.db"
STUDY_ATTR_NAMES = ("space", "strategy", "device", "dataset", "protocol", "command", "emulated")
# The reference point lies this much beyond the slowest completed trial.
REFERENCE_LATENCY_FACTOR = 1.1


class ReportError(ValueError):
    """The run directory or its study cannot be reported on; the message names the fix."""


@dataclass
class TrialPoint:
    """One completed trial: its two objectives, spread and the attributes the report shows."""

    number: int
    accuracy: float
    latency_ms: float
    latency_p10_ms: float | None = None
    latency_p90_ms: float | None = None
    arch: dict[str, Any] = field(default_factory=dict)
    params: int | None = None
    nnz: int | None = None
    macs: int | None = None
    sparse_layers: int | None = None
    train_s: float | None = None
    compile_s: float | None = None
    measure_s: float | None = None
    duration_s: float | None = None
    on_front: bool = False


@dataclass
class FailedTrial:
    """A trial in state FAIL and why it failed."""

    number: int
    reason: str
    arch: dict[str, Any] = field(default_factory=dict)


@dataclass
class HypervolumePoint:
    """The front's hypervolume once the completed trial ``number`` had been told."""

    number: int
    hypervolume: float


@dataclass
class ReportInfo:
    """Everything the report renders; computed once, asserted on by tests."""

    run_dir: Path
    study_name: str
    study_attrs: dict[str, Any]
    emulated: bool
    trials: list[TrialPoint]
    front: list[TrialPoint]
    knee: TrialPoint | None
    reference_latency_ms: float | None
    accuracy_scale: float
    hypervolume: float
    hypervolume_history: list[HypervolumePoint]
    failed: list[FailedTrial]
    n_running: int
    n_pruned: int
    n_waiting: int
    budget_s: float


def dominates(a: TrialPoint, b: TrialPoint) -> bool:
    """True when ``a`` is at least as accurate and as fast as ``b`` and strictly better in one."""
    no_worse = a.accuracy >= b.accuracy and a.latency_ms <= b.latency_ms
    better = a.accuracy > b.accuracy or a.latency_ms < b.latency_ms
    return no_worse and better


def pareto_front(points: Sequence[TrialPoint]) -> list[TrialPoint]:
    """The non-dominated points sorted by latency (then accuracy, descending); ties all stay."""
    front = [p for p in points if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda p: (p.latency_ms, -p.accuracy, p.number))


def hypervolume(
    points: Sequence[TrialPoint], reference_latency_ms: float, accuracy_scale: float
) -> float:
    """Area dominated by ``points`` up to (reference latency, accuracy 0), as a box fraction.

    The box is ``[0, reference_latency_ms] x [0, accuracy_scale]``, so the result is in [0, 1].
    """
    if reference_latency_ms <= 0:
        return 0.0
    area = 0.0
    best_accuracy = 0.0
    # Sweep the front from fast to slow; each point adds the strip above the previous accuracy.
    for p in pareto_front(points):
        if p.latency_ms >= reference_latency_ms or p.accuracy <= best_accuracy:
            continue
        area += (reference_latency_ms - p.latency_ms) * (p.accuracy - best_accuracy)
        best_accuracy = p.accuracy
    return area / (reference_latency_ms * accuracy_scale)


def knee_point(front: Sequence[TrialPoint]) -> TrialPoint | None:
    """The front point farthest above the line joining the front's two extremes.

    Coordinates are normalised to [0, 1] over the front. With fewer than three distinct
    points there is no interior point and no knee (None).
    """
    distinct = {(p.latency_ms, p.accuracy) for p in front}
    if len(distinct) < 3:
        return None
    lat_lo = min(p.latency_ms for p in front)
    lat_span = max(p.latency_ms for p in front) - lat_lo
    acc_lo = min(p.accuracy for p in front)
    acc_span = max(p.accuracy for p in front) - acc_lo
    if lat_span <= 0 or acc_span <= 0:
        return None

    def height_above_line(p: TrialPoint) -> float:
        # The extremes sit at (0, 0) and (1, 1); the ideal corner is (0, 1).
        x = (p.latency_ms - lat_lo) / lat_span
        y = (p.accuracy - acc_lo) / acc_span
        return (y - x) / math.sqrt(2.0)

    return max(front, key=lambda p: (height_above_line(p), -p.latency_ms))


def find_study_name(storage_url: str, run_dir: Path) -> str:
    """The single study in the storage, or the one named like the run directory."""
    names = optuna.get_all_study_names(storage=storage_url)
    if run_dir.name in names:
        return run_dir.name
    if len(names) == 1:
        return names[0]
    if not names:
        raise ReportError(f"{run_dir / STUDY_FILE} holds no study; run `hwnas search` first")
    raise ReportError(
        f"{run_dir / STUDY_FILE} holds several studies ({', '.join(sorted(names))}); "
        "pass the study name to report on"
    )


def build_info(run_dir: str | Path, study_name: str | None = None) -> ReportInfo:
    """Read the study in ``<run_dir>/study.db`` and compute the report's contents."""
    run_dir = Path(run_dir)
    db = run_dir / STUDY_FILE
    if not db.is_file():
        # Checked first: Optuna would silently create an empty database here.
        raise ReportError(f"no study at {db}; pass the run directory that `hwnas search` wrote")
    storage_url = f"sqlite:///{db.resolve()}"
    if study_name is None:
        study_name = find_study_name(storage_url, run_dir)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage_url)
    except KeyError:
        raise ReportError(f"no study named {study_name!r} in {db}; check the name") from None
    directions = [d.name for d in study.directions]
    if directions != ["MAXIMIZE", "MINIMIZE"]:
        raise ReportError(
            f"study {study_name!r} has directions {directions}; the report needs "
            "[MAXIMIZE accuracy, MINIMIZE latency_ms]"
        )
    return info_from_trials(
        run_dir, study_name, study.user_attrs, study.get_trials(deepcopy=False)
    )


def info_from_trials(
    run_dir: Path, study_name: str, study_attrs: dict[str, Any], trials: Sequence[FrozenTrial]
) -> ReportInfo:
    """Compute the report from already loaded trials (``build_info`` minus the storage)."""
    ordered = sorted(trials, key=lambda t: t.number)
    points = [
        _trial_point(t)
        for t in ordered
        if t.state == TrialState.COMPLETE and t.values is not None and _finite(t.values)
    ]
    front = pareto_front(points)
    front_numbers = {p.number for p in front}
    for p in points:
        p.on_front = p.number in front_numbers

    reference = max(p.latency_ms for p in points) * REFERENCE_LATENCY_FACTOR if points else None
    # Accuracy is a fraction; a study that stored percentages is normalised by 100 instead.
    accuracy_scale = 100.0 if any(p.accuracy > 1.0 for p in points) else 1.0
    history: list[HypervolumePoint] = []
    if reference is not None:
        for i, p in enumerate(points):
            history.append(
                HypervolumePoint(p.number, hypervolume(points[: i + 1], reference, accuracy_scale))
            )

    failed = [
        FailedTrial(t.number, _fail_reason(t), _as_dict(t.user_attrs.get("arch")))
        for t in ordered
        if t.state == TrialState.FAIL
    ]
    budget = sum(
        t.duration.total_seconds() for t in ordered if t.state.is_finished() and t.duration
    )
    attrs = {name: study_attrs[name] for name in STUDY_ATTR_NAMES if name in study_attrs}
    attrs.update({k: v for k, v in study_attrs.items() if k not in attrs})
    return ReportInfo(
        run_dir=run_dir,
        study_name=study_name,
        study_attrs=attrs,
        emulated=bool(study_attrs.get("emulated", False)),
        trials=points,
        front=front,
        knee=knee_point(front),
        reference_latency_ms=reference,
        accuracy_scale=accuracy_scale,
        hypervolume=history[-1].hypervolume if history else 0.0,
        hypervolume_history=history,
        failed=failed,
        n_running=sum(t.state == TrialState.RUNNING for t in ordered),
        n_pruned=sum(t.state == TrialState.PRUNED for t in ordered),
        n_waiting=sum(t.state == TrialState.WAITING for t in ordered),
        budget_s=budget,
    )


def _trial_point(t: FrozenTrial) -> TrialPoint:
    attrs = t.user_attrs
    return TrialPoint(
        number=t.number,
        accuracy=float(t.values[0]),
        latency_ms=float(t.values[1]),
        latency_p10_ms=_as_float(attrs.get("latency_p10_ms")),
        latency_p90_ms=_as_float(attrs.get("latency_p90_ms")),
        arch=_as_dict(attrs.get("arch")) or dict(t.params),
        params=_as_int(attrs.get("params")),
        nnz=_as_int(attrs.get("nnz")),
        macs=_as_int(attrs.get("macs")),
        sparse_layers=_layer_count(attrs.get("sparse_layers")),
        train_s=_as_float(attrs.get("train_s")),
        compile_s=_as_float(attrs.get("compile_s")),
        measure_s=_as_float(attrs.get("measure_s")),
        duration_s=t.duration.total_seconds() if t.duration else None,
    )


def _fail_reason(t: FrozenTrial) -> str:
    reason = t.user_attrs.get("fail_reason") or t.system_attrs.get("fail_reason")
    return str(reason) if reason else "no reason recorded"


def _finite(values: Sequence[float]) -> bool:
    return len(values) == 2 and all(math.isfinite(v) for v in values)


def _as_float(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _as_int(value: Any) -> int | None:
    f = _as_float(value)
    return int(f) if f is not None else None


def _layer_count(value: Any) -> int | None:
    # The contract stores a count; a list of layer names is counted too.
    return len(value) if isinstance(value, list | tuple) else _as_int(value)


def _as_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            pass
    if isinstance(value, dict):
        return dict(value)
    return {} if value is None else {"value": value}
