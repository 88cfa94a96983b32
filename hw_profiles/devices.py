"""What `hwnas devices` and `hwnas profiles` show: a probe that checks a device end to end
(build for its target, run remotely, compare with numpy, time), and plain-text formatting."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hw_profiles.measure import RemoteVM, StepError, run_remote, time_remote
from hw_profiles.profiles import Profile
from hw_profiles.rpc import Tracker, check_tracker

__all__ = [
    "CheckResult",
    "build_probe_library",
    "check_device",
    "format_check",
    "format_devices",
    "format_profile",
    "format_profile_table",
]

# The probe's result may differ from numpy's by float32 rounding over `size` products.
_PROBE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class CheckResult:
    """Outcome of `check_device`: whether the device ran the probe correctly, and how fast."""

    profile: str
    key: str
    ok: bool
    gflops: float | None = None
    median_ms: float | None = None
    cv: float | None = None
    max_error: float | None = None
    error: str | None = None


def build_probe_library(profile: Profile, directory: str | os.PathLike[str], size: int) -> Path:
    """Build a Relax module computing `x @ w` (size x size, float32) for the profile's target
    (cross-compiled when it names a cross compiler) and export it as `probe.so`."""
    import tvm
    from tvm import relax

    shape = relax.TensorType((size, size), "float32")
    builder = relax.BlockBuilder()
    x, w = relax.Var("x", shape), relax.Var("w", shape)
    with builder.function("main", [x, w]):
        with builder.dataflow():
            y = builder.emit_output(relax.op.matmul(x, w))
        builder.emit_func_output(y)
    executable = tvm.compile(builder.get(), target=profile.tvm_target())
    path = Path(directory) / "probe.so"
    if profile.cross_compiler:
        from tvm.support import cc

        executable.export_library(str(path), fcompile=cc.cross_compiler(profile.cross_compiler))
    else:
        executable.export_library(str(path))
    return path


def check_device(
    profile: Profile,
    tracker: Tracker,
    *,
    size: int = 256,
    seed: int = 0,
    request_timeout_s: float = 30.0,
) -> CheckResult:
    """Run a probe matmul on the device registered under `profile.key`: its output must match
    numpy's; reports GFLOP/s and the timer's CV. Raises DeviceError only when the tracker
    itself is unreachable; any other failure is in `CheckResult.error`."""
    check_tracker(tracker)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (size, size)).astype(np.float32)
    w = rng.uniform(-1, 1, (size, size)).astype(np.float32)
    expected = x.astype(np.float64) @ w.astype(np.float64)

    def probe(remote: RemoteVM, enter):
        enter("run")
        got = remote.vm["main"](*remote.args).numpy()
        return got, time_remote(remote, profile.protocol, profile.key, enter)

    with tempfile.TemporaryDirectory(prefix="hwnas-probe-") as tmp:
        try:
            lib = build_probe_library(profile, tmp, size)
        except Exception as err:  # a missing cross compiler, an unbuildable target
            text = str(err).strip().splitlines()
            return CheckResult(
                profile.name, profile.key, False, error=f"build: {text[-1] if text else err!r}"
            )
        try:
            got, timing = run_remote(
                lib, [x, w], profile, tracker, probe, request_timeout_s=request_timeout_s
            )
        except StepError as err:
            return CheckResult(profile.name, profile.key, False, error=str(err))
    max_error = float(np.max(np.abs(got - expected)) / max(1.0, float(np.max(np.abs(expected)))))
    gflops = 2.0 * size**3 / (timing.median_ms * 1e-3) / 1e9
    error = None
    if got.shape != expected.shape or not max_error <= _PROBE_TOLERANCE:
        error = f"check: the probe's output differs from numpy's (relative error {max_error:.2e})"
    return CheckResult(
        profile=profile.name,
        key=profile.key,
        ok=error is None,
        gflops=gflops,
        median_ms=timing.median_ms,
        cv=timing.cv,
        max_error=max_error,
        error=error,
    )


# ---------------------------------------------------------------------------------------------
# Text for the CLI


def format_profile(profile: Profile) -> str:
    """A multi-line description of one resolved profile (`hwnas profiles show`)."""
    protocol = profile.protocol
    aliases = f"  (aliases: {', '.join(profile.aliases)})" if profile.aliases else ""
    rows = [
        ("family", profile.family),
        ("target", json.dumps(profile.target)),
        ("host", json.dumps(profile.host) if profile.host else "-"),
        ("cross", profile.cross_compiler or "-"),
        ("rpc key", profile.key),
        (
            "protocol",
            f"warmup {protocol.warmup}, min_repeat_ms {protocol.min_repeat_ms:g}, "
            f"repeats {protocol.repeats}, cooldown_ms {protocol.cooldown_ms:g}, "
            f"max_cv {protocol.max_cv:g}, remeasure {protocol.remeasure}, "
            f"timeout_s {protocol.timeout_s:g}",
        ),
        ("emulated", "yes (timings are not a real board's)" if profile.emulated else "no"),
        ("file", profile.source or "-"),
    ]
    lines = [f"{profile.name}{aliases}", f"  {profile.description}"]
    lines += [f"  {label:<9} {value}" for label, value in rows]
    return "\n".join(lines)


def format_profile_table(profiles: list[Profile]) -> str:
    """One line per profile: name, RPC key, family, description (`hwnas profiles list`)."""
    if not profiles:
        return "no profiles found"
    width = max(len(p.name) for p in profiles)
    key_width = max(len(p.key) for p in profiles)
    header = f"{'profile':<{width}}  {'rpc key':<{key_width}}  family  description"
    lines = [header]
    for p in profiles:
        lines.append(f"{p.name:<{width}}  {p.key:<{key_width}}  {p.family:<6}  {p.description}")
    return "\n".join(lines)


def format_devices(
    summary: dict[str, dict[str, int]], profiles: list[Profile], tracker: Tracker
) -> str:
    """The tracker's keys with free / busy / pending counts and the profiles that use each key
    (`hwnas devices list`)."""
    if not summary:
        return f"no RPC servers registered at {tracker}"
    by_key: dict[str, list[str]] = {}
    for p in profiles:
        by_key.setdefault(p.key, []).append(p.name)
    width = max(len("key"), *(len(k) for k in summary))
    lines = [f"RPC tracker {tracker}", f"{'key':<{width}}  free  busy  pending  profiles"]
    for key, counts in summary.items():
        names = ", ".join(by_key.get(key, [])) or "-"
        line = f"{key:<{width}}  {counts['free']:>4}  {counts['busy']:>4}"
        lines.append(f"{line}  {counts['pending']:>7}  {names}")
    return "\n".join(lines)


def format_check(result: CheckResult) -> str:
    """One line saying whether `hwnas devices check` passed, and the probe's speed."""
    if not result.ok and result.gflops is None:
        return f"FAIL {result.profile} (key {result.key}): {result.error}"
    status = "ok  " if result.ok else "FAIL"
    line = (
        f"{status} {result.profile} (key {result.key}): {result.gflops:.2f} GFLOP/s, "
        f"median {result.median_ms:.3f} ms, CV {result.cv:.1%}, "
        f"max relative error {result.max_error:.1e}"
    )
    return line if result.ok else f"{line}: {result.error}"
