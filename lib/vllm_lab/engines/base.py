"""What every engine (an inference server: vLLM, llama.cpp's llama-server, ...) hands the rest of vllm-lab.

An engine module imports only errors, commands, memory, compat, redact and logscan (the scanning machinery):
never spec (spec asks the engine to validate a trial, so spec sits above the engines), never launcher,
probe, search or load (they use the engines). A trial reaches an engine as the object it is; its type is
named for the type checker only.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

from vllm_lab import commands
from vllm_lab.errors import SpecError

if TYPE_CHECKING:
    from vllm_lab.spec import Trial


class ScanResult(Protocol):
    """What an engine's scan of a log hands up; to_json() is the `scan-log --json` object and feeds the record
    (vLLM's: engines.vllm_log.LogScan)."""

    failure: str | None
    evidence: str | None
    remedy: str | None
    ready: bool

    def to_json(self) -> dict: ...


# Our names for the /metrics series a load and a record read, the same for every engine. An engine maps
# each to its own series names, in order of preference (an older name last); () where it has none.
METRIC_NAMES = ("running", "waiting", "kv_usage", "preemptions", "prefix_cache_hits", "cache_config_info")


class Engine:
    """One inference server: how to start it, when it is ready, what its log says. Subclass per engine."""

    name: str = ""  # vllm | llamacpp | ollama: Trial.engine, the record's `engine`
    default_cmd: str = ""  # the command when a trial names none
    health_path: str = "/health"  # ready on HTTP 200 here (the body differs between builds: never read)
    ready_marker: str | None = None  # a log line that says the server listens (then /health is asked at once)
    install_hint: str = ""  # the fix when the command is not found
    cmd_example: str = ""  # what an empty command should say instead
    hub_models: bool = True  # a model that is not a local path is a Hugging Face hub id (prefetched once)
    pulls: bool = False  # Trial.pull applies: the server fetches a model missing from its store on request
    # METRIC_NAMES -> the engine's /metrics series names
    metrics: Mapping[str, tuple[str, ...]] = MappingProxyType({})
    # What a load's prompts are: "token_ids" (exact lengths, vLLM and llama-server), or "text" where
    # /v1/completions takes only a string (Ollama): words calibrated to the length by usage.prompt_tokens,
    # and a stream may stop at EOS (no ignore_eos there)
    load_prompts: str = "token_ids"
    # a GET path only this engine answers 200 with a JSON object holding `version`: how a load told only a
    # URL tells the engine (Ollama: /api/version); None: not told this way
    identify_path: str | None = None

    def validate(self, trial: Trial) -> None:
        """Engine-specific bad input (the model's shape, flags of another engine): SpecError, one line."""

    def served_name(self, trial: Trial) -> str | None:
        """The model name requests must use where it is not the trial's model (None: the model as given)."""
        return None

    def check_command(self, cmd: str | list[str]) -> list[str]:
        """The command resolves and has a shape the launcher can follow; its argv. SpecError otherwise."""
        argv = commands.split_cmd(cmd)
        if not argv:
            raise SpecError(f"vllm_cmd: is empty; set it to {self.cmd_example or f'`{self.default_cmd}`'}")
        exe = argv[0]
        if not commands.resolve(exe):
            raise SpecError(f"vllm_cmd: {exe} not found; {commands.not_found_fix(exe, self.install_hint)}")
        commands.check_shape(argv)
        return argv

    def argv(self, trial: Trial, port: int, host: str) -> list[str]:
        """The server's argv, starting with the trial's command words (the launcher splices a container's
        options in after `run`, and chooses host: 0.0.0.0 inside a container)."""
        raise NotImplementedError

    def env(self, trial: Trial) -> dict[str, str]:
        """Extra environment for the server process, over the launcher's own."""
        return {}

    def fatal(self, line: str) -> str | None:
        """The failure kind of a log line that ends the start wait at once; None for any other line."""
        return None

    def detect(self, text: str) -> bool:
        """This engine wrote the log (scan-log picks the engine by it; vLLM is the fallback)."""
        return False

    def scan(self, text: str) -> ScanResult:
        """The whole log: failure kind, evidence, remedy, capacity facts."""
        raise NotImplementedError

    def after_ready(self, trial: Trial, base_url: str, *, long: bool = True) -> dict:
        """Engine-specific checks once the server answers (Ollama: load the model, /api/ps, its own long
        request): record fields; `outcome`/`failure`/`evidence`/`remedy` set the verdict, `engine_note` the note."""
        return {}

    def backend(self, cmd: str | list[str] | tuple[str, ...], env: Mapping[str, str] | None = None) -> str:
        """Which build the command runs (e.g. vllm-cpu, llamacpp-cuda, fake, unknown); never raises."""
        return "unknown"
