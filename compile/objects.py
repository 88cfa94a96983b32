"""Built CPU kernels kept as object files, so that each kernel is parsed and compiled once per
machine instead of once per candidate.

A kernel (`compile.kernels.Kernel`) is built alone into `<cache>/objects/hwnas_<digest>.o`,
the digest naming the kernel, the target, TVM's version and `KERNEL_VERSION`; the symbol it
exports is the file's stem. TVM's own PrimFuncs for the ops our kernels do not compute (a
pooling, a concat, a dilated conv, as Relax legalizes them) are kept the same way
(`op_object`), named by the function's structure. A model's Relax graph calls all of them by
symbol and its library links their objects (`CompiledModel.export_library`). The cache is
`$HWNAS_CACHE` or `~/.cache/hwnas`; several processes may fill it at once (each file is
written whole, then renamed). It is kept under `MAX_CACHE_BYTES`: after a new kernel is
built, the files unused longest go first, but never one used in the last `KEEP_RECENT_S`
(another process may be linking it). Deleting the directory is always safe: it is rebuilt
on demand.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm
import tvm_ffi
from tvm.support import cc

from compile.kernels import BUILD_CONFIG, KERNEL_VERSION, Kernel, parse_ahead

MAX_CACHE_BYTES = 512 * 2**20
KEEP_RECENT_S = 24 * 3600


def cache_dir() -> Path:
    """`$HWNAS_CACHE`, else `~/.cache/hwnas`."""
    return Path(os.environ.get("HWNAS_CACHE") or Path.home() / ".cache" / "hwnas")


def target_key(target: tvm.target.Target) -> str:
    """The target as canonical JSON, part of every cache key."""
    return json.dumps(dict(target.export()), sort_keys=True, default=str)


@dataclass(frozen=True)
class KernelObject:
    """A built kernel: the object file and the symbol a Relax graph calls it by."""

    symbol: str
    path: Path


_known: dict[str, KernelObject] = {}
_fallback_dir: tempfile.TemporaryDirectory | None = None


def _objects_dir() -> Path:
    """The cache's objects directory, or a private temporary one when the cache is read-only."""
    global _fallback_dir
    directory = cache_dir() / "objects"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if os.access(directory, os.W_OK):
            return directory
    except OSError:
        pass
    if _fallback_dir is None:
        _fallback_dir = tempfile.TemporaryDirectory(prefix="hwnas-objects-")
    return Path(_fallback_dir.name)


def _write_whole(path: Path, write) -> None:
    """Call `write(tmp)` on a temporary name beside `path` (same suffix), then rename it."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def symbol_for(kernel: Kernel, target: tvm.target.Target | dict) -> str:
    """The symbol `kernel` built for `target` is exported by: `hwnas_<digest>`, the digest
    naming the kernel, the target, TVM's version and `KERNEL_VERSION`."""
    target = tvm.target.Target(target) if isinstance(target, dict) else target
    text = f"v{KERNEL_VERSION}|tvm {tvm.__version__}|{target_key(target)}|{kernel.key}"
    return "hwnas_" + hashlib.sha256(text.encode()).hexdigest()[:24]


# TVM's lowering passes that change nothing in our CPU kernels: with and without them the
# assembly is the same byte for byte (checked on 357 kernels from searches and the benchmarks'
# nets, for AVX2, AVX-512 and aarch64 NEON; tests/test_compile.py keeps one of each kind
# checked). Skipping them takes about a fifth off a kernel's compile (197 kernels: 77.6 ->
# 59.9 s). CUDA kernels take every pass.
SKIPPED_CPU_PASSES = (
    "tirx.RemoveNoOp",
    "s_tir.HoistIfThenElse",
    "s_tir.RenormalizeSplitPattern",
    "s_tir.InjectPermutedLayout",
    "s_tir.InjectVirtualThread",
    "s_tir.CompactBufferAllocation",
)


def build_kernels(symbols: dict[Kernel, str], target: tvm.target.Target | dict) -> Any:
    """The kernels built for `target` into one module, each exported by its symbol."""
    target = tvm.target.Target(target) if isinstance(target, dict) else target
    funcs = {symbol: k.func().with_attr("global_symbol", symbol) for k, symbol in symbols.items()}
    skipped = SKIPPED_CPU_PASSES if target.kind.name == "llvm" else ()
    with tvm.transform.PassContext(config=BUILD_CONFIG, disabled_pass=skipped):
        return tvm.compile(tvm.IRModule(funcs), target=target)


def parse_unbuilt(kernels: list[Kernel], target: tvm.target.Target | dict) -> None:
    """Start parsing, in order and ahead of their builds, those of `kernels` that have no
    object built for `target` yet (`compile.kernels.parse_ahead`)."""
    target = tvm.target.Target(target) if isinstance(target, dict) else target
    unbuilt = []
    for kernel in kernels:
        symbol = symbol_for(kernel, target)
        if symbol not in _known and not (_objects_dir() / f"{symbol}.o").exists():
            unbuilt.append(kernel)
    parse_ahead(unbuilt)


def kernel_object(kernel: Kernel, target: tvm.target.Target | dict) -> KernelObject:
    """The object file of `kernel` built for `target`, built now unless cached."""
    target = tvm.target.Target(target) if isinstance(target, dict) else target
    symbol = symbol_for(kernel, target)
    return _cached_object(symbol, lambda: build_kernels({kernel: symbol}, target))


def op_object(func: tvm.tirx.PrimFunc, target: tvm.target.Target | dict) -> KernelObject:
    """The object file of one of TVM's own PrimFuncs (an op Relax legalized: a pooling, a
    concat, a conv none of our kernels takes) built alone for `target`, built now unless
    cached. Its symbol names the function's structure, the target and TVM's version, so
    every model that legalizes an op to the same function shares one object."""
    target = tvm.target.Target(target) if isinstance(target, dict) else target
    digest = tvm_ffi.structural_hash(func.without_attr("global_symbol"))
    text = f"op|tvm {tvm.__version__}|{target_key(target)}|{digest}"
    symbol = "hwnas_" + hashlib.sha256(text.encode()).hexdigest()[:24]

    def build() -> Any:
        with tvm.transform.PassContext(config=BUILD_CONFIG):
            module = tvm.IRModule({symbol: func.with_attr("global_symbol", symbol)})
            return tvm.compile(module, target=target)

    return _cached_object(symbol, build)


def _cached_object(symbol: str, build: Callable[[], Any]) -> KernelObject:
    """`<objects>/<symbol>.o`, written from `build()` (a built module) unless it is there."""
    known = _known.get(symbol)
    if known is not None and _touch(known.path):
        return known
    path = _objects_dir() / f"{symbol}.o"
    if not _touch(path):
        built = build()
        _write_whole(path, lambda tmp: built.mod.write_to_file(str(tmp)))
        prune(path.parent)
    _known[symbol] = KernelObject(symbol, path)
    return _known[symbol]


def _touch(path: Path) -> bool:
    """Mark a cached file used now (what `prune` orders by); False when it is not there."""
    try:
        os.utime(path)
        return True
    except FileNotFoundError:
        return False
    except OSError:  # read-only cache: the file is there, its time stays
        return path.is_file()


def prune(directory: Path, max_bytes: int | None = None) -> list[Path]:
    """Delete the kernel files unused longest until `directory` holds at most 80% of
    `max_bytes` (default `MAX_CACHE_BYTES`), sparing those used in the last `KEEP_RECENT_S`.
    Does nothing while the directory is under `max_bytes`. Returns the files deleted."""
    limit = MAX_CACHE_BYTES if max_bytes is None else max_bytes
    files = []
    for path in directory.glob("hwnas_*"):
        try:
            stat = path.stat()
        except OSError:
            continue
        files.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in files)
    if total <= limit:
        return []
    deleted, now = [], time.time()
    for mtime, size, path in sorted(files):
        if total <= 0.8 * limit or now - mtime < KEEP_RECENT_S:
            break
        try:
            path.unlink()
        except OSError:
            continue
        total -= size
        deleted.append(path)
    return deleted


def load_kernel(kernel: Kernel, target: tvm.target.Target | dict) -> tuple[Any, str]:
    """`kernel` built for `target` (which must run on this host) and loaded here: the runtime
    module and the kernel's symbol in it (for `time_evaluator`)."""
    obj = kernel_object(kernel, target)
    shared = obj.path.with_suffix(".so")
    if not _touch(shared):
        _write_whole(shared, lambda tmp: cc.create_shared(str(tmp), [str(obj.path)]))
    return tvm.runtime.load_module(str(shared)), obj.symbol
