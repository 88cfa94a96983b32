"""`hwnas devices tracker|serve|list|check` and `hwnas profiles`, run as a user runs them."""

from __future__ import annotations

import signal
import subprocess
import sys

from helpers import free_port, hwnas, stop, wait_for

from hw_profiles.rpc import Tracker, tool_env, tracker_summary


def start(*args: str) -> subprocess.Popen:
    """`hwnas ARGS...` in its own process group, as a shell runs a foreground job."""
    return subprocess.Popen(
        [sys.executable, "-m", "nas.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_tracker_serve_list_and_check() -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    tracker = start("devices", "tracker", "--port", str(port))
    server = None
    try:
        wait_for(lambda: tracker_summary(Tracker("127.0.0.1", port), 1.0) is not None, "tracker")
        empty = hwnas("devices", "list", "--tracker", address)
        assert empty.returncode == 0 and "no RPC servers" in empty.stdout

        server = start("devices", "serve", "--key", "x86-local", "--tracker", address)
        wait_for(
            lambda: tracker_summary(Tracker("127.0.0.1", port)).get("x86-local"), "the server"
        )
        listed = hwnas("devices", "list", "--tracker", address)
        assert listed.returncode == 0, listed.stderr
        row = next(line for line in listed.stdout.splitlines() if line.startswith("x86-local"))
        assert row.split()[1] == "1"  # one free server
        assert "x86/local" in row  # the profile that uses the key

        checked = hwnas("devices", "check", "x86-local", "--tracker", address)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout.startswith("ok ") and "GFLOP/s" in checked.stdout
    finally:
        # Ctrl-C reaches the whole job: hwnas and the TVM program it runs; then SIGKILL what
        # TVM forked and left behind.
        stop(server, tracker, sig=signal.SIGINT, timeout=15)


def test_device_commands_with_bad_input_are_one_line_errors() -> None:
    # Reporting bad input needs no torch (importing it, and TVM with it, took 3.5 s): here
    # `import torch` fails, as on the RPC tools' path, so importing it on the way shows.
    no_torch = tool_env()
    for args, word in [
        (["devices", "list", "--tracker", "127.0.0.1:1"], "127.0.0.1:1"),
        (["devices", "list", "--tracker", "nohost"], "nohost"),
        (["devices", "check", "no/such-board"], "no/such-board"),
        (["devices", "serve", "--tracker", "127.0.0.1:1"], "--key"),
        (["profiles", "show", "nope"], "nope"),
    ]:
        done = hwnas(*args, env=no_torch)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and word in lines[0], (args, done.stderr)


def test_profiles_list_and_show() -> None:
    listed = hwnas("profiles", "list")
    assert listed.returncode == 0
    names = {line.split()[0] for line in listed.stdout.splitlines()[1:]}
    assert {"x86/local", "arm/rpi4", "arm/qemu-aarch64", "cuda/h100"} <= names
    shown = hwnas("profiles", "show", "rpi4")
    assert shown.returncode == 0 and "cortex-a72" in shown.stdout
