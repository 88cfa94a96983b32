"""Built CPU kernels kept as object files, so that each kernel is parsed and compiled once per
machine instead of once per candidate.

A kernel (`compile.kernels.Kernel`) is built alone into `<cache>/objects/hwnas_<digest>.o`,
the digest naming the kernel, the target, TVM's version and `KERNEL_VERSION`; the symbol it
exports is the file's stem. A model's Relax graph calls its kernels by symbol and its library
links their objects (`CompiledModel.export_library`). The cache is `$HWNAS_CACHE` or
`~/.cache/hwnas`; several processes may fill it at once (each file is written whole, then
renamed). Delete the directory to reclaim the space: it is rebuilt on demand.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm
from tvm.support import cc

from compile.kernels import BUILD_CONFIG, KERNEL_VERSION, Kernel


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


def kernel_object(kernel: Kernel, target: tvm.target.Target | dict) -> KernelObject:
    """The object file of `kernel` built for `target`, built now unless cached."""
    target = tvm.target.Target(target) if isinstance(target, dict) else target
    text = f"v{KERNEL_VERSION}|tvm {tvm.__version__}|{target_key(target)}|{kernel.key}"
    digest = hashlib.sha256(text.encode()).hexdigest()[:24]
    known = _known.get(digest)
    if known is not None and known.path.is_file():
        return known
    symbol = f"hwnas_{digest}"
    path = _objects_dir() / f"{symbol}.o"
    if not path.is_file():
        func = kernel.func().with_attr("global_symbol", symbol)
        with tvm.transform.PassContext(config=BUILD_CONFIG):
            built = tvm.compile(tvm.IRModule({symbol: func}), target=target)
        _write_whole(path, lambda tmp: built.mod.write_to_file(str(tmp)))
    _known[digest] = KernelObject(symbol, path)
    return _known[digest]


def load_kernel(kernel: Kernel, target: tvm.target.Target | dict) -> tuple[Any, str]:
    """`kernel` built for `target` (which must run on this host) and loaded here: the runtime
    module and the kernel's symbol in it (for `time_evaluator`)."""
    obj = kernel_object(kernel, target)
    shared = obj.path.with_suffix(".so")
    if not shared.is_file():
        _write_whole(shared, lambda tmp: cc.create_shared(str(tmp), [str(obj.path)]))
    return tvm.runtime.load_module(str(shared)), obj.symbol
