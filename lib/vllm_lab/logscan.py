"""vLLM log -> failure kind, root-cause evidence line, remedy, and capacity facts.

Works on logs of vLLM 0.6 to 0.33 as people actually have them: with process prefixes
(`(EngineCore_DP0 pid=1)`, `[rank0]:`), docker-compose prefixes (`vllm-1  | `), box borders copied out of
terminal UIs (k9s `│ ... │`), hard-wrapped terminal copies, and newlines lost so that several log records
run together on one line. Wordings are the ones in vLLM's source (see reference/vllm-facts.md, sections
1 and 2).

How it reads a log:
1. `_records()` turns the text into clean records: one per log record, prefixes and borders stripped,
   the log level kept (a WARNING never counts as a failure: vLLM's header, Python's `WARNING:root:`,
   torch's `[W1128 ...]`, the warnings module's `UserWarning:`); Ray's `[repeated Nx across cluster]` dropped.
2. `RULES` is the table of (kind, patterns, grade): `fatal` lines are raised root causes; `certain` lines
   are INFO lines that make a failure of that kind inevitable (`# GPU blocks: 0`); `hint` lines only
   explain a crash that nothing stronger explains (so does a traceback's `raise X("known message"` line when
   the log is cut before the message). The earliest fatal/certain record is the root cause (wrappers such as
   `Engine core initialization failed` come after it and are never evidence), except that a GPU this build
   cannot run at all (`_DOMINATES`) outranks the dtype/quantization complaints it causes.
3. `FACTS` is the table of capacity facts, each a list of patterns in order of preference.
4. `REMEDIES` holds one-line remedies per kind with the log's numbers filled in.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "KINDS",
    "READY_MARKER",
    "REMEDIES",
    "RULES",
    "WRAPPERS",
    "LogScan",
    "classify_line",
    "clean_line",
    "cli_scan_log",
    "scan_file",
    "scan_log",
]

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

# Number shapes: vLLM >= 0.8 prints token counts with thousands separators ("1,587,648").
_N = r"(?:\d{1,3}(?:,\d{3})+|\d+)"
_F = r"-?\d+(?:\.\d+)?"


def _rx(pattern: str, flags: int = 0) -> re.Pattern[str]:
    """Compile a pattern written with plain spaces: " " matches any run of whitespace and " ?" an
    optional one, so a message broken across lines by a terminal or by pydantic's indentation matches.
    (No spaces inside [character classes]: write \\s there.)"""
    # [^\S\n]: whitespace within one record (_facts searches all records joined by newlines)
    return re.compile(pattern.replace(" ?", r"[^\S\n]*").replace(" ", r"[^\S\n]+"), flags)


# --------------------------------------------------------------------------------------------------
# Cleaning: prefixes, borders, lost newlines, hard wraps
# --------------------------------------------------------------------------------------------------

_ANSI = re.compile(
    r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|(?<![\w\]])\[(?:\d{1,3}(?:;\d{1,3})*)?m"
)
# Ray's log deduplication appends this to a line that several workers printed alike
_RAY_DEDUP = re.compile(r"[^\S\n]*\[repeated \d+x across cluster\]")


def _plain(text: str) -> str:
    """Text without ANSI colours and without Ray's dedup counters."""
    return _RAY_DEDUP.sub("", _ANSI.sub("", text))


_LEVELS = r"DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL"
_PROC = r"\((?:[A-Za-z][\w.-]*(?: rank=\d+)? )?pid=\d+(?:, ip=[\w.:]+)?\)"
_ISO_TS = r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?"
_BORDER = "│┃║|"

# Where a new log record starts inside a line whose newlines were lost. No word boundary is required
# before a marker: in a blob the previous record's last word runs straight into it ("...post1INFO 01-10").
_RECORD_START = re.compile(
    "|".join(
        (
            _PROC,
            rf"(?:{_LEVELS}) \d\d-\d\d \d\d:\d\d:\d\d",  # vLLM logger header
            rf"(?:{_LEVELS}):\s{{2,}}",  # uvicorn "INFO:     Application startup complete."
            r"\[rank\d+\]:",
            r"Traceback \(most recent call last\):",
            r"(?<=\S)\s{2,}File \"",  # a traceback frame glued to the previous record
            r"Process (?:SpawnProcess-\d+|ForkProcess-\d+|EngineCore\w*|\w*Worker\w*):",
            rf"\[?{_ISO_TS}\]?",
        )
    )
)
# "ValueError: ..." (tried only on lines that hold "Error: " or "Exception: ": it is the slow one)
_EXC_SPLIT = re.compile(r"(?<![.'\"\[_])(?:[a-z_]\w*\.)*[A-Z]\w*(?:Error|Exception)(?=: )")
# docker compose "vllm-1  | "; used only when the log does not tell its service names (_compose_marker)
_COMPOSE_ANY = re.compile(r"(?<![A-Za-z0-9])[a-z][a-z0-9_.-]*[-_]\d+ +\| ")

# Prefixes stripped from the start of a record, repeatedly (they stack: compose | timestamp | proc | level).
_PREFIXES = (
    re.compile(rf"^[{_BORDER}] ?"),
    re.compile(r"^[A-Za-z][\w]*(?:[-_][A-Za-z0-9]+)*[-_]\d+ +\| ?"),
    re.compile(
        rf"^\[?{_ISO_TS}\]?:? ?(?:\| (?P<level>{_LEVELS}) \| \w+ \| )?"
    ),  # fastchat "| ERROR | stderr |"
    re.compile(rf"^{_PROC} ?"),
    re.compile(r"^\[rank\d+\]: ?"),
    re.compile(
        rf"^(?P<level>{_LEVELS}) \d\d-\d\d \d\d:\d\d:\d\d(?:[.,]\d+)? (?:\[[^\]]*\] ?|[\w./-]+:\d+\] ?)?"
    ),
    re.compile(rf"^(?P<level>{_LEVELS}):\s+"),
    re.compile(rf"^(?P<level>{_LEVELS}):[A-Za-z_][\w.]*:"),  # Python logging's default "WARNING:root:..."
    # torch / glog C++ lines "[W1128 23:10:01.123456789 socket.cpp:663] ..." (letter = level)
    re.compile(r"^\[(?P<glog>[IWEF])(?:\d{4} \d\d:\d\d:\d\d(?:\.\d+)?)? ?[\w.-]+:\d+\] ?"),
    re.compile(rf"^(?:- )?(?P<level>{_LEVELS}) - "),  # "2026-07-25 13:42:38,525 - INFO - autotuner.py"
)


_GLOG_LEVELS = {"I": "INFO", "W": "WARNING", "E": "ERROR", "F": "CRITICAL"}
_PY_WARNING = re.compile(r"^(?:\S+:\d+: )?[A-Z]\w*Warning: ")


def _strip_prefixes(text: str) -> tuple[str, str | None]:
    level = None
    bordered = False
    while True:
        text = text.lstrip()
        for rx in _PREFIXES:
            m = rx.match(text)
            if m and m.end() > 0:
                if rx is _PREFIXES[0]:
                    bordered = True
                if m.groupdict().get("level"):
                    level = m.group("level")
                elif m.groupdict().get("glog"):
                    level = _GLOG_LEVELS[m.group("glog")]
                text = text[m.end() :]
                break
        else:
            break
    if bordered:
        text = re.sub(rf"\s*[{_BORDER}]\s*$", "", text)
    if level is None and _PY_WARNING.match(text):
        level = "WARNING"  # the warnings module: "file.py:12: UserWarning: ..." (shown, never raised)
    return text.strip(), level


def clean_line(line: str) -> str:
    """One log line without ANSI colours, box borders, process/rank/compose prefixes and log header."""
    return _strip_prefixes(_plain(line))[0]


def _split_records(line: str, extra: re.Pattern[str] | None = None) -> list[str]:
    compose = extra if extra is not None else _COMPOSE_ANY
    starts = {m.start() for m in _RECORD_START.finditer(line) if m.start() > 0}
    starts |= {m.start() for m in compose.finditer(line) if m.start() > 0}
    if "Error: " in line or "Exception: " in line:
        starts |= {m.start() for m in _EXC_SPLIT.finditer(line) if m.start() > 0}
    starts = sorted(starts)
    if not starts:
        return [line]
    cuts = [0, *starts, len(line)]
    return [line[a:b] for a, b in itertools.pairwise(cuts) if line[a:b].strip()]


_FRAME = re.compile(r'^\s+(?:File "|\^|~|\.\.\.<)')
_EXC_START = re.compile(r"(?:[a-z_]\w*\.)*[A-Z]\w*(?:Error|Exception)(?=: )")
_BOX_ROW = re.compile(rf"^\s*[{_BORDER}](.*)[{_BORDER}]\s*$")
_BOX_EDGE = re.compile(r"^\s*[┌└╭╰┏┗╔╚][─━═].*[┐┘╮╯┓┛╗╝]\s*$")  # top and bottom edges of a box


def _row_is_full(line: str, width: int) -> bool:
    """A row that a terminal filled to its last column (so its record goes on in the next row)."""
    box = _BOX_ROW.match(line)
    if box:
        inner = box.group(1)
        # one space of padding, plus one when the wrapped chunk itself ended in a space
        return len(inner) - len(inner.rstrip()) <= 2 and len(inner.strip()) > 0
    return len(line) == width


def _unwrap(lines: list[str]) -> list[str]:
    """Re-join rows that a terminal (or a k9s box) hard-wrapped at a fixed width."""
    widths = Counter(len(ln) for ln in lines if len(ln) >= 60)
    if not widths:
        return lines
    # the terminal width: the most common long length, seen 3+ times, and (almost) nothing longer
    width, count = max(widths.items(), key=lambda wc: (wc[1], wc[0]))
    longer = sum(c for w, c in widths.items() if w > width)
    if count < 3 or longer > max(2, len(lines) // 100):
        return lines
    out: list[str] = []
    joining = False
    for ln in lines:
        bare = ln.strip().strip(_BORDER).strip()
        starts_record = _RECORD_START.match(bare) or _EXC_START.match(bare)
        if joining and bare and not starts_record and not _FRAME.match(ln.lstrip(_BORDER)):
            prev, cur = out[-1], ln
            if _BOX_ROW.match(prev) and _BOX_ROW.match(cur):
                # box rows: glue the inner texts; the borders of both rows go
                prev = re.sub(rf"\s?[{_BORDER}]\s*$", "", prev)
                cur = re.sub(rf"^\s*[{_BORDER}] ?", "", cur)
            out[-1] = prev + cur
        else:
            out.append(ln)
        joining = _row_is_full(ln, width)
    return out


@dataclass(frozen=True)
class _Record:
    text: str
    level: str | None
    index: int


def _line_records(physical: str, extra: re.Pattern[str] | None = None) -> list[tuple[str, str | None]]:
    """(text, level) of each record in one physical line. An exception split off the same line keeps
    the level of the header before it ("ERROR ... [engine.py:454] ValueError: ...")."""
    out: list[tuple[str, str | None]] = []
    carried: str | None = None
    box = _BOX_ROW.match(physical)
    if box:
        physical = box.group(1)
    elif _BOX_EDGE.match(physical):
        return out
    for piece in _split_records(physical, extra):
        body, level = _strip_prefixes(piece)
        if level is None and _EXC_START.match(piece.lstrip()):
            level = carried
        # only a bare header ("ERROR ... [engine.py:454] ") hands its level to the exception after it
        carried = level if not body else None
        if body:
            out.append((body, level))
    return out


def _compose_marker(text: str) -> re.Pattern[str] | None:
    """The docker-compose prefixes this log starts its lines with, as exact split markers: in a blob
    "...16,384 tokensvllm-1  | " only the known name tells where the record ends."""
    names = set(re.findall(r"(?m)^\s*([a-z0-9][\w.-]*[-_]\d+) +\| ", text))
    if not names:
        return None
    return re.compile("|".join(re.escape(n) + r" +\| " for n in sorted(names, key=len, reverse=True)))


def _records(text: str) -> list[_Record]:
    text = _plain(text).replace("\r\n", "\n").replace("\r", "\n")
    extra = _compose_marker(text)
    out: list[_Record] = []
    for physical in _unwrap(text.split("\n")):
        for body, level in _line_records(physical, extra):
            out.append(_Record(body, level, len(out)))
    return out


# --------------------------------------------------------------------------------------------------
# Rules: kind, patterns, grade
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    kind: str
    patterns: tuple[re.Pattern[str], ...]
    grade: str = "fatal"  # fatal | certain | hint
    rank: int = 0  # among lines of the same kind, the lowest rank is the best evidence
    remedy: str | None = None  # key into REMEDIES when it differs from the kind
    unless: re.Pattern[str] | None = None  # a record that matches this is not the failure
    # where the message ends, searched from the end of the match ("" = right there); None: end of record.
    # Keeps evidence to the root-cause sentence(s) when newlines were lost and the next record is glued on.
    end: re.Pattern[str] | None = None


def _rule(kind: str, *patterns: str, flags: int = 0, **kw) -> Rule:
    for key in ("unless", "end"):
        if isinstance(kw.get(key), str):
            kw[key] = _rx(kw[key], flags)
    return Rule(kind, tuple(_rx(p, flags) for p in patterns), **kw)


_ENDS_ENGINE = r"when initializing the engine(?: \([^)]*\))?\.(?: See \S+ for more details\.)?"


RULES: tuple[Rule, ...] = (
    # V0 (<= 0.10) and V1 0.6.x: max_model_len does not fit the KV cache
    _rule(
        "kv_cache_insufficient",
        rf"The model's max seq len \((?P<max_model_len>{_N})\) is larger than the maximum number of tokens"
        rf" that can be stored in KV cache \((?P<estimated_max_model_len>{_N})\)",
        end=_ENDS_ENGINE,
    ),
    # V1 >= 0.8: "models's" up to 0.21, "model's" from 0.32; 0.8.5 drops the estimate's number
    _rule(
        "kv_cache_insufficient",
        rf"To serve at least one request with the models?'s max seq len \((?P<max_model_len>{_N})\),"
        rf" \((?P<needed_kv_gib>{_F}) GiB KV cache is needed, which is larger than the available KV cache"
        rf" memory \((?P<available_kv_gib>{_F}) GiB\)",
        end=_ENDS_ENGINE,
    ),
    _rule("no_kv_memory", r"No available memory for the cache blocks", end=_ENDS_ENGINE),
    _rule(
        "no_kv_memory",
        r"Cannot auto-fit max_model_len: not enough GPU memory available",
        end=r"`?gpu_memory_utilization`?\.",
    ),
    # CPU build (0.2x+): the worker's own RSS already exceeds its reservation
    _rule(
        "no_kv_memory",
        rf"leaving none for the KV cache\b(?:.*?increase `?--gpu-memory-utilization`? to more than"
        rf" (?P<min_util>{_F}))?",
        remedy="no_kv_memory/cpu",
    ),
    # CPU backend 0.32: the reservation is smaller than what the worker already uses, so KV gets < 0
    _rule(
        "no_kv_memory",
        rf"Available memory on node (?P<node>\d+) \((?P<free_gib>{_F})/(?P<total_gib>{_F}) GiB\) on kv cache"
        rf" allocation is less than requested memory for kv"
        rf" \((?P<kv_gib>-{_F}|0(?:\.0+)?)/(?P<reserved_gib>{_F}) GiB\)",
        remedy="no_kv_memory/cpu",
        end=r"other processes\.",
    ),
    # INFO lines that make the failure certain; the error line after them is the better evidence
    _rule(
        "no_kv_memory",
        r"#?\s*(?:GPU|cuda|CUDA) blocks: 0\b(?!\.)",
        rf"Available KV cache memory: -{_F} ?GiB",
        rf"reserved for KV Cache is -{_F} ?GiB",
        rf"kv_cache_size=-{_F} ?GiB",
        grade="certain",
        rank=1,
    ),
    _rule(
        "gpu_mem_util_unavailable",
        rf"Free memory on device(?: (?P<device>\S+))? \((?P<free_gib>{_F})/(?P<total_gib>{_F}) GiB\) on startup"
        rf" is less than desired GPU memory utilization \((?P<util>{_F}), (?P<requested_gib>{_F}) GiB\)",
        end=r"other processes\.",
    ),
    _rule(
        "gpu_mem_util_unavailable",
        rf"Available memory on node (?P<node>\d+) \((?P<free_gib>{_F})/(?P<total_gib>{_F}) GiB\) on startup"
        rf" is less than desired CPU memory utilization \((?P<util>{_F}), (?P<requested_gib>{_F}) GiB\)",
        remedy="gpu_mem_util_unavailable/cpu",
        end=r"other processes\.",
    ),
    _rule(
        "gpu_mem_util_unavailable",
        rf"Available memory on node (?P<node>\d+) \((?P<free_gib>{_F})/(?P<total_gib>{_F}) GiB\) on kv cache"
        rf" allocation is less than requested memory for kv \((?P<requested_gib>{_F})",
        remedy="gpu_mem_util_unavailable/cpu_kv",
        end=r"other processes\.",
    ),
    _rule(
        "quantization_mismatch",
        r"Quantization method specified in the model config \((?P<config_quant>[^)]*)\) does not match the"
        r" quantization method specified in the `?quantization`? argument \((?P<arg_quant>[^)]*)\)",
        end=r"\.?",
    ),
    # --quantization X on a checkpoint that is not an X checkpoint (no quant config in the folder)
    _rule(
        "quantization_mismatch",
        r"Cannot find the config file for (?P<arg_quant>[\w-]+)",
        remedy="quantization_mismatch/no_config",
    ),
    _rule(
        "quantization_unsupported_gpu",
        r"The quantization method (?P<quant>.+?) is not supported for the current GPU\. Minimum capability:"
        r" (?P<min_cap>\d+)\. Current capability: (?P<cur_cap>-?\d+)",
        end=r"\.?",
    ),
    # compressed-tensors / quark raise it as a tuple: ('Quantization scheme is not supported for ', ...)
    _rule(
        "quantization_unsupported_gpu",
        r"Quantization scheme is not supported for['\",\s]*the current GPU\.? ?Min capability: (?P<min_cap>\d+)"
        r"\.?['\",\s]*Current capability: (?P<cur_cap>-?\d+)",
    ),
    # Raised only with an explicit bf16 dtype (or auto on <= 0.8); `--dtype auto` on >= 0.9 just warns
    # "Your device ... doesn't support torch.bfloat16. Falling back to torch.float16", which is no failure.
    _rule(
        "dtype_unsupported_gpu",
        r"Bfloat16 is only supported on GPUs with compute capability of at least 8\.0\. Your (?P<gpu_name>.+?)"
        r" GPU (?:has compute capability (?P<gpu_cc>\d+\.\d+)|does not have a compute capability)",
        end=r"--dtype=half\.",
    ),
    _rule(
        "dtype_unsupported_gpu",
        r"(?P<dtype>(?:torch\.)?\w+) is not supported for quantization method (?P<quant>[\w-]+)\."
        r" Supported dtypes: (?P<supported>\[[^\]]*\])",
        remedy="dtype_unsupported_gpu/quant",
    ),
    _rule("gpu_unsupported", r"no kernel image is available for execution on the device", flags=re.I, end=""),
    # 0.8.x with VLLM_USE_V1=1 forced on a pre-Ampere card (without it vLLM only warns and falls back to V0)
    _rule(
        "gpu_unsupported",
        r"VLLM_USE_V1=1 is not supported with Compute Capability < 8\.0",
        remedy="gpu_unsupported/v1",
    ),
    _rule("gpu_unsupported", r"No valid attention backend found for .*compute capability not supported"),
    # vLLM <= 0.2's own floor, and torch.compile's Triton floor (Pascal cards on builds that compile)
    _rule(
        "gpu_unsupported",
        r"GPUs with compute capability below (?P<min_cc>\d+\.\d+) are not supported",
        r"Found (?P<gpu_name>.+?) which is too old to be supported by the triton GPU compiler",
        r"Triton only supports devices of CUDA Capability >= (?P<min_cc>\d+\.\d+)",
    ),
    # torch's own warnings; they explain a later crash but do not stop the start by themselves
    _rule(
        "gpu_unsupported",
        r"(?:with CUDA capability (?P<sm>sm_\d+) is not compatible with the current PyTorch installation"
        r"|PyTorch no longer supports this GPU because it is too old)",
        grade="hint",
    ),
    _rule(
        "cuda_oom",
        rf"CUDA out of memory occurred when warming up sampler with (?P<num_reqs>{_N}) dummy requests",
        remedy="cuda_oom/sampler",
    ),
    _rule("cuda_oom", r"Failed to load model - not enough GPU memory", remedy="cuda_oom/load"),
    _rule(
        "cuda_oom",
        r"(?:CUDA|HIP|XPU) out of memory(?:\. Tried to allocate (?P<alloc>[\d.]+ [KMGT]iB))?",
        r"CUDA error: out of memory",
        r"\bOutOfMemoryError\b",
        rank=1,
    ),
    _rule(
        "max_len_exceeds_model",
        rf"User-specified max_model_len \((?P<requested_len>{_N})\) is greater than the derived max_model_len"
        rf" \((?P<len_key>[\w.]+)=(?P<derived_len>{_N}|None)(?: or model_max_length=(?P<model_max_length>\w+))?",
        # with VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 the same text is logged as a warning and the start goes on
        unless=r"^(?!.*To allow overriding).*must be used with extreme caution",
        # cut before 0.2x's appended caution text: it is advice, not the cause
        end=r"VLLM_ALLOW_LONG_MAX_MODEL_LEN=1\.?|context size\.",
    ),
    _rule(
        "port_in_use",
        r"\[Errno (?:98|48|10048)\] (?:Address already in use"
        r"|error while attempting to bind on address \('(?P<host>[^']*)', (?P<port>\d+)\))",
        r"\bEADDRINUSE\b",
        # vLLM's own retry for internal ports (a warning, not a failure)
        unless=r"Retrying with a new port",
        end=r"(?:: (?:\[errno \d+\] )?address already in use)?",
        flags=re.I,
    ),
    _rule("model_not_found", r"Cannot find any model weights with [`'\"]?(?P<model>[^`'\"\s]+)", end=""),
    _rule(
        "model_not_found",
        r"Invalid repository ID or local directory specified: '(?P<model>[^']*)'\.?",
        end="",
    ),
    _rule(
        "model_not_found",
        r"Repo id must (?:be in the form 'repo_name' or 'namespace/repo_name'|use alphanumeric chars).*?"
        r": '(?P<model>[^']*)'",
        # 0.7.x lists repo files with retries for local paths and goes on
        unless=r"Error retrieving file list",
        end=r"\.(?: Use `repo_type` argument if needed\.)?",
    ),
    _rule(
        "model_not_found",
        r"\bRepositoryNotFoundError\b",
        r"Repository Not Found for url",
        r"\bGatedRepoError\b",
    ),
    _rule(
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
_ENGINE_DEATH = re.compile(
    r"EngineDeadError|Engine loop is not running|EngineCore encountered|died unexpectedly"
)

_EXCEPTION_LINE = re.compile(r"^(?:[a-z_]\w*\.)*[A-Z]\w*(?:Error|Exception|Failure)\b(?::|$)|^Value error, ")
_BENIGN_EXCEPTION = re.compile(
    r"^(?:[\w.]*\.)?(?:KeyboardInterrupt|CancelledError|SystemExit|GeneratorExit)\b"
)
_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):")
_NOT_FAILING_LEVELS = {"DEBUG", "INFO", "WARNING", "WARN"}
# Source lines that tracebacks print ("raise ValueError(\"No available memory ...\"") are not the message.
_CODE = re.compile(r"""^(?:raise\b|return\b|f?["']|\.\.\.<|[\w.]+ = |\)|File ")|\braise \w+\(""")
_FRAME_TEXT = re.compile(r'^(?:File "|[\^~]+$|\.\.\.<)')


@dataclass(frozen=True)
class _Hit:
    rule: Rule
    record: _Record
    match: re.Match[str]

    @property
    def wrapper(self) -> bool:
        return bool(WRAPPERS.search(self.record.text))


def _match(record: _Record, grades: Iterable[str]) -> _Hit | None:
    grades = tuple(grades)
    if _CODE.search(record.text):
        return None
    for rule in RULES:
        if rule.grade not in grades:
            continue
        # a raised cause is never logged at INFO/WARNING; "certain" lines are INFO and hints warnings by nature
        if rule.grade == "fatal" and record.level in _NOT_FAILING_LEVELS:
            continue
        if rule.unless is not None and rule.unless.search(record.text):
            continue
        for rx in rule.patterns:
            m = rx.search(record.text)
            if m:
                return _Hit(rule, record, m)
    return None


# A traceback's `raise ValueError("No available memory ...` line: when the log is cut before the message
# itself, the raised text still names the cause (as a hint: only when nothing stronger does).
_RAISE_LITERAL = re.compile(r"""\braise [\w.]+\(\s*f?(["'])(?P<msg>.+?)\1""")


def _hint(record: _Record) -> _Hit | None:
    hit = _match(record, ("hint",))
    if hit is not None:
        return hit
    raised = _RAISE_LITERAL.search(record.text)
    if raised is None:
        return None
    literal = _Record(raised.group("msg"), None, record.index)
    hit = _match(literal, ("fatal",))
    return (
        _Hit(Rule(hit.rule.kind, hit.rule.patterns, "hint", remedy=hit.rule.remedy), literal, hit.match)
        if hit
        else None
    )


def classify_line(line: str) -> str | None:
    """The failure kind when this ONE line is a fatal root-cause line (or an INFO line that makes the
    failure certain, such as `# GPU blocks: 0`), else None. Warnings and wrappers give None."""
    for body, level in _line_records(_plain(line)):
        hit = _match(_Record(body, level, 0), ("fatal", "certain"))
        if hit is not None:
            return hit.rule.kind
    return None


# --------------------------------------------------------------------------------------------------
# Evidence: the cleaned sentence(s) of the root cause
# --------------------------------------------------------------------------------------------------

_PYDANTIC_TAIL = re.compile(
    r"\s*\[type=\w+,.*$|\s*For further information visit https://errors\.pydantic\.dev\S*"
)
_EXC_HEAD = re.compile(r"(?:[a-z_]\w*\.)*[A-Z]\w*(?:Error|Exception)\b: ")
_EVIDENCE_MAX = 600


def _evidence(text: str, start: int = 0, end: int | None = None, stop: int | None = None) -> str:
    """From the exception name (or pydantic's `Value error, `) before the match to the end of the
    message (`stop`, else the record's end); long blobs are cut at a sentence end."""
    end = len(text) if end is None else end
    head = 0
    for m in _EXC_HEAD.finditer(text, 0, start):
        head = m.start()
    ve = text.rfind("Value error, ", 0, start)
    if ve >= head and ve != -1:
        head = ve + len("Value error, ")
    elif head == 0 and start > 200:
        # no exception name in reach: begin at the sentence that holds the match
        dot = text.rfind(". ", 0, start)
        head = dot + 2 if dot != -1 else start
    out = _PYDANTIC_TAIL.sub("", text[head:stop]).strip()
    if out.startswith("Value error, "):
        out = out[len("Value error, ") :]
    if out.endswith("`") and out.count("`") % 2:  # a log pasted inside `backticks`
        out = out[:-1].rstrip()
    if len(out) > _EVIDENCE_MAX:
        cut = out.find(". ", max(end - head, 0), _EVIDENCE_MAX + 200)
        out = out[: cut + 1] if cut != -1 else out[:_EVIDENCE_MAX].rstrip() + " ..."
    return re.sub(r"\s+", " ", out)


def _hit_evidence(hit: _Hit) -> str:
    stop = None
    if hit.rule.end is not None:
        m = hit.rule.end.match(hit.record.text, hit.match.end()) or hit.rule.end.search(
            hit.record.text, hit.match.end()
        )
        stop = m.end() if m else None
    return _evidence(hit.record.text, hit.match.start(), hit.match.end(), stop)


# --------------------------------------------------------------------------------------------------
# Capacity facts
# --------------------------------------------------------------------------------------------------

# fact -> patterns in order of preference; the last occurrence of the first pattern found wins.
FACTS: dict[str, tuple[re.Pattern[str], ...]] = {
    "vllm_version": tuple(
        _rx(p)
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
        _rx(rf"(?:GPU|CPU|XPU|TPU|HPU|NPU)(?: \+ host)? KV cache size: ({_N}) tokens"),
        # V0's error names the KV capacity in tokens itself
        _rx(rf"maximum number of tokens that can be stored in KV cache \(({_N})\)"),
    ),
    "max_concurrency": (_rx(rf"Maximum concurrency for {_N} tokens per request: ({_F})x"),),
    "gpu_blocks": (
        _rx(rf"#?\s*(?:GPU|cuda|CUDA|TPU|HPU|XPU|NPU) blocks: ({_N})"),
        _rx(rf"num_gpu_blocks is: ({_N})"),
        re.compile(rf"\bnum_gpu_blocks=({_N})\b"),
    ),
    "estimated_max_model_len": (
        _rx(rf"estimated maximum model length is ({_N})"),
        _rx(rf"maximum number of tokens that can be stored in KV cache \(({_N})\)"),
        _rx(rf"Auto-fit max_model_len: reduced from {_N} to ({_N})"),
    ),
    "available_kv_gib": (
        _rx(rf"Available KV cache memory: ({_F}) ?GiB"),
        _rx(rf"available KV cache memory \(({_F}) GiB\)"),
        _rx(rf"the rest of the memory reserved for KV Cache is ({_F}) ?GiB"),
        _rx(rf"reserved ({_F}) GiB memory for KV Cache as specified by kv_cache_memory_bytes"),
        _rx(rf"fit in available KV cache memory \(({_F}) GiB"),
        _rx(rf"\bkv_cache_size=({_F}) ?GiB"),
        _rx(rf"\(({_F})/{_F}\) GiB for KV cache on node"),  # CPU backend
    ),
    "weights_gib": (
        _rx(rf"Model loading took ({_F}) ?Gi?B"),  # "GB" in 0.8.x dev builds
        _rx(rf"Loading model weights took ({_F}) ?Gi?B"),
        _rx(rf"model weights take ({_F}) ?GiB"),
    ),
    "max_model_len": (
        _rx(rf"Maximum concurrency for ({_N}) tokens per request"),
        _rx(rf"max seq len \(({_N})\)"),
        _rx(rf"Auto-fit max_model_len: reduced from {_N} to ({_N})"),
        re.compile(rf"\bmax_seq_len=({_N})\b"),
        _rx(rf"Using max model len ({_N})"),
        _rx(rf"User-specified max_model_len \(({_N})\)"),
        re.compile(rf"'max_model_len': ({_N})\b|\bmax_model_len=({_N})\b"),
    ),
}
_INT_FACTS = {"kv_cache_tokens", "gpu_blocks", "estimated_max_model_len", "max_model_len"}
_FLOAT_FACTS = {"max_concurrency", "available_kv_gib", "weights_gib"}

# Launch settings that only feed the remedy text (first pattern that matches anywhere wins).
_CONTEXT: dict[str, tuple[re.Pattern[str], ...]] = {
    "gpu_memory_utilization": (re.compile(rf"gpu_memory_utilization(?:'?: |=| \()({_F})"),),
    "port": (re.compile(r"(?:'port': |\bport=)(\d+)"),),
    "model": (
        re.compile(r"(?:'model': |\bmodel=)'([^']+)'"),
        re.compile(r"huggingface\.co/([\w.-]+/[\w.-]+)/resolve/"),
    ),
}


def _number(raw: str, fact: str) -> int | float | str:
    if fact in _INT_FACTS:
        return int(raw.replace(",", ""))
    if fact in _FLOAT_FACTS:
        return float(raw)
    return raw.rstrip(".,;")


def _facts(records: list[_Record]) -> dict[str, object]:
    # one search per pattern over all records (no pattern crosses a newline, so none spans two records)
    joined = "\n".join(r.text for r in records)
    facts: dict[str, object] = {}
    for fact, patterns in FACTS.items():
        facts[fact] = None
        for rx in patterns:
            found = [g for m in rx.finditer(joined) for g in m.groups() if g is not None]
            values = [_number(v, fact) for v in found]
            if fact in _INT_FACTS and fact != "gpu_blocks":
                values = [v for v in values if v > 0]  # e.g. max_seq_len=-1 (auto) is no length
            if values:
                facts[fact] = values[-1]
                break
    return facts


# --------------------------------------------------------------------------------------------------
# Remedies
# --------------------------------------------------------------------------------------------------

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

_FIELD = re.compile(r"\{(\w+)\}")


def _fill(template: str, ctx: dict[str, object]) -> str | None:
    def optional(m: re.Match[str]) -> str:
        inner = m.group(1)
        if all(ctx.get(f) is not None for f in _FIELD.findall(inner)):
            return inner
        return ""

    # innermost optional parts first, so "[a[ b]]" keeps a when only b is unknown
    prev = None
    while prev != template:
        prev = template
        template = re.sub(r"\[([^\[\]]*)\]", optional, template)
    if any(ctx.get(f) is None for f in _FIELD.findall(template)):
        return None
    return template.format(**{k: _fmt(v) for k, v in ctx.items() if v is not None})


def _fmt(v: object) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v)) if abs(v) >= 100 else f"{v:g}"
    return str(v)


def _remedy(hit: _Hit | None, kind: str, facts: dict[str, object], records: list[_Record]) -> str:
    ctx: dict[str, object] = {k: v for k, v in facts.items() if v is not None}
    for name, patterns in _CONTEXT.items():
        found = (m.group(1) for rx in patterns for r in records if (m := rx.search(r.text)))
        value = next(found, None)
        if value is not None:
            ctx[name] = value
    if hit is not None:
        ctx.update(
            {
                k: v.replace(",", "") if k.endswith("_len") else v
                for k, v in hit.match.groupdict().items()
                if v
            }
        )
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
    key = hit.rule.remedy if hit is not None and hit.rule.remedy else kind
    for template in REMEDIES.get(key, ()) + REMEDIES[kind]:
        text = _fill(template, ctx)
        if text is not None:
            return text
    return REMEDIES["other"][0]


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


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


def _root_cause(records: list[_Record], start: int) -> _Hit | None:
    """Earliest fatal or certain line from `start`; among lines of its kind, the best-ranked non-wrapper."""
    hits = [h for r in records[start:] if (h := _match(r, ("fatal", "certain")) or _hint(r))]
    strong = [h for h in hits if h.rule.grade != "hint"]
    if not strong:
        return None
    kind = strong[0].rule.kind
    for dominant, kinds in _DOMINATES.items():
        if kind in kinds and any(h.rule.kind == dominant for h in hits):
            kind = dominant
            break
    hits = strong if any(h.rule.kind == kind for h in strong) else hits
    same = [h for h in hits if h.rule.kind == kind]
    return min(same, key=lambda h: (h.wrapper, h.rule.rank, h.record.index))


def _crashed(records: list[_Record], start: int, after_ready: bool) -> bool:
    for r in records[start:]:
        if after_ready:
            if _ENGINE_DEATH.search(r.text):
                return True
        elif (
            WRAPPERS.search(r.text)
            or _TRACEBACK.match(r.text)
            or (_EXCEPTION_LINE.match(r.text) and not _BENIGN_EXCEPTION.match(r.text))
            or r.level in ("ERROR", "CRITICAL")
        ):
            return True
    return False


def _other_evidence(records: list[_Record], start: int) -> str | None:
    """The last exception line that is not a wrapper; else the last ERROR line outside a traceback."""
    tail = records[start:]
    for r in reversed(tail):
        if (
            _EXCEPTION_LINE.match(r.text)
            and not WRAPPERS.search(r.text)
            and not _BENIGN_EXCEPTION.match(r.text)
        ):
            if re.match(r"^(?:[\w.]*\.)?ValidationError: \d+ validation error", r.text):
                nxt = records[r.index + 1] if r.index + 1 < len(records) else None
                if nxt is not None and nxt.text.startswith("Value error, "):
                    return _evidence(nxt.text)
            return _evidence(r.text)
    candidate = None
    in_traceback = False
    for r in tail:
        if _TRACEBACK.match(r.text):
            in_traceback = True
        elif in_traceback and _EXCEPTION_LINE.match(r.text):
            in_traceback = False
        elif (
            not in_traceback
            and r.level in ("ERROR", "CRITICAL")
            and not WRAPPERS.search(r.text)
            and not _CODE.search(r.text)
        ):
            candidate = r
    return _evidence(candidate.text) if candidate is not None else None


def scan_log(text: str) -> LogScan:
    """Classify one vLLM log (any version 0.6-0.33) and pull its capacity facts."""
    records = _records(text)
    facts = _facts(records)
    ready_at = max((r.index for r in records if READY_MARKER in r.text), default=None)
    start = 0 if ready_at is None else ready_at + 1

    hit = _root_cause(records, start)
    kind = hit.rule.kind if hit else None
    if kind is None and _crashed(records, start, after_ready=ready_at is not None):
        hints = [h for r in records[start:] if (h := _hint(r))]
        hit = hints[0] if hints else None
        kind = hit.rule.kind if hit else "other"

    scan = LogScan(**facts, ready=ready_at is not None and kind is None)
    if kind is None:
        return scan
    scan.failure = kind
    if hit is not None:
        scan.evidence = _hit_evidence(hit)
    else:
        scan.evidence = _other_evidence(records, start)
    scan.remedy = _remedy(hit, kind, facts, records)
    return scan


def scan_file(path: str | Path) -> LogScan:
    """scan_log over a file; undecodable bytes are replaced rather than fatal."""
    return scan_log(Path(path).read_bytes().decode("utf-8", errors="replace"))


def _human(scan: LogScan) -> str:
    rows = [
        ("failure", scan.failure or ("none (clean start)" if scan.ready else "none found")),
        ("evidence", scan.evidence or "-"),
        ("remedy", scan.remedy or "-"),
    ]
    facts = scan.to_json()
    for key in ("failure", "evidence", "remedy"):
        facts.pop(key)
    rows += [(k, "-" if v is None else str(v)) for k, v in facts.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


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
    scan = scan_log(text)
    if getattr(args, "json", False):
        print(json.dumps(scan.to_json()))
    else:
        print(_human(scan))
    return 0
