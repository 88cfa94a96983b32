"""Timing a built library on a remote device with a stated protocol; every step is bounded in
time and a failure comes back as data (`Measurement(error=...)`, `LayerTimes(error=...)`)
naming the step."""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from hw_profiles.profiles import Profile, Protocol
from hw_profiles.rpc import DeviceError, ServerGone, Tracker, check_tracker, request_session

__all__ = [
    "KernelCall",
    "LayerTimes",
    "Measurement",
    "RemoteVM",
    "StepError",
    "measure_layers",
    "measure_library",
    "run_remote",
    "time_remote",
]

# `number` never grows past this, whatever a near-zero calibration run suggests.
_MAX_NUMBER = 1_000_000
_CALIBRATION_ROUNDS = 12
# Each layer's calls are timed with at most this many repeats (and no re-measurement): a model
# has dozens of calls, and their sum is a breakdown of a latency measured in full.
LAYER_REPEATS = 5
_T = TypeVar("_T")


@dataclass(frozen=True)
class Measurement:
    """Latency of one library on one device (ms, per call), or the error that prevented it."""

    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    cv: float | None = None
    number: int = 0
    repeats: int = 0
    key: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class KernelCall:
    """One call of a function in a plain library (no Relax VM): `symbol(*inputs, out)`, where
    `out` is a new float32 array of `output_shape` (destination-passing style)."""

    symbol: str
    inputs: tuple[np.ndarray, ...]
    output_shape: tuple[int, ...]


@dataclass(frozen=True)
class LayerTimes:
    """Per-layer times on one device (ms per call, median; a layer of several calls is their
    sum), or the error that prevented them."""

    ms: dict[str, float] = field(default_factory=dict)
    repeats: int = 0
    key: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class RemoteVM:
    """A Relax VM loaded in a remote session, with its device and the inputs copied there."""

    session: Any
    device: Any
    vm: Any
    args: list[Any]


class StepError(Exception):
    """A remote step that failed or ran out of time; the message starts with the step."""

    def __init__(self, step: str, message: str, server_gone: bool = False) -> None:
        prefix = f"{step}: "
        super().__init__(message if message.startswith(prefix) else prefix + message)
        self.step = step
        self.server_gone = server_gone  # the matched server took no session (`ServerGone`)


class _Steps:
    """The step a worker thread is in and when it began, read by the watching thread."""

    def __init__(self) -> None:
        self.name = "start"
        self.limit_s = 0.0
        self.started = time.monotonic()

    def enter(self, name: str, limit_s: float) -> None:
        self.name, self.limit_s, self.started = name, limit_s, time.monotonic()

    def overdue(self) -> bool:
        return self.limit_s > 0 and time.monotonic() - self.started > self.limit_s


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    # TVM's errors put the useful line last, after a traceback.
    text = lines[-1] if lines else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _in_session(
    lib_path: Path,
    profile: Profile,
    tracker: Tracker,
    body: Callable[[Any, Any, Any, Callable[[str], None]], _T],
    *,
    request_timeout_s: float,
    session_timeout_s: float | None = None,
) -> _T:
    """Open a session on `profile.key`, upload and load the library, and call
    `body(session, module, device, enter_step)`; returns its value or raises `StepError` naming
    the step that failed or ran past `profile.protocol.timeout_s`. The server ends the session
    after `session_timeout_s` (default 8 steps' limits), so that a hung kernel frees the device
    even though this thread cannot be interrupted; the session is released whatever happens."""
    limit = profile.protocol.timeout_s
    steps = _Steps()
    outcome: dict[str, Any] = {}

    def enter(name: str) -> None:
        steps.enter(name, limit)

    def work() -> None:
        remote = None
        try:
            steps.enter("request", request_timeout_s + 10.0)
            remote = request_session(
                tracker,
                profile.key,
                request_timeout_s,
                session_timeout_s=session_timeout_s or limit * 8,
            )
            enter("upload")
            remote.upload(str(lib_path))
            enter("load")
            module = remote.load_module(lib_path.name)
            dev = remote.cuda(0) if profile.target.get("kind") == "cuda" else remote.cpu(0)
            outcome["value"] = body(remote, module, dev, enter)
        except BaseException as err:  # reported to the caller, never lost in the thread
            # Keep only text: the traceback's frames hold the session, which must close now.
            outcome["error"] = str(err) if isinstance(err, StepError) else _first_line(err)
            outcome["step"] = steps.name
            outcome["server_gone"] = isinstance(err, ServerGone)
        finally:
            remote = None

    thread = threading.Thread(target=work, name=f"hwnas-measure-{profile.key}", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
        if steps.overdue():
            raise StepError(steps.name, f"no answer within {steps.limit_s:g}s")
    if "error" in outcome:
        # Frees any remote object an error left in a cycle, which releases the device. A
        # session that ended well holds none, and a full collection costs 0.2 s in a search.
        gc.collect()
        raise StepError(outcome["step"], outcome["error"], outcome["server_gone"])
    return outcome["value"]


def run_remote(
    lib_path: str | os.PathLike[str],
    inputs: Sequence[np.ndarray],
    profile: Profile,
    tracker: Tracker,
    body: Callable[[RemoteVM, Callable[[str], None]], Any],
    *,
    request_timeout_s: float = 30.0,
) -> Any:
    """Open a session on `profile.key`, load the library into a Relax VM with the inputs on the
    device, and call `body(remote_vm, enter_step)`; returns its value or raises `StepError`
    naming the step that failed or ran past `profile.protocol.timeout_s`. The session is
    released whatever happens."""

    def in_vm(session, module, dev, enter: Callable[[str], None]) -> Any:
        enter("vm")
        from tvm import relax, runtime

        vm = relax.VirtualMachine(module, dev)
        enter("inputs")
        args = [runtime.tensor(np.ascontiguousarray(x), dev) for x in inputs]
        return body(RemoteVM(session, dev, vm, args), enter)

    return _in_session(
        Path(lib_path), profile, tracker, in_vm, request_timeout_s=request_timeout_s
    )


# (number, repeat, cooldown_ms) -> seconds per call, one value per repeat (each the mean of
# `number` calls).
Timer = Callable[[int, int, float], np.ndarray]


def _evaluator(module: Any, name: str, device: Any, args: Sequence[Any]) -> Timer:
    """A `Timer` of `module[name](*args)` (a Relax VM's function or a library's symbol)."""

    def timer(number: int, repeat: int, cooldown_ms: float) -> np.ndarray:
        evaluator = module.time_evaluator(
            name,
            device,
            number=number,
            repeat=repeat,
            cooldown_interval_ms=int(round(cooldown_ms)),
            repeats_to_cooldown=1,
        )
        return np.asarray(evaluator(*args).results, dtype=np.float64)

    return timer


def _calibrate_number(timer: Timer, protocol: Protocol) -> int:
    """The smallest `number` (roughly) for which one repeat takes at least min_repeat_ms: each
    round scales `number` by what the last one took, 10% over. (Doubling it instead, whenever a
    round fell just short, made a repeat last up to twice min_repeat_ms.)"""
    number = 1
    for _ in range(_CALIBRATION_ROUNDS):
        total_ms = float(timer(number, 1, 0.0)[0]) * number * 1e3
        if total_ms >= protocol.min_repeat_ms or number >= _MAX_NUMBER:
            return number
        scale = protocol.min_repeat_ms / max(total_ms, 1e-6)
        number = min(_MAX_NUMBER, max(number + 1, math.ceil(number * scale * 1.1)))
    return number


def _summarise(seconds: np.ndarray, number: int, key: str) -> Measurement:
    ms = seconds * 1e3
    mean = float(np.mean(ms))
    return Measurement(
        median_ms=float(np.median(ms)),
        p10_ms=float(np.percentile(ms, 10)),
        p90_ms=float(np.percentile(ms, 90)),
        cv=float(np.std(ms) / mean) if mean > 0 else math.inf,
        number=number,
        repeats=len(ms),
        key=key,
    )


def _warm_and_calibrate(timer: Timer, protocol: Protocol, enter: Callable[[str], None]) -> int:
    """Run the protocol's warm-up calls, then return the calibrated `number`."""
    if protocol.warmup > 0:
        enter("warmup")
        timer(protocol.warmup, 1, 0.0)
    enter("calibrate")
    return _calibrate_number(timer, protocol)


def _time_by_protocol(
    timer: Timer, protocol: Protocol, key: str, enter: Callable[[str], None]
) -> Measurement:
    """Warm up, calibrate `number`, time the protocol's repeats and re-measure (at most
    `remeasure` times) while CV > max_cv, keeping the tightest."""
    repeats = protocol.repeats
    number = _warm_and_calibrate(timer, protocol, enter)
    enter("time")
    best = _summarise(timer(number, repeats, protocol.cooldown_ms), number, key)
    for attempt in range(protocol.remeasure):
        if best.cv is not None and best.cv <= protocol.max_cv:
            break
        enter(f"remeasure {attempt + 1}")
        again = _summarise(timer(number, repeats, protocol.cooldown_ms), number, key)
        if again.cv is not None and best.cv is not None and again.cv < best.cv:
            best = again
    return best


def time_remote(remote: RemoteVM, protocol: Protocol, key: str, enter: Callable[[str], None]):
    """Time "main" by the protocol: warm-up, calibrate `number`, time `repeats` repeats, and
    re-measure (at most `remeasure` times) while CV > max_cv, keeping the tightest."""
    timer = _evaluator(remote.vm, "main", remote.device, remote.args)
    return _time_by_protocol(timer, protocol, key, enter)


# How long a measurement waits for an unreachable tracker before its next try (a restarted
# tracker has its servers back within a second or two).
TRACKER_RETRY_WAIT_S = 5.0


def _check_then_time(
    remote: RemoteVM,
    enter: Callable[[str], None],
    profile: Profile,
    check: Callable[[np.ndarray], None] | None,
) -> Measurement:
    if check is not None:
        enter("check")
        check(remote.vm["main"](*remote.args).numpy())
    return time_remote(remote, profile.protocol, profile.key, enter)


def _with_retries(
    profile: Profile, tracker: Tracker, attempt: Callable[[], _T]
) -> tuple[_T | None, str | None]:
    """`attempt()`'s value and None, or None and the last error (naming its step); a failed
    try is retried `protocol.retries` times, except where a retry would fail the same way."""
    errors: list[str] = []
    for _try in range(1 + profile.protocol.retries):
        try:
            check_tracker(tracker)
            return attempt(), None
        except StepError as err:
            errors.append(str(err))
            if err.server_gone:
                continue  # the tracker has dropped that server: another may take the session
            if err.step in ("request", "check") or "no answer within" in str(err):
                break  # no server, a wrong output, or a hung kernel: a retry would do the same
        except DeviceError as err:  # the tracker is gone: it may be restarting
            errors.append(f"request: {_first_line(err)}")
            time.sleep(TRACKER_RETRY_WAIT_S)
            continue
        except Exception as err:  # anything unforeseen: still data
            errors.append(f"request: {_first_line(err)}")
            break
        # A server that died mid-measurement has left the tracker: the next request gets
        # another server with the same key, if there is one.
    tries = f" (after {len(errors)} tries)" if len(errors) > 1 else ""
    return None, errors[-1] + tries


def measure_library(
    lib_path: str | os.PathLike[str],
    inputs: list[np.ndarray],
    profile: Profile,
    tracker: Tracker,
    *,
    request_timeout_s: float = 30.0,
    check: Callable[[np.ndarray], None] | None = None,
) -> Measurement:
    """Latency of the library's "main" on `inputs`, on a device registered under
    `profile.key`; never raises for a device failure (see `Measurement.error`).

    `check`, when given, receives the output of one run on the device before it is timed, in
    the same session, and raises if the output is wrong (the error says "check: ...")."""
    lib_path = Path(lib_path)
    if not lib_path.is_file():
        return Measurement(key=profile.key, error=f"upload: library not found: {lib_path}")
    measured, error = _with_retries(
        profile,
        tracker,
        lambda: run_remote(
            lib_path,
            inputs,
            profile,
            tracker,
            lambda remote, enter: _check_then_time(remote, enter, profile, check),
            request_timeout_s=request_timeout_s,
        ),
    )
    return measured if error is None else Measurement(key=profile.key, error=error)


def _time_layers(
    module: Any,
    device: Any,
    enter: Callable[[str], None],
    layers: Mapping[str, Sequence[KernelCall]],
    protocol: Protocol,
) -> dict[str, float]:
    """Each layer's time: the sum over its calls of the median ms per call. Every call is
    warmed up and its `number` calibrated first; then the calls are timed in rounds, each once a
    round, so that a burst of other work on the device slows every layer alike instead of the
    one being timed then (as in `compile.choose.KernelChooser._time_in_turns`). So every
    call's arrays (its weights, input and output) stay on the device until the last round."""
    from tvm import runtime

    timers: list[tuple[str, str, Timer, int]] = []  # layer, step name, timer, number
    for name, calls in layers.items():
        for call in calls:
            where = f"layer {name!r} ({call.symbol})"
            enter(f"inputs {where}")
            args = [runtime.tensor(np.ascontiguousarray(a), device) for a in call.inputs]
            args.append(runtime.tensor(np.zeros(call.output_shape, np.float32), device))
            timer = _evaluator(module, call.symbol, device, args)
            number = _warm_and_calibrate(
                timer, protocol, lambda step, where=where: enter(f"{step} {where}")
            )
            timers.append((name, where, timer, number))
    seconds: list[list[float]] = [[] for _ in timers]
    for _ in range(min(protocol.repeats, LAYER_REPEATS)):
        for (_, where, timer, number), taken in zip(timers, seconds, strict=True):
            enter(f"time {where}")
            taken.append(float(timer(number, 1, 0.0)[0]))
            time.sleep(protocol.cooldown_ms / 1e3)
    times = dict.fromkeys(layers, 0.0)
    for (name, *_), taken in zip(timers, seconds, strict=True):
        times[name] += float(np.median(taken)) * 1e3
    return times


def measure_layers(
    lib_path: str | os.PathLike[str],
    layers: Mapping[str, Sequence[KernelCall]],
    profile: Profile,
    tracker: Tracker,
    *,
    request_timeout_s: float = 30.0,
) -> LayerTimes:
    """Per-layer times on the device registered under `profile.key`: the library (a plain
    shared library of kernels, no Relax VM) is uploaded once, and in one session each layer's
    calls are warmed up and their `number` calibrated by the protocol, then timed in rounds
    (each call once a round; `LAYER_REPEATS` rounds at most, no re-measurement); a layer's time
    is the sum of its calls' medians. Never raises for a device failure (see `LayerTimes.error`,
    which names the step and the layer)."""
    lib_path = Path(lib_path)
    if not lib_path.is_file():
        return LayerTimes(key=profile.key, error=f"upload: library not found: {lib_path}")
    protocol = profile.protocol
    # The server ends the session past 8 step limits plus ten times what the calls should take
    # (a repeat lasts about min_repeat_ms; warm-up and calibration about four more).
    per_call_s = (LAYER_REPEATS + 4) * (protocol.min_repeat_ms + protocol.cooldown_ms) / 1e3
    calls = sum(len(c) for c in layers.values())
    session_timeout_s = protocol.timeout_s * 8 + 10 * per_call_s * calls

    def body(_session, module, device, enter: Callable[[str], None]) -> dict[str, float]:
        return _time_layers(module, device, enter, layers, protocol)

    ms, error = _with_retries(
        profile,
        tracker,
        lambda: _in_session(
            lib_path,
            profile,
            tracker,
            body,
            request_timeout_s=request_timeout_s,
            session_timeout_s=session_timeout_s,
        ),
    )
    if error is not None:
        return LayerTimes(key=profile.key, error=error)
    return LayerTimes(ms=ms, repeats=min(protocol.repeats, LAYER_REPEATS), key=profile.key)
