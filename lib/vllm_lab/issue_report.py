"""report-issue.md: the report's blocks as GitHub-flavoured Markdown made to be pasted into an issue or comment.

A leaf renderer: the same blocks as report.md and report.html (report.report_blocks, from the run's one summary), rendered for a reader who has none of the
run's files: no image or link points at a local file; each figure becomes a Mermaid `xychart-beta` block
(GitHub draws them) or a table; tables longer than FOLD_ROWS fold into <details>; evidence lines are code
spans (shown as vLLM printed them, never read as Markdown or HTML); predictions and fake-backend numbers say
so next to the chart. GitHub rejects a comment over 65,536 characters, so the text shrinks step by step
(shorter evidence, then fewer rows, naming what was left out) until it fits.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from vllm_lab import configs, plots
from vllm_lab.render import MISSING, fmt_value, known_blocks, scrub

ISSUE_FILE = "report-issue.md"
GITHUB_LIMIT = 65_536  # characters GitHub accepts in an issue or comment body
FOLD_ROWS = 10  # tables longer than this fold into <details>
CODE_COLUMNS = ("evidence",)  # shown verbatim as code spans
TIMELINE_POINTS = 40  # samples per Mermaid line (GitHub draws every one)
TIMELINE_SERIES = 5
# (longest code cell, most table rows) tried in turn until the text fits the limit.
SHRINK_STEPS = ((None, None), (240, None), (160, 60), (100, 30), (80, 12), (60, 5))
ZIP_NOTE = "the full report (report.html with every figure) is in the run's zip: `vllm-lab report RUN --zip`"


# ---- Markdown pieces -------------------------------------------------------------------------------------


def _text(value) -> str:
    """A plain table cell: one line, pipes escaped, < as an entity (GitHub would read a tag)."""
    text = fmt_value(value).replace("\r", " ").replace("\n", " ")
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")


def code_span(value, max_chars: int | None = None) -> str:
    """value verbatim in a code span: a fence longer than any backtick run inside, pipes escaped for tables."""
    text = fmt_value(value)
    if text == MISSING:
        return MISSING
    text = " ".join(text.split())
    if max_chars and len(text) > max_chars:
        text = text[: max_chars - 1].rstrip() + "…"
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text.replace('|', chr(92) + '|')}{pad}{fence}"


def fold(summary: str, body: str) -> str:
    """A <details> block; blank lines around the body so GitHub renders the Markdown inside."""
    return f"<details><summary>{summary}</summary>\n\n{body}\n\n</details>"


def gfm_table(df: pd.DataFrame, max_code: int | None = None, max_rows: int | None = None) -> str:
    """A GFM table (code columns as code spans), folded when long, cut to max_rows with a note saying so."""
    if df.empty:
        return "_(none)_"
    shown = df if max_rows is None else df.head(max_rows)
    header = "| " + " | ".join(_text(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    codes = [c in CODE_COLUMNS for c in df.columns]
    body = [
        "| "
        + " | ".join(code_span(v, max_code) if code else _text(v) for v, code in zip(row, codes, strict=True))
        + " |"
        for row in shown.itertuples(index=False)
    ]
    table = "\n".join([header, rule, *body])
    left = len(df) - len(shown)
    if left:
        table += f"\n\n_{left} more row(s) left out to fit GitHub's limit; {ZIP_NOTE}._"
    return fold(f"{len(df)} rows", table) if len(df) > FOLD_ROWS else table


def _label(value) -> str:
    """A Mermaid category label: quoted, with no quote inside."""
    return '"' + str(value).replace('"', "'") + '"'


def _number(v) -> str:
    return "0" if v is None or pd.isna(v) else f"{float(v):.6g}"


def xychart(title: str, x_labels: list, series: list[tuple[str, list]], y_title: str) -> str:
    """A Mermaid xychart-beta block; series are ('bar' | 'line', values), one value per x label."""
    lines = [
        "```mermaid",
        "xychart-beta",
        f"    title {_label(title)}",
        f"    x-axis [{', '.join(_label(x) for x in x_labels)}]",
        f"    y-axis {_label(y_title)}",
    ]
    lines += [f"    {kind} [{', '.join(_number(v) for v in values)}]" for kind, values in series]
    return "\n".join([*lines, "```"])


# ---- each figure, for an issue ---------------------------------------------------------------------------


def outcome_grid(df: pd.DataFrame) -> str | None:
    """The outcome grid as a table: a row per launcher and max_model_len, a column per memory setting."""
    rows = plots.grid_rows(df)
    if rows.empty:
        return None
    rows = rows.assign(config=plots.row_label(rows, sep=", "))
    cols = list(rows.sort_values("memory_setting", na_position="first")["memory_label"].unique())
    order = list(rows.sort_values(["variant", "launcher", "max_model_len"])["config"].unique())
    texts = rows.groupby(["config", "memory_label"]).apply(plots.cell_text, include_groups=False)
    heading = configs.variant(plots.prepared_frame(df))[0]
    grid = pd.DataFrame(
        [[cfg, *(texts.get((cfg, c), "not run").replace("\n", ", ") for c in cols)] for cfg in order],
        columns=[(f"{heading}, " if heading else "") + "launcher, max_model_len", *cols],
    )
    return (
        "Cell: `ready` or the failure kind, how many of the trials started, `(fake)` for the test double.\n\n"
        + gfm_table(grid)
    )


def capacity(df: pd.DataFrame) -> str | None:
    """Per model (install, ...) where the run has several, one chart: bars the measured KV tokens (largest
    per memory setting), a line the prediction, labelled as one."""
    df = plots.prepared_frame(df)
    heading, labels = configs.variant(df)
    charts = [
        _capacity_chart(g, f"{heading} {name}" if heading else "")
        for name, g in df.groupby(labels, sort=True)
    ]
    charts = [c for c in charts if c]
    return "\n\n".join(charts) if charts else None


def _capacity_chart(rows: pd.DataFrame, which: str) -> str | None:
    rows = rows[rows["memory_kind"].notna()]
    if rows.empty:
        return None
    rows = rows[rows["memory_kind"].eq(rows["memory_kind"].mode().iloc[0])].sort_values("memory_setting")
    x = list(rows["memory_label"].unique())
    by = rows.groupby("memory_label", sort=False)
    measured = by["kv_cache_tokens"].max().reindex(x)
    predicted = by["predicted_kv_cache_tokens"].mean().reindex(x)
    series, said = [], []
    fake = plots.is_fake(rows[rows["kv_cache_tokens"].notna()]).any()
    if measured.notna().any():
        series.append(("bar", list(measured)))
        said.append(
            "bars: kv_cache_tokens vLLM reported, largest per setting"
            + (" (includes the **fake backend**: not a measurement)" if fake else " (measured)")
        )
    if predicted.notna().any():
        series.append(("line", list(predicted)))
        said.append(
            "line: predicted_kv_cache_tokens, **a prediction** from the memory model, not a measurement"
        )
    if not series:
        return None
    title = "KV cache tokens per memory setting" + (f": {which}" if which else "")
    chart = xychart(title, x, series, "tokens")
    return chart + "\n\n" + "; ".join(said) + "; 0 where nothing was recorded."


def seconds(df: pd.DataFrame) -> str | None:
    rows = df[df["seconds_to_outcome"].notna()]
    if rows.empty:
        return None
    numbers = [i + 1 for i in range(len(df)) if pd.notna(df["seconds_to_outcome"].iloc[i])]
    chart = xychart(
        "Seconds to outcome per trial", numbers, [("bar", list(rows["seconds_to_outcome"]))], "seconds"
    )
    fake = " Includes fake-backend trials (not measurements)." if plots.is_fake(rows).any() else ""
    return chart + f"\n\nx: the trial's number (#) in the Trials table.{fake}"


def search(df: pd.DataFrame) -> str | None:
    rows = plots.search_rows(df)
    if rows.empty:
        return None
    parts = []
    for (variant, launcher, mem), g in rows.groupby(
        ["variant", "launcher", "memory_label"], dropna=False, sort=False
    ):
        parts.append(
            xychart(
                f"Search: {variant + ', ' if variant else ''}{launcher}, {mem}",
                list(g["launch"]),
                [("line", list(g["max_model_len"]))],
                "max_model_len",
            )
        )
    table = pd.DataFrame(
        {
            **(
                {configs.variant(plots.prepared_frame(df))[0]: rows["variant"]}
                if rows["variant"].ne("").any()
                else {}
            ),
            "launch": rows["launch"],
            "launcher": rows["launcher"],
            "memory": rows["memory_label"],
            "max_model_len": rows["max_model_len"],
            "result": np.where(
                rows["stable"], "stable", np.where(rows["started"], "started, long request not ok", "failed")
            ),
        }
    )
    return "\n\n".join([*parts, gfm_table(table)])


def timeline(df: pd.DataFrame) -> str | None:
    """The largest timelines on one shared time axis (TIMELINE_POINTS samples), named in order below."""
    series = [
        (rec, pts)
        for rec, pts in zip(
            df.itertuples(index=False), map(plots.timeline_points, df["gpu_memory_timeline"]), strict=True
        )
        if pts is not None
    ]
    if not series:
        return None
    series = sorted(series, key=lambda s: -s[1][:, 1].max())[:TIMELINE_SERIES]
    grid = np.linspace(0, max(p[:, 0].max() for _, p in series), TIMELINE_POINTS)
    lines = [("line", list(np.interp(grid, p[:, 0], p[:, 1], left=0, right=0))) for _, p in series]
    digits = 0 if grid[1] - grid[0] >= 1 else 1
    chart = xychart("GPU memory while starting (MiB)", [f"{t:.{digits}f}" for t in grid], lines, "MiB")
    names = ", ".join(
        f"{i + 1}. `{r.trial_id}` ({r.outcome}{', fake' if r.backend == plots.FAKE else ''})"
        for i, (r, _) in enumerate(series)
    )
    return chart + f"\n\nx: seconds since launch (NVML samples). Lines in order: {names}."


CHARTS = {
    "outcome_grid": outcome_grid,
    "capacity": capacity,
    "seconds_to_outcome": seconds,
    "gpu_memory_timeline": timeline,
    "search_trajectory": search,
}


# ---- blocks -> text --------------------------------------------------------------------------------------


def _chart(df: pd.DataFrame, name: str, path, note: str) -> str:
    make = CHARTS.get(name)
    text = make(df) if make and path else None
    if text:
        return text
    return f"_{note or name}_" if not path else f"_Figure `{name}`: {ZIP_NOTE}._"


def render_issue_blocks(df: pd.DataFrame, blocks: list[tuple], max_code=None, max_rows=None) -> str:
    """Any block list (render.known_blocks) as GFM: headings one level down, images as charts or tables."""
    parts = []
    for block in known_blocks(blocks):
        kind = block[0]
        if kind == "heading":
            parts.append("#" * min(6, block[1] + 1) + " " + block[2])
        elif kind == "text":
            parts.append(block[1])
        elif kind == "table":
            parts.append(gfm_table(block[1], max_code, max_rows))
        else:
            parts.append(_chart(df, *block[1:]))
    return "\n\n".join(parts) + "\n"


def render_issue(df: pd.DataFrame, blocks: list[tuple], limit: int = GITHUB_LIMIT) -> str:
    """The issue text, redacted, within limit characters: the first shrink step that fits."""
    footer = f"\n---\n_Made by `vllm-lab report --for-issue` from trials.jsonl; {ZIP_NOTE}._\n"
    for max_code, max_rows in SHRINK_STEPS:
        text = scrub(render_issue_blocks(df, blocks, max_code, max_rows)) + footer
        if len(text) <= limit:
            return text
    cut = f"\n\n_(cut at GitHub's {limit} characters; {ZIP_NOTE}.)_\n"
    return text[: limit - len(cut)] + cut


def write_issue(run_dir: str | Path, df: pd.DataFrame, blocks: list[tuple]) -> Path:
    path = Path(run_dir) / ISSUE_FILE
    path.write_text(render_issue(df, blocks), encoding="utf-8")
    return path
