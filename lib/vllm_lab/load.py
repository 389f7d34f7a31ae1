"""A load against a running server: levels of fixed concurrency, streamed completions, /metrics scraped
-> one LoadResult: per-level latency percentiles and throughput, a stable/not-stable verdict with its reason,
and the knee (a --max-num-seqs hint). It launches nothing and records nothing; the caller does.

Stable means: every request completed with HTTP 200, no error chunk in its stream, every output token and
[DONE]; /health 200 after each level (or "not checkable": a server without /health, 404); no fatal line in
the server's log during the load (where the log is known); the same server process (where the caller can
tell). Preemptions are counted, never failures. A level runs at least as many requests as its users, and no
two prompts of a run share a first block (the prefix cache would serve them for free).

asyncio, not threads: a per-request deadline is one `asyncio.wait_for`, and Ctrl-C cancels every stream at
once, where a thread blocked in a socket read goes on until its stream or its read timeout ends.

aiohttp, not httpx (the rest of vllm-lab's HTTP): the generator shares the box with the server it measures,
and on the 2-core CPU build every client CPU-millisecond per streamed chunk is taken from the server's own
threads. httpx.AsyncClient spent 12-18 ms of CPU per 32-token request there, aiohttp 4-6 ms (its HTTP
parser is C), and with httpx the output tok/s came out 0.75-0.98x of `vllm bench serve`'s (which streams
with aiohttp too); now 0.96-1.03x at concurrency 1-8 (benchmarks/bench_load.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict
from urllib.parse import urlsplit

import aiohttp
import numpy as np

from vllm_lab import engines, prompt_text
from vllm_lab.engines import vllm_log as logscan  # vLLM's fatal lines; other engines: their `fatal`
from vllm_lab.http_client import StreamState as _StreamState
from vllm_lab.http_client import body_message, combine_series, sse_data, token_prompt
from vllm_lab.http_client import loopback as _loopback
from vllm_lab.load_spec import MAX_CONCURRENCY, MAX_LEVELS, MAX_REQUESTS, LoadSpec  # noqa: F401
from vllm_lab.spec import SpecError

SCHEMA_VERSION = 2  # of `vllm-lab load --json` (2: schema_version, failure kinds, per-level problems)
KNEE_GROWTH = 0.10  # per doubling of users: less output tok/s growth than this is flat
# the same rule for any concurrency ratio (tok/s ~ users**e): +10% for 2x users, +21% for 4x, +1% for 11/10
KNEE_ELASTICITY = math.log2(1 + KNEE_GROWTH)
NOT_CHECKABLE = "not checkable"  # health_after where /health answers 404 (Ollama, llama.cpp, proxies)
DEFAULT_VOCAB = 1000  # prompt ids stay below it where neither the caller nor the model's config.json says
# distinct prompt heads; a run sends at most MAX_LEVELS x MAX_REQUESTS + 1 prompts (3.2 million)
PROMPT_NUMBERS = 2**40
METRICS_INTERVAL_S = 0.5
HTTP_TIMEOUT_S = 10.0  # /health, /metrics, /v1/models; the streams have their own deadline (asyncio.wait_for)
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
STALE_RETRIES = 2  # a request that met a connection the server had closed is sent again
DRAIN_S = 1.0  # for what follows [DONE] (the end of the chunked body); past it the connection is dropped
MAX_LOG_READ = 64 * 2**20  # of the server's log written during the load
# A response that counted fewer prompt tokens than aimed, by more than this share (or 8 tokens), had its prompt
# cut without an error (Ollama does that past its context); text prompts wobble by a token or two only
CUT_SHARE = 0.02


class Problem(TypedDict):
    # server_ended | error_chunk | truncated | failed | unfinished | health | fatal_log | interrupted
    kind: str
    words: str  # as the verdict's reason says it


class Level(TypedDict, total=False):
    """One level of `vllm-lab load --json` (schema_version 2); report and probe read these keys."""

    concurrency: int
    planned: int | None  # requests it was to send (None: by duration)
    requests: int  # finished (completed or failed)
    completed: int
    failed: int
    errors_in_stream: int
    first_error: str | None
    # http_status | error_chunk | no_done | broke_off | not_json | short | truncated (prompt cut silently)
    first_error_kind: str | None
    errors_by_kind: dict[str, int]
    ttft_ms: dict  # p50/p90/p99
    itl_ms: dict
    e2e_ms: dict
    output_tokens: int
    ended_early: int  # of its completed requests, those whose output stopped at EOS (text prompts: Ollama)
    prompt_tokens_counted: dict | None  # mean/min/max of usage.prompt_tokens over its finished requests
    output_tokens_per_s: float | None
    requests_per_s: float | None
    seconds: float
    preemptions: float | None  # summed over engines
    prefix_cache_hits: float | None  # tokens, summed over engines; 0 where no prompt repeats
    kv_cache_usage_max: float | None  # the fullest engine's
    waiting_max: float | None
    running_max: float | None
    health_after: int | str | None  # the status; NOT_CHECKABLE (404); None: no answer
    problems: list[Problem]  # empty: the level is clean (load_report's frontier counts it)
    interrupted: bool


@dataclass
class LoadResult:
    url: str
    model: str
    spec: LoadSpec
    levels: list[Level] = field(default_factory=list)  # one per concurrency run, see _level_summary
    stable: bool = False
    reason: str = ""
    knee_concurrency: int | None = None
    knee_reason: str | None = None
    interrupted: bool = False  # Ctrl-C: the levels hold what was measured until then
    # what the prompts were: kind token_ids (exact lengths) or text (words calibrated to a length), the
    # tokens aimed at, and what the server counted (mean/min/max of usage.prompt_tokens); see _Load.prompts
    prompts: dict | None = None

    def to_dict(self) -> dict:
        """The `vllm-lab load --json` object."""
        return {
            "schema_version": SCHEMA_VERSION,
            "url": self.url, "model": self.model, "levels": self.levels, "stable": self.stable,
            "reason": self.reason, "knee_concurrency": self.knee_concurrency, "knee_reason": self.knee_reason,
            "interrupted": self.interrupted, "spec": self.spec.to_dict(), "prompts": self.prompts,
        }  # fmt: skip


@dataclass
class _Request:
    """One streamed request as the client saw it; seconds from its own start."""

    ok: bool
    error: str | None = None
    # what failed, so no caller reads it from the words: http_status (status), error_chunk (a `data: {"error":
    # ...}` chunk, HTTP 200 all the same), no_done (the deadline passed), broke_off, not_json, short (fewer tokens)
    kind: str | None = None
    status: int | None = None
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)  # between chunks that carry tokens
    e2e: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None  # as the server counted them (usage.prompt_tokens)
    ended_early: bool = False  # stopped at EOS before max_tokens, where that is complete (stop_ok)


class _Stream(_StreamState):
    """The stream's state, whether its error came in an error chunk (the only error take() sets), the prompt
    tokens the server counted and the last finish_reason."""

    chunk_error = False
    prompt_tokens: int | None = None
    finish: str | None = None

    def take(self, chunk: dict, t: float) -> None:
        before = self.error
        super().take(chunk, t)
        self.chunk_error = self.chunk_error or (before is None and self.error is not None)
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
            self.prompt_tokens = usage["prompt_tokens"]
        for c in chunk.get("choices") or ():
            if isinstance(c, dict) and c.get("finish_reason"):
                self.finish = c["finish_reason"]


async def _one_request(
    client: aiohttp.ClientSession,
    url: str,
    body: dict,
    expected: int,
    timeout: float,
    prompt_tokens: int | None = None,
    stop_ok: bool = False,
) -> _Request:
    """One streamed request. `prompt_tokens`: what the server should count (fewer: cut silently, kind
    truncated); `stop_ok`: a stream that ends at EOS (finish_reason stop) before `expected` tokens is complete
    (a server without ignore_eos)."""
    s = _Stream()
    t0 = time.perf_counter()

    async def post() -> aiohttp.ClientResponse:
        # A server may close its keep-alive connection after a streamed response (llama.cpp's does, though
        # it says Keep-Alive) and the pool hand it out before the close is seen: ServerDisconnectedError, or
        # "Can not write request body" (ClientOSError) when the close comes while the body is written; no
        # response either way. Sent again, it takes the next connection (the stale one is dropped). A refused
        # connection (ClientConnectorError) is no stale connection: the server is gone, said at once.
        for _ in range(STALE_RETRIES):
            try:
                return await client.post(url, json=body)
            except aiohttp.ClientConnectorError:
                raise
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                continue
        return await client.post(url, json=body)

    async def stream() -> tuple[int, str] | None:
        async with await post() as r:
            if r.status != 200:
                return r.status, f"HTTP {r.status}: {body_message(await r.read())}"
            async for line in _lines(r):
                data = sse_data(line)
                if data == "[DONE]":
                    s.done = True
                    break
                if data:
                    s.take(json.loads(data), time.perf_counter() - t0)
            if s.done:  # read to the end: aiohttp pools a connection only once its response is read whole
                with contextlib.suppress(asyncio.TimeoutError, aiohttp.ClientError):
                    await asyncio.wait_for(r.content.read(), DRAIN_S)
        return None

    kind = None
    try:
        refused = await asyncio.wait_for(stream(), timeout)
        if refused:
            return _Request(False, refused[1], "http_status", refused[0])
    except asyncio.TimeoutError:
        kind = "no_done"
        s.error = s.error or f"stopped streaming: no [DONE] within {timeout:g} s"
    except aiohttp.ClientError as e:
        kind = "broke_off"
        s.error = s.error or f"broke off: {type(e).__name__}: {e}"
    except ValueError as e:
        kind = "not_json"
        s.error = s.error or f"sent a chunk that is not JSON ({e})"
    if s.chunk_error:
        kind = "error_chunk"  # the stream's own error came first, whatever followed it
    got = s.usage if s.usage is not None else s.chunks
    early = stop_ok and s.finish == "stop" and s.done and s.error is None and got < expected
    expected = got if early else expected  # ended at EOS: complete
    aimed = prompt_tokens if prompt_tokens is not None else len(body["prompt"])
    res = s.result(body["max_tokens"] + aimed, expected, timeout)
    if not res.ok and kind is None:
        kind = "short" if s.done else "no_done"
    ok, error = res.ok, res.error
    counted = s.prompt_tokens
    if (
        ok
        and prompt_tokens is not None
        and counted is not None
        and counted < prompt_tokens - max(8, prompt_tokens * CUT_SHARE)
    ):
        ok, kind = False, "truncated"
        error = (f"the server counted {counted} prompt tokens of the {prompt_tokens} sent (usage.prompt_tokens) "
                 "and answered without an error: it cut the prompt silently")  # fmt: skip
    gaps = [b - a for a, b in zip(s.times, s.times[1:], strict=False)]
    return _Request(ok, error, None if ok else kind, None, s.ttft, gaps, time.perf_counter() - t0,
                    res.output_tokens or 0, counted, early and ok)  # fmt: skip


async def _lines(r: aiohttp.ClientResponse):
    """The stream's lines as they arrive: whatever the socket holds at once (one read, as `vllm bench serve`
    reads), split at newlines; a line cut between two reads waits for its end."""
    rest = b""
    async for part in r.content.iter_any():
        *lines, rest = (rest + part).split(b"\n")
        for line in lines:
            yield line.decode("utf-8", errors="replace")
    if rest:
        yield rest.decode("utf-8", errors="replace")


class _Scraper:
    """/metrics every METRICS_INTERVAL_S during a level: the peaks of KV usage and of the queue."""

    def __init__(self, client: aiohttp.ClientSession, base_url: str, enabled: bool = True):
        self.client, self.url, self.enabled = client, f"{base_url}/metrics", enabled
        self.kv_max: float | None = None
        self.waiting_max: float | None = None
        self.running_max: float | None = None

    async def read(self) -> dict:
        if not self.enabled:
            return {}
        try:
            async with self.client.get(self.url, timeout=HTTP_TIMEOUT) as r:
                return combined_metrics(await r.text()) if r.status == 200 else {}
        except (aiohttp.ClientError, asyncio.TimeoutError, UnicodeDecodeError):
            return {}

    def note(self, m: dict) -> None:
        # each engine's own series names (vLLM's older KV name too): engines/*.py `metrics`
        self.kv_max = _peak(self.kv_max, engines.metric(m, "kv_usage"))
        self.waiting_max = _peak(self.waiting_max, engines.metric(m, "waiting"))
        self.running_max = _peak(self.running_max, engines.metric(m, "running"))

    async def run(self, deadline: float) -> None:
        # the level's own read came just before; none while the first prefills arrive (on a CPU build the
        # server renders /metrics on the cores that serve them)
        while time.monotonic() < deadline:  # cancelled when the level ends; the deadline bounds it anyway
            await asyncio.sleep(METRICS_INTERVAL_S)
            self.note(await self.read())


# The series names are every engine's (engines/*.py `metrics`; a page holds one engine's), each combined over
# data-parallel engines (http_client.combine_series: counters and queues summed, KV usage the fullest).
SUMMED = tuple(sorted(engines.metric_series(("running", "waiting", "preemptions", "prefix_cache_hits"))))
MAXED = tuple(sorted(engines.metric_series(("kv_usage",))))
COUNTED = ("preemptions", "prefix_cache_hits")  # counters: a level's figure is the difference


def combined_metrics(text: str) -> dict:
    """The load's series from a /metrics page, each combined over every engine that exports it."""
    return combine_series(text, SUMMED, MAXED)


def _peak(old: float | None, new: float | None) -> float | None:
    if new is None:
        return old
    return new if old is None else max(old, new)


def _pcts(values: list[float]) -> dict:
    """p50/p90/p99 in ms, numpy's linear interpolation as `vllm bench serve` computes them."""
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    p = np.percentile(np.asarray(values) * 1000.0, [50, 90, 99])
    return {"p50": round(float(p[0]), 2), "p90": round(float(p[1]), 2), "p99": round(float(p[2]), 2)}


def _level_summary(conc: int, planned: int | None, done: list[_Request], wall: float, scraper: _Scraper,
                   deltas: dict, health: int | str | None) -> Level:  # fmt: skip
    ok = [r for r in done if r.ok]
    first = next((r for r in done if not r.ok), None)
    tokens = sum(r.output_tokens for r in ok)
    counted = [r.prompt_tokens for r in done if r.prompt_tokens is not None]  # the cut ones too
    kinds: dict[str, int] = {}
    for r in done:
        if not r.ok:
            kinds[r.kind or "other"] = kinds.get(r.kind or "other", 0) + 1
    return {
        "concurrency": conc,
        "planned": planned,  # requests the level was to send (None: by duration)
        "requests": len(done),
        "completed": len(ok),
        "failed": len(done) - len(ok),
        "errors_in_stream": kinds.get("error_chunk", 0),
        "first_error": first.error if first else None,
        "first_error_kind": first.kind if first else None,
        "errors_by_kind": kinds,
        "ttft_ms": _pcts([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": _pcts([g for r in ok for g in r.gaps]),
        "e2e_ms": _pcts([r.e2e for r in ok if r.e2e is not None]),
        "output_tokens": tokens,
        "ended_early": sum(r.ended_early for r in ok),
        "prompt_tokens_counted": _counted(counted),
        "output_tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "requests_per_s": round(len(ok) / wall, 3) if wall > 0 else None,
        "seconds": round(wall, 3),
        "preemptions": deltas.get("preemptions"),
        "prefix_cache_hits": deltas.get("prefix_cache_hits"),  # tokens; 0 where no prompt repeats
        "kv_cache_usage_max": round(scraper.kv_max, 4) if scraper.kv_max is not None else None,
        "waiting_max": scraper.waiting_max,
        "running_max": scraper.running_max,
        "health_after": health,
    }


def _counted(values: list[int]) -> dict | None:
    if not values:
        return None
    return {"mean": round(sum(values) / len(values), 1), "min": min(values), "max": max(values)}


def unique_prompt(n: int, vocab: int, number: int) -> list[int]:
    """n token ids below vocab whose first ones spell `number` (< PROMPT_NUMBERS) in base vocab - 3, lowest
    digit first: another number, another first token block. The rest as token_prompt fills it."""
    span = max(2, min(vocab, 50000) - 3)  # ids 0..2 are often special tokens
    digits = math.ceil(math.log(PROMPT_NUMBERS) / math.log(span))
    head = []
    for _ in range(min(n, digits)):
        number, d = divmod(number, span)
        head.append(3 + d)
    return head + token_prompt(n - len(head), vocab, start=head[0] if head else 0)


class _Load:
    """One run of run_load: the client, the spec, the log offset and what was measured so far."""

    def __init__(self, base_url, model, spec, api_key, log_path, server_alive, vocab_size, engine=None):
        self.base_url, self.model, self.spec = base_url.rstrip("/"), model, spec
        self.engine = engine  # whose log rules read the fatal lines (None: told from the log's text)
        self.api_key, self.server_alive = api_key, server_alive
        self.vocab = vocab_size  # None: from the model card's root (check_reachable), else DEFAULT_VOCAB
        self.log_path = Path(log_path) if log_path else None
        self.log_offset = self.log_path.stat().st_size if self.log_path and self.log_path.exists() else 0
        self.result = LoadResult(self.base_url, model, spec)
        # Each request of the run gets the next number, spelled in its prompt's first ids: no two prompts of a
        # run share a first block (vLLM's prefix cache would serve them for free); a random start keeps another
        # run's prompts (or the trial's long request) apart too.
        self.first = random.randrange(PROMPT_NUMBERS // 2)
        self.sent = 0
        self.current: tuple[int, list[_Request], float] | None = None  # the level in progress: its requests
        # text prompts (an engine whose load_prompts is "text"): words per prompt and the prompt tokens that
        # many words came to, from calibrate(); token ids: the ids are the tokens
        self.words: int | None = None
        self.aimed = spec.prompt_tokens
        self.calibration: dict | None = None
        self.counted: list[int] = []  # usage.prompt_tokens of every request in the levels

    def _text_prompts(self) -> bool:
        return bool(self.engine) and engines.get(self.engine).load_prompts == "text"

    def _prompt(self, words: int | None = None) -> str | list[int]:
        self.sent += 1
        number = self.first + self.sent
        if words is not None or self._text_prompts():
            return prompt_text.unique_text(
                words or self.words or self.spec.prompt_tokens, number, PROMPT_NUMBERS
            )
        return unique_prompt(self.spec.prompt_tokens, self.vocab or DEFAULT_VOCAB, number)

    def _body(self) -> dict:
        return {"model": self.model, "prompt": self._prompt(), "max_tokens": self.spec.output_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
                "ignore_eos": True}  # fmt: skip

    async def _request(self, client: aiohttp.ClientSession) -> _Request:
        spec = self.spec
        return await _one_request(client, f"{self.base_url}/v1/completions", self._body(), spec.output_tokens,
                                  spec.request_timeout_s, self.aimed, stop_ok=self._text_prompts())  # fmt: skip

    def _alive(self) -> bool:
        return self.server_alive is None or bool(self.server_alive())

    async def check_reachable(self, client: aiohttp.ClientSession) -> None:
        """Before any load: the server answers, takes the key and serves this model (else SpecError: exit 2)."""
        try:
            async with client.get(f"{self.base_url}/v1/models", timeout=HTTP_TIMEOUT) as r:
                status, raw = r.status, await r.read()
        except aiohttp.ClientConnectorCertificateError as e:
            raise SpecError(f"{self.base_url} answers https with a certificate this machine does not trust (a "
                            f"self-signed one, or one for another host name: {e.certificate_error}); put its "
                            "certificate in SSL_CERT_FILE, or serve plain http") from None  # fmt: skip
        except aiohttp.ClientSSLError as e:
            http = self.base_url.replace("https://", "http://", 1)
            raise SpecError(f"the TLS handshake with {self.base_url} failed ({e}); if it serves plain http, give "
                            f"--url {http}") from None  # fmt: skip
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            why = f"{type(e).__name__}: {e}" if str(e) else f"no answer within {HTTP_TIMEOUT_S:g} s"
            # connected, then hung up or reset: a TLS server given a plain request, or the other way round
            reset = isinstance(getattr(e, "os_error", None), ConnectionResetError)
            hung_up = reset or (isinstance(e, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError)
                                and not isinstance(e, aiohttp.ClientConnectorError))  # fmt: skip
            scheme, rest = self.base_url.split("://", 1)
            if hung_up:
                other = "https" if scheme == "http" else "http"
                raise SpecError(f"{self.base_url} hung up without an answer ({why}); if it serves {other} "
                                f"({'--ssl-certfile' if other == 'https' else 'no TLS'}), give --url "
                                f"{other}://{rest}") from None  # fmt: skip
            raise SpecError(f"cannot reach {self.base_url} ({why}); start the server or fix --url") from None
        if status == 401:
            raise SpecError(
                f"{self.base_url} refused the key (HTTP 401); give its --api-key (or VLLM_API_KEY)"
            )
        if status != 200:
            raise SpecError(f"{self.base_url}/v1/models answered HTTP {status}; is this a vLLM server?")
        try:
            cards = {m["id"]: m for m in json.loads(raw)["data"]}
        except (ValueError, KeyError, TypeError):
            raise SpecError(
                f"{self.base_url}/v1/models is not an OpenAI model list; is this a vLLM server?"
            ) from None
        if self.model not in cards:
            raise SpecError(
                f"--model {self.model!r} is not served at {self.base_url}; it serves {', '.join(cards)}"
            )
        # vLLM's model card says its max_model_len; newer builds cut a longer request short without an error
        limit, want = (
            cards[self.model].get("max_model_len"),
            self.spec.prompt_tokens + self.spec.output_tokens,
        )
        if isinstance(limit, int) and want > limit:
            raise SpecError(f"--prompt-tokens {self.spec.prompt_tokens} + --output-tokens {self.spec.output_tokens} "
                            f"= {want} tokens pass the server's max_model_len {limit}: it would refuse or cut short "
                            "every request; lower them")  # fmt: skip
        if self.vocab is None:  # vLLM's card names what it serves (root): a folder whose config.json says it
            root = cards[self.model].get("root")
            self.vocab = (_config_vocab(root) if isinstance(root, str) else None) or DEFAULT_VOCAB
        if self.engine is None:
            self.engine = await self.identify(client)

    async def identify(self, client: aiohttp.ClientSession) -> str | None:
        """The engine a caller that gave only a URL did not name, where one tells itself (its identify_path:
        Ollama's /api/version); None: not told (vLLM, llama-server: token ids either way)."""
        for name in engines.names():
            path = engines.get(name).identify_path
            if not path:
                continue
            try:
                async with client.get(f"{self.base_url}{path}", timeout=HTTP_TIMEOUT) as r:
                    body = json.loads(await r.read()) if r.status == 200 else None
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                continue
            if isinstance(body, dict) and "version" in body:
                return name
        return None

    async def _count(self, client: aiohttp.ClientSession, words: int) -> tuple[int | None, str | None]:
        """usage.prompt_tokens of a text prompt of `words` words (not streamed, one output token)."""
        body = {"model": self.model, "prompt": self._prompt(words), "max_tokens": 1, "temperature": 0}
        try:
            async with client.post(f"{self.base_url}/v1/completions", json=body,
                                   timeout=aiohttp.ClientTimeout(total=self.spec.request_timeout_s)) as r:  # fmt: skip
                raw = await r.read()
                if r.status != 200:
                    return None, f"was refused: HTTP {r.status}: {body_message(raw)}"
            return int(json.loads(raw)["usage"]["prompt_tokens"]), None
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return None, f"broke off: {type(e).__name__}: {e}"
        except (ValueError, KeyError, TypeError) as e:
            return None, f"came back without usage.prompt_tokens ({type(e).__name__})"

    async def calibrate(self, client: aiohttp.ClientSession) -> None:
        """Text prompts: how many words make spec.prompt_tokens, from what the server counts of two prompts of
        one and two cycles of the word list (the server has no tokenize endpoint: Ollama), after a warm-up (a
        chat template's fixed start is then cached for every prompt alike). Once per load, before the levels;
        a server that cannot count is a SpecError (nothing to aim at)."""
        k = len(prompt_text.WORDS)
        head = prompt_text.head_words(PROMPT_NUMBERS)
        await self._count(client, head + 1)
        (p1, e1), (p2, e2) = await self._count(client, head + k), await self._count(client, head + 2 * k)
        if p1 is None or p2 is None or p2 <= p1:
            why = e1 or e2 or f"counted {p2} tokens for {head + 2 * k} words, {p1} for {head + k}"
            raise SpecError(f"calibrating the load's text prompts against {self.base_url}: a prompt {why}; "
                            "the load cannot aim at --prompt-tokens")  # fmt: skip
        # the template's tokens, and what the words do not explain
        rate, fixed = prompt_text.token_line(head + k, p1, head + 2 * k, p2)
        self.words = max(head + 1, round((self.spec.prompt_tokens - fixed) / rate))
        self.aimed = round(fixed + rate * self.words)
        self.calibration = {"words": [head + k, head + 2 * k], "counted": [p1, p2]}

    def prompts(self) -> dict:
        """What the prompts were, for the result: exact token ids, or text aimed at a count by calibration;
        with what the server counted over every level's requests (usage.prompt_tokens)."""
        counted = _counted(self.counted)
        if self.words is None:
            return {"kind": "token_ids", "tokens": self.spec.prompt_tokens, "counted": counted}
        return {"kind": "text", "asked_tokens": self.spec.prompt_tokens, "aimed_tokens": self.aimed,
                "words": self.words, "calibration": self.calibration, "counted": counted}  # fmt: skip

    async def first_request(self, client: aiohttp.ClientSession) -> None:
        """One request before the levels, not counted (as `vllm bench serve`'s initial test run): one the
        server refuses (HTTP 4xx: too long for 0.27, a key, a name), a prompt outside the model's vocabulary
        (0.32 streams that as an error chunk) or one cut short without an error (0.32 serves what fits its
        max_model_len) is bad input, not instability. Other failures are left to the levels to count."""
        spec = self.spec
        r = await self._request(client)  # a prompt cut silently is the levels' to say (truncated)
        err = (r.error or "")[:300]
        if r.kind == "http_status" and 400 <= (r.status or 0) < 500:
            raise SpecError(f"{self.base_url} refused the first request ({err}); check --prompt-tokens + "
                            "--output-tokens against its max_model_len, --model and --api-key")  # fmt: skip
        # the server's own words: vLLM's error chunk has no field that says which input it refused
        if r.kind == "error_chunk" and "out of vocabulary" in err:
            raise SpecError(f"prompt token ids go up to {min(self.vocab, 50000) - 1}, outside this model's "
                            f"vocabulary ({err}); give --vocab-size (the model's vocab_size)")  # fmt: skip
        if r.kind == "short" and r.output_tokens < spec.output_tokens:  # stopped early, no error
            raise SpecError(f"the first request got {r.output_tokens} of {spec.output_tokens} output tokens and no "
                            f"error: the server cuts requests short (its max_model_len, or a max_tokens cap); "
                            "lower --prompt-tokens or --output-tokens")  # fmt: skip

    async def level(self, client: aiohttp.ClientSession, conc: int) -> dict:
        spec = self.spec
        count = spec.requests if spec.requests is not None else MAX_REQUESTS
        t0 = time.monotonic()
        stop_sending = t0 + spec.duration_s if spec.duration_s is not None else math.inf
        # Each request has its own deadline; this one bounds the level as a whole.
        rounds = (
            math.ceil(count / conc) * spec.request_timeout_s if spec.duration_s is None else spec.duration_s
        )
        deadline = t0 + rounds + spec.request_timeout_s + 5
        done: list[_Request] = []
        scraper = _Scraper(client, self.base_url, self._scrapes())
        before = await scraper.read()
        issued = 0

        async def worker() -> None:
            nonlocal issued
            while issued < count and time.monotonic() < stop_sending and self._alive():
                issued += 1
                done.append(await self._request(client))

        start = time.perf_counter()
        self.current = (conc, done, start)
        tasks = [asyncio.create_task(scraper.run(deadline))] + [
            asyncio.create_task(worker()) for _ in range(conc)
        ]
        try:
            await asyncio.wait(tasks[1:], timeout=max(0.0, deadline - time.monotonic()))
        finally:  # the level deadline, or Ctrl-C: nothing of this level keeps running
            wall = time.perf_counter() - start
            for t in tasks:
                t.cancel()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        bugs = [e for e in outcomes if isinstance(e, Exception)]  # not the cancels: a fault of this module
        if bugs:
            raise bugs[0]
        m = await scraper.read()
        scraper.note(m)
        deltas = {k: engines.metric(m, k) - engines.metric(before, k) for k in COUNTED
                  if engines.metric(m, k) is not None and engines.metric(before, k) is not None}  # fmt: skip
        health = await self.health(client)
        # nothing answers: a server that is exiting closes its sockets before its parent can see it end
        for _ in range(20 if health is None and self.server_alive is not None else 0):
            if not self._alive():
                break
            await asyncio.sleep(0.1)
        self.current = None
        self.counted += [r.prompt_tokens for r in done if r.prompt_tokens is not None]
        return _level_summary(conc, spec.requests, done, wall, scraper, deltas, health)

    def _scrapes(self) -> bool:
        """/metrics is read unless the engine is known to serve none (Ollama: its figures stay None)."""
        return not self.engine or any(engines.get(self.engine).metrics.values())

    async def health(self, client: aiohttp.ClientSession) -> int | str | None:
        """/health's status after a level; NOT_CHECKABLE where the server has none (404: OpenAI-compatible
        servers other than vLLM, proxies), None where nothing answered."""
        try:
            async with client.get(f"{self.base_url}/health", timeout=HTTP_TIMEOUT) as r:
                return NOT_CHECKABLE if r.status == 404 else r.status
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return None

    def fatal_log_line(self) -> str | None:
        """The server's own cause, logged since the load began: the first line logscan classifies as fatal,
        else the first line that says the engine died (its wrapper, e.g. EngineDeadError)."""
        if not self.log_path or not self.log_path.exists():
            return None
        with open(self.log_path, "rb") as f:
            f.seek(self.log_offset)
            text = f.read(MAX_LOG_READ).decode("utf-8", errors="replace")
        engine = engines.get(self.engine) if self.engine else engines.of_log(text)
        if engine.name != engines.DEFAULT:  # llama.cpp, Ollama: their own rules
            for line in text.splitlines():
                kind = engine.fatal(line)
                if kind:
                    return f"{kind}: {line.strip()[:300]}"
            return None
        death = None
        for line in text.splitlines():
            kind = logscan.classify_line(line)
            if kind is not None:
                return f"{kind}: {logscan.clean_line(line)[:300]}"
            if death is None and logscan._ENGINE_DEATH.search(line):
                death = f"engine died: {logscan.clean_line(line)[:300]}"
        return death

    async def run(self) -> LoadResult:
        res = self.result
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        # connections for every stream and the scraper; no proxies from the environment (loopback only)
        conn = aiohttp.TCPConnector(limit=max(self.spec.concurrency) + 4)
        async with aiohttp.ClientSession(headers=headers, connector=conn, trust_env=False,
                                         timeout=aiohttp.ClientTimeout(total=None)) as client:  # fmt: skip
            try:
                await self.check_reachable(client)
                if self._text_prompts():
                    await self.calibrate(client)
                await self.first_request(client)
                for conc in self.spec.concurrency:
                    lvl = await self.level(client, conc)
                    lvl["problems"] = self.problems(lvl)
                    res.levels.append(lvl)
                    if lvl["problems"]:
                        res.reason = "; ".join(p["words"] for p in lvl["problems"])
                        break
            except asyncio.CancelledError:  # Ctrl-C: keep what was measured, say where it stopped
                res.interrupted = True
                if self.current is not None:
                    conc, done, start = self.current
                    lvl = _level_summary(conc, self.spec.requests, list(done), time.perf_counter() - start,
                                         _Scraper(client, self.base_url), {}, None)  # fmt: skip
                    interrupted = {"kind": "interrupted", "words": "interrupted (Ctrl-C)"}
                    res.levels.append({**lvl, "interrupted": True, "problems": [interrupted]})
        return self.verdict()

    def problems(self, lvl: Level) -> list[Problem]:
        """Why this level is not stable (what the client saw first, then the server's side), each with its
        kind: server_ended, error_chunk, truncated, failed, unfinished, health, fatal_log. Empty: the level is
        clean."""
        c, n = lvl["concurrency"], lvl["requests"]
        parts = []
        if not self._alive():
            parts.append(("server_ended", f"the server process ended during the load at concurrency {c}"))
        if lvl["errors_in_stream"]:
            parts.append(("error_chunk", f"{lvl['errors_in_stream']} of {n} streams at concurrency {c} ended in an "
                                         "error chunk (HTTP 200 all the same)"))  # fmt: skip
        cut = lvl["errors_by_kind"].get("truncated", 0)
        if cut:
            least = (lvl["prompt_tokens_counted"] or {}).get("min")
            parts.append(("truncated", f"{cut} of {n} prompts at concurrency {c} were cut silently: the server "
                                       f"counted as few as {least} prompt tokens of the {self.aimed} sent "
                                       "(usage.prompt_tokens; HTTP 200, no error)"))  # fmt: skip
        other = lvl["failed"] - lvl["errors_in_stream"] - cut
        if other:
            parts.append(("failed", f"{other} of {n} requests failed at concurrency {c}"))
        if lvl["first_error"] and parts and parts[-1][0] != "truncated":
            parts[-1] = (parts[-1][0], parts[-1][1] + f" (first: {lvl['first_error']})")
        expected = self.spec.requests
        if not n or (expected is not None and n < expected):
            parts.append(("unfinished", f"{n} of {expected or 'the'} requests finished within the level's deadline "
                                        f"at concurrency {c}"))  # fmt: skip
        if lvl["health_after"] not in (200, NOT_CHECKABLE):
            parts.append(("health", f"/health answered {lvl['health_after'] or 'nothing'} after it"))
        fatal = self.fatal_log_line()
        if fatal:
            parts.append(("fatal_log", f"the server's log during the load: {fatal}"))
        return [{"kind": k, "words": w} for k, w in parts]

    def verdict(self) -> LoadResult:
        res = self.result
        levels = res.levels
        res.prompts = self.prompts()
        if res.interrupted:
            lvl = levels[-1] if levels else None
            where = " before the first level"
            if lvl and lvl.get("interrupted"):
                where = (f" at concurrency {lvl['concurrency']} ({lvl['completed']} completed, {lvl['failed']} "
                         f"failed of {lvl['requests']} finished)")  # fmt: skip
            elif lvl:
                where = f" after concurrency {lvl['concurrency']}"
            done = sum(1 for x in levels if not x.get("interrupted"))
            res.stable, res.reason = (
                False,
                f"interrupted (Ctrl-C){where}; {done} of {len(self.spec.concurrency)} levels done",
            )
        elif res.reason:
            res.stable = False
            rest = len(self.spec.concurrency) - len(levels)
            res.reason += f"; {rest} higher level(s) not run" if rest else ""
        else:
            res.stable = True
            p = sum(x["preemptions"] or 0 for x in levels)
            health = {x["health_after"] for x in levels}
            after = ("/health 200 after each" if health == {200} else "/health not checkable (HTTP 404)" if health == {NOT_CHECKABLE} else "/health 200 or not checkable (404) after each")  # fmt: skip
            res.reason = (f"all {sum(x['completed'] for x in levels)} requests over {len(levels)} level(s) completed, "
                          f"{after}" + (f"; {p:g} preemption(s), not failures" if p else ""))  # fmt: skip
            if self.words is not None:  # never read as exact lengths
                res.reason += f"; {prompts_words(res.prompts)}"
            early = sum(x["ended_early"] for x in levels)
            if early:  # the output tok/s are then of shorter outputs than asked
                res.reason += (f"; {early} output(s) ended at EOS before {self.spec.output_tokens} tokens (the server "
                               "takes no ignore_eos)")  # fmt: skip
        res.knee_concurrency, res.knee_reason = knee(
            [x for x in levels if not x.get("interrupted") and not x["failed"]], self.spec.slo_ttft_ms
        )
        return res


def knee(levels: list[dict], slo_ttft_ms: float | None = None) -> tuple[int | None, str | None]:
    """The lowest concurrency after which output tok/s stays flat at every later level (grows by less than
    KNEE_GROWTH per doubling of users, scaled to each concurrency ratio), or the last one before TTFT p90
    passes the SLO; with its numbers. Levels in increasing concurrency, those that completed every request."""
    if not levels:
        return None, None
    for i, lvl in enumerate(levels):
        p90 = lvl["ttft_ms"]["p90"]
        if slo_ttft_ms is not None and p90 is not None and p90 > slo_ttft_ms:
            if i == 0:
                return (
                    None,
                    f"TTFT p90 {p90:g} ms passes the SLO {slo_ttft_ms:g} ms already at concurrency {lvl['concurrency']}",
                )
            prev = levels[i - 1]
            return prev["concurrency"], (f"TTFT p90 {p90:g} ms at concurrency {lvl['concurrency']} passes the SLO "
                                         f"{slo_ttft_ms:g} ms (p90 {prev['ttft_ms']['p90']:g} ms at {prev['concurrency']})")  # fmt: skip
        later = levels[i + 1 :]
        if later and all(_flat(lvl, x) for x in later):
            a, last = lvl["output_tokens_per_s"], later[-1]
            span = f"{last['output_tokens_per_s']:g} at {last['concurrency']}"
            if len(later) > 1:
                span = f"{later[0]['output_tokens_per_s']:g} at {later[0]['concurrency']} ... {span}"
            return lvl["concurrency"], (f"output {a:g} tok/s at concurrency {lvl['concurrency']}, {span}: flat at every "
                                        f"later level (under +{KNEE_GROWTH:.0%} per doubling of users)")  # fmt: skip
    last = levels[-1]
    return None, (f"output tok/s still grows at concurrency {last['concurrency']} ({last['output_tokens_per_s']:g} "
                  f"tok/s; no level after which it stays under +{KNEE_GROWTH:.0%} per doubling of users): try "
                  "higher levels")  # fmt: skip


def _flat(lvl: dict, later: dict) -> bool:
    """Output tok/s from lvl to a later level grew less than KNEE_GROWTH per doubling of its users."""
    a, b = lvl["output_tokens_per_s"] or 0.0, later["output_tokens_per_s"] or 0.0
    ratio = (later["concurrency"] or 0) / (lvl["concurrency"] or 1)
    if a <= 0 or ratio <= 1:
        return False
    return b <= 0 or math.log(b / a) / math.log(ratio) < KNEE_ELASTICITY


def run_load(
    base_url: str,
    model: str,
    spec: LoadSpec,
    *,
    api_key: str | None = None,
    log_path: str | Path | None = None,
    server_alive: Callable[[], bool] | None = None,
    vocab_size: int | None = None,
    engine: str | None = None,
) -> LoadResult:
    """Run every level of `spec` against a loopback vLLM server; stop at the first level that is not stable.

    `base_url` as users paste it (server_root). `log_path`: the server's live log (fatal lines written during
    the load make it not stable). `server_alive`: the caller's check that its server process still runs.
    `vocab_size`: prompt ids stay below it (None: the served model's config.json, else DEFAULT_VOCAB).
    Ctrl-C returns the result so far with interrupted=True; nothing keeps running after this returns. Bad
    input or a server that cannot be reached raises SpecError before any request.
    """
    spec.validate()
    base_url = server_root(base_url)
    if not _loopback(base_url):
        raise SpecError(
            f"--url {base_url}: the load goes to loopback servers only (127.0.0.1, ::1, localhost)"
        )
    load = _Load(base_url, model, spec, api_key, log_path, server_alive, vocab_size, engine)
    return _run_interruptible(load.run)


def server_root(url: str) -> str:
    """The server's root from --url as users paste it: `localhost:8000` (no scheme), vLLM's banner address
    `http://0.0.0.0:8000` (every interface, this machine's among them), the OpenAI base URL `.../v1`. Any
    other path is a SpecError that names the root to give."""
    raw = url.strip()
    parts = urlsplit(raw if "://" in raw else f"http://{raw}")
    try:
        port = parts.port
    except ValueError:
        raise SpecError(f"--url {url}: the port is not a number; give http://HOST:PORT, e.g. http://127.0.0.1:8000") from None  # fmt: skip
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
        parts.hostname or "", parts.hostname or ""
    )
    root = f"{parts.scheme}://{f'[{host}]' if ':' in host else host}" + (
        f":{port}" if port is not None else ""
    )
    if parts.scheme not in ("http", "https"):
        raise SpecError(f"--url {url}: give http://HOST:PORT (or https://), e.g. http://127.0.0.1:8000")
    if parts.path.rstrip("/") not in ("", "/v1") or parts.query or parts.fragment:
        raise SpecError(
            f"--url {url}: give the server's root, --url {root} (the load adds /v1/completions itself)"
        )
    return root


def _run_interruptible(make_coro: Callable) -> LoadResult:
    """Run the coroutine on a loop of its own in a thread (a Jupyter kernel already runs a loop in this one);
    a KeyboardInterrupt here cancels it, and its result (what was measured) is still returned.

    Waits on an Event, not Thread.join: a join interrupted by KeyboardInterrupt can leave the thread looking
    finished while it still runs (CPython 3.11), and the result would be read before it exists.
    """
    box: dict = {}
    started, finished = threading.Event(), threading.Event()

    def target() -> None:
        async def main():
            box["task"], box["loop"] = asyncio.current_task(), asyncio.get_running_loop()
            started.set()
            return await make_coro()

        try:
            box["result"] = asyncio.run(main())
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e
        finally:
            started.set()
            finished.set()

    t = threading.Thread(target=target, name="vllm-lab-load")
    t.start()
    try:
        while not finished.wait(0.2):
            pass
    except KeyboardInterrupt:
        started.wait()
        with contextlib.suppress(KeyError, RuntimeError):  # RuntimeError: the loop closed meanwhile
            box["loop"].call_soon_threadsafe(box["task"].cancel)
        while not finished.wait(0.2):  # bounded: cancelling ends every request at once
            pass
    t.join()
    if isinstance(box.get("error"), asyncio.CancelledError):
        raise KeyboardInterrupt  # cancelled before the first level: nothing measured
    if "error" in box:
        raise box["error"]
    return box["result"]


def _human(res: LoadResult) -> str:
    rows = [f"{'conc':>4} {'done':>5} {'fail':>4} {'out tok/s':>10} {'req/s':>7} {'ttft p50/p90 ms':>17} "
            f"{'itl p50 ms':>10} {'e2e p90 ms':>10} {'kv max':>6} {'preempt':>7}"]  # fmt: skip
    for x in res.levels:
        t, i, e = x["ttft_ms"], x["itl_ms"], x["e2e_ms"]
        rows.append(f"{x['concurrency']:>4} {x['completed']:>5} {x['failed']:>4} {_f(x['output_tokens_per_s']):>10} "
                    f"{_f(x['requests_per_s']):>7} {_f(t['p50']) + '/' + _f(t['p90']):>17} {_f(i['p50']):>10} "
                    f"{_f(e['p90']):>10} {_f(x['kv_cache_usage_max']):>6} {_f(x['preemptions']):>7}")  # fmt: skip
    if res.prompts and res.prompts.get("kind") == "text":
        rows.append(f"prompts: {prompts_words(res.prompts)}")
    rows.append(f"{'stable' if res.stable else 'NOT stable'}: {res.reason}")
    rows.append(f"knee: {res.knee_concurrency if res.knee_concurrency is not None else '-'}"
                + (f" ({res.knee_reason})" if res.knee_reason else ""))  # fmt: skip
    return "\n".join(rows)


def prompts_words(prompts: dict) -> str:
    """Text prompts as the verdict says them: aimed by calibration, with what the server counted."""
    c = prompts.get("counted")
    counted = (f"counted by the server (usage.prompt_tokens): mean {c['mean']:g}, min {c['min']}, max {c['max']}"
               if c else "no count came back")  # fmt: skip
    asked = (
        "" if prompts["aimed_tokens"] == prompts["asked_tokens"] else f" (asked {prompts['asked_tokens']})"
    )
    return (
        f"text prompts of {prompts['words']} words, calibrated to {prompts['aimed_tokens']} tokens{asked}, "
        f"{counted}"
    )


def _f(v) -> str:
    return "-" if v is None else f"{v:g}"


def cli_load(args) -> int:
    """`vllm-lab load`: 0 stable, 1 measured and not stable, 2 bad input or unreachable (SpecError), 130 Ctrl-C."""
    params = {"concurrency": args.concurrency, "prompt_tokens": args.prompt_tokens,
              "output_tokens": args.output_tokens, "slo_ttft_ms": args.slo_ttft_ms,
              "request_timeout_s": args.request_timeout}  # fmt: skip
    if args.duration is not None:
        params.update(duration_s=args.duration, requests=args.requests)
    elif args.requests is not None:
        params["requests"] = args.requests
    spec = LoadSpec.from_params(params, where="vllm-lab load")
    vocab = args.vocab_size or _config_vocab(args.model)  # else the model card's root, else DEFAULT_VOCAB
    res = run_load(args.url, args.model, spec, api_key=args.api_key, log_path=args.log, vocab_size=vocab)
    print(json.dumps(res.to_dict()) if args.json else _human(res), file=sys.stdout)
    if res.interrupted:
        return 130
    return 0 if res.stable else 1


def _config_vocab(model: str) -> int | None:
    """vocab_size from config.json where `model` is the model's folder (vLLM's default served name, and its
    model card's root), or the GGUF file's header (llama-server's default served name is its -m path); None
    for a hub id."""
    if model.endswith(".gguf"):
        from vllm_lab.memory_gguf import read_gguf

        try:
            return read_gguf(model).n_vocab
        except (OSError, ValueError, KeyError):
            return None
    try:
        return int(json.loads((Path(model) / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
