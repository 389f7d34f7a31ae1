"""Every notebook through papermill, with the fake vLLM for speed: records, plots and both reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml
from conftest import FAKE_CMD, ROOT
from vllm_lab import record
from vllm_lab.batch import run_plan

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KV_LOW, KV_HIGH = 10 * 2**20, 20 * 2**20  # the fake's tiny config costs 512 B/token: 20480 and 40960 tokens


@pytest.mark.unit
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_in_git_has_no_outputs_and_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    names = [line.split("=")[0].strip() for line in tagged[0].source.splitlines() if "=" in line]
    assert names and all(n.isupper() for n in names), names
    assert all("#" in line for line in tagged[0].source.splitlines() if "=" in line), (
        "each parameter has a comment"
    )


def fake_plan(tmp_path: Path, model: Path) -> Path:
    plan = {
        "name": "fake-all", "model": str(model), "vllm_cmd": FAKE_CMD,
        "defaults": {"env": {"FAKE_VLLM_VERSION": "0.10.2"}, "startup_timeout_s": 30, "request_timeout_s": 15},
        "steps": [
            {"name": "00_preflight", "notebook": "00_preflight", "parameters": {"GPU": "p40"}},
            {"name": "01_restore_launcher", "notebook": "01_restore_launcher",
             "parameters": {"LAUNCHER": "legacy", "MAX_MODEL_LEN": 16384, "KV_CACHE_MEMORY_BYTES": KV_LOW}},
            {"name": "02_context_budget_085", "notebook": "02_context_budget",
             "parameters": {"LAUNCHER": "head", "MAX_MODEL_LEN": 32768, "KV_CACHE_MEMORY_BYTES": KV_LOW}},
            {"name": "02_context_budget_095", "notebook": "02_context_budget",
             "parameters": {"LAUNCHER": "head", "MAX_MODEL_LEN": 32768, "KV_CACHE_MEMORY_BYTES": KV_HIGH}},
            {"name": "03_max_context_search", "notebook": "03_max_context_search",
             "parameters": {"KV_CACHE_MEMORY_BYTES": KV_LOW, "LOW": 16384, "HIGH": 40960}},
            {"name": "04_hypotheses", "notebook": "04_hypotheses",
             "parameters": {"LAUNCHERS": ["legacy", "head"], "MAX_MODEL_LENS": [16384, 22256],
                            "KV_BUDGETS_BYTES": [KV_LOW, KV_HIGH]}},
        ],
    }  # fmt: skip
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """The whole plan once (module scope: ~1 min), shared by the checks below."""
    tmp = tmp_path_factory.mktemp("fake-run")
    model = tmp / "model"
    model.mkdir()
    from conftest import FAKE_MODEL_CONFIG

    (model / "config.json").write_text(json.dumps(FAKE_MODEL_CONFIG))
    plan = fake_plan(tmp, model)
    summary = run_plan(str(plan), out=str(tmp / "out"))
    return summary, plan


@pytest.mark.notebook
@pytest.mark.fake
def test_plan_runs_every_notebook_and_records_every_trial(fake_run):
    summary, _ = fake_run
    assert summary.errors == []
    rows = record.read_records(summary.run_dir).rows
    by_step: dict[str, list] = {}
    for r in rows:
        by_step.setdefault(r["step"], []).append(r)
    assert set(by_step) == {"01_restore_launcher", "02_context_budget_085", "02_context_budget_095",
                            "03_max_context_search", "04_hypotheses"}  # fmt: skip
    assert len(by_step["04_hypotheses"]) == 8
    assert all(r["backend"] == "fake" and r["schema_version"] == record.SCHEMA_VERSION for r in rows)
    assert {r["outcome"] for r in by_step["02_context_budget_085"]} == {"failed"}
    assert by_step["02_context_budget_085"][0]["failure"] == "kv_cache_insufficient"
    assert by_step["02_context_budget_085"][0]["estimated_max_model_len"] == 20480
    assert by_step["02_context_budget_095"][0]["outcome"] == "ready"
    assert by_step["02_context_budget_095"][0]["long_request_ok"] is True
    search = by_step["03_max_context_search"]
    assert len(search) <= 3
    assert max(r["max_model_len"] for r in search if r["outcome"] == "ready") == 20480
    for name in ("01_restore_launcher", "03_max_context_search", "04_hypotheses"):
        glued = record.read_glued(summary.run_dir / "notebooks" / f"{name}.ipynb")
        assert glued["records"] and all(r["trial_id"] for r in glued["records"])


@pytest.mark.notebook
@pytest.mark.fake
def test_reports_and_plots_are_written(fake_run):
    summary, _ = fake_run
    run = summary.run_dir
    md = (run / "report.md").read_text()
    assert md.index("Verdict") < md.index("Outcome grid")
    assert "FAKE backend" in md
    assert "kv_cache_insufficient" in md
    html = (run / "report.html").read_text()
    assert "FAKE backend" in html
    assert "steps.step_params" not in html and "import " not in html  # input cells hidden
    for name in ("outcome_grid", "capacity", "seconds_to_outcome", "search_trajectory"):
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.notebook
@pytest.mark.fake
def test_resume_of_a_finished_run_launches_nothing(fake_run):
    summary, plan = fake_run
    before = (summary.run_dir / record.TRIALS_FILE).read_text()
    again = run_plan(str(plan), resume=str(summary.run_dir), only=["01_restore_launcher", "04_hypotheses"])
    assert again.errors == []
    assert (summary.run_dir / record.TRIALS_FILE).read_text() == before


@pytest.mark.notebook
@pytest.mark.fake
def test_dry_run_prints_every_trial_and_launches_nothing(fake_run, capsys, tmp_path):
    _, plan = fake_run
    run_plan(str(plan), dry_run=True)
    out = capsys.readouterr().out
    assert out.count("predicted:") == 1 + 2 + 8
    assert "nothing was launched" in out


@pytest.mark.notebook
@pytest.mark.fake
def test_notebook_runs_under_plain_papermill_cli(tmp_path, fake_model):
    out = tmp_path / "out.ipynb"
    run = tmp_path / "run"
    papermill = Path(sys.executable).with_name("papermill")
    r = subprocess.run(
        [str(papermill), str(ROOT / "notebooks" / "02_context_budget.ipynb"), str(out), "-k", "python3",
         "-p", "RUN_DIR", str(run), "-p", "MODEL", str(fake_model), "-p", "VLLM_CMD", FAKE_CMD,
         "-p", "MAX_MODEL_LEN", "32768", "-p", "KV_CACHE_MEMORY_BYTES", str(KV_HIGH)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    rows = record.read_records(run).rows
    assert len(rows) == 1 and rows[0]["outcome"] == "ready" and rows[0]["served_max_model_len"] == 32768
    nb = nbformat.read(out, as_version=4)
    assert [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]


# ---- memory knobs: no CPU-demo budget by default, and a plan that sets both hears which one is used -----

TRIAL_NOTEBOOKS = ("01_restore_launcher", "02_context_budget", "03_max_context_search")


@pytest.mark.unit
@pytest.mark.parametrize("notebook", TRIAL_NOTEBOOKS)
def test_a_gpu_plan_that_sets_only_the_utilization_runs_at_that_utilization(tmp_path, fake_model, notebook):
    from vllm_lab.dryrun import _trials
    from vllm_lab.plan import load_plan, notebook_parameter_defaults
    from vllm_lab.steps import step_params

    assert notebook_parameter_defaults(notebook)["KV_CACHE_MEMORY_BYTES"] is None  # not the CPU demo's 10 MiB
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump({"model": str(fake_model), "vllm_cmd": FAKE_CMD, "steps": [
        {"name": "s", "notebook": notebook, "parameters": {"GPU_MEMORY_UTILIZATION": 0.9}}]}))  # fmt: skip
    plan = load_plan(path)
    trials = _trials(plan, plan.steps[0])
    if trials is None:  # the search: its template trial
        params = {
            **notebook_parameter_defaults(notebook),
            **plan.notebook_parameters(plan.steps[0], tmp_path),
        }
        trials = [step_params(params).trial()]
    assert [(t.gpu_memory_utilization, t.kv_cache_memory_bytes, t.memory_note) for t in trials] == [
        (0.9, None, None)
    ]


@pytest.mark.unit
def test_a_plan_step_with_both_memory_knobs_warns_in_one_line_and_still_loads(tmp_path, fake_model, capsys):
    from vllm_lab.plan import load_plan

    path = tmp_path / "both.yaml"
    path.write_text(yaml.safe_dump({"model": str(fake_model), "vllm_cmd": FAKE_CMD, "steps": [
        {"name": "a", "notebook": "02_context_budget",
         "parameters": {"GPU_MEMORY_UTILIZATION": 0.9, "KV_CACHE_MEMORY_BYTES": KV_LOW}},
        {"name": "b", "notebook": "02_context_budget", "parameters": {"GPU_MEMORY_UTILIZATION": 0.9}},
        {"name": "c", "notebook": "04_hypotheses", "parameters": {
            "LAUNCHERS": ["head"], "MAX_MODEL_LENS": [1024], "UTILIZATIONS": [0.9], "KV_BUDGETS_BYTES": [KV_LOW]}},
    ]}))  # fmt: skip
    assert [s.name for s in load_plan(path).steps] == ["a", "b", "c"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert "steps[0]" in err[0] and "KV_CACHE_MEMORY_BYTES" in err[0] and "GPU_MEMORY_UTILIZATION" in err[0]
    assert "steps[2]" in err[1] and "KV_BUDGETS_BYTES" in err[1]
    assert all(line.startswith("vllm-lab: warning:") for line in err)


@pytest.mark.unit
def test_the_cpu_demo_plan_sets_its_kv_budgets_itself(capsys):
    from vllm_lab.plan import load_plan

    raw = yaml.safe_load((ROOT / "params" / "demo-cpu.yaml").read_text())
    for step in raw["steps"]:
        params = step.get("parameters") or {}
        if step["notebook"] in TRIAL_NOTEBOOKS:  # a vLLM KV budget, or llama.cpp's address-space limit
            memory = params.get("KV_CACHE_MEMORY_BYTES") or params.get("MEMORY_LIMIT_BYTES")
            assert isinstance(memory, int), step["name"]
        if step["notebook"] == "04_hypotheses":
            assert params.get("KV_BUDGETS_BYTES"), step["name"]
    load_plan(ROOT / "params" / "demo-cpu.yaml", check_command=False)
    assert capsys.readouterr().err == ""  # no knob clash in the demo


@pytest.mark.notebook
@pytest.mark.fake
def test_relative_out_from_another_folder_runs_steps_1_and_4_into_one_run_folder(tmp_path, fake_model):
    """The installed command from a folder that is not the repo root, --out relative: one run folder."""
    plan = {
        "name": "rel", "model": str(fake_model), "vllm_cmd": FAKE_CMD,
        "defaults": {"env": {"FAKE_VLLM_VERSION": "0.10.2"}, "startup_timeout_s": 30, "request_timeout_s": 15},
        "steps": [
            {"name": "01_restore_launcher", "notebook": "01_restore_launcher",
             "parameters": {"LAUNCHER": "head", "MAX_MODEL_LEN": 16384, "KV_CACHE_MEMORY_BYTES": KV_LOW,
                            "GPU_MEMORY_UTILIZATION": 0.85}},
            {"name": "03_max_context_search", "notebook": "03_max_context_search",
             "parameters": {"KV_CACHE_MEMORY_BYTES": KV_LOW, "LOW": 16384, "HIGH": 40960}},
        ],
    }  # fmt: skip
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    exe = Path(sys.executable).with_name("vllm-lab")
    r = subprocess.run([str(exe), "run", "../plan.yaml", "--out", "rel"], cwd=cwd, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    (run,) = (cwd / "rel").iterdir()
    rows = record.read_records(run).rows
    assert rows[0]["step"] == "01_restore_launcher" and len(rows) >= 2
    assert all(Path(r["log_path"]).is_relative_to(run) for r in rows)
    assert rows[0]["kv_cache_memory_bytes"] == KV_LOW and "gpu_memory_utilization 0.85" in rows[0]["note"]
    assert "both" in r.stderr.lower() or "0.85" in r.stderr  # the plan check warned before the run
    # only a KV budget: no both-knobs note
    assert all(not (row["note"] or "").startswith("kv_cache_memory_bytes") for row in rows[1:])
    glued = record.read_glued(run / "notebooks" / "03_max_context_search.ipynb")
    assert glued["verdict"] == "found" and glued["max_model_len"] == 20480
    assert (run / "report.md").is_file()
    assert not (ROOT / "rel").exists()
