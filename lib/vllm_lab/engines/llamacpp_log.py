"""llama.cpp log (llama-server, and the llama.cpp lines inside Ollama's log) -> failure kind, evidence line,
remedy, and capacity facts; and which engine wrote a log.

Wordings are the ones in llama.cpp's source from 2024 to 2026 (reference/gguf-facts.md, section 4). The
tables are plain data so the scanning machinery can take them as they are:
- `RULES`: (kind, grade, patterns). `fatal` lines name their kind; `generic` lines only say an allocation
  failed (`cudaMalloc failed: out of memory`): the next specific line of the same failure names the kind, else
  the phase the log was in does (loading tensors -> weights_oom, context -> kv_cache_oom, after the KV cache
  was sized -> compute_oom, after the server listened -> cuda_oom); `hint` lines explain a crash nothing
  stronger explains.
- `FACTS`: fact -> patterns in order of preference (summed facts are in `_SUMMED`).
- `REMEDIES`: kind -> templates naming llama.cpp's own knobs.
Before a ready line only the last start counts; after it, what failed while serving.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

__all__ = [
    "FACTS",
    "KINDS",
    "READY",
    "REMEDIES",
    "RULES",
    "LlamaScan",
    "classify_line",
    "clean_line",
    "detect_engine",
    "scan_file",
    "scan_log",
]

KINDS = (
    "kv_cache_oom",
    "weights_oom",
    "compute_oom",
    "cuda_oom",
    "gpu_unsupported",
    "bad_model_file",
    "context_exceeded",
    "port_in_use",
    "other",
)

_MIB = r"(\d+(?:\.\d+)?)"

# --------------------------------------------------------------------------------------------------
# Cleaning: the prefixes people's logs carry in front of llama.cpp's own text
# --------------------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_PREFIXES = tuple(
    re.compile(p)
    for p in (
        r"^\s*\d+\t",  # `cat -n` line numbers
        r"^[A-Z][a-z]{2} +\d+ \d\d:\d\d:\d\d \S+ [\w.@-]+\[\d+\]: ",  # journald "Jan 26 17:50:35 host ollama[1418]: "
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\S* \S+ [\w.@-]+\[\d+\]: ",  # journald, ISO time
        r"^\s*[a-z0-9][\w.-]* +\| ",  # docker compose "ollama  | ", "ollama-2  | "
        r"^\[[\w ]+\]: ",  # "[llama Debug]: " (LLamaSharp), "[llama-cpp] | " below
        r"^\[[\w-]+\] \| ",
        r"^\d\d/\d\d/\d{4} \d\d:\d\d\s+\w+\s+",  # "24/09/2025 22:45\tollama\t" (a NAS log viewer)
        r"^\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)? ",  # Docker Desktop timestamps
        r"^\[\d{9,}\] ",  # "[1724830909] " (--log-file era)
        r"^(?:\[\d+\] )?\d+\.\d\d\.\d{3}\.\d{3} [DIWE] ",  # "[47161] 0.14.912.338 D " (timestamped log)
        r"^\d+\.\d\d\.\d{3} [DIWE] ",  # "0.00.009 I " (today's builds: minutes.seconds.millis and the level)
        r"^\[\d\d:\d\d:\d\d(?:\.\d+)?\] (?:[A-Z]+ +)?",  # "[14:50:11.903191] INFO     " (rich)
    )
)


def clean_line(line: str) -> str:
    """One log line without colours and the journald / compose / timestamp prefixes in front of it."""
    text = _ANSI.sub("", line).rstrip()
    changed = True
    while changed:
        changed = False
        for rx in _PREFIXES:
            m = rx.match(text)
            if m and m.end() > 0:
                text = text[m.end() :]
                changed = True
    return text.strip()


def _records(text: str) -> list[str]:
    return [clean_line(ln) for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]


# --------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------

# (kind, grade, patterns). Named groups feed the remedy.
RULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    (
        "kv_cache_oom",
        "fatal",
        (
            r"failed to allocate buffer for kv cache",
            r"llama_kv_cache_init\(\) failed for self-attention cache",
            r"failed to initialize the context: failed to allocate buffer for kv cache",
        ),
    ),
    (
        "weights_oom",
        "fatal",
        (
            r"error loading model: unable to allocate (?P<device>\S+) buffer",
            r"error loading model: unable to allocate backend buffer",
            r"alloc_tensor_range: failed to allocate (?P<device>\S+) buffer of size (?P<bytes>\d+)",
            r"model requires more system memory \((?P<need>[^)]*)\) than is available \((?P<have>[^)]*)\)",
        ),
    ),
    (
        "compute_oom",
        "fatal",
        (
            r"failed to allocate compute(?: \(?pp\)?)? buffers",
            r"ggml_gallocr_reserve_n(?:_impl)?: failed to allocate (?P<device>\S+) buffer of size (?P<bytes>\d+)",
        ),
    ),
    (
        "cuda_oom",
        "fatal",
        (r"(?:CUDA|HIP|ROCm|SYCL) error: out of memory", r"CUDA error 2 at .*: out of memory"),
    ),
    (
        "gpu_unsupported",
        "fatal",
        (
            r"no kernel image is available for execution on the device",
            r"CUDA error: invalid device function",
        ),
    ),
    (
        "bad_model_file",
        "fatal",
        (
            r"invalid magic characters",
            r"failed to open GGUF file '?(?P<path>[^']*)'?",
            r"failed to read key-value pairs",
            r"data is not within the file bounds",
            r"unknown model architecture: '(?P<arch>[^']*)'",
            r"error loading model: (?!unable to allocate)(?P<reason>.+)",
        ),
    ),
    (
        "context_exceeded",
        "fatal",
        (
            r"exceed_context_size_error",
            r"the request exceeds the available context size",
            r"exceeds the available context size(?: \((?P<n_ctx_slot>\d+) tokens\))?",
        ),
    ),
    (
        "port_in_use",
        "fatal",
        (
            r"couldn't bind HTTP server socket(?:, hostname: (?P<host>\S+), port: (?P<port>\d+))?",
            r"bind: address already in use",
            r"\[Errno (?:98|48|10048)\] (?:Address already in use|error while attempting to bind)",
            r"bind: Only one usage of each socket address",  # Windows (WSAEADDRINUSE)
        ),
    ),
    # an allocation that failed; the next specific line, else the phase, says which buffer
    (
        "oom",
        "generic",
        (
            r"allocating (?P<alloc_mib>[\d.]+) MiB on device \d+: cudaMalloc failed: out of memory",
            r"cudaMalloc failed: out of memory",
            r"ggml_backend_\w+_buffer_type_alloc_buffer: failed to allocate buffer of size (?P<bytes>\d+)",
            r"ggml_aligned_malloc: insufficient memory \(attempted to allocate (?P<alloc_mb>[\d.]+) MB\)",
            r"failed to allocate (?P<device>\S+) buffer of size (?P<bytes>\d+)",
            # std::thread could not map its stack: under an address-space limit, the memory ran out
            r"what\(\):\s+Resource temporarily unavailable",
            # ggml_init could not allocate its context's buffer (seen under a 150 MiB address-space limit)
            r"GGML_ASSERT\(ctx->mem_buffer != NULL\) failed",
        ),
    ),
    (
        "gpu_unsupported",
        "hint",
        (
            r"ggml_cuda_init: failed to initialize CUDA: (?P<reason>.+)",
            r"no usable GPU found",
            r"compute capability not in compiled architectures",
            r"NVIDIA driver too old",
        ),
    ),
)

_COMPILED = tuple((kind, grade, tuple(re.compile(p) for p in pats)) for kind, grade, pats in RULES)

# The server listens: what failed before it was retried or survived.
READY = re.compile(
    r"server is listening on|llama server listening at|\"HTTP server listening\"|HTTP server listening"
    r"|llama runner started in|llama-server started in|srv +\w*: model loaded$"
)
# A start that ended: when nothing else matched, the failure is "other" with this line as evidence.
_CRASH = re.compile(
    r"exiting due to model loading error|failed to load model|failed to create context"
    r"|terminate called|GGML_ASSERT|^panic: |Segmentation fault|core dumped|^Aborted"
    r"|process (?:has terminated|no longer running)|level=ERROR|\bERR\b|CUDA error"
)
# Phase markers for a generic allocation failure
_PHASE_CONTEXT = re.compile(r"^(?:llama_context|llama_new_context_with_model|llama_init_from_model): n_ctx")
_PHASE_KV_DONE = re.compile(r"KV self size|llama_kv_cache(?:_unified)?: +size = |kv self size")


# --------------------------------------------------------------------------------------------------
# Facts
# --------------------------------------------------------------------------------------------------

_CTX = r"(?:llama_context|llama_new_context_with_model|llama_init_from_model)"
FACTS: dict[str, tuple[str, ...]] = {
    "n_ctx": (rf"^{_CTX}: n_ctx += (\d+)", r"llama_kv_cache_init: kv_size = (\d+)"),
    "n_ctx_slot": (
        r"n_ctx_slot = (\d+)",
        r"\"n_ctx_slot\": ?(\d+)",
        r"new slot,? n_ctx = (\d+)",
        rf"^{_CTX}: n_ctx_(?:seq|per_seq|pre_seq) += (\d+)",
        r"[\"']n_ctx[\"']: ?(\d+)",
        r"exceeds the available context size \((\d+) tokens\)",
    ),
    "n_slots": (r"n_slots = (\d+)", r"\"?n_slots\"?[=:] ?(\d+)", rf"^{_CTX}: n_seq_max += (\d+)"),
    "n_ctx_train": (r"n_ctx_train += (\d+)", r"n_ctx_train \((\d+)\)"),
    "layers_offloaded": (r"offloaded (\d+)/\d+ layers to GPU",),
    "layers_total": (r"offloaded \d+/(\d+) layers to GPU",),
    "flash_attn": (
        r"Flash Attention was auto, set to (\w+)",
        r"resolve_fused_ops: Flash Attention (enabled|disabled)\b",  # builds since ~2026: -fa auto resolved
        rf"^{_CTX}: flash_attn += (\w+)",
    ),
    "engine_version": (
        r"^build: (\d+) \(",
        r"^version: (\d+) \(",
        r"\"build\": ?(\d+)",
        r"build_info: b(\d+)",
        r"main: build = (\d+)",
        r"common_params_print_info: build (\d+) \(",
        r"Listening on \S+ \(version (\d+\.\d+\.\d+\S*)\)",
    ),
}
_FACTS_RX = {k: tuple(re.compile(p) for p in v) for k, v in FACTS.items()}

# Summed facts: each cache (SWA models print one per cache) or GPU buffer counts once
_KV_SIZE_LINE = re.compile(rf"llama_kv_cache(?:_unified)?: +size = +{_MIB} MiB \(([^)]*)\)")
_KV_SELF = re.compile(rf"KV self size += +{_MIB} MiB|kv self size += +{_MIB} MB")
_KV_BUFFER = re.compile(rf"^llama_kv_cache\w*: +(\S+) KV buffer size = +{_MIB} MiB")
_MODEL_BUFFER = re.compile(
    rf"^(?:load_tensors|llm_load_tensors): +(\S+) (?:model )?buffer size = +{_MIB} MiB"
)
_HOST_DEVICES = re.compile(r"^(?:CPU\w*|\w+_Host|AMX|Metal_Mapped)$", re.I)
_SUMMED = ("kv_cache_mib", "model_buffer_mib")

_TRUE = {"1", "true", "enabled", "on", "yes"}
_FALSE = {"0", "false", "disabled", "off", "no"}


def _facts(records: list[str]) -> dict[str, object]:
    facts: dict[str, object] = {}
    for fact, patterns in _FACTS_RX.items():
        facts[fact] = None
        for rx in patterns:
            found = [m.group(1) for r in records if (m := rx.search(r))]
            if not found:
                continue
            # the main model's context comes first (a draft model's second); a version is the first stated
            raw = found[0]
            if fact == "flash_attn":
                low = raw.lower()
                if low in _TRUE | _FALSE:
                    facts[fact] = low in _TRUE
                    break
                continue  # "auto": its resolution is another line
            if fact == "engine_version" and raw == "0":
                continue  # "build 0 (unknown)": a build without its number (e.g. a wheel)
            facts[fact] = raw if fact == "engine_version" else int(raw)
            break
    facts["kv_cache_mib"] = _kv_total(records)
    gpu = [float(m.group(2)) for r in records if (m := _MODEL_BUFFER.search(r))]
    dev = [m.group(1) for r in records if (m := _MODEL_BUFFER.search(r))]
    gpu = [v for d, v in zip(dev, gpu, strict=True) if not _HOST_DEVICES.match(d)]
    facts["model_buffer_mib"] = round(sum(gpu), 2) if gpu else None
    return facts


def _kv_total(records: list[str]) -> float | None:
    """The KV cache's total MiB: today's `llama_kv_cache: size = X MiB (N cells, L layers, a/b seqs)` lines,
    one per cache (summed: sliding-window models have two), else 2024's `KV self size`, else the sum of
    the per-device `KV buffer size` lines."""
    seen: list[str] = []
    total = 0.0
    for r in records:
        m = _KV_SIZE_LINE.search(r)
        if m and m.group(0) not in seen:  # a restart prints the same line again: count it once
            seen.append(m.group(0))
            total += float(m.group(1))
    if seen:
        return round(total, 2)
    for r in records:
        m = _KV_SELF.search(r)
        if m:
            return float(m.group(1) or m.group(2))
    buffers = [float(m.group(2)) for r in records if (m := _KV_BUFFER.search(r))]
    return round(sum(buffers), 2) if buffers else None


# --------------------------------------------------------------------------------------------------
# Remedies
# --------------------------------------------------------------------------------------------------

REMEDIES: dict[str, tuple[str, ...]] = {
    "kv_cache_oom": (
        "the KV cache does not fit: lower -c (now {n_ctx}), or quantize it with -ctk q8_0 -ctv q8_0 -fa on"
        " (about half of f16); -np N without --kv-unified splits -c across N slots, it does not shrink it",
        "the KV cache does not fit: lower -c, or quantize it with -ctk q8_0 -ctv q8_0 -fa on (about half of"
        " f16); -np N without --kv-unified splits -c across N slots, it does not shrink it",
    ),
    "weights_oom": (
        "the weights do not fit in {device} memory: use a smaller quantization (e.g. Q4_K_M) or a lower -ngl"
        " (layers left on the CPU run slower); -c does not help",
        "the weights do not fit: use a smaller quantization (e.g. Q4_K_M) or a lower -ngl (layers left on the"
        " CPU run slower); -c does not help",
    ),
    "compute_oom": (
        "the compute buffer does not fit: turn flash attention on (-fa on: the attention scratch no longer"
        " grows with -c), lower -ub / -b (e.g. -ub 256), or lower -c / -np",
    ),
    "cuda_oom": (
        "out of GPU memory while running: lower -c or -np, quantize the KV cache (-ctk q8_0 -ctv q8_0 with"
        " -fa on), or lower -ngl; free the GPU memory other processes hold",
    ),
    "gpu_unsupported": (
        "this llama.cpp build has no usable kernels for this GPU: use a build compiled for its compute"
        " capability (CMAKE_CUDA_ARCHITECTURES, e.g. 61 for a P40, with CUDA 12.x: CUDA 13 dropped Pascal),"
        " or run on the CPU with -ngl 0",
    ),
    "bad_model_file": (
        "the model file is not a GGUF this build can load (architecture '{arch}'): use a newer llama.cpp"
        " build or a model of a supported architecture",
        "the GGUF file is missing, corrupt, incomplete or of an architecture this build does not know: check"
        " the -m path and the file's size (download it again), or use a newer llama.cpp build",
    ),
    "context_exceeded": (
        "the request is longer than a slot's context ({n_ctx_slot} tokens): raise -c (each of -np N slots"
        " gets -c/N unless --kv-unified), lower -np, or send a shorter prompt",
        "the request is longer than a slot's context: raise -c (each of -np N slots gets -c/N unless"
        " --kv-unified), lower -np, or send a shorter prompt",
    ),
    "port_in_use": (
        "choose a free --port (port {port} is taken) or stop the process that holds it",
        "choose a free --port or stop the process that holds it",
    ),
    "other": ("no known cause matched: read the evidence line and the lines above it",),
}


def _remedy(kind: str, ctx: dict[str, object]) -> str:
    fields = re.compile(r"\{(\w+)\}")
    for template in REMEDIES.get(kind, ()) + REMEDIES["other"]:
        if all(ctx.get(f) is not None for f in fields.findall(template)):
            return template.format(**{k: v for k, v in ctx.items() if v is not None})
    return REMEDIES["other"][0]


# --------------------------------------------------------------------------------------------------
# Scan
# --------------------------------------------------------------------------------------------------


@dataclass
class LlamaScan:
    """One scanned llama.cpp / Ollama log. The JSON keys are these fields (`scan-log --json`)."""

    failure: str | None = None
    evidence: str | None = None
    remedy: str | None = None
    engine: str = "llamacpp"
    engine_version: str | None = None
    n_ctx: int | None = None
    n_ctx_slot: int | None = None
    n_slots: int | None = None
    n_ctx_train: int | None = None
    kv_cache_mib: float | None = None
    layers_offloaded: int | None = None
    layers_total: int | None = None
    model_buffer_mib: float | None = None
    flash_attn: bool | None = None
    ready: bool = False

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Hit:
    kind: str
    grade: str
    index: int
    match: re.Match[str]


def _match(record: str, grades: tuple[str, ...]) -> _Hit | None:
    for kind, grade, patterns in _COMPILED:
        if grade not in grades:
            continue
        for rx in patterns:
            m = rx.search(record)
            if m:
                return _Hit(kind, grade, -1, m)
    return None


def classify_line(line: str) -> str | None:
    """The failure kind when this one line names one (a `fatal` rule); None otherwise. A bare
    `cudaMalloc failed` names no kind by itself: the next line says which buffer it was."""
    hit = _match(clean_line(line), ("fatal",))
    return hit.kind if hit else None


def _phase_kind(records: list[str], index: int) -> str:
    """What a bare allocation failure at `index` was allocating, from what the log had done before it."""
    before = records[:index]
    if any(_PHASE_KV_DONE.search(r) for r in before):
        return "compute_oom"
    if any(_PHASE_CONTEXT.search(r) for r in before):
        return "kv_cache_oom"
    return "weights_oom"


def _evidence(record: str, match: re.Match[str] | None = None) -> str:
    """The line; a long one (a client's JSON record) cut to the sentence around the match."""
    text = record
    if match is not None and len(text) > 300:
        start = max(0, match.start() - 120)
        end = min(len(text), match.end() + 160)
        text = ("... " if start else "") + text[start:end] + (" ..." if end < len(record) else "")
    return re.sub(r"\s+", " ", text).strip()


def scan_log(text: str) -> LlamaScan:
    """Classify one llama.cpp (or Ollama) log and pull its capacity facts."""
    records = _records(text)
    facts = _facts(records)
    ready_at = max((i for i, r in enumerate(records) if READY.search(r)), default=None)
    start = 0 if ready_at is None else ready_at + 1
    scan = LlamaScan(engine=detect_engine(text) or "llamacpp", ready=ready_at is not None, **facts)

    hits = [
        _Hit(h.kind, h.grade, i, h.match)
        for i, r in enumerate(records[start:], start)
        if (h := _match(r, ("fatal", "generic")))
    ]
    hit: _Hit | None = None
    kind: str | None = None
    fatal = [h for h in hits if h.grade == "fatal"]
    generic = [h for h in hits if h.grade == "generic"]
    if fatal:
        hit = fatal[0]
        kind = hit.kind
    elif generic:
        hit = generic[0]
        kind = "cuda_oom" if ready_at is not None else _phase_kind(records, hit.index)
    else:
        crash = next((i for i, r in enumerate(records[start:], start) if _CRASH.search(r)), None)
        if crash is not None:
            hints = [
                _Hit(h.kind, h.grade, i, h.match)
                for i, r in enumerate(records[start:], start)
                if (h := _match(r, ("hint",)))
            ]
            hit = hints[0] if hints else None
            kind = hit.kind if hit else "other"
            if hit is None:
                scan.evidence = _evidence(records[crash])
    if kind is None:
        return scan
    scan.ready = False
    scan.failure = kind
    if hit is not None:
        scan.evidence = _evidence(records[hit.index], hit.match)
    ctx: dict[str, object] = {k: v for k, v in facts.items() if v is not None}
    if hit is not None:
        ctx.update({k: v for k, v in hit.match.groupdict().items() if v})
    scan.remedy = _remedy(kind, ctx)
    return scan


def scan_file(path) -> LlamaScan:
    from pathlib import Path

    return scan_log(Path(path).read_bytes().decode("utf-8", errors="replace"))


# --------------------------------------------------------------------------------------------------
# Which engine wrote this log
# --------------------------------------------------------------------------------------------------

_OLLAMA = re.compile(
    r"ollama|level=\w+ source=\S+\.go:\d+|\[GIN\]|llama runner process|llama-server process has terminated"
    r"|OLLAMA_|model requires more system memory|:11434\b",
    re.I,
)
_LLAMACPP = re.compile(
    r"llama_model_load|llm_load_|print_info: |load_tensors: |llama_new_context_with_model|llama_context: "
    r"|llama_kv_cache|ggml_\w+|^srv +\w+|^slot +\w+|llama_init_from_model|exceed_context_size_error"
    r"|couldn't bind HTTP server socket|server is listening on|llama server listening|\.gguf\b"
    r"|exceeds the available context size|error loading model|no kernel image is available"
    r"|failed to allocate buffer for kv cache",
    re.M,
)
_VLLM = re.compile(
    r"\bvLLM\b|vllm[./]|EngineCore|Application startup complete|gpu_memory_utilization|max_model_len"
    r"|Maximum concurrency for|KV cache size: [\d,]+ tokens",
)


def detect_engine(text: str) -> str | None:
    """ "vllm", "llamacpp" or "ollama" from a log's text (Ollama's log carries llama.cpp's lines, so its own
    markers decide first); None when nothing says."""
    plain = "\n".join(_records(text))
    llama = len(_LLAMACPP.findall(plain))
    vllm = len(_VLLM.findall(plain))
    # the raw text too: a compose service or journald unit named ollama is the log's own word
    if _OLLAMA.search(text) and vllm <= llama:
        return "ollama"
    if vllm > llama:
        return "vllm"
    if llama:
        return "llamacpp"
    return "vllm" if vllm else None
