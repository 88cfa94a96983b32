"""Per-layer choice between a sparse layer's sparse kernel and its dense twin.

On a target this host runs (its CPU, or its GPU for a CUDA target of at most the GPU's
architecture) both kernels are built and timed here (a few quick repeats) and the faster one is
kept, so a compiled candidate is never slower than its dense twin layer by layer.
Times are cached in a JSON table keyed by (target, shape, block, density bucket) under
`$HWNAS_CACHE` or `~/.cache/hwnas/`. Other targets use a density rule until they can be timed.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tvm

from compile.kernels import KERNEL_VERSION, Kernel, KernelSpec
from compile.objects import cache_dir, load_kernel, target_key

CHOICES = ("auto", "sparse", "dense")
# Without timings (targets this host cannot run), a layer goes sparse at or above this sparsity.
SPARSE_ABOVE = 0.7
# Layers whose density falls in the same bucket of this width share a cached timing.
DENSITY_BUCKET = 0.05
CACHE_FILE = "kernel_times.json"


@dataclass(frozen=True)
class KernelCandidate:
    """One way to compute a layer: a kernel taking (X, *constants, Y), its constants and the
    layer's matmul spec."""

    kernel: Kernel
    constants: list[np.ndarray]
    spec: KernelSpec


@dataclass(frozen=True)
class Choice:
    """The kernel kept for one layer and, when timed, both kernels' times in milliseconds."""

    impl: str  # "sparse" | "dense"
    sparse_ms: float | None = None
    dense_ms: float | None = None
    reason: str = ""


@dataclass
class KernelChooser:
    """Decides sparse vs dense per layer: forced, by timing on this host, or by density."""

    target: Any  # tvm.target.Target
    host_runnable: bool
    mode: str = "auto"
    repeats: int = 3
    min_repeat_ms: int = 2
    directory: Path | None = None
    _table: dict[str, dict[str, float]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in CHOICES:
            raise ValueError(f"kernel_choice must be one of {CHOICES}, got {self.mode!r}")

    @property
    def path(self) -> Path:
        return (self.directory or cache_dir()) / CACHE_FILE

    def choose(self, sparse: KernelCandidate, dense: KernelCandidate, density: float) -> Choice:
        """The faster of the two kernels for one layer (see the module docstring)."""
        if self.mode != "auto":
            return Choice(self.mode, reason=f"kernel_choice={self.mode!r}")
        if not self.host_runnable:
            impl = "sparse" if 1.0 - density >= SPARSE_ABOVE - 1e-9 else "dense"
            return Choice(impl, reason=f"density {density:.2f}, target not timed on this host")
        key = self._key(sparse.spec, density)
        entry = self._load().get(key)
        if entry is None:
            entry = {
                "sparse_ms": self._time(sparse),
                "dense_ms": self._time(dense),
            }
            self._save(key, entry)
        impl = "sparse" if entry["sparse_ms"] <= entry["dense_ms"] else "dense"
        return Choice(
            impl,
            entry["sparse_ms"],
            entry["dense_ms"],
            f"sparse {entry['sparse_ms']:.4g} ms vs dense {entry['dense_ms']:.4g} ms",
        )

    def time_fusion(self, fused: tuple, depthwise: tuple, shapes, density: float):
        """For a 1x1 conv that got its dense kernel and feeds only a depthwise conv: the times
        (ms) of the kernel that computes both (the 1x1 conv sparse, inside the depthwise conv)
        and of the depthwise conv alone, as (fused, depthwise); None when not timed here.
        `fused` and `depthwise`: (Kernel, constants); `shapes`: the 1x1 conv's input, the
        depthwise conv's input and its output; `density`: the 1x1 conv's."""
        if self.mode != "auto" or not self.host_runnable:
            return None
        x_shape, mid_shape, y_shape = shapes
        bucket = round(round(density / DENSITY_BUCKET) * DENSITY_BUCKET, 4)
        # A CPU kernel's key leaves out the channel counts (read from its arrays): the shapes
        # name the layer.
        sizes = "x".join(map(str, (*x_shape, *mid_shape[1:2])))
        key = f"v{KERNEL_VERSION}|{target_key(self.target)}|fused|{sizes}|{fused[0].key}|{bucket}"
        entry = self._load().get(key)
        if entry is None:
            entry = {
                "fused_ms": self._time_call(*fused, x_shape, y_shape),
                "depthwise_ms": self._time_call(*depthwise, mid_shape, y_shape),
            }
            self._save(key, entry)
        return entry["fused_ms"], entry["depthwise_ms"]

    def _key(self, spec: KernelSpec, density: float) -> str:
        bucket = round(round(density / DENSITY_BUCKET) * DENSITY_BUCKET, 4)
        shape = f"{spec.batch}x{spec.rows}x{spec.cols}x{spec.m}"
        block = f"{spec.block[0]}x{spec.block[1]}" + ("-kept-rows" if spec.kept_rows else "")
        block += "-by-column" if spec.by_column else ""
        return f"v{KERNEL_VERSION}|{target_key(self.target)}|{shape}|{block}|{bucket}"

    def _time(self, candidate: KernelCandidate) -> float:
        spec = candidate.spec
        residual = [np.zeros(spec.y_shape, np.float32)] if spec.residual else []
        constants = [*candidate.constants, *residual]
        return self._time_call(candidate.kernel, constants, spec.x_shape, spec.y_shape)

    def _time_call(self, kernel: Kernel, constants: list[np.ndarray], x_shape, y_shape) -> float:
        """ms per call of `kernel` on random X of `x_shape`, then `constants`, into Y."""
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
        timer = lib.time_evaluator(
            symbol, dev, number=1, repeat=self.repeats, min_repeat_ms=self.min_repeat_ms
        )
        return float(np.min(timer(*args, out).results)) * 1e3

    def _load(self) -> dict[str, dict[str, float]]:
        if self._table is None:
            try:
                self._table = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._table = {}
        return self._table

    def _save(self, key: str, entry: dict[str, float]) -> None:
        table = self._load()
        table[key] = entry
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
