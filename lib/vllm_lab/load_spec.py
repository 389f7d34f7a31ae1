"""A load's parameters (the plan's LOAD, `--load`, `vllm-lab load`'s options) and their checks, apart from
load.py (which runs a load), so that spec can check a trial's load before any launch without importing
what sits above it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from vllm_lab.errors import SpecError

MAX_LEVELS = 32
MAX_CONCURRENCY = 4096
MAX_REQUESTS = 100_000  # per level; with --duration too, so every loop has a count


@dataclass(frozen=True)
class LoadSpec:
    concurrency: tuple[int, ...] = (1, 2, 4)
    requests: int | None = 8  # per level (None when duration_s is given)
    duration_s: float | None = None  # per level: no new request after it, those in flight finish
    prompt_tokens: int = 128
    output_tokens: int = 32
    slo_ttft_ms: float | None = None  # TTFT p90 above it ends the useful range (knee)
    request_timeout_s: float = 120.0  # per request deadline (a stream that stops)

    def __post_init__(self) -> None:
        object.__setattr__(self, "concurrency", tuple(self.concurrency))
        if self.duration_s is not None and self.requests == LoadSpec.requests:
            object.__setattr__(self, "requests", None)  # LoadSpec(duration_s=30): requests was the default

    @classmethod
    def from_params(cls, value: dict, where: str = "LOAD") -> LoadSpec:
        """A plan/notebook LOAD mapping (or the CLI's options) -> a validated spec; SpecError names the field."""
        if not isinstance(value, dict):
            raise SpecError(
                f"{where}: expected a mapping like {{concurrency: [1, 2, 4], requests: 8}}, got {value!r}"
            )
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(value) - known)
        if unknown:
            raise SpecError(f"{where}: unknown key(s) {', '.join(unknown)}; use {', '.join(sorted(known))}")
        kw = dict(value)
        if kw.get("duration_s") is not None and kw.get("requests") is not None:
            raise SpecError(f"{where}: both requests and duration_s given; give one of them")
        if "concurrency" in kw:
            kw["concurrency"] = _int_list(kw["concurrency"], f"{where}.concurrency")
        if kw.get("duration_s") is not None:
            kw["requests"] = None
        elif "requests" not in kw and all(_whole(x) for x in kw.get("concurrency") or ()):
            # no count given: each level gets at least as many requests as its users
            kw["requests"] = max(cls.requests, *kw.get("concurrency") or (0,))
        return cls(**kw).validate(where)

    def validate(self, where: str = "LOAD") -> LoadSpec:
        c = self.concurrency
        if not c or not all(
            isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= MAX_CONCURRENCY for x in c
        ):
            raise SpecError(
                f"{where}.concurrency: {list(c)}; give 1 to {MAX_LEVELS} whole numbers in 1..{MAX_CONCURRENCY}, e.g. [1, 2, 4]"
            )
        if len(c) > MAX_LEVELS or list(c) != sorted(set(c)):
            raise SpecError(
                f"{where}.concurrency: {list(c)}; give at most {MAX_LEVELS} levels, increasing, each once"
            )
        if (self.requests is None) == (self.duration_s is None):
            raise SpecError(f"{where}: give exactly one of requests (per level) or duration_s")
        if self.requests is not None and not (_whole(self.requests) and 1 <= self.requests <= MAX_REQUESTS):
            raise SpecError(f"{where}.requests: {self.requests!r}; give a whole number in 1..{MAX_REQUESTS}")
        if self.requests is not None and self.requests < max(c):  # that level would claim users it never had
            raise SpecError(f"{where}.requests: {self.requests} per level never puts {max(c)} streams in flight; give "
                            f"requests per level at least the highest concurrency ({max(c)})")  # fmt: skip
        if self.duration_s is not None and not (_number(self.duration_s) and 0 < self.duration_s <= 86400):
            raise SpecError(f"{where}.duration_s: {self.duration_s!r}; give seconds per level, > 0")
        for name in ("prompt_tokens", "output_tokens"):
            v = getattr(self, name)
            if not (_whole(v) and 1 <= v <= 10_000_000):
                raise SpecError(f"{where}.{name}: {v!r}; give a whole number of tokens >= 1")
        if self.slo_ttft_ms is not None and not (_number(self.slo_ttft_ms) and self.slo_ttft_ms > 0):
            raise SpecError(
                f"{where}.slo_ttft_ms: {self.slo_ttft_ms!r}; give milliseconds > 0, or leave it out"
            )
        if not (_number(self.request_timeout_s) and self.request_timeout_s > 0):
            raise SpecError(f"{where}.request_timeout_s: {self.request_timeout_s!r}; give seconds > 0")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["concurrency"] = list(self.concurrency)
        return d


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _int_list(v, where: str) -> tuple[int, ...]:
    """[1, 2, 4], (1, 2, 4), 4, or the CLI's "1,2,4"."""
    if isinstance(v, str):
        try:
            return tuple(int(x) for x in v.split(",") if x.strip())
        except ValueError:
            raise SpecError(f"{where}: {v!r}; give whole numbers separated by commas, e.g. 1,2,4") from None
    if _whole(v):
        return (v,)
    if isinstance(v, list | tuple):
        return tuple(v)
    raise SpecError(f"{where}: {v!r}; give a list of whole numbers, e.g. [1, 2, 4]")
