"""Trial ids: what defines a trial is in its id (a short hash), so resume never reuses a stale record.

And a trial given both memory knobs says which one it used.
"""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
from vllm_lab import record, steps
from vllm_lab.search import STEP, memory_launcher, trial_launcher
from vllm_lab.spec import Trial

pytestmark = pytest.mark.unit

SECRET = "hf_q8ZtR4mVx2LpK7cN3bWj9YdS"


def base(model: str = "/m", **over) -> Trial:
    kw = dict(model=model, launcher="head", max_model_len=16384, kv_cache_memory_bytes=10 << 20,
              vllm_cmd="vllm serve", extra_args=["--enforce-eager"], env={"A": "1"}, step="s1")  # fmt: skip
    kw.update(over)
    return Trial(**kw)


@pytest.mark.parametrize(
    "change",
    [
        {"model": "/other/model"},
        {"vllm_cmd": "/venv2/bin/python -m vllm.entrypoints.openai.api_server"},
        {"extra_args": ["--enforce-eager", "--max-num-seqs", "4"]},
        {"env": {"A": "2"}},
        {"launcher": "explicit", "quantization": "awq"},
        {"max_model_len": 32768},
        {"kv_cache_memory_bytes": 20 << 20},
        {"kv_cache_memory_bytes": None, "gpu_memory_utilization": 0.85},
    ],
)
def test_what_defines_a_trial_changes_its_id_and_the_readable_prefix_stays(change):
    a, b = base(), base(**change)
    assert a.trial_id == base("/m").trial_id  # the same trial: the same id (resume finds it)
    assert a.trial_id != b.trial_id
    assert a.trial_id.startswith("s1-head-len16384-kv10485760-")
    assert b.trial_id.startswith(f"s1-{b.launcher}")


def test_quantization_the_launcher_does_not_pass_does_not_change_the_id():
    assert base("/m", quantization="awq").trial_id == base("/m").trial_id  # head passes no flag


def test_a_secret_value_is_hashed_never_written_in_the_id():
    a = base("/m", env={"HF_TOKEN": SECRET}, extra_args=["--api-key", SECRET])
    b = base("/m", env={"HF_TOKEN": SECRET + "x"}, extra_args=["--api-key", SECRET])
    assert SECRET not in a.trial_id and SECRET[:8] not in a.trial_id
    assert a.trial_id != b.trial_id


def test_resume_reuses_an_unchanged_trial_and_runs_a_changed_one(tmp_path, monkeypatch):
    launched: list[str] = []

    def run_trial(trial, run_dir):
        launched.append(trial.trial_id)
        rec = record.new_record(trial_id=trial.trial_id, outcome="ready", step=trial.step)
        record.append_record(run_dir, rec)
        return rec

    mod = types.ModuleType("vllm_lab.probe")
    mod.run_trial = run_trial
    monkeypatch.setitem(sys.modules, "vllm_lab.probe", mod)
    t = base("/m")
    steps.run_or_reuse(t, tmp_path)
    steps.run_or_reuse(base("/m"), tmp_path)  # the plan resumed unchanged
    assert launched == [t.trial_id]
    edited = base(
        "/m", extra_args=["--enforce-eager", "--max-num-seqs", "4"]
    )  # the plan edited, then resumed
    steps.run_or_reuse(edited, tmp_path)
    assert launched == [t.trial_id, edited.trial_id]


def test_search_launches_get_full_ids_and_a_retry_at_the_same_length_is_a_new_trial(tmp_path):
    seen: list[Trial] = []

    def run_trial(trial, run_dir):
        seen.append(trial)
        return record.new_record(
            trial_id=trial.trial_id, max_model_len=trial.max_model_len, outcome="timeout"
        )

    template = base("/m", step=STEP, trial_id="anything")
    launch = trial_launcher(template, tmp_path, run_trial=run_trial)
    launch(20000)
    launch(20000)  # the search's retry after a timeout: run_or_reuse must not hand back the first record
    launch(16384)
    ids = [t.trial_id for t in seen]
    assert ids[0].startswith(f"{STEP}-head-len20000-kv10485760-")
    assert len(set(ids)) == 3 and ids[1] == ids[0] + "-try2"
    assert ids[2] == dataclasses.replace(template, max_model_len=16384, trial_id="").trial_id
    mem = memory_launcher(base("/m", step="m"), tmp_path, run_trial=run_trial)
    mem(0.9)
    assert seen[-1].trial_id.startswith("m-head-len16384-u0.9-") and seen[-1].kv_cache_memory_bytes is None


def test_a_trial_with_both_memory_knobs_says_which_one_is_used():
    t = base("/m", gpu_memory_utilization=0.85)
    assert t.kv_cache_memory_bytes == 10 << 20 and t.gpu_memory_utilization is None
    assert "kv_cache_memory_bytes" in t.memory_note and "0.85" in t.memory_note
    assert base("/m").memory_note is None
    # the search varies the length from a template: the note stays while the budget is what applies
    assert dataclasses.replace(t, max_model_len=20000, trial_id="").memory_note == t.memory_note
    u = dataclasses.replace(t, kv_cache_memory_bytes=None, gpu_memory_utilization=0.9, trial_id="")
    assert u.memory_note is None


@pytest.mark.fake
def test_the_memory_note_reaches_the_record(tmp_path, fake_model):
    from conftest import FAKE_CMD
    from vllm_lab.probe import run_trial

    t = Trial(model=str(fake_model), vllm_cmd=FAKE_CMD, max_model_len=1024, kv_cache_memory_bytes=20 << 20,
              gpu_memory_utilization=0.85, startup_timeout_s=30, request_timeout_s=15)  # fmt: skip
    rec = run_trial(t, tmp_path / "run")
    assert rec["outcome"] == "ready"
    assert "gpu_memory_utilization 0.85" in rec["note"] and rec["gpu_memory_utilization"] is None
