"""Ollama (`ollama serve`) as an engine: argv and environment, readiness, bad input, and the checks that
catch what Ollama does silently.

One `ollama serve` per trial on a free loopback port (OLLAMA_HOST), with the user's model store (OLLAMA_MODELS)
shared. What makes Ollama different from vLLM and llama-server:
- The model loads on the first request, not at start: the server is ready when `GET /` answers 200 ("Ollama
  is running"; there is no /health), and `after_ready` loads the model with a native request (keep_alive,
  num_ctx) and reads /api/ps: context_length, size, size_vram.
- The context is pinned: the trial's max_model_len goes in as OLLAMA_CONTEXT_LENGTH (the /v1 endpoint cannot
  set it) and as num_ctx. Ollama lowers a context that does not fit without an error: /api/ps showing less
  than asked is the failure `context_reduced`. size_vram < size (part of the model on the CPU) is recorded
  (offload_fraction) and said in the note: it "works" at a fraction of the speed.
- A prompt over the context is cut without an error. The long request (text: Ollama's /v1/completions takes
  no token ids) checks usage.prompt_tokens against what was sent, calibrated on two short prompts (Ollama
  has no tokenize endpoint); a shortfall is the failure `context_truncated`, never long_request_ok.
- Its log is Go's slog lines plus, since 0.30, the llama-server runner's llama.cpp lines: llamacpp_log reads
  both (Ollama's own failure lines are in its rules).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import httpx

from vllm_lab import commands
from vllm_lab.engines import llamacpp_log
from vllm_lab.engines.base import METRIC_NAMES, Engine
from vllm_lab.errors import SpecError

if TYPE_CHECKING:
    from vllm_lab.spec import Trial

INSTALL_HINT = (
    "install Ollama's server: `curl -fsSL https://ollama.com/install.sh | sh` (Linux; see "
    "https://ollama.com/download), or the ollama/ollama container; PyPI's and Debian's `ollama` are only clients"
)
# The knobs a trial may set (env, or extra_args as NAME=value); the rest of OLLAMA_* is the user's business.
KNOBS = ("OLLAMA_NUM_PARALLEL", "OLLAMA_FLASH_ATTENTION", "OLLAMA_KV_CACHE_TYPE")
OWN_ENV = {"OLLAMA_HOST": "the port (vllm-lab picks a free one)", "OLLAMA_CONTEXT_LENGTH": "max_model_len"}
# Flags of the other engines -> what stands for them with Ollama (`ollama serve` takes no flags at all).
FOREIGN_FLAGS = {
    "--max-model-len": "max_model_len (OLLAMA_CONTEXT_LENGTH)", "-c": "max_model_len (OLLAMA_CONTEXT_LENGTH)",
    "--ctx-size": "max_model_len (OLLAMA_CONTEXT_LENGTH)", "--max-num-seqs": "OLLAMA_NUM_PARALLEL=N",
    "-np": "OLLAMA_NUM_PARALLEL=N", "--parallel": "OLLAMA_NUM_PARALLEL=N",
    "--kv-cache-dtype": "OLLAMA_KV_CACHE_TYPE=q8_0 with OLLAMA_FLASH_ATTENTION=1",
    "-ctk": "OLLAMA_KV_CACHE_TYPE=q8_0 with OLLAMA_FLASH_ATTENTION=1",
    "-ctv": "OLLAMA_KV_CACHE_TYPE=q8_0 with OLLAMA_FLASH_ATTENTION=1",
    "-fa": "OLLAMA_FLASH_ATTENTION=1", "--flash-attn": "OLLAMA_FLASH_ATTENTION=1",
    "--gpu-memory-utilization": None, "--quantization": "a model tag of that quantization (e.g. qwen3:8b-q4_K_M)",
}  # fmt: skip
_ASSIGN = re.compile(r"^(OLLAMA_[A-Z_]+)=(.*)$")
LOAD_KEEP_ALIVE = "1h"  # the model stays loaded for the trial (the server is stopped after it anyway)
LONG_OUTPUT_TOKENS = 4
# A word list for text prompts: common words, most one token each with a leading space in BPE vocabularies.
_WORD_TEXT = (
    "the of and to in is was for on are with as at be this have from or one had by word but not what all were "
    "we when your can said there use an each which she do how their if will up other about out many then them "
    "these so some her would make like him into time has look two more write go see number no way could people "
    "my than first water been call who oil its now find long down day did get come made may part"
)
_WORDS = tuple(_WORD_TEXT.split())


def store(env: Mapping[str, str] | None = None) -> Path:
    """The model store the server will use: OLLAMA_MODELS (the trial's env, then ours), else ~/.ollama/models."""
    value = (env or {}).get("OLLAMA_MODELS") or os.environ.get("OLLAMA_MODELS")
    return Path(value).expanduser() if value else Path.home() / ".ollama" / "models"


def manifest_path(root: Path, name: str) -> Path:
    """Where `ollama pull NAME` writes the manifest: manifests/registry.ollama.ai/library/NAME/TAG."""
    base, _, tag = name.partition(":")
    parts = base.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", *parts]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    return root / "manifests" / Path(*parts) / (tag or "latest")


def _extra_env(trial: Trial) -> dict[str, str]:
    return {m.group(1): m.group(2) for a in trial.extra_args if (m := _ASSIGN.match(a))}


class OllamaEngine(Engine):
    name = "ollama"
    default_cmd = "ollama serve"
    health_path = "/"  # "Ollama is running"; Ollama has no /health
    ready_marker = "Listening on"  # routes.go: msg="Listening on 127.0.0.1:11434 (version 0.31.2)"
    install_hint = INSTALL_HINT
    cmd_example = "`ollama serve`"
    hub_models = False  # names in Ollama's own store (OLLAMA_MODELS), never Hugging Face hub ids
    metrics = MappingProxyType(dict.fromkeys(METRIC_NAMES, ()))  # Ollama serves no /metrics

    # ---------------------------------------------------------------- bad input
    def validate(self, trial: Trial) -> None:
        model = trial.model
        if model.endswith(".gguf") or Path(model).expanduser().is_file():
            stem = Path(model).stem.lower().replace("_", "-")
            raise SpecError(
                f"model: {model} is a file; Ollama serves models from its store: write a Modelfile with "
                f"`FROM {Path(model).expanduser().resolve()}`, run `ollama create {stem} -f Modelfile`, "
                f"then use model: {stem}"
            )
        if not re.match(r"^[\w.-]+(/[\w.-]+){0,2}(:[\w.-]+)?$", model):
            raise SpecError(f"model: {model!r} is not an Ollama model name (e.g. qwen3:8b-q4_K_M)")
        if trial.gpu_memory_utilization is not None or trial.kv_cache_memory_bytes is not None:
            raise SpecError(
                "gpu_memory_utilization / kv_cache_memory_bytes: are vLLM's; Ollama sizes its own memory "
                "(limit the context with max_model_len, the KV with OLLAMA_KV_CACHE_TYPE)"
            )
        if trial.launcher == "explicit" and trial.quantization:
            raise SpecError(
                "quantization: is vLLM's flag; an Ollama tag names its quantization (qwen3:8b-q4_K_M)"
            )
        for arg in trial.extra_args:
            m = _ASSIGN.match(arg)
            if m:
                if m.group(1) in OWN_ENV:
                    raise SpecError(f"extra_args: {m.group(1)} is set from the trial's {OWN_ENV[m.group(1)]}")
                continue
            flag = arg.split("=", 1)[0]
            instead = FOREIGN_FLAGS.get(flag, "OLLAMA_* settings as NAME=value (OLLAMA_NUM_PARALLEL=2)")
            raise SpecError(
                f"extra_args: {flag} is not Ollama's; `ollama serve` takes no flags"
                + (f": for Ollama use {instead}" if instead else ": Ollama sizes its own memory")
            )
        if trial.load is not None:
            raise SpecError(
                "load: not with Ollama yet: the load sends token-id prompts, which Ollama's /v1/completions "
                "refuses (it takes text); measure Ollama without load:"
            )
        for k in OWN_ENV:
            if k in trial.env:
                raise SpecError(f"env: {k} is set from the trial's {OWN_ENV[k]}; set that instead")
        if commands.analyse(trial.vllm_cmd).run_at is None:  # a container's store is inside it
            root = store(trial.env)
            if not manifest_path(root, model).is_file():
                raise SpecError(
                    f"model: {model} is not in the Ollama store {root}; run `ollama pull {model}` first "
                    "(or set OLLAMA_MODELS to the store that has it)"
                )

    # ---------------------------------------------------------------- the server
    def argv(self, trial: Trial, port: int, host: str) -> list[str]:
        cmd = commands.split_cmd(trial.vllm_cmd)
        if "serve" not in cmd:
            cmd = [*cmd, "serve"]
        c = commands.analyse(trial.vllm_cmd)
        if c.run_at is not None:  # inside the container: listen on the published port; our env by name
            names = ["OLLAMA_HOST", *self.env(trial)]
            opts = [
                w for n in names for w in ("-e", n if n != "OLLAMA_HOST" else f"OLLAMA_HOST={host}:{port}")
            ]
            return [*cmd[: c.run_at + 1], *opts, *cmd[c.run_at + 1 :]]
        # OLLAMA_HOST depends on the port, which env() is not given: `env` sets it and execs the server; the
        # context and knobs are said there too, so the record's argv shows them (env() sets them as well)
        shown = [f"{k}={v}" for k, v in self.env(trial).items() if k != "OLLAMA_MODELS"]
        return ["env", f"OLLAMA_HOST={host}:{port}", *shown, *cmd]

    def env(self, trial: Trial) -> dict[str, str]:
        out = {"OLLAMA_MODELS": str(store(trial.env))}
        if trial.max_model_len is not None:
            out["OLLAMA_CONTEXT_LENGTH"] = str(trial.max_model_len)
        out.update(_extra_env(trial))
        return out

    def fatal(self, line: str) -> str | None:
        return llamacpp_log.classify_line(line)

    def detect(self, text: str) -> bool:
        return llamacpp_log.detect_engine(text) == "ollama"

    def scan(self, text: str) -> llamacpp_log.LlamaScan:
        s = llamacpp_log.scan_log(text)
        s.engine = "ollama"
        m = _VERSION.search(text)  # Ollama's own version, not its runner's llama.cpp build
        s.engine_version = m.group(1) if m else None
        return s

    def backend(self, cmd: str | list[str] | tuple[str, ...], env: Mapping[str, str] | None = None) -> str:
        """ollama-cuda | ollama-cpu | fake | unknown, from the install itself: Ollama's Linux tarball puts
        its CUDA runners in lib/ollama/cuda_v* beside bin/ollama."""
        c = commands.analyse(cmd)
        target = c.module or (c.script and commands.basename(c.script)) or ""
        if target.startswith("vllm_lab.testing.") or target.startswith("fake_"):
            return "fake"
        if c.run_at is not None or not c.argv:
            return "unknown"
        exe = shutil.which(c.argv[0])
        if not exe:
            return "unknown"
        lib = Path(os.path.realpath(exe)).parent.parent / "lib" / "ollama"
        if any(lib.glob("cuda_v*")):
            return "ollama-cuda"
        return "ollama-cpu" if lib.is_dir() else "unknown"

    # ---------------------------------------------------------------- after ready: what Ollama really did
    def after_ready(self, trial: Trial, base_url: str, *, long: bool = True) -> dict:
        """Load the model (native request: keep_alive, num_ctx), read /api/ps, then the long request.

        Returns record fields; `outcome`, `failure`, `evidence`, `remedy` (the verdict when it is not
        ready) and `engine_note` (for the record's note) are for the caller to take out."""
        return OllamaCheck(trial, base_url, long).run()


_VERSION = re.compile(r"Listening on \S+ \(version (\d+\.\d+\.\d+[^)\s\"]*)\)")


class OllamaCheck:
    def __init__(self, trial: Trial, base_url: str, long: bool) -> None:
        self.trial, self.url, self.long = trial, base_url, long
        self.name = trial.model
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
        mine = next((m for m in models if m.get("name") == self.name or m.get("model") == self.name), None)
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
        rate = (p2 - p1) / k
        overhead = p1 - rate * k
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


def _text(n: int, start: int) -> str:
    return " ".join(_WORDS[(start * 7 + i) % len(_WORDS)] for i in range(n))


def _message(r: httpx.Response, read: bool = False) -> str:
    raw = r.read() if read else r.content
    try:
        body = json.loads(raw)
        err = body.get("error")
        return str(err.get("message") if isinstance(err, dict) else err)[:300]
    except (ValueError, AttributeError):
        return raw.decode(errors="replace")[:300]


def _gpu_visible(trial: Trial) -> bool:
    try:
        from vllm_lab import gpu  # NVML only when a trial is checked

        return bool(gpu.visible_physical_indices(env={**os.environ, **trial.env}))
    except Exception:
        return False


ENGINE = OllamaEngine()
