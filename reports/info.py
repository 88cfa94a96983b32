"""Compute everything the HTML report shows from an Optuna study, as a plain dataclass tree.

The study layout is fixed by docs/contracts.md: directions ``[maximize accuracy, minimize
latency_ms]``, study attrs describing the run and trial attrs describing each candidate. A
study measured on several devices has one more minimised latency per device, with metric names
``["accuracy", "latency_ms:<profile>", ...]``; the report then holds one front per device.
"""

from __future__ import annotations

import json
import math
import shlex
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

STUDY_FILE = "study.db"
STUDY_ATTR_NAMES = ("space", "strategy", "device", "dataset", "protocol", "command", "emulated")
# The reference point lies this much beyond the slowest completed trial.
REFERENCE_LATENCY_FACTOR = 1.1
LATENCY_METRIC = "latency_ms"


class ReportError(ValueError):
    """The run directory or its study cannot be reported on; the message names the fix."""


@dataclass
class LayerDetail:
    """One layer of a candidate: its density, the kernel the compiler chose and their times."""

    name: str
    density: float | None = None
    impl: str | None = None  # "sparse" or "dense" when the compiler recorded its choice
    sparse_ms: float | None = None
    dense_ms: float | None = None
    # This layer's kernel(s) timed alone on the device (`--layer-times`); sparse_ms and
    # dense_ms are the compiler's timings on the build host, which chose between them.
    measured_ms: float | None = None
    # A 1x1 conv computed inside the depthwise conv it feeds: that layer's name (its device
    # time includes this one's).
    fused_into: str | None = None

    @property
    def host_ms(self) -> float | None:
        """The chosen kernel's time on the build host (compile time)."""
        return {"sparse": self.sparse_ms, "dense": self.dense_ms}.get(self.impl or "")

    @property
    def chosen_ms(self) -> float | None:
        """The layer's time: measured on the device, else the chosen kernel's on the host."""
        return self.measured_ms if self.measured_ms is not None else self.host_ms

    @property
    def sparse_speedup(self) -> float | None:
        """Dense kernel time over sparse kernel time (below 1 is why a layer stayed dense)."""
        if self.sparse_ms and self.dense_ms is not None:
            return self.dense_ms / self.sparse_ms
        return None


@dataclass
class TrialPoint:
    """One completed trial: its two objectives, spread and the attributes the report shows.

    ``latency_ms`` is the latency on the device being plotted; ``latencies_ms`` holds every
    device's latency (one entry for a single-device study).
    """

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
    latencies_ms: dict[str, float] = field(default_factory=dict)
    latency_cv: float | None = None
    measure_number: int | None = None
    measure_repeats: int | None = None
    layers: list[LayerDetail] = field(default_factory=list)
    dense_twin_ms: float | None = None
    predicted_latency_ms: float | None = None
    same_as_trial: int | None = None
    export_command: str | None = None  # rebuilds this candidate's library

    @property
    def dense_speedup(self) -> float | None:
        """How many times faster this candidate runs than the same arch built dense."""
        if self.dense_twin_ms is not None and self.latency_ms > 0:
            return self.dense_twin_ms / self.latency_ms
        return None

    @property
    def prediction_error(self) -> float | None:
        """The latency table's relative error against the measurement (+0.1 = 10% high)."""
        if self.predicted_latency_ms is not None and self.latency_ms > 0:
            return self.predicted_latency_ms / self.latency_ms - 1.0
        return None


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
class DeviceFront:
    """The accuracy/latency view of one device: every trial at that device's latency.

    ``trials`` are copies of the report's trials whose ``latency_ms``, spread and ``on_front``
    belong to this device; hypervolume is against this device's own reference point.
    """

    device: str
    metric: str
    trials: list[TrialPoint]
    front: list[TrialPoint]
    knee: TrialPoint | None
    reference_latency_ms: float | None
    hypervolume: float
    hypervolume_history: list[HypervolumePoint]


@dataclass
class ReportInfo:
    """Everything the report renders; computed once, asserted on by tests.

    ``trials``/``front``/``knee``/hypervolume are those of the first device; ``devices`` has
    one entry per measured device (the first one shares its trial objects with ``trials``).
    """

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
    devices: list[DeviceFront] = field(default_factory=list)

    @property
    def trial_by_number(self) -> dict[int, TrialPoint]:
        """The completed trials keyed by number (for the detail panel and tests)."""
        return {p.number: p for p in self.trials}


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


def _configured_storage(run_dir: Path) -> str | None:
    """The storage URL a run's `config.toml` names (`--storage`), if any."""
    try:
        config = tomllib.loads((run_dir / "config.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    storage = config.get("storage")
    return storage if isinstance(storage, str) and storage else None


def build_info(run_dir: str | Path, study_name: str | None = None) -> ReportInfo:
    """Read the run's study (``<run_dir>/study.db``, or the storage its `config.toml` names)
    and compute the report's contents."""
    run_dir = Path(run_dir)
    db = run_dir / STUDY_FILE
    storage_url = _configured_storage(run_dir)
    if storage_url is None:
        if not db.is_file():
            # Checked first: Optuna would silently create an empty database here.
            raise ReportError(
                f"no study at {db}; pass the run directory that `hwnas search` wrote"
            )
        storage_url = f"sqlite:///{db.resolve()}"
    if study_name is None:
        study_name = find_study_name(storage_url, run_dir)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage_url)
    except KeyError:
        raise ReportError(f"no study named {study_name!r} in {db}; check the name") from None
    directions = [d.name for d in study.directions]
    if len(directions) < 2 or directions[0] != "MAXIMIZE" or "MAXIMIZE" in directions[1:]:
        raise ReportError(
            f"study {study_name!r} has directions {directions}; the report needs "
            "[MAXIMIZE accuracy, MINIMIZE latency_ms, ...] (one latency per device)"
        )
    return info_from_trials(
        run_dir,
        study_name,
        study.user_attrs,
        study.get_trials(deepcopy=False),
        metric_names=study.metric_names,
    )


def device_names(
    metric_names: Sequence[str] | None, n_latencies: int, study_attrs: dict[str, Any]
) -> list[str]:
    """One device name per latency objective, from metric names ``latency_ms:<profile>``."""
    default = str(study_attrs.get("device") or "device")
    names: list[str] = []
    for i in range(n_latencies):
        metric = metric_names[i + 1] if metric_names and len(metric_names) > i + 1 else None
        if metric and metric.startswith(LATENCY_METRIC + ":"):
            names.append(metric[len(LATENCY_METRIC) + 1 :])
        elif metric and metric != LATENCY_METRIC:
            names.append(metric)
        else:
            names.append(default if n_latencies == 1 else f"{default} #{i + 1}")
    return names


def hypervolume_history(
    points: Sequence[TrialPoint], reference_latency_ms: float, accuracy_scale: float
) -> list[HypervolumePoint]:
    """The hypervolume after each of ``points`` (in the order told) against one reference."""
    return [
        HypervolumePoint(
            p.number, hypervolume(points[: i + 1], reference_latency_ms, accuracy_scale)
        )
        for i, p in enumerate(points)
    ]


def info_from_trials(
    run_dir: Path,
    study_name: str,
    study_attrs: dict[str, Any],
    trials: Sequence[FrozenTrial],
    metric_names: Sequence[str] | None = None,
) -> ReportInfo:
    """Compute the report from already loaded trials (``build_info`` minus the storage)."""
    ordered = sorted(trials, key=lambda t: t.number)
    n_objectives = max(
        (len(t.values) for t in ordered if t.values is not None),
        default=len(metric_names) if metric_names else 2,
    )
    n_objectives = max(n_objectives, 2)
    devices = device_names(metric_names, n_objectives - 1, study_attrs)
    complete = [
        t
        for t in ordered
        if t.state == TrialState.COMPLETE
        and t.values is not None
        and len(t.values) == n_objectives
        and all(math.isfinite(v) for v in t.values)
    ]
    points = [_trial_point(t, devices, run_dir) for t in complete]
    # Accuracy is a fraction; a study that stored percentages is normalised by 100 instead.
    accuracy_scale = 100.0 if any(p.accuracy > 1.0 for p in points) else 1.0
    views = [
        _device_front(
            name,
            f"{LATENCY_METRIC}:{name}" if n_objectives > 2 else LATENCY_METRIC,
            points
            if i == 0
            else [_on_device(p, t, i, name) for p, t in zip(points, complete, strict=True)],
            accuracy_scale,
        )
        for i, name in enumerate(devices)
    ]
    first = views[0]

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
        front=first.front,
        knee=first.knee,
        reference_latency_ms=first.reference_latency_ms,
        accuracy_scale=accuracy_scale,
        hypervolume=first.hypervolume,
        hypervolume_history=first.hypervolume_history,
        failed=failed,
        n_running=sum(t.state == TrialState.RUNNING for t in ordered),
        n_pruned=sum(t.state == TrialState.PRUNED for t in ordered),
        n_waiting=sum(t.state == TrialState.WAITING for t in ordered),
        budget_s=budget,
        devices=views,
    )


def _device_front(
    device: str, metric: str, points: list[TrialPoint], accuracy_scale: float
) -> DeviceFront:
    """Marks the front among ``points`` (in place) and computes its knee and hypervolume."""
    front = pareto_front(points)
    front_numbers = {p.number for p in front}
    for p in points:
        p.on_front = p.number in front_numbers
    reference = max(p.latency_ms for p in points) * REFERENCE_LATENCY_FACTOR if points else None
    history = hypervolume_history(points, reference, accuracy_scale) if reference else []
    return DeviceFront(
        device=device,
        metric=metric,
        trials=points,
        front=front,
        knee=knee_point(front),
        reference_latency_ms=reference,
        hypervolume=history[-1].hypervolume if history else 0.0,
        hypervolume_history=history,
    )


def _on_device(point: TrialPoint, t: FrozenTrial, index: int, device: str) -> TrialPoint:
    """A copy of ``point`` at the latency (and spread, when recorded) of device ``index``."""
    figures = _device_figures(t, device)
    return replace(
        point,
        latency_ms=float(t.values[index + 1]),
        latency_p10_ms=_as_float(figures.get("latency_p10_ms")),
        latency_p90_ms=_as_float(figures.get("latency_p90_ms")),
        on_front=False,
    )


def _device_figures(t: FrozenTrial, device: str) -> dict:
    """One device's measurement figures: `per_device[device]` in a study of several devices,
    the trial's own attributes in a study of one."""
    per_device = _as_dict(t.user_attrs.get("per_device"))
    return _as_dict(per_device.get(device)) if per_device else t.user_attrs


def _trial_point(t: FrozenTrial, devices: Sequence[str], run_dir: Path) -> TrialPoint:
    attrs = t.user_attrs
    figures = _device_figures(t, devices[0])
    p10 = figures.get("latency_p10_ms")
    p90 = figures.get("latency_p90_ms")
    out = run_dir / "export" / str(t.number)
    return TrialPoint(
        number=t.number,
        accuracy=float(t.values[0]),
        latency_ms=float(t.values[1]),
        latency_p10_ms=_as_float(p10),
        latency_p90_ms=_as_float(p90),
        arch=_as_dict(attrs.get("arch")) or dict(t.params),
        params=_as_int(attrs.get("params")),
        nnz=_as_int(attrs.get("nnz")),
        macs=_as_int(attrs.get("macs")),
        sparse_layers=_layer_count(attrs.get("sparse_layers")),
        train_s=_as_float(attrs.get("train_s")),
        compile_s=_as_float(attrs.get("compile_s")),
        measure_s=_as_float(attrs.get("measure_s")),
        duration_s=t.duration.total_seconds() if t.duration else None,
        latencies_ms={d: float(v) for d, v in zip(devices, t.values[1:], strict=True)},
        latency_cv=_as_float(attrs.get("latency_cv")),
        measure_number=_as_int(attrs.get("measure_number")),
        measure_repeats=_as_int(attrs.get("measure_repeats")),
        layers=layer_details(attrs),
        dense_twin_ms=_positive(attrs.get("dense_twin_ms")),
        predicted_latency_ms=_positive(attrs.get("predicted_latency_ms")),
        same_as_trial=_as_int(attrs.get("same_as_trial")),
        export_command=(
            f"hwnas export {shlex.quote(str(run_dir))} --trial {t.number} "
            f"--out {shlex.quote(str(out))}"
        ),
    )


def layer_details(attrs: dict[str, Any]) -> list[LayerDetail]:
    """Per-layer rows from ``densities``, ``sparse_layer_names``, ``kernels`` and ``layer_ms``.

    Layers keep the order in which the attributes first name them (the model's order). Without
    ``kernels``, a layer listed in ``sparse_layer_names`` ran sparse and any other layer with a
    density was kept dense by the compiler.
    """
    densities = _mapping(attrs.get("densities"))
    kernels = _mapping(attrs.get("kernels"))
    layer_ms = _mapping(attrs.get("layer_ms"))
    raw_sparse = attrs.get("sparse_layer_names")
    sparse_names = [str(n) for n in raw_sparse] if isinstance(raw_sparse, list | tuple) else None
    names: dict[str, None] = {}
    for group in (densities, sparse_names or [], kernels, layer_ms):
        names.update((str(n), None) for n in group)
    rows = []
    for name in names:
        kernel = kernels.get(name)
        kernel = kernel if isinstance(kernel, dict) else {}
        impl = kernel.get("impl")
        if impl not in ("sparse", "dense"):
            impl = None
        if impl is None and sparse_names is not None:
            impl = "sparse" if name in sparse_names else "dense"
        rows.append(
            LayerDetail(
                name=name,
                density=_as_float(densities.get(name)),
                impl=impl,
                sparse_ms=_as_float(kernel.get("sparse_ms")),
                dense_ms=_as_float(kernel.get("dense_ms")),
                measured_ms=_as_float(layer_ms.get(name)),
                fused_into=str(kernel["fused_into"]) if kernel.get("fused_into") else None,
            )
        )
    return rows


def _fail_reason(t: FrozenTrial) -> str:
    reason = t.user_attrs.get("fail_reason") or t.system_attrs.get("fail_reason")
    return str(reason) if reason else "no reason recorded"


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _positive(value: Any) -> float | None:
    f = _as_float(value)
    return f if f is not None and f > 0 else None


def _as_int(value: Any) -> int | None:
    f = _as_float(value)
    return int(f) if f is not None else None


def _layer_count(value: Any) -> int | None:
    # The contract stores a count; a list of layer names is counted too.
    return len(value) if isinstance(value, list | tuple) else _as_int(value)


def _mapping(value: Any) -> dict[str, Any]:
    """A dict attribute (or its JSON text); anything else counts as absent."""
    value = _as_dict(value)
    return {} if set(value) == {"value"} else value


def _as_dict(value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            pass
    if isinstance(value, dict):
        return dict(value)
    return {} if value is None else {"value": value}
