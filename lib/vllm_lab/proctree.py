"""Stopping a server's whole process tree: the process, its descendants and its session.

Below launcher and warden (both stop trees), so the warden needs nothing of the launcher.
"""

from __future__ import annotations

import contextlib
import os

import psutil

STOP_GRACE_S = 8.0


def _session_members(sid: int) -> list[psutil.Process]:
    """Every process in session `sid`: children that were re-parented to init are found this way too."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(p.pid) == sid:
                found.append(p)
    return found


def stop_tree(pid: int, grace_s: float = STOP_GRACE_S) -> list[int]:
    """Terminate, wait, kill: the process, its descendants and its whole session. Returns survivor pids.

    Every server is started as the leader of its own session (sid == pid), so the session is swept even
    when the leader is already gone and its children were re-parented to init.
    """
    procs: dict[int, psutil.Process] = {p.pid: p for p in _session_members(pid)}
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        procs[root.pid] = root
        procs.update({c.pid: c for c in root.children(recursive=True)})
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _gone, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    _gone, alive = psutil.wait_procs(alive, timeout=5)
    late = [p for p in _session_members(pid) if p.pid not in procs]  # anything spawned during the kill
    for p in late:
        with contextlib.suppress(psutil.Error):
            p.kill()
    alive += psutil.wait_procs(late, timeout=5)[1]
    return [p.pid for p in alive if _really_alive(p)]


def _really_alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
