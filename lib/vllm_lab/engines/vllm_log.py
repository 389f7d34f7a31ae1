"""vLLM's log: its failure kinds, rules, capacity facts and remedies, as a table for logscan's machinery.

Wordings are the ones in vLLM's source (see reference/vllm-facts.md, sections 1 and 2), vLLM 0.6 to 0.33.
`scan_log`, `scan_file`, `classify_line` here are vLLM's: what `vllm-lab scan-log` applies to a vLLM log.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from vllm_lab.logscan import F, N, Rule, RuleTable, clean_line, rule, rx
from vllm_lab.logscan import classify_line as _classify_line
from vllm_lab.logscan import scan_file as _scan_file
from vllm_lab.logscan import scan_log as _scan_log

__all__ = ["FACTS", "KINDS", "READY_MARKER", "REMEDIES", "RULES", "TABLE", "WRAPPERS", "LogScan",
           "classify_line", "clean_line", "scan_file", "scan_log"]  # fmt: skip


KINDS = (
    "kv_cache_insufficient",
    "no_kv_memory",
    "gpu_mem_util_unavailable",
    "quantization_mismatch",
    "quantization_unsupported_gpu",
    "dtype_unsupported_gpu",
    "gpu_unsupported",
    "cuda_oom",
    "max_len_exceeds_model",
    "port_in_use",
    "model_not_found",
    "other",
)

READY_MARKER = "Application startup complete."


_ENDS_ENGINE = r"when initializing the engine(?: \([^)]*\))?\.(?: See \S+ for more details\.)?"


RULES: tuple[Rule, ...] = (
    # V0 (<= 0.10) and V1 0.6.x: max_model_len does not fit the KV cache
    rule(
        "kv_cache_insufficient",
        rf"The model's max seq len \((?P<max_model_len>{N})\) is larger than the maximum number of tokens"
        rf" that can be stored in KV cache \((?P<estimated_max_model_len>{N})\)",
        end=_ENDS_ENGINE,
    ),
    # V1 >= 0.8: "models's" up to 0.21, "model's" from 0.32; 0.8.5 drops the estimate's number
    rule(
        "kv_cache_insufficient",
        rf"To serve at least one request with the models?'s max seq len \((?P<max_model_len>{N})\),"
        rf" \((?P<needed_kv_gib>{F}) GiB KV cache is needed, which is larger than the available KV cache"
        rf" memory \((?P<available_kv_gib>{F}) GiB\)",
        end=_ENDS_ENGINE,
    ),
    rule("no_kv_memory", r"No available memory for the cache blocks", end=_ENDS_ENGINE),
    rule(
        "no_kv_memory",
        r"Cannot auto-fit max_model_len: not enough GPU memory available",
        end=r"`?gpu_memory_utilization`?\.",
    ),
    # CPU build (0.2x+): the worker's own RSS already exceeds its reservation
    rule(
        "no_kv_memory",
        rf"leaving none for the KV cache\b(?:.*?increase `?--gpu-memory-utilization`? to more than"
        rf" (?P<min_util>{F}))?",
        remedy="no_kv_memory/cpu",
    ),
    # CPU backend 0.32: the reservation is smaller than what the worker already uses, so KV gets < 0
    rule(
        "no_kv_memory",
        rf"Available memory on node (?P<node>\d+) \((?P<free_gib>{F})/(?P<total_gib>{F}) GiB\) on kv cache"
        rf" allocation is less than requested memory for kv"
        rf" \((?P<kv_gib>-{F}|0(?:\.0+)?)/(?P<reserved_gib>{F}) GiB\)",
        remedy="no_kv_memory/cpu",
        end=r"other processes\.",
    ),
    # INFO lines that make the failure certain; the error line after them is the better evidence
    rule(
        "no_kv_memory",
        r"#?\s*(?:GPU|cuda|CUDA) blocks: 0\b(?!\.)",
        rf"Available KV cache memory: -{F} ?GiB",
        rf"reserved for KV Cache is -{F} ?GiB",
        rf"kv_cache_size=-{F} ?GiB",
        grade="certain",
        rank=1,
    ),
    rule(
        "gpu_mem_util_unavailable",
        rf"Free memory on device(?: (?P<device>\S+))? \((?P<free_gib>{F})/(?P<total_gib>{F}) GiB\) on startup"
        rf" is less than desired GPU memory utilization \((?P<util>{F}), (?P<requested_gib>{F}) GiB\)",
        end=r"other processes\.",
    ),
    rule(
        "gpu_mem_util_unavailable",
        rf"Available memory on node (?P<node>\d+) \((?P<free_gib>{F})/(?P<total_gib>{F}) GiB\) on startup"
        rf" is less than desired CPU memory utilization \((?P<util>{F}), (?P<requested_gib>{F}) GiB\)",
        remedy="gpu_mem_util_unavailable/cpu",
        end=r"other processes\.",
    ),
    rule(
        "gpu_mem_util_unavailable",
        rf"Available memory on node (?P<node>\d+) \((?P<free_gib>{F})/(?P<total_gib>{F}) GiB\) on kv cache"
        rf" allocation is less than requested memory for kv \((?P<requested_gib>{F})",
        remedy="gpu_mem_util_unavailable/cpu_kv",
        end=r"other processes\.",
    ),
    rule(
        "quantization_mismatch",
        r"Quantization method specified in the model config \((?P<config_quant>[^)]*)\) does not match the"
        r" quantization method specified in the `?quantization`? argument \((?P<arg_quant>[^)]*)\)",
        end=r"\.?",
    ),
    # --quantization X on a checkpoint that is not an X checkpoint (no quant config in the folder)
    rule(
        "quantization_mismatch",
        r"Cannot find the config file for (?P<arg_quant>[\w-]+)",
        remedy="quantization_mismatch/no_config",
    ),
    rule(
        "quantization_unsupported_gpu",
        r"The quantization method (?P<quant>.+?) is not supported for the current GPU\. Minimum capability:"
        r" (?P<min_cap>\d+)\. Current capability: (?P<cur_cap>-?\d+)",
        end=r"\.?",
    ),
    # compressed-tensors / quark raise it as a tuple: ('Quantization scheme is not supported for ', ...)
    rule(
        "quantization_unsupported_gpu",
        r"Quantization scheme is not supported for['\",\s]*the current GPU\.? ?Min capability: (?P<min_cap>\d+)"
        r"\.?['\",\s]*Current capability: (?P<cur_cap>-?\d+)",
    ),
    # Raised only with an explicit bf16 dtype (or auto on <= 0.8); `--dtype auto` on >= 0.9 just warns
    # "Your device ... doesn't support torch.bfloat16. Falling back to torch.float16", which is no failure.
    rule(
        "dtype_unsupported_gpu",
        r"Bfloat16 is only supported on GPUs with compute capability of at least 8\.0\. Your (?P<gpu_name>.+?)"
        r" GPU (?:has compute capability (?P<gpu_cc>\d+\.\d+)|does not have a compute capability)",
        end=r"--dtype=half\.",
    ),
    rule(
        "dtype_unsupported_gpu",
        r"(?P<dtype>(?:torch\.)?\w+) is not supported for quantization method (?P<quant>[\w-]+)\."
        r" Supported dtypes: (?P<supported>\[[^\]]*\])",
        remedy="dtype_unsupported_gpu/quant",
    ),
    rule("gpu_unsupported", r"no kernel image is available for execution on the device", flags=re.I, end=""),
    # 0.8.x with VLLM_USE_V1=1 forced on a pre-Ampere card (without it vLLM only warns and falls back to V0)
    rule(
        "gpu_unsupported",
        r"VLLM_USE_V1=1 is not supported with Compute Capability < 8\.0",
        remedy="gpu_unsupported/v1",
    ),
    rule("gpu_unsupported", r"No valid attention backend found for .*compute capability not supported"),
    # vLLM <= 0.2's own floor, and torch.compile's Triton floor (Pascal cards on builds that compile)
    rule(
        "gpu_unsupported",
        r"GPUs with compute capability below (?P<min_cc>\d+\.\d+) are not supported",
        r"Found (?P<gpu_name>.+?) which is too old to be supported by the triton GPU compiler",
        r"Triton only supports devices of CUDA Capability >= (?P<min_cc>\d+\.\d+)",
    ),
    # torch's own warnings; they explain a later crash but do not stop the start by themselves
    rule(
        "gpu_unsupported",
        r"(?:with CUDA capability (?P<sm>sm_\d+) is not compatible with the current PyTorch installation"
        r"|PyTorch no longer supports this GPU because it is too old)",
        grade="hint",
    ),
    rule(
        "cuda_oom",
        rf"CUDA out of memory occurred when warming up sampler with (?P<num_reqs>{N}) dummy requests",
        remedy="cuda_oom/sampler",
    ),
    rule("cuda_oom", r"Failed to load model - not enough GPU memory", remedy="cuda_oom/load"),
    rule(
        "cuda_oom",
        r"(?:CUDA|HIP|XPU) out of memory(?:\. Tried to allocate (?P<alloc>[\d.]+ [KMGT]iB))?",
        r"CUDA error: out of memory",
        r"\bOutOfMemoryError\b",
        rank=1,
    ),
    rule(
        "max_len_exceeds_model",
        rf"User-specified max_model_len \((?P<requested_len>{N})\) is greater than the derived max_model_len"
        rf" \((?P<len_key>[\w.]+)=(?P<derived_len>{N}|None)(?: or model_max_length=(?P<model_max_length>\w+))?",
        # with VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 the same text is logged as a warning and the start goes on
        unless=r"^(?!.*To allow overriding).*must be used with extreme caution",
        # cut before 0.2x's appended caution text: it is advice, not the cause
        end=r"VLLM_ALLOW_LONG_MAX_MODEL_LEN=1\.?|context size\.",
    ),
    rule(
        "port_in_use",
        r"\[Errno (?:98|48|10048)\] (?:Address already in use"
        r"|error while attempting to bind on address \('(?P<host>[^']*)', (?P<port>\d+)\))",
        r"\bEADDRINUSE\b",
        # vLLM's own retry for internal ports (a warning, not a failure)
        unless=r"Retrying with a new port",
        end=r"(?:: (?:\[errno \d+\] )?address already in use)?",
        flags=re.I,
    ),
    rule("model_not_found", r"Cannot find any model weights with [`'\"]?(?P<model>[^`'\"\s]+)", end=""),
    rule(
        "model_not_found",
        r"Invalid repository ID or local directory specified: '(?P<model>[^']*)'\.?",
        end="",
    ),
    rule(
        "model_not_found",
        r"Repo id must (?:be in the form 'repo_name' or 'namespace/repo_name'|use alphanumeric chars).*?"
        r": '(?P<model>[^']*)'",
        # 0.7.x lists repo files with retries for local paths and goes on
        unless=r"Error retrieving file list",
        end=r"\.(?: Use `repo_type` argument if needed\.)?",
    ),
    rule(
        "model_not_found",
        r"\bRepositoryNotFoundError\b",
        r"Repository Not Found for url",
        r"\bGatedRepoError\b",
    ),
    rule(
        "model_not_found",
        r"(?P<model>\S+) is not a local folder and is not a valid model identifier",
        r"(?P<model>\S+) does not appear to have a file named (?:config|params)\.json",
        r"No such file or directory: '(?P<model>[^']*?)/?(?:config|params)\.json'",
        r"Could not detect config format for no config file found",
        r"\bLocalEntryNotFoundError\b",
    ),
)

# Lines that report that the engine died but not why; never evidence (the cause is above them).
WRAPPERS = re.compile(
    r"Engine core initialization failed"
    r"|EngineCore failed to start"
    r"|Engine process failed to start"
    r"|Frontend process failed during engine core initialization"
    r"|EngineCore hit an exception"
    r"|EngineCore encountered (?:a fatal error|an issue)"
    r"|See (?:root cause|stack trace \(above\)|the stack trace) "
    r"|Engine loop is not running"
    r"|\bEngineDeadError\b"
    r"|died unexpectedly"
    r"|^Process \S+:$"
    r"|Worker \S+ pid \d+ died"
)

# After "Application startup complete." a crash only counts when the engine itself died.
ENGINE_DEATH = re.compile(
    r"EngineDeadError|Engine loop is not running|EngineCore encountered|died unexpectedly"
)

# kept under its old name: load.py reads it
_ENGINE_DEATH = ENGINE_DEATH


FACTS: dict[str, tuple[re.Pattern[str], ...]] = {
    "vllm_version": tuple(
        rx(p)
        for p in (
            r"vLLM API server version v?(\d+\.\d+\S*)",
            r"vLLM server version v?(\d+\.\d+[^,\s]*)",
            r"vLLM gRPC server version v?(\d+\.\d+\S*)",
            r"█ version v?(\d+\.\d+\S*)",  # the logo (>= 0.17)
            r"Initializing an? (?:V[01] )?LLM engine \(v(\d+\.\d+[^)\s]*)\)",
            r"Launching vLLM \(v(\d+\.\d+[^)\s]*)\)",
        )
    ),
    "kv_cache_tokens": (
        rx(rf"(?:GPU|CPU|XPU|TPU|HPU|NPU)(?: \+ host)? KV cache size: ({N}) tokens"),
        # V0's error names the KV capacity in tokens itself
        rx(rf"maximum number of tokens that can be stored in KV cache \(({N})\)"),
    ),
    "max_concurrency": (rx(rf"Maximum concurrency for {N} tokens per request: ({F})x"),),
    "gpu_blocks": (
        rx(rf"#?\s*(?:GPU|cuda|CUDA|TPU|HPU|XPU|NPU) blocks: ({N})"),
        rx(rf"num_gpu_blocks is: ({N})"),
        re.compile(rf"\bnum_gpu_blocks=({N})\b"),
    ),
    "estimated_max_model_len": (
        rx(rf"estimated maximum model length is ({N})"),
        rx(rf"maximum number of tokens that can be stored in KV cache \(({N})\)"),
        rx(rf"Auto-fit max_model_len: reduced from {N} to ({N})"),
    ),
    "available_kv_gib": (
        rx(rf"Available KV cache memory: ({F}) ?GiB"),
        rx(rf"available KV cache memory \(({F}) GiB\)"),
        rx(rf"the rest of the memory reserved for KV Cache is ({F}) ?GiB"),
        rx(rf"reserved ({F}) GiB memory for KV Cache as specified by kv_cache_memory_bytes"),
        rx(rf"fit in available KV cache memory \(({F}) GiB"),
        rx(rf"\bkv_cache_size=({F}) ?GiB"),
        rx(rf"\(({F})/{F}\) GiB for KV cache on node"),  # CPU backend
    ),
    "weights_gib": (
        rx(rf"Model loading took ({F}) ?Gi?B"),  # "GB" in 0.8.x dev builds
        rx(rf"Loading model weights took ({F}) ?Gi?B"),
        rx(rf"model weights take ({F}) ?GiB"),
    ),
    "max_model_len": (
        rx(rf"Maximum concurrency for ({N}) tokens per request"),
        rx(rf"max seq len \(({N})\)"),
        rx(rf"Auto-fit max_model_len: reduced from {N} to ({N})"),
        re.compile(rf"\bmax_seq_len=({N})\b"),
        rx(rf"Using max model len ({N})"),
        rx(rf"User-specified max_model_len \(({N})\)"),
        re.compile(rf"'max_model_len': ({N})\b|\bmax_model_len=({N})\b"),
    ),
}
_INT_FACTS = {"kv_cache_tokens", "gpu_blocks", "estimated_max_model_len", "max_model_len"}
_FLOAT_FACTS = {"max_concurrency", "available_kv_gib", "weights_gib"}

# Launch settings that only feed the remedy text (first pattern that matches anywhere wins).
_CONTEXT: dict[str, tuple[re.Pattern[str], ...]] = {
    "gpu_memory_utilization": (re.compile(rf"gpu_memory_utilization(?:'?: |=| \()({F})"),),
    "port": (re.compile(r"(?:'port': |\bport=)(\d+)"),),
    "model": (
        re.compile(r"(?:'model': |\bmodel=)'([^']+)'"),
        re.compile(r"huggingface\.co/([\w.-]+/[\w.-]+)/resolve/"),
    ),
}


# kind (or kind/variant) -> templates, first usable one wins. {field} must be known for the template to be
# used; a [bracketed part] is dropped when a field in it is unknown.
REMEDIES: dict[str, tuple[str, ...]] = {
    "kv_cache_insufficient": (
        "lower --max-model-len to <= {estimated_max_model_len} or raise --gpu-memory-utilization /"
        " --kv-cache-memory-bytes[ (requested {max_model_len}, KV cache has {available_kv_gib} GiB)]",
        "lower --max-model-len below {max_model_len} or raise --gpu-memory-utilization /"
        " --kv-cache-memory-bytes[ (KV cache has {available_kv_gib} GiB[, needs {needed_kv_gib} GiB])]",
        "lower --max-model-len or raise --gpu-memory-utilization / --kv-cache-memory-bytes",
    ),
    "no_kv_memory": (
        "raise --gpu-memory-utilization[ (now {gpu_memory_utilization})] or set --kv-cache-memory-bytes: no"
        " memory is left for the KV cache after the weights[ ({weights_gib} GiB)] and activations (or lower"
        " --max-num-batched-tokens / --max-num-seqs, add --enforce-eager, use a smaller model)",
    ),
    "no_kv_memory/cpu": (
        "raise --gpu-memory-utilization[ above {min_util}] (a fraction of node RAM on the CPU backend) or set"
        " --kv-cache-memory-bytes / VLLM_CPU_KVCACHE_SPACE",
    ),
    "gpu_mem_util_unavailable": (
        "lower --gpu-memory-utilization to <= {max_util} (only {free_gib}/{total_gib} GiB free at start,"
        " {util} asks for {requested_gib} GiB) or free the GPU memory held by other processes",
        "lower --gpu-memory-utilization or free the GPU memory held by other processes",
    ),
    "gpu_mem_util_unavailable/cpu": (
        "set --kv-cache-memory-bytes (or VLLM_CPU_KVCACHE_SPACE) or lower --gpu-memory-utilization to <="
        " {max_util} (a fraction of node RAM on the CPU backend: only {free_gib}/{total_gib} GiB available)",
    ),
    "gpu_mem_util_unavailable/cpu_kv": (
        "lower --kv-cache-memory-bytes / VLLM_CPU_KVCACHE_SPACE (or --gpu-memory-utilization) so the KV cache"
        " fits in the {free_gib} GiB available (asked for {requested_gib} GiB), or free memory on the node",
    ),
    "quantization_mismatch/no_config": (
        "drop --quantization {arg_quant}: this checkpoint has no {arg_quant} quantization config (its weights"
        " are not {arg_quant}-quantized); pass the flag only with a checkpoint quantized that way",
    ),
    "quantization_mismatch": (
        "drop --quantization {arg_quant} (the checkpoint's config.json says {config_quant}; vLLM picks the"
        " kernel itself) or pass --quantization {config_quant}",
    ),
    "quantization_unsupported_gpu": (
        "{quant} needs compute capability >= {min_cc} but this GPU has {cur_cc}: use a checkpoint this GPU"
        " can run (e.g. GGUF, or fp16 weights with --dtype half) or a newer GPU",
        "this quantization method needs a newer GPU: use a checkpoint this GPU can run (e.g. GGUF, or fp16"
        " weights with --dtype half) or a newer GPU",
    ),
    "dtype_unsupported_gpu": (
        "pass --dtype half (float16): the {gpu_name} GPU[ (compute capability {gpu_cc})] has no bfloat16",
        "pass --dtype half (float16): this GPU has no bfloat16",
    ),
    "dtype_unsupported_gpu/quant": ("pass --dtype half: {quant} supports only {supported}, not {dtype}",),
    "gpu_unsupported": (
        "this vLLM build has no kernels for this GPU[ ({gpu_name})][ ({sm})]: use a vLLM build compiled for its"
        " architecture (TORCH_CUDA_ARCH_LIST) or a GPU that vLLM supports (compute capability >= 7.0)",
    ),
    "gpu_unsupported/v1": (
        "unset VLLM_USE_V1 (the V1 engine of this vLLM needs compute capability >= 8.0) or use vLLM >= 0.10.2",
    ),
    "cuda_oom": (
        "lower --max-num-seqs / --max-num-batched-tokens or add --enforce-eager (no CUDA graphs); lower"
        " --gpu-memory-utilization if other processes share the GPU[ (tried to allocate {alloc})]",
    ),
    "cuda_oom/sampler": (
        "lower --max-num-seqs (the sampler warm-up with {num_reqs} requests ran out of memory) or"
        " --gpu-memory-utilization",
    ),
    "cuda_oom/load": (
        "the weights do not fit: lower --gpu-memory-utilization, raise --tensor-parallel-size, or use"
        " --quantization / a smaller model",
    ),
    "max_len_exceeds_model": (
        "lower --max-model-len to <= {derived_len} (the model's {len_key}); set VLLM_ALLOW_LONG_MAX_MODEL_LEN=1"
        " only if the model really supports {requested_len} tokens",
        "lower --max-model-len to the model's limit (config.json) or set VLLM_ALLOW_LONG_MAX_MODEL_LEN=1",
    ),
    "port_in_use": ("choose a free --port[ (port {port} is taken)] or stop the process that holds it",),
    "model_not_found": (
        "fix --model[ '{model}']: a local path must hold config.json and the weights, a Hugging Face repo id"
        " must exist (set HF_TOKEN for gated repos, HF_HUB_OFFLINE=1 needs it cached)",
    ),
    "other": ("no known cause matched: read the evidence line and the traceback above it",),
}


def _derive(ctx: dict[str, object]) -> None:
    """Remedy fields computed from the log's numbers: the largest utilization that fits, the CPU
    backend's least one, compute capabilities as x.y."""
    if "free_gib" in ctx and "total_gib" in ctx:
        free, total = float(str(ctx["free_gib"])), float(str(ctx["total_gib"]))
        if total > 0:
            ctx["max_util"] = f"{math.floor(free / total * 100) / 100:.2f}"
    if {"kv_gib", "reserved_gib", "total_gib"} <= ctx.keys():
        # CPU backend: the worker already uses reserved - kv; the reservation must exceed that
        used = float(str(ctx["reserved_gib"])) - float(str(ctx["kv_gib"]))
        ctx.setdefault("min_util", f"{math.ceil(used / float(str(ctx['total_gib'])) * 100) / 100:.2f}")
    for cap in ("min_cap", "cur_cap"):
        if str(ctx.get(cap, "")).lstrip("-").isdigit():
            n = int(str(ctx[cap]))
            ctx[cap.replace("cap", "cc")] = f"{n // 10}.{n % 10}" if n >= 0 else "unknown"


@dataclass
class LogScan:
    """One scanned log. The JSON keys are exactly these fields (the `scan-log --json` contract)."""

    failure: str | None = None
    evidence: str | None = None
    remedy: str | None = None
    vllm_version: str | None = None
    kv_cache_tokens: int | None = None
    max_concurrency: float | None = None
    gpu_blocks: int | None = None
    estimated_max_model_len: int | None = None
    available_kv_gib: float | None = None
    weights_gib: float | None = None
    max_model_len: int | None = None
    ready: bool = False

    def to_json(self) -> dict:
        return asdict(self)


# A GPU that this build cannot run at all is the cause of complaints about what that GPU lacks (bf16, a
# quantization kernel): fixing those would only reach the next wall. Torch's warning counts (a hint).
_DOMINATES = {"gpu_unsupported": ("dtype_unsupported_gpu", "quantization_unsupported_gpu")}


TABLE = RuleTable(
    kinds=KINDS, rules=RULES, wrappers=WRAPPERS, engine_death=ENGINE_DEATH, ready_marker=READY_MARKER,
    facts=FACTS, result=LogScan, remedies=REMEDIES, int_facts=frozenset(_INT_FACTS),
    float_facts=frozenset(_FLOAT_FACTS), counts_zero=frozenset({"gpu_blocks"}), context=_CONTEXT,
    derive=_derive, dominates=_DOMINATES,
)  # fmt: skip


def scan_log(text: str) -> LogScan:
    """Classify one vLLM log (any version 0.6-0.33) and pull its capacity facts."""
    return _scan_log(text, TABLE)


def scan_file(path: str | Path) -> LogScan:
    """scan_log over a file; undecodable bytes are replaced rather than fatal."""
    return _scan_file(path, TABLE)


def classify_line(line: str) -> str | None:
    """The failure kind when this ONE line is a fatal root-cause line (or an INFO line that makes the
    failure certain, such as `# GPU blocks: 0`), else None. Warnings and wrappers give None."""
    return _classify_line(line, TABLE)
