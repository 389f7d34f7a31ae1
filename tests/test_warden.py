"""A launcher killed with SIGKILL (a Ray worker, a kernel, a batch) leaves no server process behind.

PR_SET_PDEATHSIG alone sends the server one SIGTERM: a server that dies of it mid-start leaves its engine child
running, and one that ignores it (vLLM mid-start) stays. The warden stops the whole session.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest
from conftest import FAKE_CMD, fake_env, processes_in_session, wait_until
from test_ray import fake_servers

pytestmark = pytest.mark.fake

LAUNCHER = textwrap.dedent(
    """
    import os, signal, sys, threading, time
    import psutil
    from vllm_lab.launcher import VllmServer
    from vllm_lab.spec import Trial

    trial = Trial(model=sys.argv[1], vllm_cmd=sys.argv[2], max_model_len=1024, kv_cache_memory_bytes=8 << 20,
                  startup_timeout_s=60)
    srv = VllmServer(trial, sys.argv[3])

    def ray_like_exit(*_):  # a Ray worker's exit: SIGKILL to every direct child, then gone
        for child in psutil.Process().children():
            child.kill()
        os._exit(0)

    signal.signal(signal.SIGUSR1, ray_like_exit)
    threading.Thread(target=srv.start, daemon=True).start()
    while srv.proc is None:
        time.sleep(0.05)
    print(srv.proc.pid, flush=True)
    time.sleep(600)
    """
)


def _launch(tmp_path, fake_model, knobs: dict) -> tuple[subprocess.Popen, int]:
    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(fake_model), FAKE_CMD, str(run)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, **fake_env(**knobs)},
    )  # fmt: skip
    return proc, int(proc.stdout.readline())


@pytest.mark.parametrize(
    ("knobs", "how"),
    [
        ({"start_delay": 30}, signal.SIGKILL),  # killed mid-start
        ({"start_delay": 0.2}, signal.SIGKILL),  # killed after ready
        ({"start_delay": 30, "scenario": "stubborn_child"}, signal.SIGKILL),  # an engine that ignores SIGTERM
        ({"start_delay": 30}, signal.SIGUSR1),  # a Ray worker's exit: its direct children SIGKILLed first
    ],
    ids=["mid-start", "ready", "stubborn-engine", "ray-worker-exit"],
)
def test_a_killed_launcher_leaves_no_server_behind(tmp_path, fake_model, knobs, how):
    launcher, server_pid = _launch(tmp_path, fake_model, knobs)
    try:
        # the engine child is up (the fake spawns it before its start delay)
        assert wait_until(lambda: len(processes_in_session(server_pid)) >= 2, timeout=30)
        if knobs["start_delay"] < 1:
            assert wait_until(lambda: (tmp_path / "run" / "logs").is_dir(), timeout=30)
    finally:
        launcher.send_signal(how)
        launcher.wait()
    # the warden's grace (8 s) and then its kill: the whole session goes, engine child included
    assert wait_until(lambda: not processes_in_session(server_pid), timeout=40), processes_in_session(
        server_pid
    )
    assert not fake_servers(str(fake_model))
    assert wait_until(lambda: not _wardens_of(server_pid), timeout=20), (
        "the warden did not end after its work"
    )


def _wardens_of(server_pid: int) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        if p.info["cmdline"] and p.info["cmdline"][-3:-1] == ["vllm_lab.warden", str(server_pid)]:
            out.append(p.pid)
    return out


def test_a_server_stopped_by_its_launcher_releases_the_warden(tmp_path, fake_model):
    from conftest import fake_trial
    from vllm_lab.launcher import VllmServer

    with VllmServer(fake_trial(fake_model), tmp_path) as srv:
        assert srv.start().outcome == "ready"
        warden = srv._warden
        assert warden.alive()  # waiting while the server runs
        assert warden.pid not in {c.pid for c in psutil.Process().children(recursive=True)}  # nobody's child
    assert not warden.alive()  # released: it exited at once, and touched nothing


def test_a_warden_whose_server_was_reaped_by_someone_else_ends(tmp_path, fake_model):
    """`vllm-lab reap` (or any stop of the session) while the launcher still lives: the warden goes too."""
    from conftest import fake_trial
    from vllm_lab.launcher import VllmServer
    from vllm_lab.proctree import stop_tree

    srv = VllmServer(fake_trial(fake_model), tmp_path)
    try:
        assert srv.start().outcome == "ready"
        stop_tree(srv.proc.pid, grace_s=2)
        assert wait_until(lambda: not srv._warden.alive(), timeout=15)
    finally:
        srv.stop()
