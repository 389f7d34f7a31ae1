"""llama.cpp's llama-server as an engine: bad input (unit), and the real server (the xllamacpp wheel in
.venv-llamacpp, `make llamacpp`) on the tiny GGUF (`make tiny-model`). Runs in CI under `make test`; a
missing install is a failure here, never a skip. A start takes about a second on 2 cores.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, TINY_MODEL
from vllm_lab import engines, record
from vllm_lab.cli import main
from vllm_lab.engines import llamacpp
from vllm_lab.launcher import VllmServer
from vllm_lab.probe import chat_ok, long_request, run_trial
from vllm_lab.spec import Trial
from vllm_lab.tinymodel import build_tokenizer

TINY_GGUF = ROOT / ".cache" / "models" / "tiny-qwen2.gguf"
SERVER = ROOT / ".venv-llamacpp" / "bin" / "llama-server"
GIB = 2**30
KV_BYTES_PER_TOKEN = 512  # the tiny model: 2 x 2 layers x 2 KV heads x 32 x f16
# Under this address-space limit the tiny GGUF starts at a small -c; -c 4194304 asks 2 GiB of KV. With one
# malloc arena (the engine's env under a limit) the server's own address space is about 190 MiB on 2 cores.
LIMIT = 1 * GIB
HUGE_CTX = 4 * 2**20


def gguf_trial(**kw) -> Trial:
    kw.setdefault("model", str(TINY_GGUF))
    kw.setdefault("startup_timeout_s", 120)
    kw.setdefault("request_timeout_s", 120)
    kw.setdefault("vllm_cmd", str(SERVER))
    return Trial(engine="llamacpp", **kw)


# ---------------------------------------------------------------- unit: no server
@pytest.mark.unit
@pytest.mark.parametrize(
    ("c", "slots", "unified", "used"),
    # as this build printed them (llama_context: n_ctx = ...)
    [(1000, 1, True, 1024), (1000, 4, True, 1024), (1000, 2, False, 1024), (100, 4, False, 1024),
     (256, 16, False, 4096), (300, 64, False, 16384), (40960, 1, True, 40960)],
)  # fmt: skip
def test_context_is_padded_per_slot_as_llamacpp_does(c, slots, unified, used):
    assert llamacpp.padded_ctx(c, slots, unified) == used


@pytest.mark.unit
def test_build_number_from_either_version_format():
    assert llamacpp.parse_version("version: 4753 (7a2c913e)\nbuilt with cc for x86_64") == "4753"
    assert llamacpp.parse_version("version: 0.1.1-dev (build 10470, commit abc1234)") == "10470"
    assert llamacpp.parse_version("version: 0 (unknown)") is None  # a build without build info
    assert llamacpp.parse_version("usage: something else") is None


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--engine", "llamacpp", "--model", str(TINY_MODEL)], "is a model folder; llama.cpp serves one .gguf"),
        (["--engine", "llamacpp", "--model", str(TINY_MODEL / "config.json")], "is not a GGUF file"),
        (["--engine", "llamacpp", "--model", str(TINY_GGUF), "--max-model-len", "4"], "below llama.cpp's minimum"),
        (["--engine", "llamacpp", "--model", str(TINY_GGUF), "--extra-args=--gpu-memory-utilization 0.9"],
         "--gpu-memory-utilization is vLLM's"),
        (["--engine", "llamacpp", "--model", str(TINY_GGUF), "--extra-args=-c 512"], "-c is set from the trial's max_model_len"),
        (["--engine", "llamacpp", "--model", str(TINY_GGUF), "--kv-cache-memory-bytes", "8000000"],
         "kv_cache_memory_bytes: is vLLM's"),
        (["--engine", "llamacpp", "--model", str(TINY_GGUF), "--vllm-cmd", "/nonexistent/llama-server"],
         "make llamacpp"),
        (["--model", str(TINY_GGUF)], "is a GGUF file; vLLM serves a model folder: use engine: llamacpp"),
        (["--model", str(TINY_MODEL), "--extra-args=-ngl 99"], "-ngl is llama.cpp's, vLLM refuses it"),
        (["--engine", "llama.cpp", "--model", str(TINY_GGUF)], "engine: 'llama.cpp' is not one of"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_before_any_launch(args, says, tmp_path, capsys):
    assert main(["launch", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "logs").exists()  # nothing launched


@pytest.mark.unit
def test_argv_asks_gpu_layers_only_where_a_gpu_is_visible(monkeypatch):
    eng = engines.get("llamacpp")
    t = gguf_trial(max_model_len=1000, extra_args=["-np", "2"])
    monkeypatch.setattr(llamacpp.LlamaCppEngine, "_gpu_visible", staticmethod(lambda trial: False))
    cpu = eng.argv(t, 8080, "127.0.0.1")
    assert cpu[:5] == [str(SERVER), "-m", str(TINY_GGUF), "-c", "1000"]
    assert "-ngl" not in cpu and "--fit" not in cpu
    assert cpu[-2:] == ["-np", "2"]  # the trial's own flags last
    assert {"--metrics", "-lv"} <= set(cpu)  # the wrapper's --help lists both
    monkeypatch.setattr(llamacpp.LlamaCppEngine, "_gpu_visible", staticmethod(lambda trial: True))
    gpu = eng.argv(t, 8080, "127.0.0.1")
    assert gpu[gpu.index("-ngl") + 1] == "all" and gpu[gpu.index("--fit") + 1] == "off"
    own = eng.argv(gguf_trial(extra_args=["-ngl", "20"]), 8080, "127.0.0.1")
    assert own.count("-ngl") == 1 and "--fit" in own  # the trial's -ngl wins, fit still off


@pytest.mark.unit
def test_backend_and_build_from_the_command(tmp_path):
    eng = engines.get("llamacpp")
    assert eng.backend("docker run --gpus all ghcr.io/ggml-org/llama.cpp:server-cuda") == "llamacpp-cuda"
    assert eng.backend("docker run ghcr.io/ggml-org/llama.cpp:server") == "llamacpp-cpu"
    assert eng.backend("podman run ghcr.io/ggml-org/llama.cpp:server-vulkan") == "unknown"
    assert eng.backend(f"{sys.executable} -m vllm_lab.testing.fake_vllm") == "fake"
    assert eng.backend("/nonexistent/llama-server") == "unknown"
    # a CUDA build of llama-server says so before its version (today's semver format)
    cuda = tmp_path / "llama-server"
    cuda.write_text(
        "#!/bin/sh\necho 'ggml_cuda_init: found 1 CUDA devices:' >&2\n"
        "echo 'version: 0.1.1-dev (build 10470, commit abc1234)' >&2\n"
    )
    cuda.chmod(0o755)
    assert eng.backend(str(cuda)) == "llamacpp-cuda"
    assert llamacpp.version(str(cuda)) == "10470"


@pytest.mark.unit
def test_memory_limit_runs_with_one_malloc_arena_and_no_gdb():
    eng = engines.get("llamacpp")
    assert eng.env(gguf_trial()) == {}
    assert eng.env(gguf_trial(memory_limit_bytes=LIMIT)) == {
        "MALLOC_ARENA_MAX": "1",
        "GGML_NO_BACKTRACE": "1",
    }


# ---------------------------------------------------------------- the real llama-server
@pytest.fixture(scope="module")
def installed():
    assert SERVER.exists(), "no .venv-llamacpp: run `make llamacpp` (make test does it)"
    assert TINY_GGUF.exists(), "no tiny GGUF: run `make tiny-model` (make test does it)"


@pytest.fixture(scope="module")
def server(installed, tmp_path_factory):
    """One real server (-c 1000, default slots) for the tests that only read from it."""
    with VllmServer(gguf_trial(max_model_len=1000), tmp_path_factory.mktemp("run")) as s:
        res = s.start()
        assert res.outcome == "ready", (res.failure, res.evidence)
        yield s


@pytest.mark.llamacpp
def test_start_reads_the_real_log(server):
    res = server.result
    assert res.backend == "llamacpp-cpu"
    assert res.seconds_to_outcome < 30
    f = res.scan
    assert f["engine"] == "llamacpp"
    assert f["engine_version"] == llamacpp.version(str(SERVER))  # the wheel's build, 11549 for 2026.10.11549
    assert f["n_ctx"] == 1024  # -c 1000 asked, padded to 256
    assert f["n_slots"] == 4 and f["n_ctx_slot"] == 1024  # -np auto: 4 slots sharing one unified cache
    assert f["kv_cache_mib"] == 1024 * KV_BYTES_PER_TOKEN / 2**20  # 0.5, printed with -lv 4
    assert f["n_ctx_train"] == 40960
    assert httpx.get(f"{res.base_url}/health", timeout=5).status_code == 200


@pytest.mark.llamacpp
def test_same_token_ids_and_a_chat(server):
    base = server.result.base_url
    text = "Hello world! The quick brown fox 16384 tokens."
    got = httpx.post(f"{base}/tokenize", json={"content": text}, timeout=10).json()["tokens"]
    assert got == build_tokenizer().encode(text).ids  # the GGUF tokenizes as the HF tokenizer does
    assert chat_ok(base, "any-name", 60)


@pytest.mark.llamacpp
def test_a_request_fills_one_slot_exactly(server):
    base = server.result.base_url
    slot = engines.get("llamacpp").after_ready(gguf_trial(), base)["served_max_model_len"]
    assert slot == 1024
    full = long_request(base, str(TINY_GGUF), slot, 512, 60)
    assert full.ok and full.tokens == 1024, full.error
    assert not long_request(base, str(TINY_GGUF), slot + 1, 512, 60).ok  # one token past the slot


@pytest.mark.llamacpp
def test_metrics_on(server):
    text = httpx.get(f"{server.result.base_url}/metrics", timeout=10).text
    assert "llamacpp:requests_processing" in text and "llamacpp:requests_deferred" in text


@pytest.mark.llamacpp
def test_vllm_lab_load_against_llama_server(server, tmp_path, capsys):
    # the served name is -m as given; prompts' ids come from the GGUF's vocabulary (512)
    code = main(["load", "--url", server.result.base_url, "--model", str(TINY_GGUF), "--concurrency", "1,2",
                 "--requests", "16", "--prompt-tokens", "64", "--output-tokens", "16", "--json"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out.get("reason")
    assert out["stable"] is True
    assert [(lvl["completed"], lvl["failed"]) for lvl in out["levels"]] == [(16, 0), (16, 0)]
    assert all(lvl["output_tokens_per_s"] > 0 for lvl in out["levels"])
    assert out["levels"][-1]["running_max"] is not None  # llamacpp:requests_processing, read like vLLM's


@pytest.mark.llamacpp
def test_run_trial_records_context_asked_and_used(installed, run_dir):
    rec = run_trial(gguf_trial(max_model_len=1000, extra_args=["-np", "2"]), run_dir)
    assert rec["outcome"] == "ready", rec["evidence"]
    assert rec["engine"] == "llamacpp" and rec["backend"] == "llamacpp-cpu"
    assert rec["engine_version"] and rec["engine_version"] != "0"
    assert rec["max_model_len"] == 1000 and rec["n_ctx"] == 1024  # asked, used
    assert rec["n_slots"] == 2 and rec["n_ctx_slot"] == 512  # -np 2 without -kvu: split
    assert rec["kv_cache_mib"] == 0.5
    assert rec["chat_ok"] is True
    assert rec["long_request_ok"] is True and rec["long_request_tokens"] == 512  # one slot, filled
    assert rec["metrics"]["llamacpp:requests_processing"] == 0
    assert rec["memory_limit"] is None and rec["note"] is None
    assert record.read_records(run_dir).rows[-1]["trial_id"] == rec["trial_id"]


@pytest.mark.llamacpp
def test_kv_cache_oom_under_a_memory_limit(installed, run_dir):
    small = run_trial(gguf_trial(max_model_len=1024, memory_limit_bytes=LIMIT), run_dir, long=False)
    assert small.get("outcome") == "ready", small["evidence"]  # the limit alone lets it start
    big = run_trial(gguf_trial(max_model_len=HUGE_CTX, memory_limit_bytes=LIMIT), run_dir, long=False)
    assert big["outcome"] == "failed"
    assert big["failure"] == "kv_cache_oom"
    assert "failed to allocate buffer for kv cache" in big["evidence"]  # llama.cpp's own line
    assert "-c" in big["remedy"]
    assert big["memory_limit"] == LIMIT and big["n_ctx"] == HUGE_CTX
    log = Path(big["log_path"]).read_text()
    assert "ggml_aligned_malloc: insufficient memory" in log  # the CPU path of the same allocation
