"""One question on several engines (notebook 05_engines): does it start, its largest stable context, and
output tok/s and TTFT under the same load.

The step's ENGINES parameter lists the servers to compare, each a mapping:
  name                  a label (the report's row; every trial's step is "<step>.<name>")
  engine                vllm | llamacpp | ollama (engines.names())
  model                 a model folder / hub id for vLLM, a .gguf for llama.cpp, an Ollama name (or a .gguf,
                        created in Ollama's store at run time) for Ollama (default: the plan's model)
  vllm_cmd, extra_args, env   the server command and its own flags (default: the plan's for vLLM, the
                        engine's own command and none for the others: vLLM's flags would end llama-server)
  gpu_memory_utilization | kv_cache_memory_bytes   vLLM's memory setting (the CPU build needs a KV budget)
  memory_limit_bytes    an address-space limit on the server: on a CPU box it stands in for the card
  low, high             the context range to search (default: the step's LOW/HIGH, else the engine's own)
  pull                  Ollama: true to `ollama pull` the model at run time where the store lacks it
Per entry: the context search (search.run_search: vLLM's or llama.cpp's block and first guess; Ollama's
num_ctx at llama.cpp's block, a context partly on the CPU no fit), then, where
something was stable, one trial at the found context with LOAD. A failure the context does not change
(the search's `stopped` verdict) is the entry's answer to "does it start".
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_lab.errors import SpecError

if TYPE_CHECKING:
    from vllm_lab.steps import StepParams

ENTRY_KEYS = {"name", "engine", "model", "vllm_cmd", "extra_args", "env", "gpu_memory_utilization",
              "kv_cache_memory_bytes", "memory_limit_bytes", "low", "high", "pull"}  # fmt: skip
SUMMARY_FILE = "engines.json"
PREDICTED = ("memory_model", "exact_prediction", "v1_prediction")  # first launches unmoved from the guess


def check_entries(entries) -> list[dict]:
    """ENGINES as given, checked: one SpecError line naming the entry and the key (before any launch)."""
    from vllm_lab import engines

    if not isinstance(entries, list) or not entries:
        raise SpecError(
            "ENGINES: give a list of engines to compare, e.g. [{name: llamacpp, engine: llamacpp, model: m.gguf}]"
        )
    seen = set()
    for i, e in enumerate(entries):
        where = f"ENGINES[{i}]"
        if not isinstance(e, dict):
            raise SpecError(f"{where}: {e!r} must be a mapping with name and engine")
        extra = sorted(set(e) - ENTRY_KEYS)
        if extra:
            raise SpecError(f"{where}.{extra[0]}: unknown key; allowed: {', '.join(sorted(ENTRY_KEYS))}")
        name = e.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise SpecError(
                f"{where}.name: {name!r} must be a label of letters, digits, - and _, e.g. llamacpp-q8"
            )
        if name in seen:
            raise SpecError(f"{where}.name: {name!r} twice; each engine entry needs its own name")
        seen.add(name)
        try:
            engines.get(e.get("engine", "vllm"))
        except SpecError as err:
            raise SpecError(f"{where}.engine: {err}") from None
        for k in ("kv_cache_memory_bytes", "memory_limit_bytes", "low", "high"):
            v = e.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise SpecError(f"{where}.{k}: {v!r} must be a positive integer")
    return entries


def template(p: StepParams, e: dict, low: int | None, high: int | None):
    """The entry's trial (max_model_len still to be searched): the plan's command and flags only for vLLM."""
    from vllm_lab.paths import resolve_cmd, resolve_path
    from vllm_lab.spec import DEFAULT_VLLM_CMD, split_cmd

    engine = e.get("engine", "vllm")
    own = engine == "vllm"
    cmd = e.get("vllm_cmd")
    cmd = split_cmd(resolve_cmd(cmd)) if cmd else (p.vllm_cmd if own else DEFAULT_VLLM_CMD)
    env = {str(k): str(v) for k, v in (e.get("env") or (p.env if own else {})).items()}
    return p.trial(
        engine=engine,
        model=resolve_path(e["model"]) if e.get("model") else p.model,
        vllm_cmd=cmd,
        extra_args=[str(a) for a in e.get("extra_args", p.extra_args if own else [])],
        env=env,
        gpu_memory_utilization=e.get("gpu_memory_utilization"),
        kv_cache_memory_bytes=e.get("kv_cache_memory_bytes"),
        memory_limit_bytes=e.get("memory_limit_bytes"),
        pull=e.get("pull", False),  # Trial.validate: a boolean, and Ollama's only
        max_model_len=e.get("high") or high or e.get("low") or low,
        step=f"{p.step}.{e['name']}",  # a trial id and a log file name: no "/"
        load=None,
    )


def run_engines(
    p: StepParams, entries, *, low: int | None, high: int | None, load: dict | None
) -> list[dict]:
    """Every entry: search, then the load at the found context. One summary row each; writes engines.json."""
    from vllm_lab import search
    from vllm_lab.steps import run_or_reuse

    rows = []
    checked = []
    for i, e in enumerate(check_entries(entries)):  # every entry's bad input before the first launch
        try:
            checked.append((e, template(p, e, low, high).validate()))
        except SpecError as err:
            raise SpecError(f"ENGINES[{i}] ({e['name']}): {err}") from None
    for e, t in checked:
        print(f"[{e['name']}] {t.engine}: {t.model}", flush=True)
        res = search.run_search(
            t, p.run_dir, low=e.get("low", low), high=e.get("high", high), run_trial=run_or_reuse
        )
        print(search.format_result(res), flush=True)
        row = summary(e, t, res)
        if res.max_model_len and load:
            at = dataclasses.replace(t, max_model_len=res.max_model_len, load=load, trial_id="")
            rec = run_or_reuse(at, p.run_dir)
            row["load_trial"] = rec.get("trial_id")
            row["load_stable"] = rec.get("load_stable")
            print(
                f"  load at {res.max_model_len}: {rec.get('outcome')} stable={rec.get('load_stable')}",
                flush=True,
            )
        rows.append(row)
    out = Path(p.run_dir) / SUMMARY_FILE
    old = json.loads(out.read_text()) if out.exists() else []
    keep = [r for r in old if r.get("step") != p.step]
    out.write_text(json.dumps(keep + rows, indent=1, default=str) + "\n")
    return rows


def summary(e: dict, t, res) -> dict:
    started = [r for r in res.trials if r.get("outcome") in ("ready", "unstable")]
    return {
        "step": t.step.rsplit(".", 1)[0], "name": e["name"], "engine": t.engine, "model": str(t.model),
        "starts": bool(started), "max_context": res.max_model_len, "verdict": res.verdict,
        "failure": res.failure, "evidence": res.evidence[:300], "launches": res.launches,
        "block_size": res.block_size, "memory_limit": t.memory_limit_bytes,
        "kv_cache_memory_bytes": t.kv_cache_memory_bytes, "gpu_memory_utilization": t.gpu_memory_utilization,
        "first_launch": res.first_launch,
        # the memory model's guess, launched where it pointed: a prediction, shown as one
        "predicted_context": res.steps[0]["max_model_len"] if res.steps and res.first_launch in PREDICTED else None,
    }  # fmt: skip


# ---- --dry-run: predictions, no launch ---------------------------------------------------------------


def predict_entry(e: dict, gpu: str | None, vllm_version: str | None, default_model: str) -> str:
    """One line: what the memory model and the compatibility rules say about the entry (a prediction)."""
    engine = e.get("engine", "vllm")
    model = str(e.get("model") or default_model)
    if engine in ("llamacpp", "ollama"):
        t = _entry_trial(e, model)
        return _predict_gguf(t, gpu) + (_ollama_store_note(t) if engine == "ollama" else "")
    try:
        from vllm_lab.paths import resolve_path
        from vllm_lab.predict import predict_trial_outcome

        p = predict_trial_outcome(resolve_path(model), gpu, "head", None, e.get("high"),
                                  e.get("gpu_memory_utilization"), e.get("kv_cache_memory_bytes"),
                                  vllm_version=vllm_version)  # fmt: skip
    except Exception as err:  # a dry run prints every entry, also where nothing can be predicted
        return f"no prediction ({type(err).__name__}: {err})"
    from vllm_lab.search import LENGTH_DEPENDENT

    cap = p.get("predicted_max_model_len")
    if p.get("failure") and p["failure"] not in LENGTH_DEPENDENT:  # no context changes it: does not start
        return f"predicted: does not start ({p['failure']}): {p.get('reason') or ''}".rstrip(": ")
    return (
        f"predicted: starts, largest context about {cap}" if cap else "predicted: starts (no capacity figure)"
    )


def _predict_gguf(t, gpu: str | None) -> str:
    """llama.cpp (the .gguf) or Ollama (the GGUF behind the name in its store): the memory model's largest
    context on the card or under the address-space limit."""
    from vllm_lab import memory_gguf as mg
    from vllm_lab import search_llamacpp as lc

    engine, model = t.engine, t.model
    try:
        facts = mg.read_gguf(lc.gguf_of(t) or model)
    except Exception:
        if "qwen3" in model.lower() and "8b" in model.lower() and "q4_k_m" in model.lower():
            facts = mg.qwen3_8b_q4_k_m()  # the file is on the team's box, not here: config + published size
        else:
            return f"no prediction (cannot read {model} here)"
    k = lc.trial_knobs(t)
    if t.memory_limit_bytes:
        avail, base = int(t.memory_limit_bytes), lc.ADDRESS_SPACE_BASE
        where = f"address-space limit {avail / 2**20:.0f} MiB"
    elif gpu:
        from vllm_lab.gpu import load_gpu_profile

        prof = load_gpu_profile(gpu)
        avail, base = int(prof.total_mib * 2**20), int(mg.CUDA_OVERHEAD_GIB * 2**30)
        where = f"{prof.name} {prof.total_mib:.0f} MiB"
    else:
        return "no prediction (no card and no memory limit)"
    per_slot = engine == "ollama"  # Ollama's num_ctx is each slot's: its llama-server gets -c num_ctx x slots
    top_c = facts.n_ctx_train * (k.slots if per_slot else 1)
    full = mg.fit(facts, int(avail / 2**20), top_c, k.slots, k.cache_k, k.cache_v, k.flash_attn, k.kv_unified)
    edge = lc.largest_fitting(facts, k, avail, base, per_slot=per_slot)
    flag = "num_ctx" if engine == "ollama" else "-c"
    return (f"predicted: {'starts' if edge else 'does not start (weights_oom)'}, largest {flag} {edge} of "
            f"n_ctx_train {facts.n_ctx_train} on {where}; at {facts.n_ctx_train}: weights {full.weights_gib:.2f} "
            f"GiB + KV {full.kv_gib:.2f} GiB ({k.cache_k}/{k.cache_v}) + compute {full.compute_gib:.2f} GiB "
            "(a prediction)")  # fmt: skip


def _ollama_store_note(t) -> str:
    """Where the model is not in the store the run will use: how to get it (the run refuses it before any launch)."""
    from vllm_lab.engines.ollama import manifest_path, store
    from vllm_lab.engines.ollama_gguf import is_file_model

    root = store(t.env)
    if (
        t.pull or is_file_model(t.model) or manifest_path(root, t.model).is_file()
    ):  # a .gguf: created at run time
        return ""
    return f"; not in the Ollama store {root} here: `ollama pull {t.model}` before the run"


def _entry_trial(e: dict, model: str):
    """Enough of the entry's trial for the GGUF knobs and the store (no validation: a dry run predicts what
    it can)."""
    from vllm_lab.spec import Trial

    env = {str(k): str(v) for k, v in (e.get("env") or {}).items()}
    return Trial(model=model, engine=e.get("engine", "vllm"), extra_args=[str(a) for a in e.get("extra_args", [])],
                 env=env, memory_limit_bytes=e.get("memory_limit_bytes"), pull=e.get("pull") is True)  # fmt: skip


def dry_run_lines(params: dict, gpu: str | None, vllm_version: str | None) -> list[str]:
    """--dry-run: one line per ENGINES entry (checked first), each a prediction; nothing launches."""
    entries = check_entries(params.get("ENGINES"))
    model = str(params.get("MODEL") or "")
    out = []
    for e in entries:
        what = f"{e['name']} ({e.get('engine', 'vllm')}, {Path(str(e.get('model') or model)).name})"
        out.append(
            f"{what}: search, then LOAD at the found context; {predict_entry(e, gpu, vllm_version, model)}"
        )
    return out
