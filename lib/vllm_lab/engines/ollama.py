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
- The model is a name in the store, or a .gguf file: after ready the trial uploads the file as a blob and
  creates `vllm-lab-<stem>:<digest prefix>` from it through the API (ollama_store), so a container's server
  works too. A name missing from the store is refused before launch unless the trial asks for a pull
  (Trial.pull): then `POST /api/pull` after ready, its progress printed.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from vllm_lab import commands
from vllm_lab.engines import llamacpp_log
from vllm_lab.engines.base import METRIC_NAMES, Engine
from vllm_lab.engines.ollama_gguf import check_file, created_name, is_file_model
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


def extra_env(trial: Trial) -> dict[str, str]:
    """The OLLAMA_* settings given in extra_args as NAME=value (they win over the trial's env, as env() sets)."""
    return {m.group(1): m.group(2) for a in trial.extra_args if (m := _ASSIGN.match(a))}


class OllamaEngine(Engine):
    name = "ollama"
    default_cmd = "ollama serve"
    health_path = "/"  # "Ollama is running"; Ollama has no /health
    ready_marker = "Listening on"  # routes.go: msg="Listening on 127.0.0.1:11434 (version 0.31.2)"
    install_hint = INSTALL_HINT
    cmd_example = "`ollama serve`"
    hub_models = False  # names in Ollama's own store (OLLAMA_MODELS), never Hugging Face hub ids
    pulls = True  # Trial.pull: `POST /api/pull` after ready for a model missing from the store
    metrics = MappingProxyType(dict.fromkeys(METRIC_NAMES, ()))  # Ollama serves no /metrics
    load_prompts = "text"  # its /v1/completions refuses token ids ("prompt must be a string")
    identify_path = "/api/version"

    # ---------------------------------------------------------------- bad input
    def validate(self, trial: Trial) -> None:
        model = trial.model
        from_file = is_file_model(model)
        if from_file:
            check_file(model)  # created in the store after ready (ollama_store)
            if trial.pull:
                raise SpecError(
                    f"pull: is for a name in the Ollama store; {model} is a file, created from itself"
                )
        elif not re.match(r"^[\w.-]+(/[\w.-]+){0,2}(:[\w.-]+)?$", model):
            raise SpecError(f"model: {model!r} is not an Ollama model name (e.g. qwen3:8b-q4_K_M)")
        if trial.gpu_memory_utilization is not None or trial.kv_cache_memory_bytes is not None:
            raise SpecError(
                "gpu_memory_utilization / kv_cache_memory_bytes: are vLLM's; Ollama sizes its own memory "
                "(limit the context with max_model_len, the KV with OLLAMA_KV_CACHE_TYPE)"
            )
        if trial.memory_limit_bytes is not None:  # its estimate of the process is llama-server's (xllamacpp)
            raise SpecError(
                "memory_limit_bytes: stands in for a card with llama.cpp only; Ollama's Go server and its "
                "runner share an address-space limit in ways not measured here: use engine: llamacpp for it"
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
        for k in OWN_ENV:
            if k in trial.env:
                raise SpecError(f"env: {k} is set from the trial's {OWN_ENV[k]}; set that instead")
        # a container's store is inside it; a pull fetches a missing model after ready
        if not from_file and not trial.pull and commands.analyse(trial.vllm_cmd).run_at is None:
            root = store(trial.env)
            if not manifest_path(root, model).is_file():
                raise SpecError(
                    f"model: {model} is not in the Ollama store {root}; run `ollama pull {model}` first "
                    "(or set OLLAMA_MODELS to the store that has it, or pull: true / --pull to pull it at run time)"
                )

    def served_name(self, trial: Trial) -> str | None:
        if not is_file_model(trial.model):
            return None
        try:
            return created_name(trial.model)
        except OSError:  # validate says what is wrong with the file
            return None

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
        # a container's store is its own (a volume at /root/.ollama): this machine's path would point nowhere
        in_container = commands.analyse(trial.vllm_cmd).run_at is not None
        out = {} if in_container else {"OLLAMA_MODELS": str(store(trial.env))}
        if trial.max_model_len is not None:
            out["OLLAMA_CONTEXT_LENGTH"] = str(trial.max_model_len)
        out.update(extra_env(trial))
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
        # httpx only here: `vllm-lab gpus` and `preflight` run on a bare python (scripts/gpu-check.sh)
        from vllm_lab.engines.ollama_check import OllamaCheck

        return OllamaCheck(trial, base_url, long).run()


_VERSION = re.compile(r"Listening on \S+ \(version (\d+\.\d+\.\d+[^)\s\"]*)\)")


ENGINE = OllamaEngine()
