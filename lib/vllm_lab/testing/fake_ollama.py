"""A stand-in for `ollama serve` (0.30+): Ollama's HTTP API, its environment, its log wording, a runner child.

Run as `python -m vllm_lab.testing.fake_ollama serve` (like `ollama serve`). No Ollama server installs on a
box without its binary (PyPI's `ollama` is a client), so vllm-lab's Ollama engine is tested against this.
Every record it leads to says backend=fake (the engine sees the module in the command).

What it honours, as Ollama does:
    OLLAMA_HOST            host:port to listen on (default 127.0.0.1:11434; `http://` and a bare host allowed)
    OLLAMA_MODELS          the model store: a model exists when its manifest does
                           (manifests/registry.ollama.ai/library/NAME/TAG)
    OLLAMA_CONTEXT_LENGTH  the context of a model loaded without num_ctx (default: by total VRAM, as Ollama
                           since 0.15.5: >= 47 GiB 262144, >= 23 GiB 32768, else 4096)
    OLLAMA_NUM_PARALLEL    slots (default 1): the runner gets -c num_ctx*parallel -np parallel
    OLLAMA_FLASH_ATTENTION, OLLAMA_KV_CACHE_TYPE (a quantized cache without flash attention falls back to f16)
    num_ctx, num_predict   in `options` of /api/generate and /api/chat; /v1 cannot set the context
A model loads on its first request (an empty /api/generate prompt only loads it, done_reason "load"): the
server starts a runner child (llama-server's argv and its llama.cpp log lines, into the same log) and
/api/ps then reports context_length, size and size_vram. A prompt over the context is cut silently (the
WARN line only in the log; prompt_eval_count / usage.prompt_tokens say what was kept), as Ollama does.

The traps, by FAKE_OLLAMA_* knobs:
    FAKE_OLLAMA_FIT_CTX=N         the scheduler lowers any larger context to N, silently (does not fit)
    FAKE_OLLAMA_VRAM_FRACTION=F   part of the model on the CPU: size_vram = F x size (needs a GPU, below);
                                  without it what exceeds 97 % of FAKE_OLLAMA_VRAM_MIB goes to the CPU
    FAKE_OLLAMA_TRUNCATE_AT=N     prompts over N tokens are cut to N/2 even in a larger context (the cut a
                                  smaller slot, or Ollama's own "half the context" rule, makes)
    FAKE_OLLAMA_EOS_AT=N          /v1 outputs end at EOS after N tokens (finish_reason stop): Ollama drops
                                  ignore_eos, so max_tokens is only an upper bound
    FAKE_OLLAMA_RUNNER_DIES=load  the runner dies loading the model (llama.cpp's KV OOM lines, exit status 1)
                          =request  it dies at the first generation after the load (CUDA error: out of memory)
    FAKE_OLLAMA_RUNNER_ORPHAN=1   on SIGTERM the server exits without ending its runner, which ignores
                                  SIGTERM (the launcher must end the whole tree)
The store, as Ollama's API fills it: `HEAD`/`POST /api/blobs/sha256:<digest>` (an upload is checked against
its digest), `POST /api/create` with `files` (a GGUF blob becomes a model: manifest written, then listed and
loadable), `POST /api/pull` (progress lines, a placeholder blob, the manifest), all streaming Ollama's
ProgressResponse wording (server/images.go, create.go). FAKE_OLLAMA_PULL_FAILS=1: every pull ends in
Ollama's "pull model manifest: file does not exist" (no such model); FAKE_OLLAMA_PULL_BYTES: the pulled
model layer's size (default a Qwen3-8B Q4_K_M's; only the manifest says it, the blob is a placeholder).
Other knobs: FAKE_OLLAMA_VERSION (default 0.31.2), FAKE_OLLAMA_VRAM_MIB (simulated total VRAM, default 0:
a CPU-only server), FAKE_OLLAMA_CTX_TRAIN (the model's n_ctx_train, default 40960), FAKE_OLLAMA_RUNNER_PIDFILE
(the runner writes its pid there). Tokens are counted as whitespace-separated words.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

KV_BYTES_PER_TOKEN = 147456  # Qwen3-8B in f16: 36 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes
LAYERS = 37  # 36 repeating + the output layer, as llama.cpp counts offloadable layers
ENV_SHOWN = ("OLLAMA_CONTEXT_LENGTH", "OLLAMA_FLASH_ATTENTION", "OLLAMA_HOST", "OLLAMA_KV_CACHE_TYPE",
             "OLLAMA_MODELS", "OLLAMA_NUM_PARALLEL")  # fmt: skip
GO_UNMARSHAL = "json: cannot unmarshal array into Go struct field CompletionRequest.prompt of type string"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def log(level: str, source: str, msg: str, **kv) -> None:
    """One slog line as Ollama writes it: time=... level=INFO source=file.go:N msg="..." key=value ..."""
    m = f'"{msg}"' if " " in msg or not msg else msg
    parts = [f"time={_now()}", f"level={level}", f"source={source}", f"msg={m}"]
    for k, v in kv.items():
        s = str(v)
        parts.append(f'{k}="{s}"' if (" " in s or not s or '"' in s) else f"{k}={s}")
    print(" ".join(parts), flush=True)


def raw(line: str) -> None:
    print(line, flush=True)


def gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def default_ctx(vram_mib: float) -> int:
    """Ollama's context for a model loaded without num_ctx or OLLAMA_CONTEXT_LENGTH, by total VRAM."""
    g = vram_mib / 1024
    return 262144 if g >= 47 else 32768 if g >= 23 else 4096


def parse_host(value: str | None) -> tuple[str, int]:
    v = (value or "").strip()
    for scheme in ("http://", "https://"):
        if v.startswith(scheme):
            v = v[len(scheme) :]
    v = v.rstrip("/")
    if not v:
        return "127.0.0.1", 11434
    host, sep, port = v.rpartition(":")
    if not sep:
        return v, 11434
    return host or "127.0.0.1", int(port)


def split_name(name: str) -> tuple[str, str]:
    """(manifest folder under manifests/, tag) of an Ollama model name, as `ollama pull` stores it."""
    base, _, tag = name.partition(":")
    tag = tag or "latest"
    parts = base.split("/")
    if len(parts) == 1:
        parts = ["registry.ollama.ai", "library", *parts]
    elif len(parts) == 2:
        parts = ["registry.ollama.ai", *parts]
    return "/".join(parts), tag


def full_name(name: str) -> str:
    """The name as Ollama lists it (/api/ps, /api/tags): with its tag, `:latest` where none was given."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def manifest_path(store: Path, name: str) -> Path:
    folder, tag = split_name(name)
    return store / "manifests" / folder / tag


def store_models(store: Path) -> list[str]:
    root = store / "manifests"
    out = []
    for p in sorted(root.glob("*/*/*/*")) if root.is_dir() else []:
        host, ns, model, tag = p.relative_to(root).parts
        prefix = "" if (host, ns) == ("registry.ollama.ai", "library") else f"{ns}/"
        out.append(f"{prefix}{model}:{tag}")
    return out


def model_bytes(store: Path, name: str) -> int:
    """The model layer's size from its manifest (what `ollama pull` wrote), else a Qwen3-8B Q4_K_M."""
    try:
        m = json.loads(manifest_path(store, name).read_text())
        sizes = [lay["size"] for lay in m.get("layers", []) if "model" in lay.get("mediaType", "")]
        return int(sizes[0]) if sizes else 5_027_783_488
    except (OSError, ValueError, KeyError, TypeError):
        return 5_027_783_488


def words(text: str) -> int:
    return len(text.split())


class State:
    def __init__(self, host: str, port: int) -> None:
        env = os.environ
        self.host, self.port = host, port
        self.store = Path(env.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()
        self.version = env.get("FAKE_OLLAMA_VERSION", "0.31.2")
        self.vram_mib = float(env.get("FAKE_OLLAMA_VRAM_MIB") or 0)
        self.ctx_env = int(env["OLLAMA_CONTEXT_LENGTH"]) if env.get("OLLAMA_CONTEXT_LENGTH") else None
        self.parallel = int(env.get("OLLAMA_NUM_PARALLEL") or 1)
        self.fa = (env.get("OLLAMA_FLASH_ATTENTION") or "").lower() in ("1", "true", "on", "yes")
        self.kv_type = env.get("OLLAMA_KV_CACHE_TYPE") or "f16"
        self.ctx_train = int(env.get("FAKE_OLLAMA_CTX_TRAIN") or 40960)
        self.fit_ctx = int(env["FAKE_OLLAMA_FIT_CTX"]) if env.get("FAKE_OLLAMA_FIT_CTX") else None
        self.vram_fraction = float(env.get("FAKE_OLLAMA_VRAM_FRACTION") or 1.0)
        self.truncate_at = int(env["FAKE_OLLAMA_TRUNCATE_AT"]) if env.get("FAKE_OLLAMA_TRUNCATE_AT") else None
        self.dies = env.get("FAKE_OLLAMA_RUNNER_DIES", "")
        self.orphan = env.get("FAKE_OLLAMA_RUNNER_ORPHAN") == "1"
        self.pull_fails = env.get("FAKE_OLLAMA_PULL_FAILS") == "1"
        self.pull_bytes = int(env.get("FAKE_OLLAMA_PULL_BYTES") or 5_027_783_488)
        self.lock = threading.Lock()
        self.runner: subprocess.Popen | None = None
        self.loaded: dict | None = None  # name, ctx (per slot), size, size_vram, expires
        self.tmp = Path(tempfile.mkdtemp(prefix="fake-ollama-"))

    # ------------------------------------------------------------------ the scheduler
    def load(self, name: str, num_ctx: int | None, keep_alive=None) -> tuple[dict | None, str | None]:
        """The loaded model (loading it if needed); (None, error) when the runner failed."""
        with self.lock:
            ctx = num_ctx or self.ctx_env or default_ctx(self.vram_mib)
            if ctx > self.ctx_train:
                log("WARN", "server.go:114", "requested context size too large for model",
                    num_ctx=ctx, n_ctx_train=self.ctx_train)  # fmt: skip
                ctx = self.ctx_train
            if self.fit_ctx is not None and ctx > self.fit_ctx:
                ctx = self.fit_ctx  # lowered to what fits: Ollama says nothing about it
            if (
                self.loaded
                and self.loaded["name"] == full_name(name)
                and self.loaded["ctx"] == ctx
                and self._alive()
            ):
                return self.loaded, None
            self._stop_runner()
            return self._start_runner(name, ctx)

    def _alive(self) -> bool:
        return self.runner is not None and self.runner.poll() is None

    def _start_runner(self, name: str, ctx: int) -> tuple[dict | None, str | None]:
        weights = model_bytes(self.store, name)
        kv_type = self.kv_type
        if kv_type != "f16" and not self.fa:
            log("WARN", "llama_server.go:212", "quantized kv cache requested but flash attention disabled",
                type=kv_type)  # fmt: skip
            kv_type = "f16"
        kv = (
            ctx
            * self.parallel
            * KV_BYTES_PER_TOKEN
            // (2 if kv_type == "q8_0" else 4 if kv_type == "q4_0" else 1)
        )
        size = weights + kv + 300 * (1 << 20)
        on_gpu = self.vram_mib > 0
        # as Ollama's scheduler: what does not fit the card's free memory goes to the CPU, layer by layer
        fits = min(size, int(self.vram_mib * (1 << 20) * 0.97))
        size_vram = (
            (int(size * min(1.0, self.vram_fraction)) if self.vram_fraction < 1 else fits) if on_gpu else 0
        )
        layers_gpu = round(LAYERS * size_vram / size) if on_gpu else 0
        blob = self.store / "blobs" / f"sha256-{uuid.uuid5(uuid.NAMESPACE_URL, name).hex * 2}"
        ready = self.tmp / f"ready-{uuid.uuid4().hex[:6]}"
        rport = 40000 + (os.getpid() % 20000)
        args = ["--model", str(blob), "--port", str(rport), "--host", "127.0.0.1", "--no-webui", "--offline",
                "-c", str(ctx * self.parallel), "-np", str(self.parallel), "--log-verbosity", "4",
                "--no-log-prefix", "--no-log-timestamps", "--flash-attn", "on" if self.fa else "off",
                "-ngl", str(layers_gpu)]  # fmt: skip
        if kv_type != "f16":
            args += ["-ctk", kv_type, "-ctv", kv_type]
        log("INFO", "llama_server.go:431", "starting llama-server",
            cmd=" ".join(["/usr/lib/ollama/llama-server", *args]))  # fmt: skip
        log("INFO", "sched.go:613", "system memory", total="125.7 GiB", free="118.2 GiB", free_swap="0 B")
        if on_gpu:
            log("INFO", "sched.go:620", "gpu memory", id=0, library="CUDA",
                available=gib(self.vram_mib * (1 << 20) * 0.97), free=gib(self.vram_mib * (1 << 20) * 0.98),
                minimum="457.0 MiB", overhead="0 B")  # fmt: skip
        log("INFO", "llama_server.go:1046", "loading model via llama-server", model=str(blob))
        t0 = time.monotonic()
        cmd = [sys.executable, "-m", "vllm_lab.testing.fake_ollama", "runner", "--ready-file", str(ready),
               "--kv-mib", f"{kv / (1 << 20):.2f}", "--weights-mib", f"{weights / (1 << 20):.2f}",
               "--layers-gpu", str(layers_gpu), "--kv-type", kv_type, *args]  # fmt: skip
        self.runner = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)  # its lines go to our log, as Ollama's
        log("INFO", "llama_server.go:1207", "waiting for llama-server to start responding")
        while not ready.exists():
            if self.runner.poll() is not None:
                err = f"llama-server process has terminated: exit status {self.runner.returncode}"
                if self.dies == "load":
                    err += ": failed to initialize the context: failed to allocate buffer for kv cache"
                log("ERROR", "sched.go:481", "error loading llama server", error=err)
                self.runner = None
                return None, err
            time.sleep(0.02)
        log("INFO", "llama_server.go:1274", f"llama-server started in {time.monotonic() - t0:.2f} seconds")
        self.loaded = {"name": full_name(name), "ctx": ctx, "size": size, "size_vram": size_vram,
                       "expires_at": _now(), "weights": weights}  # fmt: skip
        return self.loaded, None

    def _stop_runner(self) -> None:
        if self._alive():
            self.runner.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.runner.wait(5)
        self.runner = None
        self.loaded = None

    def shutdown(self) -> None:
        if not self.orphan:
            self._stop_runner()

    # ------------------------------------------------------------------ a generation
    def generate(self, name: str, prompt_tokens: int, num_ctx: int | None, max_out: int | None):
        """(prompt tokens kept, output tokens, error): cuts an over-long prompt silently, as Ollama."""
        loaded, err = self.load(name, num_ctx)
        if err:
            return 0, 0, err
        if self.dies == "request" and prompt_tokens > 0 and self._alive():
            self.runner.send_signal(signal.SIGUSR1)  # it prints CUDA's OOM and exits
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.runner.wait(5)
            err = f"llama-server process has terminated: exit status {self.runner.returncode}"
            log("ERROR", "server.go:1502", "post predict", error=err)
            self.runner, self.loaded = None, None
            return 0, 0, err
        limit = loaded["ctx"]
        if self.truncate_at is not None:
            limit = min(limit, self.truncate_at)
        kept = prompt_tokens
        if prompt_tokens > limit:
            kept = limit // 2
            log("WARN", "runner.go:131", "truncating input prompt", limit=limit, prompt=prompt_tokens,
                keep=4, new=kept)  # fmt: skip
        out = max(1, min(max_out if max_out and max_out > 0 else 8, 64))
        return kept, out, None


# ---------------------------------------------------------------------- HTTP


def make_handler(state: State):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # GIN's access line, as Ollama prints it
            pass

        def _gin(self, code: int, t0: float) -> None:
            ms = (time.monotonic() - t0) * 1000
            stamp = datetime.now().strftime("%Y/%m/%d - %H:%M:%S")
            raw(
                f'[GIN] {stamp} | {code} | {ms:10.3f}ms | {self.client_address[0]:>15} | {self.command:<7} "{self.path}"'
            )

        def _send(self, code: int, body, ctype: str = "application/json") -> None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _body(self) -> dict:
            n = int(self.headers.get("Content-Length") or 0)
            try:
                return json.loads(self.rfile.read(n) or b"{}")
            except ValueError:
                return {}

        def _stream_start(self, ctype: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

        def _chunk(self, data: str) -> None:
            b = data.encode()
            self.wfile.write(f"{len(b):x}\r\n".encode() + b + b"\r\n")
            self.wfile.flush()

        def _stream_end(self) -> None:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

        def do_HEAD(self):
            if self.path.startswith(
                "/api/blobs/"
            ):  # does the store have this blob (routes.go HeadBlobHandler)
                t0 = time.monotonic()
                code = self._blob_head(self.path.split("?")[0][len("/api/blobs/") :])
                self._gin(code, t0)
                return
            self.do_GET()

        def do_GET(self):
            t0 = time.monotonic()
            path = self.path.split("?")[0]
            if path == "/":
                self._send(200, "Ollama is running", "text/plain; charset=utf-8")
            elif path == "/api/version":
                self._send(200, {"version": state.version})
            elif path == "/api/tags":
                models = [{"name": n, "model": n, "size": model_bytes(state.store, n),
                           "details": {"format": "gguf", "quantization_level": "Q4_K_M"}}
                          for n in store_models(state.store)]  # fmt: skip
                self._send(200, {"models": models})
            elif path == "/api/ps":
                lo = state.loaded if state._alive() else None
                models = [] if lo is None else [{
                    "name": lo["name"], "model": lo["name"], "size": lo["size"], "size_vram": lo["size_vram"],
                    "digest": uuid.uuid5(uuid.NAMESPACE_URL, lo["name"]).hex, "expires_at": lo["expires_at"],
                    "details": {"format": "gguf", "family": "qwen3", "quantization_level": "Q4_K_M"},
                    "context_length": lo["ctx"],
                }]  # fmt: skip
                self._send(200, {"models": models})
            elif path == "/v1/models":
                data = [{"id": n, "object": "model", "created": int(time.time()), "owned_by": "library"}
                        for n in store_models(state.store)]  # fmt: skip
                self._send(200, {"object": "list", "data": data})
            else:
                self._send(404, "404 page not found", "text/plain")
            self._gin(200 if path in ("/", "/api/version", "/api/tags", "/api/ps", "/v1/models") else 404, t0)

        def do_POST(self):
            t0 = time.monotonic()
            path = self.path.split("?")[0]
            if path.startswith("/api/blobs/") or path in (
                "/api/create",
                "/api/pull",
            ):  # the store's own calls
                code = self._store_call(path)
                self._gin(code, t0)
                return
            body = self._body()
            code = 200
            try:
                if path in ("/api/generate", "/api/chat"):
                    code = self._native(body, chat=path == "/api/chat")
                elif path in ("/v1/completions", "/v1/chat/completions"):
                    code = self._openai(body, chat=path == "/v1/chat/completions")
                else:
                    code = 404
                    self._send(404, "404 page not found", "text/plain")
            finally:
                self._gin(code, t0)

        # ------------------------------------------------------------------ the store (blobs, create, pull)
        def _store_call(self, path: str) -> int:
            if path.startswith("/api/blobs/"):
                return self._blob_upload(path[len("/api/blobs/") :])
            body = self._body()
            return self._create(body) if path == "/api/create" else self._pull(body)

        def _blob_head(self, digest: str) -> int:
            blob = blob_path(state.store, digest)
            if blob is None:
                self._send(400, {"error": "invalid digest format"})
                return 400
            if not blob.is_file():
                self._send(404, {"error": f'blob "{digest}" not found'})
                return 404
            self._send(200, "", "text/plain")
            return 200

        def _blob_upload(self, digest: str) -> int:
            blob = blob_path(state.store, digest)
            n = int(self.headers.get("Content-Length") or 0)
            if blob is None:
                self.rfile.read(n)
                self._send(400, {"error": "invalid digest format"})
                return 400
            if blob.is_file():
                self.rfile.read(n)
                self._send(200, "", "text/plain")
                return 200
            blob.parent.mkdir(parents=True, exist_ok=True)
            tmp = blob.with_name(blob.name + "-partial")
            h = hashlib.sha256()
            with open(tmp, "wb") as f:
                while n > 0:
                    chunk = self.rfile.read(min(n, 1 << 20))
                    if not chunk:
                        break
                    h.update(chunk)
                    f.write(chunk)
                    n -= len(chunk)
            got = f"sha256:{h.hexdigest()}"
            if got != digest.replace("sha256-", "sha256:"):
                tmp.unlink()
                self._send(400, {"error": f'digest mismatch, expected "{digest}", got "{got}"'})
                return 400
            tmp.rename(blob)
            self._send(201, "", "text/plain")
            return 201

        def _progress(self, lines) -> int:
            """Stream ProgressResponse lines; an error dict ends it (HTTP 500 where nothing was sent yet)."""
            started = False
            for item in lines:
                if "error" in item and not started:
                    self._send(500, {"error": item["error"]})
                    return 500
                if not started:
                    self._stream_start("application/x-ndjson")
                    started = True
                self._chunk(json.dumps(item) + "\n")
                if "error" in item:
                    break
            if started:
                self._stream_end()
            return 200

        def _create(self, body: dict) -> int:
            name, files = body.get("model") or body.get("name") or "", body.get("files")
            if not name or any(c.isspace() for c in name) or name.count(":") > 1:
                self._send(400, {"error": "invalid model name"})
                return 400
            if not files:
                self._send(400, {"error": "neither 'from' or 'files' was specified"})
                return 400
            return self._progress(create_model(state.store, name, files))

        def _pull(self, body: dict) -> int:
            name = body.get("model") or body.get("name") or ""
            if not name:
                self._send(400, {"error": "invalid model name"})
                return 400
            return self._progress(pull_model(state, name))

        def _missing(self, name: str) -> bool:
            return not name or not manifest_path(state.store, name).is_file()

        def _native(self, body: dict, chat: bool) -> int:
            name = body.get("model") or ""
            if self._missing(name):
                self._send(404, {"error": f'model "{name}" not found, try pulling it first'})
                return 404
            opts = body.get("options") or {}
            num_ctx = opts.get("num_ctx")
            if chat:
                msgs = body.get("messages") or []
                n = sum(words(str(m.get("content") or "")) + 4 for m in msgs) if msgs else 0
            else:
                n = words(body.get("prompt") or "")
            if n == 0:  # an empty prompt only loads the model
                _, err = state.load(name, num_ctx, body.get("keep_alive"))
                if err:
                    self._send(500, {"error": err})
                    return 500
                done = {"model": name, "created_at": _now(), "done": True, "done_reason": "load"}
                done.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
                self._send(200, done)
                return 200
            kept, out, err = state.generate(name, n, num_ctx, opts.get("num_predict"))
            if err:
                self._send(500, {"error": err})
                return 500
            final = {"model": name, "created_at": _now(), "done": True, "done_reason": "length",
                     "prompt_eval_count": kept, "eval_count": out, "total_duration": 1000000}  # fmt: skip
            text = " ".join(["tok"] * out)
            final.update({"message": {"role": "assistant", "content": text}} if chat else {"response": text})
            if body.get("stream", True) is False:
                self._send(200, final)
                return 200
            self._stream_start("application/x-ndjson")
            for _ in range(out):
                part = {"model": name, "created_at": _now(), "done": False}
                part.update(
                    {"message": {"role": "assistant", "content": "tok "}} if chat else {"response": "tok "}
                )
                self._chunk(json.dumps(part) + "\n")
            final.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
            self._chunk(json.dumps(final) + "\n")
            self._stream_end()
            return 200

        def _openai(self, body: dict, chat: bool) -> int:
            name = body.get("model") or ""
            if not chat and not isinstance(body.get("prompt", ""), str):  # token ids: Ollama takes a string
                self._send(400, {"error": {"message": GO_UNMARSHAL, "type": "invalid_request_error",
                                           "param": None, "code": None}})  # fmt: skip
                return 400
            if self._missing(name):
                self._send(404, {"error": {"message": f'model "{name}" not found, try pulling it first',
                                           "type": "not_found_error", "param": None, "code": None}})  # fmt: skip
                return 404
            if chat:
                n = sum(words(str(m.get("content") or "")) + 4 for m in body.get("messages") or [])
            else:
                n = words(body.get("prompt") or "")
            kept, out, err = state.generate(name, n, None, body.get("max_tokens"))
            if err:
                self._send(500, {"error": {"message": err, "type": "api_error", "param": None, "code": None}})
                return 500
            eos_at = int(os.environ.get("FAKE_OLLAMA_EOS_AT") or 0)
            end = "stop" if 0 < eos_at < out else "length"
            out = eos_at if end == "stop" else out
            cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().int % 1000}"
            obj = "chat.completion" if chat else "text_completion"
            usage = {"prompt_tokens": kept, "completion_tokens": out, "total_tokens": kept + out}
            base = {"id": cid, "created": int(time.time()), "model": name, "system_fingerprint": "fp_ollama"}
            if not body.get("stream"):
                choice = ({"index": 0, "message": {"role": "assistant", "content": " ".join(["tok"] * out)},
                           "finish_reason": end} if chat else
                          {"text": " ".join(["tok"] * out), "index": 0, "finish_reason": end})  # fmt: skip
                self._send(200, {**base, "object": obj, "choices": [choice], "usage": usage})
                return 200
            self._stream_start("text/event-stream")
            obj = "chat.completion.chunk" if chat else "text_completion"
            for i in range(out):
                last = i == out - 1
                reason = end if last else None
                choice = ({"index": 0, "delta": {"role": "assistant", "content": "tok "}, "finish_reason": reason}
                          if chat else {"text": "tok ", "index": 0, "finish_reason": reason})  # fmt: skip
                self._chunk(f"data: {json.dumps({**base, 'object': obj, 'choices': [choice]})}\n\n")
            if (body.get("stream_options") or {}).get("include_usage"):
                self._chunk(f"data: {json.dumps({**base, 'object': obj, 'choices': [], 'usage': usage})}\n\n")
            self._chunk("data: [DONE]\n\n")
            self._stream_end()
            return 200

    return Handler


# ---------------------------------------------------------------------- the store's writes


def blob_path(store: Path, digest: str) -> Path | None:
    """blobs/sha256-<hex>, as manifest.BlobsPath; None for a digest that is not sha256:<64 hex>."""
    algo, sep, hexpart = digest.replace("sha256-", "sha256:", 1).partition(":")
    if algo != "sha256" or not sep or len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        return None
    return store / "blobs" / f"sha256-{hexpart}"


def _put_blob(store: Path, data: bytes) -> dict:
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    path = blob_path(store, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": digest, "size": len(data)}


def write_manifest(store: Path, name: str, model_layer: dict) -> None:
    """The manifest that makes a model listed and loadable (manifest.WriteManifest's shape)."""
    config = _put_blob(store, json.dumps({"model_format": "gguf", "model_family": "qwen3",
                                          "file_type": "Q4_K_M"}).encode())  # fmt: skip
    m = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
         "config": {"mediaType": "application/vnd.docker.container.image.v1+json", **config},
         "layers": [{"mediaType": "application/vnd.ollama.image.model", **model_layer}]}  # fmt: skip
    path = manifest_path(store, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(m))


def create_model(store: Path, name: str, files: dict):
    """POST /api/create with files: one GGUF blob becomes a model (create.go's statuses)."""
    yield {"status": "parsing GGUF"}
    for digest in files.values():
        blob = blob_path(store, str(digest))
        if blob is None:
            yield {"error": "invalid digest format"}
            return
        if not blob.is_file():
            yield {"error": f"open {blob}: no such file or directory"}
            return
        with open(blob, "rb") as f:
            if f.read(4) != b"GGUF":
                yield {"error": "supplied file was not in GGUF format"}
                return
        yield {"status": f"using existing layer {digest}"}
        write_manifest(store, name, {"digest": str(digest), "size": blob.stat().st_size})
        break
    yield {"status": "writing manifest"}
    yield {"status": "success"}


def pull_model(state: State, name: str):
    """POST /api/pull: images.go's statuses; download.go's "pulling <digest[7:19]>" progress."""
    yield {"status": "pulling manifest"}
    if state.pull_fails:
        yield {"error": "pull model manifest: file does not exist"}
        return
    placeholder = _put_blob(state.store, f"fake weights of {name}\n".encode())
    digest, total = placeholder["digest"], state.pull_bytes
    for i in range(11):
        done = total * i // 10
        yield {
            "status": f"pulling {digest[7:19]}",
            "digest": digest,
            "total": total,
            **({"completed": done} if done else {}),
        }
        time.sleep(0.01)
    yield {"status": "verifying sha256 digest"}
    yield {"status": "writing manifest"}
    write_manifest(state.store, name, {"digest": digest, "size": total})
    yield {"status": "success"}


def serve() -> int:
    host, port = parse_host(os.environ.get("OLLAMA_HOST"))
    state = State(host, port)
    env_map = " ".join(f"{k}:{os.environ.get(k, '')}" for k in ENV_SHOWN)
    log("INFO", "routes.go:1331", "server config", env=f"map[{env_map}]")
    blobs = len(list((state.store / "blobs").glob("*"))) if (state.store / "blobs").is_dir() else 0
    log("INFO", "images.go:477", f"total blobs: {blobs}")
    try:
        server = ThreadingHTTPServer((host, port), make_handler(state))
    except OSError as e:
        raw(f"Error: listen tcp {host}:{port}: bind: {e.strerror.lower() if e.strerror else e}")
        return 1
    server.daemon_threads = True
    log("INFO", "routes.go:1384", f"Listening on {host}:{port} (version {state.version})")
    log("INFO", "runner.go:67", "discovering available GPUs...")
    if state.vram_mib:
        log("INFO", "types.go:42", "inference compute", id="GPU-fake", library="CUDA", compute="6.1",
            name="CUDA0", description="Tesla P40", total=gib(state.vram_mib * (1 << 20)),
            available=gib(state.vram_mib * (1 << 20) * 0.98))  # fmt: skip
    else:
        log("INFO", "types.go:60", "inference compute", id="cpu", library="cpu", total="125.7 GiB")

    def stop(signum, frame):
        state.shutdown()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()
    return 0


def runner(argv: list[str]) -> int:
    """The runner child: llama-server's load lines, a ready file, then wait to be stopped."""
    p = argparse.ArgumentParser()
    p.add_argument("--ready-file")
    p.add_argument("--kv-mib", type=float)
    p.add_argument("--weights-mib", type=float)
    p.add_argument("--layers-gpu", type=int)
    p.add_argument("--kv-type")
    p.add_argument("-c", type=int)
    p.add_argument("-np", type=int)
    p.add_argument("--flash-attn")
    args, _ = p.parse_known_args(argv)
    env = os.environ
    pidfile = env.get("FAKE_OLLAMA_RUNNER_PIDFILE")
    if pidfile:
        Path(pidfile).write_text(str(os.getpid()))
    gpu = args.layers_gpu > 0
    dev = "CUDA0" if gpu else "CPU"
    raw("build: 8153 (fake) with GNU 12.2.0 for x86_64-linux-gnu")
    raw("print_info: file type   = Q4_K - Medium")
    raw(f"print_info: n_ctx_train      = {env.get('FAKE_OLLAMA_CTX_TRAIN') or 40960}")
    raw(f"load_tensors: offloaded {args.layers_gpu}/{LAYERS} layers to GPU")
    raw(f"load_tensors:   {dev} model buffer size = {args.weights_mib:8.2f} MiB")
    raw(f"llama_context: n_ctx         = {args.c}")
    raw(f"llama_context: n_ctx_seq     = {args.c // max(1, args.np)}")
    raw(f"llama_context: flash_attn    = {'enabled' if args.flash_attn == 'on' else 'disabled'}")
    if env.get("FAKE_OLLAMA_RUNNER_DIES") == "load":
        raw(f"ggml_backend_cuda_buffer_type_alloc_buffer: allocating {args.kv_mib:.2f} MiB on device 0: "
            "cudaMalloc failed: out of memory")  # fmt: skip
        raw("llama_init_from_model: failed to initialize the context: failed to allocate buffer for kv cache")
        return 1
    raw(f"llama_kv_cache: {dev} KV buffer size = {args.kv_mib:8.2f} MiB")
    raw(
        f"llama_kv_cache: size = {args.kv_mib:8.2f} MiB ({args.c} cells, 36 layers, {args.np}/{args.np} seqs), "
        f"K ({args.kv_type}): {args.kv_mib / 2:.2f} MiB, V ({args.kv_type}): {args.kv_mib / 2:.2f} MiB"
    )
    raw(f"srv    load_model: initializing slots, n_slots = {args.np}")
    raw("srv  llama_server: model loaded")

    def die(signum, frame):
        raw("CUDA error: out of memory")
        raw("  current device: 0, in function ggml_backend_cuda_graph_compute at ggml-cuda.cu:2703")
        sys.stdout.flush()
        os._exit(2)

    signal.signal(signal.SIGUSR1, die)
    if env.get("FAKE_OLLAMA_RUNNER_ORPHAN") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a hung runner: only SIGKILL ends it
    Path(args.ready_file).write_text("ok")
    while True:
        signal.pause()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["runner"]:
        return runner(argv[1:])
    if argv[:1] in (["serve"], ["start"]):
        return serve()
    print("usage: python -m vllm_lab.testing.fake_ollama serve", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
