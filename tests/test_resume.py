"""Resuming a run folder (steps.run_or_reuse): a record is reused only where it answers this run's question."""

from __future__ import annotations

import pytest
from vllm_lab import record, steps
from vllm_lab.spec import Trial

pytestmark = pytest.mark.unit


def _trial(timeout: float) -> Trial:
    return Trial(model="/m/tiny", vllm_cmd="vllm serve", max_model_len=4096, kv_cache_memory_bytes=2**26,
                 startup_timeout_s=timeout, step="s")  # fmt: skip


@pytest.fixture
def launched(monkeypatch) -> list[str]:
    ids: list[str] = []

    def fake_run(trial, run_dir):
        ids.append(trial.trial_id)
        rec = {"trial_id": trial.trial_id, "outcome": "ready", "seconds_to_outcome": 1.0}
        record.append_record(run_dir, rec)
        return rec

    monkeypatch.setattr("vllm_lab.probe.run_trial", fake_run)
    return ids


def test_a_start_given_up_sooner_than_this_run_allows_is_launched_again(tmp_path, launched):
    short = _trial(60)
    record.append_record(
        tmp_path, {"trial_id": short.trial_id, "outcome": "timeout", "seconds_to_outcome": 60.2}
    )
    rec = steps.run_or_reuse(_trial(600), tmp_path)  # same parameters, ten times the patience
    assert launched == [f"{short.trial_id}-t600"] and rec["outcome"] == "ready"
    assert steps.run_or_reuse(_trial(600), tmp_path)["outcome"] == "ready" and len(launched) == 1  # resumed


def test_a_timeout_at_this_runs_own_deadline_and_any_other_outcome_are_reused(tmp_path, launched):
    t = _trial(60)
    record.append_record(tmp_path, {"trial_id": t.trial_id, "outcome": "timeout", "seconds_to_outcome": 60.2})
    assert steps.run_or_reuse(t, tmp_path)["outcome"] == "timeout" and launched == []
    t2 = Trial(**{**t.__dict__, "max_model_len": 8192, "trial_id": ""})
    record.append_record(tmp_path, {"trial_id": t2.trial_id, "outcome": "failed", "seconds_to_outcome": 3.0})
    assert (
        steps.run_or_reuse(Trial(**{**t2.__dict__, "startup_timeout_s": 600}), tmp_path)["outcome"]
        == "failed"
    )
    assert launched == []
