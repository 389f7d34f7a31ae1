"""Paths are resolved once, at the command line: a relative --out or --resume from any folder is one run.

Notebooks run with the repo root as their cwd (papermill's cwd), the batch's progress bar, reap and the
report in the caller's cwd: both must see the same absolute folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import FAKE_CMD
from vllm_lab import batch, cli, record

pytestmark = pytest.mark.unit


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A cwd that is not the repo root."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.fixture
def plan(tmp_path, fake_model) -> Path:
    p = tmp_path / "plan.yaml"
    p.write_text(yaml.safe_dump({"model": str(fake_model), "vllm_cmd": FAKE_CMD,
                                 "steps": [{"name": "s1", "notebook": "01_restore_launcher",
                                            "parameters": {"MAX_MODEL_LEN": 1024}}]}))  # fmt: skip
    return p


KERNEL_CWD = (
    "kernel-cwd"  # stands in for the repo root, papermill's cwd (a failing test must not write there)
)


@pytest.fixture
def notebooks_in_repo_root(monkeypatch, tmp_path):
    """Stand-in for papermill: the notebook resolves RUN_DIR against its own cwd (the repo root)."""
    seen: list[dict] = []

    def execute(notebook, out_path, parameters, timeout_s):
        seen.append(parameters)
        run_dir = tmp_path / KERNEL_CWD / parameters["RUN_DIR"]  # an absolute RUN_DIR stays itself
        record.append_record(
            run_dir, record.new_record(trial_id="t", step=parameters["STEP"], outcome="ready")
        )
        return None

    monkeypatch.setattr(batch, "execute", execute)
    monkeypatch.setattr(batch, "build_report", lambda run_dir, nb_dir, summary: {})
    return seen


def test_relative_out_from_another_folder_is_one_run(elsewhere, plan, notebooks_in_repo_root, capsys):
    assert cli.main(["run", str(plan), "--out", "runs"]) == 0
    (params,) = notebooks_in_repo_root
    run_dir = Path(params["RUN_DIR"])
    assert run_dir.is_absolute() and run_dir.parent == elsewhere / "runs"
    assert [r["trial_id"] for r in record.read_records(run_dir).rows] == ["t"]  # where the batch reads
    assert not (elsewhere.parent / KERNEL_CWD).exists()
    assert f"run folder: {run_dir}" in capsys.readouterr().out


def test_relative_resume_from_another_folder_is_the_same_run(elsewhere, plan, notebooks_in_repo_root):
    run = elsewhere / "old-run"
    run.mkdir()
    assert cli.main(["run", str(plan), "--resume", "old-run"]) == 0
    assert notebooks_in_repo_root[0]["RUN_DIR"] == str(run)
    assert len(record.read_records(run).rows) == 1


def test_run_plan_itself_makes_the_run_folder_absolute(elsewhere, plan, notebooks_in_repo_root):
    summary = batch.run_plan(str(plan), out="rel")
    assert summary.run_dir.is_absolute() and summary.run_dir.parent == elsewhere / "rel"


def test_command_line_paths_are_absolute_before_any_subcommand_runs(elsewhere, monkeypatch, fake_model):
    got = {}
    monkeypatch.setattr(cli, "_search", lambda args: got.update(vars(args)) or 0)
    monkeypatch.setattr(cli, "_reap", lambda args: got.update(vars(args)) or 0)
    rel_model = os.path.relpath(fake_model, elsewhere)
    cli.main(["search", "--model", rel_model, "--gpu-memory-utilization", "0.9", "--out", "o"])
    assert got["out"] == str(elsewhere / "o") and got["model"] == str(fake_model)
    cli.main(["search", "--model", "Qwen/Qwen3-8B-AWQ", "--gpu-memory-utilization", "0.9"])
    assert got["model"] == "Qwen/Qwen3-8B-AWQ"  # a hub id is not a path
    cli.main(["reap", "r"])
    assert got["run_dir"] == str(elsewhere / "r")


def test_search_out_relative_is_absolute_in_the_records(elsewhere, monkeypatch, fake_model):
    import sys
    import types

    dirs = []

    def run_trial(trial, run_dir):
        dirs.append(run_dir)
        return record.new_record(
            max_model_len=trial.max_model_len, outcome="failed", failure="gpu_unsupported"
        )

    mod = types.ModuleType("vllm_lab.probe")
    mod.run_trial = run_trial
    monkeypatch.setitem(sys.modules, "vllm_lab.probe", mod)
    cli.main(["search", "--model", str(fake_model), "--vllm-cmd", sys.executable, "--gpu-memory-utilization",
              "0.9", "--low", "1024", "--high", "2048", "--out", "s"])  # fmt: skip
    assert dirs and all(Path(d) == elsewhere / "s" for d in dirs) and Path(dirs[0]).is_absolute()
    assert json.loads((elsewhere / "s" / "search.json").read_text())["verdict"] == "stopped"
