"""TVM RPC plumbing: the tracker address, short-timeout queries of a tracker, sessions, and
local tracker / server subprocesses (TVM's own `tvm.exec.rpc_tracker` and `rpc_server`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from hw_profiles import _guard

__all__ = [
    "DeviceError",
    "LocalServer",
    "ServerGone",
    "Tracker",
    "check_tracker",
    "local_server",
    "local_tracker",
    "parse_tracker",
    "request_session",
    "tracker_summary",
]

logger = logging.getLogger(__name__)

_UNREACHABLE = (
    "cannot reach the RPC tracker at {tracker}: start one with `hwnas devices tracker` "
    "or pass --tracker"
)


class DeviceError(RuntimeError):
    """A tracker or device that cannot be reached or used; the message is one line."""


class ServerGone(DeviceError):
    """The server the tracker matched to a request took no session: it stopped after it
    registered. The tracker has dropped it, so another request may find another server."""


@dataclass(frozen=True)
class Tracker:
    """Address of a TVM RPC tracker."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connect_host(self) -> str:
        """The address to dial: a tracker bound to every interface is reached on loopback."""
        return "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host


@dataclass(frozen=True)
class LocalServer:
    """An RPC server subprocess registered with a tracker under `key`."""

    key: str
    tracker: Tracker
    pid: int


def parse_tracker(text: str) -> Tracker:
    """Parse `HOST:PORT` (IPv6 as `[::1]:PORT`) into a Tracker."""
    host, sep, port_text = str(text).strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise DeviceError(f"bad tracker address '{text}': expected HOST:PORT, e.g. 127.0.0.1:9190")
    return Tracker(host, int(port_text))


# ---------------------------------------------------------------------------------------------
# Talking to a tracker (TVM's protocol, but with our own socket timeouts: TVM's client retries
# a refused connection for 60 s and waits for a device forever)


def _tracker_socket(tracker: Tracker, timeout_s: float) -> socket.socket:
    try:
        sock = socket.create_connection((tracker.connect_host, tracker.port), timeout=timeout_s)
    except OSError:
        raise DeviceError(_UNREACHABLE.format(tracker=tracker)) from None
    from tvm.rpc import base  # only now: importing tvm takes seconds

    try:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
    except (OSError, RuntimeError):
        sock.close()
        raise DeviceError(_UNREACHABLE.format(tracker=tracker)) from None
    if magic != base.RPC_TRACKER_MAGIC:
        sock.close()
        raise DeviceError(f"{tracker} answers, but is not a TVM RPC tracker")
    return sock


def _ask(sock: socket.socket, message: list[Any]) -> Any:
    """Send `message` to a tracker and return its answer (TVM's framing: a length, then JSON).
    The message goes out in one write, and the answer's first segment is acknowledged at once
    (TCP_QUICKACK, Linux): TVM writes a length and its body separately, so Nagle's algorithm on
    the sender held each body until a delayed acknowledgement, about 40 ms a direction."""
    from tvm.rpc import base

    data = json.dumps(message).encode("utf-8")
    sock.sendall(struct.pack("<i", len(data)) + data)
    if hasattr(socket, "TCP_QUICKACK"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    return base.recvjson(sock)


def _raw_summary(tracker: Tracker, timeout_s: float) -> dict[str, Any]:
    with contextlib.closing(_tracker_socket(tracker, timeout_s)) as sock:
        from tvm.rpc import base

        try:
            reply = _ask(sock, [base.TrackerCode.SUMMARY])
        except (OSError, RuntimeError):
            raise DeviceError(_UNREACHABLE.format(tracker=tracker)) from None
    if reply[0] != base.TrackerCode.SUCCESS:
        raise DeviceError(f"the RPC tracker at {tracker} refused a summary request: {reply!r}")
    return reply[1]


def tracker_summary(tracker: Tracker, timeout_s: float = 5.0) -> dict[str, dict[str, int]]:
    """Keys known to the tracker -> {"free": servers idle, "busy": servers in a session or
    coming back from one, "pending": requests waiting}; a key with none of these (its servers
    have gone) is left out."""
    raw = _raw_summary(tracker, timeout_s)
    connected = Counter(_server_key(info) for info in raw.get("server_info", []))
    queue = raw.get("queue_info", {})
    summary = {}
    for key in sorted(set(queue) | set(connected)):
        info = queue.get(key, {})
        free, pending = int(info.get("free", 0)), int(info.get("pending", 0))
        busy = max(0, connected[key] - free)
        if free or busy or pending:
            summary[key] = {"free": free, "busy": busy, "pending": pending}
    return summary


def _server_key(info: Mapping[str, Any]) -> str:
    return str(info.get("key", "")).removeprefix("server:")


def registered_keys(tracker: Tracker, timeout_s: float = 5.0) -> set[str]:
    """Keys of the servers connected to the tracker now, busy ones included."""
    return {_server_key(info) for info in _raw_summary(tracker, timeout_s).get("server_info", [])}


def check_tracker(tracker: Tracker, timeout_s: float = 3.0) -> None:
    """Raise DeviceError within about `timeout_s` unless a tracker answers at `tracker`."""
    _raw_summary(tracker, timeout_s)


def request_session(
    tracker: Tracker, key: str, timeout_s: float = 30.0, session_timeout_s: float = 0.0
) -> Any:
    """An RPC session on a server registered under `key`, waiting at most `timeout_s` for one
    to be free. `session_timeout_s` (0 = none) lets the server kill a session that runs long."""
    from tvm import rpc
    from tvm.rpc import base

    sock = _tracker_socket(tracker, min(timeout_s, 5.0))
    try:
        sock.settimeout(timeout_s)
        reply = _ask(sock, [base.TrackerCode.REQUEST, key, "", 1])
    except TimeoutError:
        if key in registered_keys(tracker):
            # TVM's server stops serving after a kernel crashes it, yet stays registered.
            raise DeviceError(
                f"the RPC server(s) registered under '{key}' at {tracker} took no session within "
                f"{timeout_s:g}s: busy with another client, or stopped serving after a crashing "
                "kernel (TVM's rpc_server then stays registered); restart the server"
            ) from None
        free = [k for k, v in tracker_summary(tracker).items() if v["free"] and k != key]
        raise DeviceError(
            f"no RPC server with key '{key}' became free at {tracker} within {timeout_s:g}s "
            f"(keys with a free server: {', '.join(free) or 'none'}); start one with "
            f"`python -m tvm.exec.rpc_server --tracker {tracker} --key {key}`"
        ) from None
    except (OSError, RuntimeError) as err:
        raise DeviceError(
            f"the RPC tracker at {tracker} dropped a request for '{key}': {err}"
        ) from None
    finally:
        sock.close()
    if reply[0] != base.TrackerCode.SUCCESS:
        raise DeviceError(f"the RPC tracker at {tracker} refused a request for '{key}': {reply}")
    url, port, match_key = reply[1]
    try:
        return rpc.connect(url, port, match_key, session_timeout=session_timeout_s)
    except Exception as err:  # TVM raises its own ffi errors for a refused session
        raise ServerGone(f"cannot open a session on '{key}' at {url}:{port}: {err}") from None


# ---------------------------------------------------------------------------------------------
# Local subprocesses


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# TVM's tracker and server need no torch, but tvm_ffi imports it whenever it can: 3 s of the 5 s
# that `import tvm` takes on a 2-core VM, paid twice by each tool (it imports TVM, then so does
# the popen worker it starts to do the work). On this path `import torch` fails as it would
# without torch, which tvm_ffi allows for.
_NO_TORCH = Path(__file__).with_name("_no_torch")


def tool_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) for running a TVM RPC tool under this interpreter:
    with `_NO_TORCH` first on PYTHONPATH."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_NO_TORCH), env.get("PYTHONPATH")]))
    return env


def _spawn(
    args: list[str],
    log: IO[bytes],
    python: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `python -m ARGS` (a TVM RPC tool) in its own process group, so that stopping it
    also stops the worker processes it forks; the group dies with this process
    (`hw_profiles._guard`). With `python` None the tool runs in the guard's own process, under
    this interpreter; else the guard runs `python` as its child. `env`: the environment (default:
    this process's)."""
    guard = [sys.executable, "-m", "hw_profiles._guard", str(os.getpid())]
    if python is None:
        env = tool_env(env)
    else:
        # -I: the guard needs only the standard library, and ignores `env`'s PYTHON* variables.
        guard = [sys.executable, "-I", _guard.__file__, str(os.getpid()), "--exec", python, "-m"]
    return subprocess.Popen(
        [*guard, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs. A zombie does not count: a worker that
    outlived the guard waits for init to reap it, which some VMs' init does only every 2 s."""
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):  # gone meanwhile
            continue
        if int(group) == pgid and state != "Z":
            return True
    return False


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left of it after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + grace_s
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is not None and not _group_alive(proc.pid):
            return


def _log_tail(log: IO[bytes], lines: int = 3) -> str:
    log.seek(0)
    text = log.read().decode(errors="replace").strip().splitlines()
    return " | ".join(text[-lines:]) or "no output"


@contextlib.contextmanager
def local_tracker(
    host: str = "127.0.0.1", port: int | None = None, start_timeout_s: float = 60.0
) -> Iterator[Tracker]:
    """Run `python -m tvm.exec.rpc_tracker` on `host:port` (a free port when None) until the
    block exits."""
    if host in ("0.0.0.0", "", "::"):
        logger.warning(
            "the RPC tracker on %s accepts anyone who can reach this machine: TVM RPC has no "
            "authentication, so use it only on a trusted network",
            host or "all interfaces",
        )
    port = port or _free_port("127.0.0.1" if host in ("", "0.0.0.0") else host)
    tracker = Tracker(host, port)
    args = ["tvm.exec.rpc_tracker", "--host", host, "--port", str(port)]
    args += ["--port-end", str(port + 1)]
    with tempfile.TemporaryFile() as log:
        proc = _spawn(args, log)
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                if proc.poll() is not None:
                    raise DeviceError(
                        f"the RPC tracker on {tracker} exited at start: {_log_tail(log)}"
                    )
                try:
                    check_tracker(tracker, timeout_s=2.0)
                    break
                except DeviceError:
                    if time.monotonic() > deadline:
                        raise DeviceError(
                            f"the RPC tracker on {tracker} did not answer within "
                            f"{start_timeout_s:g}s: {_log_tail(log)}"
                        ) from None
                    time.sleep(0.2)
            logger.info("RPC tracker listening on %s (pid %d)", tracker, proc.pid)
            yield tracker
        finally:
            _stop(proc)


@contextlib.contextmanager
def local_server(
    tracker: Tracker, key: str, host: str = "127.0.0.1", start_timeout_s: float = 60.0
) -> Iterator[LocalServer]:
    """Run `python -m tvm.exec.rpc_server --tracker HOST:PORT --key KEY` until the block exits;
    returns once the tracker lists one more free server under `key`."""
    with _server_process(tracker, key, host, start_timeout_s) as (server, _, _):
        yield server


@contextlib.contextmanager
def _server_process(
    tracker: Tracker,
    key: str,
    host: str,
    start_timeout_s: float,
    python: str | None = None,
    env: Mapping[str, str] | None = None,
    label: str = "the RPC server",
) -> Iterator[tuple[LocalServer, subprocess.Popen[bytes], IO[bytes]]]:
    """`local_server`, also yielding the guarded process and its log; `python` and `env` run the
    server under another Python, such as the emulated board's (`hw_profiles.emulate`), and
    `label` names it in errors."""
    check_tracker(tracker)
    before = tracker_summary(tracker).get(key, {}).get("free", 0)
    port = _free_port(host)
    args = ["tvm.exec.rpc_server", "--tracker", f"{tracker.connect_host}:{tracker.port}"]
    args += ["--key", key, "--host", host, "--port", str(port), "--port-end", str(port + 50)]
    with tempfile.TemporaryFile() as log:
        proc = _spawn(args, log, python, env)
        try:
            deadline = time.monotonic() + start_timeout_s
            while tracker_summary(tracker).get(key, {}).get("free", 0) <= before:
                if proc.poll() is not None:
                    raise DeviceError(f"{label} for '{key}' exited at start: {_log_tail(log)}")
                if time.monotonic() > deadline:
                    raise DeviceError(
                        f"{label} for '{key}' did not register with {tracker} within "
                        f"{start_timeout_s:g}s: {_log_tail(log)}"
                    )
                time.sleep(0.2)
            logger.info("%s '%s' registered with %s (pid %d)", label, key, tracker, proc.pid)
            yield LocalServer(key, tracker, proc.pid), proc, log
        finally:
            _stop(proc)
