"""An emulated aarch64 board: Debian's arm64 Python and TVM's aarch64 wheel run under
qemu-user, serving TVM's stock RPC server, so that ARM builds can be checked on an x86 host.

Emulated timings say nothing about a real board; the board is for correctness and plumbing.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import json
import logging
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from hw_profiles.rpc import (
    DeviceError,
    LocalServer,
    Tracker,
    _log_tail,
    _server_process,
    parse_tracker,
    tracker_summary,
)

__all__ = [
    "BoardFiles",
    "emulated_server",
    "prepare_board",
    "qemu_cpus",
    "serve_emulated",
]

logger = logging.getLogger(__name__)

QEMU = "qemu-aarch64-static"
APT_PACKAGES = ("python3.11", "libstdc++6")
PLATFORM_ARGS = (
    "--platform",
    "manylinux_2_28_aarch64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
)
# What `import tvm` and `tvm.exec.rpc_server` need beyond TVM's declared dependencies.
EXTRA_WHEELS = ("cloudpickle", "psutil")
_INSTALL_HINT = "apt-get install qemu-user-static gcc-aarch64-linux-gnu g++-aarch64-linux-gnu"


@dataclass(frozen=True)
class BoardFiles:
    """A prepared emulated board: its directory, the arm64 sysroot, the wheels' site
    directory, and `python`, the wrapper script that runs the board's Python."""

    root: Path
    sysroot: Path
    site_packages: Path
    python: Path
    tvm_version: str


# ---------------------------------------------------------------------------------------------
# Preparing the board (once per TVM version, cached)


def default_cache_dir() -> Path:
    """Where boards are kept: `$HWNAS_CACHE/aarch64-board`, else `~/.cache/hwnas/aarch64-board`."""
    root = os.environ.get("HWNAS_CACHE") or Path.home() / ".cache" / "hwnas"
    return Path(root).expanduser() / "aarch64-board"


def _require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise DeviceError(
            f"{name} is not installed: the emulated board needs it (apt-get install {package})"
        )
    return path


def _board_files(root: Path, tvm_version: str) -> BoardFiles:
    return BoardFiles(
        root=root,
        sysroot=root / "sysroot",
        site_packages=root / "site-packages",
        python=root / "bin" / "python3",
        tvm_version=tvm_version,
    )


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    """Run a build step; on failure raise DeviceError quoting the last lines of its output."""
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
        raise DeviceError(f"{what} failed: {' | '.join(lines[-3:])}")


def _check_apt_sources() -> None:
    etc = Path("/etc/apt")
    files = [etc / "sources.list", *etc.glob("sources.list.d/*.list")]
    files += etc.glob("sources.list.d/*.sources")
    for path in files:
        with contextlib.suppress(OSError):
            lines = path.read_text().splitlines()
            if any(line.lstrip().startswith(("deb ", "deb [", "Types:")) for line in lines):
                return
    raise DeviceError(
        "no apt sources in /etc/apt: the emulated board is built from Debian's arm64 packages "
        "(add a Debian bookworm entry, e.g. deb.debian.org, to /etc/apt/sources.list.d/)"
    )


def _fetch_sysroot(work: Path, sysroot: Path) -> int:
    """Download Debian's arm64 Python and libstdc++ with a private apt state (the host's own
    apt sources, no `dpkg --add-architecture`) and unpack them into `sysroot`."""
    apt_get = _require_tool("apt-get", "apt")
    dpkg_deb = _require_tool("dpkg-deb", "dpkg")
    _check_apt_sources()
    state, cache, log = work / "apt-state", work / "apt-cache", work / "apt-log"
    for path in (state / "lists" / "partial", cache / "archives" / "partial", log):
        path.mkdir(parents=True)
    (state / "status").touch()
    options = {
        "Dir::State": state,
        "Dir::State::status": state / "status",
        "Dir::Cache": cache,
        "Dir::Log": log,
        "APT::Architecture": "arm64",
        "APT::Architectures": "arm64",
        "APT::Install-Recommends": "false",
        "APT::Sandbox::User": pwd.getpwuid(os.getuid()).pw_name,
        "Debug::NoLocking": "1",
    }
    apt = [apt_get, "-q", "-y"]
    for name, value in options.items():
        apt += ["-o", f"{name}={value}"]
    _run([*apt, "update"], "apt-get update for arm64 package lists")
    try:
        _run([*apt, "install", "--download-only", *APT_PACKAGES], "downloading arm64 packages")
    except DeviceError as err:
        raise DeviceError(
            f"{err} (the machine's apt sources must carry arm64 packages of Debian bookworm's "
            "python3.11, e.g. deb.debian.org)"
        ) from None
    debs = sorted((cache / "archives").glob("*.deb"))
    if not debs:
        raise DeviceError("apt downloaded no arm64 packages: check the machine's apt sources")
    sysroot.mkdir(parents=True)
    for deb in debs:
        _run([dpkg_deb, "-x", str(deb), str(sysroot)], f"unpacking {deb.name}")
    _relativize_links(sysroot)
    return len(debs)


def _relativize_links(sysroot: Path) -> None:
    """Point absolute symlinks inside the sysroot at the sysroot, not at the host's files (the
    host kernel, not qemu, follows a symlink)."""
    for dirpath, dirnames, filenames in os.walk(sysroot):
        for name in dirnames + filenames:
            link = Path(dirpath, name)
            if link.is_symlink() and os.readlink(link).startswith("/"):
                target = sysroot / os.readlink(link).lstrip("/")
                link.unlink()
                link.symlink_to(os.path.relpath(target, link.parent))


def _install_wheels(work: Path, site: Path, tvm_version: str, ffi_version: str) -> list[str]:
    """Download TVM's aarch64 wheel and the runtime packages for cp311 aarch64, and install
    them into `site` (pip never runs on the board)."""
    wheels = work / "wheels"
    requirements = [f"apache-tvm=={tvm_version}", f"apache-tvm-ffi=={ffi_version}"]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run(
        [*pip, "download", "--only-binary=:all:", *PLATFORM_ARGS, "-d", str(wheels)]
        + requirements
        + list(EXTRA_WHEELS),
        f"pip download of the aarch64 wheels ({', '.join(requirements)})",
    )
    files = sorted(str(path) for path in wheels.glob("*.whl"))
    _run(
        [*pip, "install", "--no-index", "--no-deps", "--only-binary=:all:", *PLATFORM_ARGS]
        + ["--target", str(site), *files],
        "pip install of the aarch64 wheels",
    )
    return [Path(path).name for path in files]


def _precompile(directory: Path, strip: Path, prepend: str) -> None:
    """Compile .pyc files with the host's Python 3.11 (same bytecode as the board's): emulated
    `import tvm` drops from about 16 s to 6 s. Recorded paths are the ones the board sees."""
    if sys.version_info[:2] != (3, 11):
        logger.warning("host Python is not 3.11: the board will compile its own .pyc files")
        return
    cmd = [sys.executable, "-m", "compileall", "-q", "-j", "0", "-s", str(strip)]
    done = subprocess.run(
        [*cmd, "-p", prepend, str(directory)], capture_output=True, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:  # a stray file that does not compile; the rest did
        logger.info("compileall reported errors in %s (ignored)", directory)


def _write_wrapper(board: BoardFiles, final: BoardFiles, qemu: str) -> None:
    """The board's `python3`: qemu runs the arm64 interpreter with argv[0] set to this script,
    so that `sys.executable` (which TVM's popen workers re-run) is the wrapper again."""
    board.python.parent.mkdir(parents=True)
    q = shlex.quote
    interpreter = final.sysroot / "usr" / "bin" / "python3.11"
    board.python.write_text(
        "#!/bin/sh\n"
        "# Python of the emulated aarch64 board, written by hw_profiles.emulate.\n"
        f"export PYTHONPATH={q(str(final.site_packages))}\n"
        "export PYTHONNOUSERSITE=1\n"
        # qemu's default CPU runs SVE silently: default to a Raspberry Pi 4's core.
        'export QEMU_CPU="${QEMU_CPU:-cortex-a72}"\n'
        f"exec {q(qemu)} -L {q(str(final.sysroot))} -0 {q(str(final.python))} "
        # -S: no site module, so neither the host's dist-packages nor its sitecustomize leak in.
        f'{q(str(interpreter))} -S "$@"\n'
    )
    board.python.chmod(0o755)


def _host_versions() -> tuple[str, str]:
    try:
        return (
            importlib.metadata.version("apache-tvm"),
            importlib.metadata.version("apache-tvm-ffi"),
        )
    except importlib.metadata.PackageNotFoundError as err:
        raise DeviceError(f"{err.name} is not installed on this host: pip install it") from None


def prepare_board(cache_dir: str | Path | None = None) -> BoardFiles:
    """Build the emulated aarch64 board once per host TVM version and return its files; later
    calls return the cached board. A half-finished build is never used: each build happens in a
    temporary directory that is renamed into place at the end."""
    qemu = _require_tool(QEMU, "qemu-user-static")
    tvm_version, ffi_version = _host_versions()
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    final = _board_files(cache / f"tvm-{tvm_version}-ffi-{ffi_version}", tvm_version)
    if (final.root / "board.json").is_file():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others wait, then reuse
        if (final.root / "board.json").is_file():
            return final
        for stale in cache.glob(".build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.root.exists():  # a board directory without its manifest is not trusted
            shutil.rmtree(final.root)
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        try:
            board = _board_files(work / "board", tvm_version)
            board.root.mkdir()
            logger.info("building the emulated aarch64 board in %s (once)", final.root)
            debs = _fetch_sysroot(work, board.sysroot)
            wheels = _install_wheels(work, board.site_packages, tvm_version, ffi_version)
            stdlib = board.sysroot / "usr" / "lib" / "python3.11"
            _precompile(stdlib, board.sysroot, "/")
            _precompile(board.site_packages, board.site_packages, str(final.site_packages))
            _write_wrapper(board, final, qemu)
            manifest = {
                "arch": "aarch64",
                "tvm": tvm_version,
                "tvm_ffi": ffi_version,
                "apt_packages": list(APT_PACKAGES),
                "debs": debs,
                "wheels": wheels,
                "build_seconds": round(time.monotonic() - started, 1),
            }
            (board.root / "board.json").write_text(json.dumps(manifest, indent=2) + "\n")
            board.root.rename(final.root)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    logger.info("emulated aarch64 board ready in %.0f s", time.monotonic() - started)
    return final


# ---------------------------------------------------------------------------------------------
# Serving


def qemu_cpus() -> list[str]:
    """CPU models that qemu-aarch64 can emulate (for `--cpu`)."""
    qemu = _require_tool(QEMU, "qemu-user-static")
    done = subprocess.run([qemu, "-cpu", "help"], capture_output=True, text=True)
    return [line.split()[0] for line in done.stdout.splitlines()[1:] if line.strip()]


def _board_env(cpu: str) -> dict[str, str]:
    """The board server's environment: this one without the host Python's PYTHON* settings (the
    board's wrapper sets its own), and qemu told which CPU to emulate."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["QEMU_CPU"] = cpu
    return env


@contextlib.contextmanager
def _board_server(
    tracker: Tracker,
    key: str,
    cpu: str,
    board: BoardFiles,
    host: str,
    start_timeout_s: float,
) -> Iterator[tuple[LocalServer, subprocess.Popen[bytes], IO[bytes]]]:
    cpus = qemu_cpus()
    if cpu not in cpus:
        raise DeviceError(f"unknown CPU '{cpu}' for qemu-aarch64: choose one of {', '.join(cpus)}")
    label = f"the emulated {cpu} board's RPC server"
    with _server_process(
        tracker, key, host, start_timeout_s, str(board.python), _board_env(cpu), label
    ) as running:
        yield running


@contextlib.contextmanager
def emulated_server(
    tracker: Tracker,
    key: str,
    cpu: str = "cortex-a72",
    *,
    board: BoardFiles | None = None,
    host: str = "127.0.0.1",
    start_timeout_s: float = 180.0,
) -> Iterator[LocalServer]:
    """Run TVM's stock `tvm.exec.rpc_server` on the emulated board (preparing it if needed),
    with qemu emulating `cpu` so that no instruction the board lacks runs; returns once the
    tracker lists one more free server under `key`, and stops the server on exit."""
    board = board or prepare_board()
    with _board_server(tracker, key, cpu, board, host, start_timeout_s) as (server, _, _):
        yield server


def serve_emulated(
    tracker: Tracker | str,
    key: str = "arm64-qemu",
    *,
    arch: str = "aarch64",
    cpu: str = "cortex-a72",
    cache_dir: str | Path | None = None,
) -> None:
    """`hwnas devices emulate`: prepare the board and serve it under `key` in the foreground
    until Ctrl-C (or SIGTERM); raise DeviceError if the server dies."""
    if arch != "aarch64":
        raise DeviceError(f"cannot emulate --arch {arch}: only aarch64 is supported")
    if isinstance(tracker, str):
        tracker = parse_tracker(tracker)
    tracker_summary(tracker)  # fail fast, before a first build, if no tracker answers
    board = prepare_board(cache_dir)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    with _board_server(tracker, key, cpu, board, "127.0.0.1", 180.0) as (server, proc, log):
        print(
            f"emulated aarch64 board ({cpu}) serving key '{key}' via {tracker}; Ctrl-C stops it",
            flush=True,
        )
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            return
        raise DeviceError(
            f"the emulated board's RPC server exited with code {code}: {_log_tail(log)}"
        )
