"""The context search on Ollama, over real HTTP against the stand-in (testing/fake_ollama.py): num_ctx at
llama.cpp's block, a context Ollama lowers silently as the edge, a context that only runs with part of the
model on the CPU as no fit, and the range from the GGUF in Ollama's store."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAKE_OLLAMA, ROOT, ollama_store
from conftest import OLLAMA_MODEL as MODEL
from vllm_lab import search
from vllm_lab import search_llamacpp as lc
from vllm_lab.errors import SpecError
from vllm_lab.spec import Trial

TINY_GGUF = ROOT / ".cache" / "models" / "tiny-qwen2.gguf"


def template(store: Path, **env: str) -> Trial:
    return Trial(model=MODEL, engine="ollama", vllm_cmd=FAKE_OLLAMA, max_model_len=16384, step="search",
                 env={"OLLAMA_MODELS": str(store), **env}, startup_timeout_s=60, request_timeout_s=60)  # fmt: skip


def test_a_context_ollama_lowers_is_the_edge_found_at_its_block(tmp_path):
    store = ollama_store(tmp_path / "store")
    res = search.run_search(
        template(store, FAKE_OLLAMA_FIT_CTX="8000"), tmp_path / "run", low=1024, high=16384
    )
    assert (res.engine, res.block_size, res.verdict) == ("ollama", 256, "found")
    assert res.max_model_len == 7936  # 8000 rounded down to the block; 8192 was lowered to 8000
    over = next(s for s in res.steps if s["max_model_len"] == 8192)
    assert (over["outcome"], over["failure"], over["stable"]) == ("failed", "context_reduced", False)
    assert all(r["backend"] == "fake" and r["engine"] == "ollama" for r in res.trials)
    assert "largest stable num_ctx (Ollama, block 256): 7936" in search.format_result(res)


def test_a_context_only_partly_on_the_gpu_is_not_a_fit(tmp_path):
    # 6000 MiB of VRAM: the stand-in puts what exceeds 97 % of it on the CPU, as Ollama's scheduler does;
    # weights 4.68 GiB + 300 MiB + 144 KiB per token fit up to 5156 tokens
    store = ollama_store(tmp_path / "store")
    t = template(store, FAKE_OLLAMA_VRAM_MIB="6000")
    res = search.run_search(t, tmp_path / "run", low=1024, high=16384)
    assert (res.verdict, res.max_model_len) == ("found", 5120)
    over = [s for s in res.steps if s["max_model_len"] > 5120]
    assert over and all(s["outcome"] == "ready" and s["failure"] == "partial_offload" for s in over)
    offloaded = [r for r in res.trials if r["max_model_len"] > 5120]
    assert all(0 < r["offload_fraction"] < 1 and "on the CPU" in r["note"] for r in offloaded)
    assert "partial_offload" in search.format_result(res)


def test_the_range_and_the_first_launch_come_from_the_gguf_in_the_store(tmp_path, monkeypatch):
    store = ollama_store(tmp_path / "store", blob=TINY_GGUF)
    t = template(store)
    assert lc.model_limit(t) == 40960  # the blob's n_ctx_train
    assert lc.gguf_of(t) == store / "blobs" / ("sha256-" + "ab" * 32)
    # a card's budget (what NVML gives on a GPU box): the memory model's guess is launched first
    monkeypatch.setattr(lc, "budget", lambda trial: (100 * 2**20, 0, "a 100 MiB card"))
    guess, why = lc.first_guess(t)
    assert 0 < guess < 40960 and guess % 256 == 0 and why.startswith("the memory model (a guess): num_ctx")
    two, why_two = lc.first_guess(Trial(**{**t.__dict__, "env": {**t.env, "OLLAMA_NUM_PARALLEL": "2"}}))
    assert two < guess  # each of two slots gets num_ctx: -c is twice num_ctx
    per_token = [float(re.search(r"(\d+) bytes per token", w).group(1)) for w in (why, why_two)]
    # a num_ctx token costs a KV cell in each slot (the compute buffer goes with one slot's length)
    assert per_token[1] > per_token[0]


def test_without_a_gguf_or_a_top_the_search_asks_for_high(tmp_path):
    store = ollama_store(tmp_path / "store")  # manifest only: no blob to read n_ctx_train from
    with pytest.raises(SpecError, match=r"^high: .*give high"):
        search.run_search(template(store), tmp_path / "run", low=1024)
    assert not (tmp_path / "run" / "trials.jsonl").exists()  # before any launch


def test_a_model_all_on_the_cpu_beside_a_gpu_stops_the_search():
    rec = {"engine": "ollama", "outcome": "ready", "long_request_ok": True, "offload_fraction": 0.0,
           "gpu_name": "Tesla P40", "note": "the whole model on the CPU (size_vram 0) though a GPU is visible"}  # fmt: skip
    assert search.gpu_residency(rec) == "gpu_unused" and search.failure_class(rec) == "independent"
    assert not search.passes(rec)
    cpu_box = {**rec, "gpu_name": None}  # no GPU at all: the CPU is where it is meant to run
    assert search.gpu_residency(cpu_box) is None and search.passes(cpu_box)
    ctx_lowered = {"engine": "ollama", "outcome": "failed", "failure": "context_reduced"}
    assert search.failure_class(ctx_lowered) == "proof"
    assert search.failure_class({"engine": "ollama", "outcome": "failed", "failure": "model_not_found"}) == (
        "independent"
    )


def test_vllm_lab_search_engine_ollama_through_the_cli(tmp_path):
    store = ollama_store(tmp_path / "store")
    env = {"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "OLLAMA_MODELS": str(store),
           "FAKE_OLLAMA_FIT_CTX": "3000", "HOME": str(tmp_path)}  # fmt: skip
    p = subprocess.run(
        [sys.executable, "-m", "vllm_lab.cli", "search", "--engine", "ollama", "--model", MODEL,
         "--vllm-cmd", FAKE_OLLAMA, "--low", "1024", "--high", "4096", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert "largest stable num_ctx (Ollama, block 256): 2816" in p.stdout


def test_an_address_space_limit_is_refused_for_ollama(tmp_path):
    store = ollama_store(tmp_path / "store")
    t = Trial(**{**template(store).__dict__, "memory_limit_bytes": 2**30, "trial_id": ""})
    with pytest.raises(SpecError, match=r"^memory_limit_bytes: stands in for a card with llama\.cpp only"):
        t.validate()


def test_an_ollama_model_made_from_a_gguf_file_is_sized_from_that_file(tmp_path):
    t = Trial(model=str(TINY_GGUF), engine="ollama", env={"OLLAMA_MODELS": str(tmp_path / "empty-store")})
    assert lc.gguf_of(t) == str(TINY_GGUF) and lc.model_limit(t) == 40960
