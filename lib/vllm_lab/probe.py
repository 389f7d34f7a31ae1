"""One trial end to end: launch, ready, one chat request, one long request, /metrics, stop -> one record.

The record is appended to <run_dir>/trials.jsonl (fsynced) before this returns, so nothing measured is lost
if the caller dies next.
"""

from __future__ import annotations

import json
import re
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import httpx

from vllm_lab import record
from vllm_lab.launcher import LaunchResult, VllmServer
from vllm_lab.memory import predicted_kv_tokens
from vllm_lab.spec import DEFAULT_VLLM_CMD, Trial

LONG_REQUEST_OUTPUT_TOKENS = 4


def new_run_id() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]


def _model_config(model: str) -> dict:
    path = Path(model) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def chat_ok(base_url: str, model: str, timeout: float) -> bool:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}
    try:
        r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=timeout)
        return r.status_code == 200 and bool(r.json().get("choices"))
    except (httpx.HTTPError, ValueError):
        return False


def long_request(
    base_url: str, model: str, max_len: int, vocab: int, timeout: float
) -> tuple[bool, int, float | None]:
    """A prompt of token ids that, with its output, fills max_len exactly (so within one block).

    Returns (completed, total tokens asked for, seconds to the first streamed token).
    """
    prompt_len = max(1, max_len - LONG_REQUEST_OUTPUT_TOKENS)
    # Token ids cycle through the ordinary vocabulary (avoid 0..2, often special tokens).
    prompt = [3 + (i % max(1, min(vocab, 50000) - 3)) for i in range(prompt_len)]
    body = {"model": model, "prompt": prompt, "max_tokens": LONG_REQUEST_OUTPUT_TOKENS, "temperature": 0,
            "stream": True, "ignore_eos": True}  # fmt: skip
    t0 = time.monotonic()
    ttft = None
    try:
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                return False, prompt_len + LONG_REQUEST_OUTPUT_TOKENS, None
            if r.headers.get("content-type", "").startswith(
                "application/json"
            ):  # a server that ignores stream
                ok = bool(json.loads(r.read()).get("choices"))
                return ok, prompt_len + LONG_REQUEST_OUTPUT_TOKENS, time.monotonic() - t0 if ok else None
            done = False
            for line in r.iter_lines():
                if time.monotonic() - t0 > timeout:
                    return False, prompt_len + LONG_REQUEST_OUTPUT_TOKENS, ttft
                if line.startswith("data:") and ttft is None and line.strip() != "data: [DONE]":
                    ttft = time.monotonic() - t0
                done = done or line.strip() == "data: [DONE]"
            return done, prompt_len + LONG_REQUEST_OUTPUT_TOKENS, ttft
    except (httpx.HTTPError, ValueError):
        return False, prompt_len + LONG_REQUEST_OUTPUT_TOKENS, ttft


_METRIC = re.compile(r"^(vllm:[a-z_]+)(?:\{[^}]*\})?\s+([0-9.eE+-]+)$")


def read_metrics(base_url: str) -> dict:
    """The few vLLM metrics a report needs (kv usage, running/waiting, preemptions)."""
    try:
        text = httpx.get(f"{base_url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    keep = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "vllm:num_requests_running",
            "vllm:num_requests_waiting", "vllm:num_preemptions_total")  # fmt: skip
    out = {}
    for line in text.splitlines():
        m = _METRIC.match(line.strip())
        if m and m.group(1) in keep:
            out[m.group(1)] = float(m.group(2))
    return out


def _gpu_facts() -> dict:
    try:
        from vllm_lab import gpu

        inv = gpu.inventory()
    except Exception:
        return {}
    devices = getattr(inv, "devices", None) or []
    if not devices:
        return {}
    d = devices[0]
    return {"gpu_name": getattr(d, "name", None), "gpu_cc": getattr(d, "compute_capability", None),
            "gpu_total_mib": getattr(d, "total_mib", None)}  # fmt: skip


def to_record(trial: Trial, res: LaunchResult, *, run_id: str, started_at: str, extra: dict) -> dict:
    s = res.scan
    return record.new_record(
        run_id=run_id, step=trial.step, trial_id=trial.trial_id, started_at=started_at, backend=res.backend,
        vllm_version=s.get("vllm_version"), launcher=trial.launcher, argv=res.argv, model=trial.model,
        quantization=_flag_value(res.argv), max_model_len=trial.max_model_len,
        gpu_memory_utilization=trial.gpu_memory_utilization, kv_cache_memory_bytes=trial.kv_cache_memory_bytes,
        outcome=res.outcome, failure=res.failure, evidence=res.evidence, remedy=res.remedy,
        seconds_to_outcome=res.seconds_to_outcome, kv_cache_tokens=s.get("kv_cache_tokens"),
        max_concurrency=s.get("max_concurrency"), gpu_blocks=s.get("gpu_blocks"), estimated_max_model_len=s.get("estimated_max_model_len"),
        available_kv_gib=s.get("available_kv_gib"), weights_gib=s.get("weights_gib"), log_path=res.log_path,
        served_max_model_len=res.served_max_model_len, **extra,
    )  # fmt: skip


def _flag_value(argv: list[str]) -> str | None:
    return argv[argv.index("--quantization") + 1] if "--quantization" in argv else None


def run_trial(trial: Trial, run_dir: str | Path, *, run_id: str | None = None, long: bool = True) -> dict:
    """Launch, exercise and stop one server; append and return its record."""
    trial.validate()
    run_dir = Path(run_dir)
    run_id = run_id or run_dir.name
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    cfg = _model_config(trial.model)
    extra: dict = {
        "predicted_kv_cache_tokens": predicted_kv_tokens(trial.model, trial.kv_cache_memory_bytes),
        **_gpu_facts(),
    }
    sampler = _sampler()
    with VllmServer(trial, run_dir) as server, sampler:
        res = server.start()
        if res.outcome == "ready":
            served = res.served_max_model_len or trial.max_model_len
            name = trial.model
            extra["chat_ok"] = chat_ok(res.base_url, name, trial.request_timeout_s)
            if long and served:
                ok, tokens, ttft = long_request(res.base_url, name, served, int(cfg.get("vocab_size") or 1000),
                                                trial.request_timeout_s)  # fmt: skip
                extra.update(
                    long_request_ok=ok, long_request_tokens=tokens, ttft_s=round(ttft, 3) if ttft else None
                )
                if not ok or not server.alive():
                    res.outcome = "unstable"
                    res.evidence = (
                        f"a request of {tokens} tokens did not complete within {trial.request_timeout_s:.0f} s"
                        if server.alive() else f"the server died during a request of {tokens} tokens")  # fmt: skip
                    res.remedy = (
                        "lower --max-model-len (the server starts but cannot serve a full-length request)"
                    )
            extra["metrics"] = read_metrics(res.base_url) if server.alive() else None
    notes = [f"processes survived the stop: {server.survivors}"] if server.survivors else []
    notes += [server.gpu_note] if server.gpu_note else []
    extra["note"] = "; ".join(notes) or None
    extra["peak_gpu_mib"] = getattr(sampler, "peak_mib", None)
    timeline = getattr(sampler, "timeline", None)
    extra["gpu_memory_timeline"] = _timeline(timeline)
    if res.outcome != "ready" and res.outcome != "unstable":
        # A failed launch: re-read the full log now the tree is down (the fail-fast read may be partial).
        from vllm_lab import logscan

        facts = logscan.scan_file(res.log_path).to_json()
        res.scan = facts
        if res.outcome == "failed":
            res.failure = facts.get("failure") or res.failure or "other"
            res.evidence = facts.get("evidence") or res.evidence
            res.remedy = facts.get("remedy") or res.remedy
    rec = to_record(trial, res, run_id=run_id, started_at=started_at, extra=extra)
    record.append_record(run_dir, rec)
    return rec


def _timeline(timeline) -> list | None:
    if not timeline:
        return None
    out = []
    for t, used in timeline:
        out.append([round(t, 2), sum(used.values()) if isinstance(used, dict) else used])
    return out


class _NoSampler:
    peak_mib = None
    timeline = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _sampler():
    try:
        from vllm_lab import gpu

        inv = gpu.inventory()
        if not getattr(inv, "available", False):
            return _NoSampler()
        return gpu.MemorySampler([d.index for d in inv.devices], interval_s=0.5)
    except Exception:
        return _NoSampler()


def trial_from_args(args, *, step: str) -> Trial:
    return Trial(
        model=args.model,
        launcher=args.launcher,
        quantization=args.quantization,
        max_model_len=getattr(args, "max_model_len", None),
        gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        vllm_cmd=args.vllm_cmd or DEFAULT_VLLM_CMD,
        extra_args=args.extra_args.split() if args.extra_args else [],
        startup_timeout_s=args.timeout,
        step=step,
    )


def cli_launch(args) -> int:
    trial = trial_from_args(args, step="launch").validate()
    rec = run_trial(trial, args.out)
    if args.json:
        print(json.dumps(rec, default=str))
    else:
        print(f"{rec['outcome']}: {rec['failure'] or ''} {rec['evidence'] or ''}".rstrip(), file=sys.stdout)
        print(f"record appended to {Path(args.out) / record.TRIALS_FILE}")
    return 0 if rec["outcome"] == "ready" else 1
