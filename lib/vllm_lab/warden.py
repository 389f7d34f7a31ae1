"""A server's warden: ends the server's whole session when the process that launched it dies.

PR_SET_PDEATHSIG reaches only the server itself, with one SIGTERM: vLLM can ignore it mid-start, and the
children of a server that dies (EngineCore, workers, a fake's engine) are re-parented to init and keep running.
A Ray worker that exits also SIGKILLs its direct children (RAY_kill_child_processes_on_worker_exit, on by
default), the server among them, which leaves the server's own children behind: that is what a killed driver
left in the two-node test (issue 22, point 16).

So the launcher starts one warden per server: a daemon (double fork, so no parent kills it as its child), in a
session of its own, reading a pipe whose write end only the launcher holds. The launcher writes `released` once
it has stopped the server itself; an end of the pipe without it means the launcher died, and the warden stops
the server's session (terminate, a grace period, kill). While it waits it uses no CPU.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
from dataclasses import dataclass
from typing import IO

import psutil

RELEASED = b"released"
CHECK_S = 2.0  # while the launcher lives: how often to see whether the session was ended by someone else


@dataclass
class Warden:
    pid: int  # the daemon's, found by pid (it is nobody's child)
    pipe: IO[bytes]  # the write end: closed by the launcher's exit, whatever ends it

    def alive(self) -> bool:
        try:
            return psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


def start(server_pid: int, grace_s: float) -> Warden:
    """The warden of the server whose session is `server_pid` (every server leads its own session)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm_lab.warden", str(server_pid), str(grace_s)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    pid = int(proc.stdout.readline())  # the daemon says its pid, then the intermediate exits
    proc.stdout.close()
    proc.wait()
    return Warden(pid=pid, pipe=proc.stdin)


def release(warden: Warden | None) -> None:
    """The launcher stopped its server: the warden exits without touching anything."""
    if warden is None:
        return
    with contextlib.suppress(OSError, ValueError):
        warden.pipe.write(RELEASED)
        warden.pipe.close()
    with contextlib.suppress(psutil.Error):
        psutil.Process(warden.pid).wait(timeout=5)


def main(argv: list[str]) -> int:
    server_pid, grace_s = int(argv[0]), float(argv[1])
    if os.fork() > 0:
        os._exit(0)  # the intermediate: its child is re-parented away from the launcher
    print(os.getpid(), flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the launcher stops reading after the pid line
    said = b""
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], CHECK_S)
        if ready:
            chunk = os.read(sys.stdin.fileno(), 64)
            said += chunk
            if said.startswith(RELEASED):
                return 0
            if not chunk:
                break  # the launcher died without releasing: stop what it left
        elif not _session_alive(server_pid):
            return 0  # ended by someone else (`vllm-lab reap`, a stop of the session): nothing left to guard
    from vllm_lab.proctree import stop_tree  # only now: the warden waits with little loaded

    stop_tree(server_pid, grace_s=grace_s)
    return 0


def _session_alive(sid: int) -> bool:
    """Anything left of the server's session (the leader gone, its children re-parented, count too)."""
    if psutil.pid_exists(sid):
        return True
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
