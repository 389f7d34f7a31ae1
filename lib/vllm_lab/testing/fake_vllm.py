"""A test double for the vLLM OpenAI server: takes vLLM's argv, prints vLLM's real log lines, serves HTTP.

Run as `python -m vllm_lab.testing.fake_vllm [serve MODEL | --model MODEL] --max-model-len N ...`.
Every record it leads to says backend=fake (it prints `FAKE vLLM` in its first line, which the launcher
reads). It simulates vLLM V1's KV sizing from the model's config.json, so the capacity search can run on it:

    tokens = floor(budget / (16 * bytes_per_token)) * 16
    budget = --kv-cache-memory-bytes, else total * util - weights - overhead (simulated GPU below)

Environment knobs (all optional):
    FAKE_VLLM_VERSION      vLLM version whose log wording to print (default 0.10.2)
    FAKE_VLLM_SCENARIO     normal | hang | die_after_ready | die_mid_request | stubborn_child | flood
                           | error_chunk (a streamed prompt over FAKE_VLLM_ERROR_ABOVE tokens gets an error
                             chunk then [DONE], as vLLM streams a request that died, e.g. an activation OOM)
                           | oom_warnings (warning lines that mention OOM, then a normal start)
                           | fail:<kind> (print that failure kind's real message, exit 1)
    FAKE_VLLM_GPU_MIB      simulated GPU memory (default 24576, a Tesla P40)
    FAKE_VLLM_GPU_CC       simulated compute capability as an int (default 61)
    FAKE_VLLM_WEIGHTS_GIB  simulated weights (default 5.7)
    FAKE_VLLM_OVERHEAD_GIB simulated activation + non-torch memory (default 1.2)
    FAKE_VLLM_FREE_MIB     simulated free memory at start (default: all of it)
    FAKE_VLLM_UNSTABLE_ABOVE  prompts longer than this hang (a server that starts but is not stable)
    FAKE_VLLM_START_DELAY  seconds of fake model loading before the outcome (default 0.2)
    FAKE_VLLM_LINGER       seconds to linger after a fatal line before exiting (default 0)
    FAKE_VLLM_DIE_AFTER    seconds after ready for die_after_ready (default 1.0)
    FAKE_VLLM_ERROR_ABOVE  prompt tokens above which error_chunk errs (default 64: short chats still work)
    FAKE_VLLM_GPU_ALLOC    a factor: a child really holds factor x the KV budget of GPU memory (torch; the
                           fake NVML's ledger without a GPU), as vLLM's engine holds its KV cache;
                           under stubborn_child that child ignores SIGTERM (testing/gpu_alloc.py)

Under load (streamed /v1/completions, as `vllm-lab load` sends them; chunks shaped as vLLM 0.32 streams them):
    FAKE_VLLM_TOKEN_S      seconds between streamed tokens (default 0: streams instantly)
    FAKE_VLLM_CARD_LEN     0: /v1/models leaves out max_model_len (as OpenAI-compatible servers other than vLLM)
    FAKE_VLLM_MAX_SEQS     streams served at once; the rest wait (vllm:num_requests_waiting), as --max-num-seqs
    FAKE_VLLM_FAULT_AFTER  streams served cleanly before a load fault begins (default 4); the faults are
                           FAKE_VLLM_SCENARIO = die_mid_load (the next stream stops halfway: the engine's fatal
                             lines, then the process exits) | error_chunks_after (every later stream sends a few
                             tokens, then the EngineDeadError chunk and [DONE]) | stall_after (every later
                             stream sends a few tokens, then nothing: a per-request deadline must end it)
                             | flaky_stream (the next stream alone ends in the error chunk; the rest are clean)
                             | unhealthy_after (streams stay clean, /health answers 503 from then on)
    FAKE_VLLM_NEEDS_EAGER  1: a start without --enforce-eager dies capturing CUDA graphs (cuda_oom), as a
                           release whose graph memory sat outside the budget (before 0.21) could
    FAKE_VLLM_HEALTH       the status /health answers (default 200; 404: a server without /health, as Ollama)
    FAKE_VLLM_ENGINES      data-parallel engines (default 1): each has its own KV cache and seats, streams go
                           round-robin, and /metrics gives each series once per engine ({engine="0"}, ...)
/metrics counts what runs: vllm:num_requests_running/waiting, vllm:kv_cache_usage_perc (prompt + output
tokens of the running streams over the KV cache), vllm:num_preemptions_total (+1 each time a stream is
admitted while the running ones already need more KV than the cache holds; served all the same), and
vllm:prefix_cache_queries_total/hits_total in tokens (V1's prefix cache: a 16-token block of a prompt whose
whole prefix up to it was seen before is a hit).
`--ssl-certfile`/`--ssl-keyfile` serve https, as vLLM's flags do.

Like vLLM: `--api-key` (or VLLM_API_KEY) guards /v1/* (401 without it), `--served-model-name` names the
model requests must use (404 otherwise), and rope_scaling (yarn) scales the model's derived max length.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

GIB = 1024**3
BLOCK = 16


def _vtuple(v: str) -> tuple[int, int]:
    parts = v.split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


class Log:
    """Prints lines the way vLLM does: V1 prefixes engine lines with `(EngineCore_0 pid=..)`."""

    def __init__(self, version: str):
        self.version = version
        self.v1 = _vtuple(version) >= (0, 8)

    def _emit(self, who: str, level: str, src: str, msg: str) -> None:
        stamp = time.strftime("%m-%d %H:%M:%S")
        prefix = f"({who} pid={os.getpid()}) " if self.v1 else ""
        print(f"{prefix}{level} {stamp} [{src}] {msg}", flush=True)

    def api(self, msg: str, level: str = "INFO", src: str = "api_server.py:1") -> None:
        self._emit("APIServer", level, src, msg)

    def engine(self, msg: str, level: str = "INFO", src: str = "gpu_worker.py:1") -> None:
        self._emit("EngineCore_0", level, src, msg)

    def raw(self, msg: str) -> None:
        print(msg, flush=True)


def kv_bytes_per_token(cfg: dict) -> int:
    heads = cfg.get("num_attention_heads", 1)
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or cfg.get("hidden_size", 128) // heads
    return 2 * cfg.get("num_hidden_layers", 1) * kv_heads * head_dim * 2


def derived_max_len(cfg: dict) -> tuple[int, str]:
    """vLLM's derived max_model_len and its printed value: yarn scales original_max_position_embeddings."""
    limit: float = cfg.get("max_position_embeddings", 32768)
    rope = cfg.get("rope_scaling") or {}
    rtype = rope.get("rope_type", rope.get("type"))
    if rope.get("factor") and rtype not in ("su", "longrope", "llama3"):
        limit = float(rope.get("original_max_position_embeddings") or limit) * float(rope["factor"])
        return int(limit), repr(limit)  # vLLM prints the scaled value as a float
    return int(limit), str(limit)


def error_body(message: str, err_type: str, code: int, version: str) -> dict:
    """vLLM's ErrorResponse: wrapped in "error" from 0.11 on, flat before."""
    if _vtuple(version) >= (0, 11):
        return {"error": {"message": message, "type": err_type, "param": None, "code": code}}
    return {"object": "error", "message": message, "type": err_type, "param": None, "code": code}


def fmt(n: int) -> str:
    return f"{n:,}"


def failure_lines(kind: str, v: str, ctx: dict) -> list[str]:
    """The root-cause line (and its exception class) of each failure kind, in the wording of version v."""
    vt = _vtuple(v)
    n, m = ctx.get("max_model_len", 32768), ctx.get("tokens", 0)
    if kind == "kv_cache_insufficient":
        if vt < (0, 8):
            return [
                f"ValueError: The model's max seq len ({n}) is larger than the maximum number of tokens that can "
                f"be stored in KV cache ({m}). Try increasing `gpu_memory_utilization` or decreasing "
                "`max_model_len` when initializing the engine."
            ]
        model_s = "model's" if vt >= (0, 32) else "models's"
        need, avail = ctx.get("need_gib", 4.5), ctx.get("avail_gib", 1.0)
        est = (
            "Based on the available memory, the estimated maximum model length is . "
            if vt == (0, 8)  # 0.8.5 prints the sentence without the number (upstream bug)
            else f"Based on the available memory, the estimated maximum model length is {m}. "
        )
        return [
            f"ValueError: To serve at least one request with the {model_s} max seq len ({n}), ({need:.2f} GiB KV "
            f"cache is needed, which is larger than the available KV cache memory ({avail:.2f} GiB). {est}Try "
            "increasing `gpu_memory_utilization` or decreasing `max_model_len` when initializing the engine."
        ]
    if kind == "no_kv_memory":
        return [
            "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` "
            "when initializing the engine."
        ]
    if kind == "gpu_mem_util_unavailable":
        free, total, util = ctx.get("free_gib", 10.0), ctx.get("total_gib", 24.0), ctx.get("util", 0.9)
        dev = "" if vt < (0, 11) else " cuda:0"
        return [
            f"ValueError: Free memory on device{dev} ({free:.2f}/{total:.2f} GiB) on startup is less than desired "
            f"GPU memory utilization ({util}, {total * util:.2f} GiB). Decrease GPU memory utilization or reduce "
            "GPU memory used by other processes."
        ]
    if kind == "quantization_mismatch":
        return [
            "ValueError: Quantization method specified in the model config (awq) does not match the "
            "quantization method specified in the `quantization` argument (awq_marlin)."
        ]
    if kind == "quantization_unsupported_gpu":
        q, need = ctx.get("quant", "awq"), ctx.get("min_cc", 75)
        return [
            f"ValueError: The quantization method {q} is not supported for the current GPU. Minimum "
            f"capability: {need}. Current capability: {ctx.get('cc', 61)}."
        ]
    if kind == "dtype_unsupported_gpu":
        return [
            "ValueError: Bfloat16 is only supported on GPUs with compute capability of at least 8.0. Your "
            "Tesla P40 GPU has compute capability 6.1. You can use float16 instead by explicitly setting the "
            "`dtype` flag in CLI, for example: --dtype=half."
        ]
    if kind == "gpu_unsupported":
        return ["RuntimeError: CUDA error: no kernel image is available for execution on the device"]
    if kind == "cuda_oom":
        return [
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
            "of 23.87 GiB of which 1.02 GiB is free."
        ]
    if kind == "max_len_exceeds_model":
        d = ctx.get("model_limit", 40960)
        msg = (
            f"User-specified max_model_len ({n}) is greater than the derived max_model_len "
            f"(max_position_embeddings={d} or model_max_length=None in model's config.json). To allow "
            "overriding this maximum, set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1. VLLM_ALLOW_LONG_MAX_MODEL_LEN "
            "must be used with extreme caution."
        )
        if vt >= (0, 10):
            return [
                "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig",
                f"  Value error, {msg} [type=value_error, input_value=ArgsKwargs(()), input_type=ArgsKwargs]",
            ]
        return [f"ValueError: {msg}"]
    if kind == "port_in_use":
        return ["OSError: [Errno 98] Address already in use"]
    if kind == "model_not_found":
        return [f"OSError: Invalid repository ID or local directory specified: '{ctx.get('model', 'x')}'."]
    return ["RuntimeError: something unexpected happened"]


def die(log: Log, kind: str, ctx: dict) -> None:
    log.raw("Traceback (most recent call last):")
    log.raw('  File "/usr/lib/python3/site-packages/vllm/v1/engine/core.py", line 1, in run_engine_core')
    for line in failure_lines(kind, log.version, ctx):
        log.engine(line, level="ERROR", src="core.py:1")
    if log.v1:
        log.raw("RuntimeError: Engine core initialization failed. See root cause above. "
                "Failed core proc(s): {'EngineCore_0': 1}")  # fmt: skip
    else:
        log.raw("RuntimeError: Engine process failed to start. See stack trace for the root cause.")
    # A real vLLM takes a while to wind down after the root cause is printed; fail-fast must not wait for it.
    time.sleep(float(os.environ.get("FAKE_VLLM_LINGER", "0")))
    sys.exit(1)


def spawn_engine_child(stubborn: bool) -> subprocess.Popen:
    """V1 starts an EngineCore process; a stubborn one ignores SIGTERM (the launcher must still end it)."""
    code = (
        "# fake_vllm EngineCore\nimport signal, time\n"
        + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if stubborn else "")
        + "while True: time.sleep(1)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code])


def hold_kv_cache(log: Log, nbytes: float, stubborn: bool) -> subprocess.Popen:
    """A child that really holds the KV cache's GPU memory until the tree is stopped (it ends with it)."""
    from vllm_lab.testing.gpu_alloc import AllocError, spawn_holder

    try:
        proc, info = spawn_holder(nbytes / 2**20, stubborn=stubborn)
    except AllocError as e:
        log.engine(str(e), level="ERROR", src="gpu_model_runner.py:1")
        sys.exit(1)
    log.engine(f"GPU_ALLOC {json.dumps(info)}", src="gpu_model_runner.py:1")
    return proc


def make_handler(state: dict):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # vLLM logs access lines; keep them short
            print(
                f'INFO:     127.0.0.1 - "{self.command} {self.path}" {args[1] if len(args) > 1 else ""}',
                flush=True,
            )

        def _json(self, code: int, obj) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _refused(self, model: str | None = None) -> bool:
            """vLLM's guards: a key on /v1/* (AuthenticationMiddleware), then the served model name."""
            keys = state["api_keys"]
            auth = self.headers.get("Authorization") or ""
            if self.path.startswith("/v1") and keys and auth.partition(" ")[2] not in keys:
                self._json(401, {"error": "Unauthorized"})
                return True
            if model and model not in state["names"]:
                msg = f"The model `{model}` does not exist."
                self._json(404, error_body(msg, "NotFoundError", 404, state["version"]))
                return True
            return False

        def do_GET(self):
            if self._refused():
                return
            if self.path == "/health":
                load = state["load"]
                sick = load.fault == "unhealthy_after" and load.streams > load.fault_after
                code = 503 if sick else state["health"]
                self._json(
                    code, {} if code == 200 else {"detail": "Not Found" if code == 404 else "unhealthy"}
                )
            elif self.path == "/v1/models":
                card = {"max_model_len": state["max_model_len"]} if state["card_len"] else {}
                # vLLM's card: root is the model as given to `serve` (a folder or a hub id)
                self._json(200, {"object": "list", "data": [
                    {"id": name, "object": "model", "root": state["model"], **card}
                    for name in state["names"]]})  # fmt: skip
            elif self.path == "/version":
                self._json(200, {"version": state["version"]})
            elif self.path == "/metrics":
                body = _metrics_page(state).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self._json(404, {"detail": "Not Found"})

        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            req = json.loads(self.rfile.read(n) or b"{}")
            if self._refused(req.get("model")):
                return
            if state["scenario"] == "die_mid_request":
                os._exit(1)
            prompt = req.get("prompt", req.get("messages", ""))
            plen = len(prompt) if isinstance(prompt, list) and all(isinstance(x, int) for x in prompt) else 16
            max_tokens = int(req.get("max_tokens") or 16)
            too_long = plen + max_tokens > state["max_model_len"]
            if too_long and plen < state["max_model_len"] and _cuts_short(state):
                max_tokens = state["max_model_len"] - plen  # 0.32 serves what fits: finish_reason "length"
            elif too_long:
                self._json(400, {"object": "error", "type": "BadRequestError", "code": 400, "message": (
                    f"This model's maximum context length is {state['max_model_len']} tokens. However, you requested "
                    f"{plen + max_tokens} tokens ({plen} in the messages, {max_tokens} in the completion). "
                    "Please reduce the length of the messages or completion.")})  # fmt: skip
                return
            unstable = state["unstable_above"]
            if unstable is not None and plen > unstable:
                time.sleep(3600)  # a request that never finishes: the long-request deadline must catch it
            state["usage"] = min(1.0, plen / max(state["tokens"], 1))
            text = " hello" * max_tokens
            if self.path == "/v1/chat/completions":
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "length",
                }
            else:
                choice = {"index": 0, "text": text, "finish_reason": "length"}
            if req.get("stream") and self.path == "/v1/completions" and state["scenario"] != "error_chunk":
                self._stream_completion(req, plen, max_tokens)
                return
            if req.get("stream"):  # server-sent events, as vLLM streams
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                if state["scenario"] == "error_chunk" and plen > state["error_above"]:
                    # What vLLM streams when the request dies (its stream generator's except branch).
                    oom = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.87 GiB"
                    _stream_error(self.wfile, state["version"], "serving.py:1", "torch.OutOfMemoryError", oom)
                    return
                for i in range(max_tokens):
                    chunk = {
                        "id": "cmpl-fake",
                        "object": "text_completion",
                        "model": state["served"],
                        "choices": [{"index": 0, "text": " hello",
                                     "finish_reason": "length" if i == max_tokens - 1 else None}],
                    }  # fmt: skip
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                if (req.get("stream_options") or {}).get("include_usage"):
                    usage = {"prompt_tokens": plen, "completion_tokens": max_tokens,
                             "total_tokens": plen + max_tokens}  # fmt: skip
                    last = {"id": "cmpl-fake", "model": state["served"], "choices": [], "usage": usage}
                    self.wfile.write(f"data: {json.dumps(last)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                return
            self._json(200, {"id": "cmpl-fake", "object": "text_completion", "model": state["served"],
                             "choices": [choice],
                             "usage": {"prompt_tokens": plen, "completion_tokens": max_tokens,
                                       "total_tokens": plen + max_tokens}})  # fmt: skip

        def _stream_completion(self, req: dict, plen: int, max_tokens: int) -> None:
            """A streamed completion as vLLM 0.32's completion stream generator writes it, under the load knobs."""
            load: LoadState = state["load"]
            prompt = req.get("prompt")
            top = max(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], int) else -1
            if top >= state["vocab_size"]:  # 0.32 validates token ids after the stream began
                err = error_body(
                    f"Token id {top} is out of vocabulary", "BadRequestError", 400, state["version"]
                )
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.end_headers()
                err = err if "error" in err else {"error": err}
                self.wfile.write(f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode())
                return
            ids = prompt if isinstance(prompt, list) else []
            fault, engine = load.admit(
                plen + max_tokens, ids
            )  # waits for a seat when FAKE_VLLM_MAX_SEQS is set
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.end_headers()
                rid, created = f"cmpl-{os.urandom(16).hex()}", int(time.time())
                stop_at = max_tokens // 2 if fault else max_tokens
                burst = []  # streaming instantly: every chunk in one write, so the fake is not what is measured
                for i in range(stop_at):
                    last = i == max_tokens - 1
                    # model_dump_json(exclude_unset=True): the fields set explicitly, None included
                    chunk = {"id": rid, "object": "text_completion", "created": created, "model": state["served"],
                             "choices": [{"index": 0, "text": " hello", "logprobs": None,
                                          "finish_reason": "length" if last else None, "stop_reason": None,
                                          "prompt_token_ids": None, "token_ids": None}]}  # fmt: skip
                    burst.append(f"data: {json.dumps(chunk)}\n\n".encode())
                    if load.token_s:
                        time.sleep(load.token_s)
                        self.wfile.write(burst.pop())
                self.wfile.write(b"".join(burst))
                if fault == "die_mid_load":
                    _engine_death(state["version"])
                    state["engine"].kill()  # the engine died first; no orphan outlives a fake run by hand
                    os._exit(1)
                if fault == "stall_after":
                    self.wfile.flush()
                    time.sleep(3600)  # a stream that stops: the client's per-request deadline must end it
                    return
                if fault == "flaky_stream":  # one request fails; the engine lives on
                    _stream_error(self.wfile, state["version"], "serving.py:500", "asyncio.TimeoutError",
                                  "the request timed out inside the engine (a one-off)")  # fmt: skip
                    return
                if fault == "error_chunks_after":
                    msg = "EngineCore encountered an issue. See stack trace (above) for the root cause."
                    _stream_error(self.wfile, state["version"], "serving.py:500",
                                  "vllm.v1.engine.exceptions.EngineDeadError", msg)  # fmt: skip
                    return
                if (req.get("stream_options") or {}).get("include_usage"):
                    # model_dump_json(exclude_unset=False, exclude_none=True): no None fields at all
                    usage = {
                        "prompt_tokens": plen,
                        "total_tokens": plen + max_tokens,
                        "completion_tokens": max_tokens,
                    }
                    last = {"id": rid, "object": "text_completion", "created": created, "model": state["served"],
                            "choices": [], "usage": usage}  # fmt: skip
                    self.wfile.write(f"data: {json.dumps(last)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
            finally:
                load.release(plen + max_tokens, engine)

    return Handler


FAULTS = ("die_mid_load", "error_chunks_after", "stall_after", "flaky_stream", "unhealthy_after")


class LoadState:
    """What runs now on each engine (for /metrics) and when a load fault begins; shared by the handler threads."""

    def __init__(self, env, scenario: str, kv_tokens_total: int):
        self.lock = threading.Lock()
        self.token_s = float(env.get("FAKE_VLLM_TOKEN_S") or 0)
        max_seqs = int(env.get("FAKE_VLLM_MAX_SEQS") or 0)
        n = max(1, int(env.get("FAKE_VLLM_ENGINES") or 1))
        # each data-parallel engine has its own KV cache, seats (--max-num-seqs) and counters
        self.engines = [{"running": 0, "waiting": 0, "kv_tokens": 0, "preemptions": 0, "hits": 0, "queries": 0,
                         "seats": threading.BoundedSemaphore(max_seqs) if max_seqs > 0 else None,
                         "blocks": set()} for _ in range(n)]  # fmt: skip
        self.fault = scenario if scenario in FAULTS else None
        self.fault_after = int(env.get("FAKE_VLLM_FAULT_AFTER") or 4)
        self.capacity = kv_tokens_total
        self.streams = 0

    def admit(self, need: int, prompt: list) -> tuple[str | None, int]:
        """Take a seat on the next engine (waiting for one when all are taken); the fault this stream meets,
        if any, and the engine."""
        with self.lock:
            e = self.streams % len(self.engines)
            self.streams += 1
            number = self.streams
            eng = self.engines[e]
            eng["waiting"] += 1
            eng["queries"] += len(prompt)
            eng["hits"] += _prefix_hits(eng["blocks"], prompt)
        if eng["seats"] is not None:
            eng["seats"].acquire()
        with self.lock:
            eng["waiting"] -= 1
            eng["running"] += 1
            if eng["kv_tokens"] + need > self.capacity:
                eng["preemptions"] += 1
            eng["kv_tokens"] += need
        fault = self.fault if self.fault and number > self.fault_after else None
        if fault == "flaky_stream" and number != self.fault_after + 1:
            fault = None
        return (None if fault == "unhealthy_after" else fault), e

    def release(self, need: int, e: int) -> None:
        eng = self.engines[e]
        with self.lock:
            eng["running"] -= 1
            eng["kv_tokens"] -= need
        if eng["seats"] is not None:
            eng["seats"].release()


def _prefix_hits(seen: set, prompt: list) -> int:
    """V1's prefix cache, in tokens: each full block whose whole prefix was served before is a hit."""
    hits, key = 0, ()
    for i in range(0, len(prompt) - len(prompt) % BLOCK, BLOCK):
        key = hash((key, tuple(prompt[i : i + BLOCK])))
        hits += BLOCK if key in seen else 0  # the key chains the whole prefix: a hit is a cached prefix
        seen.add(key)
    return hits


def _metrics_page(state: dict) -> str:
    """Each series once per engine, as vLLM with --data-parallel-size exports them."""
    load: LoadState = state["load"]
    series = {"kv_cache_usage_perc": "gauge", "num_requests_running": "gauge", "num_requests_waiting": "gauge",
              "num_preemptions_total": "counter", "prefix_cache_queries_total": "counter",
              "prefix_cache_hits_total": "counter"}  # fmt: skip
    lines = []
    with load.lock:
        for name, kind in series.items():
            lines.append(f"# TYPE vllm:{name.removesuffix('_total')} {kind}")
            for e, eng in enumerate(load.engines):
                if name == "kv_cache_usage_perc":  # the long request (not streamed) counts on engine 0
                    value = min(1.0, eng["kv_tokens"] / max(state["tokens"], 1))
                    value = max(value, state["usage"]) if e == 0 else value
                elif name.startswith("prefix_cache"):
                    value = eng["hits" if "hits" in name else "queries"]
                else:
                    value = eng[name.split("_")[-1] if name.startswith("num_requests") else "preemptions"]
                lines.append(f'vllm:{name}{{engine="{e}",model_name="{state["served"]}"}} {float(value)}')
    lines.append(f'vllm:cache_config_info{{block_size="16",num_gpu_blocks="{state["tokens"] // BLOCK}"}} 1.0')
    return "\n".join(lines) + "\n"


def _stream_error(wfile, version: str, where: str, exc: str, msg: str) -> None:
    """What vLLM does when a streamed request dies: log the stream generator's error, then send it as an
    error chunk and [DONE] inside the HTTP 200 already sent."""
    print(f"ERROR {time.strftime('%m-%d %H:%M:%S')} [{where}] Error in completion stream generator.\n"
          f"{exc}: {msg}", flush=True)  # fmt: skip
    err = error_body(msg, "InternalServerError", 500, version)
    err = err if "error" in err else {"error": err}
    wfile.write(f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n".encode())


def _cuts_short(state: dict) -> bool:
    """A request longer than max_model_len: 0.27 refuses it (HTTP 400), 0.32 serves the tokens that fit
    (both seen on the CPU builds here; the release in between that changed it is not known)."""
    return _vtuple(state["version"]) >= (0, 32)


def _engine_death(version: str) -> None:
    """The lines a V1 engine prints when it dies under load (then the API server exits)."""
    log = Log(version)
    log.engine("EngineCore encountered a fatal error.", level="ERROR", src="core.py:800")
    log.raw("Traceback (most recent call last):")
    log.raw("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 512.00 MiB. GPU 0 has a total capacity "
            "of 23.87 GiB of which 100.00 MiB is free.")  # fmt: skip


def parse_args(argv: list[str]) -> argparse.Namespace:
    if argv and argv[0] == "serve":  # `vllm serve MODEL ...`
        argv = ["--model", *argv[1:2], *argv[2:]] if len(argv) > 1 else argv[1:]
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-memory-bytes", type=int)
    p.add_argument("--quantization")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--served-model-name", nargs="+")
    p.add_argument("--api-key", nargs="+")
    p.add_argument("--ssl-keyfile")
    p.add_argument("--ssl-certfile")
    args, _unknown = p.parse_known_args(argv)  # real vLLM takes hundreds of flags; ignore the rest
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    env = os.environ
    version = env.get("FAKE_VLLM_VERSION", "0.10.2")
    scenario = env.get("FAKE_VLLM_SCENARIO", "normal")
    log = Log(version)
    log.api("FAKE vLLM: a test double, backend=fake; nothing it prints is a measurement")
    log.api(f"vLLM API server version {version}")
    log.api(f"non-default args: {sys.argv[1:] if argv is None else argv}", src="utils.py:1")

    # Like vLLM >= 0.6.2, bind the port before loading the model.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError:
        die(log, "port_in_use", {})

    cfg_path = Path(args.model) / "config.json"
    if not cfg_path.is_file():
        die(log, "model_not_found", {"model": args.model})
    cfg = json.loads(cfg_path.read_text())
    limit, limit_text = derived_max_len(cfg)
    max_len = args.max_model_len or limit
    ctx: dict = {"max_model_len": max_len, "model_limit": limit_text}
    if scenario.startswith("fail:"):
        die(log, scenario.split(":", 1)[1], ctx)
    if max_len > limit:
        die(log, "max_len_exceeds_model", ctx)

    cc = int(env.get("FAKE_VLLM_GPU_CC", "61"))
    cfg_quant = (cfg.get("quantization_config") or {}).get("quant_method")
    if args.quantization and cfg_quant and args.quantization != cfg_quant and cc < 80:
        die(log, "quantization_mismatch", ctx)
    quant = args.quantization or cfg_quant
    min_cc = {"awq": 75, "awq_marlin": 80, "gptq": 60, "gptq_marlin": 80, "gguf": 60, "fp8": 80}.get(
        quant or "", 0
    )
    if cc < min_cc:
        die(log, "quantization_unsupported_gpu", {**ctx, "quant": quant, "min_cc": min_cc, "cc": cc})

    engine = spawn_engine_child(stubborn=scenario == "stubborn_child")

    def _stop(signum, frame):  # like vLLM's API server: SIGTERM shuts the engine down too
        engine.terminate()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _stop)
    if scenario == "oom_warnings":  # warnings that mention OOM; the start goes on (only fatal lines end it)
        log.raw("WARNING:root:CUDA out of memory while probing a warm-up batch size; retrying smaller")
        log.raw("[W1128 23:10:01.123456789 CUDACachingAllocator.cpp:1] Warning: OOM in a cuDNN benchmark trial; "
                "falling back to a slower algorithm (function operator())")  # fmt: skip
    time.sleep(float(env.get("FAKE_VLLM_START_DELAY", "0.2")))
    if scenario == "hang":
        log.engine("Loading model weights ...")
        while True:
            time.sleep(1)

    total_gib = int(env.get("FAKE_VLLM_GPU_MIB", "24576")) / 1024
    free_gib = int(env.get("FAKE_VLLM_FREE_MIB", str(int(total_gib * 1024)))) / 1024
    util = args.gpu_memory_utilization
    weights = float(env.get("FAKE_VLLM_WEIGHTS_GIB", "5.7"))
    overhead = float(env.get("FAKE_VLLM_OVERHEAD_GIB", "1.2"))
    if args.kv_cache_memory_bytes is None and _vtuple(version) >= (0, 9) and free_gib < total_gib * util:
        die(log, "gpu_mem_util_unavailable", {"free_gib": free_gib, "total_gib": total_gib, "util": util})
    v1 = log.v1
    log.engine(f"Model loading took {weights:.4f} GiB and 1.23 seconds" if v1 else
               f"Loading model weights took {weights:.4f} GB")  # fmt: skip
    budget = args.kv_cache_memory_bytes if args.kv_cache_memory_bytes is not None else (
        (total_gib * util - weights - overhead) * GIB)  # fmt: skip
    bpt = kv_bytes_per_token(cfg)
    blocks = max(0, math.floor(budget / (BLOCK * bpt)))
    if _vtuple(version) >= (0, 33):
        blocks = max(0, blocks - 1)  # 0.33 keeps one null block back
    tokens = blocks * BLOCK
    avail = budget / GIB
    if _vtuple(version) >= (0, 10):
        log.engine(f"Available KV cache memory: {avail:.2f} GiB")
    if blocks <= 0:
        if not v1:
            log.engine("# GPU blocks: 0, # CPU blocks: 2048", src="executor_base.py:1")
        die(log, "no_kv_memory", ctx)
    if max_len > tokens:
        die(
            log,
            "kv_cache_insufficient",
            {**ctx, "tokens": tokens, "need_gib": max_len * bpt / GIB, "avail_gib": avail},
        )
    if env.get("FAKE_VLLM_NEEDS_EAGER") == "1" and not args.enforce_eager:
        log.engine("Capturing CUDA graphs (mixed prefill-decode, PIECEWISE)")
        die(log, "cuda_oom", ctx)
    alloc = float(env.get("FAKE_VLLM_GPU_ALLOC") or 0)
    if alloc > 0:  # its child holds the memory until the tree is stopped
        hold_kv_cache(log, budget * alloc, scenario == "stubborn_child")
    conc = tokens / max_len
    if not v1:
        log.engine(f"# GPU blocks: {blocks}, # CPU blocks: 2048", src="executor_base.py:1")
    elif _vtuple(version) >= (0, 32):
        log.engine(f"GPU KV cache size: {fmt(tokens)} tokens, Maximum concurrency for {fmt(max_len)} tokens per "
                   f"request: {conc:.2f}x", src="kv_cache_utils.py:1")  # fmt: skip
    else:
        log.engine(f"GPU KV cache size: {fmt(tokens)} tokens", src="kv_cache_utils.py:1")
        log.engine(
            f"Maximum concurrency for {fmt(max_len)} tokens per request: {conc:.2f}x",
            src="kv_cache_utils.py:1",
        )
    log.engine("init engine (profile, create kv cache, warmup model) took 1.50 seconds", src="core.py:1")

    names = args.served_model_name or [args.model]
    # The flag wins over VLLM_API_KEY, as in vLLM.
    keys = args.api_key or ([env["VLLM_API_KEY"]] if env.get("VLLM_API_KEY") else [])
    state = {"served": names[0], "names": names, "api_keys": keys, "max_model_len": max_len, "version": version,
             "error_above": int(env.get("FAKE_VLLM_ERROR_ABOVE", "64")),
             "card_len": env.get("FAKE_VLLM_CARD_LEN") != "0", "model": args.model,
             "health": int(env.get("FAKE_VLLM_HEALTH") or 200),
             "tokens": tokens, "usage": 0.0, "scenario": scenario, "load": LoadState(env, scenario, tokens), "engine": engine,
             "vocab_size": int(cfg.get("vocab_size") or 32000),
             "unstable_above": int(env["FAKE_VLLM_UNSTABLE_ABOVE"]) if env.get("FAKE_VLLM_UNSTABLE_ABOVE") else None}  # fmt: skip
    server = ThreadingHTTPServer((args.host, args.port), make_handler(state), bind_and_activate=False)
    server.socket.close()
    server.socket = sock  # the socket bound at start, as vLLM does
    server.request_queue_size = 2048  # uvicorn's backlog; socketserver's 5 resets connections under load
    server.server_activate()
    if args.ssl_certfile and args.ssl_keyfile:  # vLLM's --ssl-*: https on the same port
        import ssl

        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(args.ssl_certfile, args.ssl_keyfile)
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    log.raw(f"INFO:     Started server process [{os.getpid()}]")
    log.raw("INFO:     Waiting for application startup.")
    log.raw("INFO:     Application startup complete.")
    if scenario == "flood":
        threading.Thread(target=_flood, daemon=True).start()
    if scenario == "die_after_ready":
        threading.Timer(float(env.get("FAKE_VLLM_DIE_AFTER", "1.0")), lambda: os._exit(3)).start()

    server.serve_forever()


def _flood() -> None:
    """A chatty server (debug logging): several MB/s for as long as it runs."""
    line = "DEBUG " + "x" * 200
    while True:
        for _ in range(2000):
            print(line, flush=False)
        sys.stdout.flush()
        time.sleep(0.05)


if __name__ == "__main__":
    main()
