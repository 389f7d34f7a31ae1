"""The engines vllm-lab can measure, by name: `get(name)`, `names()`, `register(engine)`.

Everything that differs between inference servers lives in one module per engine here (argv, readiness,
log rules and capacity facts, /metrics names, backend and version); launcher, probe, search and load stay
engine-agnostic and ask the trial's engine. See base.py for the contract and the import rule.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from vllm_lab import logscan
from vllm_lab.engines import llamacpp, ollama, vllm
from vllm_lab.engines.base import METRIC_NAMES, Engine
from vllm_lab.errors import SpecError

__all__ = ["DEFAULT", "METRIC_NAMES", "Engine", "cli_scan_log", "get", "metric", "metric_series", "names",
           "of_log", "register"]  # fmt: skip

DEFAULT = "vllm"  # a trial, plan step or install that names no engine
_REGISTRY: dict[str, Engine] = {}


def register(engine: Engine) -> Engine:
    """Add (or replace) an engine under its name."""
    if not engine.name:
        raise ValueError("an engine needs a name")
    _REGISTRY[engine.name] = engine
    return engine


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str | None) -> Engine:
    """The engine of that name (None: the default); SpecError, one line, for an unknown name."""
    name = DEFAULT if name is None else name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise SpecError(f"engine: {name!r} is not one of {', '.join(_REGISTRY)}") from None


def metric_series(ours: Iterable[str] = METRIC_NAMES) -> set[str]:
    """Every /metrics series any engine names for these of our names: what a scrape keeps (its page holds
    one engine's only)."""
    return {s for e in _REGISTRY.values() for name in ours for s in e.metrics.get(name, ())}


def metric(values: Mapping[str, float], name: str) -> float | None:
    """Our metric `name` (METRIC_NAMES) from one scrape's {series: value}, whichever engine served it."""
    for e in _REGISTRY.values():
        for series in e.metrics.get(name, ()):
            if series in values:
                return values[series]
    return None


def of_log(text: str) -> Engine:
    """The engine that wrote this log: the first that recognises it, else vLLM."""
    return next((e for e in _REGISTRY.values() if e.name != DEFAULT and e.detect(text)), get(DEFAULT))


def cli_scan_log(args) -> int:
    """`vllm-lab scan-log PATH [--json]`: exit 0 when the log was read, 2 (one stderr line) when not."""
    try:
        if args.path == "-":
            text = sys.stdin.buffer.read().decode("utf-8", errors="replace")
        else:
            text = Path(args.path).read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        reason = e.strerror or type(e).__name__
        print(f"vllm-lab scan-log: cannot read {args.path}: {reason}", file=sys.stderr)
        return 2
    scan = of_log(text).scan(text)
    if getattr(args, "json", False):
        print(json.dumps(scan.to_json()))
    else:
        print(logscan.human(scan))
    return 0


register(vllm.ENGINE)
register(llamacpp.ENGINE)
register(ollama.ENGINE)
