"""The launcher against the fake vLLM: every outcome, and no process survives any of them."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import psutil
import pytest
from conftest import FAKE_CMD, fake_env, processes_in_session
from vllm_lab.launcher import (
    LaunchRefused,
    VllmServer,
    build_argv,
    legacy_quantization_flag,
    live_servers,
    reap,
)
from vllm_lab.spec import Trial

pytestmark = pytest.mark.fake

FAILURE_KINDS = [
    "kv_cache_insufficient", "no_kv_memory", "gpu_mem_util_unavailable", "quantization_mismatch",
    "quantization_unsupported_gpu", "dtype_unsupported_gpu", "gpu_unsupported", "cuda_oom",
    "max_len_exceeds_model", "model_not_found",
]  # fmt: skip


def trial(model, **kw) -> Trial:
    kw.setdefault("vllm_cmd", FAKE_CMD)
    kw.setdefault("max_model_len", 1024)
    kw.setdefault("kv_cache_memory_bytes", 8 * 2**20)
    kw.setdefault("startup_timeout_s", 30)
    return Trial(model=str(model), **kw)


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

    levels = iter([{0: 1000.0}])  # before the launch
    monkeypatch.setattr(gpu, "used_mib", lambda *a, **k: next(levels))
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
