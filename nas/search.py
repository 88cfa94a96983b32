"""The trial loop: ask for an arch, train it, compile it, time it on the device, tell."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import optuna
import torch

import compile as hw_compile
from hw_profiles.measure import measure_library
from hw_profiles.profiles import Profile, load_profile
from hw_profiles.rpc import Tracker, check_tracker, local_server, local_tracker, parse_tracker
from nas.config import SearchConfig
from nas.errors import UserError
from nas.stats import model_stats
from nas.strategies import distributions, make_sampler
from nas.train import train_model
from search_spaces.data import Dataset, load_dataset
from search_spaces.ops import sparse_layers
from search_spaces.spaces import Space, get_space

log = logging.getLogger(__name__)

DIRECTIONS = ["maximize", "minimize"]
METRIC_NAMES = ["accuracy", "latency_ms"]
INTERRUPTED = "interrupted: the search stopped while this trial ran"
CONFIG_FILE = "config.toml"


class TrialFailed(Exception):
    """A candidate that could not be trained, compiled or measured; the search goes on."""


@dataclass
class SearchContext:
    config: SearchConfig
    space: Space
    profile: Profile
    data: Dataset
    tracker: Tracker
    example: torch.Tensor


def prepare(config: SearchConfig) -> tuple[Space, Profile, Dataset]:
    """Resolves every named input before anything is written, so bad input changes nothing."""
    config.validate()
    space = get_space(config.space)
    make_sampler(config.strategy, config.seed, space.choices)
    profile = load_profile(config.device)
    data = load_dataset(config.dataset, seed=config.seed, image_size=config.image_size)
    if config.tracker:
        check_tracker(parse_tracker(config.tracker))
    elif not (profile.emulated or hw_compile.runs_on_host(profile)):
        _local_device(Tracker("127.0.0.1", 0), profile)  # raises the one-line UserError
    return space, profile, data


def open_study(config: SearchConfig, space: Space, worker: int = 0) -> optuna.Study:
    """Creates or resumes the run's study; refuses a directory that holds another study."""
    run_dir = config.run_dir
    db = run_dir / "study.db"
    if db.exists():
        try:
            names = optuna.get_all_study_names(config.storage_url)
        except Exception as exc:
            raise UserError(
                f"{db} is not a readable study database ({type(exc).__name__}): "
                "move it away or choose another --out"
            ) from None
        if names and config.study_name not in names:
            raise UserError(
                f"{run_dir} holds the study {names[0]!r}, not {config.study_name!r}: "
                "choose another --out"
            )
    elif run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / CONFIG_FILE).exists():
        raise UserError(f"{run_dir} exists and is not an hwnas run: choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=config.study_name,
        storage=config.storage_url,
        directions=DIRECTIONS,
        load_if_exists=True,
    )
    study.set_metric_names(METRIC_NAMES)
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


def fail_orphaned_trials(study: optuna.Study) -> None:
    """Marks RUNNING trials whose worker process is gone as failed, so nothing stays RUNNING."""
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if _alive_here(t.user_attrs.get("worker", "")):
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
def connect_device(config: SearchConfig, profile: Profile) -> Iterator[Tracker]:
    """The user's tracker; or a tracker on 127.0.0.1 with a device served for this run: a
    stock rpc_server for a profile this machine can run, the emulated board for an emulated
    one."""
    if config.tracker:
        yield parse_tracker(config.tracker)
        return
    with local_tracker() as tracker, _local_device(tracker, profile):
        yield tracker


def _local_device(tracker: Tracker, profile: Profile) -> contextlib.AbstractContextManager:
    if profile.emulated:
        from hw_profiles.emulate import emulated_server

        return emulated_server(tracker, profile.key, cpu=profile.target.get("mcpu", "cortex-a72"))
    if hw_compile.runs_on_host(profile):
        return local_server(tracker, profile.key)
    raise UserError(
        f"{profile.name} is not this machine: on the board run `python -m tvm.exec.rpc_server "
        f"--tracker HOST:PORT --key {profile.key}`, then pass --tracker HOST:PORT"
    )


def _previous_result(study: optuna.Study, arch: dict) -> optuna.trial.FrozenTrial | None:
    """A finished trial of the same arch, whose results a repeated proposal reuses."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if t.user_attrs.get("arch") == arch:
            return t
    return None


def run_trial(trial: optuna.Trial, ctx: SearchContext) -> tuple[float, float]:
    """Trains, compiles and measures one candidate; records its attributes on the trial."""
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
        return previous.values[0], previous.values[1]

    trial_dir = config.run_dir / "trials" / str(trial.number)
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "arch.json").write_text(json.dumps(arch, indent=2, sort_keys=True))

    torch.manual_seed(config.seed + trial.number)
    model = ctx.space.build(
        arch,
        num_classes=ctx.data.num_classes,
        in_channels=ctx.data.in_channels,
        image_size=config.image_size,
    )
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
    )
    model = model.cpu().eval()
    torch.save(model.state_dict(), trial_dir / "weights.pt")
    stats = model_stats(model, ctx.example)
    trial.set_user_attr("params", stats.params)
    trial.set_user_attr("nnz", stats.nnz)
    trial.set_user_attr("macs", stats.macs)
    trial.set_user_attr("train_s", round(result.seconds, 3))
    trial.set_user_attr(
        "densities", {name: round(m.density(), 4) for name, m in sparse_layers(model)}
    )

    compiled = hw_compile.build(model, ctx.example, ctx.profile)
    lib = compiled.export_library(trial_dir / "model.so")
    trial.set_user_attr("sparse_layers", len(compiled.sparse_layers))
    trial.set_user_attr("sparse_layer_names", list(compiled.sparse_layers))
    trial.set_user_attr("compile_s", round(compiled.compile_seconds, 3))

    started = time.perf_counter()
    m = measure_library(lib, [ctx.example.numpy()], ctx.profile, ctx.tracker)
    trial.set_user_attr("measure_s", round(time.perf_counter() - started, 3))
    if m.error:
        raise TrialFailed(f"measurement on {ctx.profile.name} failed: {m.error}")
    trial.set_user_attr("latency_p10_ms", m.p10_ms)
    trial.set_user_attr("latency_p90_ms", m.p90_ms)
    trial.set_user_attr("latency_cv", m.cv)
    trial.set_user_attr("measure_number", m.number)
    trial.set_user_attr("measure_repeats", m.repeats)
    (trial_dir / "measurement.json").write_text(json.dumps(m.to_dict(), indent=2))
    trial.set_user_attr(
        "constraints",
        [
            m.median_ms - config.max_latency_ms if config.max_latency_ms else 0.0,
            stats.params - config.max_params if config.max_params else 0.0,
        ],
    )
    return result.accuracy, m.median_ms


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
    space, profile, data = prepare(config)
    study = open_study(config, space, worker)
    if worker == 0:
        (config.run_dir / CONFIG_FILE).write_text(config.to_toml())
        study.set_user_attr("space", config.space)
        study.set_user_attr("strategy", config.strategy)
        study.set_user_attr("device", profile.name)
        study.set_user_attr("dataset", data.name)
        study.set_user_attr("emulated", profile.emulated)
        study.set_user_attr("protocol", profile.protocol.__dict__)
        study.set_user_attr("command", command_line(config))

    dists = distributions(space.choices)
    started = time.monotonic()
    with connect_device(config, profile) as tracker, _workers(config, tracker, worker):
        ctx = SearchContext(config, space, profile, data, tracker, data.val_x[:1].contiguous())
        while counted_trials(study) < config.trials:
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
            note = f"trial {trial.number}: acc {values[0]:.3f}  {values[1]:.3f} ms"
            progress(_progress_line(study, config.trials, started, note))
    return study


@contextlib.contextmanager
def _workers(config: SearchConfig, tracker: Tracker, worker: int) -> Iterator[None]:
    """Starts `workers - 1` worker processes on the same study and device, and waits for them."""
    if worker > 0 or config.workers == 1:
        yield
        return
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
        yield
    finally:
        for proc in procs:
            proc.wait()


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
