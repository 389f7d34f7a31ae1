"""`llama-server` on top of the `xllamacpp` wheel: llama-server's own command line, llama.cpp's own server.

xllamacpp embeds llama.cpp's tools/server/server.cpp (the same endpoints, the same log lines on stderr) but
has no command-line entry point. This script is that entry point, for the subset of llama-server's flags
vllm-lab passes, so one command line works with this and with a real `llama-server` binary.
scripts/install-llamacpp.sh installs it as .venv-llamacpp/bin/llama-server.

Standalone on purpose: it runs in its own venv (stdlib + xllamacpp only), never imports vllm_lab.
Serves until SIGTERM/SIGINT; exits 1 when llama.cpp cannot load the model or bind the port (llama.cpp
has already logged why), 2 on a bad flag (as llama-server does).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading

# llama-server's cache types (common/arg.cpp kv_cache_types)
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")


def _gpu_layers(v: str) -> int:
    # llama.cpp: auto = -1, all = -2 (common/arg.cpp), else a count
    if v in ("auto", "all"):
        return -1 if v == "auto" else -2
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {v!r}: expected N, auto or all") from None


def _on_off(v: str) -> str:
    # llama-server accepts on/off/auto and the spellings enabled/disabled, 1/0, true/false
    m = {"on": "on", "off": "off", "auto": "auto", "enabled": "on", "disabled": "off"}
    m.update({"1": "on", "0": "off", "true": "on", "false": "off"})
    if v.lower() not in m:
        raise argparse.ArgumentTypeError(f"invalid value {v!r}: expected on, off or auto")
    return m[v.lower()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llama-server",
        description="llama.cpp's server (xllamacpp) with llama-server's flags (a subset)",
        allow_abbrev=False,
    )
    p.add_argument("-m", "--model", help="GGUF model path")
    p.add_argument("-c", "--ctx-size", type=int, default=0, help="context (KV cells); 0 = from the model")
    p.add_argument("-np", "--parallel", type=int, default=-1, help="slots; -1 = auto (4, unified KV)")
    p.add_argument("-kvu", "--kv-unified", action="store_true", help="one KV buffer shared by all slots")
    p.add_argument(
        "-ngl", "--gpu-layers", "--n-gpu-layers", type=_gpu_layers, default=-1, help="N, auto or all"
    )
    p.add_argument("-fit", "--fit", type=_on_off, default="on", help="on|off: fit params to device memory")
    p.add_argument("-fa", "--flash-attn", type=_on_off, default="auto", help="on|off|auto")
    p.add_argument("-ctk", "--cache-type-k", choices=CACHE_TYPES, default="f16")
    p.add_argument("-ctv", "--cache-type-v", choices=CACHE_TYPES, default="f16")
    p.add_argument("--metrics", action="store_true", help="Prometheus /metrics")
    p.add_argument("-lv", "--log-verbosity", "--verbosity", type=int, default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("-a", "--alias", default=None, help="model name(s) for the API, comma-separated")
    p.add_argument("--api-key", default=None, help="API key(s), comma-separated")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--version", action="store_true", help="print the llama.cpp build and exit")
    return p


def llama_build(version: str) -> int:
    """llama.cpp's build number from the wheel's version (YYYY.M.BUILD[.post]; its BUILD_INFO says 0)."""
    m = re.match(r"^\d{4}\.\d+\.(\d+)", version)
    return int(m.group(1)) if m else 0


def params_from_args(a: argparse.Namespace, xl):
    p = xl.CommonParams()
    p.model.path = a.model
    p.n_ctx = a.ctx_size
    p.n_parallel = a.parallel
    p.kv_unified = bool(a.kv_unified)
    p.n_gpu_layers = a.gpu_layers
    p.fit_params = a.fit == "on"
    p.flash_attn_type = {
        "on": xl.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_ENABLED,
        "off": xl.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        "auto": xl.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_AUTO,
    }[a.flash_attn]
    p.cache_type_k = xl.ggml_type["GGML_TYPE_" + a.cache_type_k.upper()]
    p.cache_type_v = xl.ggml_type["GGML_TYPE_" + a.cache_type_v.upper()]
    p.endpoint_metrics = bool(a.metrics)
    if a.log_verbosity is not None:
        p.verbosity = a.log_verbosity
    p.hostnames = [a.host]
    p.port = a.port
    if a.alias:
        p.model_alias = {s.strip() for s in a.alias.split(",") if s.strip()}
    if a.api_key:
        p.api_keys = [s.strip() for s in a.api_key.split(",") if s.strip()]
    if a.threads is not None:
        p.cpuparams.n_threads = a.threads
    if a.no_warmup:
        p.warmup = False
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    import xllamacpp as xl

    if a.version:
        # llama-server's (pre-semver) --version format, on stderr as llama-server prints it
        print(f"version: {llama_build(xl.__version__)} (xllamacpp {xl.__version__})", file=sys.stderr)
        print(
            f"built with {xl.BUILD_INFO.get('compiler', '?')} for {xl.BUILD_INFO.get('build_target', '?')}",
            file=sys.stderr,
        )
        # the backends compiled in (CPU : AVX2 ..., CUDA : ARCHS ... in a CUDA wheel): what runs the model
        print(f"system_info: {xl.get_system_info().strip()}", file=sys.stderr)
        return 0
    if not a.model:
        print("llama-server: error: -m/--model is required", file=sys.stderr)
        return 2
    # older llama-servers' first line; this wheel's build_info says b0, its version carries the build
    print(f"build: {llama_build(xl.__version__)} (xllamacpp {xl.__version__})", file=sys.stderr, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    params = params_from_args(a, xl)
    try:
        server = xl.Server(params)  # loads the model, then serves on llama.cpp's own HTTP threads
    except RuntimeError as e:
        print(f"llama-server: {e}", file=sys.stderr)
        return 1
    while not stop.wait(3600):
        pass
    del server  # held until the signal (its destructor stops the HTTP loop)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # llama.cpp's threads are native: skip interpreter teardown, which would race them
    os._exit(code)
