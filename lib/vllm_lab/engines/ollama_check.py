"""What Ollama really did after it said it was ready (engines/ollama.py's after_ready): put the model into
the store where the trial asks (a .gguf created from its blob, a pull on request), load the model with
the trial's context, read /api/ps (context_reduced, part of the model on the CPU), then a long text request
whose usage.prompt_tokens must match what was sent (context_truncated).

Apart from ollama.py so that the engine registry imports without httpx (`vllm-lab gpus` and `preflight`
run on a bare python in scripts/gpu-check.sh).
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

import httpx

from vllm_lab.engines import ollama_store
from vllm_lab.engines.ollama_gguf import full_name
from vllm_lab.http_client import body_message
from vllm_lab.prompt_text import text as _text  # the word list the load's text prompts use too
from vllm_lab.prompt_text import token_line

if TYPE_CHECKING:
    from vllm_lab.spec import Trial

LOAD_KEEP_ALIVE = "1h"  # the model stays loaded for the trial (the server is stopped after it anyway)
LONG_OUTPUT_TOKENS = 4


class OllamaCheck:
    def __init__(self, trial: Trial, base_url: str, long: bool) -> None:
        self.trial, self.url, self.long = trial, base_url, long
        self.name = trial.served_model_name()  # a .gguf: the model created from it
        self.asked = trial.max_model_len
        self.timeout = trial.request_timeout_s
        self.out: dict = {}
        self.notes: list[str] = []
        self.count_error: str | None = None

    def _client(self) -> httpx.Client:
        return httpx.Client(timeout=self.timeout, trust_env=False)  # our loopback server: never a proxy

    def run(self) -> dict:
        if self.long:
            self.out["long_request_ok"] = None  # the generic (token-id) long request must not run here
        store = ollama_store.prepare(self.trial, self.url, self.name, self.timeout)  # a .gguf, a pull
        self.out.update(store)
        if "outcome" in store:
            return self._done()
        if not self._load():
            return self._done()
        ps = self._ps()
        if ps is None:
            return self._done()
        if not self._context(ps):
            return self._done()
        if self.long:
            self._long_request(self.out["context_used"] or self.asked)
        return self._done()

    def _done(self) -> dict:
        if self.notes:
            self.out["engine_note"] = "; ".join(self.notes)
        return self.out

    def _fail(self, outcome: str, failure: str, evidence: str, remedy: str) -> None:
        self.out.update(outcome=outcome, failure=failure, evidence=evidence, remedy=remedy)

    def _load(self) -> bool:
        body: dict = {"model": self.name, "prompt": "", "keep_alive": LOAD_KEEP_ALIVE, "stream": False}
        if self.asked:
            body["options"] = {"num_ctx": self.asked}
        try:
            with self._client() as c:
                r = c.post(f"{self.url}/api/generate", json=body)
        except httpx.HTTPError as e:
            self._fail("failed", "other", f"loading {self.name} broke off: {type(e).__name__}: {e}",
                       "read the log (log_path)")  # fmt: skip
            return False
        if r.status_code != 200:
            msg = _message(r)
            self._fail("failed", "model_not_found" if r.status_code == 404 else "other",
                       f"loading {self.name} (POST /api/generate): HTTP {r.status_code}: {msg}",
                       f"run `ollama pull {self.name}`" if r.status_code == 404 else
                       "the runner failed to load the model: read the log's llama.cpp lines above the error")  # fmt: skip
            return False
        return True

    def _ps(self) -> dict | None:
        try:
            with self._client() as c:
                models = c.get(f"{self.url}/api/ps").json().get("models") or []
        except (httpx.HTTPError, ValueError, AttributeError):
            models = []
        want = full_name(self.name)  # Ollama lists `qwen3` as qwen3:latest
        mine = next(
            (m for m in models if want in (full_name(m.get("name") or ""), full_name(m.get("model") or ""))),
            None,
        )
        if mine is None:
            self._fail("failed", "other", f"/api/ps does not list {self.name} after loading it",
                       "read the log (log_path): the runner may have exited")  # fmt: skip
        return mine

    def _context(self, ps: dict) -> bool:
        used, size, vram = ps.get("context_length"), ps.get("size"), ps.get("size_vram")
        self.out.update(context_used=used, model_size_bytes=size, model_vram_bytes=vram)
        if isinstance(size, int) and size > 0 and isinstance(vram, int):
            frac = round(vram / size, 3)
            self.out["offload_fraction"] = frac
            if 0 < frac < 1:
                self.notes.append(
                    f"part of the model on the CPU: size_vram {vram / 2**30:.1f} of {size / 2**30:.1f} GiB "
                    f"({frac:.0%} on the GPU); it runs at a fraction of the speed, not a fit"
                )
            elif frac == 0 and _gpu_visible(self.trial):  # Ollama falls back to the CPU without an error
                self.notes.append(
                    "the whole model on the CPU (size_vram 0) though a GPU is visible: Ollama found no usable "
                    "GPU (on Pascal a driver older than 570, or a build without its compute capability: see "
                    "the log's GPU discovery lines)"
                )
        if used is None:
            self.notes.append("this Ollama's /api/ps has no context_length (before 0.9.7): the context used "
                              "is not known")  # fmt: skip
            return True
        if self.asked and used < self.asked:
            self._fail(
                "failed", "context_reduced",
                f"Ollama loaded {self.name} with a context of {used} tokens, not the {self.asked} asked "
                "(/api/ps context_length): it lowered the context silently",
                "the context does not fit at these settings: lower max_model_len, or quantize the KV cache "
                "(OLLAMA_KV_CACHE_TYPE=q8_0 with OLLAMA_FLASH_ATTENTION=1), or use a smaller quantization; "
                "OLLAMA_NUM_PARALLEL=N needs N times the context; where the log says \"requested context size "
                "too large for model\", the model's own trained context is the limit",
            )  # fmt: skip
            return False
        return True

    # ---------------------------------------------------------------- the long request
    def _count(self, n_words: int, start: int) -> int | None:
        """usage.prompt_tokens of a prompt of n words (non-streamed, one output token)."""
        body = {"model": self.name, "prompt": _text(n_words, start), "max_tokens": 1, "temperature": 0}
        try:
            with self._client() as c:
                r = c.post(f"{self.url}/v1/completions", json=body)
            if r.status_code != 200:
                self.count_error = f"was refused: HTTP {r.status_code}: {_message(r)}"
                return None
            return int(r.json()["usage"]["prompt_tokens"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            self.count_error = f"came back without usage.prompt_tokens ({type(e).__name__})"
            return None

    def _long_request(self, ctx: int) -> None:
        target = ctx - LONG_OUTPUT_TOKENS
        k = max(8, min(200, ctx // 8))
        # a warm-up first: a chat template's fixed prefix is then cached for all three alike; distinct first
        # words after it, so no prompt shares more than that with another
        self._count(8, 0)
        p1, p2 = self._count(k, 1), self._count(2 * k, 2)
        if not p1 or not p2 or p2 <= p1:
            self.out.update(long_request_ok=False)
            why = self.count_error or "did not count more tokens than a shorter one"
            self._fail("unstable", "other", f"a short prompt ({k} or {2 * k} words) {why}",
                       "read the log (log_path): the runner may have died")  # fmt: skip
            return
        rate, overhead = token_line(k, p1, 2 * k, p2)
        n = max(1, int((target * 0.98 - overhead) / rate))  # 2 % below the context: a tokenizer's wobble
        expected = round(overhead + rate * n)
        body = {"model": self.name, "prompt": _text(n, 3), "max_tokens": LONG_OUTPUT_TOKENS, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        t0 = time.monotonic()
        ttft = counted = None
        error = None
        done = False
        try:
            with self._client() as c, c.stream("POST", f"{self.url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    error = f"was refused: HTTP {r.status_code}: {_message(r, read=True)}"
                else:
                    for line in r.iter_lines():
                        data = line[5:].strip() if line.startswith("data:") else ""
                        if data == "[DONE]":
                            done = True
                            break
                        if not data:
                            continue
                        chunk = json.loads(data)
                        if chunk.get("error"):
                            error = f"ended with an error chunk: {chunk['error']}"
                        if chunk.get("choices") and ttft is None:
                            ttft = time.monotonic() - t0
                        if isinstance(chunk.get("usage"), dict):
                            counted = chunk["usage"].get("prompt_tokens")
        except httpx.HTTPError as e:
            error = f"broke off: {type(e).__name__}: {e}"
        except ValueError as e:
            error = f"sent a chunk that is not JSON ({e})"
        total = expected + LONG_OUTPUT_TOKENS
        self.out.update(long_request_tokens=total, prompt_tokens_sent=expected, prompt_tokens_counted=counted)
        if error is None and not done:
            error = "did not complete (no [DONE])"
        if error is None and counted is None:
            error = "came back without usage.prompt_tokens (stream_options.include_usage)"
        if error is not None:
            self.out["long_request_ok"] = False
            self._fail("unstable", "other", f"a request of {total} tokens {error}",
                       "lower max_model_len (Ollama starts but cannot serve a full-length request)")  # fmt: skip
            return
        if counted < expected - max(8, expected // 100):
            self.out["long_request_ok"] = False
            self._fail(
                "unstable", "context_truncated",
                f"Ollama counted {counted} prompt tokens of the {expected} sent (usage.prompt_tokens) and "
                f"answered without an error: it cut the prompt silently; a context of {ctx} does not hold it",
                "the prompt was cut to fit a smaller slot: check OLLAMA_NUM_PARALLEL (each slot gets the "
                "context), OLLAMA_CONTEXT_LENGTH and num_ctx reaching the server, and lower max_model_len",
            )  # fmt: skip
            return
        self.out.update(long_request_ok=True, ttft_s=round(ttft, 3) if ttft is not None else None)


def _message(r: httpx.Response, read: bool = False) -> str:
    return body_message(r.read() if read else r.content)[:300]


def _gpu_visible(trial: Trial) -> bool:
    try:
        from vllm_lab import gpu  # NVML only when a trial is checked

        return bool(gpu.visible_physical_indices(env={**os.environ, **trial.env}))
    except Exception:
        return False
