"""The baselines the search is measured against: plain bisection (the notes' step 4) and vLLM's auto_tune.

Used by bench_search.py and by tests/test_search.py (which puts this folder on sys.path).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from vllm_lab.search import (
    BLOCK,
    MemorySearchResult,
    SearchResult,
    describe,
    passes,
    started,
    total_launch_seconds,
)


def naive_bisect(launch: Callable[[int], dict], low: int, high: int, block_size: int = BLOCK) -> SearchResult:
    """The baseline: plain bisection on stable / not stable, reading nothing else (the notes' step 4)."""
    t0 = time.monotonic()
    low_k, high_k = math.ceil(low / block_size), high // block_size
    good, bad = low_k - 1, high_k + 1
    records, steps = [], []
    bad_rec = None
    while bad - good > 1:
        k = (good + bad) // 2
        rec = launch(k * block_size)
        records.append(rec)
        ok = passes(rec)
        steps.append({"max_model_len": k * block_size, "why": "bisection", "outcome": rec.get("outcome"),
                      "failure": rec.get("failure"), "stable": ok})  # fmt: skip
        if ok:
            good = k
        else:
            bad, bad_rec = k, rec
    ans = good * block_size if good >= low_k else None
    if bad_rec is None:
        plus, ev = None, "not checked: the answer is the top of the searched range"
    else:
        plus, ev = True, f"the launch at {bad * block_size} was {describe(bad_rec)}"
    reason = (
        f"bisected; +1 block: {ev}" if ans is not None else f"even low ({low_k * block_size}) is not stable"
    )
    return SearchResult(
        max_model_len=ans, launches=len(records), seconds=round(time.monotonic() - t0, 3), trials=records,
        reason=reason, plus_one_fails=plus, plus_one_evidence=ev, method="naive_bisect", steps=steps,
        low=low_k * block_size, high=high, block_size=block_size, launch_seconds=total_launch_seconds(records),
    )  # fmt: skip


def auto_tune_baseline(
    launch_mem: Callable[[float], dict], *, start: float = 0.98, step: float = 0.01, steps: int = 9
) -> MemorySearchResult:
    """vLLM's benchmarks/auto_tune: start at 0.98 and step down by 0.01 until the server starts."""
    t0 = time.monotonic()
    records, log = [], []
    ans = None
    for i in range(steps):
        u = round(start - i * step, 4)
        rec = launch_mem(u)
        records.append(rec)
        ok = started(rec)
        log.append({"gpu_memory_utilization": u, "why": "step down", "outcome": rec.get("outcome"),
                    "failure": rec.get("failure"), "started": ok})  # fmt: skip
        if ok:
            ans = u
            break
    return MemorySearchResult(
        value=ans, launches=len(records), seconds=round(time.monotonic() - t0, 3), trials=records,
        reason="stepped down from the top" if ans is not None else f"nothing from {start} down {steps} steps starts",
        plus_one_fails=True if ans is not None and records and len(records) > 1 else None, method="auto_tune",
        steps=log, launch_seconds=total_launch_seconds(records),
    )  # fmt: skip
