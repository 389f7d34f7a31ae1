"""SIGTERM and SIGHUP end a command the way Ctrl-C does: its cleanup runs, then it exits 128 + the signal.

`timeout`, `kill`, systemd and a cancelled CI job send SIGTERM; a closed terminal sends SIGHUP. Python's
default for both ends the process at once, without its `finally` blocks, and a server it launched is left
to PR_SET_PDEATHSIG's SIGTERM, which vLLM can ignore mid-start. Here the first such signal raises
KeyboardInterrupt in the main thread, so every path that stops a server tree on Ctrl-C stops it now too;
a second signal during that cleanup is ignored (the cleanup is what ends the servers).
"""

from __future__ import annotations

import signal
import threading

HANDLED = (signal.SIGTERM, signal.SIGHUP)
_received: int | None = None


class Terminated(KeyboardInterrupt):
    """Raised by the handler: a KeyboardInterrupt, so every Ctrl-C path applies; it names the signal."""


def install() -> dict:
    """Handle SIGTERM and SIGHUP here (main thread only); returns the handlers they replace, for restore()."""
    global _received
    _received = None
    if threading.current_thread() is not threading.main_thread():
        return {}  # only the main thread may set handlers; a caller in a thread keeps Python's defaults
    return {sig: signal.signal(sig, _handler) for sig in HANDLED}


def restore(previous: dict) -> None:
    """Put back what install() replaced (cli.main called in-process, as the tests do, leaves no trace)."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _handler(signum, frame) -> None:
    global _received
    if _received is not None:
        return  # the cleanup of the first one is under way: let it finish
    _received = signum
    _snapshot()
    raise Terminated(signal.Signals(signum).name)


_below_at_signal: list = []  # psutil.Process objects (pid + start time: a reused pid is never taken for them)


def _snapshot() -> None:
    """The processes below this one when the signal came: papermill may end a kernel on the way out, and the
    servers it started are then re-parented to init, out of reach of children()."""
    global _below_at_signal
    try:
        import psutil

        _below_at_signal = psutil.Process().children(recursive=True)
    except Exception:  # a signal handler must not fail
        _below_at_signal = []


def received() -> int | None:
    """The signal that ended the command, or None (a Ctrl-C, or nothing)."""
    return _received


def exit_code() -> int:
    """128 + the signal: 143 for SIGTERM, 129 for SIGHUP, 130 for Ctrl-C (SIGINT)."""
    return 128 + (_received or signal.SIGINT)


def describe() -> str:
    return f"terminated ({signal.Signals(_received).name})" if _received else "interrupted"


def end_children() -> list[int]:
    """After an interrupt: end every process this command still has below it (grace, then kill).

    The trial paths stop their own servers on the way out; what is left here is what runs in other processes:
    `vllm-lab run`'s notebook kernels and the servers they started (each kernel leads its own session, as
    every server does). Returns the pids that survived even the kill.
    """
    import os

    import psutil

    from vllm_lab.launcher import stop_tree

    try:
        below = {*_below_at_signal, *psutil.Process().children(recursive=True)}
    except psutil.Error:
        below = set(_below_at_signal)
    # By session: a server that died of the signal leaves its engine in the session it led (sid == its pid),
    # and stop_tree sweeps a session even when its leader is gone. Processes in our own session go one by one.
    mine, targets = os.getsid(0), set()
    for p in below:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                sid = os.getsid(p.pid)
                targets.add(sid if sid != mine else p.pid)
        except (psutil.Error, OSError):
            pass
    survivors: list[int] = []
    for pid in sorted(targets):
        survivors += stop_tree(pid)
    return survivors
