"""A load on Ollama (issue 24), over real HTTP against the stand-in (testing/fake_ollama.py): Ollama's
/v1/completions takes only text, so the load sends word prompts calibrated to --prompt-tokens by what the
server counts (usage.prompt_tokens), says so, and treats a prompt cut silently as not clean. The stand-in
counts a token per word and serves no /health and no /metrics, as Ollama."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ollama_store
from vllm_lab import engines, prompt_text
from vllm_lab.engines import ollama_check
from vllm_lab.launcher import VllmServer
from vllm_lab.load import NOT_CHECKABLE, PROMPT_NUMBERS, LoadSpec, _Load, run_load
from vllm_lab.probe import run_trial
from vllm_lab.spec import Trial

FAKE_OLLAMA = f"{sys.executable} -m vllm_lab.testing.fake_ollama serve"
MODEL = "qwen3:8b-q4_K_M"
SMALL = {"prompt_tokens": 48, "output_tokens": 8, "request_timeout_s": 30.0}


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return ollama_store(tmp_path / "ollama-models", MODEL)


def ollama_trial(store: Path, load: dict | None = None, **knobs: str) -> Trial:
    return Trial(model=MODEL, engine="ollama", vllm_cmd=FAKE_OLLAMA, max_model_len=2048,
                 env={"OLLAMA_MODELS": str(store), **knobs}, load=load, startup_timeout_s=60,
                 request_timeout_s=60)  # fmt: skip


def _server(store: Path, run_dir: Path, **knobs: str) -> VllmServer:
    server = VllmServer(ollama_trial(store, **knobs), run_dir)
    assert server.start().outcome == "ready"
    return server


def _clean(levels: list[dict]) -> None:
    for lv in levels:
        assert not lv["problems"], lv["problems"]
        assert lv["completed"] == lv["requests"] and lv["failed"] == 0
        assert lv["output_tokens_per_s"] > 0 and lv["ttft_ms"]["p50"] is not None
        # Ollama serves no /health and no /metrics: said, never failed or made up
        assert lv["health_after"] == NOT_CHECKABLE
        assert lv["kv_cache_usage_max"] is None and lv["preemptions"] is None and lv["waiting_max"] is None


def test_a_load_trial_on_ollama_runs_its_levels_with_counted_prompt_tokens(store, run_dir):
    load = {"concurrency": [1, 2], "requests": 4, **SMALL}
    rec = run_trial(ollama_trial(store, load=load), run_dir, long=False)
    assert (rec["outcome"], rec["backend"]) == ("ready", "fake")
    assert rec["load_stable"] is True, rec["load_reason"]
    out = rec["load"]
    assert [lv["concurrency"] for lv in out["levels"]] == [1, 2]
    _clean(out["levels"])
    for lv in out["levels"]:
        assert lv["output_tokens"] == 4 * 8 and lv["ended_early"] == 0
        assert lv["prompt_tokens_counted"] == {"mean": 48.0, "min": 48, "max": 48}  # a token a word there
    p = out["prompts"]
    assert (p["kind"], p["asked_tokens"], p["aimed_tokens"], p["words"]) == ("text", 48, 48, 48)
    assert p["counted"] == {"mean": 48.0, "min": 48, "max": 48}
    assert "text prompts of 48 words, calibrated to 48 tokens" in rec["load_reason"]
    assert "exact" not in rec["load_reason"]
    assert rec["load_output_tokens_per_s"] > 0 and rec["load_concurrency"] in (1, 2)


def test_vllm_lab_load_against_a_running_ollama_tells_it_and_sends_text(store, run_dir):
    with _server(store, run_dir) as server:
        args = ["load", "--url", server.base_url, "--model", MODEL, "--concurrency", "1,2", "--requests", "3",
                "--prompt-tokens", "40", "--output-tokens", "6"]  # fmt: skip
        cli = [sys.executable, "-m", "vllm_lab.cli"]
        js = subprocess.run([*cli, *args, "--json"], capture_output=True, text=True, timeout=120)
        human = subprocess.run([*cli, *args], capture_output=True, text=True, timeout=120)
    assert js.returncode == 0, js.stdout[-2000:] + js.stderr[-2000:]
    out = json.loads(js.stdout)
    assert out["stable"] is True and out["prompts"]["kind"] == "text"
    _clean(out["levels"])
    assert [lv["prompt_tokens_counted"]["min"] for lv in out["levels"]] == [40, 40]
    assert human.returncode == 0, human.stderr[-2000:]
    assert "prompts: text prompts of 40 words, calibrated to 40 tokens, counted by the server" in human.stdout


def test_a_prompt_cut_silently_makes_the_level_not_clean(store, run_dir):
    with _server(store, run_dir, FAKE_OLLAMA_TRUNCATE_AT="300") as server:
        res = run_load(server.base_url, MODEL, LoadSpec(concurrency=(1, 2), requests=2, prompt_tokens=400,
                       output_tokens=4, request_timeout_s=30.0), engine="ollama")  # fmt: skip
    assert res.stable is False and len(res.levels) == 1  # the calibration (short prompts) was not cut
    lv = res.levels[0]
    assert [p["kind"] for p in lv["problems"]] == ["truncated"]
    assert lv["errors_by_kind"] == {"truncated": 2} and lv["prompt_tokens_counted"]["min"] == 150
    assert "2 of 2 prompts at concurrency 1 were cut silently" in res.reason
    assert "150 prompt tokens of the 400 sent" in res.reason and "1 higher level(s) not run" in res.reason
    assert res.prompts["aimed_tokens"] == 400 and res.prompts["counted"]["max"] == 150


def test_an_output_that_ends_at_eos_is_complete_on_ollama(store, run_dir):
    """Ollama takes no ignore_eos: max_tokens is an upper bound, and a stream that stops is no failure."""
    with _server(store, run_dir, FAKE_OLLAMA_EOS_AT="3") as server:
        res = run_load(
            server.base_url, MODEL, LoadSpec(concurrency=(2,), requests=4, **SMALL), engine="ollama"
        )
    assert res.stable is True, res.reason
    assert res.levels[0]["output_tokens"] == 4 * 3 and res.levels[0]["completed"] == 4
    assert res.levels[0]["ended_early"] == 4 and "4 output(s) ended at EOS before 8 tokens" in res.reason


def test_text_prompts_are_unique_per_request_and_per_run():
    spec = LoadSpec(**SMALL)
    a = _Load("http://127.0.0.1:9", MODEL, spec, None, None, None, None, "ollama")
    b = _Load("http://127.0.0.1:9", MODEL, spec, None, None, None, None, "ollama")
    a.words = b.words = 48
    head = prompt_text.head_words(PROMPT_NUMBERS)
    first = [" ".join(a._body()["prompt"].split()[:head]) for _ in range(300)]
    assert len(set(first)) == 300  # no two share their first words (the prefix a cache would reuse)
    assert a._body()["prompt"].split()[:head] != b._body()["prompt"].split()[:head]  # nor two runs
    assert all(len(a._body()["prompt"].split()) == 48 for _ in range(5))
    # one word list for the load and Ollama's own long request
    assert ollama_check._text is prompt_text.text
    assert engines.get("ollama").load_prompts == "text" and engines.get("vllm").load_prompts == "token_ids"
