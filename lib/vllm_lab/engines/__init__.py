"""The engines vllm-lab can measure, by name: `get(name)`, `names()`, `register(engine)`.

Everything that differs between inference servers lives in one module per engine here (argv, readiness,
log rules and capacity facts, /metrics names, backend and version); launcher, probe, search and load stay
engine-agnostic and ask the trial's engine. See base.py for the contract and the import rule.
"""

from __future__ import annotations

from collections.abc import Mapping

from vllm_lab.engines import vllm
from vllm_lab.engines.base import METRIC_NAMES, Engine
from vllm_lab.errors import SpecError

__all__ = ["DEFAULT", "METRIC_NAMES", "Engine", "get", "metric", "metric_series", "names", "register"]

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


def metric_series() -> set[str]:
    """Every /metrics series any engine names: what a scrape keeps (its page holds one engine's only)."""
    return {s for e in _REGISTRY.values() for series in e.metrics.values() for s in series}


def metric(values: Mapping[str, float], name: str) -> float | None:
    """Our metric `name` (METRIC_NAMES) from one scrape's {series: value}, whichever engine served it."""
    for e in _REGISTRY.values():
        for series in e.metrics.get(name, ()):
            if series in values:
                return values[series]
    return None


register(vllm.ENGINE)
