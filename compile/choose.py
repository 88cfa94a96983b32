"""Per-layer choice between a sparse layer's sparse kernel and its dense twin.

On a target this host runs (its CPU, or its GPU for a CUDA target of at most the GPU's
architecture) both kernels are built and timed here, in turns (a few quick rounds), and the
faster one is kept, so a compiled candidate is never slower than its dense twin layer by
layer; a build plans all layers first and times what is not cached together (`defer`), each
kernel parsed ahead of its build. On another target with a device to time on (`on_device`:
a board reached through the RPC tracker), the kernels a model needs are timed there together
(`time_pending`), all in one session. Times are cached in a JSON table keyed by (target,
shape, block, density bucket) under `$HWNAS_CACHE` or `~/.cache/hwnas/`. Untimed, a layer
goes sparse from `SPARSE_ABOVE` sparsity on.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from compile.kernels import KERNEL_VERSION, Kernel, KernelSpec
from compile.objects import cache_dir, load_kernel, parse_unbuilt, target_key

CHOICES = ("auto", "sparse", "dense")
# Without timings (targets this host cannot run, and no device to time on), a layer goes sparse
# at or above this sparsity.
SPARSE_ABOVE = 0.7
# Layers whose density falls in the same bucket of this width share a cached timing.
DENSITY_BUCKET = 0.05
CACHE_FILE = "kernel_times.json"
# What a call costs in the Relax VM beyond its kernel's time alone (ms): the fused expand
# kernel saves one, or two with a copy of X (`time_fusion`). The CIFAR MobileNetV2's sparse
# net took 0.64-0.80 us a call more than its 47 calls timed alone (with its pooling and
# reshapes); two expand convs of the `mbv2-sparse` net left apart, each timed 0.2 us faster
# so, made the net 0.6-0.9 us slower (docs/kernel-notes.md, session 22).
CALL_MS = 0.0005


@dataclass(frozen=True)
class KernelCandidate:
    """One way to compute a layer: a kernel taking (X, *constants, Y), its constants and the
    layer's matmul spec; `copy`: the kernel that writes the X it reads from the layer's input
    (im2col, a copy with padded rows, a direct conv's padded planes), if any."""

    kernel: Kernel
    constants: list[np.ndarray]
    spec: KernelSpec
    copy: Kernel | None = None


@dataclass(frozen=True)
class Choice:
    """The kernel kept for one layer and, when timed, both kernels' times in milliseconds."""

    impl: str  # "sparse" | "dense"
    sparse_ms: float | None = None
    dense_ms: float | None = None
    reason: str = ""


# One kernel call to time: (kernel, its constants after X, X's shape, Y's shape).
TimingJob = tuple[Kernel, list[np.ndarray], tuple[int, ...], tuple[int, ...]]


def _block_name(spec: KernelSpec) -> str:
    """A matmul kernel's blocks and how it walks them, for the table's keys."""
    block = f"{spec.block[0]}x{spec.block[1]}" + ("-kept-rows" if spec.kept_rows else "")
    return block + ("-by-column" if spec.by_column else "") + ("-direct" if spec.direct else "")


class DeviceTimingFailed(Exception):
    """`KernelChooser.on_device` could not time the kernels (the message names the step)."""


@dataclass
class KernelChooser:
    """Decides sparse vs dense per layer: forced, by timing on this host or on the target's
    device, or by density."""

    target: Any  # tvm.target.Target
    host_runnable: bool
    mode: str = "auto"
    repeats: int = 3
    min_repeat_ms: int = 2
    directory: Path | None = None
    # Times jobs on the target's device: {name: job} -> {name: ms}, or DeviceTimingFailed.
    on_device: Callable[[dict[str, TimingJob]], dict[str, float]] | None = None
    # Host timings left pending too, for `time_pending` to take all at once: their kernels
    # are then parsed ahead of their builds, across layers (`parse_unbuilt`).
    defer: bool = False
    # Table keys whose times `on_device` (or, deferred, this host) is to take, with their jobs
    # by entry field.
    pending: dict[str, dict[str, TimingJob]] = field(default_factory=dict, repr=False)
    device_error: str | None = None
    _table: dict[str, dict[str, float]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in CHOICES:
            raise ValueError(f"kernel_choice must be one of {CHOICES}, got {self.mode!r}")

    @property
    def path(self) -> Path:
        return (self.directory or cache_dir()) / CACHE_FILE

    def choose(
        self,
        sparse: KernelCandidate,
        dense: KernelCandidate,
        density: float,
        x_shape: tuple[int, ...] = (),
    ) -> Choice:
        """The faster of the two kernels for one layer (see the module docstring). Where the
        two read X through different copies (`KernelCandidate.copy`: a 1x1 conv's dense kernel
        reads a copy with padded rows, `compile.rewrite._copies_off_pages`; a direct conv's
        sparse kernel reads padded planes, its dense kernel im2col), each is timed with its
        copy, made from random input of the layer's `x_shape`."""
        if self.mode != "auto":
            return Choice(self.mode, reason=f"kernel_choice={self.mode!r}")
        jobs = {"sparse_ms": self._job(sparse), "dense_ms": self._job(dense)}
        key = self._key(sparse.spec, density)
        if sparse.copy != dense.copy:
            key = self._with_copies(jobs, key, {"sparse": sparse, "dense": dense}, x_shape)
        entry = self._entry(key, jobs)
        if entry is None:
            impl = "sparse" if 1.0 - density >= SPARSE_ABOVE - 1e-9 else "dense"
            return Choice(impl, reason=f"density {density:.2f}, {self._untimed()}")
        sparse_ms = entry["sparse_ms"] + entry.get("sparse_copy_ms", 0.0)
        dense_ms = entry["dense_ms"] + entry.get("dense_copy_ms", 0.0)
        impl = "sparse" if sparse_ms <= dense_ms else "dense"
        reason = f"sparse {sparse_ms:.4g} ms vs dense {dense_ms:.4g} ms"
        if sparse.copy != dense.copy:
            reason += " (each with the copy of its input it reads)"
        return Choice(impl, sparse_ms, dense_ms, reason)

    def time_fusion(
        self,
        fused: tuple,
        depthwise: tuple,
        shapes,
        density: float,
        alone: KernelCandidate,
    ):
        """For a sparse 1x1 conv that feeds only a depthwise conv: the times (ms) of the kernel
        that computes both (the 1x1 conv sparse, inside the depthwise conv) and of the calls it
        replaces (the 1x1 conv's kernel `alone`, after its copy of X if it reads one, then
        the depthwise conv), timed in turns, as (fused, unfused); unfused counts the calls
        saved (`CALL_MS`). None when not timed.
        `fused` and `depthwise`: (Kernel, constants); `shapes`: the 1x1 conv's input, the
        depthwise conv's input and its output; `density`: the 1x1 conv's. None also while the
        times are pending for the device."""
        if self.mode != "auto":
            return None
        x_shape, mid_shape, y_shape = shapes
        bucket = round(round(density / DENSITY_BUCKET) * DENSITY_BUCKET, 4)
        # A CPU kernel's key leaves out the channel counts (read from its arrays): the shapes
        # name the layer.
        sizes = "x".join(map(str, (*x_shape, *mid_shape[1:2])))
        key = f"v{KERNEL_VERSION}|{target_key(self.target)}|fused|{sizes}|{fused[0].key}|{bucket}"
        key += f"|{alone.kernel.op} {_block_name(alone.spec)}"
        jobs = {
            "fused_ms": (*fused, x_shape, y_shape),
            "conv_ms": self._job(alone),
            "depthwise_ms": (*depthwise, mid_shape, y_shape),
        }
        if alone.copy is not None:
            key = self._with_copies(jobs, key, {"conv": alone}, x_shape)
        entry = self._entry(key, jobs)
        if entry is None:
            return None
        unfused = entry["conv_ms"] + entry.get("conv_copy_ms", 0.0) + entry["depthwise_ms"]
        return entry["fused_ms"], unfused + CALL_MS * (len(jobs) - 2)

    def time_pending(self) -> bool:
        """Time the pending jobs into the table: here (deferred), each key's jobs in turns,
        every kernel parsed ahead of its build; or on the device, all in one call of
        `on_device`. True when there were any: plan again, to find their times or, when the
        device failed, the density rule naming the failure (`device_error`)."""
        if not self.pending:
            return False
        pending, self.pending = self.pending, {}
        if self.host_runnable:
            kernels = [job[0] for jobs in pending.values() for job in jobs.values()]
            parse_unbuilt(kernels, self.target)
            self._save({key: self._time_in_turns(jobs) for key, jobs in pending.items()})
            return True
        jobs = {
            f"{i}:{name}": job
            for i, key in enumerate(pending)
            for name, job in pending[key].items()
        }
        try:
            ms = self.on_device(jobs)
        except DeviceTimingFailed as exc:
            self.device_error = str(exc)
            return True
        self._save(
            {
                key: {name: ms[f"{i}:{name}"] for name in fields}
                for i, (key, fields) in enumerate(pending.items())
            }
        )
        return True

    def _entry(self, key: str, jobs: dict[str, TimingJob]) -> dict[str, float] | None:
        """The table's times for `key`; else its jobs timed here now, or left pending for the
        device (None until `time_pending`), or None when nothing can time them."""
        entry = self._load().get(key)
        if entry is not None and not jobs.keys() <= entry.keys():
            entry = None  # written when the entry had fewer jobs
        if entry is None and self.host_runnable and not self.defer:
            parse_unbuilt([job[0] for job in jobs.values()], self.target)
            entry = self._time_in_turns(jobs)
            self._save({key: entry})
        elif entry is None and (self.host_runnable or self.on_device is not None):
            if self.device_error is None:
                self.pending[key] = jobs
        return entry

    def _untimed(self) -> str:
        if self.host_runnable:
            return "to be timed on this host"
        if self.device_error is not None:
            return f"timing on the device failed ({self.device_error})"
        if self.on_device is not None:
            return "to be timed on the device"
        return "target not timed on this host"

    def _key(self, spec: KernelSpec, density: float) -> str:
        bucket = round(round(density / DENSITY_BUCKET) * DENSITY_BUCKET, 4)
        shape = f"{spec.batch}x{spec.rows}x{spec.cols}x{spec.m}"
        return f"v{KERNEL_VERSION}|{target_key(self.target)}|{shape}|{_block_name(spec)}|{bucket}"

    @staticmethod
    def _with_copies(
        jobs: dict[str, TimingJob],
        key: str,
        candidates: dict[str, KernelCandidate],
        x_shape: tuple[int, ...],
    ) -> str:
        """`key`, marked as timing copies of X: the copy each of `candidates` reads (its
        `copy`, from the layer's input of `x_shape`) joins `jobs` as "<name>_copy_ms"."""
        for name, candidate in candidates.items():
            if candidate.copy is not None:
                jobs[f"{name}_copy_ms"] = (candidate.copy, [], x_shape, candidate.spec.x_shape)
        return key + "|copied"

    @staticmethod
    def _job(candidate: KernelCandidate) -> TimingJob:
        spec = candidate.spec
        residual = [np.zeros(spec.y_shape, np.float32)] if spec.residual else []
        return candidate.kernel, [*candidate.constants, *residual], spec.x_shape, spec.y_shape

    def _time_in_turns(self, jobs: dict[str, TimingJob]) -> dict[str, float]:
        """ms per call of each job, the best of `repeats` rounds in which each job is timed
        once. In turns, so that a burst of outside load (seconds long on a shared machine)
        slows the kernels alike: timed one after the other, a 1x1 conv's dense kernel once
        read 0.167 ms (0.078 timed alone), and its fused kernel (0.10 ms) was kept, though
        the two calls it replaced take 0.091 (docs/kernel-notes.md, session 22)."""
        timers = {name: self._timer(*job) for name, job in jobs.items()}
        best = dict.fromkeys(jobs, float("inf"))
        for _ in range(self.repeats):
            for name, timer in timers.items():
                best[name] = min(best[name], timer())
        return best

    def _timer(
        self, kernel: Kernel, constants: list[np.ndarray], x_shape, y_shape
    ) -> Callable[[], float]:
        """A timer of `kernel` on random X of `x_shape`, then `constants`, into Y: each call
        returns ms per call of the kernel, over at least `min_repeat_ms`."""
        if self.target.kind.name == "cuda":  # this host's GPU (see `host_runnable`)
            dev = tvm.cuda(0)
            func = kernel.func()
            lib = tvm.compile(func, target=self.target).mod
            symbol = str(func.attrs["global_symbol"])
        else:
            dev = tvm.cpu()
            lib, symbol = load_kernel(kernel, self.target)
        x = np.random.default_rng(0).standard_normal(x_shape).astype(np.float32)
        args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in (x, *constants)]
        out = tvm.runtime.tensor(np.empty(y_shape, np.float32), dev)
        # `number` fixed once from two calls (the first cold): with `min_repeat_ms`, each
        # call of a time_evaluator calibrates it again, which doubled a round's time.
        probe = lib.time_evaluator(symbol, dev, number=1, repeat=2)
        once_ms = max(min(probe(*args, out).results) * 1e3, 1e-6)
        number = max(1, math.ceil(self.min_repeat_ms / once_ms))
        timer = lib.time_evaluator(symbol, dev, number=number, repeat=1)
        return lambda: float(timer(*args, out).results[0]) * 1e3

    def _load(self) -> dict[str, dict[str, float]]:
        if self._table is None:
            try:
                self._table = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._table = {}
        return self._table

    def _save(self, entries: dict[str, dict[str, float]]) -> None:
        table = self._load()
        table.update(entries)
        try:  # merge with what other processes wrote meanwhile, then replace atomically
            table = {**json.loads(self.path.read_text()), **table}
        except (OSError, ValueError):
            pass
        self._table = table
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(
                "w", dir=self.path.parent, suffix=".tmp", delete=False
            ) as f:
                json.dump(table, f, indent=0, sort_keys=True)
            os.replace(f.name, self.path)
        except OSError:
            pass  # a read-only cache only costs re-timing next time
