"""llama.cpp's `llama-server` as an engine: argv, readiness, bad input, build number, backend.

Its log rules and capacity facts are llamacpp_log's. Any llama-server works: a release build, a distro
package, the ggml-org container, or `make llamacpp`'s .venv-llamacpp/bin/llama-server (the xllamacpp wheel
behind llama-server's flags, xllamacpp_server.py). What the argv decides:
- `-c` is the trial's max_model_len, the context asked. llama.cpp pads it up to a multiple of 256 per slot
  (`-np N` without `-kvu` gives each slot pad256(c / N), so N x that is allocated): the record keeps the
  context asked (max_model_len) and the one used (n_ctx, from the log).
- on a GPU, `-ngl all --fit off`: with fit on, llama.cpp silently moves layers to the CPU (and lowers an unset
  -c) instead of failing, and a "works" is really "slow".
- `--metrics` (off by default) and `-lv 4` (since about b9181 the model, context and KV lines print only at
  verbosity 4), each where the build's --help lists the flag.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from vllm_lab import commands
from vllm_lab.engines import llamacpp_log
from vllm_lab.engines.base import Engine
from vllm_lab.errors import SpecError

if TYPE_CHECKING:
    from vllm_lab.spec import Trial

CTX_PAD = 256  # src/llama-context.cpp: GGML_PAD(n_ctx, 256), per slot
# llama.cpp's tools raise -c under 8 to 8 ("minimum context size is 8"); llama-server does not, and the
# xllamacpp build aborts at warm-up with -c 1 (n_batch = -c cannot hold BOS + EOS): refuse it up front.
MIN_CTX = 8
VENV_SERVER = Path(__file__).resolve().parents[3] / ".venv-llamacpp" / "bin" / "llama-server"
INSTALL_HINT = (
    "install llama.cpp's server: `make llamacpp` (the xllamacpp wheel: .venv-llamacpp/bin/llama-server), "
    "or put a llama-server build on PATH, or set vllm_cmd to its path"
)
MAGIC = b"GGUF"
# Flags vllm-lab sets itself from the trial (extra_args must not set them twice).
OWN_FLAGS = {
    "-m": "model", "--model": "model", "-c": "max_model_len", "--ctx-size": "max_model_len",
    "--host": "host", "--port": "port",
}  # fmt: skip
# vLLM's flags (and what stands for them here): passed to llama-server they end it with "invalid argument".
VLLM_FLAGS = {
    "--max-model-len": "max_model_len (-c)",
    "--gpu-memory-utilization": "memory_limit_bytes on the CPU, the card itself on a GPU",
    "--kv-cache-memory-bytes": "memory_limit_bytes",
    "--quantization": "a GGUF of that quantization (Q4_K_M, Q8_0 ...)",
    "--served-model-name": "-a/--alias",
    "--tensor-parallel-size": "-sm/--split-mode",
    "--max-num-seqs": "-np (slots)",
    "--kv-cache-dtype": "-ctk/-ctv (q8_0 needs -fa on)",
    "--enforce-eager": None,
    "--dtype": None,
    "--block-size": None,
    "--swap-space": None,
    "--trust-remote-code": None,
    "--max-num-batched-tokens": "-b/-ub",
    "--enable-prefix-caching": None,
    "--cpu-offload-gb": "-ngl N (layers on the GPU)",
    "--tokenizer": None,
}
# llama.cpp's flags, for the other direction (vLLM's validate): a vLLM server would refuse them.
LLAMACPP_FLAGS = (
    "--ctx-size", "-np", "--parallel", "-ngl", "--gpu-layers", "--n-gpu-layers", "--fit", "-fa", "--flash-attn",
    "-ctk", "-ctv", "--cache-type-k", "--cache-type-v", "-kvu", "--kv-unified", "-lv", "--log-verbosity",
    "--alias", "--metrics",
)  # fmt: skip


def padded_ctx(c: int, slots: int = 1, unified: bool = True) -> int:
    """The n_ctx llama.cpp allocates for `-c c` (its own rounding): one cache padded to 256, or, with
    `-np N` and no `-kvu`, N caches of pad256(c / N)."""
    if unified or slots <= 1:
        return -(-c // CTX_PAD) * CTX_PAD
    per = -(-c // slots)
    return slots * (-(-per // CTX_PAD) * CTX_PAD)


def is_gguf(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _flag_names(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("-") and not re.match(r"^-\d", a)]


@functools.cache
def _run(argv: tuple[str, ...], pythonpath: str) -> str:
    """stdout + stderr of a short informational run (`--version`, `--help`); '' when it cannot run."""
    env = {**os.environ, "PYTHONPATH": pythonpath}
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{out.stdout}\n{out.stderr}"


def _server_words(cmd: str | list[str] | tuple[str, ...]) -> tuple[str, ...] | None:
    """The command's words when it can be asked `--version` / `--help` here (not a container)."""
    c = commands.analyse(cmd)
    if c.run_at is not None or not c.argv or not commands.resolve(c.argv[0]):
        return None
    return tuple(c.argv)


def _help(cmd, env: Mapping[str, str] | None = None) -> str:
    words = _server_words(cmd)
    return _run((*words, "--help"), (env or os.environ).get("PYTHONPATH", "")) if words else ""


# `version: 4753 (7a2c913e)` (to mid 2026) and `version: 0.1.1-dev (build 10470, commit abc1234)` (since)
_VERSION_RX = (re.compile(r"^version: (\d+) \(", re.M), re.compile(r"^version: .*\(build (\d+)", re.M))


def parse_version(text: str) -> str | None:
    """llama.cpp's build number from `llama-server --version` output (0 = a build without build info)."""
    for rx in _VERSION_RX:
        m = rx.search(text)
        if m and m.group(1) != "0":
            return m.group(1)
    return None


def version(cmd: str | list[str] | tuple[str, ...], env: Mapping[str, str] | None = None) -> str | None:
    """The build number the command runs, from its `--version`; None for a container or no answer."""
    words = _server_words(cmd)
    if not words:
        return None
    return parse_version(_run((*words, "--version"), (env or os.environ).get("PYTHONPATH", "")))


def server_props(base_url: str, api_key: str | None = None, timeout: float = 10.0) -> dict:
    """llama-server's /props ({} when it does not answer): total_slots, default_generation_settings.n_ctx
    (per slot), build_info, model_path."""
    import httpx  # here only: the engine registry imports on a bare python (`vllm-lab gpus`, gpu-check.sh)

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    try:  # our own loopback server: never through HTTP(S)_PROXY
        r = httpx.get(f"{base_url}/props", headers=headers, timeout=timeout, trust_env=False)
        return r.json() if r.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return {}


class LlamaCppEngine(Engine):
    name = "llamacpp"
    health_path = "/health"  # 503 while loading, 200 when ready
    # after the model loads in today's server; before it in older ones (then /health says 503 until ready)
    ready_marker = "listening on"
    install_hint = INSTALL_HINT
    cmd_example = "`llama-server` or `.venv-llamacpp/bin/llama-server` (make llamacpp)"
    # There is no KV-usage ratio since 2025 (PR #13660): /slots has the per-slot state.
    metrics = MappingProxyType({
        "running": ("llamacpp:requests_processing", "llamacpp_requests_processing"),
        "waiting": ("llamacpp:requests_deferred", "llamacpp_requests_deferred"),
        "kv_usage": ("llamacpp:kv_cache_usage_ratio",),
        "preemptions": (),
        "cache_config_info": (),
    })  # fmt: skip

    @property
    def default_cmd(self) -> str:  # type: ignore[override]
        """llama-server on PATH, else `make llamacpp`'s entry point, else the bare name (check says how)."""
        if shutil.which("llama-server") or not VENV_SERVER.exists():
            return "llama-server"
        return str(VENV_SERVER)

    # ---------------------------------------------------------------- bad input
    def validate(self, trial: Trial) -> None:
        model = Path(trial.model).expanduser()
        if model.is_dir():
            hint = next(iter(sorted(model.glob("*.gguf"))), None)
            raise SpecError(
                f"model: {trial.model} is a model folder; llama.cpp serves one .gguf file"
                + (
                    f" (this folder has {hint.name})"
                    if hint
                    else " (make tiny-model writes .cache/models/tiny-qwen2.gguf)"
                )
            )
        if not model.is_file():
            raise SpecError(f"model: {trial.model} not found; llama.cpp needs a local .gguf file")
        if not is_gguf(model):
            raise SpecError(
                f"model: {trial.model} is not a GGUF file (no GGUF magic); llama.cpp serves .gguf files"
            )
        if trial.max_model_len is not None and trial.max_model_len < MIN_CTX:
            raise SpecError(
                f"max_model_len: -c {trial.max_model_len} is below llama.cpp's minimum of {MIN_CTX} tokens"
            )
        if trial.kv_cache_memory_bytes is not None:
            raise SpecError(
                "kv_cache_memory_bytes: is vLLM's; for llama.cpp the KV is -c x bytes per token: "
                "limit the server with memory_limit_bytes"
            )
        if trial.launcher == "explicit" and trial.quantization:
            raise SpecError("quantization: is vLLM's flag; a GGUF carries its own quantization")
        for flag in _flag_names(list(trial.extra_args)):
            if flag in VLLM_FLAGS:
                instead = VLLM_FLAGS[flag]
                raise SpecError(
                    f"extra_args: {flag} is vLLM's, llama-server refuses it"
                    + (f"; for llama.cpp use {instead}" if instead else "")
                )
            if flag in OWN_FLAGS:
                raise SpecError(
                    f"extra_args: {flag} is set from the trial's {OWN_FLAGS[flag]}; set that instead"
                )

    # ---------------------------------------------------------------- the server
    def argv(self, trial: Trial, port: int, host: str) -> list[str]:
        cmd = commands.split_cmd(trial.vllm_cmd)
        extra = list(trial.extra_args)
        flags = set(_flag_names(extra))
        help_text = _help(cmd, trial.env)
        modern = not help_text  # a container or no answer: assume today's flags
        argv = [*cmd, "-m", trial.model]
        if trial.max_model_len is not None:
            argv += ["-c", str(trial.max_model_len)]
        fit = modern or "--fit" in help_text  # `-ngl all` came with --fit (late 2025); before: a count
        if self._gpu_visible(trial):
            if not flags & {"-ngl", "--gpu-layers", "--n-gpu-layers"}:
                argv += ["-ngl", "all" if fit else "999"]
            if fit and not flags & {"--fit", "-fit"}:  # also under the trial's own -ngl: fail, never move
                argv += ["--fit", "off"]
        if "--metrics" not in flags:
            argv.append("--metrics")
        if (modern or "--log-verbosity" in help_text) and not flags & {
            "-lv",
            "--log-verbosity",
            "--verbosity",
        }:
            argv += ["-lv", "4"]
        return [*argv, "--host", host, "--port", str(port), *extra]

    @staticmethod
    def _gpu_visible(trial: Trial) -> bool:
        from vllm_lab import gpu  # NVML (pynvml) only when a trial is built

        return bool(gpu.visible_physical_indices(env={**os.environ, **trial.env}))

    def env(self, trial: Trial) -> dict[str, str]:
        # RLIMIT_AS counts address space reserved, not used: glibc reserves 64 MiB per thread arena (8 per
        # core), so under a limit the arenas, not llama.cpp's buffers, would decide. One arena: the limit
        # meets llama.cpp's own allocations (KV, compute, weights), which are what it stands in for.
        # An abort prints its backtrace through gdb, which under the limit runs out of memory itself and
        # hangs asking whether to dump a core (seen at 170 MiB): the abort line is the evidence, skip gdb.
        if trial.memory_limit_bytes is None:
            return {}
        return {"MALLOC_ARENA_MAX": "1", "GGML_NO_BACKTRACE": "1"}

    def after_ready(self, trial: Trial, base_url: str, *, long: bool = True) -> dict:
        """What the server says it serves (/props): a slot's context is what one request can fill (the
        context asked, padded, and split across slots without -kvu)."""
        props = server_props(base_url, trial.api_key())
        slot = (props.get("default_generation_settings") or {}).get("n_ctx")
        return {"served_max_model_len": int(slot)} if isinstance(slot, int) and slot > 0 else {}

    def fatal(self, line: str) -> str | None:
        return llamacpp_log.classify_line(line)

    def detect(self, text: str) -> bool:
        """llama.cpp wrote it (Ollama's log carries llama.cpp's lines too: its own markers win there)."""
        return llamacpp_log.detect_engine(text) == "llamacpp"

    def scan(self, text: str) -> llamacpp_log.LlamaScan:
        return llamacpp_log.scan_log(text)

    def backend(self, cmd: str | list[str] | tuple[str, ...], env: Mapping[str, str] | None = None) -> str:
        """llamacpp-cuda | llamacpp-cpu | fake | unknown, from the command itself (never from a log)."""
        c = commands.analyse(cmd)
        target = c.module or (c.script and commands.basename(c.script)) or ""
        if target.startswith("vllm_lab.testing.") or target.startswith("fake_"):
            return "fake"
        if c.run_at is not None:  # the ggml-org images: server (CPU), server-cuda, server-vulkan ...
            image = next((w for w in c.argv[c.run_at + 1 :] if "llama.cpp" in w or "llama-cpp" in w), "")
            if "cuda" in image:
                return "llamacpp-cuda"
            return "llamacpp-cpu" if image.endswith((":server", ":latest")) else "unknown"
        words = _server_words(cmd)
        if not words:
            return "unknown"
        out = _run((*words, "--version"), (env or os.environ).get("PYTHONPATH", ""))
        if not out.strip() or "version:" not in out:
            return "unknown"
        # a CUDA build says ggml_cuda_init (found N devices, or failed to initialize); the wrapper prints
        # the wheel's compiled backends (system_info)
        if re.search(r"ggml_cuda_init|CUDA : ", out):
            return "llamacpp-cuda"
        if re.search(r"ROCm|HIP|Vulkan|SYCL|Metal", out):
            return "unknown"
        return "llamacpp-cpu"


ENGINE = LlamaCppEngine()
