"""The result record: trials.jsonl is the authoritative record; everything else is derived from it.

One line per trial, appended, flushed and fsynced the moment the trial ends. A torn last line (a crash
mid-write) is detected on read, kept aside in trials.jsonl.torn and reported, never silently dropped.
This is the only module that imports scrapbook.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA_VERSION = 1
TRIALS_FILE = "trials.jsonl"

# DESIGN.md's fields, in order. Extend, never rename.
FIELDS = (
    "run_id", "step", "trial_id", "started_at", "backend", "vllm_version", "launcher", "argv", "model",
    "quantization", "max_model_len", "gpu_memory_utilization", "kv_cache_memory_bytes", "outcome", "failure",
    "evidence", "remedy", "seconds_to_outcome", "kv_cache_tokens", "max_concurrency", "estimated_max_model_len",
    "available_kv_gib", "weights_gib", "predicted_kv_cache_tokens", "peak_gpu_mib", "long_request_tokens",
    "long_request_ok", "ttft_s", "gpu_name", "gpu_cc", "gpu_total_mib", "log_path", "schema_version",
    # extensions
    "served_max_model_len", "chat_ok", "gpu_memory_timeline", "metrics", "note", "gpu_blocks",
    "exit_code", "exit_signal",  # a server that ended by itself: its code and signal (SIGKILL: OOM killer?)
    "node", "gpu", "gpu_ids",  # where it ran: host (under Ray: host (ip, node id)), GPU type, Ray's GPU ids
    "install",  # the plan's install name (installs.py); vllm_version is what that server itself reported
    # the trial's load phase (Trial.load): load.LoadResult.to_dict(), its verdict, and the best level
    "load", "load_stable", "load_reason", "knee_concurrency", "load_output_tokens_per_s", "load_concurrency",
    "engine", "engine_version",  # which server (Trial.engine: vllm | llamacpp ...) and its own version
    "memory_limit",  # Trial.memory_limit_bytes: the address-space limit the server ran under (None: none)
    # llama.cpp's log: the context used (-c padded; max_model_len is the one asked), a slot's share, the slots,
    # the KV cache's total MiB
    "n_ctx", "n_ctx_slot", "n_slots", "kv_cache_mib",
    # what the engine really did (Ollama's /api/ps): the context used (max_model_len is the one asked), the
    # model's bytes and those on the GPU (offload_fraction < 1: part on the CPU), the long prompt's tokens as
    # sent and as the server counted them (fewer: it was cut)
    "context_used", "model_size_bytes", "model_vram_bytes", "offload_fraction", "prompt_tokens_sent",
    "prompt_tokens_counted",
    # what the trial put into Ollama's store at run time: a model created from a .gguf (name, blob digest,
    # whether the blob was uploaded, seconds) or a model pulled on request (Trial.pull); None: nothing
    "ollama_store",
)  # fmt: skip

OUTCOMES = ("ready", "failed", "timeout", "unstable")


def new_record(**values) -> dict:
    """A record with every field present (None where unknown)."""
    unknown = set(values) - set(FIELDS)
    if unknown:
        raise KeyError(f"not a record field: {sorted(unknown)}")
    rec = dict.fromkeys(FIELDS)
    rec.update(values)
    rec["schema_version"] = SCHEMA_VERSION
    return rec


def append_record(run_dir: str | Path, rec: dict) -> Path:
    """Append one record as one line, flushed and fsynced, so a crash after this loses nothing."""
    from vllm_lab.redact import redact_obj

    path = Path(run_dir) / TRIALS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(redact_obj(rec), sort_keys=False, default=str) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # A previous crash may have left a torn line without a newline: start ours on a fresh line.
        if os.fstat(fd).st_size and _last_byte(path) != b"\n":
            os.write(fd, b"\n")
        data = line.encode()
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


@dataclass
class Records:
    rows: list[dict] = field(default_factory=list)
    torn: list[str] = field(default_factory=list)  # lines that did not parse (kept aside, reported)


def read_records(run_dir: str | Path, *, keep_torn_aside: bool = True) -> Records:
    path = Path(run_dir) / TRIALS_FILE
    out = Records()
    if not path.exists():
        return out
    for raw in path.read_text(errors="replace").splitlines():
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError:
            out.torn.append(raw)
            continue
        if isinstance(row, dict):
            out.rows.append(row)
        else:
            out.torn.append(raw)
    if out.torn and keep_torn_aside:
        aside = path.with_name(TRIALS_FILE + ".torn")
        existing = set(aside.read_text().splitlines()) if aside.exists() else set()
        with open(aside, "a") as f:
            for t in out.torn:
                if t not in existing:
                    f.write(t + "\n")
    return out


def gpu_residency(rec: dict) -> str | None:
    """partial_offload | gpu_unused | None: a started model not wholly on the GPU (Ollama's /api/ps).

    Ollama serves a context too big for the card by putting part of the model on the CPU, at a fraction of
    the speed, with no error: for the search that is not a fit (a longer context only moves more of it to
    the CPU), and its answer is the largest context wholly on the GPU. A model all on the CPU while a GPU was
    visible (gpu_name in the record: Ollama found no usable GPU, e.g. a Pascal card under a driver older than
    570) does not change with the context. A server with no GPU at all runs on the CPU by design: None."""
    frac = rec.get("offload_fraction")
    if not isinstance(frac, int | float) or rec.get("outcome") not in ("ready", "unstable"):
        return None
    if 0 < frac < 1:
        return "partial_offload"
    gpu = rec.get("gpu_name")
    return "gpu_unused" if frac == 0 and isinstance(gpu, str) and gpu else None


def recorded_trial_ids(run_dir: str | Path) -> set[str]:
    return {r.get("trial_id") for r in read_records(run_dir, keep_torn_aside=False).rows}


def glue(name: str, value, *, display: bool = False) -> None:
    """Glue a value into the running notebook (scrapbook); a no-op outside a kernel."""
    try:
        import scrapbook as sb
    except ImportError:  # scrapbook is optional for library use outside notebooks
        return
    from vllm_lab.redact import redact_obj

    try:
        sb.glue(name, redact_obj(value), display=display)
    except Exception:  # outside IPython scrapbook cannot display; the jsonl record is authoritative anyway
        return


def read_glued(notebook_path: str | Path) -> dict:
    """The scraps of an executed notebook, as a plain dict."""
    import scrapbook as sb

    return dict(sb.read_notebook(str(notebook_path)).scraps.data_dict)
