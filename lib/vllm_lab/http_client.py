"""What the client side of an OpenAI-compatible server needs, shared by probe and load (below both): a
client that skips the proxy for a loopback server, the token prompts, server-sent events, what a stream of
completion chunks said, error bodies, and the /metrics page.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from vllm_lab import engines


def client(base_url: str, api_key: str | None, timeout: float) -> httpx.Client:
    """A client for the trial's server: its key as a Bearer token; no proxy for a loopback address."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.Client(headers=headers, timeout=timeout, trust_env=not loopback(base_url))


def loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def error_message(body) -> str | None:
    """The message of a vLLM error body: {"error": {"message": ..}} (>= 0.11), {"message": ..}, {"error": ".."}."""
    if not isinstance(body, dict):
        return None
    err = body.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err)
    if err:
        return str(err)
    return str(body["message"]) if body.get("object") == "error" and body.get("message") else None


@dataclass
class LongRequest:
    """One full-length request: ok only with HTTP 200, no error chunk, every output token, and [DONE]."""

    ok: bool
    tokens: int  # prompt + output tokens asked for
    ttft_s: float | None = None  # to the first chunk that carries a token
    output_tokens: int | None = None  # from the usage chunk, else one per chunk with a choice
    error: str | None = None  # why not ok, as the end of "a request of N tokens ..."
    refused: bool = False  # an HTTP 4xx: the request never ran (key, model name)


def token_prompt(n: int, vocab: int, start: int = 0) -> list[int]:
    """n token ids cycling through the ordinary vocabulary (avoid 0..2, often special tokens); another
    `start` gives another first block, so concurrent prompts never share a prefix-cache hit."""
    span = max(1, min(vocab, 50000) - 3)
    return [3 + ((start + i) % span) for i in range(n)]


def sse_data(line: str) -> str | None:
    """The payload of one server-sent-events line (`data: ...`), else None."""
    return line.strip()[5:].strip() if line.startswith("data:") else None


class StreamState:
    """What the chunks of one completion stream said: first token, tokens counted, error, [DONE]."""

    def __init__(self) -> None:
        self.ttft: float | None = None
        self.times: list[float] = []  # when each chunk with a token arrived (load.py's inter-token gaps)
        self.chunks = 0
        self.usage: int | None = None
        self.error: str | None = None
        self.done = False

    def take(self, chunk: dict, t: float) -> None:
        msg = error_message(chunk)
        if msg is not None:
            self.error = self.error or f"ended with an error chunk: {msg}"
            return
        if isinstance(chunk.get("usage"), dict) and chunk["usage"].get("completion_tokens") is not None:
            self.usage = int(chunk["usage"]["completion_tokens"])
        if chunk.get("choices"):  # vLLM sends no empty chunks: each one with a choice carries a token
            self.chunks += 1
            self.ttft = t if self.ttft is None else self.ttft
            self.times.append(t)

    def result(self, total: int, expected: int, timeout: float) -> LongRequest:
        got = self.usage if self.usage is not None else self.chunks
        error = self.error
        if error is None and not self.done:
            error = f"did not complete within {timeout:.0f} s (no [DONE])"
        if error is None and got != expected:
            error = f"returned {got} of {expected} output tokens"
        return LongRequest(error is None, total, self.ttft if error is None else None, got, error)


def body_message(raw: bytes) -> str:
    """What an error response's body says: vLLM's message where it is JSON, else its first 300 characters."""
    try:
        return error_message(json.loads(raw)) or raw.decode(errors="replace")[:300]
    except ValueError:
        return raw.decode(errors="replace")[:300]


RECORDED = ("kv_usage", "running", "waiting", "preemptions")  # what a record's `metrics` keeps


def read_metrics(base_url: str, *, api_key: str | None = None) -> dict:
    """The few vLLM metrics a report needs (kv usage, running/waiting, preemptions)."""
    try:
        with client(base_url, api_key, 5) as c:
            text = c.get(f"{base_url}/metrics").text
    except httpx.HTTPError:
        return {}
    return parse_metrics(text)


# With --data-parallel-size N vLLM exports each series once per engine ({engine="0"}, ...): the server's load
# is the sum of the engines' counters and queues; its KV pressure is the fullest engine's cache.
_SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+([0-9.eE+-]+|NaN)$")


def combine_series(text: str, summed: tuple[str, ...], maxed: tuple[str, ...]) -> dict:
    """Those series from a Prometheus page, each combined over every engine that exports it."""
    out: dict = {}
    for line in text.splitlines():
        m = _SERIES.match(line.strip())
        if not m or m.group(1) not in summed + maxed or m.group(2) == "NaN":
            continue
        name, value = m.group(1), float(m.group(2))
        out[name] = (
            value if name not in out else (out[name] + value if name in summed else max(out[name], value))
        )
    return out


def parse_metrics(text: str) -> dict:
    """Those metrics from a Prometheus text page (/metrics) under the engine's own series names (a page holds
    one engine's), combined over data-parallel engines as combine_series does."""
    summed = tuple(engines.metric_series(tuple(n for n in RECORDED if n != "kv_usage")))
    out = combine_series(text, summed, tuple(engines.metric_series(("kv_usage",))))
    info = engines.metric_series(("cache_config_info",))
    for line in text.splitlines():
        m = _SERIES.match(line.strip())
        if m and m.group(1) in info:  # the KV pool as vLLM sized it (search's +1 proof)
            for k, v in re.findall(
                r'[{,](num_gpu_blocks|block_size|kv_cache_max_concurrency)="([0-9.]+)"', line
            ):
                out[f"vllm:cache_config_info:{k}"] = float(v)
    return out
