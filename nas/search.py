"""The trial loop: ask for an arch, train it, compile it, time it on the device, tell."""

from __future__ import annotations

import contextlib
import json
import logging
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

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
    make_sampler(config.strategy, config.seed)
    space = get_space(config.space)
    profile = load_profile(config.device)
    data = load_dataset(config.dataset, seed=config.seed, image_size=config.image_size)
    if config.tracker:
        check_tracker(parse_tracker(config.tracker))
    return space, profile, data


def open_study(config: SearchConfig) -> optuna.Study:
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
    elif run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / "config.json").exists():
        raise UserError(f"{run_dir} exists and is not an hwnas run: choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    sampler = make_sampler(config.strategy, config.seed)
    study = optuna.create_study(
        study_name=config.study_name,
        storage=config.storage_url,
        directions=DIRECTIONS,
        sampler=sampler,
        load_if_exists=True,
    )
    study.set_metric_names(METRIC_NAMES)
    _fail_interrupted(study)
    # A resumed run continues the sampler's sequence instead of repeating its first proposals.
    study.sampler = make_sampler(config.strategy, config.seed + len(study.trials))
    return study


def _fail_interrupted(study: optuna.Study) -> None:
    """Marks trials left RUNNING by a killed search as failed, so that nothing stays RUNNING."""
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        storage.set_trial_user_attr(t._trial_id, "fail_reason", INTERRUPTED)
        storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)


def finished_trials(study: optuna.Study) -> int:
    """Trials that count against the budget: complete, or failed for a reason of their own."""
    n = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == optuna.trial.TrialState.COMPLETE:
            n += 1
        elif (
            t.state == optuna.trial.TrialState.FAIL
            and t.user_attrs.get("fail_reason") != INTERRUPTED
        ):
            n += 1
    return n


@contextlib.contextmanager
def connect_device(config: SearchConfig, profile: Profile) -> Iterator[Tracker]:
    """The user's tracker, checked; or a tracker and a stock rpc_server started for this run."""
    if config.tracker:
        yield parse_tracker(config.tracker)
        return
    with local_tracker() as tracker, local_server(tracker, profile.key):
        yield tracker


def run_trial(trial: optuna.Trial, ctx: SearchContext) -> tuple[float, float]:
    """Trains, compiles and measures one candidate; records its attributes on the trial."""
    config = ctx.config
    arch = {
        name: trial.suggest_categorical(name, values) for name, values in ctx.space.choices.items()
    }
    trial.set_user_attr("arch", arch)
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
    (trial_dir / "measurement.json").write_text(
        json.dumps(
            {
                "median_ms": m.median_ms,
                "p10_ms": m.p10_ms,
                "p90_ms": m.p90_ms,
                "cv": m.cv,
                "number": m.number,
                "repeats": m.repeats,
                "key": m.key,
            },
            indent=2,
        )
    )
    return result.accuracy, m.median_ms


def _describe_failure(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first}"[:500]


def search(config: SearchConfig, progress: Callable[[str], None] = print) -> optuna.Study:
    """Runs the search until the study holds `config.trials` finished trials."""
    space, profile, data = prepare(config)
    study = open_study(config)
    (config.run_dir / "config.json").write_text(config.to_json())
    study.set_user_attr("space", config.space)
    study.set_user_attr("strategy", config.strategy)
    study.set_user_attr("device", profile.name)
    study.set_user_attr("dataset", data.name)
    study.set_user_attr("emulated", profile.emulated)
    study.set_user_attr("protocol", profile.protocol.__dict__)
    study.set_user_attr("command", command_line(config))

    dists = distributions(space.choices)
    started = time.monotonic()
    with connect_device(config, profile) as tracker:
        ctx = SearchContext(config, space, profile, data, tracker, data.val_x[:1].contiguous())
        while (done := finished_trials(study)) < config.trials:
            trial = study.ask(dists)
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
                progress(
                    _progress_line(study, done + 1, config.trials, started, f"failed: {reason}")
                )
                continue
            study.tell(trial, list(values))
            note = f"acc {values[0]:.3f}  {values[1]:.3f} ms"
            progress(_progress_line(study, done + 1, config.trials, started, note))
    return study


def _progress_line(study: optuna.Study, n: int, total: int, started: float, note: str) -> str:
    elapsed = time.monotonic() - started
    front = sorted(study.best_trials, key=lambda t: t.values[1])
    shown = "  ".join(f"({t.values[0]:.3f}, {t.values[1]:.2f} ms)" for t in front[:4])
    more = f" +{len(front) - 4}" if len(front) > 4 else ""
    return f"[trial {n}/{total}] {elapsed:6.0f}s  {note}  | front: {shown or '-'}{more}"


def command_line(config: SearchConfig) -> str:
    """The command that repeats this search."""
    parts = [
        "hwnas search",
        f"--space {config.space}",
        f"--strategy {config.strategy}",
        f"--device {config.device}",
        f"--trials {config.trials}",
        f"--epochs {config.epochs}",
        f"--dataset {config.dataset}",
        f"--seed {config.seed}",
        f"--out {config.out}",
    ]
    if config.tracker:
        parts.append(f"--tracker {config.tracker}")
    return " ".join(parts)


def config_from_run(run_dir: Path) -> SearchConfig:
    return SearchConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
