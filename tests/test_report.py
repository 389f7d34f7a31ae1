"""report.md / report.html / plots from synthetic trials.jsonl fixtures (P40 factorial, fake-only, torn+mixed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from vllm_lab import plots, report
from vllm_lab.cli import main
from vllm_lab.record import read_records
from vllm_lab.redact import redact_text

pytestmark = pytest.mark.unit

RUNS = Path(__file__).parent / "fixtures" / "runs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECRETS = ("hf_abcdefghijklmnopqrstuvwxyz123456", "sk-abcdefghijklmnopqrstuvwxyz0123")
SECTIONS = [
    "## Verdict",
    "## Outcome grid",
    "## Capacity against memory setting",
    "## Seconds to outcome",
    "## GPU memory timeline",
    "## Trials",
]


def copy_run(name: str, tmp_path_factory) -> Path:
    """Reports are written next to trials.jsonl (and torn lines set aside): never into the fixture folder."""
    dest = tmp_path_factory.mktemp(name) / name
    shutil.copytree(RUNS / name, dest)
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    out = {}
    for name in ("p40_factorial", "fake_only", "torn_partial"):
        run_dir = copy_run(name, tmp_path_factory)
        out[name] = (run_dir, report.build_report(run_dir))
    return out


def md(built, name: str) -> str:
    return built[name][1]["md"].read_text()


def html(built, name: str) -> str:
    return built[name][1]["html"].read_text()


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    nxt = text.find("\n## ", start + len(heading))
    return text[start : nxt if nxt != -1 else None]


def test_sections_in_order_verdict_first(built):
    text = md(built, "p40_factorial")
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    assert re.findall(r"^## .*", text, re.M)[0] == "## Verdict"


def test_verdict_names_what_works_and_the_hypotheses(built):
    verdict = section(md(built, "p40_factorial"), "## Verdict")
    assert "**Works:** launcher `head`, max_model_len 20480, util 0.85" in verdict
    assert "Supported: H2, H3. Refuted: H1, H4. Not tested: none." in verdict
    assert "| head | util 0.85 | 20480 | 03_max_context_search-head-len20480-u0.85 |" in verdict
    assert "| legacy | util 0.85 | none stable |" in verdict


def test_working_configs_best_first(built):
    df = report.load_run(built["p40_factorial"][0])
    working = report.working_configs(df)
    assert working["max_model_len"].tolist() == [20480, 16384, 21504]  # stable ones first, then started-only
    assert working["long request"].tolist() == ["ok", "ok", "failed"]
    assert set(working["launcher"]) == {"head"}


def test_every_trial_in_the_table_with_its_evidence(built):
    run_dir, _ = built["p40_factorial"]
    table = section(md(built, "p40_factorial"), "## Trials")
    lines = table.splitlines()
    rows = read_records(run_dir).rows
    assert len([line for line in lines if line.startswith("| ") and not line.startswith("| #")]) == len(rows)
    for rec in rows:
        line = next(line for line in lines if f"| {rec['trial_id']} |" in line)
        assert redact_text(rec["evidence"]).replace("|", "\\|") in line
        assert f"| {rec['outcome']} |" in line
        if rec["failure"]:
            assert f"| {rec['failure']} |" in line


def test_plots_are_png_files_linked_relatively(built):
    run_dir, paths = built["p40_factorial"]
    names = {"outcome_grid", "capacity", "seconds_to_outcome", "gpu_memory_timeline", "search_trajectory"}
    assert names <= set(paths)
    text = md(built, "p40_factorial")
    for name in names:
        assert paths[name].parent == run_dir / "plots"
        assert paths[name].read_bytes()[:8] == PNG_MAGIC
        assert f"![{name}](plots/{name}.png)" in text


def test_fake_run_says_so_at_the_top(built):
    text = md(built, "fake_only")
    banner = "FAKE backend: test double, not a measurement"
    assert text.index(banner) < text.index("## Verdict")
    assert banner in html(built, "fake_only")
    assert banner not in md(built, "p40_factorial")
    assert "Mixed backends" not in md(built, "p40_factorial")


def test_fake_run_has_no_timeline_or_search_and_says_why(built):
    _, paths = built["fake_only"]
    assert "gpu_memory_timeline" not in paths and "search_trajectory" not in paths
    text = md(built, "fake_only")
    assert "No GPU memory was sampled" in section(text, "## GPU memory timeline")
    assert "no max_model_len search step" in text


def test_mixed_run_labels_each_row(built):
    text = md(built, "torn_partial")
    assert "Mixed backends: 1 of 4 trials" in text
    trials = section(text, "## Trials")
    assert trials.count("fake (test double)") == 1
    assert "| 00_smoke-explicit-len4096-kv8388608 | 00_smoke | fake (test double) |" in trials


def test_torn_line_is_reported_and_kept_aside(built):
    run_dir, _ = built["torn_partial"]
    text = md(built, "torn_partial")
    assert "**1 torn line(s)**" in text.split("## Verdict")[0]
    assert (run_dir / "trials.jsonl.torn").read_text().startswith('{"run_id": "cpu-partial"')
    assert len(section(text, "## Trials").splitlines()) == 2 + 2 + 4  # heading, blank, header, rule, 4 trials


def test_capacity_figure_labels_measured_predicted_and_fake_differently(built):
    real = report.load_run(built["p40_factorial"][0])
    fig = plots.capacity_figure(real)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "measured (vllm-cuda)" in labels and plots.PREDICTED_LABEL in labels
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert lines["measured (vllm-cuda)"].get_marker() == "o"
    assert lines["measured (vllm-cuda)"].get_markerfacecolor() != "none"
    assert lines[plots.PREDICTED_LABEL].get_markerfacecolor() == "none"
    assert lines[plots.PREDICTED_LABEL].get_linestyle() == "--"
    fake = plots.capacity_figure(report.load_run(built["fake_only"][0]))
    fake_labels = [t.get_text() for t in fake.axes[0].get_legend().get_texts()]
    assert plots.FAKE_LABEL in fake_labels and not any(t.startswith("measured") for t in fake_labels)
    assert "FAKE" in fake.axes[0].get_title()


def test_capacity_table_marks_fake_numbers(built):
    text = section(md(built, "fake_only"), "## Capacity against memory setting")
    assert "kv_cache_tokens (measured)" in text and "predicted_kv_cache_tokens (prediction)" in text
    assert "16368 (fake)" in text


def test_html_has_no_code_input(built):
    page = html(built, "p40_factorial")
    code_cells = re.findall(r'<div class="jp-Cell jp-CodeCell[^"]*"', page)
    assert code_cells and all("jp-mod-noInput" in c for c in code_cells)
    assert "highlight hl-ipython3" not in page
    assert "data:image/png;base64," in page
    assert "Supported: H2, H3" in page


def test_secrets_never_reach_md_or_html(built):
    raw = (RUNS / "p40_factorial" / "trials.jsonl").read_text()
    assert all(s in raw for s in SECRETS)  # the fixture really plants them
    for name in built:
        for text in (md(built, name), html(built, name)):
            assert not any(s in text for s in SECRETS)
    assert "***REDACTED***" in section(md(built, "p40_factorial"), "## Trials")


def test_export_html_hides_inputs_and_redacts_outputs(tmp_path):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("SOURCE_MARKER_42 = 'never shown'")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"visible output {SECRETS[0]}\n")]
    nb.cells = [nbformat.v4.new_markdown_cell("# Executed report"), cell]
    nb_path = tmp_path / "99_report.ipynb"
    nbformat.write(nb, nb_path)
    page = report.export_html(nb_path, tmp_path / "report.html").read_text()
    assert "visible output" in page and "Executed report" in page
    assert "SOURCE_MARKER_42" not in page and SECRETS[0] not in page


def test_verdict_markdown_for_the_notebook(built):
    v = report.verdict(report.load_run(built["fake_only"][0]))
    assert v["banner"].startswith("**FAKE backend")
    assert v["hypotheses"].set_index("id").loc["H4", "verdict"] == "supported"
    assert v["markdown"].startswith("**Works:**")
    assert "| H4 | only a combination of knobs fails | supported |" in v["markdown"]


def test_markdown_table_escapes_cells():
    import pandas as pd

    text = report.markdown_table(pd.DataFrame({"a": ["x|y\nz <b>"], "b": [None]}))
    assert text.splitlines()[2] == "| x\\|y z &lt;b> | — |"


def test_cli_prints_paths_and_exits_0(tmp_path_factory, capsys):
    run_dir = copy_run("fake_only", tmp_path_factory)
    assert main(["report", str(run_dir)]) == 0
    printed = capsys.readouterr().out.split()
    assert str(run_dir / "report.md") in printed and str(run_dir / "report.html") in printed
    assert all(Path(p).exists() for p in printed)


def test_cli_without_trials_exits_2_with_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "trials.jsonl" in err
    assert not (tmp_path / "report.md").exists()


def test_empty_trials_file_still_reports(tmp_path):
    (tmp_path / "trials.jsonl").write_text("")
    paths = report.build_report(tmp_path)
    assert "**No trials recorded.**" in paths["md"].read_text()
    assert set(paths) == {"md", "html"}


def test_search_plot_follows_launch_order(built):
    df = report.load_run(built["p40_factorial"][0])
    rows = plots.search_rows(df)
    assert rows["launch"].tolist() == [1, 2, 3, 4, 5]
    assert rows["max_model_len"].tolist() == [16384, 24576, 20480, 22528, 21504]
    assert plots.search_figure(report.load_run(built["fake_only"][0])) is None


def test_outcome_grid_annotates_failure_kinds(built):
    fig = plots.outcome_grid_figure(report.load_run(built["p40_factorial"][0]))
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert {"ready", "kv_cache_insufficient", "gpu_mem_util_unavailable"} <= texts
    assert any(t.startswith("quantization_mismatch\n0/2 ready") for t in texts)


def test_report_reads_only_the_record(built):
    run_dir, _ = built["p40_factorial"]
    rows = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert len(report.load_run(run_dir)) == len(rows)


def test_preflight_figure_draws_predictions_hollow_and_the_notes_measurement_filled(tmp_path):
    from vllm_lab import memory, predict

    facts, card = memory.load_model("Qwen3-8B-AWQ"), predict.resolve_gpu("rtx3060-12gb")
    curve = predict.utilization_curve(facts, card, [0.5, 0.85, 0.95])
    fig = plots.preflight_figure(
        curve, "Qwen3-8B-AWQ on RTX 3060", facts.max_len, predict.observed_on(facts, card)
    )
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    pred = lines["predicted largest max_model_len"]
    assert pred.get_markerfacecolor() == "none" and pred.get_linestyle() == "--"
    assert list(pred.get_ydata()) == [r["max_model_len"] for r in curve]
    seen = lines["measured on this card: 22,256 KV tokens"]
    assert seen.get_markerfacecolor() != "none" and list(seen.get_xdata()) == [0.85]
    assert "model limit 40,960" in lines and "predicted" in fig.axes[0].get_title()
    assert not fig.axes[0].collections  # overhead observed on this card: no band drawn
    p40 = plots.preflight_figure(predict.utilization_curve(facts, "p40", [0.5, 0.95]), "P40", facts.max_len)
    assert p40.axes[0].collections and not any(
        t.startswith("measured") for t in p40.axes[0].get_legend_handles_labels()[1]
    )
    assert plots.save_figure(p40, tmp_path / "pf.png").read_bytes()[:4] == b"\x89PNG"
    assert plots.preflight_figure([], "empty", 1) is None


# ---- report-issue.md: GitHub-flavoured, pasted into an issue -------------------------------------------


def gfm_html(text: str) -> str:
    """GitHub's flavour as markdown-it-py has it: CommonMark + tables, strikethrough, task lists, raw HTML."""
    from markdown_it import MarkdownIt
    from mdit_py_plugins.tasklists import tasklists_plugin

    return (
        MarkdownIt("commonmark", {"html": True})
        .enable(["table", "strikethrough"])
        .use(tasklists_plugin)
        .render(text)
    )


def visible_text(page: str) -> str:
    """The text a reader sees (entities decoded once, as a browser does)."""
    from html.parser import HTMLParser

    parts: list[str] = []
    parser = HTMLParser(convert_charrefs=True)
    parser.handle_data = parts.append
    parser.feed(page)
    return "".join(parts)


def assert_pastes_cleanly(text: str) -> str:
    """No image or link to a local file, no entity shown as text, under GitHub's limit; the rendered HTML."""
    from vllm_lab.issue_report import GITHUB_LIMIT

    assert len(text) <= GITHUB_LIMIT
    page = gfm_html(text)
    assert "<img" not in page and "plots/" not in text and ".png" not in text
    assert not re.findall(r'href="(?!https://)', page)  # only web links, none to a local file
    shown = visible_text(page)
    assert not re.findall(r"&(lt|gt|amp|quot|#\d+);", shown), "an HTML escape shows as text"
    return page


def many_trials(n: int) -> list[dict]:
    """n records of a long factorial with long, awkward evidence lines (pipes, tags, backticks)."""
    from vllm_lab.record import new_record

    rows = []
    for i in range(n):
        ready = i % 3 == 0
        rows.append(
            new_record(
                run_id="big", step="04_hypotheses", trial_id=f"04_hypotheses-head-len{16384 + 256 * i}-u0.85",
                backend="vllm-cuda", launcher=("legacy", "head")[i % 2], max_model_len=16384 + 256 * i,
                gpu_memory_utilization=(0.85, 0.9, 0.95)[i % 3], outcome="ready" if ready else "failed",
                failure=None if ready else "kv_cache_insufficient", seconds_to_outcome=10.0 + i,
                kv_cache_tokens=20736 if ready else None, predicted_kv_cache_tokens=21504,
                long_request_ok=True if ready else None,
                evidence=("Application startup complete." if ready else
                          f"ValueError: <unk> | `max_model_len` ({16384 + 256 * i}) is larger than the KV cache "
                          "can hold; " + "x" * 300),
                remedy="lower max_model_len <= the estimate",
                gpu_memory_timeline=[[0, 0], [5, 4000 + i], [9, 21000]] if i < 8 else None,
            )
        )  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def issue_texts(built) -> dict[str, str]:
    from vllm_lab import issue_report

    out = {}
    for name, (run_dir, _) in built.items():
        df = report.load_run(run_dir)
        out[name] = issue_report.render_issue(
            df, report.report_blocks(df, plots.write_plots(df, run_dir / "plots"))
        )
    return out


def test_issue_report_verdict_first_and_pastes_cleanly(issue_texts):
    for text in issue_texts.values():
        assert_pastes_cleanly(text)
    lines = [line for line in issue_texts["p40_factorial"].splitlines() if line.strip()]
    assert lines[0].startswith("## vLLM startup report") and lines[1] == "### Verdict"
    assert lines[2].startswith("**Works:** launcher `head`, max_model_len 20480")
    fake = issue_texts["fake_only"]
    assert fake.index("FAKE backend: test double") < fake.index("### Verdict")


def test_issue_report_draws_figures_as_mermaid_or_tables_and_marks_predictions(issue_texts):
    text = issue_texts["p40_factorial"]
    page = gfm_html(text)
    assert (
        page.count('<code class="language-mermaid">xychart-beta') == 4
    )  # capacity, seconds, timeline, search
    cap = section(text, "### Capacity against memory setting")
    assert "bar [20736, 0]" in cap and "line [21504, 0]" in cap
    assert "**a prediction** from the memory model, not a measurement" in cap
    assert "| legacy, len 16384 | quantization_mismatch, 0/2 ready | quantization_mismatch |" in text
    assert "bars: kv_cache_tokens vLLM reported" in section(issue_texts["fake_only"], "### Capacity")
    assert "**fake backend**: not a measurement" in section(issue_texts["fake_only"], "### Capacity")


def test_issue_report_evidence_in_code_spans_and_long_tables_folded(issue_texts, built):
    import html as html_lib

    page = gfm_html(issue_texts["p40_factorial"])
    codes = {html_lib.unescape(c) for c in re.findall(r"<code>(.*?)</code>", page)}
    for rec in read_records(built["p40_factorial"][0]).rows:
        assert " ".join(redact_text(rec["evidence"]).split()) in codes
    trials = section(issue_texts["p40_factorial"], "### Trials")
    assert "<details><summary>16 rows</summary>" in trials
    assert "``Quantization method specified in the model config (awq) does not match" in trials


def test_issue_report_of_100_trials_fits_githubs_limit(tmp_path, capsys):
    from vllm_lab.record import append_record

    for rec in many_trials(100):
        append_record(tmp_path, rec)
    assert main(["report", str(tmp_path), "--for-issue"]) == 0
    issue = tmp_path / "report-issue.md"
    assert str(issue) in capsys.readouterr().out.split()
    text = issue.read_text()
    page = assert_pastes_cleanly(text)
    assert "<details><summary>100 rows</summary>" in text
    assert "<code>ValueError: &lt;unk&gt; | `max_model_len` (16640)" in page  # verbatim, pipe and tag intact
    assert "ValueError: <unk> | `max_model_len`" in visible_text(page)


def test_issue_report_shrinks_to_the_limit_and_says_what_it_left_out(tmp_path):
    from vllm_lab import issue_report
    from vllm_lab.record import append_record

    for rec in many_trials(100):
        append_record(tmp_path, rec)
    df = report.load_run(tmp_path)
    blocks = report.report_blocks(df, plots.write_plots(df, tmp_path / "plots"))
    full = issue_report.render_issue(df, blocks, limit=10**9)
    small = issue_report.render_issue(df, blocks, limit=30_000)
    assert len(full) > 30_000 >= len(small)
    assert "more row(s) left out to fit GitHub's limit" in small and "…`" in small
    assert_pastes_cleanly(small)


def test_every_renderer_takes_a_block_kind_it_does_not_know(tmp_path):
    import pandas as pd
    from vllm_lab import issue_report

    df = report.load_run(RUNS / "fake_only")
    blocks = [("heading", 2, "Under load"), ("load", "**Stable** up to 4 streams", pd.DataFrame({"level": [1, 4]})),
              ("image", "load_frontier", None, "No load was run.", "extra"), ("image", "unknown_chart", tmp_path / "x.png", "n")]  # fmt: skip
    md_text = report.render_markdown(blocks[:3])
    assert (
        "**Stable** up to 4 streams" in md_text and "| level |" in md_text and "_No load was run._" in md_text
    )
    nb = report.build_notebook(blocks[:3])
    assert len(nb.cells) == 4
    issue = issue_report.render_issue(df, blocks)
    assert "**Stable** up to 4 streams" in issue and "_No load was run._" in issue
    assert "Figure `unknown_chart`" in issue and "x.png" not in issue


# ---- --zip and --gh --------------------------------------------------------------------------------------


def test_zip_holds_the_reports_record_plots_logs_and_notebooks_redacted(tmp_path_factory, capsys):
    import zipfile

    run_dir = copy_run("fake_only", tmp_path_factory)
    (run_dir / "logs").mkdir()
    (run_dir / "logs" / "t1.log").write_text(f"INFO start\nHF_TOKEN={SECRETS[0]}\n")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"TOKEN = '{SECRETS[0]}'")]
    (run_dir / "notebooks").mkdir()
    nbformat.write(nb, run_dir / "notebooks" / "02_context_budget.ipynb")
    assert main(["report", str(run_dir), "--zip"]) == 0
    archive = run_dir / f"{run_dir.name}-report.zip"
    assert str(archive) in capsys.readouterr().out.split()
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        texts = [zf.read(n).decode("utf-8", "replace") for n in names]
    top = run_dir.name
    assert {f"{top}/{n}" for n in ("report.html", "report.md", "report-issue.md", "trials.jsonl",
                                    "plots/outcome_grid.png", "logs/t1.log",
                                    "notebooks/02_context_budget.ipynb")} <= names  # fmt: skip
    assert not any(s in t for t in texts for s in SECRETS)
    assert any("***REDACTED***" in t for t in texts)


@pytest.fixture
def stand_in_gh(tmp_path, monkeypatch):
    """A `gh` on PATH that records its argv and the body it was given; GH_SIGNED_IN=0 makes it signed out."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "gh-calls.jsonl"
    gh = bin_dir / "gh"
    gh.write_text(f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
body = None
if "--body-file" in args:
    body = open(args[args.index("--body-file") + 1]).read()
with open({str(calls)!r}, "a") as f:
    f.write(json.dumps({{"args": args, "body": body}}) + "\\n")
if args[:2] == ["auth", "status"]:
    sys.exit(0 if os.environ.get("GH_SIGNED_IN", "1") == "1" else 1)
print("https://github.com/owner/repo/issues/7#issuecomment-1")
""")
    gh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return lambda: [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def test_gh_posts_report_issue_as_a_comment(tmp_path_factory, stand_in_gh, capsys):
    run_dir = copy_run("fake_only", tmp_path_factory)
    assert main(["report", str(run_dir), "--gh", "owner/repo#7"]) == 0
    calls = stand_in_gh()
    assert calls[0]["args"] == ["auth", "status"]
    post = calls[-1]
    assert (
        post["args"][:5] == ["issue", "comment", "7", "--repo", "owner/repo"]
        and "--body-file" in post["args"]
    )
    assert post["body"] == (run_dir / "report-issue.md").read_text()
    assert "issuecomment-1" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("target", "signed_in", "says"),
    [("owner/repo", "1", "OWNER/REPO#NUMBER"), ("owner/repo#7", "0", "gh auth login")],
)
def test_gh_bad_target_or_signed_out_is_one_line_before_anything_is_written(
    tmp_path_factory, stand_in_gh, monkeypatch, capsys, target, signed_in, says
):
    monkeypatch.setenv("GH_SIGNED_IN", signed_in)
    run_dir = copy_run("fake_only", tmp_path_factory)
    assert main(["report", str(run_dir), "--gh", target]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err
    assert not (run_dir / "report-issue.md").exists() and not (run_dir / "report.html").exists()
    assert not [c for c in stand_in_gh() if c["args"][:1] == ["issue"]]


def test_gh_missing_is_one_line(tmp_path_factory, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path_factory.mktemp("empty-bin")))
    run_dir = copy_run("fake_only", tmp_path_factory)
    assert main(["report", str(run_dir), "--gh", "owner/repo#7"]) == 2
    assert "`gh` is not on PATH" in capsys.readouterr().err


# ---- report.html: one file, nothing from a CDN ------------------------------------------------------------


def test_html_is_self_contained(built):
    for name in built:
        page = html(built, name)
        assert (
            not re.findall(r"<script[^>]+src=", page) and "require.js" not in page and "MathJax" not in page
        )
        assert not re.findall(r'<img[^>]+src="(?!data:image/png;base64,)', page)
