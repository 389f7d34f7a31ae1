"""A run's report: report.md (beside its plots/), report.html (one self-contained file), report-issue.md, plots.

Everything is derived from trials.jsonl (read through record.read_records); nothing here launches anything.
The verdict comes first: what works, the largest stable max_model_len per setting, which hypotheses the data
supports or refutes. Every text written passes through redact.redact_text.

The report notebook (notebooks/99_report.ipynb) calls load_run, verdict, the plots module, trial_table and
export_html; `vllm-lab report RUN_DIR` builds the same content without a kernel (build_report). Every
renderer takes the same ("heading" | "text" | "table" | "image", ...) blocks from report_blocks:
render_markdown, build_notebook (-> HTML) and issue_report.render_issue (GitHub, Mermaid charts).
"""

from __future__ import annotations

import base64
import sys
import warnings
from pathlib import Path

import nbformat
import pandas as pd

from vllm_lab import hypotheses, load_report, plots
from vllm_lab.gpu_axis import gpu_axis_blocks
from vllm_lab.install_compare import compare_blocks
from vllm_lab.record import TRIALS_FILE, read_records
from vllm_lab.redact import redact_obj, redact_text

PLOTS_DIR = "plots"
FAKE_BANNER = "FAKE backend: test double, not a measurement"
MISSING = "—"


# ---- loading -----------------------------------------------------------------------------------------


def load_run(run_dir: str | Path) -> pd.DataFrame:
    """trials.jsonl as a redacted DataFrame with derived columns; attrs: run_dir, run_id, torn (line count)."""
    recs = read_records(run_dir)
    df = hypotheses.prepare([redact_obj(r) for r in recs.rows])
    df.attrs.update(run_dir=str(run_dir), run_id=_run_id(df, run_dir), torn=len(recs.torn))
    return df


def _run_id(df: pd.DataFrame, run_dir: str | Path) -> str:
    ids = df["run_id"].dropna().astype(str).unique() if "run_id" in df else []
    return ", ".join(ids) if len(ids) else Path(run_dir).resolve().name


# ---- value formatting ----------------------------------------------------------------------------------


def fmt_value(v) -> str:
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return MISSING
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) >= 1 else f"{v:.3g}"
    return str(v)


def _display(df: pd.DataFrame) -> pd.DataFrame:
    """Every cell as a short string (— for unknown) so Markdown and HTML show the same thing."""
    return df.astype(object).map(fmt_value) if not df.empty else df


def _backend_label(backend, mixed: bool) -> str:
    if backend == plots.FAKE:
        return "fake (test double)" if mixed else "fake"
    return fmt_value(backend)


def _long_request(v) -> str:
    return "ok" if v is True else ("failed" if v is False else "not run")


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


def _config_summary(g: pd.DataFrame) -> pd.Series:
    return pd.Series(
        {
            "ready": f"{int(g['started'].sum())}/{len(g)}",
            "long request": "ok"
            if g["stable"].any()
            else _long_request(False if g["long_request_ok"].eq(False).any() else None),
            "kv_cache_tokens": pd.to_numeric(g["kv_cache_tokens"], errors="coerce").max(),
            "backend": ", ".join(sorted(g["backend"].dropna().astype(str).unique())),
            "_ready": int(g["started"].sum()),
            "_stable": bool(g["stable"].any()),
            "_all": bool(g["started"].all()),
            "_mem": g["memory_setting"].iloc[0],
        }
    )


def working_configs(df: pd.DataFrame) -> pd.DataFrame:
    """Configurations with at least one ready trial, best first (stable, always ready, longest context)."""
    ok = df[df["launcher"].notna()]
    keys = ["launcher", "max_model_len", "memory_label"]
    if ok.empty:
        return pd.DataFrame(columns=[*keys, "ready", "long request", "kv_cache_tokens", "backend"])
    groups = ok.groupby(keys, dropna=False).apply(_config_summary, include_groups=False).reset_index()
    groups = groups[groups["_ready"] > 0]
    groups = groups.sort_values(
        ["_stable", "_all", "max_model_len", "_mem"], ascending=[False, False, False, True]
    )
    return (
        groups.drop(columns=["_ready", "_stable", "_all", "_mem"])
        .rename(columns={"memory_label": "memory"})
        .reset_index(drop=True)
    )


def largest_stable(df: pd.DataFrame) -> pd.DataFrame:
    """Per launcher and memory setting: the largest max_model_len that was ready and served a long request."""
    rows = []
    for (launcher, mem), g in df[df["launcher"].notna()].groupby(["launcher", "memory_label"], sort=False):
        stable = g[g["stable"]].sort_values("max_model_len", ascending=False)
        best = stable.iloc[0] if not stable.empty else None
        rows.append(
            {
                "launcher": launcher,
                "memory": mem,
                "largest stable max_model_len": best["max_model_len"] if best is not None else "none stable",
                "trial": best["trial_id"] if best is not None else MISSING,
                "kv_cache_tokens": best["kv_cache_tokens"] if best is not None else None,
                "trials": len(g),
                "_mem": g["memory_setting"].iloc[0],
            }
        )
    out = pd.DataFrame(
        rows,
        columns=[
            "launcher",
            "memory",
            "largest stable max_model_len",
            "trial",
            "kv_cache_tokens",
            "trials",
            "_mem",
        ],
    )
    return out.sort_values(["launcher", "_mem"]).drop(columns="_mem").reset_index(drop=True)


def _headline(df: pd.DataFrame, working: pd.DataFrame) -> str:
    if df.empty:
        return "**No trials recorded.** trials.jsonl holds no complete record yet."
    if working.empty:
        return f"**Nothing started:** none of the {len(df)} trials reached ready."
    best = working.iloc[0]
    return (
        f"**Works:** launcher `{best['launcher']}`, max_model_len {fmt_value(best['max_model_len'])}, {best['memory']} "
        f"(ready {best['ready']}, long request {best['long request']}); "
        f"{len(working)} working configuration(s), best first below."
    )


def _hypothesis_summary(hyp: pd.DataFrame) -> str:
    parts = []
    for word in ("supported", "refuted", "mixed", "not tested"):
        ids = hyp.loc[hyp["verdict"].eq(word), "id"].tolist()
        if ids or word != "mixed":  # mixed (some pairs for, some against) only when there is one
            parts.append(f"{word.capitalize()}: {', '.join(ids) if ids else 'none'}.")
    return "**Hypotheses.** " + " ".join(parts)


def verdict(df: pd.DataFrame) -> dict:
    """The verdict as parts (banner, headline, working, largest_stable, hypotheses, effects) and as Markdown."""
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
    }
    out["markdown"] = redact_text(render_markdown(verdict_blocks(out)))
    return out


def verdict_blocks(v: dict) -> list[tuple]:
    return [
        ("text", v["headline"]),
        ("table", v["working"]),
        (
            "text",
            "**Largest stable max_model_len** per launcher and memory setting (ready, and a request "
            "filling max_model_len to within a block completed):",
        ),
        ("table", v["largest_stable"]),
        ("text", v["hypothesis_summary"]),
        ("table", v["hypotheses"]),
    ]


# ---- tables --------------------------------------------------------------------------------------------


def trial_table(df: pd.DataFrame) -> pd.DataFrame:
    """Every trial in run order: configuration, outcome, failure kind, evidence line and remedy."""
    mixed = df["backend"].nunique() > 1
    return pd.DataFrame(
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


def capacity_table(df: pd.DataFrame) -> pd.DataFrame:
    """Measured KV capacity beside the prediction and vLLM's own estimate, per trial that has any of them."""
    cols = ["kv_cache_tokens", "predicted_kv_cache_tokens", "estimated_max_model_len"]
    rows = df[df[cols].notna().any(axis=1)]
    fake = rows["backend"].eq(plots.FAKE).fillna(False)
    measured = [
        f"{fmt_value(v)} (fake)" if f and fmt_value(v) != MISSING else fmt_value(v)
        for v, f in zip(rows["kv_cache_tokens"], fake, strict=True)
    ]
    return pd.DataFrame(
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


def _md_cell(text: str) -> str:
    return (
        text.replace("\\", "\\\\")
        .replace("|", "\\|")
        .replace("<", "&lt;")
        .replace("\r", " ")
        .replace("\n", " ")
    )


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no tabulate needed)."""
    if df.empty:
        return "_(none)_"
    shown = _display(df)
    header = "| " + " | ".join(_md_cell(str(c)) for c in shown.columns) + " |"
    rule = "|" + "|".join("---" for _ in shown.columns) + "|"
    body = ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join([header, rule, *body])


# ---- the report as blocks ------------------------------------------------------------------------------


def _run_line(df: pd.DataFrame) -> str:
    def values(col: str) -> str:
        vals = df[col].dropna().astype(str).unique() if col in df else []
        return ", ".join(vals) if len(vals) else MISSING

    return (
        f"Run `{df.attrs.get('run_id', MISSING)}`: {len(df)} trials; backend {values('backend')}; "
        f"vLLM {values('vllm_version')}; GPU {values('gpu_name')} (cc {values('gpu_cc')}); model {values('model')}."
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


def report_blocks(df: pd.DataFrame, plot_paths: dict[str, Path | None]) -> list[tuple]:
    """The whole report, verdict first, as ('heading'|'text'|'table'|'image', ...) blocks."""
    v = verdict(df)
    notices = [("text", "> " + line) for line in (v["banner"], _torn_line(df)) if line]
    return [
        ("heading", 1, f"vLLM startup report: {df.attrs.get('run_id', MISSING)}"),
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
        ("heading", 2, "Trials"),
        ("table", trial_table(df)),
    ]


# ---- Markdown ------------------------------------------------------------------------------------------


BLOCK_KINDS = ("heading", "text", "table", "image")


def known_blocks(blocks: list[tuple]) -> list[tuple]:
    """Blocks every renderer knows: ("heading", level, text), ("text", md), ("table", df), ("image", name,
    path, note). A block of another kind shows its text and tables (never a path); an image block with more
    than (name, path, note) keeps those three."""
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "image":
            out.append(tuple(block[:4]) + (None,) * (4 - len(block)))
        elif kind in BLOCK_KINDS:
            out.append(block)
        else:
            for item in block[1:]:
                if isinstance(item, pd.DataFrame):
                    out.append(("table", item))
                elif isinstance(item, str) and item.strip():
                    out.append(("text", item))
    return out


def render_markdown(blocks: list[tuple]) -> str:
    parts = []
    for block in known_blocks(blocks):
        kind = block[0]
        if kind == "heading":
            parts.append("#" * block[1] + " " + block[2])
        elif kind == "text":
            parts.append(block[1])
        elif kind == "table":
            parts.append(markdown_table(block[1]))
        elif kind == "image":
            _, name, path, note = block
            parts.append(f"![{name}]({PLOTS_DIR}/{Path(path).name})" if path else f"_{note or name}_")
    return "\n\n".join(parts) + "\n"


# ---- HTML (nbconvert, no kernel) ------------------------------------------------------------------------


def _output_cell(data: dict) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(source="", outputs=[nbformat.v4.new_output("display_data", data=data)])


def _block_cell(block: tuple) -> nbformat.NotebookNode | None:
    kind = block[0]
    if kind == "heading":
        return nbformat.v4.new_markdown_cell("#" * block[1] + " " + block[2])
    if kind == "text":
        return nbformat.v4.new_markdown_cell(block[1])
    if kind == "table":
        shown = _display(block[1])
        html = (
            shown.to_html(index=False, escape=True, border=0) if not shown.empty else "<p><em>(none)</em></p>"
        )
        return _output_cell({"text/html": html, "text/plain": markdown_table(block[1])})
    _, name, path, note = block
    if not path:
        return nbformat.v4.new_markdown_cell(f"_{note or name}_")
    png = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return _output_cell({"image/png": png, "text/plain": name})


def build_notebook(blocks: list[tuple]) -> nbformat.NotebookNode:
    """Markdown cells and output-only cells (no code), ready for HTMLExporter without a kernel."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [cell for cell in map(_block_cell, known_blocks(blocks)) if cell is not None]
    nb.metadata["language_info"] = {"name": "python"}
    return nb


_TEXT_MIMES = ("text/plain", "text/html", "text/markdown", "application/json")


def redact_notebook(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Redact every cell source and text output in place (images are left as they are)."""
    for cell in nb.cells:
        cell.source = redact_text(cell.source)
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = redact_text(
                    out["text"] if isinstance(out["text"], str) else "".join(out["text"])
                )
            for mime in _TEXT_MIMES:
                if mime in out.get("data", {}) and isinstance(out["data"][mime], str):
                    out["data"][mime] = redact_text(out["data"][mime])
    return nb


# nbconvert's lab template with its CDN scripts left out (require.js, MathJax, Mermaid): the report is one
# file that opens offline with no console error; its images are data URIs already.
_SELF_CONTAINED = "vllm_lab_report.html.j2"
_SELF_CONTAINED_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
"""


def export_html(
    notebook: str | Path | nbformat.NotebookNode, html_path: str | Path, *, title: str = "vLLM report"
) -> Path:
    """An executed notebook (path or node) -> one self-contained HTML file, input cells hidden, text redacted."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    nb = nbformat.read(str(notebook), as_version=4) if isinstance(notebook, str | Path) else notebook
    exporter = HTMLExporter(
        extra_loaders=[DictLoader({_SELF_CONTAINED: _SELF_CONTAINED_TEMPLATE})],
        template_file=_SELF_CONTAINED,
        embed_images=True,  # a Markdown cell's ![](file.png) becomes a data URI too
        exclude_input=True,
        exclude_input_prompt=True,
        exclude_output_prompt=True,
    )
    with warnings.catch_warnings():  # scrapbook's glue outputs have no HTML form, by design
        warnings.filterwarnings("ignore", message=".*scrapbook.scrap.*", category=UserWarning)
        body, _ = exporter.from_notebook_node(redact_notebook(nb), resources={"metadata": {"name": title}})
    html_path = Path(html_path)
    html_path.write_text(body, encoding="utf-8")
    return html_path


# ---- entry points ----------------------------------------------------------------------------------------


def build_report(run_dir: str | Path, *, for_issue: bool = False) -> dict[str, Path]:
    """Write plots/*.png, report.md and report.html (and report-issue.md when for_issue) into run_dir;
    return {name: path} of what was written."""
    from vllm_lab import issue_report

    run_dir = Path(run_dir)
    df = load_run(run_dir)
    plot_paths = plots.write_plots(df, run_dir / PLOTS_DIR)
    blocks = report_blocks(df, plot_paths)
    md_path = run_dir / "report.md"
    md_path.write_text(redact_text(render_markdown(blocks)), encoding="utf-8")
    html_path = export_html(
        build_notebook(blocks), run_dir / "report.html", title=f"vLLM report {df.attrs['run_id']}"
    )
    written = {name: path for name, path in plot_paths.items() if path is not None}
    issue = {"issue": issue_report.write_issue(run_dir, df, blocks)} if for_issue else {}
    return {"md": md_path, "html": html_path, **issue, **written}


def cli_report(args) -> int:
    from vllm_lab import attach

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
