"""The report's load section: throughput against concurrency, TTFT/ITL percentiles, and the frontier.

Read from the records only (a trial that ran a load carries `load`: load.LoadResult.to_dict()); nothing here
launches anything. The frontier is what a team decides on: for each max_model_len that served a full-length
request, how many concurrent users it served cleanly and at what output tokens/s. Figures follow plots.py:
their own Agg canvas, filled markers for measurements, x markers and a title note for the fake backend.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vllm_lab import configs
from vllm_lab.plots import FAKE, FAKE_LABEL, fake_suffix, new_figure, prepared_frame, save_figure

PLOTS_DIR = "plots"  # report.PLOTS_DIR: the run's figures sit together
PERCENTILES = ("p50", "p90", "p99")
STYLES = {"p50": "-", "p90": "--", "p99": ":"}
FIGURES = ("load_throughput", "load_latency", "load_frontier")


# ---- tables ---------------------------------------------------------------------------------------------


def load_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The records that ran a load (a dict in `load`), in run order."""
    df = prepared_frame(df)
    if df.empty or "load" not in df.columns:
        return df.iloc[0:0].assign(variant="")
    df = df.assign(variant=configs.variant(df)[1])  # the model / install / ... where the run has several
    return df[df["load"].map(lambda v: isinstance(v, dict) and bool(v.get("levels")))]


def _pct(level: dict, metric: str, p: str):
    value = level.get(metric)
    return value.get(p) if isinstance(value, dict) else None


def _true(v) -> bool:
    """True only for a real true (a row read back from a frame holds numpy's bool; None and NaN are not true)."""
    return isinstance(v, bool | np.bool_) and bool(v)


def _clean(level: dict, planned: int | None = None) -> bool:
    """The level passed the load's verdict: its `problems` where the record has them (load.py's: a failed or
    unfinished request, /health after it, a fatal log line, the server gone); in older records every request
    it was to send completed, none with an error chunk, and /health answered 200 (or is not checkable)."""
    if "problems" in level:
        return not level["problems"] and not level.get("interrupted")
    finished = planned is None or level.get("requests") == planned
    health = level.get("health_after", 200) in (200, "not checkable")
    return (
        finished
        and health
        and not level.get("failed")
        and not level.get("errors_in_stream")
        and bool(level.get("completed"))
    )


def clean_levels(load: dict) -> list[dict]:
    """The levels of a load (LoadResult.to_dict()) that served their users cleanly, as its verdict says."""
    levels = load.get("levels") or []
    planned = (load.get("spec") or {}).get("requests")
    clean = [lv for lv in levels if _clean(lv, planned)]
    if load.get("stable") is False and levels and "problems" not in levels[-1]:
        # an older record: the load stops at its first unstable level, so its last one is not clean even where
        # its counts look clean (a fatal log line was not kept per level)
        clean = [lv for lv in clean if lv is not levels[-1]]
    return clean


def levels_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per trial and concurrency level: counts, latency percentiles (ms), throughput, server state."""
    rows = []
    for r in load_rows(df).itertuples(index=False):
        for lv in r.load["levels"]:
            rows.append({
                "trial": r.trial_id, "backend": r.backend, "max_model_len": r.max_model_len,
                "memory": r.memory_label, "concurrency": lv.get("concurrency"),
                "completed": f"{lv.get('completed')}/{lv.get('requests')}", "failed": lv.get("failed"),
                "errors in stream": lv.get("errors_in_stream"),
                **{f"TTFT {p} ms": _pct(lv, "ttft_ms", p) for p in PERCENTILES},
                **{f"ITL {p} ms": _pct(lv, "itl_ms", p) for p in PERCENTILES},
                "e2e p90 ms": _pct(lv, "e2e_ms", "p90"), "output tok/s": lv.get("output_tokens_per_s"),
                "req/s": lv.get("requests_per_s"), "preemptions": lv.get("preemptions"),
                "KV usage max": lv.get("kv_cache_usage_max"), "waiting max": lv.get("waiting_max"),
                "health after": lv.get("health_after"),
            })  # fmt: skip
    return pd.DataFrame(rows)


def frontier(df: pd.DataFrame) -> pd.DataFrame:
    """For each configuration (configs.key_columns: model, install, flags, ..., launcher, memory setting,
    max_model_len) that served a full-length request under a load: the most concurrent users served cleanly,
    at what output tokens/s and TTFT p90, the knee, the verdict; a first column names the model etc. where
    the run has several.

    The last record of a configuration counts (a resumed or repeated trial replaces the earlier one).
    """
    rows = load_rows(df)
    rows = rows[rows["long_request_ok"].map(_true).astype(bool)]  # an empty object mask would select columns
    out = []
    for _, g in rows.groupby(configs.key_columns(), dropna=False):
        r = g.iloc[-1]
        launcher, mem, n = r["launcher"], r["memory_label"], r["max_model_len"]
        clean = clean_levels(r["load"])
        top = max(clean, key=lambda lv: lv.get("concurrency") or 0, default={})
        knee = r["load"].get("knee_concurrency", r.get("knee_concurrency"))
        at_knee = next((lv for lv in r["load"]["levels"] if lv.get("concurrency") == knee), {})
        out.append({
            "variant": r["variant"], "launcher": launcher, "memory": mem, "max_model_len": n, "backend": r["backend"],
            "concurrent users (served cleanly)": top.get("concurrency", 0),
            "output tok/s at that": top.get("output_tokens_per_s"), "TTFT p90 ms at that": _pct(top, "ttft_ms", "p90"),
            "knee (--max-num-seqs hint)": knee, "output tok/s at the knee": at_knee.get("output_tokens_per_s"),
            "stable under the load": _true(r["load_stable"]), "reason": r["load_reason"], "trial": r["trial_id"],
        })  # fmt: skip
    cols = ["launcher", "memory", "max_model_len", "backend", "concurrent users (served cleanly)",
            "output tok/s at that", "TTFT p90 ms at that", "knee (--max-num-seqs hint)", "output tok/s at the knee",
            "stable under the load", "reason", "trial"]  # fmt: skip
    table = pd.DataFrame(out, columns=["variant", *cols])
    table = table.sort_values(["variant", "launcher", "memory", "max_model_len"]).reset_index(drop=True)
    heading, _ = configs.variant(prepared_frame(df))
    return table.rename(columns={"variant": heading}) if heading else table.drop(columns="variant")


# ---- figures --------------------------------------------------------------------------------------------


def _series(df: pd.DataFrame):
    """(label, is_fake, knee, levels sorted by concurrency) per trial with a load."""
    for r in load_rows(df).itertuples(index=False):
        levels = sorted(r.load["levels"], key=lambda lv: lv.get("concurrency") or 0)
        fake = r.backend == FAKE
        where = f"{r.variant}, " if r.variant else ""  # which model / install where the run has several
        label = f"{where}len {r.max_model_len}, {r.memory_label}" + (" (fake)" if fake else "")
        yield label, fake, r.load.get("knee_concurrency"), levels


def _style(fake: bool) -> dict:
    return {"marker": "x", "ls": ":", "mew": 2} if fake else {"marker": "o", "ls": "-"}


def throughput_figure(df: pd.DataFrame) -> Figure | None:
    """Output tokens/s against concurrency, one line per trial; the knee starred."""
    rows = load_rows(df)
    if rows.empty:
        return None
    fig, ax = new_figure((7.5, 4.5))
    for label, fake, knee, levels in _series(df):
        x = [lv.get("concurrency") for lv in levels]
        y = [lv.get("output_tokens_per_s") for lv in levels]
        (line,) = ax.plot(x, y, label=label, **_style(fake))
        for lv in levels:
            if lv.get("concurrency") == knee and lv.get("output_tokens_per_s") is not None:
                ax.plot(knee, lv["output_tokens_per_s"], "*", color=line.get_color(), markersize=15, zorder=3)
            if not _clean(lv) and lv.get("output_tokens_per_s") is not None:
                ax.plot(
                    lv["concurrency"],
                    lv["output_tokens_per_s"],
                    "X",
                    color="#d1372c",
                    markersize=10,
                    zorder=3,
                )
    ax.plot([], [], "*", color="#555555", markersize=12, label="knee (--max-num-seqs hint)")
    if any(not _clean(lv) for *_, levels in _series(df) for lv in levels):
        ax.plot([], [], "X", color="#d1372c", markersize=9, label="level not served cleanly")
    if fake_suffix(rows):
        ax.plot([], [], "x:", color="#777777", label=FAKE_LABEL)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({lv.get("concurrency") for *_, lvs in _series(df) for lv in lvs}))
    ax.get_xaxis().set_major_formatter("{x:.0f}")
    ax.set(xlabel="concurrent requests", ylabel="output tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title("Throughput against concurrency" + fake_suffix(rows), fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return fig


def latency_figure(df: pd.DataFrame) -> Figure | None:
    """TTFT and ITL p50/p90/p99 (ms) against concurrency, side by side; a colour per trial."""
    rows = load_rows(df)
    if rows.empty:
        return None
    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    colors = {}
    for metric, ax, title in (("ttft_ms", axes[0], "TTFT"), ("itl_ms", axes[1], "ITL")):
        for i, (label, fake, _, levels) in enumerate(_series(df)):
            color = colors.setdefault(i, f"C{i % 10}")
            x = [lv.get("concurrency") for lv in levels]
            for p in PERCENTILES:
                y = [_pct(lv, metric, p) for lv in levels]
                ax.plot(x, y, color=color, ls=STYLES[p], marker="x" if fake else "o", markersize=5,
                        label=label if p == "p50" else None)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({lv.get("concurrency") for *_, lvs in _series(df) for lv in lvs}))
        ax.get_xaxis().set_major_formatter("{x:.0f}")
        ax.set(xlabel="concurrent requests", ylabel=f"{title} (ms)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{title} p50 (solid), p90 (dashed), p99 (dotted)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle("Latency against concurrency" + fake_suffix(rows), fontsize=10)
    return fig


def frontier_figure(df: pd.DataFrame) -> Figure | None:
    """Concurrent users served cleanly per max_model_len, each point labelled with its output tokens/s."""
    table = frontier(df)
    if table.empty:
        return None
    fig, ax = new_figure((7.5, 4.5))
    users = "concurrent users (served cleanly)"
    first = list(table.columns).index("launcher")  # the columns before it name the model etc.
    for key, g in table.groupby(list(table.columns[: first + 2]), sort=False):
        fake = g["backend"].eq(FAKE)
        label = ", ".join(map(str, key)) + (" (fake)" if fake.all() else "")
        (line,) = ax.plot(g["max_model_len"], g[users], label=label, **_style(bool(fake.all())))
        hollow = g[~g["stable under the load"]]
        if not hollow.empty:
            ax.plot(
                hollow["max_model_len"], hollow[users], "o", mfc="white", color=line.get_color(), zorder=3
            )
        for n, u, tps in zip(g["max_model_len"], g[users], g["output tok/s at that"], strict=True):
            text = f"{tps:.0f} tok/s" if isinstance(tps, int | float) and pd.notna(tps) else "none clean"
            ax.annotate(text, (n, u), fontsize=8, xytext=(4, 6), textcoords="offset points")
    if not table["stable under the load"].all():
        ax.plot([], [], "o", mfc="white", color="#555555", label="not stable under the whole load")
    ax.set(xlabel="max_model_len", ylabel="concurrent users served cleanly")
    ax.set_ylim(bottom=0, top=max(1, table[users].max()) * 1.25)
    ax.set_title("Frontier: users and output tokens/s per max_model_len" + fake_suffix(table), fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return fig


FIGURE_FUNCS = {"load_throughput": throughput_figure, "load_latency": latency_figure,
                "load_frontier": frontier_figure}  # fmt: skip


def write_plots(df: pd.DataFrame, plots_dir: str | Path) -> dict[str, Path | None]:
    """Each load figure as plots_dir/<name>.png (None where there is nothing to plot)."""
    return {name: save_figure(fn(df), Path(plots_dir) / f"{name}.png") for name, fn in FIGURE_FUNCS.items()}


# ---- report blocks ----------------------------------------------------------------------------------------


def load_blocks(df: pd.DataFrame, plot_paths: dict[str, Path | None]) -> list[tuple]:
    """The load section as report blocks (report.py's ('heading'|'text'|'table'|'image', ...) format).

    Figures not in plot_paths yet are written into the run's plots folder (df.attrs["run_dir"], as
    report.load_run sets it) and added to plot_paths, so the caller lists them with the others.
    """
    heading = ("heading", 2, "Under load")
    rows = load_rows(df)
    if rows.empty:
        return [heading, ("text", "_No trial ran a load (set LOAD on a 02/03 step to measure one)._")]
    run_dir = df.attrs.get("run_dir")
    for name in FIGURES:
        if name not in plot_paths and run_dir:
            plot_paths[name] = save_figure(FIGURE_FUNCS[name](df), Path(run_dir) / PLOTS_DIR / f"{name}.png")
    stable = int(rows["load_stable"].map(_true).sum())
    fake = " **These figures come from the fake backend (a test double): none of them is a measurement.**"
    intro = (
        f"{len(rows)} trial(s) ran a load after the full-length request; {stable} stable under it (every "
        "request completed with status 200, no error chunk in a stream, every output token, /health 200 after "
        "(or not checkable: the server has no /health), "
        "no fatal log line, the same server process)." + (fake if rows["backend"].eq(FAKE).all() else "")
    )
    missing = "No load figure was written (no run folder to write it into)."
    return [
        heading,
        ("text", intro),
        ("text", "**Frontier**: for each max_model_len that served a full-length request, how many concurrent "
                 "users it served cleanly and at what output tokens/s; the knee is the --max-num-seqs hint."),
        ("image", "load_frontier", plot_paths.get("load_frontier"), missing),
        ("table", frontier(df)),
        ("text", "**Throughput against concurrency** (the knee starred):"),
        ("image", "load_throughput", plot_paths.get("load_throughput"), missing),
        ("text", "**TTFT and ITL percentiles** against concurrency:"),
        ("image", "load_latency", plot_paths.get("load_latency"), missing),
        ("table", levels_table(df)),
    ]  # fmt: skip
