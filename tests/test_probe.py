"""The probe's requests: what counts as a served full-length request, keys, served names, proxies.

Unit tests talk to a tiny in-process SSE server (canned vLLM streams, checked against vLLM 0.32's
completion stream generator); the fake tier runs whole trials against the fake vLLM.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import FAKE_CMD, fake_env
from vllm_lab import probe
from vllm_lab.probe import LONG_REQUEST_OUTPUT_TOKENS as OUT
from vllm_lab.probe import run_trial
from vllm_lab.spec import Trial

KEY = "probe-test-key-7f3a9c"  # no well-known token shape: only the flag or name can hide it


def chunk(text=" hi", finish=None) -> dict:
    return {"id": "cmpl-1", "object": "text_completion", "model": "m",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}  # fmt: skip


def usage(n: int) -> dict:
    return {"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [],
            "usage": {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n}}  # fmt: skip


def sse(*events) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


GOOD = sse(*[chunk() for _ in range(OUT - 1)], chunk(finish="length"), usage(OUT), "[DONE]")


class Canned:
    """One canned answer for every POST; remembers the requests it saw."""

    def __init__(self, body: bytes = GOOD, status: int = 200, ctype: str = "text/event-stream"):
        self.body, self.status, self.ctype = body, status, ctype
        self.seen: list[tuple[str, dict, dict]] = []
        canned = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _answer(self, body: bytes, status: int, ctype: str):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                canned.seen.append((self.path, dict(self.headers), req))
                if self.path == "/v1/chat/completions":
                    self._answer(json.dumps({"choices": [{"message": {"content": "hi"}}]}).encode(), 200,
                                 "application/json")  # fmt: skip
                else:
                    self._answer(canned.body, canned.status, canned.ctype)

            def do_GET(self):
                canned.seen.append((self.path, dict(self.headers), {}))
                self._answer(b'vllm:num_requests_running{engine="0"} 0.0\n', 200, "text/plain")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def long(self, **kw):
        return probe.long_request(self.url, "m", 64, 1000, 10, **kw)


@pytest.fixture
def canned():
    made = []

    def make(*a, **kw):
        made.append(Canned(*a, **kw))
        return made[-1]

    yield make
    for c in made:
        c.server.shutdown()


# ---- what counts as a served request (unit) -----------------------------------------------------------


@pytest.mark.unit
def test_a_full_stream_with_usage_and_done_is_served(canned):
    r = canned().long()
    assert (r.ok, r.tokens, r.output_tokens, r.error) == (True, 64, OUT, None)
    assert r.ttft_s is not None


@pytest.mark.unit
def test_an_error_chunk_before_done_is_not_served_and_names_the_error(canned):
    oom = "CUDA out of memory. Tried to allocate 2.00 GiB."
    err = {"error": {"message": oom, "type": "InternalServerError", "param": None, "code": 500}}
    r = canned(sse(err, "[DONE]")).long()
    assert r.ok is False and r.ttft_s is None  # the error's arrival is no first token
    assert r.error == f"ended with an error chunk: {oom}"
    # the pre-0.11 body inside the chunk, and an error after some tokens
    old = {
        "error": {"object": "error", "message": oom, "type": "BadRequestError", "param": None, "code": 400}
    }
    late = canned(sse(chunk(), old, "[DONE]")).long()
    assert late.ok is False and oom in late.error


@pytest.mark.unit
def test_fewer_output_tokens_than_asked_is_not_served(canned):
    r = canned(sse(chunk(finish="length"), usage(1), "[DONE]")).long()
    assert (r.ok, r.error) == (False, f"returned 1 of {OUT} output tokens")
    no_usage = canned(sse(*[chunk() for _ in range(OUT)], "[DONE]")).long()  # counted from the chunks
    assert no_usage.ok is True and no_usage.output_tokens == OUT


@pytest.mark.unit
def test_a_stream_without_done_is_not_served(canned):
    r = canned(sse(*[chunk() for _ in range(OUT)], usage(OUT))).long()
    assert r.ok is False and "no [DONE]" in r.error


@pytest.mark.unit
def test_ttft_is_the_first_chunk_with_a_token_not_the_first_line(canned):
    # vLLM's single-event answer when it does not stream (fake_stream_generator): usage rides on it
    whole = {**chunk(" hi" * OUT, finish="length"), "usage": usage(OUT)["usage"]}
    assert canned(sse(whole, "[DONE]")).long().ok is True
    c = canned(sse(usage(0), "[DONE]"))  # a usage-only chunk carries no token
    r = c.long()
    assert r.ok is False and r.ttft_s is None


@pytest.mark.unit
def test_refusals_are_named_with_vllms_message(canned):
    body = {"error": {"message": "The model `m` does not exist.", "type": "NotFoundError", "param": "model",
                      "code": 404}}  # fmt: skip
    r = canned(json.dumps(body).encode(), 404, "application/json").long()
    assert (r.ok, r.refused) == (False, True)
    assert r.error == "was refused: HTTP 404: The model `m` does not exist."
    r401 = canned(b'{"error":"Unauthorized"}', 401, "application/json").long()
    assert r401.error == "was refused: HTTP 401: Unauthorized"


@pytest.mark.unit
def test_requests_carry_the_key_and_the_model_name(canned):
    c = canned()
    assert c.long(api_key=KEY).ok
    assert probe.chat_ok(c.url, "m", 10, api_key=KEY) is True
    assert probe.read_metrics(c.url, api_key=KEY) == {"vllm:num_requests_running": 0.0}
    assert [h.get("Authorization") for _, h, _ in c.seen] == [f"Bearer {KEY}"] * 3
    assert c.seen[0][2]["model"] == "m" and c.seen[0][2]["stream_options"] == {"include_usage": True}
    assert c.seen[0][2]["ignore_eos"] is True and c.seen[0][2]["max_tokens"] == OUT
    probe.long_request(c.url, "m", 64, 1000, 10)
    assert "Authorization" not in c.seen[-1][1]  # no key, no header


@pytest.mark.unit
def test_loopback_requests_ignore_proxy_settings(canned, monkeypatch):
    dead = "http://127.0.0.1:9"  # nothing listens there: a request through the proxy fails
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, dead)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    c = canned()
    assert c.long().ok is True
    assert probe.chat_ok(c.url, "m", 10) is True
    assert probe.read_metrics(c.url) != {}
    assert probe._loopback("http://127.0.0.1:8000") and probe._loopback("http://[::1]:8000")
    assert probe._loopback("http://localhost:1") and not probe._loopback("http://10.0.0.5:8000")


@pytest.mark.unit
def test_trial_key_and_served_name_come_from_its_args_and_env(monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    t = Trial(model="/m", extra_args=["--api-key", KEY, "other", "--served-model-name", "a", "b", "--x"])
    assert (t.api_key(), t.served_model_name()) == (KEY, "a")
    assert Trial(model="/m", extra_args=[f"--api-key={KEY}"]).api_key() == KEY
    assert Trial(model="/m", env={"VLLM_API_KEY": "e"}).api_key() == "e"
    assert Trial(model="/m", env={"VLLM_API_KEY": "e"}, extra_args=["--api-key", "f"]).api_key() == "f"
    monkeypatch.setenv("VLLM_API_KEY", "inherited")  # the server inherits the launcher's environment
    assert Trial(model="/m").api_key() == "inherited"
    assert Trial(model="/m").served_model_name() == "/m"


# ---- whole trials against the fake vLLM -------------------------------------------------------------


def fake_trial(model, **kw) -> Trial:
    kw.setdefault("max_model_len", 1024)
    kw.setdefault("kv_cache_memory_bytes", 8 * 2**20)
    kw.setdefault("startup_timeout_s", 30)
    kw.setdefault("request_timeout_s", 15)
    return Trial(model=str(model), vllm_cmd=FAKE_CMD, **kw)


def no_key_anywhere(rec: dict) -> None:
    assert KEY not in json.dumps(rec)
    assert KEY not in Path(rec["log_path"]).read_text()


@pytest.mark.fake
def test_error_chunk_at_full_length_is_unstable_not_ready(fake_model, run_dir):
    rec = run_trial(fake_trial(fake_model, env=fake_env(scenario="error_chunk")), run_dir)
    assert rec["chat_ok"] is True  # short requests are served
    assert (rec["outcome"], rec["long_request_ok"], rec["ttft_s"]) == ("unstable", False, None)
    assert rec["evidence"].startswith(
        "a request of 1024 tokens ended with an error chunk: CUDA out of memory"
    )
    assert "--max-model-len" in rec["remedy"]


@pytest.mark.fake
@pytest.mark.parametrize("version", ["0.10.2", "0.32.0"])  # flat error bodies before 0.11, wrapped after
def test_api_key_and_served_name_are_used_by_every_request(fake_model, run_dir, version, monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    t = fake_trial(fake_model, extra_args=["--api-key", KEY, "--served-model-name", "qwen", "qwen-alias"],
                   env=fake_env(version=version))  # fmt: skip
    rec = run_trial(t, run_dir)
    assert (rec["outcome"], rec["chat_ok"], rec["long_request_ok"]) == ("ready", True, True), rec["evidence"]
    assert rec["served_max_model_len"] == 1024  # /v1/models answered with the key
    assert rec["metrics"] and rec["ttft_s"] is not None
    no_key_anywhere(rec)


@pytest.mark.fake
def test_api_key_from_the_environment(fake_model, run_dir, monkeypatch):
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    rec = run_trial(fake_trial(fake_model, env={"VLLM_API_KEY": KEY}), run_dir)
    assert (rec["outcome"], rec["chat_ok"], rec["long_request_ok"]) == ("ready", True, True), rec["evidence"]
    no_key_anywhere(rec)


@pytest.mark.fake
def test_fake_refuses_like_vllm(fake_model, run_dir, monkeypatch):
    """The fake's guards answer as vLLM 0.32 does (serve/middleware/authenticate.py, models/serving.py)."""
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    from vllm_lab.launcher import VllmServer

    t = fake_trial(fake_model, extra_args=["--api-key", KEY, "--served-model-name", "qwen"],
                   env=fake_env(version="0.32.0"))  # fmt: skip
    with VllmServer(t, run_dir) as s:
        res = s.start()
        assert res.outcome == "ready"
        nokey = probe.long_request(res.base_url, "qwen", 256, 1000, 10)
        wrong = probe.long_request(res.base_url, "other", 256, 1000, 10, api_key=KEY)
        good = probe.long_request(res.base_url, "qwen", 256, 1000, 10, api_key=KEY)
    assert nokey.error == "was refused: HTTP 401: Unauthorized"
    assert wrong.error == "was refused: HTTP 404: The model `other` does not exist."
    assert good.ok and good.output_tokens == OUT


@pytest.mark.fake
def test_fake_honours_yarn_rope_scaling_in_its_model_limit(tmp_path, run_dir):
    from conftest import FAKE_MODEL_CONFIG

    model = tmp_path / "yarn"
    model.mkdir()
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    (model / "config.json").write_text(json.dumps({**FAKE_MODEL_CONFIG, "rope_scaling": rope}))
    ok = run_trial(
        fake_trial(model, max_model_len=65536, kv_cache_memory_bytes=64 * 2**20), run_dir, long=False
    )
    assert ok["outcome"] == "ready", ok["evidence"]  # above max_position_embeddings 40960, below 4 x 32768
    over = run_trial(fake_trial(model, max_model_len=140000, kv_cache_memory_bytes=128 * 2**20), run_dir)
    assert over["failure"] == "max_len_exceeds_model" and "131072.0" in over["evidence"]


@pytest.mark.unit
def test_log_copies_hide_the_key_in_vllms_printed_forms():
    from vllm_lab.redact import redact_text

    lines = [
        f"non-default args: {{'model': 'm', 'api_key': ['{KEY}'], 'max_num_batched_tokens': 2048}}",  # < 0.32
        f"non-default args: {{'api_key': '{KEY}'}}",
        f"args: ['--model', 'm', '--api-key', '{KEY}']",  # an argv list's repr
        f"args: Namespace(api_key='{KEY}')",  # 0.6
        f"VLLM_API_KEY={KEY}",
    ]
    for line in lines:
        assert KEY not in redact_text(line), line
    assert "'max_num_batched_tokens': 2048" in redact_text(lines[0])  # token counts are not secrets


@pytest.mark.fake
def test_a_server_that_dies_mid_request_is_named_dead_with_what_the_request_saw(fake_model, run_dir):
    rec = run_trial(fake_trial(fake_model, env=fake_env(scenario="die_mid_request")), run_dir)
    assert rec["outcome"] == "unstable" and rec["long_request_ok"] is False
    assert rec["evidence"].startswith("the server died during a request of 1024 tokens (broke off: ")


@pytest.mark.fake
def test_warnings_that_mention_oom_do_not_end_a_start(fake_model, run_dir):
    rec = run_trial(fake_trial(fake_model, env=fake_env(scenario="oom_warnings")), run_dir)
    assert (rec["outcome"], rec["long_request_ok"]) == ("ready", True), rec["evidence"]
    log = Path(rec["log_path"]).read_text()
    assert "WARNING:root:CUDA out of memory" in log and "] Warning: OOM" in log


@pytest.mark.unit
def test_unstable_start_gets_the_engines_cause_and_a_not_a_length_remedy(tmp_path):
    """The demo's AWQ twin on the CPU build: ready, then dead on the chat request; the record says why."""
    from vllm_lab.launcher import LaunchResult

    log = (
        Path(__file__).parent
        / "fixtures"
        / "logs"
        / "runtime"
        / "cpu-0.32-awq-engine-dies-on-first-request.log"
    )
    res = LaunchResult(outcome="unstable", seconds_to_outcome=30.0, argv=[], log_path=str(log), port=1,
                       base_url="http://127.0.0.1:1", backend="vllm-cpu", evidence="a request of 16384 tokens broke off: ConnectError",
                       remedy="lower --max-model-len (the server starts but cannot serve a full-length request)")  # fmt: skip
    probe._explain_unstable(res, chat=False)
    assert "cpu_gemm_wna16" in res.evidence and res.evidence.startswith("a request of 16384 tokens broke off")
    assert "not a length problem" in res.remedy
    long_only = LaunchResult(outcome="unstable", seconds_to_outcome=30.0, argv=[], log_path=str(log), port=1,
                             base_url="http://127.0.0.1:1", backend="vllm-cpu", evidence="e", remedy="lower --max-model-len")  # fmt: skip
    probe._explain_unstable(long_only, chat=True)
    assert long_only.remedy == "lower --max-model-len"  # the chat worked: the length is still the suspect
