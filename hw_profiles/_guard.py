"""Runs a module (TVM's rpc_tracker or rpc_server) in a process group that dies with the process
that started it: `python -m hw_profiles._guard PARENT_PID MODULE ARGS...`.

A search killed with SIGKILL cannot stop what it started; this watcher does it for it, taking
the server's session workers along (they share the group, which the caller makes new)."""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time


def _watch(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os.killpg(0, signal.SIGKILL)
        time.sleep(0.5)


def main() -> None:
    parent, module, *args = sys.argv[1:]
    threading.Thread(target=_watch, args=(int(parent),), daemon=True).start()
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
