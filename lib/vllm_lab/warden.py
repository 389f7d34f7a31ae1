"""A server's warden: ends the server's whole session when the process that launched it dies.

PR_SET_PDEATHSIG reaches only the server itself, with one SIGTERM: vLLM can ignore it mid-start, and the
children of a server that dies on it (EngineCore, workers, a fake's engine) are re-parented to init and
keep running. That is what a killed Ray worker, kernel or batch left behind (issue 22, point 16).

So the launcher starts one warden per server, in a session of its own (a kill of the launcher's process
group does not reach it), reading a pipe whose write end only the launcher holds. The launcher writes
`released` once it has stopped the server itself; an end of the pipe without it means the launcher died,
and the warden stops the server's session: terminate, a grace period, kill. While it waits it uses no CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

RELEASED = b"released"


def start(server_pid: int, grace_s: float, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The warden of the server whose session is `server_pid` (every server leads its own session)."""
    return subprocess.Popen(
        [sys.executable, "-m", "vllm_lab.warden", str(server_pid), str(grace_s)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env,
    )


def release(warden: subprocess.Popen | None) -> None:
    """The launcher stopped its server: the warden exits without touching anything."""
    if warden is None or warden.stdin is None:
        return
    try:
        warden.stdin.write(RELEASED)
        warden.stdin.close()
    except (BrokenPipeError, OSError, ValueError):
        pass
    try:
        warden.wait(timeout=5)
    except subprocess.TimeoutExpired:
        warden.kill()
        warden.wait()


def main(argv: list[str]) -> int:
    server_pid, grace_s = int(argv[0]), float(argv[1])
    said = sys.stdin.buffer.read()  # blocks until the launcher writes and closes, or dies
    if said.startswith(RELEASED):
        return 0
    from vllm_lab.proctree import stop_tree  # only now: the warden waits with nothing loaded

    stop_tree(server_pid, grace_s=grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
