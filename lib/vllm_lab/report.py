"""A run's report: report.md (beside its plots/), report.html (one self-contained file), report-issue.md, plots.

Everything is derived from trials.jsonl (read through record.read_records); nothing here launches anything.
This module is the run's one summary: it keys every configuration by everything that defines it
(configs.py: model, engine, install, GPU type, engine flags, launcher, length, memory), sets lost Ray attempts
apart, and turns the verdict, tables and figures into ("heading" | "text" | "table" | "image", ...) blocks.
The renderers are leaves fed those blocks: render.py (report.md, report.html), issue_report.py
(report-issue.md) and attach.py (zip, gh); none of them imports this module.
The verdict comes first: what works, the largest stable max_model_len per setting, which hypotheses the data
supports or refutes.

The report notebook (notebooks/99_report.ipynb) calls load_run, verdict, the plots module and trial_table;
`vllm-lab report RUN_DIR` builds the files without a kernel (build_report).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from vllm_lab import attach, configs, engines_report, hypotheses, issue_report, load_report, plots
from vllm_lab.gpu_axis import gpu_axis_blocks
from vllm_lab.install_compare import compare_blocks
from vllm_lab.record import TRIALS_FILE, read_records
from vllm_lab.redact import redact_obj
from vllm_lab.render import (  # noqa: F401  (markdown_table, redact_notebook: the notebook and tests use them)
    MISSING,
    PLOTS_DIR,
    build_notebook,
    export_html,
    fmt_value,
    known_blocks,
    markdown_table,
    redact_notebook,
    render_markdown,
    scrub,
)

FAKE_BANNER = "FAKE backend: test double, not a measurement"


# ---- loading -----------------------------------------------------------------------------------------


def load_run(run_dir: str | Path) -> pd.DataFrame:
    """trials.jsonl as a redacted DataFrame with derived columns, lost Ray attempts (infrastructure) set
    apart; attrs: run_dir, run_id, torn (line count), lost (those attempts, for their own table)."""
    recs = read_records(run_dir)
    every = hypotheses.prepare([redact_obj(r) for r in recs.rows])
    lost = configs.lost(every)
    df = configs.usable(every).reset_index(drop=True)
    df.attrs.update(
        run_dir=str(run_dir), run_id=_run_id(every, run_dir), torn=len(recs.torn), lost=_lost_rows(lost)
    )
    return df


def _lost_rows(lost: pd.DataFrame) -> list[dict]:
    cols = ["trial_id", "step", "node", "gpu_type", "evidence"]
    return [{c: r.get(c) for c in cols} for r in lost.to_dict("records")]


def _run_id(df: pd.DataFrame, run_dir: str | Path) -> str:
    ids = df["run_id"].dropna().astype(str).unique() if "run_id" in df else []
    return ", ".join(ids) if len(ids) else Path(run_dir).resolve().name


def _backend_label(backend, mixed: bool) -> str:
    if backend == plots.FAKE:
        return "fake (test double)" if mixed else "fake"
    return fmt_value(backend)


def _long_request(v) -> str:
    return "ok" if v is True else ("failed" if v is False else "not run")


def _long_request_not_stable(g: pd.DataFrame) -> str:
    """A configuration with no stable trial: failed, or served but not where it was meant to run (Ollama
    with part of the model on the CPU), or not run."""
    from vllm_lab.record import gpu_residency

    if g["long_request_ok"].eq(False).any():
        return "failed"
    where = {gpu_residency(r) for r in g.to_dict("records")} - {None}
    if where and g["long_request_ok"].eq(True).any():
        return f"ok, but {'; '.join(sorted(where))}: not stable"
    return "not run"


def _with_variant(df: pd.DataFrame, table: pd.DataFrame, labels) -> pd.DataFrame:
    """table with a first column naming each row's model / install / ... where the run has several."""
    heading, _ = configs.variant(df)
    if not heading:
        return table
    out = table.copy()
    out.insert(0, heading, list(labels))
    return out


def _variant_column(df: pd.DataFrame) -> pd.DataFrame:
    """df with `_variant`: the label of the configuration's parts that vary in the run ("" where none)."""
    return df.assign(_variant=configs.variant(df)[1])


# ---- verdict -------------------------------------------------------------------------------------------


def backend_banner(df: pd.DataFrame) -> str | None:
    """A warning when some or all rows come from the fake backend."""
    fake = df["backend"].eq(plots.FAKE).fillna(False)
    if len(df) and fake.all():
        return (
            f"**{FAKE_BANNER}.** All {len(df)} trials ran against the fake vLLM; no number here was measured."
        )
    if fake.any():
        return (
            f"**Mixed backends: {int(fake.sum())} of {len(df)} trials ran against the fake backend (test double, "
            "not a measurement)**; each row says which backend produced it."
        )
    return None


def _ready_count(g: pd.DataFrame) -> str:
    """'1/2' ready; a start that came up and then failed (unstable) is said, never counted as ready."""
    unstable = int(g["outcome"].eq("unstable").sum())
    return f"{int(g['outcome'].eq('ready').sum())}/{len(g)}" + (f", {unstable} unstable" if unstable else "")


def _config_summary(g: pd.DataFrame) -> pd.Series:
    return pd.Series(
        {
            "_variant": g["_variant"].iloc[0],
            "launcher": g["launcher"].iloc[0],
            "max_model_len": g["max_model_len"].iloc[0],
            "memory": g["memory_label"].iloc[0],
            "ready": _ready_count(g),
            "long request": "ok" if g["stable"].any() else _long_request_not_stable(g),
            "kv_cache_tokens": pd.to_numeric(g["kv_cache_tokens"], errors="coerce").max(),
            "backend": ", ".join(sorted(g["backend"].dropna().astype(str).unique())),
            "_ready": int(g["started"].sum()),
            "_stable": bool(g["stable"].any()),
            "_all": bool(g["started"].all()),
            "_mem": g["memory_setting"].iloc[0],
        }
    )


WORKING_COLUMNS = [
    "launcher",
    "max_model_len",
    "memory",
    "ready",
    "long request",
    "kv_cache_tokens",
    "backend",
]


def working_configs(df: pd.DataFrame) -> pd.DataFrame:
    """Configurations with at least one ready trial, best first (stable, always ready, longest context);
    one row per configuration (configs.key_columns), a first column naming the model etc. where several."""
    df = configs.usable(df)
    ok = _variant_column(df[df["launcher"].notna()])
    if ok.empty:
        return pd.DataFrame(columns=WORKING_COLUMNS)
    groups = pd.DataFrame(
        [_config_summary(g) for _, g in ok.groupby(configs.key_columns(), dropna=False, sort=False)]
    )
    groups = groups[groups["_ready"] > 0]
    groups = groups.sort_values(
        ["_stable", "_all", "max_model_len", "_mem"], ascending=[False, False, False, True]
    ).reset_index(drop=True)
    return _with_variant(df, groups[WORKING_COLUMNS], groups["_variant"])


def largest_stable(df: pd.DataFrame) -> pd.DataFrame:
    """Per configuration less its length (model, install, ..., launcher, memory setting): the largest
    max_model_len that was ready and served a long request."""
    df = configs.usable(df)
    rows = []
    d = _variant_column(df[df["launcher"].notna()])
    keys = configs.key_columns(without=("max_model_len",))
    for _, g in d.groupby(keys, sort=False, dropna=False) if not d.empty else []:
        stable = g[g["stable"]].sort_values("max_model_len", ascending=False)
        best = stable.iloc[0] if not stable.empty else None
        rows.append(
            {
                "_variant": g["_variant"].iloc[0],
                "launcher": g["launcher"].iloc[0],
                "memory": g["memory_label"].iloc[0],
                "largest stable max_model_len": best["max_model_len"] if best is not None else "none stable",
                "trial": best["trial_id"] if best is not None else MISSING,
                "kv_cache_tokens": best["kv_cache_tokens"] if best is not None else None,
                "trials": len(g),
                "_mem": g["memory_setting"].iloc[0],
            }
        )
    cols = ["launcher", "memory", "largest stable max_model_len", "trial", "kv_cache_tokens", "trials"]
    out = pd.DataFrame(rows, columns=["_variant", *cols, "_mem"])
    out = out.sort_values(["_variant", "launcher", "_mem"]).reset_index(drop=True)
    return _with_variant(df, out[cols], out["_variant"])


def _works(row: pd.Series) -> str:
    return (
        f"launcher `{row['launcher']}`, max_model_len {fmt_value(row['max_model_len'])}, {row['memory']} "
        f"(ready {row['ready']}, long request {row['long request']})"
    )


def _headline(df: pd.DataFrame, working: pd.DataFrame) -> str:
    """What works, best first; per model (install, ...) where the run has several, so none hides another."""
    if df.empty:
        return "**No trials recorded.** trials.jsonl holds no complete record yet."
    heading, labels = configs.variant(df)
    if working.empty:
        return f"**Nothing started:** none of the {len(df)} trials reached ready."
    if not heading:
        return (
            f"**Works:** {_works(working.iloc[0])}; "
            f"{len(working)} working configuration(s), best first below."
        )
    works, fails = [], []
    for name in dict.fromkeys(labels):
        mine = working[working[heading] == name]
        tried = int((labels == name).sum())
        if mine.empty:  # said apart: "Works" never heads a configuration where nothing started
            fails.append(f"`{name}` ({tried} trial(s))")
        else:
            works.append(f"{heading} `{name}`: {_works(mine.iloc[0])}")
    out = f"**Works** (best per {heading}): " + "; ".join(works) + "."
    if fails:
        out += f" **Nothing started** for {heading} " + ", ".join(fails) + "."
    return out + f" {len(working)} working configuration(s) below."


def _hypothesis_summary(hyp: pd.DataFrame) -> str:
    parts = []
    for word in ("supported", "refuted", "mixed", "not tested"):
        ids = hyp.loc[hyp["verdict"].eq(word), "id"].tolist()
        if ids or word != "mixed":  # mixed (some pairs for, some against) only when there is one
            parts.append(f"{word.capitalize()}: {', '.join(ids) if ids else 'none'}.")
    return "**Hypotheses.** " + " ".join(parts)


def verdict(df: pd.DataFrame) -> dict:
    """The verdict as parts (banner, headline, working, largest_stable, hypotheses, effects) and as Markdown."""
    df = configs.usable(df)
    working = working_configs(df)
    hyp = hypotheses.verdicts(df)
    out = {
        "banner": backend_banner(df),
        "headline": _headline(df, working),
        "working": working,
        "largest_stable": largest_stable(df),
        "hypotheses": hyp,
        "hypothesis_summary": _hypothesis_summary(hyp),
        "effects": hypotheses.effects(df),
        "frontier": load_report.frontier(df),
        "per": "".join(f"{h}, " for h in [configs.variant(df)[0]] if h),  # "model, " where several
    }
    out["markdown"] = scrub(render_markdown(verdict_blocks(out)))
    return out


def verdict_blocks(v: dict) -> list[tuple]:
    return [
        ("text", v["headline"]),
        ("table", v["working"]),
        (
            "text",
            f"**Largest stable max_model_len** per {v.get('per', '')}launcher and memory setting (ready, and a "
            "request filling max_model_len to within a block completed):",
        ),
        ("table", v["largest_stable"]),
        ("text", v["hypothesis_summary"]),
        ("table", v["hypotheses"]),
    ]


def verdict_lines(df: pd.DataFrame) -> list[str]:
    """The verdict in a few plain lines for a terminal (`vllm-lab run` ends with them)."""
    df = configs.usable(df)
    v = verdict(df)
    plain = [_plain(v["headline"])]
    largest = v["largest_stable"]
    if not largest.empty:
        plain.append("Largest stable max_model_len:")
        lines = []
        for r in largest.to_dict("records"):
            head = ", ".join(str(r[c]) for c in largest.columns[: list(largest.columns).index("launcher")])
            n = r["largest stable max_model_len"]
            lines.append(
                (n, f"  {head + ', ' if head else ''}{r['launcher']}, {r['memory']}: {fmt_value(n)}")
            )
        found = [line for n, line in lines if n != "none stable"]
        none = [line for n, line in lines if n == "none stable"]
        # a factorial's many settings where nothing was stable: one line, the report lists them
        plain += found + (none if len(none) <= 2 else [f"  none stable at the {len(none)} other settings"])
    hyp = v["hypotheses"]
    if not hyp.empty and not hyp["verdict"].eq("not tested").all():
        plain.append(_plain(v["hypothesis_summary"]))
    front = v["frontier"]
    users = "concurrent users (served cleanly)"
    for r in front.to_dict("records"):
        head = ", ".join(str(r[c]) for c in front.columns[: list(front.columns).index("launcher")])
        tps = r["output tok/s at that"]
        plain.append(
            f"Under load: {head + ', ' if head else ''}{r['launcher']}, {r['memory']}, max_model_len "
            f"{fmt_value(r['max_model_len'])}: {r[users]} concurrent users served cleanly"
            + (f" at {tps:.0f} output tok/s" if isinstance(tps, int | float) and pd.notna(tps) else "")
            + ("" if r["stable under the load"] else f" (not stable: {r['reason']})")
        )
    if v["banner"]:
        plain.insert(0, _plain(v["banner"]))
    lost = df.attrs.get("lost") or []
    if lost:
        plain.append(
            f"{len(lost)} attempt(s) lost with their Ray worker or node: listed apart, counted nowhere."
        )
    return [scrub(line) for line in plain]


def _plain(markdown: str) -> str:
    return markdown.replace("**", "").replace("`", "")


# ---- tables --------------------------------------------------------------------------------------------


def trial_table(df: pd.DataFrame) -> pd.DataFrame:
    """Every trial in run order: configuration, outcome, failure kind, evidence line and remedy."""
    df = configs.usable(df)
    mixed = df["backend"].nunique() > 1
    table = pd.DataFrame(
        {
            "#": range(1, len(df) + 1),
            "trial": df["trial_id"],
            "step": df["step"],
            "backend": [_backend_label(b, mixed) for b in df["backend"]],
            "launcher": df["launcher"],
            "max_model_len": df["max_model_len"],
            "memory": df["memory_label"],
            "outcome": df["outcome"],
            "failure": df["failure"],
            "seconds": df["seconds_to_outcome"],
            "long request": [_long_request(v) for v in df["long_request_ok"]],
            "evidence": df["evidence"],
            "remedy": df["remedy"],
        }
    )
    heading, labels = configs.variant(df)
    if heading:
        table.insert(3, heading, list(labels))
    return table


def lost_table(df: pd.DataFrame) -> pd.DataFrame:
    """Attempts lost with their Ray worker or node (failure infrastructure): no trial of the server."""
    return pd.DataFrame(
        df.attrs.get("lost") or [], columns=["trial_id", "step", "node", "gpu_type", "evidence"]
    )


def capacity_table(df: pd.DataFrame) -> pd.DataFrame:
    """Measured KV capacity beside the prediction and vLLM's own estimate, per trial that has any of them."""
    df = configs.usable(df)
    cols = ["kv_cache_tokens", "predicted_kv_cache_tokens", "estimated_max_model_len"]
    rows = df[df[cols].notna().any(axis=1)]
    fake = rows["backend"].eq(plots.FAKE).fillna(False)
    measured = [
        f"{fmt_value(v)} (fake)" if f and fmt_value(v) != MISSING else fmt_value(v)
        for v, f in zip(rows["kv_cache_tokens"], fake, strict=True)
    ]
    table = pd.DataFrame(
        {
            "trial": rows["trial_id"],
            "backend": rows["backend"],
            "memory": rows["memory_label"],
            "max_model_len": rows["max_model_len"],
            "kv_cache_tokens (measured)": measured,
            "predicted_kv_cache_tokens (prediction)": rows["predicted_kv_cache_tokens"],
            "estimated_max_model_len (vLLM, on failure)": rows["estimated_max_model_len"],
        }
    )
    heading, labels = configs.variant(df)
    if heading:
        table.insert(0, heading, list(labels.loc[rows.index]))
    return table


# ---- the report as blocks ------------------------------------------------------------------------------


def _run_line(df: pd.DataFrame) -> str:
    def values(col: str) -> str:
        vals = df[col].dropna().astype(str).unique() if col in df else []
        return ", ".join(vals) if len(vals) else MISSING

    return (
        f"Run `{df.attrs.get('run_id', MISSING)}`: {len(df)} trials; backend {values('backend')}; "
        f"vLLM {values('vllm_version')}; GPU {values('gpu_name')} (cc {values('gpu_cc')}); "
        f"model {values('model_name')}."
    )


def _torn_line(df: pd.DataFrame) -> str | None:
    torn = df.attrs.get("torn", 0)
    if not torn:
        return None
    return (
        f"**{torn} torn line(s)** in {TRIALS_FILE} did not parse (a crash mid-write); they are kept aside in "
        f"{TRIALS_FILE}.torn and left out of this report."
    )


def _image(name: str, paths: dict, note: str) -> tuple:
    return ("image", name, paths.get(name), note)


ENGINE_NAMES = {"vllm": "vLLM", "llamacpp": "llama.cpp", "ollama": "Ollama"}


def _engines_named(df: pd.DataFrame) -> str:
    """The engines the run started, as users write them: "vLLM", "vLLM, llama.cpp and Ollama"."""
    used = df["engine"].fillna("vllm").unique().tolist() if "engine" in df.columns and len(df) else ["vllm"]
    names = [
        ENGINE_NAMES.get(e, str(e))
        for e in sorted(used, key=lambda e: list(ENGINE_NAMES).index(e) if e in ENGINE_NAMES else 9)
    ]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def report_blocks(df: pd.DataFrame, plot_paths: dict[str, Path | None]) -> list[tuple]:
    """The whole report, verdict first, as ('heading'|'text'|'table'|'image', ...) blocks."""
    v = verdict(df)
    notices = [("text", "> " + line) for line in (v["banner"], _torn_line(df)) if line]
    return [
        ("heading", 1, f"{_engines_named(df)} startup report: {df.attrs.get('run_id', MISSING)}"),
        *notices,
        ("heading", 2, "Verdict"),
        *verdict_blocks(v)[:1],  # the headline first, then what was run
        ("text", _run_line(df)),
        *verdict_blocks(v)[1:],
        *gpu_axis_blocks(df),  # the same steps on several GPU types (run --ray, per_gpu_type)
        *compare_blocks(df),  # the same trials on several vLLM installs (issue 13)
        ("heading", 2, "Outcome grid"),
        _image("outcome_grid", plot_paths, "No trial has a launcher and max_model_len to place on the grid."),
        (
            "text",
            "Factor effects in the launcher x max_model_len x memory factorial (share of trials that "
            "started; interactions are differences of differences):",
        ),
        ("table", v["effects"]),
        ("heading", 2, "Capacity against memory setting"),
        (
            "text",
            "Measured KV capacity beside the memory model's prediction (a prediction, not a measurement) and "
            "vLLM's own estimate on a failed start; in the figure filled markers are measurements, hollow "
            "dashed ones predictions, x markers the fake backend.",
        ),
        _image("capacity", plot_paths, "No trial recorded a measured or predicted KV capacity."),
        ("table", capacity_table(df)),
        ("heading", 2, "Seconds to outcome"),
        _image("seconds_to_outcome", plot_paths, "No trial recorded seconds_to_outcome."),
        ("heading", 2, "GPU memory timeline"),
        _image(
            "gpu_memory_timeline",
            plot_paths,
            "No GPU memory was sampled in this run (no NVML GPU, or the "
            "CPU/fake backend): no timeline to show.",
        ),
        ("heading", 2, "Search trajectory"),
        _image("search_trajectory", plot_paths, "This run has no max_model_len search step."),
        *load_report.load_blocks(df, plot_paths),  # under load: frontier, throughput, TTFT/ITL (issue 11)
        *engines_report.engine_blocks(df),  # engines side by side (issue 23); nothing without engines
        ("heading", 2, "Trials"),
        ("table", trial_table(df)),
        *_lost_blocks(df),
    ]


def _lost_blocks(df: pd.DataFrame) -> list[tuple]:
    lost = lost_table(df)
    if lost.empty:
        return []
    return [
        ("heading", 2, "Lost attempts (infrastructure)"),
        (
            "text",
            f"{len(lost)} attempt(s) ended with their Ray worker or node, not with vLLM: no rate, grid cell, "
            "ready count or verdict above counts them (Ray ran the trial again where `retries` allowed).",
        ),
        ("table", lost),
    ]


# ---- entry points ----------------------------------------------------------------------------------------


def build_report(run_dir: str | Path, *, for_issue: bool = False) -> dict[str, Path]:
    """Write plots/*.png, report.md and report.html (and report-issue.md when for_issue) into run_dir;
    return {name: path} of what was written."""
    run_dir = Path(run_dir)
    df = load_run(run_dir)
    plot_paths = plots.write_plots(df, run_dir / PLOTS_DIR)
    blocks = report_blocks(df, plot_paths)
    md_path = run_dir / "report.md"
    md_path.write_text(scrub(render_markdown(blocks)), encoding="utf-8")
    html_path = export_html(
        build_notebook(blocks), run_dir / "report.html", title=f"vLLM report {df.attrs['run_id']}"
    )
    written = {name: path for name, path in plot_paths.items() if path is not None}
    issue = {"issue": issue_report.write_issue(run_dir, df, blocks)} if for_issue else {}
    return {"md": md_path, "html": html_path, **issue, **written}


def cli_report(args) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / TRIALS_FILE).is_file():
        print(
            f"vllm-lab report: {run_dir / TRIALS_FILE} not found; pass a run folder that holds {TRIALS_FILE}",
            file=sys.stderr,
        )
        return 2
    gh = getattr(args, "gh", None)
    if gh:  # a bad target or a missing/signed-out gh is one line before anything is written
        attach.parse_gh_target(gh)
        attach.check_gh()
    zipped = getattr(args, "zip", False)
    paths = build_report(run_dir, for_issue=bool(getattr(args, "for_issue", False) or zipped or gh))
    if zipped:
        paths["zip"] = attach.make_zip(run_dir)
    torn = read_records(run_dir, keep_torn_aside=False).torn
    if torn:
        print(
            f"vllm-lab report: {len(torn)} torn line(s) in {TRIALS_FILE} kept aside in {TRIALS_FILE}.torn",
            file=sys.stderr,
        )
    for path in paths.values():
        print(path)
    if gh:
        try:
            print(attach.post_comment(gh, paths["issue"]) or f"posted {paths['issue']} to {gh}")
        except RuntimeError as e:
            print(f"vllm-lab report: {e}", file=sys.stderr)
            return 1
    return 0
