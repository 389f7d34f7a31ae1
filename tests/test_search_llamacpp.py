"""The largest stable context on llama.cpp: block 256, the memory model's guess first, the +1 block proven.

Unit: a stand-in launch function (no server). Real: llama-server (the xllamacpp wheel) on the tiny GGUF under
an address-space limit on the server process, which stands in for the card here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import ROOT
from vllm_lab import search_llamacpp as lc
from vllm_lab.cli import main
from vllm_lab.engines import llamacpp_log
from vllm_lab.search import failure_class, run_search, search_max_model_len
from vllm_lab.spec import Trial

TINY_GGUF = ROOT / ".cache" / "models" / "tiny-qwen2.gguf"
SERVER = ROOT / ".venv-llamacpp" / "bin" / "llama-server"
MIB = 2**20
# Not one of the two limits ADDRESS_SPACE_BASE / REQUEST_* were fitted on (205 and 220 MiB).
LIMIT = 210 * MIB


def trial(**kw) -> Trial:
    kw.setdefault("model", str(TINY_GGUF))
    kw.setdefault("vllm_cmd", str(SERVER))
    kw.setdefault("max_model_len", 1024)
    kw.setdefault("startup_timeout_s", 120)
    kw.setdefault("request_timeout_s", 120)
    return Trial(engine="llamacpp", **kw)


def standin(edge: int, kind: str = "kv_cache_oom"):
    """launch(n): stable up to `edge`, above it a llama.cpp failure of `kind`; records the n launched."""
    launched: list[int] = []

    def launch(n: int) -> dict:
        launched.append(n)
        rec = {"engine": "llamacpp", "max_model_len": n, "memory_limit": LIMIT, "seconds_to_outcome": 1.0}
        if n <= edge:
            return rec | {"outcome": "ready", "long_request_ok": True}
        return rec | {"outcome": "failed", "failure": kind, "evidence": f"llama.cpp: {kind}"}

    return launch, launched


# ---------------------------------------------------------------- unit
@pytest.mark.unit
@pytest.mark.parametrize("kind", ["kv_cache_oom", "compute_oom", "context_exceeded", "cuda_oom"])
def test_length_dependent_failures_prove_longer_contexts_fail(kind):
    assert failure_class({"engine": "llamacpp", "outcome": "failed", "failure": kind}) == "proof"


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["weights_oom", "bad_model_file", "gpu_unsupported"])
def test_failures_the_context_does_not_change_stop_the_search(kind):
    assert failure_class({"engine": "llamacpp", "outcome": "failed", "failure": kind}) == "independent"
    launch, launched = standin(0, kind)
    res = search_max_model_len(launch, low=256, high=40960, block_size=256, first_guess=8192,
                               exact_first=True, guess_report=True)  # fmt: skip
    assert res.verdict == "stopped" and res.failure == kind and launched == [8192]


@pytest.mark.unit
def test_a_request_failing_under_a_memory_limit_is_proof_even_if_the_chat_failed():
    rec = {"engine": "llamacpp", "outcome": "unstable", "chat_ok": False, "memory_limit": LIMIT}
    assert failure_class(rec) == "proof"
    assert failure_class(rec | {"memory_limit": None}) == "independent"  # no limit: not a memory matter


@pytest.mark.unit
@pytest.mark.parametrize(
    ("guess", "launches"),
    [(13568, 2), (13312, 3), (13824, 2), (12800, 8), (4096, 10)],  # right; a block low / high; far off
)
def test_a_good_guess_finds_the_edge_in_two_launches(guess, launches):
    launch, launched = standin(13568)
    res = search_max_model_len(launch, low=256, high=40960, block_size=256, first_guess=guess, extra_launches=1,
                               model_limit=40960, exact_first=True, guess_report=True)  # fmt: skip
    assert res.max_model_len == 13568 and res.verdict == "found" and res.plus_one_fails
    assert res.launches == launches, res.steps
    assert launched[0] == guess and all(n % 256 == 0 for n in launched)
    assert 13568 + 256 in launched  # the next block was launched and failed: proven, not assumed
    assert res.launches <= res.bisection_launches + 2


@pytest.mark.unit
def test_run_search_passes_block_range_guess_and_limit(tmp_path):
    launch, launched = standin(13568)
    res = run_search(
        trial(memory_limit_bytes=LIMIT), tmp_path, run_trial=lambda t, d: launch(t.max_model_len)
    )
    assert res.engine == "llamacpp" and res.memory_limit == LIMIT and res.block_size == 256
    assert res.high == 40960  # the GGUF's n_ctx_train
    assert res.first_launch == "memory_model" and "210 MiB" in res.first_launch_why
    assert launched[0] == lc.first_guess(trial(memory_limit_bytes=LIMIT))[0]
    assert res.max_model_len == 13568 and res.plus_one_fails
    saved = json.loads((tmp_path / "search.json").read_text())
    assert saved["memory_limit"] == LIMIT and saved["engine"] == "llamacpp"


@pytest.mark.unit
def test_the_guess_grows_with_the_limit_and_with_flash_attention():
    small, big = (lc.first_guess(trial(memory_limit_bytes=m * MIB))[0] for m in (205, 230))
    assert small % 256 == 0 and big % 256 == 0 and small < big
    no_fa = lc.first_guess(trial(memory_limit_bytes=230 * MIB, extra_args=["-fa", "off"]))[0]
    assert no_fa < big  # without flash attention the KQ scores grow with the context
    assert lc.first_guess(trial()) is None  # no limit and no GPU here: no guess (bisection's midpoint)


@pytest.mark.unit
def test_a_thread_that_cannot_get_its_stack_is_out_of_memory():
    log = (
        "llama_kv_cache:        CPU KV buffer size =    11.12 MiB\n"
        "srv          init: model loaded\n"
        "srv          init: listening on http://127.0.0.1:8080\n"
        "terminate called after throwing an instance of 'std::system_error'\n"
        "  what():  Resource temporarily unavailable\n"
    )
    scan = llamacpp_log.scan_log(log)
    assert scan.failure == "cuda_oom" and "Resource temporarily unavailable" in scan.evidence


@pytest.mark.unit
def test_vllm_search_still_needs_its_memory_setting(capsys):
    assert main(["search", "--model", str(TINY_GGUF)]) == 2
    assert "--gpu-memory-utilization" in capsys.readouterr().err


# ---------------------------------------------------------------- the real llama-server
@pytest.mark.llamacpp
def test_search_under_a_memory_limit_with_the_real_server(tmp_path, capsys):
    assert SERVER.exists() and TINY_GGUF.exists(), "run `make llamacpp tiny-model`"
    code = main(["search", "--engine", "llamacpp", "--model", str(TINY_GGUF), "--vllm-cmd", str(SERVER),
                 "--memory-limit", str(LIMIT), "--out", str(tmp_path), "--timeout", "120", "--json"])  # fmt: skip
    res = json.loads(capsys.readouterr().out)
    assert code == 0, res["reason"]
    assert res["verdict"] == "found" and res["plus_one_fails"] is True
    n = res["max_model_len"]
    assert n % 256 == 0 and 4096 < n < 40960
    if os.cpu_count() == lc.MEASURED_ON_CPUS:  # where the process's own address space was measured
        assert res["launches"] <= 3, res["steps"]  # the memory model's guess lands within a block or two
        assert res["launches"] < res["bisection_launches"]
    assert res["launches"] <= res["bisection_launches"] + 2, res["steps"]
    recs = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert all(r["memory_limit"] == LIMIT and r["engine"] == "llamacpp" for r in recs)
    ok = [r for r in recs if r["max_model_len"] == n][-1]
    assert ok["n_ctx"] == n and ok["long_request_ok"] is True and ok["long_request_tokens"] == n
    over = [r for r in recs if r["max_model_len"] == n + 256][-1]
    assert failure_class(over) == "proof"
    assert Path(ok["log_path"]).exists()
