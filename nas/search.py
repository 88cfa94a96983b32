"""The trial loop: ask for an arch, train it, compile it, time it on the device, tell."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import optuna
import sqlalchemy.exc
import torch

import compile as hw_compile
from hw_profiles.measure import (
    KernelCall,
    LayerTimes,
    Measurement,
    measure_layers,
    measure_library,
)
from hw_profiles.profiles import Profile, load_profile
from hw_profiles.rpc import (
    Tracker,
    local_server,
    local_tracker,
    parse_tracker,
    registered_keys,
)
from nas.config import SearchConfig
from nas.errors import UserError
from nas.strategies import DIFFERENTIABLE_STRATEGIES, distributions, make_sampler
from nas.train import train_model
from search_spaces.baselines import BASELINES, build_baseline
from search_spaces.counting import count_model
from search_spaces.data import Dataset, load_dataset
from search_spaces.ops import sparse_layers
from search_spaces.spaces import Space, get_space

log = logging.getLogger(__name__)

DIRECTIONS = ["maximize", "minimize"]
METRIC_NAMES = ["accuracy", "latency_ms"]
INTERRUPTED = "interrupted: the search stopped while this trial ran"
CONFIG_FILE = "config.toml"
# How often a worker of a differentiable search looks for the archs worker 0 derives.
DERIVED_POLL_S = 2.0
# Worker 0 waits this long at most for the worker processes it starts to set up.
WORKER_START_S = 120.0
WORKER_POLL_S = 0.2
# Opens of a new study database that another process is setting up at the same moment.
STORAGE_OPEN_TRIES = 5
# A worker writes its id on a trial milliseconds after creating it (see `_orphaned`).
ASK_GRACE_S = 5.0


class TrialFailed(Exception):
    """A candidate that could not be trained, compiled or measured; the search goes on."""


@dataclass
class SearchContext:
    config: SearchConfig
    space: Space
    profiles: list[Profile]
    data: Dataset
    tracker: Tracker
    example: torch.Tensor


def prepare(config: SearchConfig) -> tuple[Space, list[Profile], Dataset]:
    """Resolves every named input before anything is written, so bad input changes nothing."""
    config.validate()
    space = get_space(config.space)
    make_sampler(config.strategy, config.seed, space.choices)
    if config.baseline and config.baseline not in BASELINES:
        raise UserError(
            f"unknown baseline {config.baseline!r}: choose one of {', '.join(BASELINES)}"
        )
    profiles = [load_profile(name.strip()) for name in config.device.split(",")]
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise UserError(f"--device names a device twice ({config.device}): name each once")
    data = load_dataset(config.dataset, seed=config.seed, image_size=config.image_size)
    if config.strategy in DIFFERENTIABLE_STRATEGIES:
        _supernet(space, data, config)  # a space without one is refused before anything runs
    if config.tracker:
        tracker = parse_tracker(config.tracker)
        keys = registered_keys(tracker)
        for profile in profiles:
            if profile.key not in keys:
                raise UserError(
                    f"no device with key '{profile.key}' ({profile.name}) is registered at "
                    f"{tracker}: start `python -m tvm.exec.rpc_server --tracker {tracker} "
                    f"--key {profile.key}` on it (registered: {', '.join(sorted(keys)) or 'none'})"
                )
    else:
        for profile in profiles:
            if not (profile.emulated or hw_compile.runs_on_host(profile)):
                raise _needs_tracker(profile)
    return space, profiles, data


def objectives(profiles: list[Profile]) -> tuple[list[str], list[str]]:
    """The study's directions and metric names: accuracy, then a latency per device."""
    if len(profiles) == 1:
        return DIRECTIONS, METRIC_NAMES
    return (
        ["maximize"] + ["minimize"] * len(profiles),
        ["accuracy"] + [f"latency_ms:{p.name}" for p in profiles],
    )


def open_study(
    config: SearchConfig, space: Space, profiles: list[Profile], worker: int = 0
) -> optuna.Study:
    """Creates or resumes the run's study; refuses a directory that holds another study."""
    run_dir = config.run_dir
    db = run_dir / "study.db"
    if db.exists():
        names = _study_names(config)
        if names and config.study_name not in names:
            raise UserError(
                f"{run_dir} holds the study {names[0]!r}, not {config.study_name!r}: "
                "choose another --out"
            )
    elif run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / CONFIG_FILE).exists():
        raise UserError(f"{run_dir} exists and is not an hwnas run: choose another --out")
    directions, metric_names = objectives(profiles)
    if config.study_name in _study_names(config):
        existing = optuna.load_study(study_name=config.study_name, storage=_storage(config))
        if existing.metric_names and existing.metric_names != metric_names:
            raise UserError(
                f"the study {config.study_name!r} measures {', '.join(existing.metric_names)}, "
                f"not {', '.join(metric_names)}: keep its --device or choose another --out"
            )
    _check_writable(run_dir)
    study = optuna.create_study(
        study_name=config.study_name,
        storage=_storage(config),
        directions=directions,
        load_if_exists=True,
    )
    study.set_metric_names(metric_names)
    fail_orphaned_trials(study)
    # A resumed run (or another worker) continues the sampler's sequence instead of repeating
    # the first proposals.
    study.sampler = make_sampler(
        config.strategy,
        config.seed + len(study.trials) + 7919 * worker,
        space.choices,
        constraints=constraints_of if config.max_latency_ms or config.max_params else None,
    )
    return study


def _check_writable(run_dir: Path) -> None:
    """Makes sure the run's artifacts can be written before the study is touched."""
    created = not run_dir.exists()
    probe = run_dir / "trials" / ".hwnas-write-check"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise UserError(
            f"cannot write artifacts in {probe.parent} ({exc.strerror or exc}): "
            "make it a writable directory or choose another --out"
        ) from None


def _study_names(config: SearchConfig) -> list[str]:
    """The studies in the run's storage (none when its database does not exist yet)."""
    if not config.storage and not (config.run_dir / "study.db").exists():
        return []
    try:
        return optuna.get_all_study_names(_storage(config))
    except Exception as exc:
        raise UserError(
            f"cannot read the study storage {config.storage_url} ({type(exc).__name__}): "
            "repair or move it away, or choose another --out"
        ) from None


def _storage(config: SearchConfig) -> optuna.storages.RDBStorage:
    """The run's study storage. Whoever opens a new database first sets up its schema: tables,
    then a version row. A process opening it at the same moment (another worker,
    optuna-dashboard, a script polling the run) can make that fail, with 'table ... already
    exists' or a duplicate version row (an integrity error). The schema is then there, so
    opening again succeeds."""
    for _ in range(STORAGE_OPEN_TRIES - 1):
        try:
            return optuna.storages.RDBStorage(config.storage_url)
        except sqlalchemy.exc.DatabaseError as exc:
            racing = isinstance(exc, sqlalchemy.exc.IntegrityError) or "already exists" in str(exc)
            if not racing:
                raise
            time.sleep(0.2)
    return optuna.storages.RDBStorage(config.storage_url)


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive_here(worker: str) -> bool:
    """Whether a worker id names a live process on this host (other hosts count as alive)."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _orphaned(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a RUNNING trial's worker is gone. A worker records itself on a trial right after
    asking for it; a trial still without a worker ASK_GRACE_S after it started was asked for by
    a process killed in between."""
    worker = trial.user_attrs.get("worker")
    if worker is None:
        started = trial.datetime_start
        return started is not None and (datetime.now() - started).total_seconds() > ASK_GRACE_S
    return not _alive_here(worker)


def fail_orphaned_trials(study: optuna.Study) -> None:
    """Marks RUNNING trials whose worker process is gone as failed, so nothing stays RUNNING."""
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not _orphaned(t):
            continue
        storage.set_trial_user_attr(t._trial_id, "fail_reason", INTERRUPTED)
        storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)


def counted_trials(study: optuna.Study, running: bool = True) -> int:
    """Trials that count against the budget: finished (and running), but not interrupted ones."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.FAIL:
            n += t.user_attrs.get("fail_reason") != INTERRUPTED
        elif t.state == optuna.trial.TrialState.COMPLETE:
            n += 1
        elif t.state == optuna.trial.TrialState.RUNNING:
            n += running
    return n


def constraints_of(trial: optuna.trial.FrozenTrial) -> list[float]:
    """Optuna's constraint values (<= 0 is feasible) recorded by `run_trial`."""
    return trial.user_attrs.get("constraints", [0.0])


@contextlib.contextmanager
def connect_devices(config: SearchConfig, profiles: list[Profile]) -> Iterator[Tracker]:
    """The user's tracker; or a tracker on 127.0.0.1 with each device served for this run: a
    stock rpc_server for a profile this machine can run, the emulated board for an emulated
    one."""
    if config.tracker:
        yield parse_tracker(config.tracker)
        return
    with local_tracker() as tracker, contextlib.ExitStack() as stack:
        for profile in profiles:
            stack.enter_context(_local_device(tracker, profile))
        yield tracker


def _local_device(tracker: Tracker, profile: Profile) -> contextlib.AbstractContextManager:
    if profile.emulated:
        from hw_profiles.emulate import emulated_server

        return emulated_server(tracker, profile.key, cpu=profile.target.get("mcpu", "cortex-a72"))
    if hw_compile.runs_on_host(profile):
        return local_server(tracker, profile.key)
    raise _needs_tracker(profile)


def _needs_tracker(profile: Profile) -> UserError:
    return UserError(
        f"{profile.name} is not this machine: on the board run `python -m tvm.exec.rpc_server "
        f"--tracker HOST:PORT --key {profile.key}`, then pass --tracker HOST:PORT"
    )


def _previous_result(study: optuna.Study, arch: dict) -> optuna.trial.FrozenTrial | None:
    """A finished trial of the same arch, whose results a repeated proposal reuses."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get("arch") == arch:
            return t
    return None


def run_trial(trial: optuna.Trial, ctx: SearchContext) -> tuple[float, ...]:
    """Trains, compiles and measures one candidate; records its attributes on the trial.
    Returns its accuracy and one latency per device."""
    config = ctx.config
    arch = {
        name: trial.suggest_categorical(name, values) for name, values in ctx.space.choices.items()
    }
    trial.set_user_attr("arch", arch)
    previous = _previous_result(trial.study, arch)
    if previous is not None:
        # An arch seen before costs no training, compile or measurement.
        for key, value in previous.user_attrs.items():
            if key not in ("worker", "arch"):
                trial.set_user_attr(key, value)
        trial.set_user_attr("same_as_trial", previous.number)
        return tuple(previous.values)

    trial_dir = config.run_dir / "trials" / str(trial.number)
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "arch.json").write_text(json.dumps(arch, indent=2, sort_keys=True))

    torch.manual_seed(config.seed + trial.number)
    shape = (ctx.data.num_classes, ctx.data.in_channels, config.image_size)
    method = None
    if config.baseline:
        # The proposed arch's baseline takes its place: same budget, the baseline's model.
        baseline = build_baseline(ctx.space, arch, config.baseline, *shape)
        model, method = baseline.model, baseline.method
        trial.set_user_attr("baseline", config.baseline)
        trial.set_user_attr("baseline_width_scale", baseline.width_scale)
    else:
        model = ctx.space.build(arch, *shape)
    params = sum(p.numel() for p in model.parameters())
    if config.max_params and params > config.max_params:
        trial.set_user_attr("params", params)
        raise TrialFailed(f"{params} parameters is over --max-params {config.max_params}")
    result = train_model(
        model,
        ctx.data,
        epochs=config.epochs,
        seed=config.seed + trial.number,
        device=config.train_device,
        method=method,
    )
    model = model.cpu().eval()
    torch.save(model.state_dict(), trial_dir / "weights.pt")
    stats = count_model(model, ctx.example, count="nonzero")
    trial.set_user_attr("params", stats.params)
    trial.set_user_attr("nnz", stats.nnz)
    trial.set_user_attr("macs", stats.macs)
    trial.set_user_attr("train_s", round(result.seconds, 3))
    trial.set_user_attr(
        "densities", {name: round(m.density(), 4) for name, m in sparse_layers(model)}
    )

    results = evaluate_on_devices(model, ctx, trial_dir)
    for key, value in results[0].items():
        trial.set_user_attr(key, value)
    if len(results) > 1:
        names = [p.name for p in ctx.profiles]
        trial.set_user_attr("per_device", dict(zip(names, results, strict=True)))
    latencies = [r["latency_ms"] for r in results]
    trial.set_user_attr(
        "constraints",
        [
            max(latencies) - config.max_latency_ms if config.max_latency_ms else 0.0,
            stats.params - config.max_params if config.max_params else 0.0,
        ],
    )
    return (result.accuracy, *latencies)


def evaluate_on_devices(model: torch.nn.Module, ctx: SearchContext, trial_dir: Path) -> list[dict]:
    """Compiles the candidate for each device, then measures on all devices at once; returns
    each device's figures. A device that fails fails the trial, naming the device."""
    builds = []
    for profile in ctx.profiles:
        out = trial_dir if len(ctx.profiles) == 1 else trial_dir / profile.name.replace("/", "-")
        started = time.perf_counter()
        compiled = hw_compile.build(model, ctx.example, profile, tracker=ctx.tracker)
        lib = compiled.export_library(out / "model.so")
        compile_s = time.perf_counter() - started  # the dense twin is extra, not counted
        twin = None
        if ctx.config.dense_twin:
            dense = hw_compile.build(model, ctx.example, profile, kernel_choice="dense")
            twin = (dense, dense.export_library(out / "dense_twin.so"))
        layers = _layer_library(profile, compiled, out) if ctx.config.layer_times else None
        builds.append((profile, compiled, lib, twin, layers, compile_s))

    def timed(profile: Profile, compiled, lib: Path) -> tuple[Measurement, float]:
        # The build checked host-runnable code against torch; other code is checked on its
        # device, in the session that times it.
        check = None if compiled.host_runnable else compiled.check_output
        started = time.perf_counter()
        m = measure_library(lib, [ctx.example.numpy()], profile, ctx.tracker, check=check)
        return m, time.perf_counter() - started

    def measure(build: tuple) -> tuple[Measurement, float, Measurement | None, LayerTimes | None]:
        profile, compiled, lib, twin, layers, _ = build
        m, seconds = timed(profile, compiled, lib)
        twin_m = timed(profile, *twin)[0] if twin and not m.error else None
        layer_times = layers if isinstance(layers, LayerTimes) else None
        if isinstance(layers, tuple) and not m.error:
            layer_times = measure_layers(*layers, profile, ctx.tracker)
        return m, seconds, twin_m, layer_times

    with ThreadPoolExecutor(max_workers=len(builds)) as pool:
        measured = list(pool.map(measure, builds))
    results = []
    for (profile, compiled, lib, _, _, compile_s), (m, seconds, twin, layer_times) in zip(
        builds, measured, strict=True
    ):
        if m.error:
            raise TrialFailed(f"measurement on {profile.name} failed: {m.error}")
        (lib.parent / "measurement.json").write_text(json.dumps(m.to_dict(), indent=2))
        results.append(
            {
                "latency_ms": m.median_ms,
                "latency_p10_ms": m.p10_ms,
                "latency_p90_ms": m.p90_ms,
                "latency_cv": m.cv,
                "measure_number": m.number,
                "measure_repeats": m.repeats,
                "measure_s": round(seconds, 3),
                "compile_s": round(compile_s, 3),
                "sparse_layers": len(compiled.sparse_layers),
                "sparse_layer_names": list(compiled.sparse_layers),
                "kernels": json.loads(json.dumps(compiled.kernels, default=str)),
            }
        )
        if twin is not None and not twin.error:
            results[-1]["dense_twin_ms"] = twin.median_ms
        if layer_times is not None and layer_times.ok:
            results[-1]["layer_ms"] = layer_times.ms
        elif layer_times is not None:
            results[-1]["layer_ms_error"] = layer_times.error
    return results


def _layer_library(
    profile: Profile, compiled, out: Path
) -> tuple[Path, dict[str, list[KernelCall]]] | LayerTimes:
    """The layer library for `--layer-times` (`out/layers.so`) and its calls per layer, or
    `LayerTimes(error=...)`: per-layer times are an extra, so their failure never fails the
    trial."""
    path = out / "layers.so"
    try:
        return path, compiled.export_layer_library(path)
    except Exception as exc:  # recorded as the trial's layer_ms_error
        log.debug("no layer library for %s\n%s", out, traceback.format_exc())
        return LayerTimes(key=profile.key, error=f"build: {_describe_failure(exc)}")


def _describe_failure(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:500]


def search(
    config: SearchConfig, progress: Callable[[str], None] = print, worker: int = 0
) -> optuna.Study:
    """Runs the search until the study holds `config.trials` finished trials.

    With `config.workers > 1` this process also starts `workers - 1` worker processes that
    share the study and the device; worker processes themselves have `worker > 0`.
    """
    space, profiles, data = prepare(config)
    study = open_study(config, space, profiles, worker)
    if worker == 0:
        (config.run_dir / CONFIG_FILE).write_text(config.to_toml())
        study.set_user_attr("space", config.space)
        study.set_user_attr(
            "strategy",
            f"{config.strategy} ({config.baseline} baseline)"
            if config.baseline
            else config.strategy,
        )
        study.set_user_attr("device", ",".join(p.name for p in profiles))
        study.set_user_attr("dataset", data.name)
        study.set_user_attr("emulated", any(p.emulated for p in profiles))
        study.set_user_attr("protocol", profiles[0].protocol.__dict__)
        study.set_user_attr("command", command_line(config))

    dists = distributions(space.choices)
    started = time.monotonic()
    with connect_devices(config, profiles) as tracker, _workers(config, tracker, worker):
        ctx = SearchContext(config, space, profiles, data, tracker, data.val_x[:1].contiguous())
        if config.strategy in DIFFERENTIABLE_STRATEGIES and worker == 0:
            enqueue_derived_archs(study, ctx, progress)
        elif config.strategy in DIFFERENTIABLE_STRATEGIES:
            _wait_for_derived_archs(study, progress)
        deadline = started + 60 * config.budget_minutes if config.budget_minutes else None
        while counted_trials(study) < config.trials:
            if deadline is not None and time.monotonic() >= deadline:
                progress(f"the budget of {config.budget_minutes:g} minutes is spent")
                break
            trial = study.ask(dists)
            trial.set_user_attr("worker", _worker_id())
            try:
                values = run_trial(trial, ctx)
            except KeyboardInterrupt:
                trial.set_user_attr("fail_reason", INTERRUPTED)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            except Exception as exc:
                reason = _describe_failure(exc)
                log.debug("trial %d failed\n%s", trial.number, traceback.format_exc())
                trial.set_user_attr("fail_reason", reason)
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                progress(_progress_line(study, config.trials, started, f"failed: {reason}"))
                continue
            study.tell(trial, list(values))
            shown = "  ".join(f"{v:.3f} ms" for v in values[1:])
            note = f"trial {trial.number}: acc {values[0]:.3f}  {shown}"
            progress(_progress_line(study, config.trials, started, note))
    return study


def _supernet(space: Space, data: Dataset, config: SearchConfig) -> torch.nn.Module:
    try:
        return space.supernet(data.num_classes, data.in_channels, config.image_size)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def enqueue_derived_archs(
    study: optuna.Study, ctx: SearchContext, progress: Callable[[str], None]
) -> None:
    """Runs the differentiable search once per study and enqueues the archs it derives, each
    to be trained, compiled and measured as a normal trial next to its predicted latency."""
    if "derived_archs" in study.user_attrs:
        return  # derived before this run was resumed; what is left of them is enqueued
    from nas.differentiable import derive_several, measure_latency_table

    config, space = ctx.config, ctx.space
    supernet = _supernet(space, ctx.data, config)
    table = None
    if config.strategy == "dass":
        progress(f"measuring the latency table on {ctx.profiles[0].name} ...")
        try:
            table = measure_latency_table(
                space,
                supernet,
                ctx.profiles[0],
                ctx.tracker,
                tuple(ctx.example.shape),
                config.run_dir / "latency_table.json",
                progress=progress,
            )
        except UserError as exc:
            progress(f"no latency table ({exc}); dass runs without its latency term")
    progress(f"{config.strategy}: searching the supernet ...")
    outcomes = derive_several(
        config.strategy,
        space,
        ctx.data,
        count=max(1, config.trials - counted_trials(study)),
        epochs=config.epochs,
        seed=config.seed,
        device=config.train_device,
        latency_table=table,
        max_latency_ms=config.max_latency_ms,
    )
    for outcome in outcomes:
        attrs = {"search_driven_by": outcome.driven_by}
        if outcome.predicted_latency_ms is not None:
            attrs["predicted_latency_ms"] = outcome.predicted_latency_ms
        study.enqueue_trial(outcome.arch, user_attrs=attrs, skip_if_exists=False)
    study.set_user_attr("derived_archs", [o.arch for o in outcomes])


def _wait_for_derived_archs(study: optuna.Study, progress: Callable[[str], None]) -> None:
    """A worker of a differentiable search evaluates the archs it derives: it waits until
    worker 0 has enqueued them (the supernet search takes a while) instead of sampling archs
    of its own, and stops if the search that started it has gone."""
    parent = os.getppid()
    if "derived_archs" not in study.user_attrs:
        progress("waiting for the differentiable search to derive its archs ...")
    while "derived_archs" not in study.user_attrs:
        if os.getppid() != parent:
            raise UserError("the search that started this worker has stopped")
        time.sleep(DERIVED_POLL_S)


@contextlib.contextmanager
def _workers(config: SearchConfig, tracker: Tracker, worker: int) -> Iterator[None]:
    """Starts `workers - 1` worker processes on the same study and device, lets the search
    begin once they have set up, and waits for them at its end."""
    if config.workers == 1:
        yield
        return
    if worker > 0:
        _ready_file(config, worker).touch()  # set up: worker 0 may start its trials
        yield
        return
    for index in range(1, config.workers):  # left by a search that was killed
        _ready_file(config, index).unlink(missing_ok=True)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nas.cli",
                "search",
                "--config",
                str(config.run_dir / CONFIG_FILE),
                "--tracker",
                f"{tracker.host}:{tracker.port}",
                "--worker-index",
                str(index),
            ],
            stdout=subprocess.DEVNULL,
        )
        for index in range(1, config.workers)
    ]
    try:
        _wait_until_ready(config, procs)
        yield
    finally:
        for proc in procs:
            proc.wait()
        for index in range(1, config.workers):
            _ready_file(config, index).unlink(missing_ok=True)


def _ready_file(config: SearchConfig, worker: int) -> Path:
    return config.run_dir / f"worker-{worker}.ready"


def _wait_until_ready(config: SearchConfig, procs: list[subprocess.Popen]) -> None:
    """Waits until every worker process has set up (imports, data, devices: seconds), so that
    a short search is shared from its first trial; gives up on a worker that exits first, and
    on all of them after WORKER_START_S."""
    deadline = time.monotonic() + WORKER_START_S
    waiting = dict(enumerate(procs, start=1))
    while True:
        for index, proc in list(waiting.items()):
            if _ready_file(config, index).exists() or proc.poll() is not None:
                del waiting[index]
        if not waiting or time.monotonic() >= deadline:
            return
        time.sleep(WORKER_POLL_S)


def _progress_line(study: optuna.Study, total: int, started: float, note: str) -> str:
    elapsed = time.monotonic() - started
    finished = counted_trials(study, running=False)
    front = sorted(study.best_trials, key=lambda t: t.values[1])
    shown = "  ".join(f"({t.values[0]:.3f}, {t.values[1]:.2f} ms)" for t in front[:4])
    more = f" +{len(front) - 4}" if len(front) > 4 else ""
    return f"[{finished}/{total}] {elapsed:6.0f}s  {note}  | front: {shown or '-'}{more}"


def command_line(config: SearchConfig) -> str:
    """The command that repeats this search."""
    return f"hwnas search --config {config.run_dir / CONFIG_FILE}"
