"""vLLM as an engine: its launcher generations, readiness, log rules, /metrics names, backend.

The three launcher generations differ only in the quantization flag: `legacy` derives it from the model's
NAME (awq -> awq_marlin: the flag that crashes on a P40), `head` passes none (vLLM reads config.json),
`explicit` passes the trial's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from vllm_lab import commands, logscan
from vllm_lab.compat import legacy_quantization_flag  # the older launcher: flag from the model NAME
from vllm_lab.engines.base import Engine
from vllm_lab.errors import SpecError

if TYPE_CHECKING:
    from vllm_lab.spec import Trial


def quantization_flag(trial: Trial) -> str | None:
    if trial.launcher == "legacy":
        return legacy_quantization_flag(trial.model)
    if trial.launcher == "explicit":
        return trial.quantization
    return None  # head: let vLLM read the model's config.json


class VllmEngine(Engine):
    name = "vllm"
    default_cmd = "vllm serve"
    ready_marker = logscan.READY_MARKER  # uvicorn's line
    install_hint = commands.VLLM_INSTALL_HINT
    cmd_example = "`vllm serve` or `/path/to/python -m vllm.entrypoints.openai.api_server`"
    metrics = MappingProxyType({
        "running": ("vllm:num_requests_running",),
        "waiting": ("vllm:num_requests_waiting",),
        # the older name: V0, and V1 up to about 0.11
        "kv_usage": ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        "preemptions": ("vllm:num_preemptions_total",),
        "cache_config_info": ("vllm:cache_config_info",),  # the KV pool as vLLM sized it (labels)
    })  # fmt: skip

    def validate(self, trial: Trial) -> None:
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
        return logscan.classify_line(line)

    def scan(self, text: str) -> logscan.LogScan:
        return logscan.scan_log(text)

    def backend(self, cmd: str | list[str] | tuple[str, ...], env: Mapping[str, str] | None = None) -> str:
        return commands.backend(cmd, env)


ENGINE = VllmEngine()
