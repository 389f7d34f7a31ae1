"""The launcher against the fake vLLM: every outcome, and no process survives any of them."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import fake_env, processes_in_session
from conftest import fake_trial as trial
from vllm_lab.launcher import (
    LaunchRefused,
    VllmServer,
    build_argv,
    legacy_quantization_flag,
    live_servers,
    reap,
)
from vllm_lab.testing.fake_nvml import FakeNvml

pytestmark = pytest.mark.fake

FAILURE_KINDS = [
    "kv_cache_insufficient", "no_kv_memory", "gpu_mem_util_unavailable", "quantization_mismatch",
    "quantization_unsupported_gpu", "dtype_unsupported_gpu", "gpu_unsupported", "cuda_oom",
    "max_len_exceeds_model", "model_not_found",
]  # fmt: skip


@pytest.mark.unit
@pytest.mark.parametrize(
    ("name", "flag"),
    [
        ("Qwen3-8B-AWQ", "awq_marlin"),
        ("/m/llama-gguf", "gguf"),
        ("x/Qwen-GPTQ-Int4", "gptq"),
        ("Qwen3-8B", None),
    ],
)
def test_legacy_launcher_derives_the_flag_from_the_name(name, flag):
    assert legacy_quantization_flag(name) == flag


@pytest.mark.unit
def test_argv_per_launcher_generation(fake_awq_model):
    legacy = build_argv(trial(fake_awq_model, launcher="legacy"), 8001)
    head = build_argv(trial(fake_awq_model, launcher="head"), 8001)
    explicit = build_argv(trial(fake_awq_model, launcher="explicit", quantization="awq"), 8001)
    assert legacy[legacy.index("--quantization") + 1] == "awq_marlin"
    assert "--quantization" not in head
    assert explicit[explicit.index("--quantization") + 1] == "awq"
    assert head[head.index("--host") + 1] == "127.0.0.1"
    serve = build_argv(trial(fake_awq_model, vllm_cmd="vllm serve", gpu_memory_utilization=0.85,
                             kv_cache_memory_bytes=None), 8001)  # fmt: skip
    assert serve[:3] == ["vllm", "serve", str(fake_awq_model)]
    assert serve[serve.index("--gpu-memory-utilization") + 1] == "0.85"


def test_clean_start_is_ready_with_served_len_and_leaves_nothing(fake_model, run_dir):
    t = trial(fake_model, env=fake_env(version="0.32.0"))
    with VllmServer(t, run_dir) as s:
        res = s.start()
        sid = os.getsid(s.proc.pid)
        assert res.outcome == "ready", res
        assert res.backend == "fake"
        assert res.served_max_model_len == 1024
        assert res.scan["kv_cache_tokens"] == 16384
        assert len(processes_in_session(sid)) >= 2  # the API server and its EngineCore child
    assert processes_in_session(sid) == []
    assert s.survivors == []
    assert live_servers(run_dir) == []


@pytest.mark.parametrize("kind", FAILURE_KINDS)
def test_each_failure_kind_is_classified_fast_and_leaves_nothing(fake_model, run_dir, kind):
    # The fake lingers 60 s after the fatal line, as a real vLLM winds down slowly: fail-fast must not wait.
    t = trial(fake_model, env=fake_env(scenario=f"fail:{kind}", linger=60, start_delay=0))
    t0 = time.monotonic()
    with VllmServer(t, run_dir) as s:
        res = s.start()
        sid = os.getsid(s.proc.pid) if s.alive() else None
    took = time.monotonic() - t0
    assert res.outcome == "failed"
    assert res.failure == kind
    assert res.evidence and "Engine core initialization failed" not in res.evidence
    assert took < 30, f"did not fail fast: {took:.1f} s"
    assert sid is None or processes_in_session(sid) == []


def test_capacity_failure_reports_vllms_estimate(fake_model, run_dir):
    t = trial(fake_model, max_model_len=4096, kv_cache_memory_bytes=1_000_000)
    with VllmServer(t, run_dir) as s:
        res = s.start()
    assert (res.outcome, res.failure) == ("failed", "kv_cache_insufficient")
    assert res.scan["estimated_max_model_len"] == 1952
    assert "1952" in (res.remedy or "")


def test_hang_before_ready_times_out_and_leaves_nothing(fake_model, run_dir):
    t = trial(fake_model, env=fake_env(scenario="hang"), startup_timeout_s=3)
    with VllmServer(t, run_dir) as s:
        res = s.start()
        pid = s.proc.pid
    assert res.outcome == "timeout"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_child_that_ignores_sigterm_is_killed(fake_model, run_dir):
    t = trial(fake_model, env=fake_env(scenario="stubborn_child"))
    s = VllmServer(t, run_dir)
    res = s.start()
    assert res.outcome == "ready"
    sid = os.getsid(s.proc.pid)
    children = psutil.Process(s.proc.pid).children(recursive=True)
    assert children, "the fake should have started an EngineCore child"
    survivors = s.stop()
    assert survivors == []
    assert processes_in_session(sid) == []


def test_server_that_dies_after_ready_is_seen_dead(fake_model, run_dir):
    t = trial(fake_model, env=fake_env(scenario="die_after_ready", die_after=0.5))
    with VllmServer(t, run_dir) as s:
        assert s.start().outcome == "ready"
        time.sleep(1.5)
        assert not s.alive()
    assert s.survivors == []


def test_flooding_server_still_starts_and_log_is_copied(fake_model, run_dir):
    t = trial(fake_model, env=fake_env(scenario="flood"))
    with VllmServer(t, run_dir) as s:
        assert s.start().outcome == "ready"
        time.sleep(1)
    assert os.path.getsize(s.log_path) > 10_000


def test_port_in_use_is_refused_before_launch(fake_model, run_dir):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        s = VllmServer(trial(fake_model, port=port), run_dir)
        with pytest.raises(LaunchRefused, match=f"port: 127.0.0.1:{port} is in use"):
            s.start()
        assert s.proc is None  # nothing was launched


def test_survivor_of_a_killed_run_blocks_the_next_launch_until_reaped(fake_model, run_dir):
    first = VllmServer(trial(fake_model, trial_id="first"), run_dir)
    assert first.start().outcome == "ready"
    # Simulate the batch dying: the server is left running with its pid file.
    pidfile = json.loads((run_dir / "servers" / "first.json").read_text())
    second = VllmServer(trial(fake_model, trial_id="second"), run_dir)
    with pytest.raises(LaunchRefused, match="vllm-lab reap"):
        second.start()
    assert reap(run_dir) == [pidfile["pid"]]
    assert live_servers(run_dir) == []
    assert not psutil.pid_exists(pidfile["pid"]) or psutil.Process(pidfile["pid"]).status() == "zombie"
    first.proc.wait(timeout=5)


def test_log_copy_has_no_secrets(fake_model, run_dir):
    secret = "hf_" + "a1B2c3D4e5F6g7H8i9J0kLmNoPqR"
    t = trial(
        fake_model, extra_args=["--api-key", "sk-verysecretvalue1234567890abcd"], env={"HF_TOKEN": secret}
    )
    with VllmServer(t, run_dir) as s:
        res = s.start()
    text = Path(res.log_path).read_text()
    assert "sk-verysecretvalue1234567890abcd" not in text
    assert "sk-verysecretvalue1234567890abcd" not in " ".join(res.argv)
    assert secret not in text


def test_stop_waits_for_gpu_memory_and_notes_when_it_is_not_released(fake_model, run_dir, monkeypatch):
    """With NVML present the stop waits until the device is back at its pre-launch level (fake NVML here)."""
    from vllm_lab import gpu

    monkeypatch.setattr(gpu, "_NVML_OVERRIDE", FakeNvml([dict(P40, used=[1000])]))
    calls = []

    class Waited:
        reason = "GPU 0 still holds 9000 MiB"

        def __bool__(self):
            return False

    def fake_wait(devices, baseline, *a, **k):
        calls.append((devices, baseline))
        return Waited()

    monkeypatch.setattr(gpu, "wait_for_memory_free", fake_wait)
    with VllmServer(trial(fake_model), run_dir) as s:
        assert s.start().outcome == "ready"
    assert calls == [([0], {0: 1000.0})]
    assert "not released" in s.gpu_note and "9000 MiB" in s.gpu_note


# --- issue 16: GPU accounting per visible device, one wait per stop ------------------------------------------

P40 = {"name": "Tesla P40", "uuid": "GPU-aaaa1111-2222", "cc": (6, 1), "total": 24576, "used": [1000]}
A100 = {
    "name": "NVIDIA A100-SXM4-80GB",
    "uuid": "GPU-bbbb3333-4444",
    "cc": (8, 0),
    "total": 81920,
    "used": [300],
}


@pytest.mark.parametrize("where", ["trial", "process"])
def test_gpu_baseline_and_release_wait_cover_only_the_visible_device(fake_model, run_dir, monkeypatch, where):
    """A neighbour's job grows on GPU 0 while the trial runs on GPU 1: its stop must not wait for GPU 0."""
    from vllm_lab import gpu

    neighbour = dict(P40, used=[1000, 9000])  # grows after the first reading
    fake = FakeNvml([neighbour, dict(A100, used=[300, 6000, 300])])
    monkeypatch.setattr(gpu, "_NVML_OVERRIDE", fake)
    waits = []
    real_wait = gpu.wait_for_memory_free
    monkeypatch.setattr(gpu, "wait_for_memory_free", lambda d, b, *a, **k: waits.append((d, b)) or real_wait(
        d, b, *a, **{**k, "timeout_s": 1, "interval_s": 0.01}))  # fmt: skip
    env = {"CUDA_VISIBLE_DEVICES": "GPU-bbbb3333"} if where == "trial" else {}
    if where == "process":
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    with VllmServer(trial(fake_model, env=env), run_dir) as s:
        assert s.start().outcome == "ready"
    assert [d for d, _ in waits] == [[1]]
    assert set(waits[0][1]) == {1}
    assert s.gpu_note is None


def test_failed_launch_waits_for_gpu_memory_once(fake_model, run_dir, monkeypatch):
    from vllm_lab import gpu

    monkeypatch.setattr(gpu, "_NVML_OVERRIDE", FakeNvml([dict(P40)]))
    waits = []
    monkeypatch.setattr(gpu, "wait_for_memory_free", lambda *a, **k: waits.append(a) or True)
    with VllmServer(trial(fake_model, env=fake_env(scenario="fail:cuda_oom")), run_dir) as s:
        assert s.start().outcome == "failed"
    assert len(waits) == 1


def test_record_gpu_facts_peak_and_timeline_are_the_visible_devices(fake_model, run_dir, monkeypatch):
    from vllm_lab import gpu
    from vllm_lab.probe import run_trial

    monkeypatch.setattr(
        gpu, "_NVML_OVERRIDE", FakeNvml([dict(P40, used=[20000]), dict(A100, used=[300, 700])])
    )
    rec = run_trial(trial(fake_model, env={"CUDA_VISIBLE_DEVICES": "1"}), run_dir, long=False)
    assert (rec["gpu_name"], rec["gpu_cc"], rec["gpu_total_mib"]) == ("NVIDIA A100-SXM4-80GB", "8.0", 81920)
    assert rec["peak_gpu_mib"] == 700.0  # GPU 0's 20000 MiB is a neighbour's
    assert {v for _, v in rec["gpu_memory_timeline"]} <= {300.0, 700.0}


# --- issue 16: backend, readiness, proxies, exit codes, logs, caches ------------------------------------------

STANDIN = f"{sys.executable} -m vllm_lab.testing.standin"


def test_backend_comes_from_the_command_never_from_log_words(fake_model, run_dir):
    """A stand-in in an environment without vLLM that prints CUDA words is not vllm-cuda."""
    with VllmServer(trial(fake_model, vllm_cmd=STANDIN), run_dir) as s:
        res = s.start()
    assert res.outcome == "ready"
    assert "platform cuda" in Path(res.log_path).read_text()
    assert res.backend == "unknown"


def test_ready_via_health_without_uvicorns_log_line(fake_model, run_dir):
    with VllmServer(trial(fake_model, vllm_cmd=STANDIN, env={"STANDIN_NO_UVICORN": "1"}), run_dir) as s:
        res = s.start()
    assert res.outcome == "ready"
    assert "Application startup complete" not in Path(res.log_path).read_text()


def test_loopback_requests_do_not_go_through_a_proxy(fake_model, run_dir, monkeypatch):
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{dead.getsockname()[1]}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with VllmServer(trial(fake_model, startup_timeout_s=15), run_dir) as s:
        res = s.start()
    assert res.outcome == "ready"
    assert res.served_max_model_len == 1024


def test_sigkill_before_ready_is_recorded_and_named_as_the_oom_killer(fake_model, run_dir):
    from vllm_lab.probe import run_trial

    rec = run_trial(trial(fake_model, vllm_cmd=STANDIN, env={"STANDIN_SIGKILL": "1"}), run_dir)
    assert (rec["outcome"], rec["failure"]) == ("failed", "other")
    assert (rec["exit_code"], rec["exit_signal"]) == (-9, "SIGKILL")
    assert "OOM killer" in rec["evidence"]


def test_exit_code_of_a_server_that_ends_by_itself(fake_model, run_dir):
    with VllmServer(trial(fake_model, vllm_cmd=STANDIN, env={"STANDIN_EXIT": "3"}), run_dir) as s:
        res = s.start()
    assert (res.outcome, res.exit_code, res.exit_signal) == ("failed", 3, None)
    # no cause in the log: the evidence still says how it ended and what it printed last (not None)
    assert res.evidence.startswith("the server exited with code 3 before it was ready")
    assert "# GPU blocks: 1391" in res.evidence and "run vllm_cmd by hand" in res.remedy


def test_death_after_ready_is_recorded_with_its_exit_code(fake_model, run_dir):
    t = trial(fake_model, env=fake_env(scenario="die_after_ready", die_after=0.3))
    with VllmServer(t, run_dir) as s:
        res = s.start()
        assert res.outcome == "ready" and res.exit_code is None
        time.sleep(1.5)
    assert (res.exit_code, res.exit_signal) == (3, None)
    assert "exited by itself" in s.stop_note


def test_fail_fast_stop_is_not_recorded_as_the_servers_own_exit(fake_model, run_dir):
    t = trial(fake_model, env=fake_env(scenario="fail:cuda_oom", linger=60))
    with VllmServer(t, run_dir) as s:
        res = s.start()
    assert res.outcome == "failed" and (res.exit_code, res.exit_signal) == (None, None)


def test_logs_are_never_overwritten(fake_model, run_dir):
    logs = []
    for version in ("0.10.2", "0.32.0", "0.33.0"):
        with VllmServer(trial(fake_model, trial_id="same", env=fake_env(version=version)), run_dir) as s:
            logs.append(s.start().log_path)
    assert [Path(p).name for p in logs] == ["same.log", "same-2.log", "same-3.log"]
    assert [("version " + v) in Path(p).read_text() for p, v in zip(logs, ("0.10.2", "0.32.0", "0.33.0"),
                                                                    strict=True)] == [True] * 3  # fmt: skip


def test_caches_are_the_users_and_tmpdir_is_private(fake_model, run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    envs = []
    for n, extra in enumerate([{}, {}, {"VLLM_LAB_ISOLATE_CACHE": "1"}]):
        dump = tmp_path / f"env{n}.json"
        t = trial(fake_model, vllm_cmd=STANDIN, env={"STANDIN_ENV_DUMP": str(dump), **extra})
        with VllmServer(t, run_dir) as s:
            assert s.start().outcome == "ready"
        envs.append(json.loads(dump.read_text()))
    shared, again, isolated = envs
    assert shared["HF_HOME"] == str(tmp_path / "hf-home")  # the user's HF cache: a hub model downloads once
    assert "XDG_CACHE_HOME" not in shared and "VLLM_CACHE_ROOT" not in shared  # ~/.cache/vllm: shared
    assert shared["TMPDIR"] != again["TMPDIR"]  # private per launch (ZMQ sockets)
    assert isolated["VLLM_CACHE_ROOT"].startswith(isolated["TMPDIR"])  # isolation only on request
