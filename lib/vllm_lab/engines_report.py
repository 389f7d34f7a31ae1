"""The report's "Engines side by side" section: per engine and model, does it start (or why not), its largest
stable context and the KV at it, output tok/s and TTFT p90 per concurrency under the same load, the knee.

Reads records only (trials.jsonl; report.load_run's frame or plain rows) plus engine_compare's engines.json
for what the records cannot say (the search's verdict and the memory model's first guess, a prediction).
The rows are notebook 05_engines' entries (a trial's step "<step>.<name>"); a run without that step but with
more than one engine gets one row per engine, model and memory setting from whatever steps ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from vllm_lab.load_report import _pct
from vllm_lab.search import passes, started

HEADING = "Engines side by side"
SUMMARY_FILE = "engines.json"  # engine_compare.SUMMARY_FILE


def _rows(records) -> list[dict]:
    if isinstance(records, pd.DataFrame):
        return [{k: (None if _na(v) else v) for k, v in r.items()} for r in records.to_dict("records")]
    return list(records)


def _na(v) -> bool:
    try:
        return bool(pd.isna(v)) if not isinstance(v, dict | list | tuple) else False
    except (TypeError, ValueError):
        return False


def _memory(r: dict) -> str:
    if r.get("memory_limit"):
        return f"address space {r['memory_limit'] / 2**20:.0f} MiB"
    if r.get("kv_cache_memory_bytes"):
        return f"KV budget {r['kv_cache_memory_bytes'] / 2**20:.0f} MiB"
    if r.get("gpu_memory_utilization"):
        return f"util {r['gpu_memory_utilization']}"
    return "the card" if str(r.get("backend") or "").endswith("cuda") else "-"


def _label(r: dict) -> str:
    return f"{r.get('engine') or 'vllm'} · {Path(str(r.get('model'))).name} · {_memory(r)}"


def groups(records, run_dir=None) -> dict[str, list[dict]]:
    """label -> its records, in order: 05_engines' entries (engines.json names them; a trial's step is
    "<step>.<name>"), else, where the run started more than one engine, one group per engine, model and
    memory setting."""
    rows = _rows(records)
    out: dict[str, list[dict]] = {}
    summ = _summaries(run_dir)
    if summ:
        for name, s in summ.items():
            mine = [r for r in rows if r.get("step") == f"{s.get('step')}.{name}"]
            if mine:
                out[name] = mine
        return out
    if len({r.get("engine") or "vllm" for r in rows}) < 2:
        return {}
    for r in rows:
        out.setdefault(_label(r), []).append(r)
    return out


def _summaries(run_dir) -> dict[str, dict]:
    path = Path(run_dir) / SUMMARY_FILE if run_dir else None
    if not path or not path.is_file():
        return {}
    try:
        return {str(s.get("name")): s for s in json.loads(path.read_text())}
    except (OSError, ValueError):
        return {}


def _kv(r: dict) -> str:
    if r.get("kv_cache_mib") is not None:
        return f"{r['kv_cache_mib']:g} MiB ({int(r.get('n_ctx') or r.get('max_model_len'))} cells)"
    if r.get("kv_cache_tokens") is not None:
        gib = r.get("available_kv_gib")
        return f"{int(r['kv_cache_tokens'])} tokens" + (f" ({gib * 1024:.1f} MiB)" if gib is not None else "")
    return "-"


def table(records, run_dir=None) -> pd.DataFrame:
    """One row per engine entry: starts, why not, largest stable context, KV at it, launches, the knee."""
    summ = _summaries(run_dir)
    out = []
    for label, rs in groups(records, run_dir).items():
        first = rs[0]
        search = [r for r in rs if not r.get("load")]
        loaded = [r for r in rs if r.get("load")]
        up = [r for r in rs if started(r)]
        stable = [r for r in search if passes(r)] or [r for r in rs if passes(r)]
        best = max(stable, key=lambda r: r.get("max_model_len") or 0) if stable else None
        failed = next((r for r in rs if not started(r)), None)
        s = summ.get(label, {})
        why = (
            ""
            if up
            else f"{(failed or first).get('failure') or 'other'}: {str((failed or first).get('evidence') or '')[:160]}"
        )
        knee = (
            loaded[-1]["load"].get("knee_concurrency")
            if loaded and isinstance(loaded[-1].get("load"), dict)
            else None
        )
        predicted = s.get("predicted_context")
        out.append({
            "engine": first.get("engine") or "vllm", "entry": label, "model": Path(str(first.get("model"))).name,
            "backend": first.get("backend"), "memory": _memory(first),
            "starts": "yes" if up else "no", "why not": why,
            "largest stable context": best.get("max_model_len") if best else None,
            "verdict": s.get("verdict") or ("-" if best is None else "stable (from the records)"),
            "context used": best.get("n_ctx") or best.get("context_used") or best.get("max_model_len") if best else None,
            "KV at it": _kv(best) if best else "-",
            "launches": len(search),
            "predicted (memory model, a prediction)": predicted if predicted else "-",
            "knee (concurrency)": knee, "on the GPU": _residency(rs),
        })  # fmt: skip
    t = pd.DataFrame(out)
    if not t.empty and t["on the GPU"].eq("-").all():  # no record says where the model ran (not Ollama)
        t = t.drop(columns="on the GPU")
    return t


def load_table(records, run_dir=None) -> pd.DataFrame:
    """Per engine entry and concurrency level: output tok/s and TTFT p90 (ms) under the same load."""
    out = []
    for label, rs in groups(records, run_dir).items():
        loaded = [r for r in rs if isinstance(r.get("load"), dict)]
        if not loaded:
            continue
        r = loaded[-1]
        knee = r["load"].get("knee_concurrency")
        for lv in r["load"].get("levels") or []:
            c = lv.get("concurrency")
            out.append({
                "entry": label, "engine": r.get("engine") or "vllm", "backend": r.get("backend"),
                "context": r.get("max_model_len"),
                "concurrency": c, "output tok/s": _round(lv.get("output_tokens_per_s")),
                "TTFT p90 ms": _round(_pct(lv, "ttft_ms", "p90")), "completed": f"{lv.get('completed')}/{lv.get('requests')}",
                "knee": "*" if c == knee else "", "clean": _clean(lv),
            })  # fmt: skip
    return pd.DataFrame(out)


def _clean(lv: dict) -> str:
    """The level's own verdict (its problems), not the whole load's: a failure at 4 users leaves 1 and 2 clean."""
    if "problems" not in lv:
        return "-"  # a record from before levels carried their problems
    kinds = [p.get("kind") for p in lv.get("problems") or []]
    return "yes" if not kinds else "no: " + ", ".join(str(k) for k in kinds)


def _residency(rs: list[dict]) -> str:
    """Where the model ran, where a record says (Ollama's /api/ps): the smallest context partly on the CPU."""
    from vllm_lab.search import gpu_residency

    off = sorted(
        (r for r in rs if gpu_residency(r) == "partial_offload"), key=lambda r: r.get("max_model_len") or 0
    )
    unused = [r for r in rs if gpu_residency(r) == "gpu_unused"]
    if unused:
        return "the whole model on the CPU beside a GPU: no usable GPU"
    if off:
        r = off[0]
        return (f"from {r.get('max_model_len')}: only {r['offload_fraction']:.1%} of the model on the GPU, the "
                "rest on the CPU (runs, at a fraction of the speed: not a fit)")  # fmt: skip
    fracs = [r["offload_fraction"] for r in rs if isinstance(r.get("offload_fraction"), int | float)]
    if fracs and all(f == 1 for f in fracs):
        return "wholly on the GPU"
    return "-"


OLLAMA_WORDS = (
    "Ollama's context is the num_ctx it reported loading (/api/ps), and a context it serves only with part of "
    "the model on the CPU does not count as stable (the `on the GPU` column says from where). "
)


def _round(v):
    """Whole numbers from 100 up (the renderer prints 3 significant digits of a float: 4.74e+03)."""
    if not isinstance(v, int | float):
        return v
    return round(v) if abs(v) >= 100 else round(float(v), 1)


def frame(records, run_dir=None) -> pd.DataFrame:
    """The notebook's view: the side-by-side table."""
    return table(records, run_dir)


def engine_blocks(df: pd.DataFrame) -> list[tuple]:
    """The section as report blocks (report.py's format); nothing where the run compared no engines."""
    run_dir = df.attrs.get("run_dir") if hasattr(df, "attrs") else None
    t = table(df, run_dir)
    if t.empty:
        return []
    lt = load_table(df, run_dir)
    intro = (
        "The same question on each engine: does it start, the largest context that starts and serves a request "
        "filling it (the next block, 16/128 tokens on vLLM and 256 on llama.cpp and Ollama, proven to fail where "
        "the verdict says `found`), the KV cache at it, and output tokens/s and TTFT p90 under the same load. "
        + (OLLAMA_WORDS if t["engine"].eq("ollama").any() else "")
        + "On a CPU box an address-space limit on the server stands in for the card (the memory column says which limit "
        "applied). The memory model's column is a prediction, not a measurement. A load level is `clean` on its "
        "own: a failure at a higher concurrency leaves the lower ones clean."
    )
    blocks = [("heading", 2, HEADING), ("text", intro), ("table", t)]
    if not lt.empty:
        blocks += [("text", "**Under the same load** (the knee starred):"), ("table", lt)]
    return blocks
