"""Runs a module (TVM's rpc_tracker or rpc_server) in a process group that dies with the process
that started it: `python -m hw_profiles._guard PARENT_PID MODULE ARGS...`; or runs a program
(another Python, e.g. an emulated board's) as its child in that group:
`python -I .../_guard.py PARENT_PID --exec PROGRAM ARGS...`, exiting as the program does.

A search killed with SIGKILL cannot stop what it started; this watcher does it for it, taking
the server's session workers along (they share the group, which the caller makes new)."""

from __future__ import annotations

import contextlib
import os
import runpy
import signal
import subprocess
import sys
import threading
import time


def _watch(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os.killpg(0, signal.SIGKILL)
        time.sleep(0.5)


def _run_program(argv: list[str]) -> None:
    code = subprocess.call(argv)
    if code < 0:  # killed by a signal: die of the same one, so that our parent sees it
        with contextlib.suppress(OSError, ValueError):  # SIGKILL's action cannot be set
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code
    sys.exit(code)


def main() -> None:
    parent, module, *args = sys.argv[1:]
    threading.Thread(target=_watch, args=(int(parent),), daemon=True).start()
    if module == "--exec":
        _run_program(args)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
