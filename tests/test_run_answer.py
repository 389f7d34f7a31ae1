"""Issue 22 point 20: `vllm-lab run` ends with its answer, then where the reports are; the progress bar's
total is the trials that ran."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from vllm_lab import batch, report
from vllm_lab.record import new_record

pytestmark = pytest.mark.unit

RUNS = Path(__file__).parent / "fixtures" / "runs"


def test_the_bar_ends_at_the_trials_that_ran(tmp_path, capsys):
    """The CPU demo guessed 2 launches for its search and ran 1: the bar ended at 13/14."""
    with batch.TrialProgress(tmp_path, total=14) as progress, (tmp_path / "trials.jsonl").open("a") as f:
        for i in range(13):
            f.write(json.dumps(new_record(trial_id=f"t{i}", outcome="ready")) + "\n")
        f.write(json.dumps(new_record(trial_id="t0", outcome="failed", failure="infrastructure")) + "\n")
    assert (progress.bar.n, progress.bar.total) == (13, 13)  # the lost Ray attempt is no trial
    assert "13/13" in capsys.readouterr().err


def test_an_interrupted_run_keeps_the_planned_total(tmp_path):
    with pytest.raises(KeyboardInterrupt), batch.TrialProgress(tmp_path, total=5) as progress:
        raise KeyboardInterrupt
    assert progress.bar.total == 5


def test_the_run_ends_with_its_verdict_then_where_the_reports_are(tmp_path, capsys):
    run = tmp_path / "p40_factorial"
    shutil.copytree(RUNS / "p40_factorial", run)
    paths = report.build_report(run, for_issue=True)
    summary = batch.RunSummary(run_dir=run, notebooks=[run / "notebooks" / "01.ipynb"], report_paths=paths)
    batch.print_answer(summary, 12.0)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[0] == "Verdict (p40_factorial, 12 s):"
    assert lines[1].startswith("  Works: launcher head, max_model_len 20480, util 0.85")
    assert "  Largest stable max_model_len:" in lines
    assert "    head, util 0.85: 20480" in lines and "    none stable at the 3 other settings" in lines
    assert "  Hypotheses. Supported: H2, H3. Refuted: H1, H4. Not tested: none." in lines
    reports = lines.index(f"Reports in {run}/:")
    assert reports > lines.index("  Hypotheses. Supported: H2, H3. Refuted: H1, H4. Not tested: none.")
    assert lines[reports + 1].startswith("  report.html, report.md, report-issue.md")
    assert len(lines) <= 14  # a few lines, not every file's path
    assert str(run / "plots" / "capacity.png") not in out


def test_the_answer_names_the_load_frontier(tmp_path, capsys):
    level = {"concurrency": 4, "requests": 8, "completed": 8, "failed": 0, "errors_in_stream": 0,
             "output_tokens_per_s": 123.4}  # fmt: skip
    rec = new_record(run_id="r", step="03_load", trial_id="t", backend="vllm-cpu", launcher="head",
                     max_model_len=20352, kv_cache_memory_bytes=10 << 20, outcome="ready", long_request_ok=True,
                     load={"levels": [level]}, load_stable=True, load_reason="ok")  # fmt: skip
    (tmp_path / "trials.jsonl").write_text(json.dumps(rec) + "\n")
    lines = report.verdict_lines(report.load_run(tmp_path))
    assert (
        "Under load: head, KV 10 MiB, max_model_len 20352: 4 concurrent users served cleanly at 123 output tok/s"
        in lines
    )


def test_dry_run_says_how_many_trials_a_run_launches(tmp_path, capsys):
    import yaml
    from conftest import FAKE_CMD, FAKE_MODEL_CONFIG
    from vllm_lab.dryrun import print_dry_run
    from vllm_lab.plan import load_plan

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(FAKE_MODEL_CONFIG))
    plan = {"name": "p", "model": str(model), "vllm_cmd": FAKE_CMD, "steps": [
        {"name": "02", "notebook": "02_context_budget",
         "parameters": {"LAUNCHER": "head", "MAX_MODEL_LEN": 4096, "KV_CACHE_MEMORY_BYTES": 8 << 20}},
        {"name": "03", "notebook": "03_max_context_search",
         "parameters": {"KV_CACHE_MEMORY_BYTES": 8 << 20, "LOW": 1024, "HIGH": 8192}}]}  # fmt: skip
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    p = load_plan(str(tmp_path / "plan.yaml"), check_command=False)
    print_dry_run(p, p.steps)
    assert "a run launches 3 trial(s), counting 2 per search: a guess" in capsys.readouterr().out
