"""One trial end to end: launch, ready, one chat request, one long request, /metrics, stop -> one record.

The record is appended to <run_dir>/trials.jsonl (fsynced) before this returns, so nothing measured is lost
if the caller dies next. Requests use the trial's API key and served model name, and go straight to a
loopback server (never through HTTP(S)_PROXY).
"""

from __future__ import annotations

import json
import platform
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import httpx

from vllm_lab import engines, record
from vllm_lab.http_client import (
    LongRequest,
    StreamState,
    body_message,
    client,
    error_message,
    loopback,
    parse_metrics,
    read_metrics,
    sse_data,
    token_prompt,
)
from vllm_lab.launcher import LaunchResult, VllmServer
from vllm_lab.load import LoadSpec, run_load
from vllm_lab.memory import predicted_kv_tokens
from vllm_lab.spec import DEFAULT_VLLM_CMD, SpecError, Trial, load_option

# Their old home (tests, benchmarks and notebooks import them from probe); they live in http_client now.
__all__ = ["LongRequest", "StreamState", "error_message", "loopback", "parse_metrics", "read_metrics",
           "sse_data", "token_prompt"]  # fmt: skip
_loopback, _StreamState = loopback, StreamState

LONG_REQUEST_OUTPUT_TOKENS = 4


def new_run_id() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]


def _model_config(model: str) -> dict:
    if model.endswith(".gguf"):  # llama.cpp: the GGUF header's vocabulary (token-id prompts stay in it)
        from vllm_lab.memory_gguf import read_gguf

        try:
            return {"vocab_size": read_gguf(model).n_vocab}
        except (OSError, ValueError, KeyError):
            return {}
    path = Path(model) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _body_message(r: httpx.Response) -> str:
    return body_message(r.read())


def chat_ok(base_url: str, model: str, timeout: float, *, api_key: str | None = None) -> bool:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}
    try:
        with client(base_url, api_key, timeout) as c:
            r = c.post(f"{base_url}/v1/chat/completions", json=body)
        return r.status_code == 200 and bool(r.json().get("choices"))
    except (httpx.HTTPError, ValueError):
        return False


def long_request(
    base_url: str, model: str, max_len: int, vocab: int, timeout: float, *, api_key: str | None = None
) -> LongRequest:
    """A prompt of token ids that, with its output, fills max_len exactly (so within one block).

    vLLM streams a request that dies (an activation OOM at full context, a dead engine) as HTTP 200 with
    `data: {"error": ...}` then `data: [DONE]`: [DONE] alone is no proof of success.
    """
    out_n = LONG_REQUEST_OUTPUT_TOKENS
    prompt_len = max(1, max_len - out_n)
    total = prompt_len + out_n
    prompt = token_prompt(prompt_len, vocab)
    body = {"model": model, "prompt": prompt, "max_tokens": out_n, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
    t0 = time.monotonic()
    s = StreamState()
    try:
        with (
            client(base_url, api_key, timeout) as c,
            c.stream("POST", f"{base_url}/v1/completions", json=body) as r,
        ):
            if r.status_code != 200:
                msg = _body_message(r)
                return LongRequest(False, total, error=f"was refused: HTTP {r.status_code}: {msg}",
                                   refused=400 <= r.status_code < 500)  # fmt: skip
            if r.headers.get("content-type", "").startswith("application/json"):  # it ignored "stream"
                s.take(json.loads(r.read()), time.monotonic() - t0)
                s.done = True
            else:
                for line in r.iter_lines():
                    if time.monotonic() - t0 > timeout:
                        break
                    data = sse_data(line)
                    if data == "[DONE]":
                        s.done = True
                        break
                    if data:
                        s.take(json.loads(data), time.monotonic() - t0)
    except httpx.TimeoutException:
        s.error = s.error or f"did not complete within {timeout:.0f} s"
    except httpx.HTTPError as e:
        s.error = s.error or f"broke off: {type(e).__name__}: {e}"
    except ValueError as e:
        s.error = s.error or f"sent a chunk that is not JSON ({e})"
    return s.result(total, out_n, timeout)


def _gpu_facts(trial: Trial) -> dict:
    """The first GPU the trial can see (its CUDA_VISIBLE_DEVICES), not the machine's first."""
    try:
        from vllm_lab import gpu
        from vllm_lab.launcher import trial_gpu_env

        inv = gpu.inventory(env=trial_gpu_env(trial))
    except Exception:
        return {}
    devices = inv.visible_devices if getattr(inv, "available", False) else []
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
        served_max_model_len=res.served_max_model_len, exit_code=res.exit_code, exit_signal=res.exit_signal,
        install=trial.install, engine=trial.engine, engine_version=s.get("engine_version") or s.get("vllm_version"),
        memory_limit=trial.memory_limit_bytes,
        **{k: s[k] for k in ENGINE_FACTS if k in s},  # llama.cpp's log: the context used, slots, KV size
        **extra,
    )  # fmt: skip


ENGINE_FACTS = ("n_ctx", "n_ctx_slot", "n_slots", "kv_cache_mib")


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
        "node": platform.node(),  # the host it ran on (a Ray run adds its ip and node id)
        **_gpu_facts(trial),
    }
    sampler = _sampler(trial)
    with VllmServer(trial, run_dir) as server, sampler:
        res = server.start()
        if res.outcome == "ready":
            name, key = trial.served_model_name(), trial.api_key()
            checked = engines.get(trial.engine).after_ready(trial, res.base_url, long=long)  # Ollama: /api/ps
            # the engine's verdict, where it has one; llama.cpp: a slot's context is what it serves
            for k in ("outcome", "failure", "evidence", "remedy", "served_max_model_len"):
                setattr(res, k, checked.pop(k, getattr(res, k)))
            served = res.served_max_model_len or trial.max_model_len
            extra.update(checked)
            extra["chat_ok"] = chat_ok(res.base_url, name, trial.request_timeout_s, api_key=key)
            if long and served and "long_request_ok" not in extra:  # not where the engine ran its own
                lr = long_request(res.base_url, name, served, int(cfg.get("vocab_size") or 1000),
                                  trial.request_timeout_s, api_key=key)  # fmt: skip
                extra.update(long_request_ok=lr.ok, long_request_tokens=lr.tokens,
                             ttft_s=round(lr.ttft_s, 3) if lr.ttft_s is not None else None)  # fmt: skip
                if not lr.ok or not server.alive():
                    res.outcome = "unstable"
                    res.evidence = f"a request of {lr.tokens} tokens {lr.error or 'did not complete'}"
                    if not server.alive():
                        why = f" ({lr.error})" if lr.error else ""
                        res.evidence = f"the server died during a request of {lr.tokens} tokens{why}"
                    res.remedy = (
                        "the server refused the probe's request: check --api-key / VLLM_API_KEY and "
                        "--served-model-name" if lr.refused else
                        "lower --max-model-len (the server starts but cannot serve a full-length request)")  # fmt: skip
            if trial.load is not None and res.outcome == "ready" and server.alive():
                extra.update(_load_phase(trial, res, server, name, key, int(cfg.get("vocab_size") or 1000)))
                if extra["load_stable"] is not True:  # the same verdict `vllm-lab load` gives, same reason
                    res.outcome = "unstable"
                    res.evidence = f"under load (concurrency {_levels(trial.load)}): {extra['load_reason']}"
                    res.remedy = ("lower --max-model-len, or cap --max-num-seqs below the concurrency that "
                                  "failed (the server serves one full-length request but not this load)")  # fmt: skip
            extra["metrics"] = read_metrics(res.base_url, api_key=key) if server.alive() else None
    notes = [trial.memory_note] if trial.memory_note else []  # both memory knobs given: which one applied
    notes += [f"processes survived the stop: {server.survivors}"] if server.survivors else []
    notes += [server.gpu_note] if server.gpu_note else []
    notes += [server.stop_note] if server.stop_note else []
    notes += [extra.pop("engine_note")] if extra.get("engine_note") else []  # e.g. part of it on the CPU
    extra["note"] = "; ".join(notes) or None
    extra["peak_gpu_mib"] = getattr(sampler, "peak_mib", None)
    timeline = getattr(sampler, "timeline", None)
    extra["gpu_memory_timeline"] = _timeline(timeline)
    if res.outcome == "unstable":
        _explain_unstable(res, chat=extra.get("chat_ok"), engine=trial.engine)
    if res.outcome != "ready" and res.outcome != "unstable":
        # A failed launch: re-read the full log now the tree is down (the fail-fast read may be partial).
        facts = _scan_log_file(trial.engine, res.log_path).to_json()
        res.scan = facts
        if res.outcome == "failed":
            res.failure = facts.get("failure") or res.failure or "other"
            res.evidence = facts.get("evidence") or res.evidence
            res.remedy = facts.get("remedy") or res.remedy
    rec = to_record(trial, res, run_id=run_id, started_at=started_at, extra=extra)
    record.append_record(run_dir, rec)
    return rec


def _load_phase(trial: Trial, res: LaunchResult, server: VllmServer, model: str, key: str | None,
                vocab: int) -> dict:  # fmt: skip
    """The trial's load against the server it just launched: the record's load fields.

    The best level is the fastest one that served every request cleanly (None where none did). A Ctrl-C
    of the load records nothing (the server is stopped on the way out; a resume runs the trial again).
    """
    spec = LoadSpec.from_params(trial.load, where="load")
    try:
        out = run_load(res.base_url, model, spec, api_key=key, log_path=server.live_log, server_alive=server.alive,
                       vocab_size=vocab, engine=trial.engine)  # fmt: skip
    except SpecError as e:  # it served the long request, then stopped answering before the load began
        return {"load_stable": False, "load_reason": f"the load could not begin: {e}"}
    if out.interrupted:
        print(f"load {out.reason}; {trial.trial_id} not recorded (a resume runs it again)", file=sys.stderr)
        raise KeyboardInterrupt
    # a stream that ended in an error chunk counts as failed too
    clean = [lv for lv in out.levels if lv.get("completed") and not lv.get("failed")]
    best = max(clean, key=lambda lv: lv.get("output_tokens_per_s") or 0, default={})
    return {"load": out.to_dict(), "load_stable": out.stable, "load_reason": out.reason,
            "knee_concurrency": out.knee_concurrency, "load_output_tokens_per_s": best.get("output_tokens_per_s"),
            "load_concurrency": best.get("concurrency")}  # fmt: skip


def _levels(load: dict) -> str:
    return ", ".join(str(c) for c in load.get("concurrency") or [])


def _scan_log_file(engine: str | None, path: str):
    """The engine's scan of a server's (complete) log."""
    return engines.get(engine).scan(Path(path).read_bytes().decode("utf-8", errors="replace"))


def _explain_unstable(res: LaunchResult, *, chat: bool | None, engine: str | None = None) -> None:
    """A start that could not serve: the engine's own cause after ready, read from the full log (the tree is
    down now, so the log is complete), beside what the request saw.

    When even the short chat request failed, no max_model_len fixes it (a kernel this build lacks, a model
    it cannot run): the remedy says so, and the search treats it as independent of the length.
    """
    # the scan counts an engine that died after ready, not a refused request
    scan = _scan_log_file(engine, res.log_path)
    if scan.evidence:
        res.evidence = f"{res.evidence}; the engine's log: {scan.evidence}"
    if scan.failure and scan.failure != "other":
        res.failure = scan.failure
    if chat is False and not (res.remedy or "").startswith("the server refused"):
        res.remedy = (
            "the server starts but fails even a short chat request: not a length problem, no max_model_len "
            "fixes it; read the evidence (e.g. a kernel this build lacks for the model's quantization)"
        )


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


def _sampler(trial: Trial):
    """Samples only the GPUs the trial can see: a neighbour's job on another card is not this trial's peak."""
    try:
        from vllm_lab.gpu import MemorySampler
        from vllm_lab.launcher import visible_gpus

        devices = visible_gpus(trial)
        if not devices:
            return _NoSampler()
        return MemorySampler(devices, interval_s=0.5)
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
        load=load_option(getattr(args, "load", None)),
        step=step,
        engine=getattr(args, "engine", None) or engines.DEFAULT,
        memory_limit_bytes=getattr(args, "memory_limit", None),
        pull=bool(getattr(args, "pull", False)),
    )


def cli_launch(args) -> int:
    trial = trial_from_args(args, step="launch").validate()
    from vllm_lab.hub import prefetch_trial

    prefetch_trial(trial)  # a hub model: downloaded once, before the launch and outside its timeout
    rec = run_trial(trial, args.out)
    if args.json:
        print(json.dumps(rec, default=str))
    else:
        print(f"{rec['outcome']}: {rec['failure'] or ''} {rec['evidence'] or ''}".rstrip(), file=sys.stdout)
        print(f"record appended to {Path(args.out) / record.TRIALS_FILE}")
    return 0 if rec["outcome"] == "ready" else 1
