"""Nothing lost, nothing leaked, nothing left running: kills, hangs, disk full, locks, torn lines, secrets."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import FAKE_CMD, FAKE_MODEL_CONFIG, fake_env, launched_by_this_run
from vllm_lab import batch, cli, record
from vllm_lab.probe import run_trial
from vllm_lab.spec import Trial

pytestmark = pytest.mark.faults

KV = 10 * 2**20
VLLM_LAB = Path(sys.executable).with_name("vllm-lab")


def write_plan(tmp: Path, model: Path, env: dict | None = None, extra_args: list | None = None) -> Path:
    plan = {
        "name": "faults", "model": str(model), "vllm_cmd": FAKE_CMD,
        "defaults": {"env": {"FAKE_VLLM_START_DELAY": "1.0", **(env or {})}, "extra_args": extra_args or [],
                     "startup_timeout_s": 30, "request_timeout_s": 10},
        "steps": [{"name": "04_hypotheses", "notebook": "04_hypotheses",
                   "parameters": {"LAUNCHERS": ["legacy", "head"], "MAX_MODEL_LENS": [16384, 22256],
                                  "KV_BUDGETS_BYTES": [KV, 2 * KV]}}],
    }  # fmt: skip
    path = tmp / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


@pytest.fixture
def model(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(FAKE_MODEL_CONFIG))
    return d


@pytest.fixture(autouse=True)
def own_lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_LAB_LOCK_DIR", str(tmp_path))


def wait_for_records(run_dir: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / record.TRIALS_FILE).exists() and len(
            record.read_records(run_dir, keep_torn_aside=False).rows
        ) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} records after {timeout} s")


def wait_until_no_servers(timeout: float = 30) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = launched_by_this_run()
        if not left:
            return []
        time.sleep(0.3)
    return launched_by_this_run()


def start_batch(plan: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([str(VLLM_LAB), "run", str(plan), "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def the_run_dir(out: Path) -> Path:
    for _ in range(100):
        dirs = [d for d in out.iterdir() if d.is_dir()] if out.exists() else []
        if dirs:
            return dirs[0]
        time.sleep(0.1)
    raise AssertionError("no run folder")


def kernel_of(batch_pid: int) -> psutil.Process:
    for c in psutil.Process(batch_pid).children(recursive=True):
        if "ipykernel" in " ".join(c.cmdline()):
            return c
    raise AssertionError("no kernel")


@pytest.mark.parametrize("victim", ["batch", "kernel"])
def test_kill_9_mid_run_loses_nothing_leaves_nothing_and_resume_completes(tmp_path, model, victim):
    plan = write_plan(tmp_path, model)
    out = tmp_path / "out"
    proc = start_batch(plan, out)
    run_dir = the_run_dir(out)
    wait_for_records(run_dir, 2)
    before = record.read_records(run_dir).rows
    target = proc.pid if victim == "batch" else kernel_of(proc.pid).pid
    os.kill(target, signal.SIGKILL)
    if victim == "kernel":
        assert proc.wait(timeout=120) == 1  # the batch reports the dead kernel's notebook and ends
    else:
        proc.wait(timeout=10)
    assert wait_until_no_servers() == [], "a server outlived the process that launched it"
    kept = record.read_records(run_dir).rows
    assert kept[: len(before)] == before  # every trial recorded before the kill is intact
    r = subprocess.run([str(VLLM_LAB), "run", str(plan), "--resume", str(run_dir)], capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = record.read_records(run_dir).rows
    assert len({x["trial_id"] for x in rows}) == 8 and len(rows) == 8  # completed, nothing recorded twice
    assert (run_dir / "report.md").exists()


def test_kill_9_of_the_api_server_leaves_no_engine_core(run_dir, fake_model):
    from vllm_lab.launcher import VllmServer

    s = VllmServer(Trial(model=str(fake_model), vllm_cmd=FAKE_CMD, max_model_len=1024, kv_cache_memory_bytes=KV,
                         env=fake_env(scenario="stubborn_child")), run_dir)  # fmt: skip
    assert s.start().outcome == "ready"
    engine = psutil.Process(s.proc.pid).children()[0]
    os.kill(s.proc.pid, signal.SIGKILL)
    s.proc.wait(timeout=5)
    assert engine.is_running()  # orphaned, ignoring SIGTERM: exactly the upstream survivor case
    assert s.stop() == []
    assert not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE


def test_server_that_dies_mid_request_is_unstable_not_ready(run_dir, fake_model):
    rec = run_trial(Trial(model=str(fake_model), vllm_cmd=FAKE_CMD, max_model_len=1024, kv_cache_memory_bytes=KV,
                          env=fake_env(scenario="die_mid_request")), run_dir)  # fmt: skip
    assert rec["outcome"] == "unstable"
    assert rec["chat_ok"] is False and rec["long_request_ok"] is False
    assert record.read_records(run_dir).rows[-1]["outcome"] == "unstable"


def test_request_that_never_finishes_hits_the_deadline(run_dir, fake_model):
    rec = run_trial(Trial(model=str(fake_model), vllm_cmd=FAKE_CMD, max_model_len=2048, kv_cache_memory_bytes=KV,
                          request_timeout_s=3, env=fake_env(unstable_above=1000)), run_dir)  # fmt: skip
    assert rec["outcome"] == "unstable" and "did not complete" in rec["evidence"]


def test_hang_before_ready_is_a_timeout_record(run_dir, fake_model):
    rec = run_trial(Trial(model=str(fake_model), vllm_cmd=FAKE_CMD, max_model_len=1024, kv_cache_memory_bytes=KV,
                          startup_timeout_s=3, env=fake_env(scenario="hang")), run_dir)  # fmt: skip
    assert rec["outcome"] == "timeout"


def test_disk_full_loses_no_earlier_record_and_says_so(run_dir, monkeypatch):
    record.append_record(run_dir, record.new_record(trial_id="a", outcome="ready"))
    before = (run_dir / record.TRIALS_FILE).read_bytes()
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space left"):
        record.append_record(run_dir, record.new_record(trial_id="b", outcome="failed"))
    monkeypatch.setattr(os, "write", real_write)
    assert (run_dir / record.TRIALS_FILE).read_bytes() == before
    record.append_record(
        run_dir, record.new_record(trial_id="b", outcome="failed")
    )  # space is back: resume works
    assert [r["trial_id"] for r in record.read_records(run_dir).rows] == ["a", "b"]


def test_short_write_of_a_full_disk_leaves_a_torn_line_that_is_kept_aside(run_dir):
    record.append_record(run_dir, record.new_record(trial_id="a", outcome="ready"))
    with open(run_dir / record.TRIALS_FILE, "a") as f:
        f.write('{"trial_id": "b", "outc')  # the crash mid-write
    got = record.read_records(run_dir)
    assert [r["trial_id"] for r in got.rows] == ["a"]
    assert got.torn == ['{"trial_id": "b", "outc']
    assert (run_dir / (record.TRIALS_FILE + ".torn")).read_text().strip() == '{"trial_id": "b", "outc'
    record.append_record(run_dir, record.new_record(trial_id="b", outcome="failed"))
    assert [r["trial_id"] for r in record.read_records(run_dir).rows] == ["a", "b"]


def test_second_batch_on_the_same_machine_refuses_with_one_line(tmp_path, model, capsys):
    plan = write_plan(tmp_path, model)
    with batch.DeviceLock(wait=False):
        code = cli.main(["run", str(plan), "--out", str(tmp_path / "out2")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "another vllm-lab batch is running" in err
    assert not (tmp_path / "out2").exists()


def test_port_taken_by_another_program_is_refused(run_dir, fake_model):
    import socket

    from vllm_lab.launcher import LaunchRefused

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(LaunchRefused, match="in use"):
            run_trial(Trial(model=str(fake_model), vllm_cmd=FAKE_CMD, port=s.getsockname()[1], max_model_len=1024,
                            kv_cache_memory_bytes=KV), run_dir)  # fmt: skip
    assert not (run_dir / record.TRIALS_FILE).exists()


SECRETS = {
    "hf": "hf_" + "Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe",
    "api_key": "sk-" + "proj-AbCdEfGhIjKlMnOpQrStUvWx123456",
    "bearer": "eyJhbGciOiJIUzI1NiJ9" + ".c2VjcmV0cGF5bG9hZA.sig0123456789",
}


def test_planted_secrets_reach_no_output_file(tmp_path, model):
    env = {"HF_TOKEN": SECRETS["hf"], "HUGGING_FACE_HUB_TOKEN": SECRETS["hf"],
           "OPENAI_API_KEY": SECRETS["api_key"], "EXTRA_HEADER": f"Authorization: Bearer {SECRETS['bearer']}"}  # fmt: skip
    plan = write_plan(tmp_path, model, env=env, extra_args=["--api-key", SECRETS["api_key"]])
    summary = batch.run_plan(str(plan), out=str(tmp_path / "out"))
    files = [p for p in summary.run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ipynb" for p in files) and any(p.suffix == ".log" for p in files)
    assert (summary.run_dir / "report.html").exists() and (summary.run_dir / "report.md").exists()
    for p in files:
        data = p.read_bytes()
        for name, secret in SECRETS.items():
            assert secret.encode() not in data, f"{name} secret leaked into {p.relative_to(summary.run_dir)}"
    rows = record.read_records(summary.run_dir).rows
    assert all("--api-key" in r["argv"] for r in rows)  # the flag is recorded, its value is not
    assert all("127.0.0.1" in r["argv"] for r in rows)  # servers bind loopback unless the plan says otherwise
