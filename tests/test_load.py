"""load.py: `vllm-lab load` and run_load, on the fake vLLM (each load fault) and once on the real CPU build.

The fake streams as vLLM 0.32 does and counts what runs on /metrics; its load faults (die_mid_load,
error_chunks_after, stall_after) begin after FAKE_VLLM_FAULT_AFTER clean streams, the load's first (uncounted)
request among them. Every launch goes through
the launcher (VllmServer), and conftest's no_leftover_vllm checks that nothing it started survives a test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import REAL_CMD, TINY_MODEL, fake_env, fake_trial
from vllm_lab import cli
from vllm_lab.launcher import VllmServer
from vllm_lab.load import LoadSpec, knee, run_load
from vllm_lab.probe import parse_metrics
from vllm_lab.spec import SpecError, Trial


def _level(c: int, tps: float, ttft_p90: float = 10.0) -> dict:
    return {
        "concurrency": c,
        "output_tokens_per_s": tps,
        "ttft_ms": {"p50": 1.0, "p90": ttft_p90, "p99": 1.0},
    }


# ---------------------------------------------------------------------------------------------- the spec


def test_spec_from_params_takes_a_plan_mapping_and_the_cli_string():
    spec = LoadSpec.from_params(
        {"concurrency": [1, 2, 4], "requests": 8, "prompt_tokens": 64, "output_tokens": 16}
    )
    assert spec.concurrency == (1, 2, 4) and spec.requests == 8 and spec.duration_s is None
    assert LoadSpec.from_params({"concurrency": "1,2,8"}).concurrency == (1, 2, 8)
    timed = LoadSpec.from_params({"duration_s": 5})
    assert timed.requests is None and timed.duration_s == 5
    assert LoadSpec(duration_s=5).requests is None  # the default count gives way to a duration
    assert LoadSpec.from_params(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "value, names",
    [
        ({"concurrency": [2, 1]}, "concurrency"),
        ({"concurrency": [0, 1]}, "concurrency"),
        ({"concurrency": "1,x"}, "concurrency"),
        ({"concurrency": []}, "concurrency"),
        ({"requests": 0}, "requests"),
        ({"requests": 4, "duration_s": 3}, "one of them"),
        ({"output_tokens": 2.5}, "output_tokens"),
        ({"slo_ttft_ms": -1}, "slo_ttft_ms"),
        ({"request_timeout_s": 0}, "request_timeout_s"),
        ({"concurency": [1]}, "unknown key(s) concurency"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_spec_is_one_line_naming_the_field(value, names):
    with pytest.raises(SpecError) as e:
        LoadSpec.from_params(value, where="LOAD")
    msg = str(e.value)
    assert names in msg and msg.startswith("LOAD") and "\n" not in msg


# ---------------------------------------------------------------------------------------------- the knee


def test_knee_is_where_throughput_stops_growing():
    c, why = knee([_level(1, 100), _level(2, 190), _level(4, 200), _level(8, 205)])
    assert c == 2 and "190" in why and "205" in why and "every later level" in why, why


def test_one_noisy_level_is_not_a_knee():
    """A dip at 4, then growth again at 8: growth did not stay flat, so no --max-num-seqs hint from it."""
    c, why = knee([_level(1, 100), _level(2, 190), _level(4, 200), _level(8, 400)])
    assert c is None and "8" in why, why


def test_the_knee_threshold_scales_with_the_concurrency_ratio():
    # 10 -> 11 users with perfect scaling is +10%: that is growth, not a knee
    assert knee([_level(10, 100), _level(11, 110)])[0] is None
    assert knee([_level(10, 100), _level(11, 100.2)])[0] == 10  # flat for one more user
    # 1 -> 4 users for +25% is far below what four users should give: flat
    assert knee([_level(1, 100), _level(4, 120)])[0] == 1
    assert knee([_level(1, 100), _level(2, 130)])[0] is None  # +30% for twice the users still grows


def test_knee_is_the_last_level_within_the_ttft_slo():
    c, why = knee([_level(1, 100, 50), _level(2, 190, 80), _level(4, 380, 300)], slo_ttft_ms=100)
    assert c == 2 and "300" in why and "SLO 100" in why


def test_no_knee_when_even_one_user_misses_the_slo_or_throughput_still_grows():
    assert knee([_level(1, 100, 500), _level(2, 190, 600)], slo_ttft_ms=100)[0] is None
    c, why = knee([_level(1, 100), _level(2, 190), _level(4, 380)])
    assert c is None and "still grows" in why and "4" in why
    assert knee([]) == (None, None)


def test_parse_metrics_reads_the_fake_and_older_names():
    page = 'vllm:gpu_cache_usage_perc{model_name="m"} 0.5\nvllm:num_preemptions_total{engine="0"} 3.0\n'
    assert parse_metrics(page) == {"vllm:gpu_cache_usage_perc": 0.5, "vllm:num_preemptions_total": 3.0}


def test_the_records_metrics_combine_data_parallel_engines():
    """Before: the record kept the last engine listed (preemptions on engine 0 showed as 0)."""
    page = ('vllm:num_preemptions_total{engine="0"} 3.0\nvllm:num_preemptions_total{engine="1"} 0.0\n'
            'vllm:kv_cache_usage_perc{engine="0"} 0.9\nvllm:kv_cache_usage_perc{engine="1"} 0.2\n'
            'vllm:num_requests_running{engine="0"} 2\nvllm:num_requests_running{engine="1"} 1\n')  # fmt: skip
    got = parse_metrics(page)
    assert got["vllm:num_preemptions_total"] == 3.0 and got["vllm:num_requests_running"] == 3.0
    assert got["vllm:kv_cache_usage_perc"] == 0.9


# ---------------------------------------------------------------------------------------------- bad input


def test_only_loopback_targets(monkeypatch):
    with pytest.raises(SpecError, match="loopback"):
        run_load("http://10.1.2.3:8000", "m", LoadSpec())
    assert cli.main(["load", "--url", "http://example.com:8000", "--model", "m"]) == 2


def test_unreachable_server_and_bad_levels_exit_2(capsys):
    assert (
        cli.main(
            ["load", "--url", "http://127.0.0.1:9", "--model", "m", "--concurrency", "1", "--requests", "1"]
        )
        == 2
    )
    assert "cannot reach http://127.0.0.1:9" in capsys.readouterr().err
    assert cli.main(["load", "--url", "http://127.0.0.1:9", "--model", "m", "--concurrency", "4,2"]) == 2
    assert "increasing" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- on the fake

SMALL = {"prompt_tokens": 16, "output_tokens": 8, "request_timeout_s": 20.0}


def _fake_server(model, run_dir, **knobs) -> VllmServer:
    server = VllmServer(fake_trial(model, env=fake_env(**knobs)), run_dir)
    assert server.start().outcome == "ready"
    return server


def _load(server: VllmServer, model, **spec) -> dict:
    res = run_load(server.base_url, str(model), LoadSpec(**{**SMALL, **spec}), log_path=server._raw_log,
                   server_alive=server.alive)  # fmt: skip
    return res.to_dict()


def test_a_clean_load_is_stable_with_every_figure(fake_model, run_dir, capsys):
    with _fake_server(fake_model, run_dir) as server:
        rc = cli.main(["load", "--url", server.base_url, "--model", str(fake_model), "--concurrency", "1,2",
                       "--requests", "5", "--prompt-tokens", "16", "--output-tokens", "8", "--json"])  # fmt: skip
        out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["stable"] is True, out["reason"]
    assert [lv["concurrency"] for lv in out["levels"]] == [1, 2]
    for lv in out["levels"]:
        assert (lv["requests"], lv["completed"], lv["failed"], lv["errors_in_stream"]) == (5, 5, 0, 0)
        assert lv["output_tokens"] == 40 and lv["output_tokens_per_s"] > 0 and lv["requests_per_s"] > 0
        assert set(lv["ttft_ms"]) == {"p50", "p90", "p99"} and lv["e2e_ms"]["p99"] >= lv["ttft_ms"]["p50"]
        assert lv["itl_ms"]["p50"] is not None
        assert lv["preemptions"] == 0 and lv["health_after"] == 200 and lv["kv_cache_usage_max"] is not None
    assert "10 requests over 2 level(s) completed" in out["reason"]
    assert set(out) >= {"url", "model", "levels", "stable", "reason", "knee_concurrency"}


def test_run_load_works_where_a_loop_already_runs(fake_model, run_dir):
    """A Jupyter kernel (papermill's too) runs an asyncio loop in the caller's thread."""

    async def cell():
        return run_load(server.base_url, str(fake_model), LoadSpec(concurrency=(2,), requests=2, **SMALL))

    with _fake_server(fake_model, run_dir) as server:
        res = asyncio.run(cell())
    assert res.stable is True, res.reason


def test_a_load_by_duration_sends_until_the_time_is_up(fake_model, run_dir):
    with _fake_server(fake_model, run_dir, token_s=0.01) as server:
        out = _load(server, fake_model, concurrency=(2,), requests=None, duration_s=1.0)
    lv = out["levels"][0]
    assert out["stable"] is True, out["reason"]
    assert lv["requests"] >= 2 and lv["completed"] == lv["requests"]  # 8 tokens x 10 ms a request: about 20


def test_the_queue_shows_when_users_outnumber_the_servers_seats(fake_model, run_dir):
    """The fake serves two streams at once (as --max-num-seqs 2): at 4 users two wait, and /metrics says so.
    (Where the knee falls is timing; the rule itself is tested above on fixed figures.)"""
    with _fake_server(fake_model, run_dir, token_s=0.02, max_seqs=2) as server:
        out = _load(server, fake_model, concurrency=(1, 4), requests=8, output_tokens=20)
    assert out["stable"] is True, out["reason"]
    assert out["levels"][1]["waiting_max"] >= 1 and out["levels"][1]["running_max"] <= 2
    assert out["levels"][0]["waiting_max"] == 0


def test_preemptions_are_counted_not_failures(fake_model, run_dir):
    """A 1024-token KV cache, four streams of 300 tokens at once: preempted (counted), all served."""
    trial = fake_trial(fake_model, max_model_len=512, kv_cache_memory_bytes=2**19, env=fake_env(token_s=0.01))
    with VllmServer(trial, run_dir) as server:
        assert server.start().outcome == "ready"
        res = run_load(server.base_url, str(fake_model), LoadSpec(concurrency=(4,), requests=4, prompt_tokens=200,
                       output_tokens=100), server_alive=server.alive)  # fmt: skip
    assert res.stable is True, res.reason
    assert res.levels[0]["preemptions"] >= 1 and "preemption(s), not failures" in res.reason


def test_a_server_dying_mid_load_is_a_verdict_with_counts(fake_model, run_dir):
    with _fake_server(fake_model, run_dir, scenario="die_mid_load", fault_after=5) as server:
        out = _load(server, fake_model, concurrency=(1, 2), requests=6)
        assert not server.alive()
    assert out["stable"] is False and len(out["levels"]) == 1, out  # the level above is not run
    lv = out["levels"][0]
    assert (lv["completed"], lv["requests"]) in ((4, 5), (4, 6)), lv
    assert lv["failed"] == lv["requests"] - 4 and lv["health_after"] is None, lv
    assert "the server process ended during the load at concurrency 1" in out["reason"], out["reason"]
    assert "cuda_oom" in out["reason"], out["reason"]  # the engine's own cause, from its log
    assert "1 higher level(s) not run" in out["reason"], out["reason"]


def test_error_chunks_after_k_requests_are_not_stable(fake_model, run_dir):
    with _fake_server(fake_model, run_dir, scenario="error_chunks_after", fault_after=4) as server:
        out = _load(server, fake_model, concurrency=(1, 2), requests=5)
    lv = out["levels"][0]
    assert out["stable"] is False and len(out["levels"]) == 1
    assert (lv["completed"], lv["failed"], lv["errors_in_stream"]) == (3, 2, 2)
    assert "2 of 5 streams at concurrency 1 ended in an error chunk" in out["reason"]
    assert "EngineCore encountered an issue" in out["reason"]  # the chunk's message and the log's line


def test_a_stream_that_stops_meets_the_request_deadline(fake_model, run_dir):
    with _fake_server(fake_model, run_dir, scenario="stall_after", fault_after=3) as server:
        out = _load(server, fake_model, concurrency=(2,), requests=4, request_timeout_s=3.0)
    lv = out["levels"][0]
    assert out["stable"] is False
    assert (lv["requests"], lv["completed"], lv["failed"]) == (4, 2, 2)
    assert "no [DONE] within 3 s" in out["reason"]


def test_a_wrong_model_name_or_key_is_bad_input_before_any_request(fake_model, run_dir, capsys):
    trial = fake_trial(fake_model, extra_args=["--api-key", "sekrit-123"])
    with VllmServer(trial, run_dir) as server:
        assert server.start().outcome == "ready"
        base = ["load", "--url", server.base_url, "--concurrency", "1", "--requests", "1"]
        assert cli.main([*base, "--model", str(fake_model)]) == 2
        assert "refused the key (HTTP 401)" in capsys.readouterr().err
        assert cli.main([*base, "--model", "other", "--api-key", "sekrit-123"]) == 2
        err = capsys.readouterr().err
        assert "'other' is not served" in err and "sekrit" not in err
        assert cli.main([*base, "--model", str(fake_model), "--api-key", "sekrit-123"]) == 0


def test_a_first_request_the_server_cannot_take_is_bad_input(fake_model, run_dir, capsys):
    """Too long for max_model_len (the model card says so before any request), or token ids beyond the
    vocabulary (an error chunk in 0.32)."""
    with _fake_server(fake_model, run_dir) as server:
        base = [
            "load",
            "--url",
            server.base_url,
            "--model",
            str(fake_model),
            "--concurrency",
            "1",
            "--requests",
            "1",
        ]
        assert cli.main([*base, "--prompt-tokens", "2000"]) == 2
        err = capsys.readouterr().err
        assert (
            "--prompt-tokens 2000 + --output-tokens 32 = 2032 tokens pass the server's max_model_len 1024"
            in err
        )
        assert cli.main([*base, "--vocab-size", "5000"]) == 2
        err = capsys.readouterr().err
        assert "is out of vocabulary" in err and "give --vocab-size" in err
        assert cli.main(base) == 0  # the default: vocab_size (1000) from the model folder's config.json


@pytest.mark.parametrize(("version", "words"), [
    ("0.27.0", "refused the first request (HTTP 400: This model's maximum context length"),
    ("0.32.0", "the first request got 24 of 100 output tokens and no error: the server cuts requests short"),
])  # fmt: skip
def test_too_long_without_a_model_card_limit_is_bad_input_as_each_version_answers(
    fake_model, run_dir, capsys, version, words
):
    """A server whose /v1/models does not say its max_model_len: 0.27 refuses a longer request, 0.32 serves
    what fits and stops (finish_reason length, no error; seen on the CPU builds). Neither is instability."""
    with _fake_server(fake_model, run_dir, version=version, card_len=0) as server:
        rc = cli.main(["load", "--url", server.base_url, "--model", str(fake_model), "--concurrency", "1", "--requests", "1",
                       "--prompt-tokens", "1000", "--output-tokens", "100"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err


def _running(base_url: str) -> float | None:
    try:
        return parse_metrics(httpx.get(f"{base_url}/metrics", timeout=5).text).get(
            "vllm:num_requests_running"
        )
    except httpx.HTTPError:
        return None


def _wait_idle(base_url: str) -> float | None:
    """The fake's running streams once the client has hung up (it notices at its next token)."""
    for _ in range(50):
        n = _running(base_url)
        if n == 0:
            return n
        time.sleep(0.1)
    return _running(base_url)


def test_ctrl_c_of_the_cli_prints_the_verdict_and_leaves_nothing_running(fake_model, run_dir):
    with _fake_server(fake_model, run_dir, token_s=0.05) as server:
        cmd = [sys.executable, "-m", "vllm_lab.cli", "load", "--url", server.base_url, "--model", str(fake_model),
               "--concurrency", "1,2", "--requests", "4", "--output-tokens", "40", "--json"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(100):  # until the load is under way: a stream is running
            if _running(server.base_url):
                break
            time.sleep(0.1)
        time.sleep(3)  # the first (uncounted) request takes 2 s, then concurrency 1 takes 2 s a request
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        res = json.loads(out)
        assert res["interrupted"] is True and res["stable"] is False
        assert res["reason"].startswith("interrupted (Ctrl-C)")
        if res["levels"]:  # a stalled box may still be in the first, uncounted request
            assert res["reason"].startswith("interrupted (Ctrl-C) at concurrency 1")
            assert res["levels"][-1]["interrupted"] is True and res["levels"][-1]["completed"] < 4
        assert _wait_idle(server.base_url) == 0  # every stream it opened was closed
        assert server.alive()


def test_ctrl_c_in_process_returns_what_was_measured(fake_model, run_dir):
    """As in a notebook kernel: KeyboardInterrupt in the caller's thread cancels the load's own loop."""
    with _fake_server(fake_model, run_dir, token_s=0.05) as server:
        timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT))  # the first request takes 1 s
        timer.start()
        try:
            res = run_load(
                server.base_url, str(fake_model), LoadSpec(concurrency=(2,), requests=20, output_tokens=20)
            )
        finally:
            timer.cancel()
        assert res.interrupted is True and res.stable is False and "interrupted (Ctrl-C)" in res.reason
        assert not res.levels or res.levels[0]["requests"] < 20
        assert [t.name for t in threading.enumerate() if t.name == "vllm-lab-load"] == []
        assert _wait_idle(server.base_url) == 0


# ---------------------------------------------------------------------------------------------- the real build


@pytest.mark.vllm
def test_a_real_load_on_the_cpu_build(run_dir):
    trial = Trial(model=str(TINY_MODEL), vllm_cmd=REAL_CMD, max_model_len=512, kv_cache_memory_bytes=8 * 2**20,
                  extra_args=["--enforce-eager"], env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
                  startup_timeout_s=300)  # fmt: skip
    with VllmServer(trial, run_dir) as server:
        res = server.start()
        assert res.outcome == "ready", res.evidence
        out = run_load(server.base_url, str(TINY_MODEL), LoadSpec(concurrency=(1, 2), requests=4, prompt_tokens=32,
                       output_tokens=16, request_timeout_s=120), log_path=server._raw_log,
                       server_alive=server.alive, vocab_size=512).to_dict()  # fmt: skip
        assert server.alive()
    assert out["stable"] is True, out["reason"]
    for lv in out["levels"]:
        assert (lv["completed"], lv["failed"], lv["output_tokens"]) == (4, 0, 64)
        assert lv["ttft_ms"]["p50"] > 0 and lv["output_tokens_per_s"] > 0
        assert (
            lv["kv_cache_usage_max"] is not None and lv["health_after"] == 200
        )  # /metrics of the real server
        assert lv["preemptions"] is not None
        assert lv["prefix_cache_hits"] == 0, lv  # no prompt of the load repeats a cached block


# ---------------------------------------------------------------------------------------------- issue 22


def _standalone_fake(model, *args, **knobs) -> tuple[subprocess.Popen, str]:
    """The fake started as a user starts a server (not through the launcher, whose readiness needs /health
    200 over http): its own session, our knobs; the url it serves."""
    from vllm_lab.launcher import free_port

    port = free_port()
    env = {**os.environ, **fake_env(start_delay=0, **knobs)}
    cmd = [sys.executable, "-m", "vllm_lab.testing.fake_vllm", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", "1024", "--kv-cache-memory-bytes", str(8 * 2**20), *args]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    scheme = "https" if "--ssl-certfile" in args else "http"
    url = f"{scheme}://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/v1/models", timeout=2, verify=False).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    _stop(proc)
    raise AssertionError("the fake did not start")


def _stop(proc: subprocess.Popen) -> None:
    """The fake and its engine child: their whole session."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _metric_sums(base_url: str) -> dict:
    """Each vllm: series summed over its label sets (every engine), as the test reads /metrics itself."""
    out: dict = {}
    for line in httpx.get(f"{base_url}/metrics", timeout=5).text.splitlines():
        if line.startswith("vllm:"):
            name, value = line.split("{")[0], float(line.rsplit(" ", 1)[1])
            out[name] = out.get(name, 0.0) + value
    return out


@pytest.mark.parametrize(
    "value", [{"concurrency": [2, 8], "requests": 4}, {"concurrency": "1,16", "requests": 8}]
)
def test_fewer_requests_than_the_highest_concurrency_is_refused(value):
    """A level of 8 users with 4 requests never has 8 streams in flight: refused, in one line (plans too)."""
    from vllm_lab.steps import load_params

    for call, where in ((lambda: LoadSpec.from_params(value, where="vllm-lab load"), "vllm-lab load"),
                        (lambda: load_params(value), "LOAD")):  # fmt: skip
        with pytest.raises(SpecError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith(f"{where}.requests") and "highest concurrency" in msg and "\n" not in msg, msg
    # no count given: each level gets at least as many requests as its users
    assert LoadSpec.from_params({"concurrency": [1, 16]}).requests == 16
    assert LoadSpec.from_params({"concurrency": [1, 2]}).requests == 8


def test_the_cli_refuses_a_level_it_cannot_fill_before_any_request(fake_model, run_dir, capsys):
    with _fake_server(fake_model, run_dir) as server:
        rc = cli.main(["load", "--url", server.base_url, "--model", str(fake_model), "--concurrency", "2,8",
                       "--requests", "4"])  # fmt: skip
        sent = _metric_sums(server.base_url)["vllm:prefix_cache_queries_total"]
    err = capsys.readouterr().err
    assert rc == 2 and "at least the highest concurrency (8)" in err and len(err.strip().splitlines()) == 1, (
        err
    )
    assert sent == 0  # not one prompt reached the server


def test_a_server_without_health_is_stable_when_every_request_succeeds(fake_model):
    proc, url = _standalone_fake(fake_model, health=404)
    try:
        res = run_load(url, str(fake_model), LoadSpec(concurrency=(1, 2), requests=3, **SMALL))
    finally:
        _stop(proc)
    assert res.stable is True, res.reason
    assert [lv["health_after"] for lv in res.levels] == ["not checkable", "not checkable"]
    assert "/health not checkable (HTTP 404)" in res.reason and "/health 200" not in res.reason


def _frontier_of(model: str, out: dict):
    from vllm_lab import load_report, record

    rec = record.new_record(run_id="r", step="s", trial_id="s-head-len1024-abcd", backend="fake", launcher="head",
                            max_model_len=1024, kv_cache_memory_bytes=8 * 2**20, outcome="unstable", model=model,
                            long_request_ok=True, load=out, load_stable=out["stable"], load_reason=out["reason"])  # fmt: skip
    return load_report.frontier(__import__("pandas").DataFrame([rec])).iloc[0]


def test_the_frontier_does_not_count_a_level_after_which_health_fails(fake_model, run_dir):
    """Every stream of concurrency 2 completes, then /health answers 503: not stable, and not served cleanly."""
    with _fake_server(fake_model, run_dir, scenario="unhealthy_after", fault_after=6) as server:
        out = _load(server, fake_model, concurrency=(1, 2, 4), requests=4)
    assert out["stable"] is False and [lv["health_after"] for lv in out["levels"]] == [200, 503], out
    assert (out["levels"][1]["completed"], out["levels"][1]["failed"]) == (4, 0)
    row = _frontier_of(str(fake_model), out)
    assert row["concurrent users (served cleanly)"] == 1, row.to_dict()


def test_the_frontier_does_not_count_a_level_with_a_fatal_log_line(fake_model, run_dir, tmp_path):
    log = tmp_path / "server.log"
    log.write_text("INFO: started\n")

    def oom() -> None:  # the engine's own cause, written while the load runs (every request succeeds)
        with open(log, "a") as f:
            f.write("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.\n")

    with _fake_server(fake_model, run_dir, token_s=0.05) as server:
        spec = LoadSpec(concurrency=(1, 2), requests=2, **SMALL)
        timer = threading.Timer(0.2, oom)  # the first (uncounted) request alone takes 0.4 s
        timer.start()
        res = run_load(server.base_url, str(fake_model), spec, log_path=log, server_alive=server.alive)
        timer.join()
    assert res.stable is False and "cuda_oom" in res.reason
    assert _frontier_of(str(fake_model), res.to_dict())["concurrent users (served cleanly)"] == 0


def test_several_engines_metrics_are_combined(fake_model, run_dir):
    """--data-parallel-size 2: each series once per engine. Queues and counters are summed, KV is the max."""
    trial = fake_trial(fake_model, max_model_len=512, kv_cache_memory_bytes=2**19,
                       env=fake_env(token_s=0.01, engines=2))  # fmt: skip
    with VllmServer(trial, run_dir) as server:
        assert server.start().outcome == "ready"
        res = run_load(server.base_url, str(fake_model), LoadSpec(concurrency=(6,), requests=6, prompt_tokens=400,
                       output_tokens=100), server_alive=server.alive)  # fmt: skip
        page = httpx.get(f"{server.base_url}/metrics", timeout=5).text
    per_engine = [float(line.rsplit(" ", 1)[1]) for line in page.splitlines()
                  if line.startswith("vllm:num_preemptions_total")]  # fmt: skip
    assert len(per_engine) == 2 and all(p >= 1 for p in per_engine), page  # each engine preempted
    lv = res.levels[0]
    assert res.stable is True, res.reason
    assert lv["preemptions"] == sum(per_engine), lv
    assert lv["running_max"] > 3, lv  # six streams over two engines; one engine alone runs three
    assert 0 < lv["kv_cache_usage_max"] <= 1.0


def test_prompts_never_repeat_within_a_load_or_across_levels(fake_model, run_dir):
    """A small stated vocabulary (--vocab-size 20): the prompts must still differ, or the prefix cache serves
    later requests for free."""
    with _fake_server(fake_model, run_dir) as server:
        out = run_load(server.base_url, str(fake_model), LoadSpec(concurrency=(1, 4), requests=12, prompt_tokens=48,
                       output_tokens=4), vocab_size=20).to_dict()  # fmt: skip
        hits = _metric_sums(server.base_url)["vllm:prefix_cache_hits_total"]
    assert out["stable"] is True, out["reason"]
    assert hits == 0 and [lv["prefix_cache_hits"] for lv in out["levels"]] == [0, 0]


def test_prompt_ids_stay_distinct_over_a_long_run():
    """Thousands of prompts from the smallest assumed vocabulary (1000 ids) never repeat their first block."""
    from vllm_lab.load import _Load

    load = _Load("http://127.0.0.1:1", "m", LoadSpec(prompt_tokens=16), None, None, None, 1000)
    firsts = {tuple(load._body()["prompt"]) for _ in range(5000)}
    assert len(firsts) == 5000
    assert all(3 <= t < 1000 for p in firsts for t in p)


def test_a_served_model_name_takes_its_vocabulary_from_the_model_card(tmp_path, run_dir):
    """vLLM's model card names the model it serves (root): its config.json says the vocabulary, here 64 ids."""
    from conftest import FAKE_MODEL_CONFIG

    model = tmp_path / "small-vocab"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**FAKE_MODEL_CONFIG, "vocab_size": 64}))
    trial = fake_trial(model, extra_args=["--served-model-name", "tiny"], env=fake_env(version="0.32.0"))
    with VllmServer(trial, run_dir) as server:
        assert server.start().outcome == "ready"
        rc = cli.main(["load", "--url", server.base_url, "--model", "tiny", "--requests", "4", "--prompt-tokens",
                       "64", "--output-tokens", "4"])  # fmt: skip
    assert rc == 0


def test_the_urls_users_paste_work(fake_model, run_dir, capsys):
    with _fake_server(fake_model, run_dir) as server:
        port = server.base_url.rsplit(":", 1)[1]
        for url in (f"http://0.0.0.0:{port}", f"localhost:{port}", f"127.0.0.1:{port}", f"{server.base_url}/v1",
                    f"http://localhost:{port}/v1/"):  # fmt: skip
            rc = cli.main(["load", "--url", url, "--model", str(fake_model), "--concurrency", "1",
                           "--requests", "1", "--output-tokens", "4", "--json"])  # fmt: skip
            out = capsys.readouterr()
            assert rc == 0, (url, out.err)
            assert (
                json.loads(out.out)["url"]
                == f"http://{'localhost' if 'localhost' in url else '127.0.0.1'}:{port}"
            )
        rc = cli.main(["load", "--url", f"{server.base_url}/v1/completions", "--model", str(fake_model)])
        err = capsys.readouterr().err
        tls = cli.main(
            ["load", "--url", server.base_url.replace("http", "https"), "--model", str(fake_model)]
        )
        err_tls = capsys.readouterr().err
    assert rc == 2 and "give the server's root" in err and f"--url {server.base_url}" in err, err
    assert len(err.strip().splitlines()) == 1
    assert tls == 2 and f"give --url {server.base_url}" in err_tls, err_tls


def test_a_self_signed_https_server_is_named_as_such(fake_model, tmp_path, capsys):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)  # fmt: skip
    proc, url = _standalone_fake(fake_model, "--ssl-keyfile", str(key), "--ssl-certfile", str(cert))
    try:
        rc = cli.main(
            ["load", "--url", url, "--model", str(fake_model), "--concurrency", "1", "--requests", "1"]
        )
        err = capsys.readouterr().err
        plain = cli.main(
            [
                "load",
                "--url",
                url.replace("https", "http"),
                "--model",
                str(fake_model),
                "--concurrency",
                "1",
                "--requests",
                "1",
            ]
        )
        err_plain = capsys.readouterr().err
    finally:
        _stop(proc)
    assert (
        rc == 2 and "self-signed" in err and "cannot reach" not in err and len(err.strip().splitlines()) == 1
    ), err
    assert plain == 2 and "https://" in err_plain, err_plain


def test_failures_carry_a_kind_and_the_json_a_schema_version(fake_model, run_dir, capsys):
    with _fake_server(fake_model, run_dir, scenario="error_chunks_after", fault_after=3) as server:
        rc = cli.main(["load", "--url", server.base_url, "--model", str(fake_model), "--concurrency", "1",
                       "--requests", "3", "--prompt-tokens", "16", "--output-tokens", "8", "--json", "--log",
                       str(server._raw_log)])  # fmt: skip
        out = json.loads(capsys.readouterr().out)
    assert rc == 1 and out["schema_version"] == 2
    lv = out["levels"][0]
    assert lv["first_error_kind"] == "error_chunk" and lv["errors_by_kind"] == {"error_chunk": 1}, lv
    assert [p["kind"] for p in lv["problems"]] == ["error_chunk", "fatal_log"], lv["problems"]


def test_a_llamacpp_servers_fatal_line_during_the_load_is_read_by_llamacpps_rules(tmp_path):
    """Before: the load read every log with vLLM's rules; llama.cpp's own KV failure line was no cause."""
    from vllm_lab.load import _Load

    log = tmp_path / "server.log"
    log.write_text(
        "llama_model_loader: loaded meta data with 24 key-value pairs and 27 tensors from /m/tiny.gguf\n"
    )
    load = _Load("http://127.0.0.1:9", "m", LoadSpec(), None, log, None, None, "llamacpp")
    with open(log, "a") as f:
        f.write(
            "llama_init_from_model: failed to initialize the context: failed to allocate buffer for kv cache\n"
        )
    assert load.fatal_log_line().startswith("kv_cache_oom: llama_init_from_model")
    told = _Load(
        "http://127.0.0.1:9", "m", LoadSpec(), None, log, None, None
    )  # no engine: told from the text
    told.log_offset = 0
    assert told.fatal_log_line().startswith("kv_cache_oom")


def test_a_stale_pooled_connection_is_sent_again_but_a_refused_one_is_not():
    """The CPU demo's llama.cpp load lost 1 of 8 requests to "Can not write request body" (ClientOSError): the
    server had closed the pooled connection after its last streamed response."""
    import aiohttp
    from vllm_lab.load import STALE_RETRIES, _one_request

    class Client:
        def __init__(self, errors):
            self.errors, self.calls = list(errors), 0

        async def post(self, url, json):
            self.calls += 1
            raise self.errors.pop(0) if self.errors else aiohttp.ClientConnectionError("gave up")

    stale = Client(
        [aiohttp.ClientOSError(None, "Can not write request body"), aiohttp.ServerDisconnectedError()]
    )
    body = {"max_tokens": 4, "prompt": [1, 2]}
    asyncio.run(_one_request(stale, "http://127.0.0.1:9/v1/completions", body, 4, 5))
    assert stale.calls == STALE_RETRIES + 1  # both stale errors were sent again
    refused = Client([aiohttp.ClientConnectorError(None, OSError(111, "refused"))])
    with contextlib.suppress(Exception):  # how it is reported is the caller's; here: sent once only
        asyncio.run(_one_request(refused, "http://127.0.0.1:9/v1/completions", body, 4, 5))
    assert refused.calls == 1
